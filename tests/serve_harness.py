"""Run a function on every rank of a local gloo process group, for the serving tests.

Worker processes come from a forkserver that imports torch, transformers and moeless once (a spawned process
would pay those imports per rank); they talk gloo on 127.0.0.1. `run_ranks(world, fn, ...)` calls
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
        _ctx.set_forkserver_preload(["torch", "transformers", "moeless.serve", "moeless.engine"])
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
    serve.shutdown()  # leaves a group a failed collective broke to the process's exit
    os._exit(0)
