"""Run a function on every rank of a local gloo process group, for the serving tests.

Worker processes come from a forkserver that imports torch, transformers, the tiny model's modeling module and
moeless once (a spawned process would pay those imports per rank); they talk gloo on 127.0.0.1. `run_ranks(world, fn, ...)` calls
`fn(rank, world, ctx, *args)` on each rank (fn must be a module-level function of an importable module) and
returns, per rank, what it returned (or the traceback it raised), its exit code and how long it ran. Every rank
gets the same deadline; a rank still alive past it is killed and reported as hung.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback
from dataclasses import dataclass

import torch

from moeless import serve

_ctx = None


def _context():
    global _ctx
    if _ctx is None:
        _ctx = mp.get_context("forkserver")
        # the tiny model's transformers modeling module takes seconds to import: once, not per rank
        model_module = type(serve.load_model(None)).__module__
        _ctx.set_forkserver_preload(["torch", "transformers", "moeless.serve", "moeless.engine", "moeless.tiny_moe",
                                     "moeless.predictors", model_module])
    return _ctx


@dataclass
class RankOutcome:
    result: dict | None  # what fn returned; {"exception": traceback} if it raised; None if the rank died first
    exitcode: int | None
    seconds: float  # from start to exit (or to the kill)
    hung: bool


def run_ranks(world: int, fn, tmp_path, *, args=(), timeout: float = 240.0, collective_timeout: float = 20.0,
              threads: int = 1) -> list[RankOutcome]:
    port = serve.free_port()
    ctx = _context()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, str(tmp_path), collective_timeout, threads))
             for r in range(world)]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    ended = [None] * world
    while time.monotonic() - t0 < timeout and any(e is None for e in ended):
        for r, p in enumerate(procs):
            if ended[r] is None and not p.is_alive():
                ended[r] = time.monotonic() - t0
        time.sleep(0.05)
    out = []
    for r, p in enumerate(procs):
        hung = p.is_alive()
        if hung:
            p.kill()
        p.join()
        f = tmp_path / f"rank{r}.pt"
        res = torch.load(f, weights_only=False) if f.exists() else None
        out.append(RankOutcome(res, p.exitcode, ended[r] if ended[r] is not None else time.monotonic() - t0, hung))
    return out


def _entry(rank, world, port, fn, args, outdir, collective_timeout, threads):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    try:
        ctx = serve.init_distributed(rank=rank, world_size=world, timeout_s=collective_timeout, backend="gloo")
        result = fn(rank, world, ctx, *args)
    except Exception:  # reported to the test, which fails with it
        result = {"exception": traceback.format_exc()}
    torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
    # (a rank that ends normally waits for the others before tearing the group down; a broken group is left to
    # the process's exit)
    serve.shutdown(sync=not (isinstance(result, dict) and "exception" in result))
    os._exit(0)


def reference(model, prompts, new_tokens) -> tuple[list, list]:
    """Single-process greedy generation, one prompt at a time, no padding, no KV cache: (tokens, logits) per
    prompt, independent of the serving loop's batching and cache."""
    import numpy as np

    toks, logits = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on shared cores, intra-op threads only contend: 100x slower at times
    try:
        _generate(model, prompts, new_tokens, toks, logits)
    finally:
        torch.set_num_threads(threads)
    return toks, logits


def _generate(model, prompts, new_tokens, toks, logits):
    import numpy as np

    with torch.no_grad():
        for p, n in zip(prompts, new_tokens):
            ids = torch.tensor([list(p)])
            t_out, l_out = [], []
            for _ in range(n):
                lg = model(input_ids=ids, output_router_logits=False).logits[0, -1].float()
                t = int(lg.argmax())
                t_out.append(t)
                l_out.append(lg.numpy())
                ids = torch.cat([ids, torch.tensor([[t]])], 1)
            toks.append(t_out)
            logits.append(np.stack(l_out))
