"""CUDA benchmark of one MoE layer's experts: moeless's Triton kernels vs torch grouped GEMM vs an eager loop.

    python bench/bench_kernels_cuda.py [--tokens 64 4096] [--models mixtral-8x7b ...] [--json F] [--markdown F]
    python -m pytest bench/bench_kernels_cuda.py --benchmark-only      (pytest-benchmark; every case marked gpu)

The script needs nothing but torch and triton (bench/gpu_check.sh runs it that way, offline); the pytest form
records the same cases in pytest-benchmark's JSON.

Implementations, all bf16, all from the same routing (softmax top-k of random logits, renormalised):
- moeless_fused_moe: fused_moe with that routing: replica_dispatch, moe_align (worst-case buffers, no host
  sync), the two grouped GEMM kernels, combine; identity plan;
- moeless_grouped_swiglu: the two grouped GEMM kernels alone, on a permutation aligned beforehand;
- torch_grouped_mm: transformers' grouped_mm_experts_forward recipe (sort pairs by expert, offsets, two
  torch grouped mms around SiLU(gate) * up, weight, unsort, sum over K);
- eager_loop: Hugging Face's per-expert eager loop.
Layer shapes (H, I, E, K): Mixtral-8x7B (4096, 14336, 8, 2), Qwen3-30B-A3B (2048, 768, 128, 8), DeepSeek-V3
(7168, 2048, 256, 8: all 256 routed experts, 22.5 GB of bf16 weights), at T = 64 (decode) and 4096 (prefill).

Per case: median ms over --rounds (CUDA events, after a warm-up call that compiles), TFLOP/s (6*T*K*H*I
flops), weight GB/s (bytes of the weights of the experts hit / time: what decode is bound by), the share of
the peaks (--peak-tflops, default 989: H100/H200 dense bf16; --peak-gbps, default 4800: H200 HBM3e), and the
largest difference from torch_grouped_mm's output. Targets (issue 10): prefill at T=4096 on Mixtral >=
torch_grouped_mm and >= 60% of peak TFLOP/s; decode >= 70% of peak bandwidth. A case that fails is recorded
with its error; the others still run. Benchmarks measure; they never assert a time.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

try:
    import pytest
except ImportError:  # the script form runs without pytest (an offline GPU machine may lack it)
    pytest = None

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODELS = {  # name: (hidden H, intermediate I, experts E, top_k K)
    "mixtral-8x7b": (4096, 14336, 8, 2),
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "deepseek-v3": (7168, 2048, 256, 8),
}
TOKENS = (64, 4096)
IMPLEMENTATIONS = ("moeless_fused_moe", "moeless_grouped_swiglu", "torch_grouped_mm", "eager_loop")
DTYPE = torch.bfloat16
ROUNDS = 20
PEAK_TFLOPS, PEAK_GBPS = 989.0, 4800.0

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
    return hidden, ids.to(torch.int32), weights / weights.sum(dim=-1, keepdim=True)


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


def implementation(name, model, num_tokens):
    """A no-argument callable computing the layer's output [T, H] with implementation `name`."""
    from moeless_kernels.dispatch import moe_align
    from moeless_kernels.fused_moe import fused_moe
    from moeless_kernels.grouped_gemm import grouped_swiglu, moe_launch_config

    gate_up, down = _layer(model)
    hidden, ids, weights = _inputs(model, num_tokens)
    hidden_size, inter, experts, top_k = MODELS[model]
    if name == "moeless_fused_moe":
        return lambda: fused_moe(hidden, gate_up, down, topk_ids=ids, topk_weights=weights, backend="triton").out
    if name == "moeless_grouped_swiglu":
        config = moe_launch_config(num_tokens, top_k, experts, experts, inter, hidden_size, DTYPE, hidden.device)
        sorted_ids, block_slots, n_post = moe_align(ids, experts, config.block_m, backend="triton",
                                                    static_shapes=True)
        slot_to_weight = torch.arange(experts, dtype=torch.int32, device="cuda")

        def gemms():
            pair_out = grouped_swiglu(hidden, gate_up, down, sorted_ids, block_slots, n_post, slot_to_weight, weights,
                                      top_k=top_k, block_m=config.block_m, backend="triton")
            return pair_out.view(num_tokens, top_k, -1).sum(dim=1)
        return gemms
    if name == "torch_grouped_mm":
        return lambda: torch_grouped_mm_experts(hidden, gate_up, down, ids, weights)
    return lambda: eager_experts(hidden, gate_up, down, ids, weights)


def time_ms(fn, rounds: int) -> float:
    """Median milliseconds of fn() over `rounds` CUDA-event timings, after one untimed call (compiles)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def case_info(model: str, num_tokens: int) -> dict:
    hidden_size, inter, experts, top_k = MODELS[model]
    _, ids, _ = _inputs(model, num_tokens)
    experts_hit = int(torch.unique(ids).numel())
    return dict(model=model, tokens=num_tokens, hidden=hidden_size, intermediate=inter, experts=experts, top_k=top_k,
                dtype="bfloat16", experts_hit=experts_hit, flops=6 * num_tokens * top_k * hidden_size * inter,
                weight_bytes=experts_hit * 3 * hidden_size * inter * 2)


def measure(model: str, num_tokens: int, name: str, rounds: int, peak_tflops: float, peak_gbps: float,
            reference: torch.Tensor | None = None) -> dict:
    """One row: the case's sizes, median ms, TFLOP/s, weight GB/s, % of peaks, max |out - reference|."""
    import triton

    info = dict(case_info(model, num_tokens), implementation=name, device=torch.cuda.get_device_name(),
                torch=torch.__version__, triton=triton.__version__)
    fn = implementation(name, model, num_tokens)
    ms = time_ms(fn, rounds)
    info.update(median_ms=ms, tflops=info["flops"] / ms / 1e9, weight_gbps=info["weight_bytes"] / ms / 1e6)
    info.update(pct_peak_tflops=100 * info["tflops"] / peak_tflops, pct_peak_gbps=100 * info["weight_gbps"] / peak_gbps)
    if reference is not None:
        info["max_abs_diff_vs_grouped_mm"] = float((fn().float() - reference.float()).abs().max())
    return info


if pytest is not None:
    pytestmark = pytest.mark.gpu

    @pytest.mark.parametrize("implementation_name", IMPLEMENTATIONS)
    @pytest.mark.parametrize("num_tokens", TOKENS)
    @pytest.mark.parametrize("model", list(MODELS))
    def test_experts_layer_cuda(benchmark, model, num_tokens, implementation_name):
        import triton

        fn = implementation(implementation_name, model, num_tokens)
        fn()  # compile outside the timed rounds
        torch.cuda.synchronize()

        def run():
            fn()
            torch.cuda.synchronize()

        benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
        info = dict(case_info(model, num_tokens), implementation=implementation_name,
                    device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
        stats = getattr(getattr(benchmark, "stats", None), "stats", None)
        if stats is not None and stats.median > 0:
            info.update(tflops=info["flops"] / stats.median / 1e12,
                        weight_gbps=info["weight_bytes"] / stats.median / 1e9, median_ms=stats.median * 1e3)
        benchmark.extra_info.update(info)


# ---------------------------------------------------------------------------------------------------- script


def markdown(rows: list[dict], peak_tflops: float, peak_gbps: float) -> str:
    """The benchmark table plus the issue's targets, checked against the rows."""
    lines = [f"| model | T | implementation | median ms | TFLOP/s | % of {peak_tflops:.0f} | weight GB/s | "
             f"% of {peak_gbps:.0f} | max abs diff vs grouped_mm |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['tokens']} | {r['implementation']} | error: {r['error']} | | | | | |")
            continue
        diff = r.get("max_abs_diff_vs_grouped_mm")
        lines.append(f"| {r['model']} | {r['tokens']} | {r['implementation']} | {r['median_ms']:.3f} | "
                     f"{r['tflops']:.1f} | {r['pct_peak_tflops']:.1f} | {r['weight_gbps']:.0f} | "
                     f"{r['pct_peak_gbps']:.1f} | {'' if diff is None else f'{diff:.3g}'} |")
    ok = {(r["model"], r["tokens"], r["implementation"]): r for r in rows if "error" not in r}
    lines += ["", "Targets:"]
    fused = ok.get(("mixtral-8x7b", 4096, "moeless_fused_moe"))
    grouped = ok.get(("mixtral-8x7b", 4096, "torch_grouped_mm"))
    if fused:
        lines.append(f"- prefill, Mixtral T=4096: fused_moe {fused['tflops']:.0f} TFLOP/s = "
                     f"{fused['pct_peak_tflops']:.0f}% of peak (target >= 60%)"
                     + (f"; torch_grouped_mm {grouped['tflops']:.0f} (target: fused_moe >= it: "
                        f"{'met' if fused['tflops'] >= grouped['tflops'] else 'NOT met'})" if grouped else ""))
    for r in rows:
        if r.get("implementation") == "moeless_fused_moe" and r.get("tokens") == min(TOKENS) and "error" not in r:
            lines.append(f"- decode, {r['model']} T={r['tokens']}: {r['weight_gbps']:.0f} GB/s of weights = "
                         f"{r['pct_peak_gbps']:.0f}% of peak (target >= 70%: "
                         f"{'met' if r['pct_peak_gbps'] >= 70 else 'NOT met'})")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    parser.add_argument("--implementations", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS)
    parser.add_argument("--peak-gbps", type=float, default=PEAK_GBPS)
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--markdown", help="write the table here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels_cuda needs a CUDA device", file=sys.stderr)
        return 2
    rows = []
    for model in args.models:
        for num_tokens in args.tokens:
            reference = None
            for name in sorted(args.implementations, key=lambda n: n != "torch_grouped_mm"):  # reference first
                try:
                    row = measure(model, num_tokens, name, args.rounds, args.peak_tflops, args.peak_gbps,
                                  None if name == "torch_grouped_mm" else reference)
                    if name == "torch_grouped_mm":
                        reference = implementation(name, model, num_tokens)()
                except Exception as err:  # noqa: BLE001 - a failing case is recorded, the others run
                    row = dict(model=model, tokens=num_tokens, implementation=name,
                               error=f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}")
                rows.append(row)
                print(json.dumps(row), flush=True)
        _layer_cache.clear()
        torch.cuda.empty_cache()
    table = markdown(rows, args.peak_tflops, args.peak_gbps)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
