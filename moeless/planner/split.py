"""Pair splits: how many of each expert's (token, k) pairs each of its replicas serves, and the balance that gives.

    loads          int   [L, E]      true (token, k) pairs per logical expert
    replica_tokens int64 [L, E, R]   pairs served by replica r of expert e (0 on pads); sums to the counts

- `even_split`: the paper's split (contiguous chunks, sizes differing by at most one, larger chunks first).
- `serve_time_split`: the integer split that minimises the maximum GPU load (pairs). The optimum is M* = max
  over GPU sets X of ceil(W(X) / |X|), W(X) = pairs of the experts whose replicas all lie in X (Hall's
  condition for the transportation problem; integral by max-flow integrality), i.e. within one token of the LP
  optimum. For G <= EXACT_SPLIT_MAX_GPUS it is computed exactly by a subset-sum (zeta) transform over the 2^G
  GPU sets (`_set_loads`, which `split_optimum` shares) and realised one replica at a time, keeping every Hall
  constraint satisfied. For more GPUs a greedy water-filling (two Gauss-Seidel sweeps, incremental GPU loads:
  near-linear in the replicas) is used, and the even split replaces it in a layer where it would be worse.
- `gpu_loads`, `balance`: pairs per GPU and max / mean per layer.

Pairs are the planner's objective; time is the policy's (`moeless.policy` prices splits with the cost model and
uses this split as one of its candidates). Everything is numpy, vectorised across layers; loops run over
replicas or GPUs, never over layers. Counts are bounded (`MAX_LAYER_PAIRS` per layer) so that no sum overflows.
"""
from __future__ import annotations

import numpy as np

from moeless.planner.plan import Plan, _check_loads

__all__ = ["EXACT_SPLIT_MAX_GPUS", "MAX_LAYER_PAIRS", "balance", "even_split", "gpu_loads", "serve_time_split",
           "split_optimum"]

# 2^G subsets per layer: 1024 for G = 10 keeps the exact split well under the 50 us/layer budget.
EXACT_SPLIT_MAX_GPUS = 10

# A layer's pairs must stay exact in float64 (2^53) and leave int64 headroom for the sentinels below.
MAX_LAYER_PAIRS = 1 << 50

_BIG = 1 << 62  # "no constraint" in the exact split's minima; > any slack (pairs x GPUs <= 2^54)


def _check_plan_counts(plan, loads, name="loads") -> np.ndarray:
    if not isinstance(plan, Plan):
        raise ValueError(f"plan must be a Plan, got {type(plan).__name__}")
    W = _check_loads(loads, name, integral=True)
    if W.shape != plan.logcnt.shape:
        raise ValueError(f"{name} must have shape {list(plan.logcnt.shape)} (the plan's [L, E]), got {list(W.shape)}")
    if (W.sum(1) > MAX_LAYER_PAIRS).any():
        raise ValueError(f"{name}: a layer carries more than {MAX_LAYER_PAIRS} (2^50) pairs; counts that large "
                         "are not token counts")
    return W.astype(np.int64)


def even_split(plan: Plan, loads) -> np.ndarray:
    """The paper's split: expert e's pairs in contiguous chunks over its replicas, sizes differing by at most
    one, larger chunks first. loads int [L, E] -> replica_tokens int64 [L, E, R_max]."""
    W = _check_plan_counts(plan, loads)
    return _even(W, plan.logcnt, plan.max_replicas)


def _even(W: np.ndarray, logcnt: np.ndarray, R: int) -> np.ndarray:
    r = np.arange(R)
    c = logcnt[:, :, None]
    return np.where(r < c, W[:, :, None] // c + (r < W[:, :, None] % c), 0).astype(np.int64)


def gpu_loads(plan: Plan, replica_tokens) -> np.ndarray:
    """[L, G] pairs served per GPU. Integer replica_tokens give int64, float ones float64."""
    if not isinstance(plan, Plan):
        raise ValueError(f"plan must be a Plan, got {type(plan).__name__}")
    rt = np.asarray(replica_tokens.detach().cpu() if hasattr(replica_tokens, "detach") else replica_tokens)
    if rt.shape != plan.log2phy.shape:
        raise ValueError(f"replica_tokens must have shape {list(plan.log2phy.shape)}, got {list(rt.shape)}")
    L, G = plan.num_layers, plan.gpus
    valid = plan.log2phy >= 0
    idx = (np.arange(L)[:, None, None] * G + plan.log2phy // plan.slots_per_gpu)[valid]
    out = np.bincount(idx, weights=rt[valid].astype(np.float64), minlength=L * G).reshape(L, G)
    return out.astype(np.int64) if np.issubdtype(rt.dtype, np.integer) else out


def balance(gpu_loads) -> np.ndarray:
    """[L] max / mean GPU load per layer; 1.0 for a layer without load."""
    a = np.asarray(gpu_loads, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] < 1:
        raise ValueError(f"gpu_loads must have shape [L, G], got {a.shape}")
    mean = a.mean(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean > 0, a.max(1) / np.where(mean > 0, mean, 1.0), 1.0)


# ----------------------------------------------------------------------------------------------------------
# Hall's condition over GPU sets (the exact split and split_optimum share it)
# ----------------------------------------------------------------------------------------------------------
_POPCOUNT: dict[int, np.ndarray] = {}


def _popcount_table(n_bits: int) -> np.ndarray:
    """int64 [2^n_bits]: bits set in each index (cached: the exact split needs it on every call; read-only)."""
    t = _POPCOUNT.get(n_bits)
    if t is None:
        t = np.zeros(1, dtype=np.int64)
        for _ in range(n_bits):  # the table of n+1 bits is that of n bits, then the same plus one
            t = np.concatenate([t, t + 1])
        t.setflags(write=False)
        _POPCOUNT[n_bits] = t
    return t


def _gpu_bits(log2phy: np.ndarray, S: int) -> np.ndarray:
    """int64 [L, E, R]: 1 << GPU of each replica (0 on pads)."""
    return np.where(log2phy >= 0, np.left_shift(np.int64(1), np.maximum(log2phy, 0) // S), 0)


def _set_loads(mask: np.ndarray, W: np.ndarray, G: int) -> np.ndarray:
    """W(X) [L, 2^G] for every GPU set X: the loads W [L, E] of the experts whose GPU set (`mask` [L, E],
    bit g = a replica on GPU g) lies inside X. A histogram of the masks, then the subset-sum (zeta) transform."""
    L = W.shape[0]
    nX = 1 << G
    f = np.bincount((np.arange(L)[:, None] * nX + mask).ravel(), W.ravel(), L * nX).reshape(L, nX)
    f = f.astype(W.dtype, copy=False)
    for b in range(G):
        v = f.reshape(L, nX >> (b + 1), 2, 1 << b)
        v[:, :, 1, :] += v[:, :, 0, :]
    return f


def split_optimum(plan: Plan, loads) -> np.ndarray:
    """[L] the smallest max GPU load any (fractional) split of `loads` float [L, E] can reach on `plan`: max
    over GPU sets X of W(X) / |X| (Hall's condition). Needs plan.gpus <= EXACT_SPLIT_MAX_GPUS."""
    if plan.gpus > EXACT_SPLIT_MAX_GPUS:
        raise ValueError(f"split_optimum enumerates 2^G GPU sets: G={plan.gpus} > {EXACT_SPLIT_MAX_GPUS}")
    W = np.asarray(loads, dtype=np.float64)
    mask = np.bitwise_or.reduce(_gpu_bits(plan.log2phy, plan.slots_per_gpu), axis=2)
    f = _set_loads(mask, W, plan.gpus)
    return (f / np.maximum(_popcount_table(plan.gpus), 1)).max(1)


# ----------------------------------------------------------------------------------------------------------
# The serve-time split
# ----------------------------------------------------------------------------------------------------------
def serve_time_split(plan: Plan, loads) -> np.ndarray:
    """Integer replica_tokens int64 [L, E, R_max] that minimise the maximum GPU load for the true counts
    `loads` int [L, E] (lossless: each expert's row sums to its count). Exact for plan.gpus <=
    EXACT_SPLIT_MAX_GPUS; a water-filling heuristic, never worse than `even_split`, above that."""
    W = _check_plan_counts(plan, loads)
    L, E, Rm = plan.log2phy.shape
    G, S = plan.gpus, plan.slots_per_gpu
    valid = plan.log2phy >= 0
    even = _even(W, plan.logcnt, Rm)
    if Rm == 1:
        return even
    rgpu = np.where(valid, plan.log2phy // S, 0)
    if G <= EXACT_SPLIT_MAX_GPUS:
        return _split_exact(W, plan.log2phy, rgpu, valid, S, G)
    return _split_waterfill(W, rgpu, valid, plan.logcnt, G, even)


def _layer_gpu_loads(rt, rgpu, valid, G):
    L = rt.shape[0]
    idx = np.where(valid, np.arange(L)[:, None, None] * G + rgpu, L * G)  # pads to a sink bucket
    return np.bincount(idx.ravel(), rt.ravel(), L * G + 1)[: L * G].reshape(L, G).astype(np.int64)


def _split_exact(W, log2phy, rgpu, valid, S, G):
    """Optimal integer split by Hall's condition over all 2^G GPU sets (see the module docstring)."""
    L, E, Rm = rgpu.shape
    nX = 1 << G
    X = np.arange(nX, dtype=np.int64)
    bit = _gpu_bits(log2phy, S)  # [L, E, R]
    mask = np.bitwise_or.reduce(bit, axis=2)
    f = _set_loads(mask, W, G)
    size = _popcount_table(G)
    size_safe = np.where(size > 0, size, 1)
    best = np.where(size > 0, (f + size_safe - 1) // size_safe, 0).max(1)  # [L] integer optimum
    slack = best[:, None] * size - f  # >= 0 for every X; slack[:, 0] = 0

    # rest[l, e, r]: GPU set of replicas r+1.. of expert e (suffix OR)
    rest = np.zeros_like(bit)
    acc = np.zeros((L, E), dtype=np.int64)
    for j in range(Rm - 1, -1, -1):
        rest[:, :, j] = acc
        acc = acc | bit[:, :, j]
    # a replica needs a decision if its expert is replicated, it is not the last one, and its GPU does not
    # come again later (a later duplicate on the same GPU takes the GPU's share; this one keeps 0 for now)
    decide = valid & (rest != 0) & ((rest & bit) == 0)
    dflat = decide.reshape(L, E * Rm)
    n_dec = dflat.sum(1)
    order = np.argsort(~dflat, axis=1, kind="stable")  # decided replicas first, in (expert, rank) order
    x_all = np.zeros((L, E * Rm), dtype=np.int64)
    W_rem = W.copy()
    rows = np.arange(L)
    n_steps = int(n_dec.max(initial=0))
    bit_flat = bit.reshape(L, E * Rm)
    rest_flat = rest.reshape(L, E * Rm)
    # the GPU-set masks of a step depend on the plan only, not on what earlier steps decided: they are built
    # for a block of steps at once (blocks of ~2M sets bound the memory), the loop only reads them
    block = max(1, (1 << 21) // max(1, L * nX))
    for k in range(n_steps):
        if k % block == 0:
            qs = order[:, k: min(k + block, n_steps)]
            gbs = np.take_along_axis(bit_flat, qs, 1)[:, :, None]
            rss = np.take_along_axis(rest_flat, qs, 1)
            n_left_b = 1 + size[rss]  # replicas from this one on, one per GPU
            rss = rss[:, :, None]
            in_g_b = (X & gbs) != 0
            in_rest_b = (X & rss) == rss
            only_rest_b = in_rest_b & ~in_g_b  # the sets that must hold what this replica leaves to the later ones
            only_g_b = in_g_b & ~in_rest_b  # the sets that must hold what this replica takes
        act = n_dec > k
        q = order[:, k]
        e = q // Rm
        w = W_rem[rows, e]
        only_rest = only_rest_b[:, k % block]
        only_g = only_g_b[:, k % block]
        lo_min = np.where(only_rest, slack, _BIG).min(1)
        hi_min = np.where(only_g, slack, _BIG).min(1)
        lo = np.maximum(w - lo_min, 0)
        hi = np.minimum(hi_min, w)
        # an even share of what is left, clipped into the feasible interval
        n_left = n_left_b[:, k % block]
        x = np.clip((w + n_left - 1) // n_left, lo, hi)
        x = np.where(act, x, 0)
        w_new = w - x
        # W(X) gains the expert's w on the sets that hold its whole GPU set (g and the rest), loses what the
        # rest still carries (w_new) on the sets holding the rest, and x on those holding g: on the sets with
        # both that is w - w_new - x = 0, so only the sets with one side change (x = 0 on inactive layers)
        slack = slack - (only_rest * np.where(act, w_new, 0)[:, None] + only_g * x[:, None])
        W_rem[rows[act], e[act]] = w_new[act]
        x_all[rows[act], q[act]] = x[act]
    x_all = x_all.reshape(L, E, Rm)
    # the last replica of each expert on each GPU takes what is left (W_rem); earlier duplicates keep 0
    last = valid & ((rest & bit) == 0) & ~decide
    out = np.where(last, W_rem[:, :, None], x_all)
    dup = valid & ((rest & bit) != 0)
    return _spread_duplicates(out, rgpu, valid, dup)


def _spread_duplicates(out, rgpu, valid, dup):
    """Replicas of one expert on one GPU share that GPU's part evenly (larger chunks first); the GPU load
    is unchanged. Rare (only when no other GPU had room), so a per-expert loop is fine."""
    if not dup.any():
        return out
    o = out.copy()
    for l, e in zip(*np.nonzero(dup.any(2))):
        g, v = rgpu[l, e], valid[l, e]
        for gpu in np.unique(g[v]):
            idx = np.nonzero(v & (g == gpu))[0]
            tot = o[l, e, idx].sum()
            k = idx.size
            o[l, e, idx] = tot // k + (np.arange(k) < tot % k)
    return o


def _first_on_gpu(rgpu: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """bool [..., R]: the first valid replica of each expert on each of its GPUs (the others are duplicates).
    One stable sort per row: O(R log R), not O(R^2)."""
    key = np.where(valid, rgpu, np.iinfo(np.int64).max)
    order = np.argsort(key, axis=-1, kind="stable")
    ks = np.take_along_axis(key, order, -1)
    first_sorted = np.ones(ks.shape, dtype=bool)
    first_sorted[..., 1:] = ks[..., 1:] != ks[..., :-1]
    out = np.empty_like(first_sorted)
    np.put_along_axis(out, order, first_sorted, -1)
    return out & valid


def _split_waterfill(W, rgpu, valid, logcnt, G, even):
    """Greedy water-filling for many GPUs: replicated experts, largest first, pour their pairs onto their
    GPUs' lowest levels given everything else assigned so far; two sweeps; per layer never worse than even.
    The GPU loads are kept up to date incrementally (subtract an expert's pour, pour again, add it back), so
    a step costs O(its replicas + G) per layer: near-linear in the replicas."""
    L, E, Rm = rgpu.shape
    rows = np.arange(L)
    replicated = logcnt > 1
    fixed = np.where(replicated[:, :, None], 0, even)
    x = np.zeros((L, E, Rm), dtype=np.int64)
    load = _layer_gpu_loads(fixed, rgpu, valid, G).reshape(-1)  # flat [L * G]
    first = _first_on_gpu(rgpu, valid)  # duplicates of e on one GPU: only the first takes water
    order = np.argsort(np.where(replicated, -W, 1), axis=1, kind="stable")  # replicated experts, descending load
    n_rep = replicated.sum(1)
    n_steps = int(n_rep.max(initial=0))
    flat = rows[:, None] * G  # [L, 1]
    for _sweep in range(2):
        for k in range(n_steps):
            act = np.flatnonzero(n_rep > k)
            e = order[act, k]
            g = rgpu[act, e]  # [A, R]
            f = first[act, e]
            idx = flat[act] + g
            cur = x[act, e]
            np.subtract.at(load, idx[f], cur[f])  # the loads without expert e
            lv = np.where(f, load[idx], _BIG)
            pour = _waterfill(lv, W[act, e])
            x[act, e] = pour
            np.add.at(load, idx[f], pour[f])
    out = fixed + x
    worse = _layer_gpu_loads(out, rgpu, valid, G).max(1) > _layer_gpu_loads(even, rgpu, valid, G).max(1)
    return np.where(worse[:, None, None], even, out)


def _waterfill(levels, w):
    """Integer pour of w [A] units onto columns with levels [A, R] (_BIG = closed): raise the lowest ones to a
    common level; the remainder goes one unit each to the lowest columns (ties: lower column first)."""
    A, R = levels.shape
    order = np.argsort(levels, axis=1, kind="stable")
    lv = np.take_along_axis(levels, order, 1)
    open_ = lv < _BIG
    csum = np.cumsum(np.where(open_, lv, 0), 1)
    k = np.arange(1, R + 1)[None, :]
    # columns 0..j can all be raised to lv[j] at cost (j+1) lv[j] - csum[j]; closed columns never qualify
    need = np.where(open_, k * np.where(open_, lv, 0) - csum, _BIG)
    m = (open_ & (need <= w[:, None])).sum(1)  # columns that end up wet (>= 1: column 0 is open, need 0)
    m_safe = np.maximum(m, 1)
    tot = w + np.take_along_axis(csum, (m_safe - 1)[:, None], 1)[:, 0]
    level = tot // m_safe
    extra = tot - level * m_safe
    idx = np.arange(R)[None, :]
    pour_sorted = np.where((idx < m[:, None]) & open_, level[:, None] - np.where(open_, lv, 0)
                           + (idx < extra[:, None]), 0)
    out = np.empty_like(pour_sorted)
    np.put_along_axis(out, order, pour_sorted, 1)
    return out
