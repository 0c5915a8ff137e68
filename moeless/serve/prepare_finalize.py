"""Prepare and finalize of one expert-parallel MoE layer, after vLLM's modular kernel (FusedMoEPrepareAndFinalize).

    prepare    counts per expert -> all-gather [G, E] (+ the predicted counts of layer l+d, rank 0's clock)
               -> ONE download to the host -> serve-time split of the true counts (the engine's), cut rank by
               rank in rank order -> ONE upload of this layer's quotas -> replica_dispatch: a physical slot per
               (token, k) pair -> pairs sorted by slot (so by destination rank) -> async all-to-all (uneven
               splits, known to every rank from the gathered counts: no all-to-all of counts)
    finalize   all-to-all back -> routed weight per pair -> combine (fp32 sum over K)

Between the two the caller runs the control plane (while the tokens are in flight) and the experts
(`ExpertParallelExperts.run`). Host syncs: the one download above is the only place a layer waits for its
device (the split sizes of the all-to-all and the split must be on the host); the plan's tensors come from
`ExpertParallelExperts.device_plan` (cached per plan), the quotas go up pinned and non-blocking
(`moeless.serve.transfer`). The kernels' own checks are theirs (moeless_kernels).

Pairs keep their routing: a pair goes to a replica of the expert its router chose, and every pair is sent,
computed and combined exactly once. The routed weights never leave their rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from moeless.serve.dist import Collectives
from moeless.serve.experts import DevicePlan
from moeless.serve.metrics import LayerTimer
from moeless.serve.transfer import download, upload
from moeless_kernels.combine import combine
from moeless_kernels.dispatch import replica_dispatch

__all__ = ["AllToAllPrepareFinalize", "Counts", "Prepared"]


@dataclass(frozen=True)
class Counts:
    """What the counts all-gather brought to the host: pairs per expert on each rank [G, E], their sum [E] (the
    layer's true global counts), the predicted global counts of layer l+d [E] (None: no prediction), and rank
    0's clock in seconds (every rank's control plane sees the same time)."""

    by_rank: np.ndarray
    true: np.ndarray
    predicted: np.ndarray | None
    now: float


@dataclass
class Prepared:
    """A prepared layer: the received pairs (in flight until `AllToAllPrepareFinalize.receive`) and what
    finalize needs to bring their outputs back.

    recv_x [N, H]           pairs received from every rank, grouped by source rank, then by slot
    expert_ids int32 [N, 1] the logical expert of each received pair
    replica_tokens [E, R]   received pairs per replica (zero for other ranks' replicas): the experts' quotas
    order int64 [T*K]       this rank's pairs (flat t*K + k) in the order they were sent
    send / recv [G]         rows sent to / received from each rank
    """

    layer: int
    counts: Counts
    recv_x: torch.Tensor
    expert_ids: torch.Tensor
    replica_tokens: torch.Tensor
    order: torch.Tensor
    send: list
    recv: list
    work: object = None


class AllToAllPrepareFinalize:
    """prepare / receive / finalize of every MoE layer of one server (see the module docstring)."""

    def __init__(self, collectives: Collectives, *, num_experts: int, slots_per_gpu: int, device: torch.device,
                 timer: LayerTimer, backend: str = "auto"):
        self.collectives = collectives
        self.rank, self.world = collectives.rank, collectives.world
        self.E, self.S = int(num_experts), int(slots_per_gpu)
        self.device, self.timer, self.backend = device, timer, backend
        # local slot of each (source rank, slot) group of received rows: [G * S]
        self._group_slot = torch.arange(self.S, device=device).repeat(self.world)

    def prepare(self, layer: int, x: torch.Tensor, ids: torch.Tensor, predicted: torch.Tensor | None, now: float,
                plan, device_plan: DevicePlan, split: Callable[[np.ndarray], np.ndarray]) -> Prepared:
        """Gather the counts, split them with `split(true counts [E]) -> replica_tokens [E, R]` over `plan` (the
        control plane's one-layer Plan; `device_plan` its device tensors), dispatch and start the all-to-all.
        x [T, H]: this rank's tokens; ids [T, K]: their experts; predicted [E] on the device or None."""
        counts = self.gather_counts(layer, ids, predicted, now)
        return self.dispatch(layer, x, ids, counts, plan, device_plan, split(counts.true))

    def gather_counts(self, layer: int, ids: torch.Tensor, predicted: torch.Tensor | None, now: float) -> Counts:
        """All-gather this rank's pairs per expert (+ its share of the prediction, + the clock): the layer's one
        host sync."""
        E = self.E
        flat = ids.reshape(-1).long()
        # counts (+ prediction and clock) in one message; no host value is read here
        msg = torch.zeros(2 * E + 2, dtype=torch.int64, device=self.device)
        msg[:E].scatter_add_(0, flat, torch.ones_like(flat))
        if predicted is not None:
            msg[E:2 * E] = predicted
            msg[2 * E + 1] = 1
        msg[2 * E] = int(now * 1e6)
        self.timer.mark("count")
        with self.timer.gather():
            gathered = download(self.collectives.all_gather(layer, msg))
        by_rank = gathered[:, :E]
        return Counts(by_rank=by_rank, true=by_rank.sum(0),
                      predicted=gathered[:, E:2 * E].sum(0) if gathered[0, 2 * E + 1] else None,
                      now=float(gathered[0, 2 * E]) / 1e6)

    def dispatch(self, layer: int, x: torch.Tensor, ids: torch.Tensor, counts: Counts, plan,
                 device_plan: DevicePlan, rt: np.ndarray) -> Prepared:
        """Cut the layer's split `rt` [E, R] rank by rank, send this rank's pairs to their slots' ranks (async).
        Reads no device value: with the host's counts, what follows is fixed-size device work."""
        E, G, S, rank, timer = self.E, self.world, self.S, self.rank, self.timer
        T, K = ids.shape
        by_rank = counts.by_rank
        # -- the serve-time split of the true counts, cut rank by rank (rank-major order of the pairs)
        log2phy = plan.log2phy[0]  # [E, R]
        chunk_hi = np.cumsum(rt, axis=1)
        chunk_lo = chunk_hi - rt
        rank_hi = np.cumsum(by_rank, axis=0)
        rank_lo = rank_hi - by_rank
        local_rt = np.clip(np.minimum(rank_hi[:, :, None], chunk_hi[None]) -
                           np.maximum(rank_lo[:, :, None], chunk_lo[None]), 0, None)  # [G, E, R]
        valid = log2phy >= 0
        slot_counts = np.zeros((G, G * S), dtype=np.int64)  # pairs from rank g to physical slot p
        np.add.at(slot_counts, (slice(None), log2phy[valid]), local_rt[:, valid])
        timer.pairs(layer, slot_counts.sum(0).reshape(G, S).sum(1))  # pairs each rank's experts serve
        send = slot_counts[rank].reshape(G, S).sum(1)
        recv_by_slot = slot_counts[:, rank * S:(rank + 1) * S]  # [G, S]
        recv = recv_by_slot.sum(1)
        mine = valid & (log2phy // S == rank)
        recv_quota = np.zeros_like(rt)
        recv_quota[mine] = recv_by_slot.sum(0)[log2phy[mine] - rank * S]
        R = log2phy.shape[1]
        quotas = upload(np.concatenate([local_rt[rank].reshape(-1), recv_quota.reshape(-1), recv_by_slot.reshape(-1)]),
                        self.device)
        timer.mark("split")

        # -- pairs -> slots (routing unchanged), sorted by slot, hence by destination rank
        if T:
            dispatch = replica_dispatch(ids.to(torch.int32), device_plan.log2phy, device_plan.logcnt,
                                        quotas[:E * R].view(E, R), num_slots=G * S, backend=self.backend)
            order = torch.sort(dispatch.slot_ids.reshape(-1).long(), stable=True).indices
            send_x = x[order // K]
        else:
            order = torch.zeros(0, dtype=torch.int64, device=self.device)
            send_x = x.new_zeros((0, x.shape[1]))
        n_recv = int(recv.sum())
        recv_x = x.new_empty((n_recv, x.shape[1]))
        work = self.collectives.all_to_all("all-to-all of tokens", layer, recv_x, send_x.contiguous(),
                                           recv.tolist(), send.tolist(), async_op=True)
        # the received rows arrive grouped by (source rank, local slot): their experts follow from the counts
        local_slot = torch.repeat_interleave(self._group_slot, quotas[2 * E * R:], output_size=n_recv)
        expert_ids = device_plan.phy2log[rank * S + local_slot].to(torch.int32)[:, None]
        timer.mark("dispatch")
        return Prepared(layer, counts, recv_x, expert_ids, quotas[E * R:2 * E * R].view(E, R), order,
                        send.tolist(), recv.tolist(), work)

    def receive(self, prepared: Prepared) -> torch.Tensor:
        """Wait for the tokens of `prepared` to arrive; returns recv_x."""
        if prepared.work is not None:
            self.collectives.wait("all-to-all of tokens", prepared.layer, prepared.work)
            prepared.work = None
        self.timer.mark("all-to-all")
        return prepared.recv_x

    def finalize(self, prepared: Prepared, y: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """y [N, H]: the experts' (unweighted) outputs of the received pairs -> this rank's layer output [T, H]:
        all-to-all back, routed weight per pair, fp32 sum over the K experts of each token."""
        T, K = weights.shape
        H = y.shape[1]
        back = y.new_empty((sum(prepared.send), H))
        self.collectives.all_to_all("all-to-all back", prepared.layer, back, y.contiguous(), prepared.send,
                                    prepared.recv)
        self.timer.mark("all-to-all back")
        order = prepared.order
        pair_out = torch.empty((T * K, H), dtype=torch.float32, device=self.device)
        if T:  # every pair was sent and came back exactly once: order covers all T*K rows
            pair_out.index_copy_(0, order, back.float() * weights.reshape(-1)[order].float()[:, None])
        out = combine(pair_out, K, backend=self.backend).to(dtype)
        self.timer.mark("combine")
        return out
