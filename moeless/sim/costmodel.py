"""Time and cost of one MoE layer of one iteration, given where each replica sits and how many tokens it serves.

Input layout (any leading dims `...`, usually [L] or [n, L]): `replica_tokens [..., E, R]` ((token, expert)
pairs each replica of expert e serves) and `replica_gpu [..., E, R]` (the GPU holding it, -1 = no replica).

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


def _check_layout(replica_tokens, replica_gpu, num_gpus):
    tokens = np.asarray(replica_tokens, dtype=np.float64)
    gpu = np.asarray(replica_gpu)
    if tokens.shape != gpu.shape or tokens.ndim < 2:
        raise ValueError(f"replica_tokens {tokens.shape} and replica_gpu {gpu.shape} must be one shape [..., E, R]")
    if not isinstance(num_gpus, (int, np.integer)) or num_gpus < 1:
        raise ValueError(f"num_gpus must be an int >= 1, got {num_gpus!r}")
    if gpu.size and (gpu.max() >= num_gpus or gpu.min() < -1):
        raise ValueError(f"replica_gpu must lie in [-1, {num_gpus}), got [{gpu.min()}, {gpu.max()}]")
    if ((gpu < 0) & (tokens != 0)).any():
        raise ValueError("replica_tokens must be 0 where replica_gpu is -1 (tokens sent to no replica)")
    if (tokens < 0).any():
        raise ValueError("replica_tokens must be >= 0")
    return tokens, gpu.astype(np.int64)


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
        if tokens.shape[-1] == 1:
            return per_gpu_sum(self.replica_time(tokens), gpu, num_gpus)
        merged, gs, _ = _merge_sorted(tokens, gpu)
        return per_gpu_sum(self.replica_time(merged), gs, num_gpus)

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
        compute = self.gpu_compute(pairs, gpu, num_gpus).max(-1)
        a2a = self.a2a_gpu(per_gpu_sum(pairs, gpu, num_gpus), num_gpus).max(-1)
        misc = self.misc_time(tokens, num_gpus) + np.zeros_like(compute)
        return LayerTimes(compute=compute, a2a=a2a, misc=misc)

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

    def cold_start_s(self, from_peer: bool = False) -> float:
        return 0.0  # the paper's model has no cold-start term

    def describe(self) -> str:
        return f"paper linear: alpha={self.alpha:.3g} s/pair, beta={self.beta:.3g} s/pair, T_misc={self.t_misc:.3g} s"


def equation2_cost(times: LayerTimes, replica_gpu, expert_bytes: float, m_misc: float = 0.0) -> np.ndarray:
    """The paper's Equation 2 per layer (byte-seconds, leading shape): (max_{e,r} T + 2 max_g T_g) times the
    memory of that layer's replicas, plus T_misc * M_misc."""
    replicas = (np.asarray(replica_gpu) >= 0).sum(axis=(-2, -1))
    return times.moe_latency * replicas * expert_bytes + times.misc * m_misc
