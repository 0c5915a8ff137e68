"""Count, on any device, the calls that would make the host wait for a CUDA device.

A CPU run never waits, so a CPU test cannot time host syncs; it can count the calls that would be one on CUDA:

    host reads        Tensor.item / tolist / numpy / cpu, bool(t), int(t), float(t), operator.index(t)
    value shapes      nonzero, argwhere, unique, masked_select, bincount (CUDA reads the max to size its
                      output), repeat_interleave without output_size, indexing with a bool mask, 1-arg where
    host tensors      torch.tensor / as_tensor / from_numpy: host data that a CUDA run then copies up from
                      pageable memory (a copy that waits for the device)

`SyncCounter` is a torch function mode (plus a wrapper around torch.from_numpy, which bypasses modes). Code
under test may declare zones (`counter.zone_of(obj, "name", zone)` wraps a function): calls inside a zone are
charged to it instead of to the caller, so kernel internals and the serving loop's own calls are told apart.
This module is test support: it patches nothing outside a `with counter:` block.
"""
from __future__ import annotations

import contextlib
import functools
import sys
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode

Tensor = torch.Tensor
HOST_READS = {Tensor.item, Tensor.tolist, Tensor.numpy, Tensor.cpu, Tensor.__bool__, Tensor.__int__,
              Tensor.__float__, Tensor.__index__}
VALUE_SHAPES = {torch.nonzero, Tensor.nonzero, torch.argwhere, Tensor.argwhere, torch.unique, Tensor.unique,
                torch.unique_consecutive, Tensor.unique_consecutive, torch.masked_select, Tensor.masked_select,
                torch.bincount, Tensor.bincount}
HOST_TENSORS = {torch.tensor, torch.as_tensor}
INDEXING = {Tensor.__getitem__, Tensor.__setitem__, Tensor.index_put_, Tensor.index_put, torch.index_put}


def _has_bool_index(index) -> bool:
    items = index if isinstance(index, (tuple, list)) else (index,)
    return any(isinstance(i, Tensor) and i.dtype == torch.bool for i in items)


def _kind(func, args, kwargs) -> str | None:
    if func in HOST_READS:
        return "host read"
    if func in VALUE_SHAPES:
        return "value shape"
    if func in HOST_TENSORS:
        return None if args and isinstance(args[0], Tensor) else "host tensor"
    if func in (torch.repeat_interleave, Tensor.repeat_interleave):
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        if isinstance(args[0], Tensor) and repeats is None:  # repeat_interleave(counts): sized by its sum
            return "value shape"
        if isinstance(repeats, Tensor) and kwargs.get("output_size") is None:
            return "value shape"
        return None
    if func in INDEXING and len(args) > 1 and _has_bool_index(args[1]):
        return "value shape"
    if func is torch.where and len(args) == 1 and not kwargs:
        return "value shape"
    return None


class SyncCounter(TorchFunctionMode):
    """`with SyncCounter() as c:` ... then `c.counts` {(zone, kind): n} and `c.sites` (zone, kind, where)."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()
        self.zone_calls: Counter = Counter()  # calls of each zone's functions (outermost only)
        self.sites: list[tuple[str, str, str]] = []
        self.zone = "caller"
        self.enabled = True
        self._patches = []

    # -- zones ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def zone_as(self, name: str):
        outer, self.zone = self.zone, name
        try:
            yield
        finally:
            self.zone = outer

    def zone_of(self, owner, attr: str, zone: str) -> None:
        """Charge every call made inside owner.attr (a function or method) to `zone` while counting."""
        original = getattr(owner, attr)
        counter = self

        @functools.wraps(original)
        def wrapped(*args, **kwargs):
            if counter.enabled and counter.zone == "caller":
                counter.zone_calls[zone] += 1
            with counter.zone_as(zone):
                return original(*args, **kwargs)

        self._patches.append((owner, attr, original))
        setattr(owner, attr, wrapped)

    def per_call(self, owner, attr: str) -> list:
        """Count each call of owner.attr on its own: returns the list that gets, per call, a dict with its
        "syncs" {zone: n}, "calls" {zone: n} and "sites" [(zone, kind, file:line)]; counting is off between
        calls (enter the counter with `enabled=False` first)."""
        original = getattr(owner, attr)
        counter, records = self, []

        @functools.wraps(original)
        def measured(*args, **kwargs):
            counter.reset()
            counter.enabled = True
            try:
                return original(*args, **kwargs)
            finally:
                counter.enabled = False
                syncs = Counter()
                for (zone, _), n in counter.counts.items():
                    syncs[zone] += n
                records.append({"syncs": dict(syncs), "calls": dict(counter.zone_calls),
                                "sites": list(counter.sites)})

        self._patches.append((owner, attr, original))
        setattr(owner, attr, measured)
        return records

    def total(self, zone: str = "caller") -> int:
        return sum(n for (z, _), n in self.counts.items() if z == zone)

    def reset(self) -> None:
        self.counts.clear()
        self.zone_calls.clear()
        self.sites.clear()

    # -- counting ------------------------------------------------------------------------------------------
    def _record(self, kind: str, name: str) -> None:
        self.counts[(self.zone, kind)] += 1
        frame = sys._getframe(2)
        while frame is not None and (frame.f_code.co_filename == __file__
                                     or "/torch/" in frame.f_code.co_filename.replace("\\", "/")):
            frame = frame.f_back
        where = f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame is not None else "?"
        self.sites.append((self.zone, f"{kind} ({name})", where))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.enabled:
            kind = _kind(func, args, kwargs)
            if kind is not None:
                self._record(kind, getattr(func, "__name__", str(func)))
        return func(*args, **kwargs)

    def __enter__(self):
        original = torch.from_numpy
        counter = self

        @functools.wraps(original)
        def from_numpy(array):
            if counter.enabled:
                counter._record("host tensor", "from_numpy")
            return original(array)

        self._patches.append((torch, "from_numpy", original))
        torch.from_numpy = from_numpy
        return super().__enter__()

    def __exit__(self, *exc):
        for owner, attr, original in reversed(self._patches):
            setattr(owner, attr, original)
        self._patches.clear()
        return super().__exit__(*exc)


def main() -> None:
    """Print the would-be syncs of every MoE layer of a world-1 gloo run of the tiny model, per zone: run from a
    checkout's root (`python tests/serve_sync_zones.py`) to count that checkout's serving loop."""
    import collections
    import os

    sys.path.insert(0, os.getcwd())
    torch.set_num_threads(1)
    import moeless.engine
    from moeless import serve

    print(f"counting {os.path.dirname(serve.__file__)}")
    model = serve.load_model(None)
    ctx = serve.init_distributed(world_size=1, rank=0, backend="gloo")
    srv = serve.ExpertParallelServer(model, ctx, policy="moeless")
    counter = SyncCounter()
    with counter:
        counter.enabled = False
        for name, module in list(sys.modules.items()):
            if name == "moeless.serve" or name.startswith("moeless.serve."):
                for attr, zone in (("fused_moe", "kernels"), ("replica_dispatch", "kernels"), ("combine", "kernels"),
                                   ("download", "download"), ("upload", "upload")):
                    if hasattr(module, attr) and not name.endswith(".transfer"):
                        counter.zone_of(module, attr, zone)
        counter.zone_of(moeless.engine.GateReplicaLoads, "counts", "predictor")
        layers = counter.per_call(serve.ExpertParallelExperts, "forward")
        srv.generate([[256, 72, 101, 108, 108, 111], [256, 65, 66]], 3)
    srv.close()
    serve.shutdown()
    L = srv.num_layers
    for i, rec in enumerate(layers):
        print(f"iteration {i // L} ({'prefill' if i < L else 'decode'}) layer {i % L}: would-be syncs "
              + ", ".join(f"{z}={n}" for z, n in sorted(rec["syncs"].items())) + "; calls "
              + ", ".join(f"{z}={n}" for z, n in sorted(rec["calls"].items())))
    rec = layers[L + 1]
    sites = collections.Counter((kind, where.split("/moeless/")[-1]) for zone, kind, where in rec["sites"]
                                if zone == "caller")
    print("the serving loop's own, decode layer 1:", dict(sites) or "none")


if __name__ == "__main__":
    main()
