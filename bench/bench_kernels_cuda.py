"""CUDA benchmark of one MoE layer's experts: moeless's Triton kernels vs torch grouped GEMM vs an eager loop.

    python -m pytest bench/bench_kernels_cuda.py --benchmark-only --benchmark-json=out.json   (or bench/gpu_check.sh)

Implementations, all bf16, all from the same routing (softmax top-k of random logits, renormalised):
- moeless_fused_moe: the whole Triton chain, routing included (fused_topk, replica_dispatch, moe_align,
  grouped_swiglu, combine), identity plan;
- moeless_grouped_swiglu: the two grouped GEMM kernels alone, on a permutation aligned beforehand;
- torch_grouped_mm: transformers' grouped_mm_experts_forward recipe (sort pairs by expert, offsets, two
  torch grouped mms around SiLU(gate) * up, weight, unsort, sum over K);
- eager_loop: Hugging Face's per-expert eager loop.
Layer shapes (H, I, E, K): Mixtral-8x7B (4096, 14336, 8, 2), Qwen3-30B-A3B (2048, 768, 128, 8), DeepSeek-V3
(7168, 2048, 256, 8: all 256 routed experts, 22.5 GB of bf16 weights), at T = 1, 16, 128, 1024, 8192 tokens.
Each case records TFLOP/s (6*T*K*H*I), GB/s (weight bytes of the experts actually hit, plus hidden in and
out), device name, torch and triton versions in benchmark.extra_info. Benchmarks measure; they never assert a
time. Every case is marked gpu (skipped without CUDA).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu

MODELS = {  # name: (hidden H, intermediate I, experts E, top_k K)
    "mixtral-8x7b": (4096, 14336, 8, 2),
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "deepseek-v3": (7168, 2048, 256, 8),
}
TOKENS = (1, 16, 128, 1024, 8192)
IMPLEMENTATIONS = ("moeless_fused_moe", "moeless_grouped_swiglu", "torch_grouped_mm", "eager_loop")
DTYPE = torch.bfloat16
ROUNDS = 10

_layer_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def _layer(model: str):
    """Random bf16 expert weights on the GPU; only one model is kept at a time (DeepSeek-V3's are 22.5 GB)."""
    if model not in _layer_cache:
        _layer_cache.clear()
        torch.cuda.empty_cache()
        hidden_size, inter, experts, _ = MODELS[model]
        g = torch.Generator(device="cuda").manual_seed(0)
        gate_up = torch.randn(experts, 2 * inter, hidden_size, device="cuda", dtype=DTYPE, generator=g)
        down = torch.randn(experts, hidden_size, inter, device="cuda", dtype=DTYPE, generator=g)
        _layer_cache[model] = (gate_up.mul_(hidden_size**-0.5), down.mul_(inter**-0.5))
    return _layer_cache[model]


def _inputs(model: str, num_tokens: int):
    hidden_size, _, experts, top_k = MODELS[model]
    g = torch.Generator(device="cuda").manual_seed(num_tokens)
    hidden = torch.randn(num_tokens, hidden_size, device="cuda", dtype=DTYPE, generator=g)
    logits = torch.randn(num_tokens, experts, device="cuda", generator=g)
    weights, ids = torch.topk(torch.softmax(logits, dim=-1), top_k, dim=-1)
    return hidden, logits, ids.to(torch.int32), weights / weights.sum(dim=-1, keepdim=True)


# ---------------------------------------------------------------------------------------------------- baselines


def _grouped_mm(x, w, offs):
    grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return grouped_mm(x, w, offs=offs)


def torch_grouped_mm_experts(hidden, gate_up, down, topk_ids, topk_weights):
    """transformers' grouped_mm_experts_forward, for concatenated [gate; up] weights."""
    num_tokens, top_k = topk_ids.shape
    flat = topk_ids.reshape(-1)
    expert_ids, perm = torch.sort(flat)
    x = hidden[perm // top_k]
    counts = torch.bincount(flat, minlength=gate_up.shape[0])
    offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
    gate, up = _grouped_mm(x, gate_up.transpose(-2, -1), offs).chunk(2, dim=-1)
    y = _grouped_mm(F.silu(gate) * up, down.transpose(-2, -1), offs)
    y = y * topk_weights.reshape(-1)[perm].unsqueeze(-1)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return y[inv].view(num_tokens, top_k, -1).sum(dim=1).to(hidden.dtype)


def eager_experts(hidden, gate_up, down, topk_ids, topk_weights):
    """Hugging Face's per-expert eager loop."""
    num_experts = gate_up.shape[0]
    out = torch.zeros_like(hidden)
    expert_mask = F.one_hot(topk_ids.long(), num_classes=num_experts).permute(2, 1, 0)
    for e in torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist():
        top_k_pos, token_idx = torch.where(expert_mask[e])
        gate, up = F.linear(hidden[token_idx], gate_up[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down[e]) * topk_weights[token_idx, top_k_pos, None]
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out


# ---------------------------------------------------------------------------------------------------- the cases


def _implementation(name, model, num_tokens):
    from moeless_kernels.dispatch import moe_align
    from moeless_kernels.fused_moe import default_block_m, fused_moe
    from moeless_kernels.grouped_gemm import grouped_swiglu

    gate_up, down = _layer(model)
    hidden, logits, ids, weights = _inputs(model, num_tokens)
    top_k = MODELS[model][3]
    if name == "moeless_fused_moe":
        return lambda: fused_moe(hidden, gate_up, down, router_logits=logits, top_k=top_k, renormalize=True,
                                 backend="triton").out
    if name == "moeless_grouped_swiglu":
        experts = gate_up.shape[0]
        block_m = default_block_m(ids.numel(), experts)
        sorted_ids, block_slots, n_post = moe_align(ids, experts, block_m, backend="triton")
        slot_to_weight = torch.arange(experts, dtype=torch.int32, device="cuda")
        return lambda: grouped_swiglu(hidden, gate_up, down, sorted_ids, block_slots, n_post, slot_to_weight, weights,
                                      top_k=top_k, block_m=block_m, backend="triton")
    if name == "torch_grouped_mm":
        return lambda: torch_grouped_mm_experts(hidden, gate_up, down, ids, weights)
    return lambda: eager_experts(hidden, gate_up, down, ids, weights)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("model", list(MODELS))
def test_experts_layer_cuda(benchmark, model, num_tokens, implementation):
    import triton

    hidden_size, inter, experts, top_k = MODELS[model]
    fn = _implementation(implementation, model, num_tokens)
    fn()  # compile and autotune outside the timed rounds
    torch.cuda.synchronize()

    def run():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)

    _, _, ids, _ = _inputs(model, num_tokens)
    experts_hit = int(torch.unique(ids).numel())
    flops = 6 * num_tokens * top_k * hidden_size * inter
    nbytes = experts_hit * 3 * hidden_size * inter * 2 + 2 * num_tokens * hidden_size * 2
    info = dict(model=model, tokens=num_tokens, hidden=hidden_size, intermediate=inter, experts=experts, top_k=top_k,
                dtype="bfloat16", implementation=implementation, experts_hit=experts_hit, flops=flops, bytes=nbytes,
                device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is not None and stats.median > 0:
        info.update(tflops=flops / stats.median / 1e12, gbps=nbytes / stats.median / 1e9,
                    median_ms=stats.median * 1e3)
    benchmark.extra_info.update(info)
