"""What the serving loop measures: one `LayerTimer` per server, and the statistics its reports share.

Per (iteration, MoE layer) the timer keeps, for this rank:

    moe          the layer's time from its entry to its output, less the counts all-gather (which also absorbs
                 the wait for ranks still in attention, and is the same message under every policy)
    with_gather  the same span with the all-gather
    expert       host time of the expert compute (on a GPU, only its launches)
    cpu          this rank's CPU time in the span, less the all-gather: what the layer would take on unshared cores
    pairs [G]    (token, expert) pairs that each rank's experts served

and a profile of the layer's parts (wall and CPU seconds per part, summed). On CUDA the spans are CUDA events,
read when they have completed (`Event.query`, which never waits) or, at the latest, when `table` is called:
measuring never adds a host sync to a layer. Reading and formatting only; this module never changes a layer.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np
import torch

__all__ = ["GATHER", "LayerTimer", "load_report", "pair_balance", "percentiles"]

GATHER = "all-gather of counts"
FIELDS = ("moe", "with_gather", "expert", "cpu")


def pair_balance(gpu_pairs) -> float:
    """Busiest rank's pairs over the mean rank's, summed over [iterations, layers, ranks] pairs (1.0 = even)."""
    pairs = np.asarray(gpu_pairs, dtype=np.float64)
    return float(pairs.max(-1).sum() / max(1e-9, pairs.mean(-1).sum()))


def percentiles(values, scale: float = 1.0) -> dict:
    """{"mean", "p50", "p90", "p99"} of `values` times `scale` (NaN when empty)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1) * scale
    if v.size == 0:
        return {k: float("nan") for k in ("mean", "p50", "p90", "p99")}
    return {"mean": float(v.mean()), "p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90)),
            "p99": float(np.percentile(v, 99))}


def load_report(results, seconds: float) -> dict:
    """Throughput and latency of a `serve(..., realtime=True)` run from its Results and wall seconds: requests
    served / refused / failed, generated tokens per second, served requests per second, and percentiles (s) of
    the latency (done_s - arrival_s) and of the time to first token (first_token_s - arrival_s)."""
    served = [r for r in results if r.error is None]
    refused = [r for r in results if r.error is not None and r.batch < 0 and not r.error.startswith("serving:")]
    tokens = sum(len(r.tokens) for r in served)
    return {
        "requests": len(results), "served": len(served), "refused": len(refused),
        "failed": len(results) - len(served) - len(refused), "tokens": tokens, "seconds": float(seconds),
        "tokens_per_s": tokens / max(seconds, 1e-9), "requests_per_s": len(served) / max(seconds, 1e-9),
        "latency_s": percentiles([r.done_s - r.arrival_s for r in served]),
        "first_token_s": percentiles([r.first_token_s - r.arrival_s for r in served]),
    }


class LayerTimer:
    """Times every MoE layer of every iteration on one rank (see the module docstring).

    Per layer: begin(layer), mark(part) after each part, `with gather():` around the counts all-gather,
    `with expert():` around the expert compute, pairs(layer, per_rank), end(layer); end_iteration() after the
    last layer. table() returns the measurements."""

    def __init__(self, num_layers: int, world: int, device: torch.device):
        self.num_layers, self.world = num_layers, world
        self.cuda = torch.device(device).type == "cuda"
        self.profile: dict[str, list] = {}  # part -> [wall s, CPU s]
        self._rows: dict[str, list] = {f: [] for f in FIELDS + ("pairs",)}
        self._row = self._new_row()
        self._pending: list = []  # (iteration, layer, [4 CUDA events]) not read yet
        self._mark_at, self._t0, self._cpu, self._gather_s, self._events = (0.0, 0.0), 0.0, 0.0, 0.0, None

    def _new_row(self) -> dict:
        row = {f: np.zeros(self.num_layers) for f in FIELDS}
        row["pairs"] = np.zeros((self.num_layers, self.world), dtype=np.int64)
        return row

    @property
    def iterations(self) -> int:
        return len(self._rows["moe"])

    def begin(self, layer: int) -> None:
        self._t0 = time.perf_counter()
        self._mark_at = (self._t0, time.thread_time())
        self._cpu = self._gather_s = 0.0
        if self.cuda:
            self._events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
            self._events[0].record()

    def mark(self, part: str) -> None:
        """Charge the time since the last mark to `part` (wall and this thread's CPU)."""
        w, c = time.perf_counter(), time.thread_time()
        prof = self.profile.setdefault(part, [0.0, 0.0])
        prof[0] += w - self._mark_at[0]
        prof[1] += c - self._mark_at[1]
        if part != GATHER:
            self._cpu += c - self._mark_at[1]
        self._mark_at = (w, c)

    @contextmanager
    def gather(self):
        t = time.perf_counter()
        if self.cuda:
            self._events[1].record()
        yield
        if self.cuda:
            self._events[2].record()
        self._gather_s = time.perf_counter() - t
        self.mark(GATHER)

    @contextmanager
    def expert(self, layer: int):
        t = time.perf_counter()
        yield
        self._row["expert"][layer] = time.perf_counter() - t

    def pairs(self, layer: int, per_rank: np.ndarray) -> None:
        self._row["pairs"][layer] = per_rank

    def end(self, layer: int) -> None:
        self._row["cpu"][layer] = self._cpu
        if self.cuda:
            self._events[3].record()
            self._pending.append((self.iterations, layer, self._events))
        else:
            full = time.perf_counter() - self._t0
            self._row["with_gather"][layer] = full
            self._row["moe"][layer] = full - self._gather_s

    def end_iteration(self) -> None:
        for f, rows in self._rows.items():
            rows.append(self._row[f])
        self._row = self._new_row()
        self._read_events(wait=False)

    def _read_events(self, wait: bool) -> None:
        if wait and self._pending:
            self._pending[-1][2][3].synchronize()
        left = []
        for it, layer, ev in self._pending:
            if it >= self.iterations or not (wait or ev[3].query()):
                left.append((it, layer, ev))
                continue
            full = ev[0].elapsed_time(ev[3]) / 1e3
            self._rows["with_gather"][it][layer] = full
            self._rows["moe"][it][layer] = full - ev[1].elapsed_time(ev[2]) / 1e3
        self._pending = left

    def table(self) -> dict:
        """{field: float64 [iterations, L]} for the FIELDS, and "pairs": int64 [iterations, L, G]."""
        self._read_events(wait=True)
        out = {f: np.array(self._rows[f], dtype=np.float64).reshape(-1, self.num_layers) for f in FIELDS}
        out["pairs"] = np.array(self._rows["pairs"], dtype=np.int64).reshape(-1, self.num_layers, self.world)
        return out
