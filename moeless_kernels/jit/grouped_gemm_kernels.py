"""Triton jit code of the grouped SwiGLU GEMM over physical slots (host wrapper: moeless_kernels/grouped_gemm.py).

Never imported unless Triton is to run (CUDA tensors, or TRITON_INTERPRET=1 set before import); never touches
triton.runtime.driver at import time; holds no policy (which slot serves which pair is decided upstream) and
no launch parameters (moeless_kernels/launch_configs.py picks tiles, warps and stages; nothing autotunes).

Index arrays, shapes and meaning (vocabulary of docs/ARCHITECTURE.md):

    hidden            (T, H)          activations, one row per token
    gate_up_proj      (W, 2I, H)      Hugging Face v5 layout: rows [0, I) gate, [I, 2I) up; INTERLEAVED: row 2j
                                      is gate j, row 2j+1 is up j. W weight tensors, shared by P slots.
    down_proj         (W, H, I)
    sorted_token_ids  (EM,) int32     flat pair ids t*K + k grouped by slot, each slot's run padded to BLOCK_M
                                      with the pad value T*K (num_valid_pairs); EM is a multiple of BLOCK_M,
                                      exact or sized for the worst case (moe_align(static_shapes=True))
    block_slot_ids    (EM // BLOCK_M,) int32   physical slot of each BLOCK_M block; -1 = nothing to do (the
                                      blocks past num_tokens_post_padded, or a block to skip): exit at once
    slot_to_weight    (P,) int32      slot -> index into W (replicas of one expert share one weight tensor)
    topk_weights      (T*K,) fp32     routed weight of each pair, applied in the down projection's epilogue
    intermediate      (T*K, I)        silu(gate) * up per pair (indexed by pair id like vLLM's cache, so its
                                      size never depends on the padding), activation dtype
    out               (T*K, H)        one row per pair; each pair is written by exactly one program row (no
                                      atomics), rows of pairs not in the permutation are left as they are

Both kernels use a one-dimensional grid of (EM / BLOCK_M) * cdiv(N, BLOCK_N) programs, swizzled in groups of
GROUP_SIZE_M blocks along M (Triton matmul tutorial) so that neighbouring programs reuse weight tiles in L2.
EVEN_K (K % BLOCK_K == 0) drops the reduction-dimension masks. Offsets that multiply a row index by a stride
are int64: T*K*H and W*2I*H overflow int32 on real models.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _swizzled_tile(num_rows, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_SIZE_M: tl.constexpr):
    """Map the flat program id to (block along the permutation, tile along N), GROUP_SIZE_M blocks at a time."""
    pid = tl.program_id(axis=0)
    num_pid_m = tl.cdiv(num_rows, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_SIZE_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_SIZE_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_SIZE_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _round_to_bf16_values(x):
    """Round fp32 to the nearest bf16 value (ties to even), kept in fp32 so that a truncating cast is exact.

    The interpreter's fp32 -> bf16 cast truncates (about twice the error of the GPU's round-to-nearest); this
    keeps interpreted bf16 numerics those of the GPU. Finite inputs only (activations and outputs are).
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return ((bits >> 16) << 16).to(tl.float32, bitcast=True)


@triton.jit
def gate_up_silu_kernel(
    # pointers
    hidden_ptr,  # (T, H) activation dtype
    gate_up_ptr,  # (W, 2I, H)
    intermediate_ptr,  # (T*K, I) activation dtype, written at the rows of listed pairs
    sorted_token_ids_ptr,  # (EM,) int32
    block_slot_ids_ptr,  # (EM // BLOCK_M,) int32
    slot_to_weight_ptr,  # (P,) int32
    # sizes
    EM,  # rows of sorted_token_ids
    num_valid_pairs,  # T * K, also the pad value of sorted_token_ids
    N,  # I: columns of the intermediate
    K,  # H: reduction length
    # strides
    stride_hm,
    stride_hk,
    stride_we,
    stride_wn,
    stride_wk,
    stride_im,
    stride_in,
    # constexprs
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    BF16_INTERPRETED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr,
):
    """Gather-on-load gate/up GEMM with SiLU(gate) * up fused in the epilogue.

    Grid: (EM / BLOCK_M * cdiv(I, BLOCK_N),). Program (pid_m, pid_n) computes, for the pairs listed in block
    pid_m of sorted_token_ids, columns [pid_n*BLOCK_N, +BLOCK_N) of their intermediate rows, with the weight of
    slot block_slot_ids[pid_m]. Blocks of slot -1 exit at once.
    """
    # --- tile mapping
    pid_m, pid_n = _swizzled_tile(EM, N, BLOCK_M, BLOCK_N, GROUP_SIZE_M)
    slot = tl.load(block_slot_ids_ptr + pid_m)
    if slot < 0:
        return
    weight_idx = tl.load(slot_to_weight_ptr + slot).to(tl.int64)

    # --- pointers: rows gathered from hidden by pair // TOP_K; pad entries (== num_valid_pairs) load zeros
    offs_sorted = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    pair_ids = tl.load(sorted_token_ids_ptr + offs_sorted).to(tl.int64)
    pair_mask = pair_ids < num_valid_pairs
    token_rows = pair_ids // TOP_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    if INTERLEAVED:
        gate_rows = 2 * offs_n
        up_rows = 2 * offs_n + 1
    else:
        gate_rows = offs_n
        up_rows = N + offs_n
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = hidden_ptr + token_rows[:, None] * stride_hm + offs_k[None, :] * stride_hk
    w_base = gate_up_ptr + weight_idx * stride_we
    # weight tiles are loaded as (BLOCK_K, BLOCK_N): the transpose of rows of the [2I, H] matrix
    wg_ptrs = w_base + gate_rows[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk
    wu_ptrs = w_base + up_rows[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk

    # --- K loop, fp32 accumulation
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=pair_mask[:, None], other=0.0)
            wg = tl.load(wg_ptrs, mask=n_mask[None, :], other=0.0)
            wu = tl.load(wu_ptrs, mask=n_mask[None, :], other=0.0)
        else:
            k_mask = offs_k < K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=pair_mask[:, None] & k_mask[None, :], other=0.0)
            wg = tl.load(wg_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            wu = tl.load(wu_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if BF16_INTERPRETED:
            # the interpreter's bf16 dot is wrong; fp32 of bf16 inputs is exact
            a = a.to(tl.float32)
            wg = wg.to(tl.float32)
            wu = wu.to(tl.float32)
        acc_gate = tl.dot(a, wg, acc_gate, input_precision=DOT_PRECISION)
        acc_up = tl.dot(a, wu, acc_up, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_hk
        wg_ptrs += BLOCK_K * stride_wk
        wu_ptrs += BLOCK_K * stride_wk

    # --- epilogue: SiLU(gate) * up in fp32, one rounding to the activation dtype, stored at the pairs' rows
    act = acc_gate * tl.sigmoid(acc_gate) * acc_up
    if BF16_INTERPRETED:
        act = _round_to_bf16_values(act)
    i_ptrs = intermediate_ptr + pair_ids[:, None] * stride_im + offs_n[None, :] * stride_in
    tl.store(i_ptrs, act.to(intermediate_ptr.dtype.element_ty), mask=pair_mask[:, None] & n_mask[None, :])


@triton.jit
def down_proj_kernel(
    # pointers
    intermediate_ptr,  # (T*K, I) activation dtype, read at the rows of listed pairs
    down_ptr,  # (W, H, I)
    out_ptr,  # (T*K, H) activation dtype, written at pair rows
    sorted_token_ids_ptr,  # (EM,) int32
    block_slot_ids_ptr,  # (EM // BLOCK_M,) int32
    slot_to_weight_ptr,  # (P,) int32
    topk_weights_ptr,  # (T*K,) fp32, unused unless MUL_ROUTED_WEIGHT
    # sizes
    EM,  # rows of sorted_token_ids
    num_valid_pairs,
    N,  # H: columns of the output
    K,  # I: reduction length
    # strides
    stride_im,
    stride_ik,
    stride_de,
    stride_dn,
    stride_dk,
    stride_om,
    stride_on,
    # constexprs
    BLOCK_M: tl.constexpr,
    MUL_ROUTED_WEIGHT: tl.constexpr,
    BF16_INTERPRETED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr,
):
    """Down projection with the routed weight in the epilogue, scattered to pair rows.

    Grid: (EM / BLOCK_M * cdiv(H, BLOCK_N),). Program (pid_m, pid_n) gathers the intermediate rows of the pairs
    listed in block pid_m and writes out[pair, pid_n*BLOCK_N:+BLOCK_N] for each of them; every pair sits in
    exactly one block, so each output element is written once. Blocks of slot -1 exit at once.
    """
    # --- tile mapping
    pid_m, pid_n = _swizzled_tile(EM, N, BLOCK_M, BLOCK_N, GROUP_SIZE_M)
    slot = tl.load(block_slot_ids_ptr + pid_m)
    if slot < 0:
        return
    weight_idx = tl.load(slot_to_weight_ptr + slot).to(tl.int64)

    # --- pointers
    offs_sorted = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    pair_ids = tl.load(sorted_token_ids_ptr + offs_sorted).to(tl.int64)
    pair_mask = pair_ids < num_valid_pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = intermediate_ptr + pair_ids[:, None] * stride_im + offs_k[None, :] * stride_ik
    w_ptrs = down_ptr + weight_idx * stride_de + offs_n[None, :].to(tl.int64) * stride_dn + offs_k[:, None] * stride_dk

    # --- K loop, fp32 accumulation
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=pair_mask[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=n_mask[None, :], other=0.0)
        else:
            k_mask = offs_k < K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=pair_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if BF16_INTERPRETED:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ik
        w_ptrs += BLOCK_K * stride_dk

    # --- epilogue: routed weight in fp32, one rounding, scatter to pair rows
    if MUL_ROUTED_WEIGHT:
        routed = tl.load(topk_weights_ptr + pair_ids, mask=pair_mask, other=0.0)
        acc = acc * routed[:, None]
    if BF16_INTERPRETED:
        acc = _round_to_bf16_values(acc)
    o_ptrs = out_ptr + pair_ids[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=pair_mask[:, None] & n_mask[None, :])
