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

from moeless_kernels._backend import resolve_backend
from moeless_kernels.checks import (
    FLOAT_DTYPES,
    check_choice,
    check_finite,
    check_int,
    check_range,
    check_tensor,
    value_checks_enabled,
)
from moeless_kernels.launch_configs import cdiv, dispatch_block_n, next_power_of_2

CAPACITY_POLICIES = ("none", "position", "probability")
INDEX_DTYPES = (torch.int32, torch.int64)
_INT32_MAX = 2**31 - 1


class DispatchResult:
    """Where each (token, k) pair goes.

    slot_ids        int32 [T, K]   physical slot of the pair, -1 = dropped (by capacity; or, where value checks
                                   are off, a pair that no replica can take: see replica_dispatch)
    slot_counts     int32 [P]      pairs kept per slot
    dropped_count   int            pairs dropped (0 when dropless)
    dropped_indices int64 [n]      flat indices t*K + k of the dropped pairs, ascending

    dropped_count and dropped_indices are derived from slot_ids on first read (a host sync on CUDA, so a hot
    path that never reads them never waits); pass them to the constructor to store given values.
    """

    __slots__ = ("slot_ids", "slot_counts", "_dropped_indices")

    def __init__(self, slot_ids: torch.Tensor, slot_counts: torch.Tensor, dropped_count: int | None = None,
                 dropped_indices: torch.Tensor | None = None):
        if (dropped_count is None) != (dropped_indices is None):
            raise ValueError("give dropped_count and dropped_indices together, or neither (derived from slot_ids)")
        if dropped_indices is not None and dropped_count != dropped_indices.numel():
            raise ValueError(f"dropped_count={dropped_count} disagrees with {dropped_indices.numel()} dropped_indices")
        self.slot_ids = slot_ids
        self.slot_counts = slot_counts
        self._dropped_indices = dropped_indices

    @property
    def dropped_indices(self) -> torch.Tensor:
        if self._dropped_indices is None:
            self._dropped_indices = torch.nonzero(self.slot_ids.reshape(-1) < 0).flatten()
        return self._dropped_indices

    @property
    def dropped_count(self) -> int:
        return int(self.dropped_indices.numel())

    def __repr__(self) -> str:
        return (f"DispatchResult(slot_ids={self.slot_ids!r}, slot_counts={self.slot_counts!r}, "
                f"dropped_indices={self._dropped_indices!r})")


# ---------------------------------------------------------------------------------------------------- dispatch


@dataclass(frozen=True)
class _DispatchArgs:
    flat_ids: torch.Tensor  # (N,) int64 expert per pair
    used: torch.Tensor  # (E, R) bool: replica j < logcnt[e]
    num_slots: int
    capacity: torch.Tensor | None  # (P,) int64, None = dropless
    weights: torch.Tensor | None  # (N,) fp32, only for "probability"


def check_plan_tables(log2phy: torch.Tensor, logcnt: torch.Tensor, num_slots: int, prefix: str = "") -> None:
    """Values of a replica table (syncs): logcnt in [0, R], the listed replicas distinct slots in [0, P)."""
    max_replicas = log2phy.shape[1]
    check_range(f"{prefix}logcnt", logcnt, 0, max_replicas + 1)
    used = torch.arange(max_replicas, device=log2phy.device)[None, :] < logcnt[:, None]
    used_slots = log2phy[used]
    if used_slots.numel() and (int(used_slots.min()) < 0 or int(used_slots.max()) >= num_slots):
        raise ValueError(
            f"{prefix}log2phy[e, :logcnt[e]] must be slots in [0, num_slots={num_slots}), got values in "
            f"[{int(used_slots.min())}, {int(used_slots.max())}]"
        )
    if torch.unique(used_slots).numel() != used_slots.numel():
        raise ValueError(f"{prefix}log2phy must give every replica its own slot; a slot appears twice in "
                         f"{prefix}log2phy[e, :logcnt[e]]")


def check_routing_covered(topk_ids: torch.Tensor, logcnt: torch.Tensor, replica_tokens: torch.Tensor | None,
                          where: str = "log2phy/logcnt") -> None:
    """Values that depend on the routing (syncs): every expert with pairs has a replica; quota rows sum to the
    expert's pair count."""
    num_experts = logcnt.shape[0]
    counts = torch.bincount(topk_ids.reshape(-1).long(), minlength=num_experts)
    orphans = torch.nonzero((counts > 0) & (logcnt.long() == 0)).flatten()
    if orphans.numel():
        e = int(orphans[0])
        raise ValueError(
            f"logcnt[{e}] = 0 but expert {e} has {int(counts[e])} pairs in topk_ids; every expert with tokens needs "
            f"at least one replica in {where}"
        )
    if replica_tokens is not None:
        wrong = torch.nonzero(replica_tokens.sum(dim=1) != counts).flatten()
        if wrong.numel():
            e = int(wrong[0])
            raise ValueError(
                f"replica_tokens[{e}] sums to {int(replica_tokens[e].sum())} but expert {e} has {int(counts[e])} "
                f"pairs in topk_ids; each row must sum to its expert's pair count"
            )


def check_replica_tokens(replica_tokens: torch.Tensor, used: torch.Tensor, name: str = "replica_tokens") -> None:
    """Values of a quota table (syncs): non-negative, zero beyond logcnt[e]."""
    if replica_tokens.numel() and int(replica_tokens.min()) < 0:
        raise ValueError(f"{name} must be non-negative")
    if bool((replica_tokens[~used] != 0).any()):
        raise ValueError(f"{name}[e, j] must be 0 for j >= logcnt[e]")


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
    if replica_tokens is not None:
        check_tensor("replica_tokens", replica_tokens, shape=(num_experts, max_replicas), dtypes=INDEX_DTYPES,
                     device=device)
    if num_slots is None:
        num_slots = int(log2phy.max()) + 1  # a host sync: pass num_slots on a hot path
    check_int("num_slots", num_slots, lo=0)
    values = value_checks_enabled(device)
    used = torch.arange(max_replicas, device=device)[None, :] < logcnt[:, None]
    if values:
        check_range("topk_ids", topk_ids, 0, num_experts)
        check_plan_tables(log2phy, logcnt, num_slots)
        if replica_tokens is not None:
            check_replica_tokens(replica_tokens, used)
        check_routing_covered(topk_ids, logcnt, replica_tokens)

    capacity, weights = dispatch_capacity(slot_capacity, capacity_policy, num_slots, topk_ids.shape, topk_weights,
                                          device)
    return _DispatchArgs(topk_ids.reshape(-1).long(), used, num_slots, capacity, weights)


def dispatch_capacity(slot_capacity, capacity_policy, num_slots, shape, topk_weights, device):
    """Validated (capacity int64 [P] or None, flat routing weights or None) of replica_dispatch's capacity
    arguments; value checks only where checks.value_checks_enabled says."""
    check_choice("capacity_policy", capacity_policy, CAPACITY_POLICIES)
    values = value_checks_enabled(device)
    capacity = None
    if slot_capacity is not None:
        if capacity_policy == "none":
            raise ValueError(
                "slot_capacity is given but capacity_policy='none'; choose 'position' or 'probability' "
                "(or pass slot_capacity=None for dropless)"
            )
        if isinstance(slot_capacity, torch.Tensor):
            check_tensor("slot_capacity", slot_capacity, shape=(num_slots,), dtypes=INDEX_DTYPES, device=device)
            if values and slot_capacity.numel() and int(slot_capacity.min()) < 0:
                raise ValueError("slot_capacity must be non-negative")
            capacity = slot_capacity.long()
        else:
            check_int("slot_capacity", slot_capacity, lo=0)
            capacity = torch.full((num_slots,), slot_capacity, dtype=torch.long, device=device)

    weights = None
    if topk_weights is not None:
        check_tensor("topk_weights", topk_weights, shape=tuple(shape), dtypes=FLOAT_DTYPES + (torch.float64,),
                     device=device)
        if values:
            check_finite("topk_weights", topk_weights)
        weights = topk_weights.reshape(-1)
    if capacity is not None and capacity_policy == "probability" and weights is None:
        raise ValueError("capacity_policy='probability' needs topk_weights [T, K]")
    return capacity, weights


def _even_quotas(counts: torch.Tensor, logcnt: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """replica_tokens of the even split: c pairs over n replicas, the first c % n get one more."""
    n = logcnt.long().clamp(min=1)
    j = torch.arange(used.shape[1], device=counts.device)
    quotas = (counts // n)[:, None] + (j[None, :] < (counts % n)[:, None]).long()
    return quotas * used


def _assign_torch(args: _DispatchArgs, log2phy, logcnt, replica_tokens, need_rank: bool = True):
    """(slot, rank inside the slot's chunk) per pair by a stable sort on the expert id; slot -1 where the pair's
    chunk does not exist (no replica, or quotas short of the expert's pairs). With one replica column
    (R = 1: no expert replicated) and no need for the rank (no position capacity), the slot is a lookup."""
    flat = args.flat_ids
    n = flat.numel()
    if log2phy.shape[1] == 1 and replica_tokens is None and not need_rank:
        return torch.where(logcnt.long()[flat] > 0, log2phy.long()[flat, 0], -1), None
    counts = torch.bincount(flat, minlength=log2phy.shape[0])
    quotas = replica_tokens if replica_tokens is not None else _even_quotas(counts, logcnt, args.used)
    order = torch.sort(flat, stable=True).indices
    expert_start = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(flat)
    rank[order] = torch.arange(n, device=flat.device) - expert_start[flat[order]]
    cum = torch.cumsum(quotas.long(), dim=1)
    pair_cum = cum[flat].contiguous()
    j = torch.searchsorted(pair_cum, rank[:, None], right=True).squeeze(1)
    chunk_start = torch.where(j > 0, pair_cum.gather(1, (j - 1).clamp(min=0)[:, None]).squeeze(1), 0)
    has_chunk = j < logcnt.long()[flat]
    slot = torch.where(has_chunk, log2phy.long()[flat, j.clamp(max=log2phy.shape[1] - 1)], -1)
    return slot, rank - chunk_start


def _block_offsets(ids: torch.Tensor, num_groups: int, block_n: int) -> torch.Tensor:
    """Pass 1 + device prefix: (block_hist, block_offset), both (num_blocks, G) int32.

    block_hist[b, g] counts the pairs of group g in block b; block_offset[b, g] those in the blocks before b.
    """
    from moeless_kernels.jit.dispatch_kernels import group_histogram_kernel

    n = ids.numel()
    num_blocks = cdiv(n, block_n)
    hist = torch.empty((num_blocks, num_groups), dtype=torch.int32, device=ids.device)
    group_histogram_kernel[(num_blocks,)](
        ids, hist, n, num_groups, BLOCK_N=block_n, BLOCK_G=next_power_of_2(num_groups + 1)
    )
    return hist, (torch.cumsum(hist, dim=0, dtype=torch.int32) - hist)


def _assign_triton(args: _DispatchArgs, log2phy, logcnt, replica_tokens):
    # imported here: triton.jit reads TRITON_INTERPRET when the kernel module is first imported
    from moeless_kernels.jit.dispatch_kernels import replica_slot_kernel

    flat = args.flat_ids
    n = flat.numel()
    num_experts, max_replicas = log2phy.shape
    block_n = dispatch_block_n(n)
    hist, offsets = _block_offsets(flat, num_experts, block_n)
    counts = hist.sum(dim=0, dtype=torch.int32)
    slot = torch.empty(n, dtype=torch.int32, device=flat.device)
    rank_in_slot = torch.empty(n, dtype=torch.int32, device=flat.device)
    even = replica_tokens is None
    quota_cum = counts if even else torch.cumsum(replica_tokens, dim=1, dtype=torch.int32).contiguous()
    replica_slot_kernel[(cdiv(n, block_n),)](
        flat, offsets, counts, logcnt.to(torch.int32).contiguous(), log2phy.to(torch.int32).contiguous(), quota_cum,
        slot, rank_in_slot,
        n, num_experts, max_replicas,
        EVEN_SPLIT=even, BLOCK_N=block_n, BLOCK_R=next_power_of_2(max_replicas),
    )
    return slot.long(), rank_in_slot.long()


def _keep_within_capacity(slot, rank_in_slot, capacity, policy, weights):
    """Which pairs their slot keeps (never one without a slot); a slot's chunk is one replica, so rank_in_slot
    is flat order within it. Counting uses scatter_add, which has no data-dependent shape (no host sync)."""
    has_slot = slot >= 0
    if capacity is None:
        return has_slot
    safe_slot = slot.clamp(min=0)
    if policy == "position":
        return has_slot & (rank_in_slot < capacity[safe_slot])
    # "probability": order by (slot, weight descending, flat index) with two stable sorts; pairs without a slot
    # sort first (slot -1) and are counted in a bin of their own
    by_weight = torch.sort(weights.float(), descending=True, stable=True).indices
    order = by_weight[torch.sort(slot[by_weight], stable=True).indices]
    bins = slot[order] + 1
    per_bin = torch.zeros(capacity.numel() + 1, dtype=torch.long, device=slot.device)
    per_bin.scatter_add_(0, bins, torch.ones_like(bins))
    first = torch.cumsum(per_bin, 0) - per_bin
    keep = torch.empty_like(slot, dtype=torch.bool)
    keep[order] = torch.arange(slot.numel(), device=slot.device) - first[bins] < capacity[(bins - 1).clamp(min=0)]
    return keep & has_slot


def _slot_counts(slot_ids: torch.Tensor, num_slots: int) -> torch.Tensor:
    """int32 [P] pairs per slot, ignoring -1, without a data-dependent shape."""
    bins = slot_ids.reshape(-1).long() + 1
    counts = torch.zeros(num_slots + 1, dtype=torch.long, device=slot_ids.device)
    counts.scatter_add_(0, bins, torch.ones_like(bins))
    return counts[1:].to(torch.int32)


def _dispatch(args: _DispatchArgs, shape, log2phy, logcnt, replica_tokens, capacity_policy, backend) -> DispatchResult:
    """replica_dispatch on validated arguments; no host sync on the Triton path."""
    if args.flat_ids.numel() == 0:
        slot = rank_in_slot = args.flat_ids
    elif backend == "triton":
        slot, rank_in_slot = _assign_triton(args, log2phy, logcnt, replica_tokens)
    else:
        slot, rank_in_slot = _assign_torch(args, log2phy, logcnt, replica_tokens,
                                           need_rank=args.capacity is not None and capacity_policy == "position")
    keep = _keep_within_capacity(slot, rank_in_slot, args.capacity, capacity_policy, args.weights)
    slot_ids = torch.where(keep, slot, -1).to(torch.int32)
    return DispatchResult(slot_ids=slot_ids.reshape(shape), slot_counts=_slot_counts(slot_ids, args.num_slots))


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
    logcnt[e]), None = even split. num_slots P defaults to log2phy.max() + 1 (a host sync: pass it on a hot
    path). slot_capacity: None (dropless), an int, or an int tensor [P], applied by capacity_policy "position"
    or "probability" (needs topk_weights).

    Values are checked where checks.value_checks_enabled says (CPU, or MOELESS_DEBUG=1): out-of-range ids,
    an expert with pairs but no replica, quota rows that do not sum to the pair counts raise ValueError.
    Where they are not checked (CUDA by default: no host sync), such pairs get slot -1 and show in
    dropped_count / dropped_indices; nothing reads memory out of range.
    """
    args = _validate_dispatch(topk_ids, log2phy, logcnt, replica_tokens, num_slots, slot_capacity,
                              capacity_policy, topk_weights)
    return _dispatch(args, topk_ids.shape, log2phy, logcnt, replica_tokens, capacity_policy,
                     resolve_backend(backend, topk_ids.device))


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
    if value_checks_enabled(slot_ids.device):
        check_range("slot_ids", slot_ids, -1, num_slots)
    if local_slots is not None:
        check_tensor("local_slots", local_slots, shape=(num_slots,), dtypes=(torch.bool,), device=slot_ids.device)


def _aligned_slots(slot_ids, num_slots, local_slots):
    """Flat slot per pair, -1 where the pair is dropped or its slot is not local (or out of range)."""
    flat = slot_ids.reshape(-1).long()
    keep = (flat >= 0) & (flat < num_slots)
    if local_slots is not None:
        keep &= local_slots[flat.clamp(0, num_slots - 1)]
    return torch.where(keep, flat, -1)


def max_aligned_blocks(num_pairs: int, num_slots: int, block_m: int) -> int:
    """Most BLOCK_M blocks moe_align can need: every non-empty slot (at most min(P, N) of them) pads its run by
    fewer than block_m rows."""
    return (num_pairs + min(num_slots, num_pairs) * (block_m - 1)) // block_m


def _padded_layout(counts: torch.Tensor, block_m: int, num_blocks: int | None):
    """(first row of each slot's padded run, num_tokens_post_padded int32 [1], slot of each block (-1 past the
    end)). num_blocks None: exactly the blocks needed (one host sync to learn how many)."""
    blocks = (counts.long() + block_m - 1) // block_m
    block_end = torch.cumsum(blocks, 0)
    start = (block_end - blocks) * block_m
    num_tokens_post_padded = (block_end[-1:] * block_m).to(torch.int32)
    if num_blocks is None:
        num_blocks = int(block_end[-1])
    slot_of_block = torch.searchsorted(block_end, torch.arange(num_blocks, device=counts.device), right=True)
    block_slot_ids = torch.where(slot_of_block < counts.numel(), slot_of_block, -1).to(torch.int32)
    return start, num_tokens_post_padded, block_slot_ids


def _moe_align_torch(flat, num_slots, block_m, num_blocks):
    pairs = torch.nonzero(flat >= 0).flatten()
    order = torch.sort(flat[pairs], stable=True).indices
    pairs = pairs[order]
    slots = flat[pairs]
    counts = torch.bincount(slots, minlength=num_slots)
    start, n_pad, block_slot_ids = _padded_layout(counts, block_m, num_blocks)
    first = torch.cumsum(counts, 0) - counts
    rows = start[slots] + torch.arange(slots.numel(), device=slots.device) - first[slots]
    sorted_token_ids = torch.full((block_slot_ids.numel() * block_m,), flat.numel(), dtype=torch.int32,
                                  device=flat.device)
    sorted_token_ids[rows] = pairs.to(torch.int32)
    return sorted_token_ids, block_slot_ids, n_pad


def _moe_align_triton(flat, num_slots, block_m, num_blocks):
    # imported here: triton.jit reads TRITON_INTERPRET when the kernel module is first imported
    from moeless_kernels.jit.dispatch_kernels import align_scatter_kernel

    n = flat.numel()
    block_n = dispatch_block_n(n)
    hist, offsets = _block_offsets(flat, num_slots, block_n)
    start, n_pad, block_slot_ids = _padded_layout(hist.sum(dim=0), block_m, num_blocks)
    sorted_token_ids = torch.full((block_slot_ids.numel() * block_m,), n, dtype=torch.int32, device=flat.device)
    align_scatter_kernel[(cdiv(n, block_n),)](
        flat, offsets, start.to(torch.int32), sorted_token_ids, n, num_slots, BLOCK_N=block_n
    )
    return sorted_token_ids, block_slot_ids, n_pad


def _moe_align(slot_ids, num_slots, block_m, local_slots, backend, static_shapes):
    """moe_align on validated arguments; num_tokens_post_padded as an int32 [1] device tensor."""
    flat = _aligned_slots(slot_ids, num_slots, local_slots).contiguous()
    num_blocks = max_aligned_blocks(flat.numel(), num_slots, block_m) if static_shapes else None
    if backend == "triton" and flat.numel():
        return _moe_align_triton(flat, num_slots, block_m, num_blocks)
    return _moe_align_torch(flat, num_slots, block_m, num_blocks)


def moe_align(
    slot_ids: torch.Tensor,
    num_slots: int,
    block_m: int,
    local_slots: torch.Tensor | None = None,
    backend: str = "auto",
    *,
    static_shapes: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, int | torch.Tensor]:
    """Group the pairs of slot_ids [T, K] by slot, each group padded to a multiple of block_m.

    Returns (sorted_token_ids int32 [N_pad]: flat pair index t*K + k per row, padding = T*K;
    block_slot_ids int32 [N_pad // block_m]: the slot of each block, -1 for blocks past the end;
    num_tokens_post_padded: the rows in use). Only pairs with slot_ids >= 0 and local_slots[slot] True (default:
    all slots) are included; slots without pairs get no block.

    static_shapes=False: N_pad = num_tokens_post_padded exactly, returned as an int (one host sync on CUDA).
    static_shapes=True: N_pad is the worst case for T*K pairs over num_slots slots (max_aligned_blocks, as
    vLLM sizes its buffers), the tail blocks are -1, and num_tokens_post_padded stays an int32 [1] tensor on
    the device: no host sync, and CUDA graphs can capture it.
    """
    _validate_align(slot_ids, num_slots, block_m, local_slots)
    if not isinstance(static_shapes, bool):
        raise ValueError(f"static_shapes must be a bool, got {static_shapes!r}")
    sorted_token_ids, block_slot_ids, n_pad = _moe_align(
        slot_ids, num_slots, block_m, local_slots, resolve_backend(backend, slot_ids.device), static_shapes)
    return sorted_token_ids, block_slot_ids, n_pad if static_shapes else sorted_token_ids.numel()


def moe_align_reference(
    slot_ids: torch.Tensor,
    num_slots: int,
    block_m: int,
    local_slots: torch.Tensor | None = None,
    *,
    static_shapes: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, int | torch.Tensor]:
    """Pure-torch moe_align (same contract, same validation)."""
    return moe_align(slot_ids, num_slots, block_m, local_slots, backend="torch", static_shapes=static_shapes)
