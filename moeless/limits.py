"""Bounds on every size moeless takes from input, and the checks that enforce them before anything is allocated.

A number read from a file or a flag (an expert id, a GPU count, a token count, ...) decides how much memory a
plan, a trace or a predictor takes. Each bound below is far above any model or deployment there is (the largest
public MoE models have 384 experts, 8 experts per token and fewer than 100 MoE layers; the largest expert-parallel
deployments a few hundred GPUs), and low enough that the arrays it allows fit in a few GB. A value outside a bound
is a ValueError naming the argument, the range and the value, raised before the arrays it would size exist.

The CLI calls these checks on its arguments and inputs; the planner, the trace readers and the predictors call
them at their own boundary.

Floor 1 (see docs/ARCHITECTURE.md): numpy only; it must never import another moeless module.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

__all__ = [
    "MAX_EXPERTS", "MAX_TOP_K", "MAX_LAYERS", "MAX_GPUS", "MAX_SLOTS_PER_GPU", "MAX_SLOTS_PER_LAYER",
    "MAX_PLAN_ENTRIES", "MAX_TOKEN_COUNT", "MAX_REQUEST_TOKENS", "MAX_BATCH_TOKENS", "MAX_ITERATIONS",
    "MAX_ARRAY_BYTES", "check_int", "check_number", "check_plan_size", "check_loads", "check_trace_shape",
    "check_bytes", "describe",
]

MAX_EXPERTS = 4096  # experts per MoE layer (so an expert id is < 4096)
MAX_TOP_K = 64  # experts per token
MAX_LAYERS = 1024  # MoE layers of a model (a layer index is < 1024)
MAX_GPUS = 1024  # GPUs of an expert-parallel group
MAX_SLOTS_PER_GPU = 4096  # expert slots per GPU per layer
MAX_SLOTS_PER_LAYER = 16384  # gpus x slots_per_gpu (1024 GPUs x 16 slots, 256 x 64)
MAX_PLAN_ENTRIES = 2**27  # layers x experts x slots per layer: bounds a plan's [L, E, R] arrays to ~1 GB of int64
MAX_TOKEN_COUNT = 10**12  # tokens (token-expert pairs) per expert per layer in one plan: sums stay exact in float64
MAX_REQUEST_TOKENS = 10**7  # prompt or output tokens of one request (the longest contexts are 10M tokens)
MAX_BATCH_TOKENS = 10**8  # tokens of one batch or iteration (--batch-tokens, --token-budget)
MAX_ITERATIONS = 10**6  # simulated iterations (--iteration-budget)
MAX_ARRAY_BYTES = 2**34  # 16 GiB: the arrays of one trace or predictor file, before they are read


def describe() -> str:
    """The limits in one paragraph (for the command's help)."""
    return (f"Limits: at most {MAX_EXPERTS} experts per layer, top-k {MAX_TOP_K}, {MAX_LAYERS} MoE layers, "
            f"{MAX_GPUS} GPUs, {MAX_SLOTS_PER_GPU} slots per GPU and {MAX_SLOTS_PER_LAYER} per layer "
            f"(layers x experts x slots per layer <= {MAX_PLAN_ENTRIES:,}), {MAX_TOKEN_COUNT:,} tokens per expert "
            f"and layer, {MAX_REQUEST_TOKENS:,} tokens per request, {MAX_BATCH_TOKENS:,} tokens per batch "
            f"(moeless/limits.py).")


def check_int(name: str, value, lo: int = 1, hi: int | None = None) -> int:
    """`value` as an int in [lo, hi] (hi None: no upper bound); ValueError naming `name` otherwise.

    Accepts Python and numpy integers (never bool, never a float, even a whole one)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral, np.integer)):
        raise ValueError(f"{name} must be an integer in {_range(lo, hi)}, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        raise ValueError(f"{name} must be an integer in {_range(lo, hi)}, got {int(value)}")
    return int(value)


def check_number(name: str, value, lo: float | None = None, hi: float | None = None, *,
                 lo_open: bool = False) -> float:
    """`value` as a finite float in [lo, hi] ((lo, hi] with lo_open); ValueError naming `name` otherwise."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise ValueError(f"{name} must be a real number{_bounds(lo, hi, lo_open)}, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
        raise ValueError(f"{name} must be a finite number{_bounds(lo, hi, lo_open)}, got {value!r}")
    return v


def check_plan_size(num_layers: int, num_experts: int, gpus: int, slots_per_gpu: int) -> None:
    """The sizes of one plan: each within its bound, gpus x slots_per_gpu <= MAX_SLOTS_PER_LAYER and
    layers x experts x slots per layer <= MAX_PLAN_ENTRIES."""
    L = check_int("layers", num_layers, 1, MAX_LAYERS)
    E = check_int("experts", num_experts, 1, MAX_EXPERTS)
    G = check_int("gpus", gpus, 1, MAX_GPUS)
    S = check_int("slots_per_gpu", slots_per_gpu, 1, MAX_SLOTS_PER_GPU)
    if G * S > MAX_SLOTS_PER_LAYER:
        raise ValueError(f"gpus x slots_per_gpu = {G} x {S} = {G * S} slots per layer; at most "
                         f"{MAX_SLOTS_PER_LAYER} (moeless.limits.MAX_SLOTS_PER_LAYER)")
    if L * E * G * S > MAX_PLAN_ENTRIES:
        raise ValueError(f"layers x experts x slots per layer = {L} x {E} x {G * S} = {L * E * G * S}; at most "
                         f"{MAX_PLAN_ENTRIES} (moeless.limits.MAX_PLAN_ENTRIES: a plan's [L, E, R] arrays)")


def check_loads(loads, name: str = "loads") -> np.ndarray:
    """Per-expert loads as float64 [L, E]: real, finite, in [0, MAX_TOKEN_COUNT], L and E within bounds.
    A 1-D [E] is one layer. The shape is checked before the values are converted."""
    a = np.asarray(loads)
    if a.dtype.kind not in "iuf":
        kind = "complex numbers" if a.dtype.kind == "c" else f"dtype {a.dtype}"
        raise ValueError(f"{name} must hold real numbers (token counts), got {kind}")
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or 0 in a.shape:
        raise ValueError(f"{name} must have shape [L, E] or [E] with L, E >= 1, got shape {tuple(np.shape(loads))}")
    check_int(f"{name}: layers (rows)", a.shape[0], 1, MAX_LAYERS)
    check_int(f"{name}: experts (columns)", a.shape[1], 1, MAX_EXPERTS)
    a = a.astype(np.float64)
    bad = ~np.isfinite(a) | (a < 0) | (a > MAX_TOKEN_COUNT)
    if bad.any():
        l, e = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name} must be finite token counts in [0, {MAX_TOKEN_COUNT:,}], got {float(a[l, e])!r} "
                         f"at layer {l}, expert {e}")
    return a


def check_trace_shape(num_layers: int, num_tokens: int, top_k: int, num_experts: int, name: str = "trace") -> None:
    """The sizes of a routing trace [L, N, K] over E experts: L, K and E within bounds, K <= E."""
    check_int(f"{name}: layers", num_layers, 0, MAX_LAYERS)
    check_int(f"{name}: tokens", num_tokens, 0)
    check_int(f"{name}: experts", num_experts, 1, MAX_EXPERTS)
    check_int(f"{name}: top-k", top_k, 0 if num_tokens == 0 or num_layers == 0 else 1, min(MAX_TOP_K, num_experts))


def check_bytes(what: str, nbytes: int) -> None:
    """Arrays of `nbytes` for `what` (e.g. "the regression predictor's statistics") fit MAX_ARRAY_BYTES."""
    if nbytes > MAX_ARRAY_BYTES:
        raise ValueError(f"{what} would take {nbytes / 2**30:.1f} GiB, more than the {MAX_ARRAY_BYTES / 2**30:.0f} GiB "
                         "of moeless.limits.MAX_ARRAY_BYTES")


def _range(lo, hi) -> str:
    return f"[{lo}, {hi}]" if hi is not None else f">= {lo}"


def _bounds(lo, hi, lo_open) -> str:
    if lo is None and hi is None:
        return ""
    if hi is None:
        return f" {'>' if lo_open else '>='} {lo:g}"
    if lo is None:
        return f" <= {hi:g}"
    return f" in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
