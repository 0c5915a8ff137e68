"""Argument validation at the public boundary of the kernels: small functions that raise a clear ValueError.

Every message names the argument and says what was expected and what came. These helpers only inspect;
they never convert, copy or move a tensor (callers do that explicitly), and they never touch Triton.

Checks on tensor *values* (finiteness, ranges) make the host wait for the device, so on CUDA they would stall
the stream and break CUDA graphs: callers run them only where `value_checks_enabled(device)` says so.
`MOELESS_DEBUG=1` runs them everywhere, `MOELESS_DEBUG=0` nowhere (a CPU run then takes the very path a GPU
takes, which is how tests count host syncs); unset, they run on CPU tensors, where they cost no sync, and not
on CUDA. Shapes, dtypes and devices are always checked (they are host metadata).
"""
from __future__ import annotations

import os
from typing import Iterable, Sequence

import torch

DEBUG_ENV = "MOELESS_DEBUG"

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    name: str,
    t,
    *,
    ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
    shape: Sequence[int | None] | None = None,
) -> None:
    """`t` is a torch.Tensor with this many dims, one of these dtypes, on this device, of this shape.

    `shape` entries that are None match any size.
    """
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if shape is not None and ndim is None:
        ndim = len(shape)
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if shape is not None:
        for want, got in zip(shape, t.shape):
            if want is not None and want != got:
                expected = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
                raise ValueError(f"{name} must have shape {expected}, got {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in tuple(dtypes):
        got = str(t.dtype).replace("torch.", "")
        raise ValueError(f"{name} must have dtype in ({_dtype_names(dtypes)}), got {got}")
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{name} must be on {device} (with the other inputs), got {t.device}")


def check_int(name: str, v, *, lo: int | None = None, hi: int | None = None) -> int:
    """`v` is a Python int (bools rejected) in [lo, hi] (inclusive bounds, None = unbounded); returns it."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{name} must be an int, got {type(v).__name__} {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        lo_s = "-inf" if lo is None else str(lo)
        hi_s = "inf" if hi is None else str(hi)
        raise ValueError(f"{name} must be in [{lo_s}, {hi_s}], got {v}")
    return v


def check_float(name: str, v) -> float:
    """`v` is a finite real number (int or float, bools rejected); returns it as float."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{name} must be a float, got {type(v).__name__} {v!r}")
    v = float(v)
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def check_choice(name: str, v, choices: Sequence) -> None:
    """`v` is one of `choices`."""
    if v not in tuple(choices):
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {v!r}")


def value_checks_enabled(device: torch.device) -> bool:
    """Whether checks on tensor values run for tensors on `device` (see the module docstring)."""
    flag = os.environ.get(DEBUG_ENV, "")
    if flag in ("0", "1"):
        return flag == "1"
    if flag:
        raise ValueError(f"{DEBUG_ENV} must be 0 or 1 (or unset), got {flag!r}")
    return device.type != "cuda"


def check_finite(name: str, t: torch.Tensor) -> None:
    """Every element of the floating tensor `t` is finite (no NaN, no +-inf). Synchronises with the device."""
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite (found NaN or inf)")


def check_range(name: str, t: torch.Tensor, lo: int, hi: int) -> None:
    """Every element of the integer tensor `t` lies in [lo, hi). Synchronises with the device."""
    if t.numel() == 0:
        return
    t_min, t_max = int(t.min()), int(t.max())
    if t_min < lo or t_max >= hi:
        raise ValueError(f"{name} values must be in [{lo}, {hi}), got min {t_min}, max {t_max}")
