"""Compile every Triton kernel of moeless_kernels for sm_90 and sm_80, without a GPU, and report its resources.

    python bench/compile_check.py [--arch 90 80] [--jobs N] [--out table.md]     (make compile-check)

Each kernel is compiled with every launch configuration the host code can select (moeless_kernels/
launch_configs.py: the grouped GEMM's BLOCK_M tiers and their tiles, plus the entries of shipped tuned tables
for that target; the tiles of combine, fused_topk and the dispatch kernels) in fp32, fp16 and bf16, and every
specialisation branch at least once per dtype (grouped and plain top-k, sigmoid/softmax, bias, renormalise;
interleaved gate/up, EVEN_K, routed weight; even split or quotas). Arguments are specialised exactly as
Triton's launcher would specialise them (its own native_specialize_impl: ints equal to 1 become constants,
multiples of 16 get divisibility hints), for a contiguous model-shaped layout ("aligned") and an odd-sized one
("ragged"). Triton compiles for a stand-in target (triton.compile(ASTSource, target=GPUTarget("cuda", arch,
32))), so no driver is needed; ptxas -v (the one Triton uses) gives registers and spills, Triton's metadata
the shared memory.

Prints one Markdown table (kernel, config, then registers / spill bytes / shared KiB per target) and exits
non-zero on any compile error or on shared memory beyond the target's limit (sm_90: 227 KiB, sm_80: 163 KiB).
It imports neither torch nor moeless_kernels/__init__.py: `make test` also runs it in a second environment
that holds only the GPU machine's Triton (3.6). Every kernel compiles afresh, in a scratch folder under build/
that is removed at the end (nothing is cached outside the repository, nor kept inside it).
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import os
import contextlib
import io
import re
import shutil
import sys
import tempfile
import time
import types
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.pop("TRITON_INTERPRET", None)  # jit decorators must build compilable functions, not interpreted ones
# Triton's home and cache in a scratch folder inside the repository, removed at the end; every kernel compiles
# afresh, so ptxas runs and its report is Triton's own
os.makedirs(os.path.join(ROOT, "build"), exist_ok=True)
SCRATCH = tempfile.mkdtemp(prefix="compile-check-", dir=os.path.join(ROOT, "build"))
os.environ["TRITON_HOME"] = SCRATCH
os.environ["TRITON_CACHE_DIR"] = os.path.join(SCRATCH, "cache")
os.environ["TRITON_ALWAYS_COMPILE"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default, said out loud (silences 3.9's warning)

# moeless_kernels without its __init__ (which imports torch): a bare package whose submodules import normally
_package = types.ModuleType("moeless_kernels")
_package.__path__ = [os.path.join(ROOT, "moeless_kernels")]
sys.modules.setdefault("moeless_kernels", _package)

import triton  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from moeless_kernels import launch_configs as lc  # noqa: E402
from moeless_kernels.jit import combine_kernels, dispatch_kernels, grouped_gemm_kernels, topk_kernels  # noqa: E402

try:
    from triton._C.libtriton import native_specialize_impl  # Triton >= 3.3: the launcher's own specialisation
except ImportError:  # pragma: no cover - older Triton
    native_specialize_impl = None

DTYPES = ("float32", "float16", "bfloat16")
_PTR = {"float32": "torch.float32", "float16": "torch.float16", "bfloat16": "torch.bfloat16",
        "int32": "torch.int32", "int64": "torch.int64"}


class Tensor:
    """Stands in for a torch tensor at specialisation time: a dtype and a 16-byte aligned address."""

    def __init__(self, dtype: str):
        self.dtype = _PTR[dtype]

    def data_ptr(self) -> int:
        return 0


@dataclass
class Case:
    kernel: str
    config: str
    fn_name: str  # attribute of its jit module
    module: str
    args: dict  # parameter name -> value (ints, Tensor, or constexpr values)
    num_warps: int = 4
    num_stages: int = 3


# ----------------------------------------------------------------------------------------------------------------
# what the host code can select


# (T, H, I, W): aligned = Mixtral's H and I (EVEN_K, 16-divisible strides); uneven = 16-divisible but no K tile
# divides them (EVEN_K False); ragged = nothing divides by 16 (scalar loads)
GEMM_LAYOUTS = {"aligned": (4096, 4096, 14336, 8), "uneven": (2000, 2064, 1040, 8), "ragged": (1000, 1030, 1002, 7)}


def _gemm_pair(dtype: str, config, layout: str, top_k: int, interleaved: bool, routed: bool) -> list[Case]:
    T, H, I, W = GEMM_LAYOUTS[layout]
    pairs = T * top_k
    em = (pairs + min(W, pairs) * (config.block_m - 1)) // config.block_m * config.block_m
    precision = "ieee" if dtype == "float32" else None
    up, down = config.gate_up, config.down
    name = f"{dtype} BM{config.block_m} {layout}"
    return [
        Case("gate_up_silu", f"{name} BN{up.BLOCK_N} BK{up.BLOCK_K} G{up.GROUP_SIZE_M} w{up.num_warps} "
             f"s{up.num_stages} K{top_k}{' il' if interleaved else ''}{' evenK' if H % up.BLOCK_K == 0 else ''}",
             "gate_up_silu_kernel", "grouped_gemm_kernels",
             dict(hidden_ptr=Tensor(dtype), gate_up_ptr=Tensor(dtype), intermediate_ptr=Tensor(dtype),
                  sorted_token_ids_ptr=Tensor("int32"), block_slot_ids_ptr=Tensor("int32"),
                  slot_to_weight_ptr=Tensor("int32"), EM=em, num_valid_pairs=pairs, N=I, K=H,
                  stride_hm=H, stride_hk=1, stride_we=2 * I * H, stride_wn=H, stride_wk=1, stride_im=I,
                  stride_in=1, TOP_K=top_k, BLOCK_M=config.block_m, INTERLEAVED=interleaved,
                  BF16_INTERPRETED=False, DOT_PRECISION=precision, EVEN_K=H % up.BLOCK_K == 0,
                  BLOCK_N=up.BLOCK_N, BLOCK_K=up.BLOCK_K, GROUP_SIZE_M=up.GROUP_SIZE_M),
             up.num_warps, up.num_stages),
        Case("down_proj", f"{name} BN{down.BLOCK_N} BK{down.BLOCK_K} G{down.GROUP_SIZE_M} w{down.num_warps} "
             f"s{down.num_stages}{' routed' if routed else ''}{' evenK' if I % down.BLOCK_K == 0 else ''}",
             "down_proj_kernel", "grouped_gemm_kernels",
             dict(intermediate_ptr=Tensor(dtype), down_ptr=Tensor(dtype), out_ptr=Tensor(dtype),
                  sorted_token_ids_ptr=Tensor("int32"), block_slot_ids_ptr=Tensor("int32"),
                  slot_to_weight_ptr=Tensor("int32"), topk_weights_ptr=Tensor("float32"), EM=em,
                  num_valid_pairs=pairs, N=H, K=I, stride_im=I, stride_ik=1, stride_de=H * I, stride_dn=I,
                  stride_dk=1, stride_om=H, stride_on=1, BLOCK_M=config.block_m, MUL_ROUTED_WEIGHT=routed,
                  BF16_INTERPRETED=False, DOT_PRECISION=precision, EVEN_K=I % down.BLOCK_K == 0,
                  BLOCK_N=down.BLOCK_N, BLOCK_K=down.BLOCK_K, GROUP_SIZE_M=down.GROUP_SIZE_M),
             down.num_warps, down.num_stages),
    ]


def gemm_cases(arch: int) -> list[Case]:
    """Both grouped GEMM kernels for every config of every dtype on the aligned layout (what models run); the
    uneven layout (EVEN_K False) for every config of one dtype (rotating); the ragged layout once per dtype. The
    flags (interleaved, TOP_K, routed weight) rotate so each value meets each dtype."""
    cases = []
    for d, dtype in enumerate(DTYPES):
        configs = lc.all_moe_configs(dtype, arch)
        for i, config in enumerate(configs):
            flags = dict(top_k=(1, 2, 6, 8)[(i + d) % 4], interleaved=bool((i + d) % 2), routed=(i + d) % 3 != 2)
            cases += _gemm_pair(dtype, config, "aligned", **flags)
            if i % len(DTYPES) == d:
                cases += _gemm_pair(dtype, config, "uneven", **flags)
        for i, config in enumerate(lc.all_moe_configs(dtype, arch, aligned=False)):  # ragged rows' own tiles
            if i % len(DTYPES) == d:
                cases += _gemm_pair(dtype, config, "ragged", top_k=2, interleaved=bool(i % 2), routed=True)
    return cases


def combine_cases() -> list[Case]:
    """Every tile combine_tile can return (BLOCK_H 32 .. 1024), dtypes rotating; the widest in every dtype."""
    cases = []
    for i, hidden in enumerate((16, 64, 128, 256, 512, 4096)):
        block_t, block_h = lc.combine_tile(hidden)
        for dtype in (DTYPES if block_h == 1024 else DTYPES[i % 3:i % 3 + 1]):
            cases.append(Case("combine", f"{dtype} BT{block_t} BH{block_h} (H={hidden})", "combine_kernel",
                              "combine_kernels",
                              dict(pair_out_ptr=Tensor(dtype), out_ptr=Tensor(dtype), T=64, H=hidden, K=8,
                                   stride_pm=hidden, stride_ph=1, BLOCK_T=block_t, BLOCK_H=block_h)))
    return cases


def topk_cases() -> list[Case]:
    """Routings of real models, dtypes rotating; DeepSeek-V3's grouped routing in every dtype."""
    # (E, K, (groups, topk_group) or None, scoring, renormalize, bias): Mixtral, ESFT/DeepSeek-V2-Lite, Qwen3,
    # DeepSeek-V3 (grouped, top-2 group score), groups of one expert (top-1 group score), 512 experts
    routings = [(8, 2, None, "softmax", True, False), (64, 6, None, "softmax", False, False),
                (128, 8, None, "softmax", True, False), (256, 8, (8, 4), "sigmoid", True, True),
                (16, 4, (16, 4), "sigmoid", False, True), (512, 10, None, "sigmoid", True, False)]
    cases = []
    for i, (E, K, groups, scoring, renorm, bias) in enumerate(routings):
        for dtype in (DTYPES if E == 256 else DTYPES[i % 3:i % 3 + 1]):
            tile = lc.topk_tile(E, K, groups[0] if groups else None)
            group_size = E // groups[0] if groups else 1
            cases.append(Case(
                "fused_topk", f"{dtype} E{E} K{K} {scoring}{' renorm' if renorm else ''}{' bias' if bias else ''}"
                f"{f' groups{groups[0]}/{groups[1]}' if groups else ''} BT{tile['BLOCK_T']}", "fused_topk_kernel",
                "topk_kernels",
                dict(logits_ptr=Tensor(dtype), bias_ptr=Tensor("float32"), weights_ptr=Tensor("float32"),
                     ids_ptr=Tensor("int32"), counts_ptr=Tensor("int32"), T=64, E=E, K=K, stride_lt=E, stride_le=1,
                     group_size=group_size, num_groups=groups[0] if groups else 1,
                     topk_group=groups[1] if groups else 1, routed_scaling_factor=2.5,
                     SCORING_SIGMOID=scoring == "sigmoid", RENORMALIZE=renorm, HAS_BIAS=bias,
                     USE_GROUPS=groups is not None, GROUP_TOP2=groups is not None and group_size >= 2, **tile)))
    return cases


def dispatch_cases() -> list[Case]:
    """Every BLOCK_N; the ids the host passes are int64 (flat pair ids); groups from 8 experts to 4096 slots."""
    cases = []
    for i, block_n in enumerate(lc.DISPATCH_BLOCK_N_VALUES):
        groups = (8, 256, 1023, 4096)[i]
        cases.append(Case("group_histogram", f"BN{block_n} G{groups}", "group_histogram_kernel", "dispatch_kernels",
                          dict(ids_ptr=Tensor("int64"), hist_ptr=Tensor("int32"), N=4096, G=groups,
                               BLOCK_N=block_n, BLOCK_G=lc.next_power_of_2(groups + 1))))
        even, replicas = i % 2 == 0, (1, 2, 8, 32)[i]
        cases.append(Case(
            "replica_slot", f"BN{block_n} R{replicas}{' even' if even else ' quotas'}", "replica_slot_kernel",
            "dispatch_kernels",
            dict(ids_ptr=Tensor("int64"), block_offset_ptr=Tensor("int32"), counts_ptr=Tensor("int32"),
                 logcnt_ptr=Tensor("int32"), log2phy_ptr=Tensor("int32"), quota_cum_ptr=Tensor("int32"),
                 slot_ids_ptr=Tensor("int32"), rank_in_slot_ptr=Tensor("int32"), N=4096, E=64, R=replicas,
                 EVEN_SPLIT=even, BLOCK_N=block_n, BLOCK_R=lc.next_power_of_2(replicas))))
        cases.append(Case("align_scatter", f"BN{block_n}", "align_scatter_kernel", "dispatch_kernels",
                          dict(slot_ptr=Tensor("int64"), block_offset_ptr=Tensor("int32"),
                               slot_start_ptr=Tensor("int32"), sorted_ids_ptr=Tensor("int32"), N=4096, P=72,
                               BLOCK_N=block_n)))
    return cases


def all_cases(arch: int) -> list[Case]:
    return gemm_cases(arch) + topk_cases() + combine_cases() + dispatch_cases()


# ----------------------------------------------------------------------------------------------------------------
# compiling


def _source(fn, args: dict, backend) -> ASTSource:
    """The ASTSource Triton's launcher would build for these argument values (its _pack_args, without a GPU)."""
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        value = args[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[(i,)] = value
            continue
        kind, attr = native_specialize_impl(BaseBackend, value, False, not param.do_not_specialize,
                                            not param.do_not_specialize_on_alignment)
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[(i,)] = attr
        elif isinstance(attr, str):  # floats carry no attribute
            attrs[(i,)] = backend.parse_attr(attr)
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def _resources(log: str) -> tuple[int, int]:
    """(registers, spill store + load bytes) from the ptxas -v report Triton printed."""
    regs = re.search(r"Used (\d+) registers", log)
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    return (int(regs.group(1)) if regs else -1), sum(spills)


def compile_case(case: Case, arch: int):
    """(registers, spill bytes, shared bytes), or the error text."""
    from triton import knobs
    from triton.compiler import make_backend

    knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas -v's report of the compile it runs
    target = GPUTarget("cuda", arch, 32)
    fn = getattr(globals()[case.module], case.fn_name)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(_source(fn, case.args, make_backend(target)), target=target,
                                      options={"num_warps": case.num_warps, "num_stages": case.num_stages})
        regs, spills = _resources(log.getvalue())
        return regs, spills, int(compiled.metadata.shared)
    except Exception as err:  # noqa: BLE001 - every failure is reported, none stops the others
        text = str(err).strip()
        return f"{type(err).__name__}: {text.splitlines()[-1] if text else ''}"[:300]


def _run(job):
    index, case, arch = job
    return index, arch, compile_case(case, arch)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="targets (Triton arch: 90 = sm_90)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiles in parallel")
    parser.add_argument("--out", help="also write the tables to this Markdown file")
    parser.add_argument("--kernel", help="only cases whose kernel name contains this")
    args = parser.parse_args(argv)
    if native_specialize_impl is None:
        print(f"triton {triton.__version__} is too old for this check (needs >= 3.3)", file=sys.stderr)
        return 2
    for arch in args.arch:
        if arch not in lc.SHARED_MEMORY_LIMIT:
            parser.error(f"--arch must be among {sorted(lc.SHARED_MEMORY_LIMIT)}, got {arch}")

    jobs = [(case, arch) for arch in args.arch for case in all_cases(arch)
            if not args.kernel or args.kernel in case.kernel]
    start = time.time()
    workers = max(1, min(args.jobs, len(jobs)))
    try:
        if workers == 1:
            results = [_run((i, case, arch)) for i, (case, arch) in enumerate(jobs)]
        else:
            with futures.ProcessPoolExecutor(workers) as pool:
                results = list(pool.map(_run, [(i, case, arch) for i, (case, arch) in enumerate(jobs)],
                                        chunksize=1))
    finally:
        shutil.rmtree(SCRATCH, ignore_errors=True)
    elapsed = time.time() - start

    failures = []
    lines = [f"Compile check: triton {triton.__version__}, {len(jobs)} compiles in {elapsed:.0f} s ({workers} "
             f"workers). Registers and spill bytes (stores + loads) from ptxas -v, shared memory from Triton."]
    for arch in args.arch:
        limit = lc.SHARED_MEMORY_LIMIT[arch]
        lines += ["", f"sm_{arch} (shared memory limit {limit // 1024} KiB)", "",
                  "| kernel | config | registers | spill bytes | shared KiB |", "|---|---|---:|---:|---:|"]
        for index, job_arch, result in results:
            if job_arch != arch:
                continue
            case = jobs[index][0]
            if isinstance(result, str):
                failures.append(f"{case.kernel} [{case.config}] sm_{arch}: {result}")
                lines.append(f"| {case.kernel} | {case.config} | ERROR | | |")
                continue
            regs, spills, shared = result
            if shared > limit:
                failures.append(f"{case.kernel} [{case.config}] sm_{arch}: {shared} bytes of shared memory > {limit}")
            lines.append(f"| {case.kernel} | {case.config} | {regs} | {spills} | {shared / 1024:.1f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(table)
    if failures:
        print(f"compile check FAILED ({len(failures)} of {len(jobs)}):\n" + "\n".join(failures), file=sys.stderr)
        return 1
    print(f"compile check passed: {len(jobs)} compiles, triton {triton.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
