"""The serving demo (`make demo`, `moeless demo`): the tiny model served expert-parallel, moeless against plain EP.

G processes (the GPUs present, else one gloo process per CPU core, 2 to 4) serve the embedded tiny MoE model on
a slice of the bundled Azure LLM conversation trace: arrival times and prompt / output lengths from the trace
(arrivals sped up by --time-scale so that a 1 s batch holds tens of requests: the tiny model's experts are so
small that only batches of thousands of tokens make expert compute, and so its imbalance, visible next to the
loop's fixed costs), prompt text from the tiny model's own corpus, the paper's 1 s batching, prefill then greedy
decode. The same requests, hence the same routing, are served by both policies through the same loop, timing
the same span of every MoE layer. The demo prints a short table (MoE-layer time, pairs on the busiest rank,
replicas, cold starts, memory x time), some generated text, and writes a report (JSON, Markdown, plots).

moeless predicts layer l+1's load with the gate-replica predictor fitted to the tiny model
(moeless/data/tiny_moe/predictor.npz; `python -m moeless.demo --fit-predictor` refits it and prints its held-out
recall against the raw copied gates).

`run_comparison` is the per-rank body shared with examples/serve_ep.py (torchrun). This module never downloads
anything and never changes routing; it only drives `moeless.serve`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from moeless.specs import EXPERT_COUNT_KEYS

__all__ = ["DemoError", "add_arguments", "build_requests", "check_args", "default_world", "fit_predictor",
           "format_table", "main", "mixed_requests", "predictor_for", "refused", "run_comparison", "run_from_args"]

PREDICTOR_FILE = "predictor.npz"  # next to the tiny model's weights
# bounds on the options (far above any demo run; they keep a typo from spawning thousands of processes)
MAX_WORLD = 1024
MAX_REQUESTS = 100_000
MAX_TOKENS = 10**6
MAX_EXTRA_SLOTS = 4096
MAX_REPEATS = 100
FAILURE_GRACE_S = 10.0  # after a rank fails, how long the others get to report before they are stopped


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", default=None, help="a local Hugging Face MoE model folder (default: the tiny model)")
    parser.add_argument("--world", type=int, default=None,
                        help=f"processes [1..{MAX_WORLD}, at most the GPUs present; it must divide the model's experts] (default: the "
                             "GPUs present, else one per CPU core, 2 to 4)")
    parser.add_argument("--trace", default="azure-conv", help="bundled trace name or a .csv/.jsonl file")
    parser.add_argument("--requests", type=int, default=96, help=f"requests replayed from the trace slice [1..{MAX_REQUESTS}]")
    parser.add_argument("--max-prompt-tokens", type=int, default=256, help=f"cap on a prompt's length [1..{MAX_TOKENS}]")
    parser.add_argument("--max-new-tokens", type=int, default=8, help=f"cap on a request's output length [1..{MAX_TOKENS}]")
    parser.add_argument("--batch-window", type=float, default=1.0, help="seconds per batch (the paper's 1 s) [> 0]")
    parser.add_argument("--time-scale", type=float, default=4.0,
                        help="arrivals this many times faster than the trace (more requests per batch) [> 0]")
    parser.add_argument("--keep-alive", type=float, default=5.0, help="seconds an idle instance is kept [>= 0]")
    parser.add_argument("--extra-slots", type=int, default=1, help=f"slots per GPU beyond E/G for replicas [0..{MAX_EXTRA_SLOTS}]")
    parser.add_argument("--predictor", default=None,
                        help="a saved GateReplicaPredictor (.npz), or 'gate-replica' for the model's raw gates "
                             "(default: the fitted one shipped with the tiny model)")
    parser.add_argument("--repeats", type=int, default=2,
                        help=f"runs per policy, alternating EP, moeless, moeless, EP, ... (load drift hits both) "
                             f"[1..{MAX_REPEATS}]")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before a stuck collective fails [> 0]")
    parser.add_argument("--out", default="reports/demo", help="report folder")
    parser.add_argument("--json", action="store_true", help="print one JSON summary instead of the table")
    parser.add_argument("--fit-predictor", action="store_true",
                        help="fit the tiny model's gate-replica predictor on its corpus, print its held-out "
                             "recall, save it next to the model and exit")
    return parser


def default_world() -> int:
    """The GPUs present, else one process per CPU core (2 to 4): a rank per core stands for a rank per GPU."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return int(min(4, max(2, cores)))


# ---------------------------------------------------------------------------------------------------------------
# the predictor


def fit_predictor(model, *, seq_len: int = 128, train_sequences: int = 256, test_sequences: int = 64,
                  chunk_tokens: int = 1024, seed: int = 0):
    """Fit the tiny model's gate-replica predictor (distance 1) on its corpus, with layer-aware fine-tuning.

    Sequences of `seq_len` tokens (BOS, then bytes) come from the first 95% of the corpus for fitting and from
    the last 5% (text the model was not trained on) for the held-out metrics. Returns (predictor, metrics): per
    source layer l, the top-k recall of layer l+1's routing and the Pearson correlation of per-expert loads over
    chunks of `chunk_tokens` tokens, for the raw copied gate and for the fitted replica."""
    import torch

    from moeless import tiny_moe
    from moeless.predictors import GateReplicaPredictor, pearson, topk_recall
    from moeless.traces import capture_routing

    data = tiny_moe.corpus()
    cut = len(tiny_moe.split(data)[0])
    rng = np.random.default_rng(seed)

    def sequences(lo, hi, n):  # BOS + seq_len - 1 bytes: a sequence as the model was trained on and is served
        w = seq_len - 1
        starts = np.sort(rng.choice((hi - lo) // w, size=n, replace=False)) * w + lo
        return list(tiny_moe.with_bos(torch.stack([data[s:s + w] for s in starts.tolist()])).split(32))

    train = capture_routing(model, sequences(0, cut, train_sequences))
    test = capture_routing(model, sequences(cut, len(data), test_sequences))
    raw = GateReplicaPredictor.from_model(model, distance=1)
    fitted = GateReplicaPredictor.from_model(model, distance=1, threshold=0.95, epochs=30, lr=3e-3, seed=seed)
    fitted.fit(train)
    E = test.num_experts
    rows = []
    for l in range(test.num_layers - 1):
        row = {"layer": l, "target": l + 1, "fine_tuned": bool(fitted.fine_tuned[l])}
        for name, pred in (("raw", raw), ("fitted", fitted)):
            row[f"{name}_recall"] = topk_recall(pred.replica_topk(l, test.gate_inputs[l]), test.topk_ids[l + 1])
            rs = []
            for s in range(0, test.num_tokens - chunk_tokens + 1, chunk_tokens):
                sl = slice(s, s + chunk_tokens)
                got = pred.predict(l, test.topk_ids[l][sl], test.gate_inputs[l][sl])
                rs.append(pearson(got, np.bincount(test.topk_ids[l + 1][sl].ravel(), minlength=E)))
            row[f"{name}_pearson"] = float(np.nanmean(rs))
        rows.append(row)
    return fitted, {"train_tokens": int(train.num_tokens), "test_tokens": int(test.num_tokens), "layers": rows}


def predictor_for(model_path, choice=None):
    """The server's `predictor`: the GateReplicaPredictor saved at `choice`, "gate-replica" (the model's gates
    copied as they are), or by default the fitted one shipped with the tiny model (raw gates for other models)."""
    from moeless import tiny_moe
    from moeless.predictors import GateReplicaPredictor, load_predictor

    if choice == "gate-replica":
        return choice
    if choice is None:
        path = tiny_moe.MODEL_DIR / PREDICTOR_FILE
        if model_path is not None or not path.is_file():
            return "gate-replica"
    else:
        path = Path(choice)
        if not path.is_file():
            raise ValueError(f"--predictor: no such file {str(choice)!r}")
    pred = load_predictor(str(path))
    if not isinstance(pred, GateReplicaPredictor):
        raise ValueError(f"--predictor: {str(path)!r} holds a {type(pred).__name__}, not a GateReplicaPredictor")
    return pred


def _fit_and_save(out_dir: Path) -> int:
    import torch

    from moeless import tiny_moe

    torch.set_num_threads(1)
    t = time.perf_counter()
    pred, metrics = fit_predictor(tiny_moe.load())
    out_dir.mkdir(parents=True, exist_ok=True)
    path = pred.save(str(out_dir / PREDICTOR_FILE))
    print(f"fitted on {metrics['train_tokens']} tokens in {time.perf_counter() - t:.0f} s; held-out "
          f"{metrics['test_tokens']} tokens (the corpus' last 5%):")
    print("layer -> target  fine-tuned  recall raw -> fitted  pearson raw -> fitted")
    for r in metrics["layers"]:
        print(f"{r['layer']:5d} -> {r['target']:6d}  {str(r['fine_tuned']):>10}  {r['raw_recall']:10.3f} -> "
              f"{r['fitted_recall']:.3f}  {r['raw_pearson']:11.3f} -> {r['fitted_pearson']:.3f}")
    print(f"saved {path}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# requests


def build_requests(encode, trace_name: str, n: int, max_prompt: int, max_new: int, time_scale: float = 1.0):
    """`n` requests from the busiest 10 minutes of the trace: arrivals (scaled by 1 / time_scale), prompt and
    output lengths capped at max_prompt / max_new; prompt text cut from the tiny model's corpus."""
    from moeless.serve import Request
    from moeless.sim.workload import busiest_window, load_trace

    for name, v in (("requests", n), ("max_prompt_tokens", max_prompt), ("max_new_tokens", max_new)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
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




def mixed_requests(encode, n: int, *, rate_per_s: float, max_prompt: int, max_new: int, seed: int = 0):
    """`n` requests of mixed lengths arriving as a Poisson process of `rate_per_s` per second (the load run):
    prompt lengths log-uniform in [2, max_prompt], new tokens uniform in [1, max_new], prompt text cut from the
    tiny model's corpus at random places."""
    from moeless.serve import Request

    for name, v in (("n", n), ("max_prompt", max_prompt), ("max_new", max_new)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if not (isinstance(rate_per_s, (int, float)) and np.isfinite(rate_per_s) and rate_per_s > 0):
        raise ValueError(f"rate_per_s must be a finite number > 0, got {rate_per_s!r}")
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate_per_s, n))
    lengths = np.exp(rng.uniform(np.log(2), np.log(max(2, max_prompt) + 1), n)).astype(np.int64).clip(1, max_prompt)
    new = rng.integers(1, max_new + 1, n)
    starts = rng.integers(0, len(text) - 4 * max_prompt, n)
    return [Request(encode(text[s:s + 4 * int(k)])[:int(k)], int(m), float(a), id=i)
            for i, (a, k, m, s) in enumerate(zip(arrivals, lengths, new, starts))]


# ---------------------------------------------------------------------------------------------------------------
# per rank


def run_comparison(ctx, model, requests, *, keep_alive_s: float = 5.0, extra_slots: int = 1,
                   batch_window_s: float = 1.0, policies=("ep", "moeless"), predictor="gate-replica",
                   repeats: int = 1) -> dict:
    """Serve `requests` with each policy through the same loop on this rank's process group; returns {policy:
    {summary, results, seconds, cpu_seconds, tokens_per_s, runs}} (the same on every rank; cpu_seconds: this
    rank's). A warm-up of each policy (outside every measurement) first pays the one-time costs of the first calls
    (torch's, and numba compiling the policy's loops on a fresh install). With repeats > 1 the policies alternate
    A B B A ... (a drift of the machine's load hits both alike) and each policy's summary pools its runs:
    per-iteration series concatenated, scalars averaged per run."""
    from moeless import serve
    from moeless.engine import default_slots_per_gpu

    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
    E = int(serve.find_moe_blocks(model)[0][1].experts.gate_up_proj.shape[0])

    def server(policy):
        slots = default_slots_per_gpu(E, ctx.world_size, 0 if policy == "ep" else extra_slots)
        opts = dict(predictor=predictor) if policy == "moeless" else {}
        return serve.ExpertParallelServer(model, ctx, policy=policy, slots_per_gpu=slots, keep_alive_s=keep_alive_s,
                                          **opts)

    for policy in policies:  # first calls, not measured: torch's, and the policy's loops compiled by numba (_jit)
        warm = server(policy)
        warm.generate([list(r.prompt[:16]) for r in requests[:2 * ctx.world_size]], 2)
        warm.close()
    order = [p for i in range(repeats) for p in (policies if i % 2 == 0 else tuple(reversed(policies)))]
    runs: dict[str, list] = {p: [] for p in policies}
    for policy in order:
        srv = server(policy)
        t, c = time.perf_counter(), time.process_time()
        results = srv.serve(requests, batch_window_s=batch_window_s)
        seconds, cpu = time.perf_counter() - t, time.process_time() - c
        summary = srv.close()
        generated = sum(len(r.tokens) for r in results)
        runs[policy].append({"summary": summary, "seconds": seconds, "cpu_seconds": cpu,
                             "tokens_per_s": generated / max(seconds, 1e-9),
                             "results": [{"id": r.id, "tokens": r.tokens, "error": r.error, "batch": r.batch}
                                         for r in results]})
    return {p: _pool_runs(r) for p, r in runs.items()}


_SERIES = ("layer_times_s", "expert_times_s", "layer_cpu_s", "gpu_pairs", "iteration_tokens", "replicas")


def _pool_runs(runs: list) -> dict:
    """One policy's runs as one: per-iteration series concatenated, numbers averaged over the runs."""
    if len(runs) == 1:
        return dict(runs[0], runs=1)

    def mean(values):
        if all(isinstance(v, dict) for v in values):
            return {k: mean([v[k] for v in values]) for k in values[0]}
        if all(isinstance(v, list) for v in values):
            return [mean(list(x)) for x in zip(*values)]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return float(np.mean(values))
        return values[0]

    out = {k: mean([r[k] for r in runs]) for k in ("seconds", "cpu_seconds", "tokens_per_s")}
    out["results"], out["runs"] = runs[0]["results"], len(runs)
    out["same_tokens_every_run"] = all(r["results"] == runs[0]["results"] for r in runs)
    summaries = [r["summary"] for r in runs]
    s = {k: mean([x[k] for x in summaries]) for k in summaries[0] if k not in _SERIES + ("prefill_iterations",)}
    for k in _SERIES:
        s[k] = [row for x in summaries for row in x[k]]
    offsets = np.cumsum([0] + [len(x["layer_times_s"]) for x in summaries[:-1]])
    s["prefill_iterations"] = [int(i + o) for x, o in zip(summaries, offsets) for i in x["prefill_iterations"]]
    from moeless.serve import pair_balance, percentiles

    s["moe_layer_ms"] = percentiles(s["layer_times_s"], 1e3)
    s["pair_balance"] = pair_balance(s["gpu_pairs"])
    out["summary"] = s
    return out


def _worker(rank, world, port, opts, requests, out_dir):
    """One rank of the demo: serve `requests` with both policies; rank 0 writes raw.json into the run folder
    `out_dir`. Any failure is written as one line to failure-rank<r>.json there (the parent reports the first),
    never as a traceback."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    _exit_with_parent()
    import torch

    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    from moeless import serve

    hf_logging.disable_progress_bar()  # one loading bar per rank would only clutter the demo's output
    code = 0
    try:
        ctx = serve.init_distributed(rank=rank, world_size=world, timeout_s=opts["timeout"])
        model = serve.load_model(opts["model"])
        res = run_comparison(ctx, model, requests, keep_alive_s=opts["keep_alive"], extra_slots=opts["extra_slots"],
                             batch_window_s=opts["batch_window"], predictor=predictor_for(opts["model"], opts["predictor"]),
                             repeats=opts["repeats"])
        if rank == 0:
            res["prompts"] = [r.prompt for r in requests]
            tmp = Path(out_dir) / "raw.json.tmp"
            tmp.write_text(json.dumps(res))
            tmp.replace(Path(out_dir) / "raw.json")
    except BaseException as err:  # noqa: BLE001 -- every failure, reported as one line
        code = 2 if isinstance(err, ValueError) else 1
        (Path(out_dir) / f"failure-rank{rank}.json").write_text(json.dumps(
            {"rank": rank, "time": time.time(), "code": code, "error": _one_line(err)}))
    serve.shutdown(sync=code == 0)  # leaves a group that a failed collective broke to the process's exit
    sys.exit(code)


def _exit_with_parent() -> None:
    """A rank whose demo process is gone (killed) stops too, instead of serving on for nobody."""
    import threading

    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _one_line(err: BaseException) -> str:
    """An exception as one line: its message's first line; where it was raised for anything but a clear error."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    text = lines[0] if lines else type(err).__name__
    from moeless.serve import ServeError

    if isinstance(err, (ValueError, ServeError)):
        return text
    import traceback

    frame = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
    where = f" (at {Path(frame.filename).name}:{frame.lineno})" if frame else ""
    return f"{type(err).__name__}: {text}{where}"


class DemoError(Exception):
    """A demo rank failed: one line naming the rank and the cause; exit_code 2 for bad input, 1 otherwise."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def _run_ranks(world: int, opts: dict, requests: list, out: Path) -> dict:
    """Spawn the ranks, wait for them, return rank 0's raw result. After a rank fails the others get
    FAILURE_GRACE_S to report, then are stopped; DemoError with the first failure (the cause: later ones are
    the peers that lost it)."""
    # the ranks write into a private folder inside `out` (removed afterwards): a failed run leaves `out` as it was
    run = Path(tempfile.mkdtemp(prefix=".run-", dir=out))
    try:
        return _spawn_and_collect(world, opts, requests, run)
    finally:
        shutil.rmtree(run, ignore_errors=True)


def _spawn_and_collect(world: int, opts: dict, requests: list, run: Path) -> dict:
    import multiprocessing as mp

    from moeless.serve import free_port

    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, opts, requests, str(run))) for r in range(world)]
    failed_at, stopped = None, set()
    try:
        for p in procs:
            p.start()
        while any(p.is_alive() for p in procs):
            if failed_at is None and any(p.exitcode not in (None, 0) for p in procs):
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > min(FAILURE_GRACE_S, opts["timeout"]):
                break
            time.sleep(0.1)
    finally:
        for r, p in enumerate(procs):
            if p.is_alive():
                p.kill()
                stopped.add(r)
            p.join()
    reports = sorted((json.loads(f.read_text()) for f in run.glob("failure-rank*.json")), key=lambda r: r["time"])
    silent = [(r, p.exitcode) for r, p in enumerate(procs)
              if p.exitcode != 0 and r not in stopped and r not in {x["rank"] for x in reports}]
    # a rank that died without a report (killed, out of memory) is the cause; the others report losing it
    causes = [f"rank {r} exited with {'signal ' + str(-c) if c < 0 else 'code ' + str(c)} without a report"
              for r, c in silent]
    if reports:
        first = reports[0]
        text = first["error"] if first["error"].startswith("rank ") else f"rank {first['rank']}: {first['error']}"
        more = len(reports) - 1
        causes.append(text + (f" ({more} other rank(s) failed after it)" if more else ""))
    if causes:
        raise DemoError("; then ".join(causes), reports[0]["code"] if reports and not silent else 1)
    if not (run / "raw.json").is_file():
        raise DemoError("rank 0 ended without writing its result")
    return json.loads((run / "raw.json").read_text())


# ---------------------------------------------------------------------------------------------------------------
# report


def _phase_means(summary) -> tuple[float, float]:
    """Mean MoE-layer ms of prefill iterations and of decode iterations (prefill: the first of each batch)."""
    t = np.asarray(summary["layer_times_s"]) * 1e3
    first = np.asarray(summary.get("prefill_iterations", [0]), dtype=np.int64)
    is_prefill = np.zeros(t.shape[0], dtype=bool)
    is_prefill[first[first < t.shape[0]]] = True
    pre = t[is_prefill].mean() if is_prefill.any() else float("nan")
    dec = t[~is_prefill].mean() if (~is_prefill).any() else float("nan")
    return float(pre), float(dec)


def refused(res: dict) -> list[dict]:
    """The requests no policy served, per kind of reason: [{"kind", "count", "example"}] (the same requests are
    refused under every policy: the checks depend on the request and the model only)."""
    from moeless.serve import error_kinds

    results = res["moeless"]["results"]
    return [{"kind": k, "count": n, "example": f"request {next(r['id'] for r in results if r['error'] == first)}: "
                                               f"{first}"}
            for k, n, first in error_kinds(r["error"] for r in results)]


def format_table(res: dict) -> str:
    rows = [("policy", "MoE ms mean", "prefill", "decode", "p99", "CPU ms", "busiest/mean pairs", "replicas",
             "cold starts", "GB-s", "tok/s")]
    for policy in ("ep", "moeless"):
        if policy not in res:
            continue
        s, r = res[policy]["summary"], res[policy]
        m = s["moe_layer_ms"]
        pre, dec = _phase_means(s)
        rows.append((policy, f"{m['mean']:.2f}", f"{pre:.2f}", f"{dec:.2f}", f"{m['p99']:.2f}",
                     f"{s['moe_layer_cpu_ms']:.2f}", f"{s['pair_balance']:.3f}", f"{s['replicas_mean']:.1f}",
                     f"{s['cold_starts']:g}",
                     f"{s['gb_seconds']:.4f}", f"{r['tokens_per_s']:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    if "ep" in res and "moeless" in res:
        a, b = res["ep"]["summary"], res["moeless"]["summary"]
        ma, mb = a["moe_layer_ms"]["mean"], b["moe_layer_ms"]["mean"]
        ca, cb = a["moe_layer_cpu_ms"], b["moe_layer_cpu_ms"]
        lines.append(f"moeless vs plain EP: mean MoE-layer time {mb - ma:+.2f} ms ({100 * (mb - ma) / ma:+.1f}%), "
                     f"its CPU critical path {cb - ca:+.2f} ms ({100 * (cb - ca) / ca:+.1f}%), busiest rank's pairs "
                     f"{100 * (b['pair_balance'] - a['pair_balance']) / a['pair_balance']:+.1f}%")
        lines.append("(MoE-layer time: wall clock of the layer, the slowest rank's, without the counts all-gather "
                     "both policies share; CPU ms: the busiest rank's CPU time in it, what the layer would take on "
                     "unshared cores)")
        same = all(x["tokens"] == y["tokens"] for x, y in zip(res["ep"]["results"], res["moeless"]["results"]))
        lines.append(f"generated tokens identical to plain EP: {same}")
    if "moeless" in res:
        n = len(res["moeless"]["results"])
        bad = refused(res)
        lost = sum(b["count"] for b in bad)
        line = f"requests: {n - lost} of {n} served"
        if bad:
            line += f"; {lost} refused before serving: " + ", ".join(
                f"{b['kind']} {b['count']} (e.g. {b['example']})" for b in bad)
        lines.append(line)
    return "\n".join(lines)


def _plots(res: dict, out: Path, staged) -> list[Path]:
    """The demo's plots, written to `staged.path(...)` (a moeless.outputs.OutputFiles); returns their paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional (the "plots" extra)
        return []
    files = []
    L = len(res["ep"]["summary"]["layer_times_s"][0])
    fig, ax = plt.subplots(1, 3, figsize=(14, 3.8))
    width = 0.38
    for i, policy in enumerate(("ep", "moeless")):
        s = res[policy]["summary"]
        t = np.asarray(s["layer_times_s"]) * 1e3
        first = np.asarray(s.get("prefill_iterations", [0]), dtype=np.int64)
        pre = np.zeros(t.shape[0], dtype=bool)
        pre[first[first < t.shape[0]]] = True
        ax[0].bar(np.arange(L) + (i - 0.5) * width, t[pre].mean(0), width, label=policy)
        ax[1].bar(np.arange(L) + (i - 0.5) * width, t[~pre].mean(0) if (~pre).any() else np.zeros(L), width,
                  label=policy)
        pairs = np.asarray(s["gpu_pairs"], dtype=np.float64)  # [iterations, L, G]
        bal = pairs.max(2).sum(0) / np.maximum(pairs.mean(2).sum(0), 1e-9)
        ax[2].bar(np.arange(L) + (i - 0.5) * width, bal, width, label=policy)
    ax[0].set(xlabel="MoE layer", ylabel="mean time (ms)", title="prefill iterations: MoE-layer time")
    ax[1].set(xlabel="MoE layer", ylabel="mean time (ms)", title="decode iterations: MoE-layer time")
    ax[2].set(xlabel="MoE layer", ylabel="busiest rank / mean (pairs)", title="load on the busiest rank")
    ax[2].axhline(1.0, color="gray", lw=0.8)
    for a in ax:
        a.set_xticks(range(L))
        a.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(staged.path(out / "latency.png"), dpi=100)
    plt.close(fig)
    files.append(out / "latency.png")

    s = res["moeless"]["summary"]
    reps = np.asarray(s["replicas"], dtype=np.float64)  # [iterations, L]
    if reps.size:
        E = int(res["ep"]["summary"]["replicas_mean"])
        fig, ax = plt.subplots(figsize=(7, 3.6))
        for l in range(reps.shape[1]):
            ax.plot(np.arange(reps.shape[0]), reps[:, l], marker="o", ms=3, label=f"layer {l}")
        ax.axhline(E, color="gray", lw=0.8, ls="--", label="plain EP")
        for f in s.get("prefill_iterations", []):
            ax.axvline(f, color="k", lw=0.5, ls=":")
        ax.set(xlabel="iteration (dotted: a batch's prefill)", ylabel="expert instances in the layer",
               title="moeless: replicas over time")
        ax.legend(fontsize=8, ncol=3)
        fig.tight_layout()
        fig.savefig(staged.path(out / "replicas.png"), dpi=100)
        plt.close(fig)
        files.append(out / "replicas.png")
    return files


def write_report(res: dict, out: Path, decode, extra: str = "") -> list[Path]:
    """raw.json (every rank-0 result), summary.json, the plots and report.md in `out`, all renamed into place
    together (an error on the way leaves the earlier report as it was); returns their paths."""
    from moeless.outputs import OutputFiles

    out.mkdir(parents=True, exist_ok=True)
    with OutputFiles() as staged:
        staged.write_text(out / "raw.json", json.dumps(res))
        staged.write_text(out / "summary.json", json.dumps({p: {k: v for k, v in res[p].items() if k != "results"}
                                                            for p in ("ep", "moeless") if p in res}, indent=1))
        files = [out / "raw.json", out / "summary.json"] + _plots(res, out, staged)
        lines = ["# moeless serving demo", "", "```", format_table(res), "```", "", extra, "",
                 "![latency](latency.png)", "", "![replicas](replicas.png)", "", "## Generated text (moeless)", ""]
        for r in res["moeless"]["results"][:4]:
            if r["error"] is None:
                lines += [f"- request {r['id']}: `{decode(res['prompts'][r['id']])[-40:]!r}` -> "
                          f"`{decode(r['tokens'])!r}`"]
        staged.write_text(out / "report.md", "\n".join(lines) + "\n")
        files.append(out / "report.md")
    return files


def main(argv=None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="moeless demo", description=__doc__.splitlines()[0]))
    try:
        return run_from_args(parser.parse_args(argv))
    except ValueError as err:
        print(f"moeless demo: error: {err}", file=sys.stderr)
        return 2


def _int_option(args, name: str, lo: int, hi: int) -> int:
    v = getattr(args, name)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"--{name.replace('_', '-')} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _float_option(args, name: str, lo: float, open_lo: bool) -> float:
    v = getattr(args, name)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v > lo if open_lo else v >= lo)
    if not ok:
        raise ValueError(f"--{name.replace('_', '-')} must be a finite number {'>' if open_lo else '>='} {lo:g}, "
                         f"got {v!r}")
    return float(v)


def _model_config(model_path):
    """The transformers config of the served model (the tiny model's for None); ValueError naming --model."""
    from moeless import tiny_moe
    from moeless.serve import check_model_path

    if model_path is None:
        if (tiny_moe.MODEL_DIR / "config.json").exists():
            return check_model_path(tiny_moe.MODEL_DIR)
        return tiny_moe.build_config()
    try:
        return check_model_path(model_path)
    except ValueError as err:
        raise ValueError(f"--{err}") from None


def _num_experts(config) -> int | None:
    for name in EXPERT_COUNT_KEYS:
        v = getattr(config, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def check_args(args: argparse.Namespace):
    """Every `moeless demo` option checked before any process starts (ValueError naming the flag); returns
    (world, requests): the processes to start and the requests they serve (built here from the trace, so a bad
    trace fails here too). Raises when no request fits the model's context."""
    from moeless import tiny_moe
    from moeless.serve import check_request

    import torch

    if args.world is None:
        world = default_world()
    else:
        world = _int_option(args, "world", 1, MAX_WORLD)
        if torch.cuda.is_available() and world > torch.cuda.device_count():
            raise ValueError(f"--world {world}: only {torch.cuda.device_count()} GPUs are present")
    _int_option(args, "requests", 1, MAX_REQUESTS)
    _int_option(args, "max_prompt_tokens", 1, MAX_TOKENS)
    _int_option(args, "max_new_tokens", 1, MAX_TOKENS)
    _int_option(args, "extra_slots", 0, MAX_EXTRA_SLOTS)
    _int_option(args, "repeats", 1, MAX_REPEATS)
    for name in ("batch_window", "time_scale", "timeout"):
        _float_option(args, name, 0.0, open_lo=True)
    _float_option(args, "keep_alive", 0.0, open_lo=False)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {str(out)!r} exists and is not a folder")
    config = _model_config(args.model)
    experts = _num_experts(config)
    if experts is not None and experts % world:
        raise ValueError(f"--world {world} does not divide the model's {experts} experts (plain EP, the baseline, "
                         f"puts E / G experts on each process)")
    predictor_for(args.model, args.predictor)  # a bad --predictor fails here
    try:
        requests = build_requests(tiny_moe.encode, args.trace, args.requests, args.max_prompt_tokens,
                                  args.max_new_tokens, args.time_scale)
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise ValueError(f"--trace: cannot read {args.trace!r}: {err}") from None
    except ValueError as err:
        msg = str(err)
        raise ValueError(msg if msg.startswith("--") else f"--trace: {msg.removeprefix('trace: ')}") from None
    context = int(getattr(config, "max_position_embeddings", 1 << 30))
    vocab = int(getattr(config, "vocab_size", 1 << 30))
    if all(check_request(r, context, vocab) is not None for r in requests):
        raise ValueError(f"--max-prompt-tokens {args.max_prompt_tokens} / --max-new-tokens {args.max_new_tokens}: "
                         f"none of the {len(requests)} requests fits the model's context of {context} tokens "
                         f"({check_request(requests[0], context, vocab)})")
    return world, requests


def run_from_args(args: argparse.Namespace) -> int:
    """Run the demo from parsed `add_arguments` options (what `moeless demo` calls). Bad options raise
    ValueError before any process starts; a rank's failure is printed as one `error:` line (exit code 2 for bad
    input found by a rank, 1 otherwise)."""
    import torch

    from moeless import tiny_moe

    if getattr(args, "fit_predictor", False):
        return _fit_and_save(tiny_moe.MODEL_DIR if args.out == "reports/demo" else Path(args.out))
    world, requests = check_args(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    if not args.json:
        name = "the tiny MoE model" if args.model is None else repr(str(args.model))
        print(f"serving {name} on {world} processes ({'NCCL' if torch.cuda.is_available() else 'gloo, CPU'}): "
              f"{len(requests)} requests from {args.trace}, plain EP then moeless ...", flush=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        # the ranks get the options' values only (the CLI also puts its parser and handler in args)
        opts = {k: v for k, v in vars(args).items() if k not in ("func", "parser")}
        res = _run_ranks(world, opts, requests, out)
    except DemoError as err:
        print(f"moeless demo: error: {err}", file=sys.stderr)
        return err.exit_code
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    timing = (f"demo: {wall:.0f} s wall, {cpu:.0f} s CPU (all processes); serving: EP {res['ep']['seconds']:.1f} s, "
              f"moeless {res['moeless']['seconds']:.1f} s wall on rank 0")
    files = write_report(res, out, tiny_moe.decode, extra=timing)
    if args.json:
        print(json.dumps({p: {k: v for k, v in res[p]["summary"].items()
                              if k not in ("layer_times_s", "gpu_pairs", "replicas")}
                          | {"tokens_per_s": res[p]["tokens_per_s"]} for p in ("ep", "moeless")}
                         | {"refused": refused(res)}))
        return 0
    print(format_table(res))
    for r in res["moeless"]["results"][:3]:
        if r["error"] is None:
            print(f"  {tiny_moe.decode(res['prompts'][r['id']])[-30:]!r} -> {tiny_moe.decode(r['tokens'])!r}")
    print(timing)
    print(f"report: {', '.join(str(f) for f in files)}")
    return 0


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


if __name__ == "__main__":
    sys.exit(main())
