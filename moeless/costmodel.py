"""Time and cost of one MoE layer of one iteration, given where each replica sits and how many tokens it serves.

Input layout (any leading dims `...`, usually [L] or [n, L]): `replica_tokens [..., E, R]` ((token, expert)
pairs each replica of expert e serves) and `replica_gpu [..., E, R]` (the GPU holding it, -1 = no replica).
The same layout per slot (`slot_layer_times`: `slot_tokens`, `slot_expert [..., G*S]` as a plan's phy2log)
prices identically (bit for bit for integer pair counts) without the padding of R (hot experts get dozens of
replicas, so most of a [..., E, R] array is padding at DeepSeek-V3 scale): the simulator's hot path uses it.

Two models, one interface (`layer_times` -> `LayerTimes(compute, a2a, misc)`; MoE-layer latency =
compute + 2 * a2a, dispatch and combine costing the same):
- `RooflineCost` (the default): a replica's time is max(FLOPs / peak, (weight bytes + activation bytes) /
  HBM bandwidth) plus a launch floor, so a replica with few tokens pays for reading its weights. Replicas of
  one expert on one GPU share its weights (one read, one launch); replicas on one GPU share that GPU, so a
  GPU's expert time is the sum over its replicas and the layer waits for the slowest GPU. The all-to-all of a
  GPU moves its received pairs' hidden states (tokens start spread evenly over GPUs: non-expert modules are
  data-parallel) over the GPU link inside its link group and over PCIe outside it, the two concurrently.
  `misc` is the layer's non-expert work (attention, router, shared experts) on T / G tokens per GPU.
- `PaperLinearCost`: the paper's Equations 1-3: T_{l,e,r} = alpha * W_{l,e,r}, T_g = beta * (pairs on g),
  layer latency = max_{e,r} T_{l,e,r} + 2 max_g T_g + T_misc, and Equation 2's cost.

This module is pure arithmetic on arrays: it never plans, routes, or keeps state between calls.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeless.specs import HardwareSpec, ModelSpec


@dataclass(frozen=True)
class LayerTimes:
    """Seconds, each of the layout's leading shape: expert compute, one all-to-all direction, non-MoE work."""

    compute: np.ndarray
    a2a: np.ndarray
    misc: np.ndarray

    @property
    def moe_latency(self) -> np.ndarray:
        """The MoE layer's forward time: experts plus dispatch and combine."""
        return self.compute + 2.0 * self.a2a


@dataclass(frozen=True)
class CostProfile:
    """The cost model's arithmetic as scalars, for the policy's compiled loops (moeless.policy) on G GPUs.

    An instance (an expert's replicas on one GPU, merged) serving n > 0 pairs takes
    max(n * flop_s, read_s + n * act_s) + launch_s seconds (0 for n = 0); a GPU's expert time is the sum over
    its instances (`per_gpu_sum`) or, in the paper's model, the layer's is the max over replicas; one
    all-to-all direction takes a2a_s * max over GPUs of (pairs received, or total / G when `a2a_floor`: a
    GPU sends its own tokens' pairs). MoE-layer time = expert time + 2 * all-to-all. (The non-expert time
    and the copies' seconds stay with the model: `misc_time`, `cold_start_s`.)"""

    flop_s: float
    read_s: float
    act_s: float
    launch_s: float
    a2a_s: float
    a2a_floor: bool
    per_gpu_sum: bool

    def as_array(self) -> np.ndarray:
        """float64 [7] in the order the compiled loops read them."""
        return np.array([self.flop_s, self.read_s, self.act_s, self.launch_s, self.a2a_s,
                         float(self.a2a_floor), float(self.per_gpu_sum)], dtype=np.float64)


def _check_layout(replica_tokens, replica_gpu, num_gpus):
    tokens = np.asarray(replica_tokens, dtype=np.float64)
    gpu = np.asarray(replica_gpu)
    if tokens.shape != gpu.shape or tokens.ndim < 2:
        raise ValueError(f"replica_tokens {tokens.shape} and replica_gpu {gpu.shape} must be one shape [..., E, R]")
    if not isinstance(num_gpus, (int, np.integer)) or num_gpus < 1:
        raise ValueError(f"num_gpus must be an integer >= 1, got {num_gpus!r}")
    if gpu.size and (gpu.max() >= num_gpus or gpu.min() < -1):
        raise ValueError(f"replica_gpu must lie in [-1, {num_gpus}), got [{gpu.min()}, {gpu.max()}]")
    if tokens.size and tokens.min() < 0:
        raise ValueError("replica_tokens must be >= 0")
    if ((gpu < 0) & (tokens != 0)).any():
        raise ValueError("replica_tokens must be 0 where replica_gpu is -1 (tokens sent to no replica)")
    return tokens, gpu.astype(np.int64, copy=False)


def _replicas(tokens: np.ndarray, gpu: np.ndarray, num_gpus: int):
    """The live replicas of a checked layout, without its padding (hot experts have many replicas, so most of
    a padded [..., E, R] layout is -1): (row index [N] into the G-wide per-GPU rows (m * G + g), expert-GPU
    group key [N] (ascending within each expert's replicas when its GPUs are, as in a plan's log2phy), pairs
    [N]) in the layout's flattened (m, e, r) order, m the flattened leading index."""
    E, R = tokens.shape[-2:]
    flat_g = gpu.reshape(-1)
    live = np.flatnonzero(flat_g >= 0)
    g = flat_g[live]
    me = live // R  # m * E + e
    row = (me // E) * num_gpus + g
    key = me * num_gpus + g
    return row, key, tokens.reshape(-1)[live]


def _merged_groups(row, key, pairs):
    """Replicas of one expert on one GPU merged (they share one weight copy): (row [K], pairs [K]) of each
    (expert, GPU) group, groups in ascending (m, e, g) order, so a bincount over rows adds each GPU's groups in
    ascending expert order (the order the padded formulation added them in: same floating-point sums)."""
    if key.size > 1 and (key[1:] < key[:-1]).any():  # not the plan order: sort (stable: keeps replica order)
        order = np.argsort(key, kind="stable")
        row, key, pairs = row[order], key[order], pairs[order]
    if key.size == 0:
        return row, pairs
    start = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    if start.size == key.size:  # no expert has two replicas on one GPU
        return row, pairs
    # the sum of a run as a difference of running sums, as before (exact for integer pair counts)
    csum = np.cumsum(pairs)
    end = np.r_[start[1:], key.size] - 1
    before = np.where(start > 0, csum[np.maximum(start - 1, 0)], 0.0)
    return row[start], csum[end] - before


def tokens_per_expert_gpu(replica_tokens, replica_gpu, num_gpus: int) -> np.ndarray:
    """Pairs each GPU serves for each expert: [..., E, G] (replicas of one expert on one GPU merged)."""
    tokens, gpu = _check_layout(replica_tokens, replica_gpu, num_gpus)
    lead, (E, R) = tokens.shape[:-2], tokens.shape[-2:]
    M = int(np.prod(lead, dtype=np.int64))
    t, g = tokens.reshape(M, E, R), gpu.reshape(M, E, R)
    valid = g >= 0
    row = (np.arange(M)[:, None, None] * E + np.arange(E)[None, :, None]) * num_gpus
    idx = (row + g)[valid]
    out = np.bincount(idx, weights=t[valid], minlength=M * E * num_gpus)
    return out.reshape(*lead, E, num_gpus)


def _merge_sorted(t: np.ndarray, g: np.ndarray):
    """Replicas of each expert sorted by GPU, and each run of one GPU summed into its first element:
    (merged pairs [..., E, R], their GPUs [..., E, R], the sort order). O(R log R) per expert."""
    order = np.argsort(g, axis=-1, kind="stable")
    gs = np.take_along_axis(g, order, -1)
    ts = np.take_along_axis(t, order, -1)
    R = t.shape[-1]
    start = np.ones(gs.shape, dtype=bool)
    start[..., 1:] = gs[..., 1:] != gs[..., :-1]
    end = np.ones(gs.shape, dtype=bool)
    end[..., :-1] = start[..., 1:]
    csum = np.cumsum(ts, -1)
    # index of the end of the run each position belongs to: the next end at or after it
    pos = np.where(end, np.arange(R), R - 1)
    next_end = np.flip(np.minimum.accumulate(np.flip(pos, -1), -1), -1)
    before = np.concatenate([np.zeros(csum.shape[:-1] + (1,)), csum[..., :-1]], -1)
    run = np.take_along_axis(csum, next_end, -1) - before
    merged = np.where(start & (gs >= 0), run, 0.0)
    return merged, gs, order


def merged_replicas(replica_tokens, replica_gpu) -> np.ndarray:
    """Replicas of one expert on one GPU merged into the first of them (they share one weight copy):
    [..., E, R] pairs, the later duplicates 0."""
    t, g = np.asarray(replica_tokens, dtype=np.float64), np.asarray(replica_gpu)
    if t.shape[-1] == 1:
        return t
    merged, _, order = _merge_sorted(t, g)
    out = np.empty_like(merged)
    np.put_along_axis(out, order, merged, -1)
    return out


def per_gpu_sum(values, replica_gpu, num_gpus: int) -> np.ndarray:
    """Sum `values [..., E, R]` over the replicas on each GPU: [..., G]."""
    v, g = np.asarray(values, dtype=np.float64), np.asarray(replica_gpu, dtype=np.int64)
    lead = v.shape[:-2]
    M = int(np.prod(lead, dtype=np.int64))
    v, g = v.reshape(M, -1), g.reshape(M, -1)
    valid = g >= 0
    idx = (np.arange(M)[:, None] * num_gpus + g)[valid]
    return np.bincount(idx, weights=v[valid], minlength=M * num_gpus).reshape(*lead, num_gpus)


def _slot_rows(slot_tokens, slot_expert, num_gpus):
    """A plan-shaped layout `slot_tokens [..., G*S]` (pairs each slot serves) with `slot_expert [..., G*S]`
    (its expert, -1 = free slot; slot p on GPU p // S), checked and cut into per-GPU rows [M * G, S] whose
    slots are sorted by expert (stable) and whose replicas of one expert are merged into the first of them:
    (merged pairs, pairs in that order, M). No padding: a slot layout is as wide as the GPUs' slots, where a
    [..., E, R] one is E times as wide as the hottest expert's replica count."""
    tokens = np.asarray(slot_tokens, dtype=np.float64)
    expert = np.asarray(slot_expert)
    if tokens.shape != expert.shape or tokens.ndim < 1:
        raise ValueError(f"slot_tokens {tokens.shape} and slot_expert {expert.shape} must be one shape [..., G*S]")
    if not isinstance(num_gpus, (int, np.integer)) or num_gpus < 1 or tokens.shape[-1] % num_gpus:
        raise ValueError(f"num_gpus must be an integer >= 1 dividing the {tokens.shape[-1]} slots, got {num_gpus!r}")
    if tokens.size and tokens.min() < 0:
        raise ValueError("slot_tokens must be >= 0")
    if ((expert < 0) & (tokens != 0)).any():
        raise ValueError("slot_tokens must be 0 in free slots (slot_expert -1)")
    M = int(np.prod(tokens.shape[:-1], dtype=np.int64))
    S = tokens.shape[-1] // num_gpus
    t = tokens.reshape(M * num_gpus, S)
    e = np.where(expert < 0, -1, expert).astype(np.int64, copy=False).reshape(M * num_gpus, S)
    # ascending expert inside each GPU (ties in slot order): the order the [..., E, R] formulation adds a
    # GPU's replicas in. One sort of expert * S + slot gives the order and the sorted experts at once.
    key = np.sort(e * S + np.arange(S), axis=-1)
    order, ks = key % S, key // S
    ts = np.take_along_axis(t, order, -1)
    # each run of one expert summed into its first slot, right to left over the (few) slots of a GPU
    merged = np.zeros_like(ts)
    run = np.zeros(len(ts))
    for col in range(S - 1, -1, -1):
        run = ts[:, col] + run
        first = ks[:, col] != ks[:, col - 1] if col else np.ones(len(ts), dtype=bool)
        merged[:, col] = np.where(first & (ks[:, col] >= 0), run, 0.0)
        run = np.where(first, 0.0, run)
    return merged, ts, M


def _row_sum(v: np.ndarray) -> np.ndarray:
    """Sum over the last (short) axis one column at a time, from 0: the same floating-point sums as a
    bincount adding the same values in the same order."""
    acc = np.zeros(v.shape[:-1])
    for s in range(v.shape[-1]):
        acc = acc + v[..., s]
    return acc


class RooflineCost:
    """Roofline expert time, link-bandwidth all-to-all, roofline non-expert work (see the module docstring)."""

    name = "roofline"

    def __init__(self, model: ModelSpec, hardware: HardwareSpec):
        self.model, self.hardware = model, hardware

    def replica_time(self, tokens) -> np.ndarray:
        """Seconds one replica (or the merged replicas of one expert on one GPU) takes for `tokens` pairs;
        0 for no tokens (an empty replica launches nothing)."""
        m, h = self.model, self.hardware
        n = np.asarray(tokens, dtype=np.float64)
        flops = n * m.flops_per_token / h.flops
        memory = (m.expert_bytes + n * m.activation_bytes_per_token) / h.bandwidth
        return np.where(n > 0, np.maximum(flops, memory) + h.launch_s, 0.0)

    def gpu_compute(self, replica_tokens, replica_gpu, num_gpus: int) -> np.ndarray:
        """Each GPU's expert time [..., G]."""
        tokens, gpu = _check_layout(replica_tokens, replica_gpu, num_gpus)
        return self._gpu_compute(tokens, gpu, num_gpus, _replicas(tokens, gpu, num_gpus))

    def _gpu_compute(self, tokens, gpu, num_gpus, replicas) -> np.ndarray:
        lead = tokens.shape[:-2]
        M = int(np.prod(lead, dtype=np.int64))
        row, pairs = _merged_groups(*replicas)
        return np.bincount(row, weights=self.replica_time(pairs), minlength=M * num_gpus).reshape(*lead, num_gpus)

    def a2a_gpu(self, gpu_pairs, num_gpus: int) -> np.ndarray:
        """One all-to-all direction per GPU [..., G] from the pairs each GPU receives `gpu_pairs [..., G]`.
        Tokens start evenly over the G GPUs, so a GPU receives (G-1)/G of its pairs from peers, the share
        (group-1)/(G-1) of those over the link, the rest over PCIe; it sends, on average, as much."""
        m, h = self.model, self.hardware
        G = num_gpus
        if G == 1:
            return np.zeros_like(np.asarray(gpu_pairs, dtype=np.float64))
        pairs = np.asarray(gpu_pairs, dtype=np.float64)
        sent = pairs.sum(-1, keepdims=True) / G  # each GPU's own tokens' pairs
        moved = np.maximum(pairs, sent) * (G - 1) / G * m.token_bytes
        in_group = (min(h.link_group, G) - 1) / (G - 1)
        return np.maximum(moved * in_group / h.link_bandwidth, moved * (1 - in_group) / h.host_bandwidth)

    def misc_time(self, tokens, num_gpus: int) -> np.ndarray:
        """Non-expert work of one layer for an iteration of `tokens` tokens (data-parallel over GPUs)."""
        m, h = self.model, self.hardware
        per_gpu = np.asarray(tokens, dtype=np.float64) / num_gpus
        if m.dense_params_per_layer == 0:
            return np.zeros_like(per_gpu)
        flops = per_gpu * 2.0 * m.dense_params_per_layer / h.flops
        memory = m.dense_params_per_layer * m.bytes_per_param / h.bandwidth
        return np.where(per_gpu > 0, np.maximum(flops, memory) + h.launch_s, 0.0)

    def layer_times(self, replica_tokens, replica_gpu, num_gpus: int, tokens) -> LayerTimes:
        pairs, gpu = _check_layout(replica_tokens, replica_gpu, num_gpus)
        reps = _replicas(pairs, gpu, num_gpus)
        compute = self._gpu_compute(pairs, gpu, num_gpus, reps).max(-1)
        M = int(np.prod(pairs.shape[:-2], dtype=np.int64))
        received = np.bincount(reps[0], weights=reps[2], minlength=M * num_gpus).reshape(*pairs.shape[:-2], num_gpus)
        a2a = self.a2a_gpu(received, num_gpus).max(-1)
        misc = self.misc_time(tokens, num_gpus) + np.zeros_like(compute)
        return LayerTimes(compute=compute, a2a=a2a, misc=misc)

    def slot_layer_times(self, slot_tokens, slot_expert, num_gpus: int, tokens) -> LayerTimes:
        """`layer_times` of a layout given per slot (`slot_tokens`, `slot_expert` [..., G*S], slot p on GPU
        p // S, as a plan's phy2log): the same numbers, without the padding of [..., E, R]."""
        merged, pairs, M = _slot_rows(slot_tokens, slot_expert, num_gpus)
        lead = np.shape(slot_tokens)[:-1]
        compute = _row_sum(self.replica_time(merged)).reshape(*lead, num_gpus).max(-1)
        a2a = self.a2a_gpu(_row_sum(pairs).reshape(*lead, num_gpus), num_gpus).max(-1)
        misc = self.misc_time(tokens, num_gpus) + np.zeros_like(compute)
        return LayerTimes(compute=compute, a2a=a2a, misc=misc)

    def profile(self, num_gpus: int) -> CostProfile:
        """This model as scalars on `num_gpus` GPUs (see CostProfile); the same numbers as layer_times."""
        m, h = self.model, self.hardware
        G = int(num_gpus)
        a2a = 0.0
        if G > 1:
            in_group = (min(h.link_group, G) - 1) / (G - 1)
            a2a = (G - 1) / G * m.token_bytes * max(in_group / h.link_bandwidth, (1 - in_group) / h.host_bandwidth)
        return CostProfile(flop_s=m.flops_per_token / h.flops, read_s=m.expert_bytes / h.bandwidth,
                           act_s=m.activation_bytes_per_token / h.bandwidth, launch_s=h.launch_s, a2a_s=a2a,
                           a2a_floor=True, per_gpu_sum=True)

    def cold_start_s(self, from_peer: bool = False) -> float:
        """Seconds to copy one expert's weights into a GPU slot: from host memory over PCIe, or from a peer
        GPU of the same link group that holds it."""
        bw = self.hardware.link_bandwidth if from_peer else self.hardware.host_bandwidth
        return self.model.expert_bytes / bw

    def describe(self) -> str:
        m, h = self.model, self.hardware
        return (f"roofline: replica = max(pairs * {m.flops_per_token:.3g} FLOP / {h.flops:.3g} FLOP/s, "
                f"({m.expert_bytes:.3g} B + pairs * {m.activation_bytes_per_token:.3g} B) / {h.bandwidth:.3g} B/s)"
                f" + {h.launch_s * 1e6:.1f} us; all-to-all at {h.link_bandwidth:.3g} B/s in groups of "
                f"{h.link_group}, {h.host_bandwidth:.3g} B/s beyond")


class PaperLinearCost:
    """The paper's linear model (Equations 1-3). alpha: seconds per pair of a replica; beta: seconds per pair a
    GPU receives in one all-to-all; t_misc: seconds of non-MoE work per layer; m_misc: bytes that work holds."""

    name = "paper-linear"

    def __init__(self, model: ModelSpec, alpha: float, beta: float, t_misc: float = 0.0, m_misc: float = 0.0):
        if alpha < 0 or beta < 0 or t_misc < 0 or m_misc < 0:
            raise ValueError("alpha, beta, t_misc and m_misc must be >= 0")
        self.model, self.alpha, self.beta, self.t_misc, self.m_misc = model, alpha, beta, t_misc, m_misc

    def replica_time(self, tokens) -> np.ndarray:
        """Equation 1's T_{l,e,r} = alpha * W_{l,e,r}."""
        return self.alpha * np.asarray(tokens, dtype=np.float64)

    def layer_times(self, replica_tokens, replica_gpu, num_gpus: int, tokens) -> LayerTimes:
        t, g = _check_layout(replica_tokens, replica_gpu, num_gpus)
        compute = np.where(g >= 0, self.alpha * t, 0.0).max(axis=(-2, -1))
        gpu_pairs = per_gpu_sum(t, g, num_gpus)
        a2a = (self.beta * gpu_pairs).max(-1)
        return LayerTimes(compute=compute, a2a=a2a, misc=np.full(compute.shape, self.t_misc))

    def slot_layer_times(self, slot_tokens, slot_expert, num_gpus: int, tokens) -> LayerTimes:
        """`layer_times` of a layout given per slot (see RooflineCost.slot_layer_times)."""
        _, pairs, M = _slot_rows(slot_tokens, slot_expert, num_gpus)
        lead = np.shape(slot_tokens)[:-1]
        compute = (self.alpha * np.asarray(slot_tokens, dtype=np.float64)).max(-1) if M else np.zeros(lead)
        a2a = (self.beta * _row_sum(pairs).reshape(*lead, num_gpus)).max(-1)
        return LayerTimes(compute=compute, a2a=a2a, misc=np.full(compute.shape, self.t_misc))

    def profile(self, num_gpus: int) -> CostProfile:
        """Equations 1-3 as scalars: alpha per pair of a replica, the max over replicas, beta per pair of a GPU."""
        return CostProfile(flop_s=self.alpha, read_s=0.0, act_s=0.0, launch_s=0.0, a2a_s=self.beta,
                           a2a_floor=False, per_gpu_sum=False)

    def misc_time(self, tokens, num_gpus: int) -> np.ndarray:
        """T_misc per layer, whatever the tokens."""
        return np.full(np.shape(tokens), self.t_misc, dtype=np.float64)

    def cold_start_s(self, from_peer: bool = False) -> float:
        return 0.0  # the paper's model has no cold-start term

    def describe(self) -> str:
        return f"paper linear: alpha={self.alpha:.3g} s/pair, beta={self.beta:.3g} s/pair, T_misc={self.t_misc:.3g} s"


def equation2_cost(times: LayerTimes, replica_gpu, expert_bytes: float, m_misc: float = 0.0) -> np.ndarray:
    """The paper's Equation 2 per layer (byte-seconds, leading shape): (max_{e,r} T + 2 max_g T_g) times the
    memory of that layer's replicas, plus T_misc * M_misc."""
    replicas = (np.asarray(replica_gpu) >= 0).sum(axis=(-2, -1))
    return times.moe_latency * replicas * expert_bytes + times.misc * m_misc
