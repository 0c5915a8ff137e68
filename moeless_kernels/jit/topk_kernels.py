"""Triton jit code of fused_topk: router scores, optional group-limited selection, top-k, load counts, one pass.

Index arrays (host wrapper: moeless_kernels/topk.py)
    router_logits  (T, E)  fp32/fp16/bf16   any strides; upcast to fp32 on load
    bias           (E,)    fp32             e_score_correction_bias, for selection only (dummy if HAS_BIAS=False)
    topk_weights   (T, K)  fp32             out: unbiased scores of the chosen experts (renormalised, scaled)
    topk_ids       (T, K)  int32            out: chosen experts, by descending selection score, ties -> lower id
    expert_counts  (E,)    int32            out: zeroed by the host; each program adds its own histogram once

Must never: allocate, validate, or read the device driver (the wrapper does all three).
"""
import triton
import triton.language as tl


@triton.jit
def _first_argmax(x, cols, BLOCK_N: tl.constexpr):
    """Row-wise (max, index of its first occurrence) of a [BLOCK_T, BLOCK_N] tile: ties go to the lower column.

    Spelled out with max + min-of-matching-columns rather than tl.argmax, so the tie rule is ours, not the
    compiler's.
    """
    row_max = tl.max(x, axis=1)
    idx = tl.min(tl.where(x == row_max[:, None], cols[None, :], BLOCK_N), axis=1)
    return row_max, idx


@triton.jit
def fused_topk_kernel(
    logits_ptr,  # (T, E) fp32/fp16/bf16
    bias_ptr,  # (E,) fp32
    weights_ptr,  # (T, K) fp32, contiguous
    ids_ptr,  # (T, K) int32, contiguous
    counts_ptr,  # (E,) int32, zeroed
    T,
    E,
    K,
    stride_lt,
    stride_le,
    group_size,
    num_groups,
    topk_group,
    routed_scaling_factor,
    SCORING_SIGMOID: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    USE_GROUPS: tl.constexpr,
    GROUP_TOP2: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """Grid (cdiv(T, BLOCK_T),): program i routes tokens [i*BLOCK_T, (i+1)*BLOCK_T) over all E experts."""
    # -- tile mapping and load: a [BLOCK_T, BLOCK_E] tile of logits in fp32; int64 row offsets (long prefills)
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < T
    col_ok = cols < E
    tile_ok = row_ok[:, None] & col_ok[None, :]
    ptrs = logits_ptr + rows.to(tl.int64)[:, None] * stride_lt + cols[None, :] * stride_le
    x = tl.load(ptrs, mask=tile_ok, other=0.0).to(tl.float32)

    # -- scores (what the weights are made of) and selection scores (scores + bias, padding at -inf)
    if SCORING_SIGMOID:
        score = 1.0 / (1.0 + tl.exp(-x))
    else:
        x = tl.where(col_ok[None, :], x, float("-inf"))
        num = tl.exp(x - tl.max(x, axis=1)[:, None])
        num = tl.where(col_ok[None, :], num, 0.0)
        score = num / tl.sum(num, axis=1)[:, None]
    sel = score
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0)
        sel = sel + bias[None, :]
    # NaN scores select nothing (NaN == max is never true, so the first-argmax would return BLOCK_E, an id past
    # the experts): as -inf they lose to every finite score and ids stay in [0, E); their NaN weights show
    sel = tl.where(col_ok[None, :] & (sel == sel), sel, float("-inf"))

    # -- group-limited routing (DeepSeek-V3): group score = sum of its top-2 selection scores (top-1 when a
    #    group holds one expert); keep the topk_group best groups; experts of other groups cannot be chosen
    if USE_GROUPS:
        gcols = tl.arange(0, BLOCK_G)
        gid = cols // group_size
        group_score = tl.full((BLOCK_T, BLOCK_G), float("-inf"), tl.float32)
        for g in range(num_groups):
            in_g = tl.where((gid == g)[None, :], sel, float("-inf"))
            top1, i1 = _first_argmax(in_g, cols, BLOCK_E)
            gs = top1
            if GROUP_TOP2:
                gs += tl.max(tl.where(cols[None, :] == i1[:, None], float("-inf"), in_g), axis=1)
            group_score = tl.where((gcols == g)[None, :], gs[:, None], group_score)
        keep = tl.zeros((BLOCK_T, BLOCK_E), tl.int32)
        # (a loop variable must keep one type across iterations: `_` as both the int32 counter and a discarded
        # fp32 max does not compile for a GPU, though the interpreter accepts it)
        for group_round in range(topk_group):
            best_group_score, gi = _first_argmax(group_score, gcols, BLOCK_G)
            group_score = tl.where(gcols[None, :] == gi[:, None], float("-inf"), group_score)
            keep = tl.where(gid[None, :] == gi[:, None], 1, keep)
        sel = tl.where(keep != 0, sel, float("-inf"))

    # -- top-k: K rounds of (first argmax, gather its unbiased score, mask it out); the tile's histogram
    #    of choices accumulates in registers so each program touches expert_counts once
    kcols = tl.arange(0, BLOCK_K)
    w_tile = tl.zeros((BLOCK_T, BLOCK_K), tl.float32)
    id_tile = tl.zeros((BLOCK_T, BLOCK_K), tl.int32)
    hist = tl.zeros((BLOCK_E,), tl.int32)
    for k in range(K):
        best_score, idx = _first_argmax(sel, cols, BLOCK_E)
        chosen = cols[None, :] == idx[:, None]
        w = tl.sum(tl.where(chosen, score, 0.0), axis=1)
        sel = tl.where(chosen, float("-inf"), sel)
        hist += tl.sum((chosen & row_ok[:, None]).to(tl.int32), axis=0)
        w_tile = tl.where((kcols == k)[None, :], w[:, None], w_tile)
        id_tile = tl.where((kcols == k)[None, :], idx[:, None], id_tile)

    # -- epilogue: renormalise (1e-20 as DeepSeek; exact no-op for softmax sums), scale, masked stores
    if RENORMALIZE:
        w_tile = w_tile / (tl.sum(w_tile, axis=1)[:, None] + 1e-20)
    w_tile = w_tile * routed_scaling_factor
    out_off = rows.to(tl.int64)[:, None] * K + kcols[None, :]
    out_ok = row_ok[:, None] & (kcols < K)[None, :]
    tl.store(weights_ptr + out_off, w_tile, mask=out_ok)
    tl.store(ids_ptr + out_off, id_tile, mask=out_ok)
    tl.atomic_add(counts_ptr + cols, hist, mask=col_ok)
