"""fused_moe: one MoE layer's experts, from router logits (or a given routing) to the layer output, over a plan.

    router_logits --fused_topk--> (topk_weights, topk_ids) --replica_dispatch(plan)--> slot per pair
        --moe_align(local slots)--> permutation --grouped_swiglu--> pair outputs --combine--> out [T, H]

A `ReplicaPlan` says where the replicas of each logical expert live (phy2log / log2phy / logcnt, the names of
DeepSeek EPLB and vLLM) and which weight tensor each slot reads (slot_to_weight). Replication is lossless: a
pair computes the same function on any replica of its expert, so any plan gives the unreplicated output, up
to the rounding of a different GEMM row grouping. With `local_slots`, only the pairs of this rank's slots are
computed and the rest contribute zero: what one rank of expert parallelism runs, the ranks' outputs summing to
the layer's.

This module chains the ops and validates what it is given; it must never choose a plan (that is the
planner's job), change which experts a token routes to, or drop a pair without reporting it.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from moeless_kernels._backend import resolve_backend
from moeless_kernels.checks import FLOAT_DTYPES, check_int, check_range, check_tensor
from moeless_kernels.combine import combine
from moeless_kernels.dispatch import DispatchResult, moe_align, replica_dispatch
# the unchecked implementations: fused_moe validated its inputs and built the permutation itself
from moeless_kernels.grouped_gemm import _grouped_swiglu_torch, _grouped_swiglu_triton
from moeless_kernels.topk import fused_topk

INDEX_DTYPES = (torch.int32, torch.int64)


@dataclass(frozen=True)
class ReplicaPlan:
    """Where the replicas of the E logical experts live among P physical slots (one MoE layer).

    phy2log        int [P]     logical expert held by each slot, -1 = free slot
    log2phy        int [E, R]  slots of expert e's replicas in log2phy[e, :logcnt[e]], -1 pad
    logcnt         int [E]     replicas per expert
    replica_tokens int [E, R]  pairs of expert e sent to each replica (rows sum to the expert's pairs);
                               None = even split (replica_dispatch's contract)
    local_slots    bool [P]    slots computed here (this rank's); None = all
    slot_to_weight int [P]     index into the weight tensors' first dim for each slot; None = phy2log (every
                               replica reads its logical expert's weights). A rank holding only its own
                               instances in a [W_local, ...] buffer passes the slot -> buffer row map here.
    """

    phy2log: torch.Tensor
    log2phy: torch.Tensor
    logcnt: torch.Tensor
    replica_tokens: torch.Tensor | None = None
    local_slots: torch.Tensor | None = None
    slot_to_weight: torch.Tensor | None = None

    @property
    def num_slots(self) -> int:
        return int(self.phy2log.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.log2phy.shape[0])

    @classmethod
    def identity(cls, num_experts: int, device: torch.device | str | None = None) -> "ReplicaPlan":
        """One replica per expert, slot e holding expert e."""
        check_int("num_experts", num_experts, lo=1)
        slots = torch.arange(num_experts, dtype=torch.int32, device=device)
        return cls(phy2log=slots, log2phy=slots[:, None].clone(), logcnt=torch.ones_like(slots))

    @classmethod
    def from_phy2log(cls, phy2log, num_experts: int | None = None, *, replica_tokens=None, local_slots=None,
                     slot_to_weight=None) -> "ReplicaPlan":
        """Build log2phy / logcnt from phy2log [P] (-1 = free); replicas of an expert in ascending slot order.

        num_experts defaults to phy2log.max() + 1. The other fields are stored as given.
        """
        phy2log = torch.as_tensor(phy2log)
        check_tensor("phy2log", phy2log, ndim=1, dtypes=INDEX_DTYPES)
        if num_experts is None:
            num_experts = int(phy2log.max()) + 1 if phy2log.numel() else 0
        check_int("num_experts", num_experts, lo=1)
        check_range("phy2log", phy2log, -1, num_experts)
        held = torch.nonzero(phy2log >= 0).flatten()
        experts = phy2log[held].long()
        logcnt = torch.bincount(experts, minlength=num_experts)
        max_replicas = max(1, int(logcnt.max()) if logcnt.numel() else 1)
        # rank of each held slot among its expert's slots: a stable sort by expert keeps slots ascending
        order = torch.sort(experts, stable=True).indices
        first = torch.cumsum(logcnt, 0) - logcnt
        rank = torch.arange(order.numel(), device=phy2log.device) - first[experts[order]]
        log2phy = torch.full((num_experts, max_replicas), -1, dtype=phy2log.dtype, device=phy2log.device)
        log2phy[experts[order], rank] = held[order].to(phy2log.dtype)
        return cls(phy2log=phy2log, log2phy=log2phy, logcnt=logcnt.to(phy2log.dtype),
                   replica_tokens=replica_tokens, local_slots=local_slots, slot_to_weight=slot_to_weight)

    def to(self, device: torch.device | str) -> "ReplicaPlan":
        """The same plan with every tensor on `device`."""
        return replace(self, **{f: getattr(self, f).to(device) for f in _PLAN_FIELDS if getattr(self, f) is not None})


_PLAN_FIELDS = ("phy2log", "log2phy", "logcnt", "replica_tokens", "local_slots", "slot_to_weight")


@dataclass(frozen=True)
class MoEResult:
    """out [T, H] in hidden's dtype; the routing used (topk_ids int32 [T, K], topk_weights fp32 [T, K]); where
    each pair went and what capacity dropped (dispatch)."""

    out: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    dispatch: DispatchResult


def default_block_m(num_pairs: int, num_slots: int) -> int:
    """BLOCK_M for moe_align and the grouped GEMM: the padded tile should fit the pairs a slot typically has.

    Decode-sized batches (a few pairs per slot) waste least in 16-row blocks; prefill fills 64- or 128-row
    tiles. (vLLM's default config makes the same cut between M <= E and larger.)
    """
    pairs_per_slot = num_pairs / max(1, num_slots)
    if pairs_per_slot <= 16:
        return 16
    if pairs_per_slot <= 32:
        return 32
    if pairs_per_slot <= 256:
        return 64
    return 128


# ----------------------------------------------------------------------------------------------------------------
# validation


def _validate_plan(plan: ReplicaPlan, num_experts: int, num_weights: int, device: torch.device) -> None:
    if not isinstance(plan, ReplicaPlan):
        raise ValueError(f"plan must be a ReplicaPlan (or None for one replica per expert), got {type(plan).__name__}")
    check_tensor("plan.phy2log", plan.phy2log, ndim=1, dtypes=INDEX_DTYPES, device=device)
    num_slots = plan.num_slots
    check_tensor("plan.log2phy", plan.log2phy, ndim=2, dtypes=INDEX_DTYPES, device=device)
    if plan.log2phy.shape[0] != num_experts or plan.log2phy.shape[1] < 1:
        raise ValueError(
            f"plan.log2phy must have shape [E={num_experts}, R >= 1] (E from the routing), "
            f"got {tuple(plan.log2phy.shape)}"
        )
    check_tensor("plan.logcnt", plan.logcnt, shape=(num_experts,), dtypes=INDEX_DTYPES, device=device)
    if plan.replica_tokens is not None:
        check_tensor("plan.replica_tokens", plan.replica_tokens, shape=tuple(plan.log2phy.shape),
                     dtypes=INDEX_DTYPES, device=device)
    if plan.local_slots is not None:
        check_tensor("plan.local_slots", plan.local_slots, shape=(num_slots,), dtypes=(torch.bool,), device=device)
    check_range("plan.phy2log", plan.phy2log, -1, num_experts)
    check_range("plan.logcnt", plan.logcnt, 0, plan.log2phy.shape[1] + 1)
    # every replica listed in log2phy is a slot that holds that expert
    used = torch.arange(plan.log2phy.shape[1], device=device)[None, :] < plan.logcnt[:, None].long()
    slots = plan.log2phy[used].long()
    if slots.numel():
        check_range("plan.log2phy (replicas j < logcnt[e])", slots, 0, num_slots)
        experts = torch.arange(num_experts, device=device)[:, None].expand_as(plan.log2phy)[used]
        wrong = torch.nonzero(plan.phy2log.long()[slots] != experts).flatten()
        if wrong.numel():
            i = int(wrong[0])
            raise ValueError(
                f"plan is inconsistent: log2phy lists slot {int(slots[i])} as a replica of expert "
                f"{int(experts[i])}, but phy2log[{int(slots[i])}] = {int(plan.phy2log[slots[i]])}"
            )
    if plan.slot_to_weight is not None:
        check_tensor("plan.slot_to_weight", plan.slot_to_weight, shape=(num_slots,), dtypes=INDEX_DTYPES,
                     device=device)
        check_range("plan.slot_to_weight", plan.slot_to_weight, -1, num_weights)
    elif num_weights < num_experts:
        raise ValueError(
            f"plan.slot_to_weight is None, so slots read their logical expert's weights, but gate_up_proj has "
            f"{num_weights} weights for {num_experts} experts; pass slot_to_weight"
        )


def _check_plan_covers(plan: ReplicaPlan, topk_ids: torch.Tensor, num_experts: int) -> None:
    """Every expert that a pair routes to has a replica, and every local slot holding a replica has a weight."""
    counts = torch.bincount(topk_ids.reshape(-1).long(), minlength=num_experts)
    orphans = torch.nonzero((counts > 0) & (plan.logcnt.long() == 0)).flatten()
    if orphans.numel():
        e = int(orphans[0])
        raise ValueError(
            f"plan has no replica of expert {e} (plan.logcnt[{e}] = 0), but {int(counts[e])} pairs route to it"
        )
    if plan.slot_to_weight is not None:
        used = torch.arange(plan.log2phy.shape[1], device=topk_ids.device)[None, :] < plan.logcnt[:, None].long()
        slots = plan.log2phy[used].long()
        if plan.local_slots is not None:
            slots = slots[plan.local_slots[slots]]  # other ranks' slots are never computed here
        if bool((plan.slot_to_weight.long()[slots] < 0).any()):
            raise ValueError(
                "plan.slot_to_weight is -1 for a local slot that holds a replica; give it a weight index"
            )


def _validate_routing(hidden, router_logits, top_k, topk_ids, topk_weights, num_experts_default, routing_options):
    device = hidden.device
    num_tokens = hidden.shape[0]
    if router_logits is not None:
        if topk_ids is not None or topk_weights is not None:
            raise ValueError("give either router_logits (+ top_k) or (topk_ids, topk_weights), not both")
        check_tensor("router_logits", router_logits, shape=(num_tokens, None), dtypes=FLOAT_DTYPES, device=device)
        if top_k is None:
            raise ValueError("top_k is required with router_logits")
        return int(router_logits.shape[1])
    if topk_ids is None or topk_weights is None:
        raise ValueError("give router_logits (+ top_k), or both topk_ids and topk_weights")
    if any(v != d for v, d in routing_options):
        raise ValueError(
            "scoring, renormalize, num_expert_group, topk_group, e_score_correction_bias and routed_scaling_factor "
            "apply to router_logits; with topk_ids/topk_weights the routing is already done"
        )
    check_tensor("topk_ids", topk_ids, ndim=2, dtypes=INDEX_DTYPES, device=device)
    if topk_ids.shape[0] != num_tokens or topk_ids.shape[1] < 1:
        raise ValueError(f"topk_ids must have shape [T={num_tokens}, K >= 1], got {tuple(topk_ids.shape)}")
    check_tensor("topk_weights", topk_weights, shape=tuple(topk_ids.shape), dtypes=FLOAT_DTYPES, device=device)
    if top_k is not None and top_k != topk_ids.shape[1]:
        raise ValueError(f"top_k={top_k} disagrees with topk_ids of shape {tuple(topk_ids.shape)}")
    check_range("topk_ids", topk_ids, 0, num_experts_default)
    return num_experts_default


# ----------------------------------------------------------------------------------------------------------------
# the layer


def fused_moe(
    hidden: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    *,
    router_logits: torch.Tensor | None = None,
    top_k: int | None = None,
    topk_ids: torch.Tensor | None = None,
    topk_weights: torch.Tensor | None = None,
    plan: ReplicaPlan | None = None,
    scoring: str = "softmax",
    renormalize: bool = False,
    num_expert_group: int | None = None,
    topk_group: int | None = None,
    e_score_correction_bias: torch.Tensor | None = None,
    routed_scaling_factor: float = 1.0,
    slot_capacity: int | torch.Tensor | None = None,
    capacity_policy: str = "none",
    block_m: int | None = None,
    interleaved: bool = False,
    backend: str = "auto",
) -> MoEResult:
    """One MoE layer's routed experts: hidden [T, H] -> MoEResult(out [T, H], topk_ids, topk_weights, dispatch).

    Weights in Hugging Face v5 layout: gate_up_proj [W, 2I, H] (rows [0, I) gate, [I, 2I) up; interleaved=True:
    row 2j gate j, row 2j+1 up j), down_proj [W, H, I]; W = E unless plan.slot_to_weight says otherwise.
    Routing: router_logits [T, E] with top_k and fused_topk's options, or a finished (topk_ids [T, K],
    topk_weights [T, K]). plan: a ReplicaPlan with its tensors on hidden's device (ReplicaPlan.to), None = one
    replica per expert. slot_capacity / capacity_policy:
    replica_dispatch's (drops are reported in result.dispatch and their pairs contribute zero).
    block_m: moe_align's block (None = default_block_m). backend: "auto", "triton" or "torch", for every op.
    """
    check_tensor("hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES)
    device, dtype = hidden.device, hidden.dtype
    check_tensor("gate_up_proj", gate_up_proj, ndim=3, dtypes=(dtype,), device=device)
    num_weights, two_inter, hidden_size = gate_up_proj.shape
    if hidden_size != hidden.shape[1] or two_inter % 2 or num_weights < 1:
        raise ValueError(
            f"gate_up_proj must have shape [W >= 1, 2*I, H={hidden.shape[1]}] (Hugging Face v5 layout), "
            f"got {tuple(gate_up_proj.shape)}"
        )
    check_tensor("down_proj", down_proj, shape=(num_weights, hidden_size, two_inter // 2), dtypes=(dtype,),
                 device=device)
    if not isinstance(interleaved, bool):
        raise ValueError(f"interleaved must be a bool, got {interleaved!r}")
    resolved = resolve_backend(backend, device)
    num_experts_default = plan.num_experts if isinstance(plan, ReplicaPlan) else num_weights
    routing_options = ((scoring, "softmax"), (renormalize, False), (num_expert_group, None), (topk_group, None),
                       (e_score_correction_bias, None), (routed_scaling_factor, 1.0))
    num_experts = _validate_routing(hidden, router_logits, top_k, topk_ids, topk_weights, num_experts_default,
                                    routing_options)
    if plan is None:
        if num_experts != num_weights:
            raise ValueError(
                f"router_logits has {num_experts} experts but gate_up_proj holds {num_weights} weights; "
                f"without a plan they must match"
            )
        plan = ReplicaPlan.identity(num_experts, device=device)
    else:
        _validate_plan(plan, num_experts, num_weights, device)
    if block_m is not None:
        check_int("block_m", block_m, lo=1)

    # --- routing
    if router_logits is not None:
        topk_weights, topk_ids, _ = fused_topk(
            router_logits, top_k, scoring=scoring, renormalize=renormalize, num_expert_group=num_expert_group,
            topk_group=topk_group, e_score_correction_bias=e_score_correction_bias,
            routed_scaling_factor=routed_scaling_factor, backend=resolved,
        )
    else:
        topk_ids = topk_ids.to(torch.int32)
        topk_weights = topk_weights.to(torch.float32)
    _check_plan_covers(plan, topk_ids, num_experts)
    num_tokens, k = topk_ids.shape

    # --- pairs -> slots -> permutation
    dispatch = replica_dispatch(
        topk_ids, plan.log2phy, plan.logcnt, plan.replica_tokens, num_slots=plan.num_slots,
        slot_capacity=slot_capacity, capacity_policy=capacity_policy,
        topk_weights=topk_weights if capacity_policy == "probability" else None, backend=resolved,
    )
    if block_m is None:
        # the torch path only walks the permutation, where smaller blocks pad less
        block_m = 16 if resolved == "torch" else default_block_m(num_tokens * k, plan.num_slots)
    sorted_token_ids, block_slot_ids, num_tokens_post_padded = moe_align(
        dispatch.slot_ids, plan.num_slots, block_m, plan.local_slots, backend=resolved
    )

    # --- experts, then the sum over K
    slot_to_weight = plan.phy2log if plan.slot_to_weight is None else plan.slot_to_weight
    # free slots (-1) get no pairs; any valid row keeps the kernels' index range simple
    slot_to_weight = slot_to_weight.clamp(min=0).to(torch.int32)
    swiglu = _grouped_swiglu_triton if resolved == "triton" else _grouped_swiglu_torch
    pair_out = swiglu(hidden, gate_up_proj, down_proj, sorted_token_ids, block_slot_ids, num_tokens_post_padded,
                      slot_to_weight, topk_weights, k, block_m, interleaved)
    out = combine(pair_out, k, backend=resolved)
    return MoEResult(out=out, topk_ids=topk_ids, topk_weights=topk_weights, dispatch=dispatch)
