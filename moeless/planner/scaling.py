"""Expert scaling: how many replicas each expert of each layer gets (`logcnt [L, E]`).

- `scale_literal`: the paper's Algorithm 1 (replicate the expert with the largest per-replica load while the
  coefficient of variation of the replica loads exceeds a threshold and the budget lasts).
- `scale_ideal`: the fewest replicas that allow a balance max/mean <= 1 + tolerance: R_e = ceil(W_e /
  ((1 + tolerance) total / G)); `replicate_minmax` where that exceeds the budget.
- `replicate_minmax`: DeepSeek EPLB's replication (each spare replica to the expert with the largest load per
  replica), the one greedy replication of the project: `moeless.baselines.replicate_experts` derives EPLB's
  slot order from it.

Everything is numpy on [L, E] arrays, vectorised across layers. It never places, splits, or imports torch.
"""
from __future__ import annotations

import numpy as np

from moeless.planner.plan import _check_loads, _positive_int

# replicate_minmax sorts all candidate increments when there are at most this many per layer (else bisection).
_MINMAX_SORT = 2048

def _replica_cv(W: np.ndarray, R: np.ndarray) -> np.ndarray:
    """[L] coefficient of variation of the per-replica loads (each of expert e's R_e replicas carries W_e/R_e)."""
    n = R.sum(1)
    mean = W.sum(1) / n
    second = (W * W / R).sum(1) / n
    std = np.sqrt(np.maximum(second - mean * mean, 0.0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean > 0, std / mean, 0.0)


def _replica_cap(max_replicas, total_slots: int) -> int:
    if max_replicas is None:
        return total_slots
    return _positive_int("max_replicas", max_replicas)


def scale_literal(loads, total_slots: int, *, cv_threshold: float = 0.2, max_replicas=None) -> np.ndarray:
    """Algorithm 1 as printed: replicate the expert with the largest per-replica load while CV > threshold.

    The memory budget M_cap is `total_slots` replicas (E of them are the experts themselves). Returns logcnt
    int64 [L, E]. Ties go to the lower expert id.
    """
    W = _check_loads(loads)
    L, E = W.shape
    total_slots = _positive_int("total_slots", total_slots)
    if not np.isfinite(cv_threshold) or cv_threshold < 0:
        raise ValueError(f"cv_threshold must be a finite number >= 0, got {cv_threshold!r}")
    if E > total_slots:
        raise ValueError(f"total_slots={total_slots} cannot hold {E} experts once each")
    cap = _replica_cap(max_replicas, total_slots)
    R = np.ones((L, E), dtype=np.int64)
    rows = np.arange(L)
    active = _replica_cv(W, R) > cv_threshold
    for _ in range(total_slots - E):
        if not active.any():
            break
        per = np.where(R < cap, W / R, -np.inf)
        e = per.argmax(1)
        active &= np.isfinite(per[rows, e])
        R[rows[active], e[active]] += 1
        active &= _replica_cv(W, R) > cv_threshold
    return R


def replicate_minmax(loads, num_replicas: int, *, max_replicas=None) -> np.ndarray:
    """EPLB's replicate_experts: give each layer exactly `num_replicas` replicas (capped per expert by
    `max_replicas`), one at a time to the expert with the largest per-replica load, which minimises the
    largest per-replica load. Returns logcnt int64 [L, E]."""
    W = _check_loads(loads)
    L, E = W.shape
    num_replicas = _positive_int("num_replicas", num_replicas)
    if num_replicas < E:
        raise ValueError(f"num_replicas={num_replicas} must be >= the number of experts {E}")
    cap = _replica_cap(max_replicas, num_replicas)
    M = num_replicas - E
    R = np.ones((L, E), dtype=np.int64)
    if M == 0 or cap == 1:
        return R
    # The greedy takes the increments W_e / k (k = 1 .. cap-1: the load per replica before replica k+1) in
    # descending order (ties: lower expert id), so every increment above a threshold t is taken as long as
    # fewer than M lie above t. t <= total / M always qualifies; a few bisection steps (on a log scale, down
    # to total / (M + E), below which more than M lie) bring it close, and the greedy finishes from there:
    # the same result as the plain greedy, in a few dozen numpy calls instead of M rounds.
    rows = np.arange(L)
    K = min(cap - 1, M)  # an expert takes at most K of the spare replicas
    if E * K <= _MINMAX_SORT:
        # the increments W_e / k, k = 1..K, in (expert, k) order; a stable sort by value descending puts ties
        # in the greedy's order (lower expert id first), and the greedy takes the first M of them
        vals = (W[:, :, None] / np.arange(1, K + 1)).reshape(L, E * K)
        top = np.argsort(-vals, axis=1, kind="stable")[:, :M] // K
        return R + np.bincount((rows[:, None] * E + top).ravel(), minlength=L * E).reshape(L, E)
    tot = W.sum(1)
    hi = tot / M
    lo = tot / (M + E)

    def above(t):  # [L, E] number of increments W_e / k > t, k <= cap - 1 (exact in floating point)
        with np.errstate(divide="ignore", invalid="ignore"):
            c = np.clip(np.ceil(W / t[:, None]) - 1, 0, cap - 1).astype(np.int64)
            c -= (c >= 1) & ~(W / np.maximum(c, 1) > t[:, None])
            c += (c < cap - 1) & (W / (c + 1) > t[:, None])
        return c

    pos = tot > 0
    if pos.any():
        for _ in range(5):
            mid = np.sqrt(lo * hi)
            ok = above(np.where(pos, mid, 1.0)).sum(1) <= M
            hi = np.where(ok, mid, hi)
            lo = np.where(ok, lo, mid)
        c = above(np.where(pos, hi, 1.0))
        good = pos & (c.sum(1) <= M)  # floating point could break the bound: those layers start from one
        R += np.where(good[:, None], c, 0)
    return _minmax_greedy(W, R, M - (R - 1).sum(1), cap, rows)


def _minmax_greedy(W, R, left, cap, rows):
    """EPLB's greedy from R: `left` [L] more replicas, each to the expert with the largest load per replica."""
    for _ in range(int(left.max(initial=0))):
        per = np.where(R < cap, W / R, -np.inf)
        e = per.argmax(1)
        ok = (left > 0) & (per[rows, e] > -np.inf)
        if not ok.any():
            break
        R[rows[ok], e[ok]] += 1
        left = left - ok
    return R


def scale_ideal(loads, gpus: int, total_slots: int, *, tolerance: float = 0.01, max_replicas=None) -> np.ndarray:
    """The improved rule: R_e = ceil(W_e / ((1 + tolerance) * total / G)), at least 1, at most `max_replicas`;
    layers where that exceeds `total_slots` get `replicate_minmax(loads, total_slots)` instead.
    Returns logcnt int64 [L, E]."""
    W = _check_loads(loads)
    gpus = _positive_int("gpus", gpus)
    total_slots = _positive_int("total_slots", total_slots)
    if not np.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    L, E = W.shape
    if E > total_slots:
        raise ValueError(f"total_slots={total_slots} cannot hold {E} experts once each")
    cap = _replica_cap(max_replicas, total_slots)
    target = W.sum(1, keepdims=True) / gpus * (1.0 + tolerance)
    with np.errstate(invalid="ignore", divide="ignore"):
        # the 1e-9 keeps W_e = 2C exactly at 2 replicas despite rounding in total / G
        need = np.ceil(np.where(target > 0, W / target, 0.0) - 1e-9)
    R = np.clip(need, 1, cap).astype(np.int64)
    over = R.sum(1) > total_slots
    if over.any():
        R[over] = replicate_minmax(W[over], total_slots, max_replicas=cap)
    return R
