"""Count the points where CUDA would make the host wait for the device, on any device (CPU included).

A CUDA stream runs ahead of the host until the host needs a value computed on the device: `.item()`, `int(t)`,
`bool(t)`, `.tolist()`, `.cpu()`, `.numpy()`, or an op whose output *shape* depends on tensor values
(`nonzero`, boolean-mask indexing, `unique`, `bincount`, `repeat_interleave` without `output_size`,
`masked_select`). Each such point costs a round trip (tens of microseconds, more than a decode layer's
kernels are worth at small batch) and rules out CUDA-graph capture.

    with count_host_syncs() as syncs:
        fused_moe(...)
    assert not syncs, syncs.report()

On CPU tensors nothing actually waits, so the audit names the ops, which is what a CPU test can check: a
TorchDispatchMode sees the aten ops (covering item/int/bool through `_local_scalar_dense`), and `tolist`,
`cpu` and `numpy`, which bypass dispatch, are wrapped for the duration. Calls made from inside Triton (the
interpreter moves kernel arguments through numpy; a CUDA launch does not) are not counted. On CUDA,
`torch.cuda.set_sync_debug_mode` is the device's own witness (bench/gpu_check.sh uses both).

This module only observes: it never changes what the code under audit computes.
"""
from __future__ import annotations

import os
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops that read device values on the host, or size their output from them
_SYNCING_OPS = {
    "_local_scalar_dense",  # item(), int(t), float(t), bool(t)
    "is_nonzero",
    "equal",
    "allclose",
    "nonzero",
    "argwhere",
    "masked_select",
    "bincount",  # CUDA computes max(input) on the host to size the output, whatever minlength is
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "unique_dim_consecutive",
}
_PYTHON_SYNCS = ("tolist", "cpu", "numpy")
_TRITON_DIR = os.sep + "triton" + os.sep


@dataclass
class HostSyncs:
    """The syncing calls seen: one (what, where) per call; `where` is the innermost frame outside torch."""

    calls: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.calls)

    def report(self) -> str:
        return "\n".join(f"{what} at {where}" for what, where in self.calls) or "no host syncs"


def _caller() -> str | None:
    """file:line of the innermost frame outside torch and this module; None when called from inside Triton."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = frame.filename
        if _TRITON_DIR in path:
            return None
        if path == __file__ or (os.sep + "torch" + os.sep) in path:
            continue
        return f"{os.path.basename(path)}:{frame.lineno} ({frame.name})"
    return "?"


def _is_syncing(func, args, kwargs) -> bool:
    name = func._schema.name.split("::")[-1]
    if name in _SYNCING_OPS:
        return True
    if name == "repeat_interleave":
        return kwargs.get("output_size") is None and (len(args) < 4 or args[3] is None)
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())
    if name == "histc":  # min == max: the range is read from the data on the host
        lo = args[2] if len(args) > 2 else kwargs.get("min", 0)
        hi = args[3] if len(args) > 3 else kwargs.get("max", 0)
        return lo == hi
    return False


class _AuditMode(TorchDispatchMode):
    def __init__(self, syncs: HostSyncs):
        super().__init__()
        self.syncs = syncs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_syncing(func, args, kwargs):
            where = _caller()
            if where is not None:
                self.syncs.calls.append((str(func.overloadpacket.__name__), where))
        return func(*args, **kwargs)


@contextmanager
def count_host_syncs():
    """Context manager yielding a HostSyncs that fills with every syncing call made inside the block."""
    syncs = HostSyncs()
    originals = {name: getattr(torch.Tensor, name) for name in _PYTHON_SYNCS}

    def wrap(name, original):
        def audited(self, *args, **kwargs):
            where = _caller()
            if where is not None:
                syncs.calls.append((name, where))
            return original(self, *args, **kwargs)
        return audited

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(name, original))
    try:
        with _AuditMode(syncs):
            yield syncs
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


__all__ = ["HostSyncs", "count_host_syncs"]
