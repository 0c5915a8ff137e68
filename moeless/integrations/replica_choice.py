"""numpy models of how each engine picks the replica that serves a (token, k) pair, from its released code.

Each function reproduces one engine code path on numpy arrays (tests/test_integrations_engines.py checks
every one against the engine's own code on CPU tensors), so that the balance a user would get from an
integration can be measured on real routing without a GPU (bench/engines_balance.py).

    vllm_hash_choice      vllm 0.33.0 model_executor/layers/fused_moe/router/base_router.py
                          (_eplb_map_and_record_i32_kernel): replica = ((t * 2654435769) & 0xFFFFFFFF) %
                          replica_count[e], t = the token's row in the rank's batch, the same for its K pairs
    sglang_dynamic_choice sglang 0.5.23 srt/eplb/expert_location_dispatch.py, "dynamic" without an a2a backend
                          (rank_invariant): replica = t % num_valid[e], t = the token's row
    sglang_static_table   sglang 0.5.23 srt/eplb/expert_location.py compute_logical_to_rank_dispatch_physical_map:
                          per source rank one replica per expert: one on the rank's GPU, else one on its node
                          when that narrows the choice, else a seeded fair random pick (random.Random(42))
    sglang_lp_probabilities  sglang 0.5.23 srt/eplb/lplb_solver.py LPLBSolver (+ the prep, 5-iteration interior
                          point and post kernels of sglang/kernels/jit/csrc/lplb, as their documented torch
                          equivalents in sglang/test/kernels/lplb.py): the batch's LP -> log2phy_prob [E, X]
    sample_replicas       sglang 0.5.23 dispatch_probability: inverse-CDF sampling of a replica per pair

Conventions: log2phy [E, X] of one layer (-1 pad), logcnt [E], slot p on GPU p // slots_per_gpu.
What it must never do: import an engine or torch (pure numpy), or change which expert a pair goes to.
"""
from __future__ import annotations

import random

import numpy as np

__all__ = [
    "KNUTH_MULTIPLIER",
    "gpu_pairs",
    "sample_replicas",
    "sglang_dynamic_choice",
    "sglang_lp_probabilities",
    "sglang_static_table",
    "vllm_hash_choice",
]

KNUTH_MULTIPLIER = 2654435769  # vLLM's floor(2^32 / phi)


def _ids(topk_ids) -> np.ndarray:
    ids = np.asarray(topk_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"topk_ids must be int [N, K], got {ids.dtype} {ids.shape}")
    return ids.astype(np.int64)


def vllm_hash_choice(topk_ids, log2phy, logcnt) -> np.ndarray:
    """Physical slot [N, K] of each pair under vLLM's hash split; row t of topk_ids is the rank's token t."""
    ids = _ids(topk_ids)
    t = np.arange(ids.shape[0], dtype=np.int64)
    hashed = (t * KNUTH_MULTIPLIER) & 0xFFFFFFFF
    replica = hashed[:, None] % np.maximum(np.asarray(logcnt, dtype=np.int64)[ids], 1)
    return np.asarray(log2phy, dtype=np.int64)[ids, replica]


def sglang_dynamic_choice(topk_ids, log2phy, logcnt) -> np.ndarray:
    """Physical slot [N, K] of each pair under SGLang's rank-invariant "dynamic" pick (token row mod replicas)."""
    ids = _ids(topk_ids)
    t = np.arange(ids.shape[0], dtype=np.int64)
    replica = t[:, None] % np.maximum(np.asarray(logcnt, dtype=np.int64)[ids], 1)
    return np.asarray(log2phy, dtype=np.int64)[ids, replica]


def _nearest(candidates: list[int], rank: int, slots_per_gpu: int, gpus_per_node: int | None) -> int:
    if len(candidates) == 1:
        return candidates[0]
    same_gpu = [p for p in candidates if p // slots_per_gpu == rank]
    if same_gpu:
        return same_gpu[0]
    if gpus_per_node is not None:
        node = rank // gpus_per_node
        same_node = [p for p in candidates if p // (slots_per_gpu * gpus_per_node) == node]
        if 0 < len(same_node) < len(candidates):
            return same_node[0]
    return -1


def sglang_static_table(log2phy, ep_size: int, num_physical: int, *, nnodes: int = 1, seed: int = 42) -> np.ndarray:
    """SGLang's static dispatch tables int64 [ep_size, L, E]: the slot that source rank r sends expert e's
    pairs to, for log2phy [L, E, X] (all layers: the seeded draws run layer by layer, expert by expert)."""
    l2p = np.asarray(log2phy, dtype=np.int64)
    if l2p.ndim != 3:
        raise ValueError(f"log2phy must be [L, E, X], got shape {l2p.shape}")
    if num_physical % ep_size:
        raise ValueError(f"num_physical={num_physical} must be a multiple of ep_size={ep_size}")
    S = num_physical // ep_size
    gpus_per_node = ep_size // nnodes
    r = random.Random(seed)
    L, E, _ = l2p.shape
    out = np.full((ep_size, L, E), -1, dtype=np.int64)
    for layer in range(L):
        for e in range(E):
            cands = [int(p) for p in l2p[layer, e] if p != -1]
            remaining = []
            for rank in range(ep_size):
                v = _nearest(cands, rank, S, gpus_per_node)
                out[rank, layer, e] = v
                if v == -1:
                    remaining.append(rank)
            if remaining:  # SGLang's _fair_choices
                q, rem = divmod(len(remaining), len(cands))
                picks = cands * q + r.sample(cands, k=rem)
                r.shuffle(picks)
                out[remaining, layer, e] = picks
    return out


def sglang_lp_probabilities(counts, phy2log, log2phy, num_gpus: int, *, num_iters: int = 5) -> np.ndarray:
    """SGLang's LP dispatch probabilities float32 [T, E, X] for the global counts [T, E] of T batches on one
    layer (phy2log [P], log2phy [E, X]); a batch whose interior point does not converge gets 0.5 for every
    replicated slot, as SGLang's kernel writes."""
    c = np.asarray(counts, dtype=np.float32)
    if c.ndim == 1:
        c = c[None]
    p2l = np.asarray(phy2log, dtype=np.int64)
    l2p = np.asarray(log2phy, dtype=np.int64)
    E, P, G = l2p.shape[0], p2l.shape[0], int(num_gpus)
    if c.shape[1] != E or P % G:
        raise ValueError(f"counts must be [T, E={E}] and the {P} slots a multiple of num_gpus={G}")
    S = P // G
    logcnt = np.bincount(p2l, minlength=E)
    log_single = np.flatnonzero(logcnt == 1)
    phy_single = l2p[log_single, 0]
    log_rep = np.flatnonzero(logcnt > 1)
    phy_rep = np.flatnonzero(logcnt[p2l] > 1)
    B = np.zeros((G, P), dtype=np.float32)
    B[np.arange(P) // S, np.arange(P)] = 1.0
    B1, B2 = B[:, phy_single], B[:, phy_rep]
    C = (p2l[phy_rep][None, :] == log_rep[:, None]).astype(np.float32)
    nr = log_rep.size
    A_base = np.block([[C, np.zeros((nr, G), np.float32), np.zeros((nr, 1), np.float32)],
                       [B2, np.eye(G, dtype=np.float32), -np.ones((G, 1), np.float32)]])
    nc, nv = A_base.shape[0], A_base.shape[1] + 1
    cost = np.zeros(nv, dtype=np.float32)
    cost[-2], cost[-1] = 1.0, 1000.0
    # prep (lp_prep.cuh)
    norm = c / np.maximum(c.sum(1, keepdims=True), 1.0)
    t1 = norm[:, log_single]
    b = np.concatenate([norm[:, log_rep], -(t1 @ B1.T)], axis=1)  # [T, NC]
    A = np.broadcast_to(A_base, (c.shape[0],) + A_base.shape)
    A = np.concatenate([A, (b - A_base.sum(1))[:, :, None]], axis=2).astype(np.float32)  # [T, NC, NV]
    # the interior point, as the kernel runs it (ipm.cuh: float32, Cholesky with pivots clamped at 1e-12,
    # d_max = max(0, max d)); solve_ipm_torch_reference mirrors it with an LU solve instead
    x = np.ones((c.shape[0], nv), dtype=np.float32)
    d_max = np.zeros(c.shape[0], dtype=np.float32)
    for _ in range(num_iters):
        ax2 = A * (x * x)[:, None, :]
        delta = _cholesky_solve(ax2 @ np.swapaxes(A, 1, 2), ax2 @ cost)
        r = np.einsum("tcv,tc->tv", A, delta)
        d = x * (cost - r)
        d_max = np.maximum(d.max(1), 0.0)
        alpha = np.where(d_max > 1e-9, np.float32(0.999) / np.where(d_max > 1e-9, d_max, 1.0), 1.0).astype(np.float32)
        x = (x * (1.0 - alpha[:, None] * d)).astype(np.float32)
    residual = np.abs(np.einsum("tcv,tv->tc", A, x) - b).max(1)
    ok = (d_max < 0.1) & (x[:, -1] >= 0) & (x[:, -1] < 1e-4) & (residual < 0.05)
    x = np.where(ok[:, None], x, np.float32(0.5))
    # post (lp_post.cuh): per-slot shares of the batch, gathered into the [E, X] layout (-1 -> 0)
    phy_prob = np.zeros((c.shape[0], P + 1), dtype=np.float32)
    phy_prob[:, phy_rep] = np.maximum(x[:, : phy_rep.size], 0.0)
    phy_prob[:, phy_single] = t1
    return phy_prob[:, np.where(l2p >= 0, l2p, P)]


def _cholesky_solve(a, b):
    """Solve a x = b for a batch of symmetric [T, N, N] systems as SGLang's kernel does (in-place Cholesky
    with each pivot clamped to >= 1e-12 before its square root, then forward and back substitution)."""
    a = np.array(a, dtype=np.float32)
    x = np.array(b, dtype=np.float32)
    n = a.shape[1]
    for k in range(n):
        a[:, k, k] = np.sqrt(np.maximum(a[:, k, k], np.float32(1e-12)))
        a[:, k + 1:, k] /= a[:, k, k][:, None]
        col = a[:, k + 1:, k]
        a[:, k + 1:, k + 1:] -= col[:, :, None] * col[:, None, :]
    for i in range(n):
        x[:, i] = (x[:, i] - np.einsum("tj,tj->t", a[:, i, :i], x[:, :i])) / a[:, i, i]
    for i in range(n - 1, -1, -1):
        x[:, i] = (x[:, i] - np.einsum("tj,tj->t", a[:, i + 1:, i], x[:, i + 1:])) / a[:, i, i]
    return x


def sample_replicas(topk_ids, log2phy_prob, log2phy, u) -> np.ndarray:
    """Physical slot [N, K] of each pair sampled as SGLang's dispatch_probability kernel does: uniform u [N*K]
    in [0, 1), the smallest column whose cumulative probability exceeds u x the row sum (uniform over the
    valid replicas when the row is all zero)."""
    ids = _ids(topk_ids)
    flat = ids.reshape(-1)
    prob = np.asarray(log2phy_prob, dtype=np.float32)[flat]
    maps = np.asarray(log2phy, dtype=np.int64)[flat]
    row = prob.sum(1, keepdims=True)
    prob = np.where(row > 0, prob, (maps >= 0).astype(np.float32))
    row = prob.sum(1)
    cum = np.cumsum(prob, axis=1)
    uu = np.asarray(u, dtype=np.float32).reshape(-1)
    if uu.shape != flat.shape:
        raise ValueError(f"u must hold one uniform per pair ({flat.size}), got {uu.size}")
    chosen = np.minimum((cum <= (uu * row)[:, None]).sum(1), prob.shape[1] - 1)
    return maps[np.arange(flat.size), chosen].reshape(ids.shape)


def gpu_pairs(slots, slots_per_gpu: int, gpus: int) -> np.ndarray:
    """Pairs served per GPU [G] for the physical slots of a batch's pairs (any shape; -1 ignored)."""
    s = np.asarray(slots, dtype=np.int64).reshape(-1)
    s = s[s >= 0]
    return np.bincount(s // slots_per_gpu, minlength=gpus)[:gpus]
