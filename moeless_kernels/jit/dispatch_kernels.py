"""Triton jit code of replica_dispatch and moe_align: ranks of (token, k) pairs within a group, in flat order.

Both ops need, for every pair i = t*K + k, its rank among the earlier pairs of the same group (group = logical
expert for dispatch, physical slot for align). Two passes, no atomics, so the result is deterministic:
  pass 1 (group_histogram_kernel): each program counts its block of pairs per group -> block_hist[b, g];
  host: exclusive prefix over blocks (torch.cumsum, [num_blocks, G] is small) -> block_offset[b, g];
  pass 2 (replica_slot_kernel / align_scatter_kernel): rank = block_offset[b, g] + earlier pairs of g in the
  block (a [BLOCK_N, BLOCK_N] comparison), then the op's own use of the rank.

Index arrays (host wrappers: moeless_kernels/dispatch.py)
    ids           (N,)              int32/int64  flat group id per pair, N = T*K; ids outside [0, G) (-1: pair not
                                                 counted) are skipped, and dispatch gives them slot -1
                                                 (reported as dropped): no id reads memory out of range
    block_hist    (num_blocks, G)   int32        out of pass 1
    block_offset  (num_blocks, G)   int32        pairs of group g in blocks before b
    counts        (E,)              int32        pairs per expert
    logcnt        (E,)              int32        replicas per expert
    log2phy       (E, R)            int32        slot of replica j of expert e (-1 pad)
    quota_cum     (E, R)            int32        inclusive cumsum of replica_tokens (dummy for the even split)
    slot_ids      (N,)              int32        out: slot of the pair before capacity
    rank_in_slot  (N,)              int32        out: position of the pair inside its slot's chunk
    slot_start    (P,)              int32        first row of slot p's padded group in sorted_token_ids
    sorted_ids    (N_pad,)          int32        out of align: flat pair index per row, prefilled with T*K

Must never: allocate, validate, apply capacity, or read the device driver (the wrappers do that).
"""
import triton
import triton.language as tl


@triton.jit
def group_histogram_kernel(
    ids_ptr,  # (N,) int32/int64
    hist_ptr,  # (num_blocks, G) int32
    N,
    G,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """Grid (num_blocks,): program b counts the pairs [b*BLOCK_N, (b+1)*BLOCK_N) per group into block_hist[b].

    BLOCK_G > G: pairs that are masked or negative go to the spare bin G, which is not stored (tl.histogram's
    own mask argument is missing from older Triton).
    """
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = offs < N
    ids = tl.load(ids_ptr + offs, mask=ok, other=-1).to(tl.int32)
    bins = tl.where(ok & (ids >= 0) & (ids < G), ids, G)
    hist = tl.histogram(bins, BLOCK_G)
    gcols = tl.arange(0, BLOCK_G)
    tl.store(hist_ptr + pid.to(tl.int64) * G + gcols, hist, mask=gcols < G)


@triton.jit
def _rank_in_group(ids, ok, pid, block_offset_ptr, G, BLOCK_N: tl.constexpr):
    """Rank of each pair among the pairs of its group in flat order: earlier blocks + earlier pairs here."""
    lane = tl.arange(0, BLOCK_N)
    same = (ids[:, None] == ids[None, :]) & ok[None, :] & (lane[None, :] < lane[:, None])
    local = tl.sum(same.to(tl.int32), axis=1)
    base = tl.load(block_offset_ptr + pid.to(tl.int64) * G + ids, mask=ok, other=0)
    return base + local


@triton.jit
def replica_slot_kernel(
    ids_ptr,  # (N,) int32/int64 logical expert per pair; outside [0, E) -> slot -1
    block_offset_ptr,  # (num_blocks, E) int32
    counts_ptr,  # (E,) int32
    logcnt_ptr,  # (E,) int32
    log2phy_ptr,  # (E, R) int32, contiguous
    quota_cum_ptr,  # (E, R) int32, contiguous (unused when EVEN_SPLIT)
    slot_ids_ptr,  # (N,) int32 out
    rank_in_slot_ptr,  # (N,) int32 out
    N,
    E,
    R,
    EVEN_SPLIT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Grid (num_blocks,): program b maps pairs [b*BLOCK_N, (b+1)*BLOCK_N) to (slot, rank inside the slot).

    The pairs of expert e, in flat order, are cut into contiguous chunks; the chunk that holds rank r is the
    replica j, its slot log2phy[e, j]. A pair whose chunk does not exist (no replica: logcnt[e] = 0, or quotas
    summing to fewer pairs than the expert has) or whose id is out of range gets slot -1.
    """
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = offs < N
    ids = tl.load(ids_ptr + offs, mask=in_range, other=0).to(tl.int32)
    ok = in_range & (ids >= 0) & (ids < E)
    ids = tl.where(ok, ids, 0)
    rank = _rank_in_group(ids, ok, pid, block_offset_ptr, E, BLOCK_N)
    replicas = tl.load(logcnt_ptr + ids, mask=ok, other=0)

    # -- replica j holding rank r, and where its chunk starts
    if EVEN_SPLIT:
        # c pairs over n replicas: the first c % n chunks hold c // n + 1 pairs, the rest c // n
        c = tl.load(counts_ptr + ids, mask=ok, other=0)
        n = tl.maximum(replicas, 1)
        small = c // n
        rem = c % n
        big_end = rem * (small + 1)
        in_big = rank < big_end
        j = tl.where(in_big, rank // (small + 1), rem + (rank - big_end) // tl.maximum(small, 1))
        start = tl.where(in_big, j * (small + 1), big_end + (j - rem) * small)
    else:
        # j = number of inclusive cumulative quotas <= r (zero quotas are skipped naturally)
        rcols = tl.arange(0, BLOCK_R)
        row = ids.to(tl.int64) * R
        cum = tl.load(quota_cum_ptr + row[:, None] + rcols[None, :],
                      mask=ok[:, None] & (rcols < R)[None, :], other=2147483647)
        passed = cum <= rank[:, None]
        j = tl.sum(passed.to(tl.int32), axis=1)
        start = tl.max(tl.where(passed, cum, 0), axis=1)

    has_chunk = ok & (j < replicas)
    slot = tl.load(log2phy_ptr + ids.to(tl.int64) * R + j, mask=has_chunk, other=-1)
    tl.store(slot_ids_ptr + offs, slot, mask=in_range)
    tl.store(rank_in_slot_ptr + offs, rank - start, mask=in_range)


@triton.jit
def align_scatter_kernel(
    slot_ptr,  # (N,) int32/int64 slot per pair, -1 = not aligned here (dropped or not local)
    block_offset_ptr,  # (num_blocks, P) int32
    slot_start_ptr,  # (P,) int32
    sorted_ids_ptr,  # (N_pad,) int32, prefilled with the sentinel N
    N,
    P,
    BLOCK_N: tl.constexpr,
):
    """Grid (num_blocks,): program b writes the flat index of each of its pairs to its row of sorted_token_ids."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = offs < N
    slots = tl.load(slot_ptr + offs, mask=in_range, other=-1).to(tl.int32)
    ok = in_range & (slots >= 0) & (slots < P)
    rank = _rank_in_group(slots, ok, pid, block_offset_ptr, P, BLOCK_N)
    row = tl.load(slot_start_ptr + slots, mask=ok, other=0).to(tl.int64) + rank
    tl.store(sorted_ids_ptr + row, offs.to(tl.int32), mask=ok)
