"""Launch parameters of every Triton kernel: tiles, warps, stages, and the tuned tables of the grouped GEMM.

One place decides how each kernel is launched, so that the compile check (bench/compile_check.py) can
enumerate exactly what the host code can select, and the tuner (bench/tune_moe.py) can write what the host
code reads. This module imports neither torch nor a kernel: the compile check runs it in an environment that
only has Triton.

Grouped GEMM (grouped_swiglu, both kernels):
- BLOCK_M follows the pairs per slot (triton_kernels' rule): max(16, min(next_pow2(2 * pairs_per_slot), 64)),
  so a decode batch's expert fits one block and its weights are read once; 128 for prefill (>= 128 pairs per
  slot), with the prefill tile BM128 x BN128 x BK64, 8 warps, 4 stages.
- The N/K tiles, GROUP_SIZE_M (always >= 8: neighbouring programs share a weight tile in L2), warps and stages
  come from a tuned table when one exists for the layer and the device, else from the heuristic below. There
  is no online autotuning: a serving process never benchmarks.
- Tuned tables are JSON files named like vLLM's, `E={W},N={I},H={H},topk={K},device_name={GPU},dtype={dt}.json`,
  shipped in moeless_kernels/configs/ (or a directory named by MOELESS_CONFIG_DIR, searched first), mapping a
  token count T to {"BLOCK_M": .., "gate_up": {..}, "down": {..}}; the entry of the nearest T is used. An
  optional "meta" entry records provenance ({"capability": 90, "triton": ..., "date": ...}).
- Shared memory: stages are cut until the pipelined tiles fit the target (sm_80: 163 KiB, sm_90: 227 KiB).
- EVEN_K (K % BLOCK_K == 0: no mask on the reduction dimension) is a launch-time specialisation.

Must never: import torch or Triton kernels, read a device, or change what a kernel computes (only how fast).
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from functools import lru_cache

logger = logging.getLogger("moeless_kernels")

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
CONFIG_DIR_ENV = "MOELESS_CONFIG_DIR"
DTYPE_NAMES = ("float32", "float16", "bfloat16")
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# opt-in dynamic shared memory per block, in bytes, by compute capability (Triton's arch number: 80 = sm_80);
# an unknown target gets the smallest (sm_86/sm_89/sm_120 class)
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024,
                       100: 227 * 1024}
_SMALLEST_SHARED_MEMORY = 99 * 1024
BLOCK_M_VALUES = (16, 32, 64, 128)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------------------------------------------
# small kernels: one tile rule each


def combine_tile(hidden: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_H) of combine_kernel: 4096 elements per program, rows as wide as H allows (<= 1024)."""
    block_h = min(1024, max(32, next_power_of_2(hidden)))
    return 4096 // block_h, block_h


def topk_tile(num_experts: int, top_k: int, num_expert_group: int | None) -> dict:
    """Block sizes of fused_topk_kernel: about 4K fp32 per [BLOCK_T, BLOCK_E] tile, at most 64 tokens."""
    block_e = next_power_of_2(num_experts)
    return dict(
        BLOCK_T=max(1, min(64, 4096 // block_e)),
        BLOCK_E=block_e,
        BLOCK_K=next_power_of_2(top_k),
        BLOCK_G=next_power_of_2(num_expert_group) if num_expert_group else 1,
    )


def dispatch_block_n(num_pairs: int) -> int:
    """BLOCK_N of the dispatch/align kernels: several programs even for small inputs, at most 128 pairs so the
    [BLOCK_N, BLOCK_N] rank comparison stays cheap."""
    return min(128, max(16, next_power_of_2(cdiv(num_pairs, 4))))


DISPATCH_BLOCK_N_VALUES = (16, 32, 64, 128)


# ----------------------------------------------------------------------------------------------------------------
# grouped GEMM


@dataclass(frozen=True)
class GemmConfig:
    """Tiles of one grouped GEMM kernel (BLOCK_M is shared by both kernels: MoEConfig.block_m)."""

    BLOCK_N: int
    BLOCK_K: int
    GROUP_SIZE_M: int
    num_warps: int
    num_stages: int

    def __post_init__(self):
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GemmConfig.{name} must be a positive int, got {value!r}")
            if name in ("BLOCK_N", "BLOCK_K", "num_warps") and value & (value - 1):
                raise ValueError(f"GemmConfig.{name} must be a power of two, got {value!r}")

    def shared_memory(self, block_m: int, dtype: str, gate_up: bool) -> int:
        """Estimated shared bytes: Triton's pipeline keeps num_stages - 1 copies of the A and W tiles, plus room
        for an fp32 BLOCK_M x BLOCK_N tile in the epilogue (bench/compile_check.py measures the real figure)."""
        weight_tiles = 2 if gate_up else 1
        per_stage = (block_m * self.BLOCK_K + weight_tiles * self.BLOCK_K * self.BLOCK_N) * _DTYPE_BYTES[dtype]
        return max(1, self.num_stages - 1) * per_stage + block_m * self.BLOCK_N * 4


@dataclass(frozen=True)
class MoEConfig:
    """How grouped_swiglu's two kernels are launched; `source` says where it came from (a table file or the
    heuristic)."""

    block_m: int
    gate_up: GemmConfig
    down: GemmConfig
    source: str = "heuristic"

    def to_json(self) -> dict:
        return {"BLOCK_M": self.block_m, "gate_up": asdict(self.gate_up), "down": asdict(self.down)}

    @classmethod
    def from_json(cls, entry: dict, source: str) -> "MoEConfig":
        try:
            block_m = entry["BLOCK_M"]
            gate_up, down = GemmConfig(**entry["gate_up"]), GemmConfig(**entry["down"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{source}: an entry must be {{'BLOCK_M', 'gate_up': {{...}}, 'down': {{...}}}} "
                             f"with GemmConfig's fields, got {entry!r} ({err})") from None
        if block_m not in BLOCK_M_VALUES:
            raise ValueError(f"{source}: BLOCK_M must be one of {BLOCK_M_VALUES}, got {block_m!r}")
        return cls(block_m, gate_up, down, source)


def heuristic_block_m(num_pairs: int, num_slots: int) -> int:
    """BLOCK_M from the pairs per slot: the typical slot's pairs fit one block (twice the mean: routing is
    uneven), at least 16 (tl.dot's smallest tile); 128 for prefill-sized groups."""
    pairs_per_slot = num_pairs / max(1, num_slots)
    if pairs_per_slot >= 128:
        return 128
    return max(16, min(next_power_of_2(math.ceil(2 * pairs_per_slot)), 64))


def _fit_stages(config: GemmConfig, block_m: int, dtype: str, gate_up: bool, capability: int) -> GemmConfig:
    """Fewer stages (then a halved K tile) until the estimated shared memory fits the target."""
    budget = SHARED_MEMORY_LIMIT.get(capability, _SMALLEST_SHARED_MEMORY)
    while config.shared_memory(block_m, dtype, gate_up) > budget:
        if config.num_stages > 2:
            config = GemmConfig(config.BLOCK_N, config.BLOCK_K, config.GROUP_SIZE_M, config.num_warps,
                                config.num_stages - 1)
        elif config.BLOCK_K > 32:
            config = GemmConfig(config.BLOCK_N, config.BLOCK_K // 2, config.GROUP_SIZE_M, config.num_warps,
                                config.num_stages)
        else:
            break
    return config


def rows_aligned(dtype: str, *row_lengths: int) -> bool:
    """Whether rows of these lengths start on 16-byte boundaries (vector loads; else every element is its own
    load and wide tiles spill registers)."""
    return all(n * _DTYPE_BYTES[dtype] % 16 == 0 for n in row_lengths)


def heuristic_moe_config(block_m: int, dtype: str, capability: int, aligned: bool = True) -> MoEConfig:
    """Untuned tiles for this BLOCK_M (see the module docstring); `capability` as Triton's arch (90 = sm_90);
    aligned: rows_aligned(dtype, H, I).

    Decode (BLOCK_M <= 32) is weight-read bound: narrow N tiles and deep K tiles keep many programs streaming
    weights. Prefill (BLOCK_M 128) is compute bound: 128 x 128 x 64 tiles, 8 warps, 4 stages; the gate/up
    kernel holds two accumulators, and below sm_90 ptxas spills them at N 128 (bench/compile_check.py), so it
    takes N 64 there. fp32 (full-precision FMA dots, no tensor cores) spills at any wider tile: 32 x 32.
    Unaligned rows load element by element (no pipelining): 32 x 32 tiles (32 x 16 at BLOCK_M 128), which the
    compile check shows free of spills.
    """
    if block_m not in BLOCK_M_VALUES:
        raise ValueError(f"block_m must be one of {BLOCK_M_VALUES} for the Triton grouped GEMM, got {block_m}")
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {DTYPE_NAMES}, got {dtype!r}")
    if not aligned:
        small = GemmConfig(32, 16, 8, 8, 2) if block_m == 128 else GemmConfig(32, 32, 8, 4, 2)
        return MoEConfig(block_m, small, small)
    if dtype == "float32":
        gate_up = down = GemmConfig(32, 32, 8, 8 if block_m == 128 else 4, 3)
    elif block_m <= 32:
        gate_up, down = GemmConfig(64, 128, 8, 4, 4), GemmConfig(64, 128, 8, 4, 4)
    elif block_m == 64:
        gate_up, down = GemmConfig(64, 64, 8, 4, 4), GemmConfig(128, 64, 8, 4, 4)
    else:
        gate_up = GemmConfig(128 if capability >= 90 else 64, 64, 8, 8, 4)
        down = GemmConfig(128, 64, 16, 8, 4)
    return MoEConfig(block_m, _fit_stages(gate_up, block_m, dtype, True, capability),
                     _fit_stages(down, block_m, dtype, False, capability))


def interpreter_moe_config(block_m: int, inter: int, hidden: int) -> MoEConfig:
    """Under TRITON_INTERPRET the cost is per program and per loop trip, whatever the tile: tiles as wide as the
    matrices (up to 256), so a tiny test runs few programs and exercises both EVEN_K cases."""
    def tiles(n, k):
        return GemmConfig(min(256, max(16, next_power_of_2(n))), min(256, max(16, next_power_of_2(k))), 8, 4, 1)
    return MoEConfig(block_m, tiles(inter, hidden), tiles(hidden, inter), "interpreter")


def table_name(num_weights: int, inter: int, hidden: int, top_k: int, device_name: str, dtype: str) -> str:
    """vLLM-style file name of a tuned table (device_name with spaces as underscores)."""
    return (f"E={num_weights},N={inter},H={hidden},topk={top_k},device_name={device_name.replace(' ', '_')},"
            f"dtype={dtype}.json")


def _table_dirs() -> list[str]:
    extra = os.environ.get(CONFIG_DIR_ENV, "")
    return [d for d in (extra, CONFIG_DIR) if d]


@lru_cache(maxsize=None)
def load_table(path: str) -> dict[int, MoEConfig]:
    """{T: MoEConfig} of one table file (its "meta" entry aside); a malformed file is a ValueError naming it."""
    with open(path, encoding="utf-8") as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(raw, dict) or not set(raw) - {"meta"}:
        raise ValueError(f"{path}: must be a non-empty object mapping token counts to configs")
    table = {}
    for key, entry in raw.items():
        if key == "meta":
            continue
        if not str(key).isdigit():
            raise ValueError(f"{path}: keys must be token counts (non-negative integers), got {key!r}")
        table[int(key)] = MoEConfig.from_json(entry, path)
    return table


_FALLBACK_LOGGED: set[str] = set()


def tuned_moe_config(num_tokens: int, num_weights: int, inter: int, hidden: int, top_k: int, device_name: str,
                     dtype: str) -> MoEConfig | None:
    """The tuned entry of the nearest token count for this layer on this device, or None (logged once per
    table name) when no table exists."""
    name = table_name(num_weights, inter, hidden, top_k, device_name, dtype)
    for directory in _table_dirs():
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            table = load_table(path)
            nearest = min(table, key=lambda t: (abs(t - num_tokens), t))
            return table[nearest]
    if name not in _FALLBACK_LOGGED:
        _FALLBACK_LOGGED.add(name)
        logger.warning("moeless_kernels: no tuned grouped-GEMM table %s (searched %s); using the heuristic tiles. "
                       "bench/tune_moe.py writes one.", name, ", ".join(_table_dirs()))
    return None


def select_moe_config(num_tokens: int, top_k: int, num_slots: int, num_weights: int, inter: int, hidden: int,
                      dtype: str, device_name: str, capability: int, block_m: int | None = None) -> MoEConfig:
    """The table's entry when there is one (and it agrees with a requested block_m), else the heuristic."""
    tuned = tuned_moe_config(num_tokens, num_weights, inter, hidden, top_k, device_name, dtype)
    if tuned is not None and block_m in (None, tuned.block_m):
        return tuned
    if block_m is None:
        block_m = heuristic_block_m(num_tokens * top_k, num_slots)
    return heuristic_moe_config(block_m, dtype, capability, rows_aligned(dtype, hidden, inter))


def table_capability(path: str) -> int | None:
    """The "meta" capability of a table file (the target it was tuned on), None when not recorded."""
    with open(path, encoding="utf-8") as f:
        meta = json.load(f).get("meta", {})
    return meta.get("capability") if isinstance(meta, dict) else None


def all_moe_configs(dtype: str, capability: int, aligned: bool = True) -> list[MoEConfig]:
    """Every config the heuristic can select for this dtype, target and alignment, plus (aligned) the entries of
    the shipped tables tuned on this target (a table is only read on the device it names)."""
    configs = [heuristic_moe_config(bm, dtype, capability, aligned) for bm in BLOCK_M_VALUES]
    if aligned and os.path.isdir(CONFIG_DIR):
        for name in sorted(os.listdir(CONFIG_DIR)):
            path = os.path.join(CONFIG_DIR, name)
            if name.endswith(f"dtype={dtype}.json") and table_capability(path) == capability:
                configs += [c for _, c in sorted(load_table(path).items())]
    return configs
