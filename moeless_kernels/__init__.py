"""moeless_kernels: the data plane's ops for one MoE layer, each a Triton kernel plus a pure-torch reference.

    fused_topk       router logits -> top-k ids/weights + per-expert counts
    replica_dispatch (token, k) pairs -> physical slots under a replica plan (per-replica quotas, capacity)
    moe_align        slot ids -> block-aligned permutation for the grouped GEMM
    grouped_swiglu   gather-on-load grouped SwiGLU GEMM over slots, routed weight in the epilogue
    combine          [T*K, H] -> [T, H], fp32 sum over K, deterministic
    fused_moe        the chain, with an optional ReplicaPlan

Each op takes backend="auto" (Triton on CUDA tensors, torch on CPU), "triton" or "torch". Never imports from
`moeless`; holds no policy and nothing distributed. See docs/ARCHITECTURE.md.
"""
from moeless_kernels.combine import combine, combine_reference
from moeless_kernels.dispatch import DispatchResult, moe_align, moe_align_reference, replica_dispatch, \
    replica_dispatch_reference
from moeless_kernels.fused_moe import MoEResult, ReplicaPlan, fused_moe
from moeless_kernels.grouped_gemm import grouped_swiglu, grouped_swiglu_reference
from moeless_kernels.topk import fused_topk, fused_topk_reference

__all__ = [
    "fused_topk", "fused_topk_reference", "replica_dispatch", "replica_dispatch_reference", "moe_align",
    "moe_align_reference", "DispatchResult", "grouped_swiglu", "grouped_swiglu_reference", "combine",
    "combine_reference", "fused_moe", "ReplicaPlan", "MoEResult",
]
