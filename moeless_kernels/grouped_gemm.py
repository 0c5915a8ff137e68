"""grouped_swiglu: the experts' SwiGLU MLP over physical slots, for (token, k) pairs already grouped by slot.

    out[p] = topk_weights[p] * down[w] @ (silu(gate[w] @ x) * up[w] @ x),   x = hidden[p // top_k],
    w = slot_to_weight[slot of the block holding p]

for every pair p listed in sorted_token_ids (moe_align's permutation); rows of pairs not listed stay zero.
Several slots (replicas of one logical expert) may share one weight tensor through slot_to_weight, so a
replicated plan computes exactly what the unreplicated one does.

Two implementations with one contract: Triton (vLLM fused_moe style: gather on load, SiLU(gate) * up fused into
the first GEMM's epilogue, routed weight in the second GEMM's epilogue, rows scattered once, no atomics) and a
pure-torch reference that is the CPU serving path (one GEMM pair per weight group, never a per-block or
per-pair Python loop). This module validates and dispatches; it must never decide routing or placement.
"""
from __future__ import annotations

import re
from functools import lru_cache

import torch
import torch.nn.functional as F

from moeless_kernels._backend import interpreter_enabled, resolve_backend
from moeless_kernels.checks import FLOAT_DTYPES, check_int, check_range, check_tensor, value_checks_enabled
from moeless_kernels.launch_configs import (
    MoEConfig,
    cdiv,
    heuristic_block_m,
    interpreter_moe_config,
    select_moe_config,
)


# ----------------------------------------------------------------------------------------------------------------
# validation


def _validate(hidden, gate_up_proj, down_proj, sorted_token_ids, block_slot_ids, num_tokens_post_padded,
              slot_to_weight, topk_weights, top_k, block_m, interleaved):
    check_tensor("hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES)
    device, dtype = hidden.device, hidden.dtype
    num_tokens, hidden_size = hidden.shape
    check_tensor("gate_up_proj", gate_up_proj, ndim=3, dtypes=(dtype,), device=device)
    num_weights, two_inter, _ = gate_up_proj.shape
    if gate_up_proj.shape[2] != hidden_size or two_inter % 2 or num_weights < 1:
        raise ValueError(
            f"gate_up_proj must have shape [W >= 1, 2*I, H={hidden_size}] (Hugging Face v5 layout), "
            f"got {tuple(gate_up_proj.shape)}"
        )
    inter = two_inter // 2
    check_tensor("down_proj", down_proj, shape=(num_weights, hidden_size, inter), dtypes=(dtype,), device=device)
    check_int("top_k", top_k, lo=1)
    check_int("block_m", block_m, lo=1)
    if not isinstance(interleaved, bool):
        raise ValueError(f"interleaved must be a bool, got {interleaved!r}")
    check_tensor("sorted_token_ids", sorted_token_ids, ndim=1, dtypes=(torch.int32,), device=device)
    n_pad = sorted_token_ids.shape[0]
    if n_pad % block_m:
        raise ValueError(f"sorted_token_ids length must be a multiple of block_m={block_m}, got {n_pad}")
    check_tensor("block_slot_ids", block_slot_ids, shape=(n_pad // block_m,), dtypes=(torch.int32,), device=device)
    values = value_checks_enabled(device)
    if isinstance(num_tokens_post_padded, torch.Tensor):
        check_tensor("num_tokens_post_padded", num_tokens_post_padded, shape=(1,), dtypes=(torch.int32, torch.int64),
                     device=device)
        if values:
            check_range("num_tokens_post_padded", num_tokens_post_padded, 0, n_pad + 1)
    else:
        check_int("num_tokens_post_padded", num_tokens_post_padded, lo=0, hi=n_pad)
        if num_tokens_post_padded % block_m:
            raise ValueError(
                f"num_tokens_post_padded must be a multiple of block_m={block_m}, got {num_tokens_post_padded}"
            )
    check_tensor("slot_to_weight", slot_to_weight, ndim=1, dtypes=(torch.int32,), device=device)
    if topk_weights is not None:
        check_tensor("topk_weights", topk_weights, shape=(num_tokens, top_k), dtypes=FLOAT_DTYPES, device=device)
    # Index values decide which memory the kernel touches. Checking them makes the host wait for the device, so
    # they are checked where checks.value_checks_enabled says (CPU tensors, or MOELESS_DEBUG=1); on CUDA the
    # producers (moe_align, the plan, validated once) own their validity.
    if values:
        check_range("sorted_token_ids", sorted_token_ids, 0, num_tokens * top_k + 1)
        check_range("block_slot_ids", block_slot_ids, -1, slot_to_weight.shape[0])
        check_range("slot_to_weight", slot_to_weight, 0, num_weights)


# ----------------------------------------------------------------------------------------------------------------
# pure-torch path


_GROUPED_MM_MAX_ROWS_PER_GROUP = 64


def _release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as "2.13.0+cpu" or "2.9.0a0", as numbers: compared as text,
    "2.10" < "2.9" (torch.__version__ happens to be a TorchVersion that parses itself; a plain str does not)."""
    match = re.match(r"(\d+)\.(\d+)", str(version))
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


_TORCH_VERSION = _release(torch.__version__)


def _grouped_mm_fits(*tensors: torch.Tensor) -> bool:
    """torch._grouped_mm's CPU kernel needs 16-byte aligned data and strides (else it raises)."""
    for t in tensors:
        size = t.element_size()
        if t.data_ptr() % 16 or min(t.stride()[-2:]) != 1:
            return False
        if any(s != 1 and (s * size) % 16 for s in t.stride()):
            return False
    return True


def _grouped_mm_usable(device: torch.device) -> bool:
    # CPU kernel from torch 2.9; on CUDA its dtype/arch limits vary by version, and CUDA serves through Triton.
    return device.type == "cpu" and hasattr(torch, "_grouped_mm") and _TORCH_VERSION >= (2, 9)


def _split_gate_up(gate_up: torch.Tensor, inter: int, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if interleaved:
        return gate_up[:, 0::2], gate_up[:, 1::2]
    return gate_up[:, :inter], gate_up[:, inter:]


def _swiglu_weight_groups(x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                          group_sizes: torch.Tensor, interleaved: bool, use_grouped_mm: bool | None = None
                          ) -> torch.Tensor:
    """Rows of `x` [n, H] come in runs of group_sizes[w] rows per weight w; returns the SwiGLU MLP of each row."""
    inter = down_proj.shape[2]
    gate_up_t = gate_up_proj.transpose(1, 2)  # [W, H, 2I]
    down_t = down_proj.transpose(1, 2)  # [W, I, H]
    if use_grouped_mm is None:
        # One call per projection for all weights saves the per-group Python overhead, which dominates when
        # groups are small (decode); with large groups the GEMMs dominate and the loop, which keeps each
        # group's intermediate in cache between its two GEMMs, is as fast or faster (measured on CPU).
        small_groups = x.shape[0] < _GROUPED_MM_MAX_ROWS_PER_GROUP * max(1, int((group_sizes > 0).sum()))
        use_grouped_mm = small_groups and _grouped_mm_usable(x.device) and _grouped_mm_fits(x, gate_up_t, down_t) \
            and (inter * x.element_size()) % 16 == 0
    if use_grouped_mm:
        offs = torch.cumsum(group_sizes, 0, dtype=torch.int32)
        gate, up = _split_gate_up(torch._grouped_mm(x, gate_up_t, offs=offs), inter, interleaved)
        return torch._grouped_mm(F.silu(gate).mul_(up), down_t, offs=offs)
    y = x.new_empty(x.shape[0], down_proj.shape[1])
    start = 0
    for w, n in enumerate(group_sizes.tolist()):
        if n == 0:
            continue
        end = start + n
        gate, up = _split_gate_up(torch.mm(x[start:end], gate_up_t[w]), inter, interleaved)
        torch.mm(F.silu(gate).mul_(up), down_t[w], out=y[start:end])
        start = end
    return y


def _grouped_swiglu_torch(hidden, gate_up_proj, down_proj, sorted_token_ids, block_slot_ids, num_tokens_post_padded,
                          slot_to_weight, topk_weights, top_k, block_m, interleaved, use_grouped_mm=None):
    num_pairs = hidden.shape[0] * top_k
    # a device count (moe_align(static_shapes=True)) covers the whole buffer: its tail blocks are -1
    rows = sorted_token_ids.numel() if isinstance(num_tokens_post_padded, torch.Tensor) else num_tokens_post_padded
    num_blocks = rows // block_m
    if num_blocks == 0 or num_pairs == 0:
        return hidden.new_zeros(num_pairs, hidden.shape[1])
    # --- the listed pairs, in permutation order, with the weight row of their block
    block_slots = block_slot_ids[:num_blocks].long()
    block_live = block_slots >= 0
    block_weights = torch.where(block_live, slot_to_weight.long()[block_slots.clamp(min=0)], -1)
    ids = sorted_token_ids[: num_blocks * block_m].view(num_blocks, block_m)
    keep = (ids < num_pairs) & block_live[:, None]
    return swiglu_pairs(hidden, gate_up_proj, down_proj, ids[keep].long(),
                        block_weights[:, None].expand(num_blocks, block_m)[keep], topk_weights, top_k, interleaved,
                        use_grouped_mm)


def swiglu_pairs(hidden, gate_up_proj, down_proj, pairs, weight_rows, topk_weights, top_k, interleaved,
                 use_grouped_mm=None):
    """The torch path's core: out [T*K, H] with row p = routed weight * SwiGLU MLP of weight row weight_rows[i]
    on hidden[p // top_k], for each listed pair p = pairs[i] (int64 [n] each, any order); other rows zero.

    Pairs are grouped by weight row with a stable sort, so a row's pairs meet its weights in flat order, as
    they would with no replicas: replicas sharing a weight merge into one GEMM, and a replicated plan's output
    equals the unreplicated one bit for bit. No padding, no per-pair Python.
    """
    out = hidden.new_zeros(hidden.shape[0] * top_k, hidden.shape[1])
    if pairs.numel() == 0:
        return out
    if bool((weight_rows[1:] < weight_rows[:-1]).any()):
        order = torch.argsort(weight_rows, stable=True)
        pairs, weight_rows = pairs[order], weight_rows[order]
    group_sizes = torch.bincount(weight_rows, minlength=gate_up_proj.shape[0])
    y = _swiglu_weight_groups(hidden[pairs // top_k], gate_up_proj, down_proj, group_sizes, interleaved,
                              use_grouped_mm)
    if topk_weights is not None:
        routed = topk_weights.reshape(-1)[pairs].float()[:, None]
        # like the kernel's epilogue: the product in fp32, one rounding
        y = y.mul_(routed) if y.dtype == torch.float32 else (y.float() * routed).to(y.dtype)
    out.index_copy_(0, pairs, y)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Triton path


@lru_cache(maxsize=None)
def _cuda_target(index: int) -> tuple[str, int]:
    """(device name, Triton arch number such as 90) of CUDA device `index`, read once per process."""
    major, minor = torch.cuda.get_device_capability(index)
    return torch.cuda.get_device_name(index), 10 * major + minor


_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def moe_launch_config(num_tokens: int, top_k: int, num_slots: int, num_weights: int, inter: int, hidden_size: int,
                      dtype: torch.dtype, device: torch.device, block_m: int | None = None) -> MoEConfig:
    """Tiles of the grouped GEMM for this layer and batch on this device (launch_configs.select_moe_config:
    the tuned table, else the heuristic); under the interpreter, wide tiles. Host metadata only: no sync."""
    if device.type != "cuda":
        if block_m is None:
            block_m = heuristic_block_m(num_tokens * top_k, num_slots)
        return interpreter_moe_config(block_m, inter, hidden_size)
    name, arch = _cuda_target(device.index if device.index is not None else torch.cuda.current_device())
    return select_moe_config(num_tokens, top_k, num_slots, num_weights, inter, hidden_size, _DTYPE_NAMES[dtype],
                             name, arch, block_m)


def _grouped_swiglu_triton(hidden, gate_up_proj, down_proj, sorted_token_ids, block_slot_ids,
                           num_tokens_post_padded, slot_to_weight, topk_weights, top_k, block_m, interleaved,
                           config: MoEConfig | None = None):
    if block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two for the Triton backend, got {block_m}")
    if hidden.device.type == "cuda" and block_m < 16:
        raise ValueError(f"block_m must be >= 16 on CUDA (tl.dot's smallest tile), got {block_m}")
    num_tokens, hidden_size = hidden.shape
    num_weights, inter = gate_up_proj.shape[0], down_proj.shape[2]
    num_pairs = num_tokens * top_k
    out = hidden.new_zeros(num_pairs, hidden_size)
    # rows of the permutation to cover: all of a worst-case buffer (its tail blocks are -1 and exit at once),
    # or the exact count the host already knows
    rows = sorted_token_ids.numel() if isinstance(num_tokens_post_padded, torch.Tensor) else num_tokens_post_padded
    if rows == 0 or num_pairs == 0:
        return out
    if config is None or config.block_m != block_m:
        config = moe_launch_config(num_tokens, top_k, slot_to_weight.shape[0], num_weights, inter, hidden_size,
                                   hidden.dtype, hidden.device, block_m)
    intermediate = hidden.new_empty(num_pairs, inter)  # indexed by pair id: its size never depends on padding
    routed = topk_weights.reshape(-1).to(torch.float32).contiguous() if topk_weights is not None else None
    launch_gate_up(hidden, gate_up_proj, intermediate, sorted_token_ids, block_slot_ids, slot_to_weight, rows,
                   top_k, block_m, interleaved, config.gate_up)
    launch_down(intermediate, down_proj, out, sorted_token_ids, block_slot_ids, slot_to_weight, routed, rows, block_m,
                config.down)
    return out


def _precision(dtype: torch.dtype):
    # fp32 inputs: full-precision dot (CUDA would otherwise use TF32); 16-bit inputs ignore the setting
    return "ieee" if dtype == torch.float32 else None


def _bf16_interpreted(dtype: torch.dtype) -> bool:
    # the interpreter's bf16 dot and bf16 cast are wrong: the kernels work around them (see the jit module)
    return interpreter_enabled() and dtype == torch.bfloat16


def launch_gate_up(hidden, gate_up_proj, intermediate, sorted_token_ids, block_slot_ids, slot_to_weight, rows: int,
                   top_k: int, block_m: int, interleaved: bool, gemm) -> None:
    """gate_up_silu_kernel over the first `rows` rows of the permutation with tiles `gemm` (a GemmConfig): no
    checks (the callers validated), no allocation. bench/tune_moe.py times it alone."""
    from moeless_kernels.jit import grouped_gemm_kernels as jit  # lazy: reads TRITON_INTERPRET at import

    num_pairs, hidden_size = intermediate.shape[0], hidden.shape[1]
    inter = intermediate.shape[1]
    jit.gate_up_silu_kernel[(rows // block_m * cdiv(inter, gemm.BLOCK_N),)](
        hidden, gate_up_proj, intermediate, sorted_token_ids, block_slot_ids, slot_to_weight,
        rows, num_pairs, inter, hidden_size,
        hidden.stride(0), hidden.stride(1),
        gate_up_proj.stride(0), gate_up_proj.stride(1), gate_up_proj.stride(2),
        intermediate.stride(0), intermediate.stride(1),
        TOP_K=top_k, BLOCK_M=block_m, INTERLEAVED=interleaved, BF16_INTERPRETED=_bf16_interpreted(hidden.dtype),
        DOT_PRECISION=_precision(hidden.dtype), EVEN_K=hidden_size % gemm.BLOCK_K == 0,
        BLOCK_N=gemm.BLOCK_N, BLOCK_K=gemm.BLOCK_K, GROUP_SIZE_M=gemm.GROUP_SIZE_M,
        num_warps=gemm.num_warps, num_stages=gemm.num_stages,
    )


def launch_down(intermediate, down_proj, out, sorted_token_ids, block_slot_ids, slot_to_weight, routed, rows: int,
                block_m: int, gemm) -> None:
    """down_proj_kernel over the first `rows` rows of the permutation with tiles `gemm`; routed: fp32 [T*K]
    routed weights or None (weight 1). No checks, no allocation."""
    from moeless_kernels.jit import grouped_gemm_kernels as jit  # lazy: reads TRITON_INTERPRET at import

    num_pairs, hidden_size = out.shape
    inter = intermediate.shape[1]
    jit.down_proj_kernel[(rows // block_m * cdiv(hidden_size, gemm.BLOCK_N),)](
        intermediate, down_proj, out, sorted_token_ids, block_slot_ids, slot_to_weight,
        out if routed is None else routed,  # a dummy pointer when there is no routed weight
        rows, num_pairs, hidden_size, inter,
        intermediate.stride(0), intermediate.stride(1),
        down_proj.stride(0), down_proj.stride(1), down_proj.stride(2),
        out.stride(0), out.stride(1),
        BLOCK_M=block_m, MUL_ROUTED_WEIGHT=routed is not None, BF16_INTERPRETED=_bf16_interpreted(out.dtype),
        DOT_PRECISION=_precision(out.dtype), EVEN_K=inter % gemm.BLOCK_K == 0,
        BLOCK_N=gemm.BLOCK_N, BLOCK_K=gemm.BLOCK_K, GROUP_SIZE_M=gemm.GROUP_SIZE_M,
        num_warps=gemm.num_warps, num_stages=gemm.num_stages,
    )


# ----------------------------------------------------------------------------------------------------------------
# public API


def grouped_swiglu(hidden: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                   sorted_token_ids: torch.Tensor, block_slot_ids: torch.Tensor, num_tokens_post_padded: int | torch.Tensor,
                   slot_to_weight: torch.Tensor, topk_weights: torch.Tensor | None, *, top_k: int, block_m: int,
                   interleaved: bool = False, backend: str = "auto") -> torch.Tensor:
    """SwiGLU experts over slots for the pairs of moe_align's permutation; returns [T*K, H] in hidden's dtype.

    hidden [T, H]; gate_up_proj [W, 2I, H] (rows [0, I) gate, [I, 2I) up; interleaved=True: row 2j gate j,
    row 2j+1 up j); down_proj [W, H, I]; sorted_token_ids int32 [N_pad] (flat pair ids t*K+k, pad value T*K);
    block_slot_ids int32 [N_pad // block_m] (-1 = skip the block); num_tokens_post_padded: an int, the used
    prefix of sorted_token_ids, or moe_align(static_shapes=True)'s int32 [1] device tensor (then the whole
    buffer is walked and its -1 tail blocks skipped: no host sync); slot_to_weight int32 [P] (slot -> index into W); topk_weights [T, K] or None
    (routed weight 1). Row t*K+k of the result holds pair (t, k) scaled by its routed weight; rows of pairs
    that are not listed (dropped, or served by another rank) are zero.
    """
    _validate(hidden, gate_up_proj, down_proj, sorted_token_ids, block_slot_ids, num_tokens_post_padded,
              slot_to_weight, topk_weights, top_k, block_m, interleaved)
    impl = _grouped_swiglu_triton if resolve_backend(backend, hidden.device) == "triton" else _grouped_swiglu_torch
    return impl(hidden, gate_up_proj, down_proj, sorted_token_ids, block_slot_ids, num_tokens_post_padded,
                slot_to_weight, topk_weights, top_k, block_m, interleaved)


def grouped_swiglu_reference(hidden: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                             sorted_token_ids: torch.Tensor, block_slot_ids: torch.Tensor,
                             num_tokens_post_padded: int | torch.Tensor, slot_to_weight: torch.Tensor,
                             topk_weights: torch.Tensor | None, *, top_k: int, block_m: int,
                             interleaved: bool = False) -> torch.Tensor:
    """Pure-torch grouped_swiglu (same contract); the CPU serving path, one GEMM pair per weight group."""
    _validate(hidden, gate_up_proj, down_proj, sorted_token_ids, block_slot_ids, num_tokens_post_padded,
              slot_to_weight, topk_weights, top_k, block_m, interleaved)
    return _grouped_swiglu_torch(hidden, gate_up_proj, down_proj, sorted_token_ids, block_slot_ids,
                                 num_tokens_post_padded, slot_to_weight, topk_weights, top_k, block_m, interleaved)
