"""Serving under load: throughput and latency of the tiny model served expert-parallel in real time.

    python bench/serve_load.py [--world 2] [--requests 300] [--rate 400] [--window 0.1] [--policy moeless]

Requests of mixed lengths (prompts log-uniform in [2, 64] tokens, 1 to 5 new tokens) arrive as a Poisson
process of --rate per second; `serve(realtime=True)` batches them in windows of --window seconds and starts a
window's batch once the window has passed, so arrivals faster than the service queue up. Prints the requests
served / refused / failed, generated tokens/s, requests/s and the latency (arrival -> last token) and time to
first token percentiles, in seconds, and the mean MoE-layer time. One gloo process per rank on CPU (NCCL with
GPUs). A measurement, not a test: it asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path


def _rank(rank, world, port, args, requests, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(1)
    from moeless import serve

    ctx = serve.init_distributed(rank=rank, world_size=world, timeout_s=args["timeout"])
    ok = False
    try:
        model = serve.load_model(None)
        # first calls, outside the measurement: torch's, and numba compiling the policy's loops on a fresh install
        warm = serve.ExpertParallelServer(model, ctx, policy=args["policy"])
        warm.generate([list(r.prompt) for r in requests[:2 * world]], 2)
        warm.close()
        srv = serve.ExpertParallelServer(model, ctx, policy=args["policy"])
        t = time.perf_counter()
        results = srv.serve(requests, batch_window_s=args["window"], realtime=True)
        seconds = time.perf_counter() - t
        summary = srv.close()
        if rank == 0:
            report = serve.load_report(results, seconds)
            report["moe_layer_ms"] = summary["moe_layer_ms"]["mean"]
            report["batches"] = len({r.batch for r in results if r.batch >= 0})
            Path(out).write_text(json.dumps(report))
        ok = True
    finally:
        serve.shutdown(sync=ok)  # every rank waits for the others before tearing the group down


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--rate", type=float, default=400.0, help="arrivals per second")
    p.add_argument("--window", type=float, default=0.1, help="batching window (s)")
    p.add_argument("--policy", choices=["moeless", "ep"], default="moeless")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from moeless import demo, serve, tiny_moe

    requests = demo.mixed_requests(tiny_moe.encode, args.requests, rate_per_s=args.rate, max_prompt=64, max_new=5,
                                   seed=args.seed)
    out = Path(tempfile.mkdtemp(prefix="serve_load_")) / "report.json"
    ctx = mp.get_context("spawn")
    port = serve.free_port()
    procs = [ctx.Process(target=_rank, args=(r, args.world, port, vars(args), requests, str(out)))
             for r in range(args.world)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    if any(proc.exitcode for proc in procs) or not out.exists():
        print(f"a rank failed: exit codes {[proc.exitcode for proc in procs]}", file=sys.stderr)
        return 1
    r = json.loads(out.read_text())
    out.unlink()
    out.parent.rmdir()
    lat, ttft = r["latency_s"], r["first_token_s"]
    print(f"world {args.world}, policy {args.policy}: {r['requests']} requests offered at {args.rate:g}/s over "
          f"{requests[-1].arrival_s:.2f} s, window {args.window:g} s, {r['batches']} batches")
    print(f"served {r['served']}, refused {r['refused']}, failed {r['failed']} in {r['seconds']:.2f} s: "
          f"{r['tokens_per_s']:.1f} tokens/s, {r['requests_per_s']:.1f} requests/s")
    print(f"latency (arrival -> last token) s: mean {lat['mean']:.3f}, p50 {lat['p50']:.3f}, p90 {lat['p90']:.3f}, "
          f"p99 {lat['p99']:.3f}; time to first token s: p50 {ttft['p50']:.3f}, p99 {ttft['p99']:.3f}; "
          f"mean MoE layer {r['moe_layer_ms']:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
