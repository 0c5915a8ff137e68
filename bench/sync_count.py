"""Host syncs of one decode-sized fused_moe call: how often the host would wait for the GPU, per routing path and plan.

    python bench/sync_count.py [--markdown F]       (CPU: Triton under the interpreter; GPU: the compiled kernels)

Counts, for a second call (the first builds the plan's device tensors and looks up the tuned table):
- audit: moeless_kernels.sync_audit (item/int/bool/tolist/cpu/numpy and value-dependent-shape ops), with the
  GPU's default (MOELESS_DEBUG=0 on CPU: the same code path) and with MOELESS_DEBUG=1 (value checks on);
- cuda: on a GPU, the warnings of torch.cuda.set_sync_debug_mode("warn"), the device's own count.
Shapes: Qwen3-30B-A3B's decode step (T 64, H 2048, I 768, E 128, K 8) on a GPU; on CPU a small layer of the
same routing (T 16, H 32, I 32, E 16, K 4) to keep the interpreter quick. Plans: none (one replica per
expert), and a replicated plan (a quarter of the experts twice, uneven quotas, a free slot).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

from moeless_kernels.fused_moe import ReplicaPlan, fused_moe  # noqa: E402
from moeless_kernels.sync_audit import count_host_syncs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def layer(device: str):
    T, H, I, E, K = (64, 2048, 768, 128, 8) if device == "cuda" else (16, 32, 32, 16, 4)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(T, H, generator=g).to(device, dtype)
    gate_up = (torch.randn(E, 2 * I, H, generator=g) * H**-0.5).to(device, dtype)
    down = (torch.randn(E, H, I, generator=g) * I**-0.5).to(device, dtype)
    logits = torch.randn(T, E, generator=g)
    weights, ids = torch.topk(torch.softmax(logits, -1), K)
    extra = torch.arange(0, E, 4)
    plan = ReplicaPlan.from_phy2log(torch.cat([torch.arange(E), extra, torch.tensor([-1])]), E)
    counts = torch.bincount(ids.flatten(), minlength=E)
    quotas = torch.zeros_like(plan.log2phy)
    quotas[:, 0] = counts
    quotas[extra, 0] = counts[extra] // 3
    quotas[extra, 1] = counts[extra] - counts[extra] // 3
    plan = ReplicaPlan(plan.phy2log, plan.log2phy, plan.logcnt, replica_tokens=quotas).to(device)
    routes = {"router_logits": dict(router_logits=logits.to(device), top_k=K),
              "topk_ids": dict(topk_ids=ids.int().to(device), topk_weights=weights.to(device))}
    return (T, H, I, E, K), hidden, gate_up, down, routes, {"none": None, "replicated": plan}


def count(call, debug: str) -> tuple[int, int | None, str]:
    """(audited syncs, CUDA sync warnings or None, the audit's report) of call() with MOELESS_DEBUG=debug."""
    os.environ["MOELESS_DEBUG"] = debug
    call()  # warm: compile, plan tensors, table lookup
    with count_host_syncs() as syncs:
        call()
    cuda = None
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                call()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        cuda = sum("synchroniz" in str(w.message) for w in caught)
    return len(syncs), cuda, syncs.report()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", help="also write the table here")
    parser.add_argument("--verbose", action="store_true", help="print where each sync happens")
    args = parser.parse_args(argv)
    shape, hidden, gate_up, down, routes, plans = layer(DEVICE)
    lines = [f"Host syncs per fused_moe call (backend triton, {DEVICE}{', interpreter' if DEVICE == 'cpu' else ''}; "
             f"T, H, I, E, K = {shape}):", "",
             "| routing | plan | audit, GPU default (MOELESS_DEBUG=0) | audit, MOELESS_DEBUG=1 | CUDA sync warnings |",
             "|---|---|---:|---:|---:|"]
    previous = os.environ.get("MOELESS_DEBUG")
    worst = 0
    try:
        for route_name, route in routes.items():
            for plan_name, plan in plans.items():
                def call():
                    return fused_moe(hidden, gate_up, down, plan=plan, backend="triton", **route)
                default, cuda, report = count(call, "0")
                debug, _, _ = count(call, "1")
                worst = max(worst, default, cuda or 0)
                lines.append(f"| {route_name} | {plan_name} | {default} | {debug} | "
                             f"{'n/a (no GPU)' if cuda is None else cuda} |")
                if args.verbose and default:
                    print(report)
    finally:
        if previous is None:
            os.environ.pop("MOELESS_DEBUG", None)
        else:
            os.environ["MOELESS_DEBUG"] = previous
    table = "\n".join(lines) + "\n"
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    return 1 if worst else 0


if __name__ == "__main__":
    sys.exit(main())
