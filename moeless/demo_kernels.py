"""The kernel demonstration (`make demo`): one Mixtral-shaped MoE layer through moeless's kernels.

Layer: T=32 tokens, H=256, I=512, E=8 experts, top-2 softmax routing renormalised (Mixtral-8x7B's E, K and
router; H and I reduced 16x and 28x so that Triton's interpreter finishes in about half a minute on a CPU),
fp32. It runs the Triton path (on CUDA when there is a GPU, else under TRITON_INTERPRET=1, re-running itself in a
fresh interpreter when Triton was imported before the variable could be set) and the pure-torch
reference, compares both with a float64 Hugging Face-style eager loop, then serves the same tokens with a
replicated plan (the two hottest experts get two extra replicas each) and checks that the output is unchanged,
and counts the host syncs of one call (moeless_kernels.sync_audit). It prints; it never asserts, downloads or
writes files.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

NUM_TOKENS, HIDDEN, INTER, EXPERTS, TOP_K = 32, 256, 512, 8, 2


def _eager_float64(hidden, gate_up, down, topk_ids, topk_weights):
    """Hugging Face's per-expert eager loop, in float64: the truth the kernels are measured against."""
    out = torch.zeros(hidden.shape, dtype=torch.float64)
    for e in range(gate_up.shape[0]):
        token_idx, k_pos = torch.where(topk_ids == e)
        if token_idx.numel() == 0:
            continue
        gate, up = F.linear(hidden[token_idx].double(), gate_up[e].double()).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down[e].double()) * topk_weights[token_idx, k_pos, None].double()
        out.index_add_(0, token_idx, y)
    return out


def _timed(fn, repeats=1):
    best = float("inf")
    result = None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return result, best


def _balance(loads: torch.Tensor) -> float:
    loads = loads.double()
    return float(loads.max() / loads.mean())


def main() -> None:
    cuda = torch.cuda.is_available()
    if not cuda and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        # Triton reads TRITON_INTERPRET when it is first imported, and importing moeless (the CLI, transformers'
        # glue) may already have imported it: run this demo again in a fresh interpreter with the variable set.
        if "triton" in sys.modules:
            env = dict(os.environ, TRITON_INTERPRET="1")
            sys.stdout.flush()
            raise SystemExit(subprocess.call([sys.executable, "-m", "moeless.demo_kernels"], env=env))
        os.environ["TRITON_INTERPRET"] = "1"
    from moeless_kernels.fused_moe import ReplicaPlan, fused_moe

    device = "cuda" if cuda else "cpu"
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(NUM_TOKENS, HIDDEN, generator=g)
    gate_up = torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=g) * HIDDEN**-0.5
    down = torch.randn(EXPERTS, HIDDEN, INTER, generator=g) * INTER**-0.5
    # a skewed router, as real traces are: experts 0 and 1 are hot
    logits = torch.randn(NUM_TOKENS, EXPERTS, generator=g) + torch.tensor([1.5, 1.0] + [0.0] * (EXPERTS - 2))
    on = [t.to(device) for t in (hidden, gate_up, down, logits)]

    print(f"moeless kernel demo: one MoE layer, T={NUM_TOKENS} tokens, H={HIDDEN}, I={INTER}, E={EXPERTS}, "
          f"top-{TOP_K} softmax (renormalised), fp32")
    print(f"  (Mixtral-8x7B's E, K and router; H, I reduced from 4096, 14336 so the CPU interpreter is quick)")
    print(f"  Triton runs {'on ' + torch.cuda.get_device_name() if cuda else 'under TRITON_INTERPRET=1 (CPU)'}; "
          f"the torch reference on {device}")

    # --- unreplicated: Triton and torch against the float64 eager loop
    kw = dict(router_logits=on[3], top_k=TOP_K, renormalize=True)
    reference, t_ref = _timed(lambda: fused_moe(*on[:3], **kw, backend="torch"), repeats=3)
    triton_result, t_first = _timed(lambda: fused_moe(*on[:3], **kw, backend="triton"))
    triton_result, t_triton = _timed(lambda: fused_moe(*on[:3], **kw, backend="triton"))
    truth = _eager_float64(hidden, gate_up, down, reference.topk_ids.cpu(), reference.topk_weights.cpu())
    same_routing = torch.equal(triton_result.topk_ids, reference.topk_ids)
    print("\n1. one replica per expert")
    print(f"   routing identical in both paths: {same_routing}")
    for name, result, seconds in (("torch reference", reference, t_ref), ("Triton", triton_result, t_triton)):
        err = (result.out.cpu().double() - truth).abs().max().item()
        print(f"   {name:<16} max |out - float64 eager| = {err:.2e}   time {seconds * 1e3:8.1f} ms")
    print(f"   (first Triton call, compiling{'' if cuda else ' / tracing'}: {t_first * 1e3:.0f} ms)")
    expert_loads = torch.bincount(reference.topk_ids.reshape(-1).long().cpu(), minlength=EXPERTS)
    print(f"   pairs per expert: {expert_loads.tolist()}  (balance max/mean {_balance(expert_loads):.2f})")

    # --- replicated: the two hottest experts get two extra replicas each, tokens split evenly
    hottest = torch.argsort(expert_loads, descending=True, stable=True)[:2]
    phy2log = torch.cat([torch.arange(EXPERTS), hottest.repeat_interleave(2)])
    plan = ReplicaPlan.from_phy2log(phy2log, EXPERTS).to(device)
    print(f"\n2. replicated plan: experts {hottest.tolist()} get 2 extra replicas each, "
          f"{phy2log.numel()} slots, phy2log = {phy2log.tolist()}")
    for name, backend, base in (("torch reference", "torch", reference), ("Triton", "triton", triton_result)):
        replicated, seconds = _timed(lambda: fused_moe(*on[:3], **kw, plan=plan, backend=backend))
        diff = (replicated.out - base.out).abs().max().item()
        slot_loads = replicated.dispatch.slot_counts.cpu()
        print(f"   {name:<16} max |out - out with one replica per expert| = {diff:.1e} "
              f"(bitwise equal: {torch.equal(replicated.out, base.out)})   time {seconds * 1e3:8.1f} ms")
    print(f"   pairs per slot:   {slot_loads.tolist()}  (balance max/mean over slots {_balance(slot_loads):.2f})")
    print("   lossless: the same routing, each pair on a replica of its own expert; the torch path is bitwise equal,")
    print("   the Triton path equal up to fp32 rounding (a pair's row sits at another position of another GEMM tile)")

    # --- what a GPU would wait on: the host syncs of one Triton call (value checks off, as on CUDA by default)
    from moeless_kernels.sync_audit import count_host_syncs

    previous = os.environ.get("MOELESS_DEBUG")
    os.environ["MOELESS_DEBUG"] = "0"
    try:
        with count_host_syncs() as syncs:
            fused_moe(*on[:3], **kw, plan=plan, backend="triton")
    finally:
        if previous is None:
            os.environ.pop("MOELESS_DEBUG")
        else:
            os.environ["MOELESS_DEBUG"] = previous
    print(f"\n3. host syncs in one Triton call with the replicated plan (points where the CPU would wait for the "
          f"GPU): {len(syncs)}")


if __name__ == "__main__":
    main()
