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
from functools import lru_cache

import torch

from moeless_kernels._backend import resolve_backend
from moeless_kernels.checks import FLOAT_DTYPES, check_int, check_range, check_tensor, value_checks_enabled
from moeless_kernels.combine import combine
from moeless_kernels.dispatch import (
    DispatchResult,
    _DispatchArgs,
    _dispatch,
    _moe_align,
    check_plan_tables,
    check_replica_tokens,
    check_routing_covered,
    dispatch_capacity,
)
# the unchecked implementations: fused_moe validated its inputs and built the permutation itself
from moeless_kernels.grouped_gemm import _grouped_swiglu_triton, moe_launch_config, swiglu_pairs
from moeless_kernels.launch_configs import heuristic_block_m
from moeless_kernels.topk import fused_topk

INDEX_DTYPES = (torch.int32, torch.int64)


@dataclass(frozen=True)
class _PlanTensors:
    """What the kernels read of a plan, converted once per (plan, layer): int32, contiguous, on the plan's
    device."""

    log2phy: torch.Tensor  # (E, R) int32
    logcnt: torch.Tensor  # (E,) int32
    used: torch.Tensor  # (E, R) bool, j < logcnt[e]
    slot_to_weight: torch.Tensor  # (P,) int32, free slots clamped to row 0 (they get no pairs)


@dataclass(frozen=True)
class ReplicaPlan:
    """Where the replicas of the E logical experts live among P physical slots (one MoE layer).

    phy2log        int [P]     logical expert held by each slot, -1 = free slot
    log2phy        int [E, R]  slots of expert e's replicas in log2phy[e, :logcnt[e]], -1 pad
    logcnt         int [E]     replicas per expert
    replica_tokens int [E, R]  pairs of expert e sent to each replica (rows sum to the expert's pairs);
                               None = even split (replica_dispatch's contract)
    local_slots    bool [P]    slots computed here (this rank's); None = all
    slot_to_weight int [P]     index into the weight tensors' first dim for each slot (-1 = none); None =
                               phy2log (every replica reads its logical expert's weights). A rank holding only
                               its own instances in a [W_local, ...] buffer passes the slot -> buffer row map here.

    A plan is checked once, when it is built (a few host syncs on CUDA; never per layer call): shapes, dtypes,
    one device; phy2log in [-1, E); logcnt in [0, R]; each listed replica a distinct slot that holds its expert
    in phy2log; replica_tokens non-negative and zero beyond logcnt; slot_to_weight consistent with phy2log (one
    weight row never serves two different experts; a local slot listed as a replica has a row). Tensors are
    not copied: modify none in place after building the plan (build a new one).
    """

    phy2log: torch.Tensor
    log2phy: torch.Tensor
    logcnt: torch.Tensor
    replica_tokens: torch.Tensor | None = None
    local_slots: torch.Tensor | None = None
    slot_to_weight: torch.Tensor | None = None

    def __post_init__(self):
        _check_plan(self)
        object.__setattr__(self, "_layer_tensors", {})  # num_weights -> _PlanTensors (fused_moe's cache)

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
    """BLOCK_M for moe_align and the grouped GEMM when no tuned table says otherwise: the typical slot's pairs
    fit one block (launch_configs.heuristic_block_m: max(16, min(next_pow2(2 * pairs per slot), 64)), 128 for
    prefill), so a decode batch never splits an expert over blocks that would each re-read its weights."""
    return heuristic_block_m(num_pairs, num_slots)


# ----------------------------------------------------------------------------------------------------------------
# validation


def _check_plan(plan: ReplicaPlan) -> None:
    """ReplicaPlan's own consistency (see its docstring); runs once per plan."""
    check_tensor("plan.phy2log", plan.phy2log, ndim=1, dtypes=INDEX_DTYPES)
    device = plan.phy2log.device
    num_slots = plan.phy2log.shape[0]
    check_tensor("plan.log2phy", plan.log2phy, ndim=2, dtypes=INDEX_DTYPES, device=device)
    num_experts, max_replicas = plan.log2phy.shape
    if num_experts < 1 or max_replicas < 1:
        raise ValueError(f"plan.log2phy must have shape [E >= 1, R >= 1], got {tuple(plan.log2phy.shape)}")
    check_tensor("plan.logcnt", plan.logcnt, shape=(num_experts,), dtypes=INDEX_DTYPES, device=device)
    if plan.replica_tokens is not None:
        check_tensor("plan.replica_tokens", plan.replica_tokens, shape=(num_experts, max_replicas),
                     dtypes=INDEX_DTYPES, device=device)
    if plan.local_slots is not None:
        check_tensor("plan.local_slots", plan.local_slots, shape=(num_slots,), dtypes=(torch.bool,), device=device)
    if plan.slot_to_weight is not None:
        check_tensor("plan.slot_to_weight", plan.slot_to_weight, shape=(num_slots,), dtypes=INDEX_DTYPES,
                     device=device)

    check_range("plan.phy2log", plan.phy2log, -1, num_experts)
    check_plan_tables(plan.log2phy, plan.logcnt, num_slots, prefix="plan.")
    # every replica listed in log2phy is a slot that holds that expert
    used = torch.arange(max_replicas, device=device)[None, :] < plan.logcnt[:, None].long()
    slots = plan.log2phy[used].long()
    experts = torch.arange(num_experts, device=device)[:, None].expand_as(plan.log2phy)[used]
    wrong = torch.nonzero(plan.phy2log.long()[slots] != experts).flatten()
    if wrong.numel():
        i = int(wrong[0])
        raise ValueError(
            f"plan is inconsistent: log2phy lists slot {int(slots[i])} as a replica of expert "
            f"{int(experts[i])}, but phy2log[{int(slots[i])}] = {int(plan.phy2log[slots[i]])}"
        )
    if plan.replica_tokens is not None:
        check_replica_tokens(plan.replica_tokens, used, name="plan.replica_tokens")
    if plan.slot_to_weight is not None:
        _check_slot_to_weight(plan, slots)


def _check_slot_to_weight(plan: ReplicaPlan, replica_slots: torch.Tensor) -> None:
    """slot_to_weight against phy2log: a weight row holds one expert, so two slots reading one row hold the same
    expert; a local slot that serves as a replica reads some row."""
    weights = plan.slot_to_weight.long()
    if weights.numel() and int(weights.min()) < -1:
        raise ValueError(f"plan.slot_to_weight must be >= -1 (-1 = no weight), got {int(weights.min())}")
    held = torch.nonzero((plan.phy2log >= 0) & (weights >= 0)).flatten()
    rows, experts = weights[held], plan.phy2log.long()[held]
    order = torch.argsort(rows * (plan.num_experts + 1) + experts)
    rows, experts, held = rows[order], experts[order], held[order]
    clash = torch.nonzero((rows[1:] == rows[:-1]) & (experts[1:] != experts[:-1])).flatten()
    if clash.numel():
        i = int(clash[0])
        raise ValueError(
            f"plan.slot_to_weight contradicts plan.phy2log: weight row {int(rows[i])} is read by slot {int(held[i])} "
            f"(expert {int(experts[i])}) and slot {int(held[i + 1])} (expert {int(experts[i + 1])}); one weight "
            f"row holds one expert"
        )
    served = replica_slots
    if plan.local_slots is not None:
        served = served[plan.local_slots[served]]  # other ranks' slots are never computed here
    missing = torch.nonzero(weights[served] < 0).flatten()
    if missing.numel():
        raise ValueError(
            f"plan.slot_to_weight is -1 for slot {int(served[missing[0]])}, a local slot that holds a replica; "
            f"give it a weight row"
        )


def _plan_tensors(plan: ReplicaPlan, num_experts: int, num_weights: int, device: torch.device) -> _PlanTensors:
    """The plan against this layer (shapes every call, values once per (plan, W)), and its kernel tensors."""
    if not isinstance(plan, ReplicaPlan):
        raise ValueError(f"plan must be a ReplicaPlan (or None for one replica per expert), got {type(plan).__name__}")
    if plan.phy2log.device != device:
        raise ValueError(f"plan must be on {device} (with hidden; see ReplicaPlan.to), got {plan.phy2log.device}")
    if plan.num_experts != num_experts:
        raise ValueError(
            f"plan.log2phy must have shape [E={num_experts}, R >= 1] (E from the routing), "
            f"got {tuple(plan.log2phy.shape)}"
        )
    cached = plan._layer_tensors.get(num_weights)
    if cached is not None:
        return cached
    if plan.slot_to_weight is None:
        if num_weights < num_experts:
            raise ValueError(
                f"plan.slot_to_weight is None, so slots read their logical expert's weights, but gate_up_proj has "
                f"{num_weights} weights for {num_experts} experts; pass slot_to_weight"
            )
        slot_to_weight = plan.phy2log
    else:
        check_range("plan.slot_to_weight", plan.slot_to_weight, -1, num_weights)
        slot_to_weight = plan.slot_to_weight
    used = torch.arange(plan.log2phy.shape[1], device=device)[None, :] < plan.logcnt[:, None].long()
    tensors = _PlanTensors(
        log2phy=plan.log2phy.to(torch.int32).contiguous(),
        logcnt=plan.logcnt.to(torch.int32).contiguous(),
        used=used,
        # free slots (-1) get no pairs; any valid row keeps the kernels' index range simple
        slot_to_weight=slot_to_weight.clamp(min=0).to(torch.int32).contiguous(),
    )
    plan._layer_tensors[num_weights] = tensors
    return tensors


def _local_pairs(slot_ids: torch.Tensor, local_slots: torch.Tensor | None, slot_to_weight: torch.Tensor):
    """(flat ids of the pairs computed here, ascending; their weight rows): kept pairs of local slots."""
    slots = slot_ids.reshape(-1).long()
    keep = slots >= 0
    if local_slots is not None:
        keep &= local_slots[slots.clamp(min=0)]
    pairs = torch.nonzero(keep).flatten()
    return pairs, slot_to_weight.long()[slots[pairs]]


@lru_cache(maxsize=64)
def _identity_plan(num_experts: int, device: torch.device) -> ReplicaPlan:
    return ReplicaPlan.identity(num_experts, device=device)


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
    if value_checks_enabled(device):
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
    block_m: moe_align's block on the Triton path (None = the tuned table's, else default_block_m; the torch
    path groups pairs without padding and ignores it). backend: "auto", "triton" or "torch", for every op.

    On CUDA the Triton path never waits for the device: buffers are sized for the worst case, the padded row
    count stays on the device, value checks are off (MOELESS_DEBUG=1 turns them on; plans are checked once,
    when built), and result.dispatch's drop report is computed only when read. So a call can be captured in a
    CUDA graph once a first call has run (it loads the tuned table and builds the identity plan).
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
        plan = _identity_plan(num_experts, device)
    tensors = _plan_tensors(plan, num_experts, num_weights, device)
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
    if value_checks_enabled(device):
        check_routing_covered(topk_ids, plan.logcnt, plan.replica_tokens, where="the plan (plan.logcnt)")
    num_tokens, k = topk_ids.shape
    num_slots = plan.num_slots

    # --- pairs -> slots -> permutation
    capacity, weights = dispatch_capacity(slot_capacity, capacity_policy, num_slots, topk_ids.shape,
                                          topk_weights if capacity_policy == "probability" else None, device)
    dispatch = _dispatch(_DispatchArgs(topk_ids.reshape(-1).long(), tensors.used, num_slots, capacity, weights),
                         topk_ids.shape, tensors.log2phy, tensors.logcnt, plan.replica_tokens, capacity_policy,
                         resolved)
    # --- experts, then the sum over K
    if resolved == "triton":
        config = moe_launch_config(num_tokens, k, num_slots, num_weights, two_inter // 2, hidden_size, dtype, device,
                                   block_m)
        # worst-case buffers (static shapes): no host sync
        sorted_token_ids, block_slot_ids, num_tokens_post_padded = _moe_align(
            dispatch.slot_ids, num_slots, config.block_m, plan.local_slots, resolved, True)
        pair_out = _grouped_swiglu_triton(hidden, gate_up_proj, down_proj, sorted_token_ids, block_slot_ids,
                                          num_tokens_post_padded, tensors.slot_to_weight, topk_weights, k,
                                          config.block_m, interleaved, config)
    else:
        # the torch path groups the pairs by weight row directly: the padded permutation is the GPU's layout
        pairs, weight_rows = _local_pairs(dispatch.slot_ids, plan.local_slots, tensors.slot_to_weight)
        pair_out = swiglu_pairs(hidden, gate_up_proj, down_proj, pairs, weight_rows, topk_weights, k, interleaved)
    out = combine(pair_out, k, backend=resolved)
    return MoEResult(out=out, topk_ids=topk_ids, topk_weights=topk_weights, dispatch=dispatch)
