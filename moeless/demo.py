"""The serving demo (`make demo`, `moeless demo`): the tiny model served expert-parallel, moeless against plain EP.

G processes (the GPUs present, else 4 CPU processes on gloo) serve the embedded tiny MoE model on a slice of the
bundled Azure LLM conversation trace: arrival times and prompt / output lengths from the trace, prompt text from
the tiny model's own corpus, the paper's 1 s batching, prefill then greedy decode. The same requests are served
with plain expert parallelism and with moeless in one run; the demo prints a short table (MoE-layer latency,
replicas, cold starts, memory x time), some generated text, and writes a report (JSON, Markdown, plots).

`run_comparison` is the per-rank body shared with examples/serve_ep.py (torchrun). This module never downloads
anything and never changes routing; it only drives `moeless.serve`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["add_arguments", "build_requests", "main", "run_comparison", "format_table"]


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", default=None, help="a local Hugging Face MoE model folder (default: the tiny model)")
    parser.add_argument("--world", type=int, default=None, help="processes (default: GPUs present, else 4)")
    parser.add_argument("--trace", default="azure-conv", help="bundled trace name or a .csv/.jsonl file")
    parser.add_argument("--requests", type=int, default=10, help="requests replayed from the trace slice")
    parser.add_argument("--max-prompt-tokens", type=int, default=64, help="cap on a prompt's length")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="cap on a request's output length")
    parser.add_argument("--batch-window", type=float, default=1.0, help="seconds per batch (the paper's 1 s)")
    parser.add_argument("--time-scale", type=float, default=4.0,
                        help="arrivals this many times faster than the trace (more requests per batch)")
    parser.add_argument("--keep-alive", type=float, default=5.0, help="seconds an idle instance is kept")
    parser.add_argument("--extra-slots", type=int, default=1, help="slots per GPU beyond E/G for replicas")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before a stuck collective fails")
    parser.add_argument("--out", default="reports/demo", help="report folder")
    parser.add_argument("--json", action="store_true", help="print one JSON summary instead of the table")
    return parser


# ---------------------------------------------------------------------------------------------------------------
# requests


def build_requests(encode, trace_name: str, n: int, max_prompt: int, max_new: int, time_scale: float = 1.0):
    """`n` requests from the busiest 10 minutes of the trace: arrivals (scaled by 1 / time_scale), prompt and
    output lengths capped at max_prompt / max_new; prompt text cut from the tiny model's corpus."""
    from moeless.serve import Request
    from moeless.sim.workload import busiest_window, load_trace

    for name, v in (("requests", n), ("max_prompt_tokens", max_prompt), ("max_new_tokens", max_new)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if not time_scale > 0:
        raise ValueError(f"time_scale must be > 0, got {time_scale!r}")
    _, window = busiest_window(load_trace(trace_name), 600.0)
    k = min(n, len(window))
    import pydoc_data.topics as topics

    keys = sorted(topics.topics)
    reqs = []
    for i in range(k):
        text = topics.topics[keys[(i * 7) % len(keys)]]
        ids = encode(text)[: max(2, min(max_prompt, int(window.input_tokens[i])))]
        out = max(1, min(max_new, int(window.output_tokens[i])))
        reqs.append(Request(ids, out, float(window.arrival_s[i] - window.arrival_s[0]) / time_scale, id=i))
    return reqs


# ---------------------------------------------------------------------------------------------------------------
# per rank


def run_comparison(ctx, model, requests, *, keep_alive_s: float = 5.0, extra_slots: int = 1,
                   batch_window_s: float = 1.0, policies=("ep", "moeless")) -> dict:
    """Serve `requests` once per policy on this rank's process group; returns {policy: {summary, results,
    seconds, tokens_per_s}} (the same on every rank)."""
    from moeless import serve
    from moeless.engine import default_slots_per_gpu

    out = {}
    for policy in policies:
        E = int(serve.find_moe_blocks(model)[0][1].experts.gate_up_proj.shape[0])
        slots = default_slots_per_gpu(E, ctx.world_size, 0 if policy == "ep" else extra_slots)
        srv = serve.ExpertParallelServer(model, ctx, policy=policy, slots_per_gpu=slots, keep_alive_s=keep_alive_s)
        t = time.perf_counter()
        results = srv.serve(requests, batch_window_s=batch_window_s)
        seconds = time.perf_counter() - t
        summary = srv.close()
        generated = sum(len(r.tokens) for r in results)
        out[policy] = {"summary": summary, "seconds": seconds, "tokens_per_s": generated / max(seconds, 1e-9),
                       "results": [{"id": r.id, "tokens": r.tokens, "error": r.error, "batch": r.batch}
                                   for r in results]}
    return out


def _worker(rank, world, port, args_dict, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(1)
    from moeless import serve, tiny_moe

    ctx = serve.init_distributed(rank=rank, world_size=world, timeout_s=args_dict["timeout"])
    try:
        model = serve.load_model(args_dict["model"])
        reqs = build_requests(tiny_moe.encode, args_dict["trace"], args_dict["requests"],
                              args_dict["max_prompt_tokens"], args_dict["max_new_tokens"], args_dict["time_scale"])
        res = run_comparison(ctx, model, reqs, keep_alive_s=args_dict["keep_alive"],
                             extra_slots=args_dict["extra_slots"], batch_window_s=args_dict["batch_window"])
        if rank == 0:
            res["prompts"] = [r.prompt for r in reqs]
            Path(out_path).write_text(json.dumps(res))
    finally:
        serve.shutdown()


# ---------------------------------------------------------------------------------------------------------------
# report


def format_table(res: dict) -> str:
    rows = [("policy", "tok/s", "MoE mean ms", "p50", "p99", "replicas", "cold starts", "GB-s")]
    for policy in ("ep", "moeless"):
        if policy not in res:
            continue
        s, r = res[policy]["summary"], res[policy]
        m = s["moe_layer_ms"]
        rows.append((policy, f"{r['tokens_per_s']:.1f}", f"{m['mean']:.2f}", f"{m['p50']:.2f}", f"{m['p99']:.2f}",
                     f"{s['replicas_mean']:.1f}", str(s["cold_starts"]), f"{s['gb_seconds']:.4f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    if "ep" in res and "moeless" in res:
        a, b = res["ep"]["summary"]["moe_layer_ms"]["mean"], res["moeless"]["summary"]["moe_layer_ms"]["mean"]
        lines.append(f"moeless mean MoE-layer time vs plain EP: {100 * (b - a) / a:+.1f}%")
        same = all(x["tokens"] == y["tokens"] for x, y in zip(res["ep"]["results"], res["moeless"]["results"]))
        lines.append(f"generated tokens identical to plain EP: {same}")
    return "\n".join(lines)


def write_report(res: dict, out: Path, decode) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "summary.json"]
    files[0].write_text(json.dumps({p: {k: v for k, v in res[p].items() if k != "results"}
                                    for p in ("ep", "moeless") if p in res}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
        for policy in ("ep", "moeless"):
            t = np.sort(np.asarray(res[policy]["summary"]["layer_times_s"]).reshape(-1) * 1e3)
            ax[0].plot(t, np.arange(1, t.size + 1) / t.size, label=policy)
            lt = np.asarray(res[policy]["summary"]["layer_times_s"]) * 1e3
            ax[1].plot(lt.mean(0), marker="o", label=policy)
        ax[0].set(xlabel="MoE-layer time (ms)", ylabel="CDF", title="MoE-layer latency")
        ax[1].set(xlabel="MoE layer", ylabel="mean time (ms)", title="per layer")
        for a in ax:
            a.legend()
        fig.tight_layout()
        fig.savefig(out / "latency.png", dpi=100)
        plt.close(fig)
        files.append(out / "latency.png")
    except ImportError:  # plots are optional (the "plots" extra)
        pass
    lines = ["# moeless serving demo", "", "```", format_table(res), "```", "", "## Generated text (moeless)", ""]
    for r in res["moeless"]["results"][:3]:
        if r["error"] is None:
            lines += [f"- request {r['id']}: `{decode(res['prompts'][r['id']])[-40:]!r}` -> "
                      f"`{decode(r['tokens'])!r}`"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    files.append(out / "report.md")
    return files


def main(argv=None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="moeless demo", description=__doc__.splitlines()[0]))
    return run_from_args(parser.parse_args(argv))


def run_from_args(args: argparse.Namespace) -> int:
    """Run the demo from parsed `add_arguments` options (what `moeless demo` calls)."""
    import torch
    import torch.multiprocessing as mp

    from moeless import tiny_moe
    from moeless.serve import _free_port

    world = args.world or (torch.cuda.device_count() or 4)
    if world < 1:
        raise ValueError(f"--world must be >= 1, got {world}")
    if args.model is not None and not Path(args.model).exists():
        raise ValueError(f"--model: no such path {args.model!r}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result_path = out / "raw.json"
    t0 = time.perf_counter()
    if not args.json:
        print(f"serving the tiny MoE model on {world} processes ({'NCCL' if torch.cuda.is_available() else 'gloo, CPU'})"
              f": {args.requests} requests from {args.trace}, plain EP then moeless ...", flush=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(_worker, args=(world, _free_port(), vars(args), str(result_path)), nprocs=world,
                       start_method="spawn")
    res = json.loads(result_path.read_text())
    files = write_report(res, out, tiny_moe.decode)
    if args.json:
        print(json.dumps({p: {k: v for k, v in res[p]["summary"].items() if k != "layer_times_s"}
                          | {"tokens_per_s": res[p]["tokens_per_s"]} for p in ("ep", "moeless")}))
        return 0
    print(format_table(res))
    for r in res["moeless"]["results"][:2]:
        if r["error"] is None:
            print(f"  {tiny_moe.decode(res['prompts'][r['id']])[-30:]!r} -> {tiny_moe.decode(r['tokens'])!r}")
    print(f"report: {', '.join(str(f) for f in files)}  ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
