"""The experts module of one MoE layer on one rank: its slot buffers, their cold starts, and the expert compute.

`ExpertParallelExperts` replaces a transformers 5 experts module (forward(hidden [T, H], top_k_index [T, K],
top_k_weights) -> [T, H]); its forward hands the layer to the server. It holds

    host_gate_up [E, 2I, H], host_down [E, H, I]   the host copy of every expert: where a cold start copies from
    buf_gate_up [S, 2I, H], buf_down [S, H, I]     this rank's S weight buffers of the layer, on its device
    buf_expert [S]    expert held by each buffer (-1 = none)
    slot_buf [S]      local plan slot -> the buffer it reads (the kernels' slot_to_weight; -1 = never set)
    slot_want [S]     expert served by each local plan slot (-1 = free slot)

A plan slot reads the buffer that holds its expert, so an expert moved between slots of one rank, or two
replicas of it on one rank, costs no copy. `device_plan(plan)` gives the layer's plan as device tensors (a
`moeless_kernels.ReplicaPlan`'s phy2log / log2phy / logcnt, this rank's `local_slots` and the slot -> buffer
`slot_to_weight`), uploaded once per plan and cached, and `run` computes the received pairs through
`fused_moe` with that plan. This module never chooses a plan and never changes which expert a pair goes to.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from moeless.serve.dist import ServeError
from moeless.serve.transfer import upload
from moeless_kernels.fused_moe import ReplicaPlan, fused_moe

__all__ = ["DevicePlan", "ExpertParallelExperts"]


@dataclass(frozen=True)
class DevicePlan:
    """One layer's plan on the device, for the buffers as they were at `version` (see the module docstring)."""

    plan: object  # the control plane's one-layer moeless.planner.Plan it was made from (the cache key)
    version: int
    phy2log: torch.Tensor  # int64 [P]
    log2phy: torch.Tensor  # int64 [E, R]
    logcnt: torch.Tensor  # int64 [E]
    local_slots: torch.Tensor  # bool [P]: this rank's slots
    slot_to_weight: torch.Tensor  # int64 [P]: buffer row of each local slot holding a replica, else -1

    def replica_plan(self, replica_tokens: torch.Tensor) -> ReplicaPlan:
        return ReplicaPlan(phy2log=self.phy2log, log2phy=self.log2phy, logcnt=self.logcnt,
                           replica_tokens=replica_tokens, local_slots=self.local_slots,
                           slot_to_weight=self.slot_to_weight)


class ExpertParallelExperts(torch.nn.Module):
    """This rank's share of one MoE layer's experts (see the module docstring). `serve_layer(module, hidden,
    top_k_index, top_k_weights)` is the server's loop, set by the server."""

    def __init__(self, experts: torch.nn.Module, layer: int, *, slots_per_gpu: int, device: torch.device,
                 rank: int = 0):
        super().__init__()
        self.layer, self.rank, self.slots_per_gpu = layer, rank, slots_per_gpu
        self.device = torch.device(device)
        self.num_experts = int(experts.num_experts) if hasattr(experts, "num_experts") else experts.gate_up_proj.shape[0]
        gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
        if getattr(experts, "is_transposed", False):  # [E, H, 2I] / [E, I, H] -> the kernels' layout
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        self.interleaved = not getattr(experts, "is_concatenated", True)
        # the host copy of all experts: where every cold start copies from (pinned on CUDA: async copies)
        self.host_gate_up = gate_up.to("cpu").contiguous()
        self.host_down = down.to("cpu").contiguous()
        if self.device.type == "cuda":
            self.host_gate_up, self.host_down = self.host_gate_up.pin_memory(), self.host_down.pin_memory()
        S = slots_per_gpu
        # plain attributes, not module buffers: model.to() must not move or duplicate them
        self.buf_gate_up = torch.zeros((S,) + tuple(self.host_gate_up.shape[1:]), dtype=gate_up.dtype,
                                       device=self.device)
        self.buf_down = torch.zeros((S,) + tuple(self.host_down.shape[1:]), dtype=down.dtype, device=self.device)
        self.buf_expert = np.full(S, -1, dtype=np.int64)
        self.slot_buf = np.full(S, -1, dtype=np.int64)
        self.slot_want = np.full(S, -1, dtype=np.int64)
        self.version = 0  # bumped by every realise: a cached DevicePlan of an older version is stale
        self.ready = None  # CUDA event: the cold starts of this layer are in
        self.copies = 0  # cold starts copied in (the pool's bill for this rank)
        self.repairs = 0  # copies the pool did not bill: a warm instance whose buffer was reused (should be 0)
        self.serve_layer = None
        self._device_plan: DevicePlan | None = None

    @property
    def expert_bytes(self) -> int:
        return (self.host_gate_up[0].numel() * self.host_gate_up.element_size()
                + self.host_down[0].numel() * self.host_down.element_size())

    @property
    def slot_expert(self) -> np.ndarray:
        """[S] the expert each local plan slot serves (-1 = free)."""
        return np.where(self.slot_want >= 0, self.buf_expert[np.maximum(self.slot_buf, 0)], -1)

    @property
    def slot_gate_up(self) -> torch.Tensor:
        """[S, 2I, H] the weights each local plan slot serves (a copy; zeros for a free slot)."""
        return self._slot_view(self.buf_gate_up)

    @property
    def slot_down(self) -> torch.Tensor:
        return self._slot_view(self.buf_down)

    def _slot_view(self, buf):
        out = buf[torch.from_numpy(np.maximum(self.slot_buf, 0)).to(buf.device)]
        out[torch.from_numpy(self.slot_want < 0).to(buf.device)] = 0
        return out

    def forward(self, hidden_states, top_k_index, top_k_weights):
        if self.serve_layer is None:
            raise ServeError(f"layer {self.layer}: no server runs this experts module")
        return self.serve_layer(self, hidden_states, top_k_index, top_k_weights)

    # -- cold starts ---------------------------------------------------------------------------------------
    def realise(self, want: np.ndarray, cold: np.ndarray, stream=None) -> int:
        """This rank's slots of a new plan: `want` [S] expert per local slot (-1 free), `cold` the local slots
        the pool cold-started. Warm slots read a buffer that already holds their expert (their own first); each
        cold slot gets a buffer no warm slot reads -- its own (the instance the pool evicted), else an empty
        one, else one no idle slot remembers -- and its expert is copied in from the host copy (on `stream`).
        Returns the number of copies."""
        S = want.size
        is_cold = np.zeros(S, dtype=bool)
        is_cold[np.asarray(cold, dtype=np.int64)] = True
        new_buf = self.slot_buf.copy()  # free slots remember their last buffer (an idle instance may come back)
        used = np.zeros(S, dtype=bool)

        def holders(e):
            return np.flatnonzero(self.buf_expert == e).tolist()

        pending = []
        for s in np.flatnonzero((want >= 0) & ~is_cold).tolist():  # warm: own buffer, else any holding it
            cands = holders(int(want[s]))
            if not cands:
                pending.append(s)
                continue
            new_buf[s] = int(self.slot_buf[s]) if self.slot_buf[s] in cands else cands[0]
            used[new_buf[s]] = True
        wanted = set(want[want >= 0].tolist())
        idle = set(self.slot_buf[(want < 0) & (self.slot_buf >= 0)].tolist())
        copies, repairs = [], 0
        for s in np.flatnonzero(is_cold & (want >= 0)).tolist() + pending:
            e = int(want[s])
            if not is_cold[s] and holders(e):  # a warm slot whose expert a cold slot of this plan copied in
                new_buf[s] = holders(e)[0]
                continue
            own = int(self.slot_buf[s])
            b = min(np.flatnonzero(~used).tolist(), key=lambda b: (
                b != own, self.buf_expert[b] >= 0, b in idle, int(self.buf_expert[b]) in wanted, b))
            used[b] = True
            new_buf[s] = b
            self.buf_expert[b] = e
            copies.append((b, e))
            repairs += int(not is_cold[s])
        self.slot_buf = new_buf
        self.slot_want = want.astype(np.int64).copy()
        self.version += 1
        if copies:
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                for b, e in copies:
                    self.buf_gate_up[b].copy_(self.host_gate_up[e], non_blocking=stream is not None)
                    self.buf_down[b].copy_(self.host_down[e], non_blocking=stream is not None)
                if stream is not None:
                    self.ready = torch.cuda.Event()
                    self.ready.record(stream)
        self.copies += len(copies) - repairs
        self.repairs += repairs
        return len(copies)

    def buffers_of(self, local_slots: np.ndarray) -> np.ndarray:
        """Buffer index per local plan slot (ServeError if a slot's buffer does not hold its expert)."""
        buf = self.slot_buf[local_slots]
        if (buf < 0).any() or not np.array_equal(self.buf_expert[buf], self.slot_want[local_slots]) \
                or (self.slot_want[local_slots] < 0).any():
            raise ServeError(f"layer {self.layer}: the slot buffers do not hold the plan's experts")
        return buf

    # -- the plan on the device, and the expert compute ----------------------------------------------------
    def device_plan(self, plan) -> DevicePlan:
        """`plan` (the control plane's one-layer Plan) as device tensors, cached until the plan or the buffers
        change: one upload per plan. ServeError if this rank's slots do not hold the plan's experts."""
        cached = self._device_plan
        if cached is not None and cached.plan is plan and cached.version == self.version:
            return cached
        S, lo = self.slots_per_gpu, self.rank * self.slots_per_gpu
        phy2log, log2phy, logcnt = plan.phy2log[0], plan.log2phy[0], plan.logcnt[0]
        P, (E, R) = phy2log.size, log2phy.shape
        if not np.array_equal(phy2log[lo:lo + S], self.slot_want):
            raise ServeError(f"rank {self.rank}: layer {self.layer}'s slots do not hold the plan's experts")
        held = np.flatnonzero(self.slot_want >= 0)
        slot_to_weight = np.full(P, -1, dtype=np.int64)
        slot_to_weight[lo + held] = self.buffers_of(held)
        local = np.zeros(P, dtype=np.int64)
        local[lo:lo + S] = 1
        packed = upload(np.concatenate([phy2log, log2phy.reshape(-1), logcnt, slot_to_weight, local]), self.device)
        cut = np.cumsum([P, E * R, E, P])
        self._device_plan = DevicePlan(plan, self.version, packed[:cut[0]], packed[cut[0]:cut[1]].view(E, R),
                                       packed[cut[1]:cut[2]], packed[cut[3]:].bool(), packed[cut[2]:cut[3]])
        return self._device_plan

    def run(self, x: torch.Tensor, expert_ids: torch.Tensor, replica_tokens: torch.Tensor, plan: DevicePlan,
            backend: str = "auto") -> torch.Tensor:
        """The received pairs through this rank's slots: x [N, H] (one row per pair), expert_ids int32 [N, 1]
        their logical experts, replica_tokens [E, R] the pairs each local replica serves (zero for other ranks'
        replicas). Returns [N, H], unweighted (the routed weights stay with the pairs' own rank)."""
        if self.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready)
        ones = torch.ones(expert_ids.shape, dtype=torch.float32, device=x.device)
        return fused_moe(x, self.buf_gate_up, self.buf_down, topk_ids=expert_ids, topk_weights=ones,
                         plan=plan.replica_plan(replica_tokens), interleaved=self.interleaved, backend=backend).out
