"""Tune the grouped GEMM's tiles on this GPU and write a vLLM-style table that fused_moe reads at run time.

    python bench/tune_moe.py --model mixtral-8x7b                       # all token counts, full search
    python bench/tune_moe.py --model qwen3-30b-a3b --tokens 64 4096 --quick --out /tmp/tables
    python bench/tune_moe.py --shape 8,14336,4096,2 --dry-run           # no GPU: the search space and file name

For each token count T: random softmax top-k routing over the layer's E experts (as bench/bench_kernels_cuda.py),
moe_align at every BLOCK_M, then every tile config of the search space timed alone for each of the two kernels
(triton.testing.do_bench, median of its repetitions); the BLOCK_M whose best gate/up + best down is fastest
wins. Configs whose shared memory the estimate puts past the device's limit are skipped, and a config that
fails to compile or launch is skipped with a note. The table goes to moeless_kernels/configs/ (or --out; point
MOELESS_CONFIG_DIR at it to use it before shipping), named
`E={E},N={I},H={H},topk={K},device_name={GPU},dtype={dtype}.json`, with a "meta" entry (capability, versions,
date, search size). Serving never tunes: fused_moe looks the table up (nearest T) and falls back to the
heuristic tiles when there is none.

Time: about 0.1 s per timed config; the full space is ~200 configs x 2 kernels x 4 BLOCK_M per T (minutes per
T), --quick 16 (seconds per T).
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from moeless_kernels import launch_configs as lc  # noqa: E402 - torch-free

MODELS = {  # name: (experts E, intermediate I, hidden H, top_k K), as bench/bench_kernels_cuda.py
    "mixtral-8x7b": (8, 14336, 4096, 2),
    "qwen3-30b-a3b": (128, 768, 2048, 8),
    "deepseek-v3": (256, 2048, 7168, 8),
}
TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 16384)


def search_space(quick: bool) -> list[lc.GemmConfig]:
    """Tile configs to time (GROUP_SIZE_M >= 8 only: 1 re-reads weights once per block)."""
    if quick:
        grid = dict(BLOCK_N=(64, 128), BLOCK_K=(64, 128), GROUP_SIZE_M=(8,), num_warps=(4, 8), num_stages=(3, 4))
    else:
        grid = dict(BLOCK_N=(32, 64, 128, 256), BLOCK_K=(64, 128, 256), GROUP_SIZE_M=(8, 16), num_warps=(4, 8),
                    num_stages=(2, 3, 4, 5))
    return [lc.GemmConfig(*values) for values in itertools.product(*grid.values())]


def fits(config: lc.GemmConfig, block_m: int, dtype: str, gate_up: bool, capability: int, n: int) -> bool:
    """Worth timing: shared memory within the target (estimate), and an N tile no wider than the matrix."""
    limit = lc.SHARED_MEMORY_LIMIT.get(capability, min(lc.SHARED_MEMORY_LIMIT.values()))
    return config.shared_memory(block_m, dtype, gate_up) <= limit and config.BLOCK_N <= max(32, lc.next_power_of_2(n))


def choose(timings: dict[int, tuple[dict, dict]]) -> lc.MoEConfig:
    """The fastest (BLOCK_M, gate_up, down) from {block_m: ({GemmConfig: ms} of gate/up, {GemmConfig: ms} of
    down)}: per BLOCK_M the best of each kernel, then the BLOCK_M with the smallest sum."""
    best = None
    for block_m, (gate_up, down) in sorted(timings.items()):
        if not gate_up or not down:
            continue
        g = min(gate_up, key=gate_up.get)
        d = min(down, key=down.get)
        total = gate_up[g] + down[d]
        if best is None or total < best[0]:
            best = (total, lc.MoEConfig(block_m, g, d, "tuned"))
    if best is None:
        raise RuntimeError("no config ran for any BLOCK_M")
    return best[1]


def tune_tokens(num_tokens, shape, dtype_name, space, capability, log):
    """{block_m: (gate_up timings, down timings)} for one token count on the current GPU."""
    import torch
    import triton

    from moeless_kernels.dispatch import moe_align
    from moeless_kernels.grouped_gemm import launch_down, launch_gate_up

    experts, inter, hidden_size, top_k = shape
    dtype = getattr(torch, dtype_name)
    g = torch.Generator(device="cuda").manual_seed(num_tokens)
    hidden = torch.randn(num_tokens, hidden_size, device="cuda", dtype=dtype, generator=g)
    gate_up = torch.randn(experts, 2 * inter, hidden_size, device="cuda", dtype=dtype, generator=g) * hidden_size**-0.5
    down = torch.randn(experts, hidden_size, inter, device="cuda", dtype=dtype, generator=g) * inter**-0.5
    weights, ids = torch.topk(torch.softmax(torch.randn(num_tokens, experts, device="cuda", generator=g), -1), top_k)
    routed = (weights / weights.sum(-1, keepdim=True)).float().reshape(-1).contiguous()
    slot_to_weight = torch.arange(experts, dtype=torch.int32, device="cuda")
    intermediate = torch.empty(num_tokens * top_k, inter, device="cuda", dtype=dtype)
    out = torch.zeros(num_tokens * top_k, hidden_size, device="cuda", dtype=dtype)

    timings = {}
    for block_m in lc.BLOCK_M_VALUES:
        sorted_ids, block_slots, _ = moe_align(ids.int(), experts, block_m, backend="triton", static_shapes=True)
        rows = sorted_ids.numel()
        per_kernel = ({}, {})
        for config in space:
            for kernel, (launch, n) in enumerate(((launch_gate_up, inter), (launch_down, hidden_size))):
                if not fits(config, block_m, dtype_name, kernel == 0, capability, n):
                    continue
                if kernel == 0:
                    def run():
                        launch(hidden, gate_up, intermediate, sorted_ids, block_slots, slot_to_weight, rows, top_k,
                               block_m, False, config)
                else:
                    def run():
                        launch(intermediate, down, out, sorted_ids, block_slots, slot_to_weight, routed, rows,
                               block_m, config)
                try:
                    per_kernel[kernel][config] = triton.testing.do_bench(run, warmup=5, rep=25)
                except Exception as err:  # noqa: BLE001 - a config that does not compile or launch is skipped
                    log(f"  skip BM{block_m} {config} ({type(err).__name__}: {str(err).splitlines()[0][:80]})")
        timings[block_m] = per_kernel
    return timings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", choices=sorted(MODELS), help="a layer shape from the list")
    what.add_argument("--shape", help="E,I,H,K: experts, intermediate size, hidden size, top-k")
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS), help="token counts to tune")
    parser.add_argument("--dtype", default="bfloat16", choices=lc.DTYPE_NAMES)
    parser.add_argument("--quick", action="store_true", help="16 configs per kernel instead of ~200")
    parser.add_argument("--out", default=lc.CONFIG_DIR, help="directory of the table (default: the package's)")
    parser.add_argument("--dry-run", action="store_true", help="print the search space and file name; no GPU")
    args = parser.parse_args(argv)
    if args.model:
        shape = MODELS[args.model]
    else:
        try:
            shape = tuple(int(x) for x in args.shape.split(","))
            assert len(shape) == 4 and min(shape) >= 1
        except (ValueError, AssertionError):
            parser.error(f"--shape must be four positive ints E,I,H,K, got {args.shape!r}")
    if any(t < 1 for t in args.tokens):
        parser.error("--tokens must be positive")
    space = search_space(args.quick)

    if args.dry_run:
        name = lc.table_name(shape[0], shape[1], shape[2], shape[3], "<GPU name>", args.dtype)
        print(f"{len(space)} configs per kernel and BLOCK_M {lc.BLOCK_M_VALUES}, tokens {args.tokens}; "
              f"would write {os.path.join(args.out, name)}")
        return 0

    import torch
    import triton
    from tqdm import tqdm

    if not torch.cuda.is_available():
        print("tune_moe needs a CUDA GPU (use --dry-run to see the plan)", file=sys.stderr)
        return 2
    major, minor = torch.cuda.get_device_capability()
    capability = 10 * major + minor
    device_name = torch.cuda.get_device_name()
    entries = {"meta": {"capability": capability, "device": device_name, "triton": triton.__version__,
                        "torch": torch.__version__, "date": datetime.date.today().isoformat(),
                        "configs_per_kernel": len(space), "shape": dict(zip("EIHK", shape))}}
    for num_tokens in tqdm(args.tokens, desc="token counts"):
        timings = tune_tokens(num_tokens, shape, args.dtype, space, capability, tqdm.write)
        best = choose(timings)
        entries[str(num_tokens)] = best.to_json()
        ms = timings[best.block_m][0][best.gate_up] + timings[best.block_m][1][best.down]
        tqdm.write(f"T={num_tokens}: BM{best.block_m} gate_up {best.gate_up} down {best.down}: {ms:.3f} ms")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, lc.table_name(shape[0], shape[1], shape[2], shape[3], device_name, args.dtype))
    with open(path, "w") as f:
        json.dump(entries, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
