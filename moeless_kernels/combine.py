"""combine: per-pair expert outputs [T*K, H] -> token outputs [T, H], summed over the K experts of each token.

The routed weights are already applied (grouped_swiglu's epilogue), so this is a plain sum, accumulated in fp32
and rounded once to pair_out's dtype. Deterministic: no atomics, a fixed summation order (k = 0, 1, ...).
Must never weight, reorder or drop pairs: rows of dropped pairs are zero upstream and add nothing.
"""
from __future__ import annotations

import torch

from moeless_kernels._backend import resolve_backend
from moeless_kernels.checks import FLOAT_DTYPES, check_int, check_tensor
from moeless_kernels.launch_configs import cdiv, combine_tile


def _validate(pair_out, top_k):
    check_tensor("pair_out", pair_out, ndim=2, dtypes=FLOAT_DTYPES)
    check_int("top_k", top_k, lo=1)
    if pair_out.shape[0] % top_k:
        raise ValueError(f"pair_out must have T*K rows with top_k={top_k}, got {pair_out.shape[0]} rows")


def _combine_torch(pair_out, top_k):
    num_tokens = pair_out.shape[0] // top_k
    return pair_out.float().reshape(num_tokens, top_k, pair_out.shape[1]).sum(dim=1).to(pair_out.dtype)


def _combine_triton(pair_out, top_k):
    # imported here: triton.jit reads TRITON_INTERPRET when the kernel module is first imported
    from moeless_kernels.jit.combine_kernels import combine_kernel

    num_tokens, hidden = pair_out.shape[0] // top_k, pair_out.shape[1]
    out = torch.empty((num_tokens, hidden), dtype=pair_out.dtype, device=pair_out.device)
    if out.numel() == 0:
        return out
    # about 4K elements per program: wide rows coalesce, several tokens per program when H is small
    block_t, block_h = combine_tile(hidden)
    grid = (cdiv(num_tokens, block_t), cdiv(hidden, block_h))
    combine_kernel[grid](
        pair_out, out, num_tokens, hidden, top_k, pair_out.stride(0), pair_out.stride(1),
        BLOCK_T=block_t, BLOCK_H=block_h, num_warps=4,
    )
    return out


def combine(pair_out: torch.Tensor, top_k: int, backend: str = "auto") -> torch.Tensor:
    """out [T, H] (pair_out's dtype) = sum over k of pair_out [T*K, H] rows t*K + k, in fp32."""
    _validate(pair_out, top_k)
    if resolve_backend(backend, pair_out.device) == "triton":
        return _combine_triton(pair_out, top_k)
    return _combine_torch(pair_out, top_k)


def combine_reference(pair_out: torch.Tensor, top_k: int) -> torch.Tensor:
    """Pure-torch combine (same contract, same validation)."""
    return combine(pair_out, top_k, backend="torch")
