"""Baseline policies, expressed through the planner's `Plan`: static EP (Megatron-LM), EPLB, and the lossy oracle.

- `static_plan`: Megatron-LM expert parallelism: E / G experts per GPU, in order, no replicas.
- EPLB (DeepSeek's expert-parallel load balancer, our own code after its published algorithm):
  `replicate_experts` (each redundant slot to the expert with the largest load per replica),
  `balanced_packing` (items onto packs with an equal number of items each, heaviest first onto the lightest
  pack with room), `rebalance_experts` (hierarchical: expert groups to nodes, replicas within nodes, replicas
  to GPUs; global: one node of all GPUs). The policy that runs it at a deployment's cadence is
  `moeless.policy.EPLBPolicy`.
- `oracle_reroute`: lossy, perfectly balanced capacity-aware inference: an expert keeps at most
  ceil(total / E) pairs, the rest are rerouted to the least-loaded experts. It changes routing (outputs
  differ), so it is an upper bound on balance, not a lossless policy.

What it must never do: import torch or kernels, or read a clock.
"""
from __future__ import annotations

import numpy as np

from moeless.planner import Plan, _check_loads, _positive_int, replicate_minmax

__all__ = ["balanced_packing", "oracle_reroute", "rebalance_experts", "replicate_experts", "static_plan"]


def static_plan(num_layers: int, num_experts: int, gpus: int, slots_per_gpu: int) -> Plan:
    """Megatron-LM EP: expert e on GPU e // (E / G), in slot e % (E / G) of that GPU; no replicas."""
    L = _positive_int("num_layers", num_layers)
    E = _positive_int("num_experts", num_experts)
    G = _positive_int("gpus", gpus)
    S = _positive_int("slots_per_gpu", slots_per_gpu)
    if E % G:
        raise ValueError(f"num_experts={E} must be divisible by gpus={G} for static expert parallelism")
    per = E // G
    if per > S:
        raise ValueError(f"slots_per_gpu={S} cannot hold the {per} experts per GPU of static EP")
    e = np.arange(E)
    p2l = np.full(G * S, -1, dtype=np.int64)
    p2l[(e // per) * S + e % per] = e
    return Plan.from_phy2log(np.tile(p2l, (L, 1)), E, G, S)


def replicate_experts(loads, num_physical: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EPLB's replication: `num_physical` replicas per row, each redundant one to the expert with the largest
    load per replica (ties: the lower expert id). Returns phy2log [X, num_physical] (experts 0..E-1 first,
    then the redundant ones in the order the greedy adds them), rank [X, num_physical] (replica rank of each)
    and logcnt [X, E].

    The replica counts are the planner's `replicate_minmax` (the one greedy replication of the project); the
    order follows from them: the greedy adds the increments W_e / k (k = 1 .. logcnt_e - 1) in descending
    order, ties to the lower expert id, so a stable sort of the taken increments replays it."""
    W = _check_loads(loads)
    X, E = W.shape
    num_physical = _positive_int("num_physical", num_physical)
    if num_physical < E:
        raise ValueError(f"num_physical={num_physical} must be >= the number of experts {E}")
    logcnt = replicate_minmax(W, num_physical)
    K = int(logcnt.max(initial=1)) - 1
    phy2log = np.tile(np.arange(num_physical, dtype=np.int64), (X, 1))
    rank = np.zeros((X, num_physical), dtype=np.int64)
    if K > 0:
        k = np.arange(1, K + 1)
        taken = k[None, None, :] < logcnt[:, :, None]  # [X, E, K]: increment k of expert e was taken
        inc = np.where(taken, W[:, :, None] / k, -np.inf).reshape(X, E * K)
        order = np.argsort(-inc, axis=1, kind="stable")[:, : num_physical - E]  # (value desc, expert, k)
        phy2log[:, E:] = order // K
        rank[:, E:] = order % K + 1
    return phy2log, rank, logcnt


def balanced_packing(weights, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack the n items of each row onto `num_packs` packs of exactly n / num_packs items: heaviest first,
    onto the lightest pack that still has room (ties: lower pack). Returns pack_index and rank_in_pack [X, n]."""
    W = _check_loads(weights, "weights")
    X, n = W.shape
    m = _positive_int("num_packs", num_packs)
    if n % m:
        raise ValueError(f"the {n} items per row must be divisible by num_packs={m}")
    per = n // m
    rows = np.arange(X)
    if per == 1:
        return np.tile(np.arange(n, dtype=np.int64), (X, 1)), np.zeros((X, n), dtype=np.int64)
    order = np.argsort(-W, axis=1, kind="stable")
    pack_w = np.zeros((X, m))
    pack_n = np.zeros((X, m), dtype=np.int64)
    pack_index = np.full((X, n), -1, dtype=np.int64)
    rank_in_pack = np.full((X, n), -1, dtype=np.int64)
    for i in range(n):
        item = order[:, i]
        p = np.where(pack_n < per, pack_w, np.inf).argmin(1)
        pack_index[rows, item] = p
        rank_in_pack[rows, item] = pack_n[rows, p]
        pack_w[rows, p] += W[rows, item]
        pack_n[rows, p] += 1
    return pack_index, rank_in_pack


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.arange(perm.shape[1])[None, :].repeat(perm.shape[0], 0), axis=1)
    return inv


def rebalance_experts(loads, num_physical: int, gpus: int, *, num_groups: int = 1, num_nodes: int = 1) -> Plan:
    """EPLB's rebalance: hierarchical when `num_groups` % `num_nodes` == 0 (expert groups packed onto nodes,
    replicas made within each node, then packed onto the node's GPUs), global otherwise (one node, one
    group). `num_physical` slots per layer, num_physical / gpus per GPU, all filled."""
    W = _check_loads(loads)
    L, E = W.shape
    P = _positive_int("num_physical", num_physical)
    G = _positive_int("gpus", gpus)
    groups = _positive_int("num_groups", num_groups)
    nodes = _positive_int("num_nodes", num_nodes)
    if P % G:
        raise ValueError(f"num_physical={P} must be divisible by gpus={G}")
    if P < E:
        raise ValueError(f"num_physical={P} must be >= the number of experts {E}")
    if groups % nodes:
        groups, nodes = 1, 1  # global policy
    if E % groups:
        raise ValueError(f"num_experts={E} must be divisible by num_groups={groups}")
    if G % nodes or P % nodes:
        raise ValueError(f"gpus={G} and num_physical={P} must be divisible by num_nodes={nodes}")
    gsize = E // groups
    per_node_log = E // nodes
    per_node_phy = P // nodes
    per_gpu = P // G

    # 1. groups -> nodes; mlog = logical experts renumbered node by node
    group_w = W.reshape(L, groups, gsize).sum(2)
    gpack, grank = balanced_packing(group_w, nodes)
    log2mlog = (((gpack * (groups // nodes) + grank) * gsize)[:, :, None] + np.arange(gsize)).reshape(L, E)
    mlog2log = _inverse(log2mlog)
    # 2. replicas within each node
    mlog_w = np.take_along_axis(W, mlog2log, 1).reshape(L * nodes, per_node_log)
    phy2mlog, _, mlogcnt = replicate_experts(mlog_w, per_node_phy)
    # 3. replicas -> the node's GPUs
    phy_w = np.take_along_axis(mlog_w / mlogcnt, phy2mlog, 1)
    pack, rank = balanced_packing(phy_w, G // nodes)
    phy2pphy = pack * per_gpu + rank
    pphy2phy = _inverse(phy2pphy)
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, 1)
    pphy2mlog = (pphy2mlog.reshape(L, nodes, -1) + (np.arange(nodes) * per_node_log)[None, :, None]).reshape(L, P)
    pphy2log = np.take_along_axis(mlog2log, pphy2mlog, 1)
    return Plan.from_phy2log(pphy2log, E, G, per_gpu)


def oracle_reroute(loads) -> tuple[np.ndarray, np.ndarray]:
    """Lossy capacity-aware balancing: each expert keeps at most ceil(total / E) pairs; the overflow goes to
    the least-loaded experts (water-filling; ties to the lower expert id). Returns (rerouted loads int64
    [L, E], pairs that changed expert int64 [L]). Per-layer totals are preserved."""
    W = _check_loads(loads, integral=True).astype(np.int64)
    L, E = W.shape
    total = W.sum(1)
    cap = -(-total // E)
    kept = np.minimum(W, cap[:, None])
    overflow = total - kept.sum(1)
    order = np.argsort(kept, axis=1, kind="stable")
    v = np.take_along_axis(kept, order, 1)
    csum = np.cumsum(v, 1)
    k = np.arange(1, E + 1)
    # the k lowest experts can all be raised to v[k-1] at cost k * v[k-1] - csum[k-1]
    m = ((k * v - csum) <= overflow[:, None]).sum(1)
    tot = overflow + csum[np.arange(L), m - 1]
    level = tot // m
    extra = tot - level * m
    idx = np.arange(E)[None, :]
    new_sorted = np.where(idx < m[:, None], level[:, None] + (idx < extra[:, None]), v)
    out = np.empty_like(W)
    np.put_along_axis(out, order, new_sorted, axis=1)
    return out, overflow
