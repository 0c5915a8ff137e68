"""Triton jit code of combine: out[t] = sum over k of pair_out[t*K + k], fp32 accumulation, no atomics.

Index arrays (host wrapper: moeless_kernels/combine.py)
    pair_out  (T*K, H)  fp32/fp16/bf16   per-pair expert outputs, routed weight already applied; any strides
    out       (T, H)    pair_out's dtype, contiguous

Each output element is written by exactly one program after a fixed-order loop over k, so the result is
bit-for-bit reproducible run to run. Must never: allocate, validate, or read the device driver.
"""
import triton
import triton.language as tl


@triton.jit
def combine_kernel(
    pair_out_ptr,  # (T*K, H)
    out_ptr,  # (T, H), contiguous
    T,
    H,
    K,
    stride_pm,
    stride_ph,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Grid (cdiv(T, BLOCK_T), cdiv(H, BLOCK_H)): program (i, j) sums tokens of block i over columns of block j."""
    # -- tile mapping: int64 row offsets, T*K*H overflows int32 on long prefills
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = (rows < T)[:, None] & (cols < H)[None, :]
    pair_rows = rows.to(tl.int64) * K

    # -- K loop in fixed order, fp32 accumulator
    acc = tl.zeros((BLOCK_T, BLOCK_H), tl.float32)
    for k in range(K):
        ptrs = pair_out_ptr + (pair_rows + k)[:, None] * stride_pm + cols[None, :] * stride_ph
        acc += tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)

    # -- masked store in the output dtype
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * H + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=ok)
