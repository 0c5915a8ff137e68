"""replica_dispatch and moe_align: (token, k) pairs -> physical slots -> a block-aligned permutation per slot.

replica_dispatch maps each pair of a logical expert to one of that expert's replicas (physical slots) without
changing routing: the pairs of expert e, in flat order t*K + k, are cut into contiguous chunks whose sizes are
`replica_tokens[e, :logcnt[e]]` (or the even split: sizes differ by at most one, larger chunks first). An
optional per-slot capacity then drops pairs ("position": a slot keeps its first pairs in flat order;
"probability": it keeps its pairs of largest routing weight, ties to the lower flat index). Drops are always
reported (dropped_count, dropped_indices), never silent.

moe_align is vLLM's moe_align_block_size over physical slots: pairs grouped by slot (ascending), flat order
within a slot, each group padded to a multiple of block_m with the sentinel T*K; one slot id per block.

The Triton path computes each pair's rank within its expert (dispatch) or slot (align) in two deterministic
passes (jit/dispatch_kernels.py); the torch path does the same by stable sorts. Capacity policies run in torch
on top of either. This module must never re-route a pair to another expert, and holds no placement policy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from moeless_kernels._backend import resolve_backend
from moeless_kernels.checks import (
    FLOAT_DTYPES,
    check_choice,
    check_finite,
    check_int,
    check_range,
    check_tensor,
)

CAPACITY_POLICIES = ("none", "position", "probability")
INDEX_DTYPES = (torch.int32, torch.int64)
_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class DispatchResult:
    """Where each (token, k) pair goes.

    slot_ids        int32 [T, K]   physical slot of the pair, -1 = dropped by capacity
    slot_counts     int32 [P]      pairs kept per slot
    dropped_count   int            pairs dropped by capacity (0 when dropless)
    dropped_indices int64 [n]      flat indices t*K + k of the dropped pairs, ascending
    """

    slot_ids: torch.Tensor
    slot_counts: torch.Tensor
    dropped_count: int
    dropped_indices: torch.Tensor


# ---------------------------------------------------------------------------------------------------- dispatch


@dataclass(frozen=True)
class _DispatchArgs:
    flat_ids: torch.Tensor  # (N,) int64 expert per pair
    counts: torch.Tensor  # (E,) int64 pairs per expert
    used: torch.Tensor  # (E, R) bool: replica j < logcnt[e]
    num_slots: int
    capacity: torch.Tensor | None  # (P,) int64, None = dropless
    weights: torch.Tensor | None  # (N,) fp32, only for "probability"


def _validate_dispatch(topk_ids, log2phy, logcnt, replica_tokens, num_slots, slot_capacity, capacity_policy,
                       topk_weights) -> _DispatchArgs:
    check_tensor("topk_ids", topk_ids, ndim=2, dtypes=INDEX_DTYPES)
    device = topk_ids.device
    if topk_ids.numel() > _INT32_MAX - 1:
        raise ValueError(f"topk_ids has {topk_ids.numel()} pairs; flat indices must fit int32")
    check_tensor("log2phy", log2phy, ndim=2, dtypes=INDEX_DTYPES, device=device)
    num_experts, max_replicas = log2phy.shape
    if num_experts < 1 or max_replicas < 1:
        raise ValueError(f"log2phy must be [E, R] with E >= 1 and R >= 1, got {tuple(log2phy.shape)}")
    check_tensor("logcnt", logcnt, shape=(num_experts,), dtypes=INDEX_DTYPES, device=device)
    check_range("logcnt", logcnt, 0, max_replicas + 1)
    check_range("topk_ids", topk_ids, 0, num_experts)
    check_choice("capacity_policy", capacity_policy, CAPACITY_POLICIES)

    if num_slots is None:
        num_slots = int(log2phy.max()) + 1
    check_int("num_slots", num_slots, lo=0)
    flat_ids = topk_ids.reshape(-1).long()
    counts = torch.bincount(flat_ids, minlength=num_experts)

    # -- the plan: replicas j < logcnt[e] sit in distinct valid slots; every expert with pairs has a replica
    used = torch.arange(max_replicas, device=device)[None, :] < logcnt[:, None]
    used_slots = log2phy[used]
    if used_slots.numel() and (int(used_slots.min()) < 0 or int(used_slots.max()) >= num_slots):
        raise ValueError(
            f"log2phy[e, :logcnt[e]] must be slots in [0, num_slots={num_slots}), got values in "
            f"[{int(used_slots.min())}, {int(used_slots.max())}]"
        )
    if torch.unique(used_slots).numel() != used_slots.numel():
        raise ValueError("log2phy must give every replica its own slot; a slot appears twice in log2phy[e, :logcnt[e]]")
    orphans = torch.nonzero((counts > 0) & (logcnt == 0)).flatten()
    if orphans.numel():
        e = int(orphans[0])
        raise ValueError(
            f"logcnt[{e}] = 0 but expert {e} has {int(counts[e])} pairs in topk_ids; every expert with tokens needs "
            f"at least one replica in log2phy/logcnt"
        )

    if replica_tokens is not None:
        check_tensor("replica_tokens", replica_tokens, shape=(num_experts, max_replicas), dtypes=INDEX_DTYPES,
                     device=device)
        if replica_tokens.numel() and int(replica_tokens.min()) < 0:
            raise ValueError("replica_tokens must be non-negative")
        if bool((replica_tokens[~used] != 0).any()):
            raise ValueError("replica_tokens[e, j] must be 0 for j >= logcnt[e]")
        wrong = torch.nonzero(replica_tokens.sum(dim=1) != counts).flatten()
        if wrong.numel():
            e = int(wrong[0])
            raise ValueError(
                f"replica_tokens[{e}] sums to {int(replica_tokens[e].sum())} but expert {e} has {int(counts[e])} "
                f"pairs in topk_ids; each row must sum to its expert's pair count"
            )

    capacity = None
    if slot_capacity is not None:
        if capacity_policy == "none":
            raise ValueError(
                "slot_capacity is given but capacity_policy='none'; choose 'position' or 'probability' "
                "(or pass slot_capacity=None for dropless)"
            )
        if isinstance(slot_capacity, torch.Tensor):
            check_tensor("slot_capacity", slot_capacity, shape=(num_slots,), dtypes=INDEX_DTYPES, device=device)
            if slot_capacity.numel() and int(slot_capacity.min()) < 0:
                raise ValueError("slot_capacity must be non-negative")
            capacity = slot_capacity.long()
        else:
            check_int("slot_capacity", slot_capacity, lo=0)
            capacity = torch.full((num_slots,), slot_capacity, dtype=torch.long, device=device)

    weights = None
    if topk_weights is not None:
        check_tensor("topk_weights", topk_weights, shape=tuple(topk_ids.shape), dtypes=FLOAT_DTYPES + (torch.float64,),
                     device=device)
        check_finite("topk_weights", topk_weights)
        weights = topk_weights.reshape(-1)
    if capacity is not None and capacity_policy == "probability" and weights is None:
        raise ValueError("capacity_policy='probability' needs topk_weights [T, K]")
    return _DispatchArgs(flat_ids, counts, used, num_slots, capacity, weights)


def _even_quotas(counts: torch.Tensor, logcnt: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """replica_tokens of the even split: c pairs over n replicas, the first c % n get one more."""
    n = logcnt.long().clamp(min=1)
    j = torch.arange(used.shape[1], device=counts.device)
    quotas = (counts // n)[:, None] + (j[None, :] < (counts % n)[:, None]).long()
    return quotas * used


def _assign_torch(args: _DispatchArgs, log2phy, quotas):
    """(slot, rank inside the slot's chunk) per pair by a stable sort on the expert id."""
    flat, counts = args.flat_ids, args.counts
    n = flat.numel()
    order = torch.sort(flat, stable=True).indices
    expert_start = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(flat)
    rank[order] = torch.arange(n, device=flat.device) - expert_start[flat[order]]
    cum = torch.cumsum(quotas.long(), dim=1)
    pair_cum = cum[flat].contiguous()
    j = torch.searchsorted(pair_cum, rank[:, None], right=True).squeeze(1)
    chunk_start = torch.where(j > 0, pair_cum.gather(1, (j - 1).clamp(min=0)[:, None]).squeeze(1), 0)
    return log2phy.long()[flat, j], rank - chunk_start


def _block_n(n: int) -> int:
    # several programs even for small inputs (GPU occupancy; cross-block offsets exercised by tiny tests),
    # at most 128 pairs so the [BLOCK_N, BLOCK_N] rank comparison stays cheap
    return min(128, max(16, triton.next_power_of_2(triton.cdiv(n, 4))))


def _block_offsets(ids: torch.Tensor, num_groups: int, block_n: int) -> torch.Tensor:
    """Pass 1 + host prefix: (block_hist, block_offset), both (num_blocks, G) int32.

    block_hist[b, g] counts the pairs of group g in block b; block_offset[b, g] those in the blocks before b.
    """
    from moeless_kernels.jit.dispatch_kernels import group_histogram_kernel

    n = ids.numel()
    num_blocks = triton.cdiv(n, block_n)
    hist = torch.empty((num_blocks, num_groups), dtype=torch.int32, device=ids.device)
    group_histogram_kernel[(num_blocks,)](
        ids, hist, n, num_groups, BLOCK_N=block_n, BLOCK_G=triton.next_power_of_2(num_groups + 1)
    )
    return hist, (torch.cumsum(hist, dim=0, dtype=torch.int32) - hist)


def _assign_triton(args: _DispatchArgs, log2phy, logcnt, quotas):
    # imported here: triton.jit reads TRITON_INTERPRET when the kernel module is first imported
    from moeless_kernels.jit.dispatch_kernels import replica_slot_kernel

    flat = args.flat_ids
    n = flat.numel()
    num_experts, max_replicas = log2phy.shape
    block_n = _block_n(n)
    hist, offsets = _block_offsets(flat, num_experts, block_n)
    counts = hist.sum(dim=0, dtype=torch.int32)
    slot = torch.empty(n, dtype=torch.int32, device=flat.device)
    rank_in_slot = torch.empty(n, dtype=torch.int32, device=flat.device)
    even = quotas is None
    quota_cum = counts if even else torch.cumsum(quotas, dim=1, dtype=torch.int32).contiguous()
    replica_slot_kernel[(triton.cdiv(n, block_n),)](
        flat, offsets, counts, logcnt.to(torch.int32).contiguous(), log2phy.to(torch.int32).contiguous(), quota_cum,
        slot, rank_in_slot,
        n, num_experts, max_replicas,
        EVEN_SPLIT=even, BLOCK_N=block_n, BLOCK_R=triton.next_power_of_2(max_replicas),
    )
    return slot.long(), rank_in_slot.long()


def _keep_within_capacity(slot, rank_in_slot, capacity, policy, weights):
    """Which pairs their slot keeps; slot's chunk is one replica, so rank_in_slot is flat order within it."""
    if capacity is None:
        return torch.ones_like(slot, dtype=torch.bool)
    if policy == "position":
        return rank_in_slot < capacity[slot]
    # "probability": order by (slot, weight descending, flat index) with two stable sorts
    by_weight = torch.sort(weights.float(), descending=True, stable=True).indices
    order = by_weight[torch.sort(slot[by_weight], stable=True).indices]
    slot_sorted = slot[order]
    per_slot = torch.bincount(slot_sorted, minlength=capacity.numel())
    first = torch.cumsum(per_slot, 0) - per_slot
    keep = torch.empty_like(slot, dtype=torch.bool)
    keep[order] = torch.arange(slot.numel(), device=slot.device) - first[slot_sorted] < capacity[slot_sorted]
    return keep


def replica_dispatch(
    topk_ids: torch.Tensor,
    log2phy: torch.Tensor,
    logcnt: torch.Tensor,
    replica_tokens: torch.Tensor | None = None,
    *,
    num_slots: int | None = None,
    slot_capacity: int | torch.Tensor | None = None,
    capacity_policy: str = "none",
    topk_weights: torch.Tensor | None = None,
    backend: str = "auto",
) -> DispatchResult:
    """Map each (token, k) pair of topk_ids [T, K] to a physical slot of its expert's replicas.

    log2phy [E, R] int: slot of replica j of expert e (only j < logcnt[e] is read); logcnt [E] int: replicas
    per expert; replica_tokens [E, R] int: chunk sizes (row e sums to expert e's pair count, zero beyond
    logcnt[e]), None = even split. num_slots P defaults to log2phy.max() + 1. slot_capacity: None (dropless),
    an int, or an int tensor [P], applied by capacity_policy "position" or "probability" (needs topk_weights).
    """
    args = _validate_dispatch(topk_ids, log2phy, logcnt, replica_tokens, num_slots, slot_capacity,
                              capacity_policy, topk_weights)
    num_tokens, top_k = topk_ids.shape
    device = topk_ids.device
    if args.flat_ids.numel() == 0:
        slot = rank_in_slot = args.flat_ids
    elif resolve_backend(backend, device) == "triton":
        slot, rank_in_slot = _assign_triton(args, log2phy, logcnt, replica_tokens)
    else:
        quotas = replica_tokens if replica_tokens is not None else _even_quotas(args.counts, logcnt, args.used)
        slot, rank_in_slot = _assign_torch(args, log2phy, quotas)
    keep = _keep_within_capacity(slot, rank_in_slot, args.capacity, capacity_policy, args.weights)
    slot_ids = torch.where(keep, slot, -1)
    slot_counts = torch.bincount(slot_ids[keep], minlength=args.num_slots).to(torch.int32)
    dropped_indices = torch.nonzero(~keep).flatten()
    return DispatchResult(
        slot_ids=slot_ids.to(torch.int32).reshape(num_tokens, top_k),
        slot_counts=slot_counts,
        dropped_count=int(dropped_indices.numel()),
        dropped_indices=dropped_indices,
    )


def replica_dispatch_reference(
    topk_ids: torch.Tensor,
    log2phy: torch.Tensor,
    logcnt: torch.Tensor,
    replica_tokens: torch.Tensor | None = None,
    *,
    num_slots: int | None = None,
    slot_capacity: int | torch.Tensor | None = None,
    capacity_policy: str = "none",
    topk_weights: torch.Tensor | None = None,
) -> DispatchResult:
    """Pure-torch replica_dispatch (same contract, same validation)."""
    return replica_dispatch(topk_ids, log2phy, logcnt, replica_tokens, num_slots=num_slots,
                            slot_capacity=slot_capacity, capacity_policy=capacity_policy,
                            topk_weights=topk_weights, backend="torch")


# ---------------------------------------------------------------------------------------------------- align


def _validate_align(slot_ids, num_slots, block_m, local_slots):
    check_tensor("slot_ids", slot_ids, ndim=2, dtypes=INDEX_DTYPES)
    if slot_ids.numel() > _INT32_MAX - 1:
        raise ValueError(f"slot_ids has {slot_ids.numel()} pairs; flat indices must fit int32")
    check_int("num_slots", num_slots, lo=1)
    check_int("block_m", block_m, lo=1)
    check_range("slot_ids", slot_ids, -1, num_slots)
    if local_slots is not None:
        check_tensor("local_slots", local_slots, shape=(num_slots,), dtypes=(torch.bool,), device=slot_ids.device)


def _aligned_slots(slot_ids, num_slots, local_slots):
    """Flat slot per pair, -1 where the pair is dropped or its slot is not local."""
    flat = slot_ids.reshape(-1).long()
    if local_slots is None:
        return flat
    return torch.where((flat >= 0) & local_slots[flat.clamp(min=0)], flat, -1)


def _padded_layout(counts: torch.Tensor, block_m: int):
    """(first row of each slot's padded group, N_pad, the slot of each block); empty slots get no block."""
    padded = (counts + block_m - 1) // block_m * block_m
    start = torch.cumsum(padded, 0) - padded
    num_tokens_post_padded = int(padded.sum())
    block_slot_ids = torch.repeat_interleave(
        torch.arange(counts.numel(), device=counts.device), padded // block_m,
        output_size=num_tokens_post_padded // block_m,
    ).to(torch.int32)
    return start, num_tokens_post_padded, block_slot_ids


def _moe_align_torch(slot_ids, num_slots, block_m, local_slots):
    flat = _aligned_slots(slot_ids, num_slots, local_slots)
    pairs = torch.nonzero(flat >= 0).flatten()
    order = torch.sort(flat[pairs], stable=True).indices
    pairs = pairs[order]
    slots = flat[pairs]
    counts = torch.bincount(slots, minlength=num_slots)
    start, n_pad, block_slot_ids = _padded_layout(counts, block_m)
    first = torch.cumsum(counts, 0) - counts
    rows = start[slots] + torch.arange(slots.numel(), device=slots.device) - first[slots]
    sorted_token_ids = torch.full((n_pad,), slot_ids.numel(), dtype=torch.int32, device=slot_ids.device)
    sorted_token_ids[rows] = pairs.to(torch.int32)
    return sorted_token_ids, block_slot_ids, n_pad


def _moe_align_triton(slot_ids, num_slots, block_m, local_slots):
    # imported here: triton.jit reads TRITON_INTERPRET when the kernel module is first imported
    from moeless_kernels.jit.dispatch_kernels import align_scatter_kernel

    flat = _aligned_slots(slot_ids, num_slots, local_slots).contiguous()
    n = flat.numel()
    if n == 0:
        return _moe_align_torch(slot_ids, num_slots, block_m, local_slots)
    block_n = _block_n(n)
    hist, offsets = _block_offsets(flat, num_slots, block_n)
    start, n_pad, block_slot_ids = _padded_layout(hist.sum(dim=0), block_m)
    # exactly N_pad rows (the int result already costs a device sync, so no worst-case buffer is kept)
    sorted_token_ids = torch.full((n_pad,), n, dtype=torch.int32, device=flat.device)
    align_scatter_kernel[(triton.cdiv(n, block_n),)](
        flat, offsets, start.to(torch.int32), sorted_token_ids, n, num_slots, BLOCK_N=block_n
    )
    return sorted_token_ids, block_slot_ids, n_pad


def moe_align(
    slot_ids: torch.Tensor,
    num_slots: int,
    block_m: int,
    local_slots: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Group the pairs of slot_ids [T, K] by slot, each group padded to a multiple of block_m.

    Returns (sorted_token_ids int32 [N_pad]: flat pair index t*K + k per row, padding = T*K;
    block_slot_ids int32 [N_pad // block_m]: the slot of each block; num_tokens_post_padded = N_pad).
    Only pairs with slot_ids >= 0 and local_slots[slot] True (default: all slots) are included; slots without
    pairs get no block.
    """
    _validate_align(slot_ids, num_slots, block_m, local_slots)
    if resolve_backend(backend, slot_ids.device) == "triton":
        return _moe_align_triton(slot_ids, num_slots, block_m, local_slots)
    return _moe_align_torch(slot_ids, num_slots, block_m, local_slots)


def moe_align_reference(
    slot_ids: torch.Tensor,
    num_slots: int,
    block_m: int,
    local_slots: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Pure-torch moe_align (same contract, same validation)."""
    return moe_align(slot_ids, num_slots, block_m, local_slots, backend="torch")
