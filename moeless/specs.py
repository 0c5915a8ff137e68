"""Model and hardware specs: the numbers the simulator's cost model needs, one frozen dataclass per concern.

`ModelSpec` holds the sizes of a Mixture-of-Experts model's expert layers (loadable from a Hugging Face
`config.json`, with presets for the models the project evaluates); `HardwareSpec` holds one GPU's peak rates,
memory and links (presets for the RTX A6000 testbed of the paper, H100 SXM and H200 SXM).

This module only describes; it must never time, launch or import a kernel (it sits on the lowest floor).
Every preset says where its numbers come from: a model's published config or sizes, a GPU's datasheet, or a
measurement; never a paper's outcome.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from importlib import resources
from typing import Any, Mapping

GB = 1e9
GIB = 1024**3

_DTYPE_BYTES = {
    "float32": 4.0, "fp32": 4.0, "float": 4.0,
    "bfloat16": 2.0, "bf16": 2.0, "float16": 2.0, "fp16": 2.0, "half": 2.0,
    "float8_e4m3fn": 1.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5,
}


@dataclass(frozen=True)
class ModelSpec:
    """Sizes of a MoE model's routed experts (SwiGLU: gate, up and down projections of H x I each).

    `num_moe_layers` counts only layers with routed experts (DeepSeek's first dense layers excluded).
    `dense_params_per_layer` is the per-layer non-expert weight count (attention, router, shared experts):
    non-expert modules are data-parallel, so every GPU reads them once per iteration.
    """

    name: str
    num_moe_layers: int
    num_experts: int
    top_k: int
    hidden_size: int
    moe_intermediate_size: int
    bytes_per_param: float = 2.0
    activation_bytes: float = 2.0
    num_shared_experts: int = 0
    shared_intermediate_size: int = 0
    dense_params_per_layer: int = 0
    source: str = ""

    def __post_init__(self):
        for field in ("num_moe_layers", "num_experts", "top_k", "hidden_size", "moe_intermediate_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelSpec.{field} must be a positive int, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"ModelSpec.top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        if self.bytes_per_param <= 0 or self.activation_bytes <= 0:
            raise ValueError("ModelSpec.bytes_per_param and activation_bytes must be > 0")

    # --- per expert -------------------------------------------------------------------------------------
    @property
    def expert_params(self) -> int:
        """Weights of one routed expert: gate and up (H x I each) and down (I x H)."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    @property
    def expert_bytes(self) -> float:
        """Memory of one expert instance (M_e of the paper): 0.33 GiB for a Mixtral-8x7B expert in bf16."""
        return self.expert_params * self.bytes_per_param

    @property
    def flops_per_token(self) -> float:
        """FLOPs one (token, expert) pair costs: a multiply-add per weight."""
        return 2.0 * self.expert_params

    @property
    def activation_bytes_per_token(self) -> float:
        """Bytes one (token, expert) pair moves through HBM: hidden in and out, the intermediate out and in."""
        return self.activation_bytes * (2 * self.hidden_size + 2 * self.moe_intermediate_size)

    @property
    def token_bytes(self) -> float:
        """Bytes of one token's hidden state on the wire (all-to-all dispatch or combine)."""
        return self.activation_bytes * self.hidden_size

    @property
    def total_expert_bytes(self) -> float:
        return self.expert_bytes * self.num_experts * self.num_moe_layers

    # --- constructors -----------------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any] | str | os.PathLike, name: str | None = None,
                       bytes_per_param: float | None = None) -> "ModelSpec":
        """Read a Hugging Face `config.json` (a dict or a path). Raises ValueError naming the missing key when
        the config is no MoE.

        Understood layouts: Mixtral, PhiMoE / GRIN, Qwen-MoE (2, 3), DeepSeek (V2, V3), OLMoE, MiniCPM-MoE,
        XVERSE, PowerMoE, Llama-4 (nested `text_config`), DBRX (nested `ffn_config`), Yuan 2.0-M32 (nested
        `moe_config`), JetMoE, LLaMA-MoE (v1: `num_selects`, per-expert `size_experts`; v2 with a residual
        expert), OpenMoE (`moe_layer_interval`), Jamba (`expert_layer_period` / `expert_layer_offset`), GPT-OSS
        (`experts_per_token`, MXFP4 weights), ERNIE-4.5 (`moe_k`, `moe_layer_start_index`), and the
        encoder-decoder Switch Transformers and NLLB-MoE (the sparse layers of both stacks count). Only layers
        with routed experts count (dense and Mamba layers do not)."""
        if not isinstance(config, Mapping):
            with open(config, encoding="utf-8") as fh:
                config = json.load(fh)
        cfg = dict(config)
        for nested in ("text_config", "ffn_config", "moe_config"):  # Llama-4, DBRX, Yuan nest the MoE sizes
            if isinstance(cfg.get(nested), Mapping):
                cfg = {**cfg, **cfg[nested]}
        model_type = str(cfg.get("model_type", "")).lower()

        def first(*keys, default=None):
            return _first(cfg, *keys, default=default)

        experts = first(*EXPERT_COUNT_KEYS)
        # (a bare "top_k" is a sampling setting in most configs, never the router's)
        top_k = first("num_experts_per_tok", "moe_top_k", "experts_per_token", "num_selects", "router_topk",
                      "moe_k", "num_selected_experts", default=_IMPLIED_TOP_K.get(model_type))
        hidden = first("hidden_size", "d_model", "n_embd")
        layers = first("num_hidden_layers", "num_layers", "n_layers", "n_layer", "encoder_layers")
        for key, value in (("num_experts (or num_local_experts / n_routed_experts)", experts),
                           ("num_experts_per_tok", top_k), ("hidden_size", hidden),
                           ("num_hidden_layers", layers)):
            if value is None:
                raise ValueError(f"config: missing {key}; is this a Mixture-of-Experts config?")
        inter = first("moe_intermediate_size", "expert_intermediate_size", "ffn_hidden_size")
        sizes = cfg.get("size_experts")  # LLaMA-MoE v1: [layers][experts] intermediate sizes
        if inter is None and isinstance(sizes, list) and sizes and all(isinstance(r, list) and r for r in sizes):
            inter = max(max(int(v) for v in row) for row in sizes)
        if inter is None:
            inter = first("intermediate_size", "d_ff", "encoder_ffn_dim")
        if inter is None:
            raise ValueError("config: missing moe_intermediate_size / intermediate_size")
        moe_layers = _moe_layer_count(cfg, int(layers))
        shared = int(first("n_shared_experts", "num_shared_experts", "moe_num_shared_experts", default=0) or 0)
        shared_inter = int(first("shared_expert_intermediate_size", "intermediate_size_residual", default=0) or 0)
        if shared and not shared_inter:
            shared_inter = shared * int(inter)
        elif shared_inter and not shared:
            shared = 1
        if bytes_per_param is None:
            dtype = str(first("torch_dtype", "dtype", default="bfloat16")).replace("torch.", "")
            bytes_per_param = _DTYPE_BYTES.get(dtype, 2.0)
            quant = json.dumps(cfg.get("quantization_config", "")).lower()
            if "mxfp4" in quant:
                bytes_per_param = 4.25 / 8  # 4-bit values and one 8-bit scale per 32
            elif "fp8" in quant:
                bytes_per_param = 1.0
        heads = int(first("num_attention_heads", "n_head", "n_heads", "num_heads", "encoder_attention_heads",
                          default=1))
        kv_heads = int(first("num_key_value_heads", default=heads))
        head_dim = int(first("head_dim", default=int(hidden) // max(heads, 1)))
        attention = int(hidden) * head_dim * (2 * heads + 2 * kv_heads)
        router = int(hidden) * int(experts)
        dense = attention + router + 3 * int(hidden) * shared_inter
        return cls(
            name=name or _config_name(cfg),
            num_moe_layers=moe_layers, num_experts=int(experts), top_k=int(top_k), hidden_size=int(hidden),
            moe_intermediate_size=int(inter), bytes_per_param=float(bytes_per_param),
            num_shared_experts=shared, shared_intermediate_size=shared_inter, dense_params_per_layer=dense,
            source="Hugging Face config.json",
        )

    def replace(self, **changes) -> "ModelSpec":
        return dataclasses.replace(self, **changes)


# the config keys that give a MoE layer's routed experts, in order of precedence
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
# routers whose top-k is fixed by the architecture, not a config key
_IMPLIED_TOP_K = {"switch_transformers": 1, "nllb-moe": 2, "nllb_moe": 2}


def _first(cfg: dict, *keys, default=None):
    """The value of the first of `keys` that `cfg` sets (not None), else `default`."""
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    return default


def _moe_layer_count(cfg: dict, layers: int) -> int:
    """The layers with routed experts of a config whose stack has `layers` layers (see from_hf_config)."""
    if cfg.get("num_sparse_encoder_layers") is not None or cfg.get("num_sparse_decoder_layers") is not None:
        return int(cfg.get("num_sparse_encoder_layers") or 0) + int(cfg.get("num_sparse_decoder_layers") or 0)
    if cfg.get("encoder_sparse_step") is not None and cfg.get("encoder_layers") is not None:
        # NLLB-MoE: layer i of a stack is sparse where (i + 1) % step == 0 (a step of 0: no sparse layer)
        count = 0
        for stack in ("encoder", "decoder"):
            step = int(cfg.get(f"{stack}_sparse_step") or 0)
            count += int(cfg.get(f"{stack}_layers") or 0) // step if step > 0 else 0
        return count
    if cfg.get("expert_layer_period") is not None:  # Jamba: layer i is MoE where i % period == offset
        period = max(1, int(cfg["expert_layer_period"]))
        offset = int(cfg.get("expert_layer_offset") or 0)
        return sum(1 for i in range(layers) if i % period == offset % period)
    if cfg.get("moe_layer_interval") is not None and cfg.get("moe_layer_start_index") is None:
        # OpenMoE: layer i is MoE where (i + 1) % interval == 0
        return layers // max(1, int(cfg["moe_layer_interval"]))
    if cfg.get("moe_layer_start_index") is not None:
        # ERNIE-4.5: layer i is MoE where start <= i <= end (-1: the last layer) and (i + 1) % interval == 0
        start = int(cfg["moe_layer_start_index"])
        end = cfg.get("moe_layer_end_index")
        end = layers - 1 if end is None or int(end) < 0 else min(int(end), layers - 1)
        interval = max(1, int(cfg.get("moe_layer_interval") or 1))
        return sum(1 for i in range(start, end + 1) if (i + 1) % interval == 0)
    moe_layers = layers - int(_first(cfg, "first_k_dense_replace", default=0))
    moe_layers -= len(_first(cfg, "mlp_only_layers", default=[]) or [])
    step = int(_first(cfg, "decoder_sparse_step", "moe_layer_freq", "moe_layer_frequency",
                      "interleave_moe_layer_step", default=1) or 1)
    return moe_layers // step if step > 1 else moe_layers


def _config_name(cfg: dict) -> str:
    """A model's name from its config: the last part of `_name_or_path` (a hub id or a checkpoint folder),
    else the model type."""
    path = str(cfg.get("_name_or_path") or "").rstrip("/")
    return path.rsplit("/", 1)[-1] if path else str(cfg.get("model_type") or "moe")


@dataclass(frozen=True)
class HardwareSpec:
    """One GPU model and how GPUs of a node are connected.

    Rates are the datasheet's dense peaks; `flops_efficiency` and `bandwidth_efficiency` scale them to what a
    kernel reaches. `link_bandwidth` is GPU-to-GPU per direction inside a link group of `link_group` GPUs
    (2 = pairwise NVLink bridges, 8 = NVSwitch); traffic to GPUs outside the group and from host memory goes
    over PCIe at `host_bandwidth` per direction. `launch_s` is the fixed cost of one replica's kernel work.
    """

    name: str
    peak_flops: float
    hbm_bandwidth: float
    memory_bytes: float
    link_bandwidth: float
    link_group: int
    host_bandwidth: float
    launch_s: float = 5e-6
    flops_efficiency: float = 1.0
    bandwidth_efficiency: float = 1.0
    source: str = ""

    def __post_init__(self):
        for field in ("peak_flops", "hbm_bandwidth", "memory_bytes", "link_bandwidth", "host_bandwidth"):
            if not getattr(self, field) > 0:
                raise ValueError(f"HardwareSpec.{field} must be > 0, got {getattr(self, field)!r}")
        if self.link_group < 1:
            raise ValueError(f"HardwareSpec.link_group must be >= 1, got {self.link_group}")
        if self.launch_s < 0:
            raise ValueError(f"HardwareSpec.launch_s must be >= 0, got {self.launch_s}")
        for field in ("flops_efficiency", "bandwidth_efficiency"):
            if not 0 < getattr(self, field) <= 1:
                raise ValueError(f"HardwareSpec.{field} must be in (0, 1], got {getattr(self, field)}")

    @property
    def flops(self) -> float:
        """Reachable FLOP/s."""
        return self.peak_flops * self.flops_efficiency

    @property
    def bandwidth(self) -> float:
        """Reachable HBM bytes/s."""
        return self.hbm_bandwidth * self.bandwidth_efficiency

    def replace(self, **changes) -> "HardwareSpec":
        return dataclasses.replace(self, **changes)


# --- presets ---------------------------------------------------------------------------------------------
# H200 efficiencies: an H200's achieved rates as reported for the machines we benchmark on (an 8192^3 bf16
# matmul through PyTorch at about 788 TFLOP/s of the 989 peak; a device-to-device copy at about 4.3 TB/s of
# 4.8), not yet measured by this project's own benchmarks (bench/gpu_check.sh). The A6000 and H100 carry the
# same fractions as an assumption until the project's GPU benchmarks measure them.
_H200_FLOPS_EFF = 788e12 / 989e12
_H200_BW_EFF = 4.3e12 / 4.8e12

HARDWARE: dict[str, HardwareSpec] = {
    "a6000": HardwareSpec(
        name="RTX A6000 (pairwise NVLink)", peak_flops=154.8e12, hbm_bandwidth=768e9, memory_bytes=48 * GB,
        link_bandwidth=56.25e9, link_group=2, host_bandwidth=25e9,
        flops_efficiency=_H200_FLOPS_EFF, bandwidth_efficiency=_H200_BW_EFF,
        source="NVIDIA RTX A6000 datasheet (bf16 dense tensor 154.8 TFLOP/s, 768 GB/s GDDR6, NVLink bridge "
               "112.5 GB/s both directions); PCIe 4.0 x16 at about 25 GB/s achieved; efficiencies assumed",
    ),
    "h100": HardwareSpec(
        name="H100 SXM", peak_flops=989e12, hbm_bandwidth=3.35e12, memory_bytes=80 * GB,
        link_bandwidth=450e9, link_group=8, host_bandwidth=50e9,
        flops_efficiency=_H200_FLOPS_EFF, bandwidth_efficiency=_H200_BW_EFF,
        source="NVIDIA H100 SXM datasheet (bf16 dense 989 TFLOP/s, 3.35 TB/s, NVLink 4 900 GB/s both "
               "directions through NVSwitch); PCIe 5.0 x16 at about 50 GB/s; efficiencies assumed from H200",
    ),
    "h200": HardwareSpec(
        name="H200 SXM", peak_flops=989e12, hbm_bandwidth=4.8e12, memory_bytes=141 * GB,
        link_bandwidth=450e9, link_group=8, host_bandwidth=50e9,
        flops_efficiency=_H200_FLOPS_EFF, bandwidth_efficiency=_H200_BW_EFF,
        source="NVIDIA H200 SXM datasheet (bf16 dense 989 TFLOP/s, 4.8 TB/s HBM3e, NVLink 900 GB/s both "
               "directions); efficiencies from reported H200 rates (788 TFLOP/s matmul, 4.3 TB/s copy)",
    ),
    "cpu": HardwareSpec(
        name="one CPU core (gloo)", peak_flops=50e9, hbm_bandwidth=10e9, memory_bytes=16 * GB,
        link_bandwidth=2e9, link_group=1, host_bandwidth=10e9, launch_s=50e-6,
        source="a rough profile of one x86 core serving with gloo (about 50 GFLOP/s fp32, 10 GB/s memory, "
               "2 GB/s loopback, 50 us per expert call of the Python path): what the demo's policies price "
               "with on CPU; not a measurement",
    ),
}

# Bundled Hugging Face configs (MIT, via ljcleo/moe-lrc; see moeless/data/README.md).
_BUNDLED_CONFIGS = {
    "mixtral-8x7b": "mixtral-8x7b.json",
    "phi-3.5-moe": "phi-3.5-moe.json",
    "qwen1.5-moe-a2.7b": "qwen1.5-moe-a2.7b.json",
    "qwen3-30b-a3b": "qwen3-30b-a3b.json",
    "deepseek-v2-lite": "deepseek-v2-lite.json",
    "olmoe-1b-7b": "olmoe-1b-7b.json",
}

# Models given by their published sizes (no bundled config).
_PUBLISHED = {
    # meta-llama/Llama-4-Scout-17B-16E: 48 layers, all MoE, 16 routed experts, top-1, one shared expert,
    # hidden 5120, expert intermediate 8192, 40 query / 8 KV heads of 128, bf16.
    "llama-4-scout": dict(num_moe_layers=48, num_experts=16, top_k=1, hidden_size=5120, moe_intermediate_size=8192,
                          bytes_per_param=2.0, num_shared_experts=1, shared_intermediate_size=8192,
                          dense_params_per_layer=5120 * 128 * (2 * 40 + 2 * 8) + 5120 * 16 + 3 * 5120 * 8192,
                          source="Llama-4-Scout-17B-16E published config (48 layers, 16 experts, top-1)"),
    # deepseek-ai/DeepSeek-V3: 61 layers, the first 3 dense, 256 routed experts + 1 shared, top-8, hidden
    # 7168, expert intermediate 2048, FP8 weights (1 byte per parameter). MLA attention's weights: about
    # 187M per layer (q_lora 1536, kv_lora 512, 128 heads).
    "deepseek-v3": dict(num_moe_layers=58, num_experts=256, top_k=8, hidden_size=7168, moe_intermediate_size=2048,
                        bytes_per_param=1.0, num_shared_experts=1, shared_intermediate_size=2048,
                        dense_params_per_layer=187_000_000 + 7168 * 256 + 3 * 7168 * 2048,
                        source="DeepSeek-V3 published config (61 layers, 3 dense, 256 experts, top-8, FP8)"),
}

MODEL_NAMES = tuple(_BUNDLED_CONFIGS) + tuple(_PUBLISHED)


def bundled_config(name: str) -> dict:
    """The bundled Hugging Face config.json of `name` (one of the keys of moeless.specs._BUNDLED_CONFIGS)."""
    if name not in _BUNDLED_CONFIGS:
        raise ValueError(f"model: no bundled config named {name!r}; bundled: {sorted(_BUNDLED_CONFIGS)}")
    text = resources.files("moeless").joinpath("data", "model_configs", _BUNDLED_CONFIGS[name]).read_text("utf-8")
    return json.loads(text)


def model_spec(name_or_path: str) -> ModelSpec:
    """A preset by name (MODEL_NAMES), or a path to a Hugging Face config.json (or a folder holding one)."""
    key = str(name_or_path).lower()
    if key in _BUNDLED_CONFIGS:
        spec = ModelSpec.from_hf_config(bundled_config(key), name=key)
        return spec.replace(source=f"bundled Hugging Face config.json ({_BUNDLED_CONFIGS[key]})")
    if key in _PUBLISHED:
        return ModelSpec(name=key, **_PUBLISHED[key])
    path = os.fspath(name_or_path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if os.path.isfile(path):
        return ModelSpec.from_hf_config(path, name=_path_name(path))
    raise ValueError(f"model: {name_or_path!r} is neither a preset ({', '.join(MODEL_NAMES)}) nor a config.json path")


def _path_name(path: str) -> str:
    """A model's name from its config's path: the folder of a `config.json` (the repository's, for a Hugging
    Face cache snapshot: models--org--name/snapshots/<hash>/config.json gives org/name), else the file's name
    without `.json` (and `.config`)."""
    path = os.path.abspath(path)
    base = os.path.basename(path)
    if base != "config.json":
        stem = base[:-5] if base.lower().endswith(".json") else base
        return stem[:-7] if stem.lower().endswith(".config") else stem
    folder = os.path.dirname(path)
    parent = os.path.dirname(folder)
    if os.path.basename(parent) == "snapshots" and os.path.basename(os.path.dirname(parent)).startswith("models--"):
        return os.path.basename(os.path.dirname(parent))[len("models--"):].replace("--", "/")
    return os.path.basename(folder)


def hardware_for_device(device_name: str) -> HardwareSpec:
    """The preset closest to a device: an NVIDIA name containing H200, H100 or A6000 gives that preset, any
    other CUDA device the H100's (stated in the source field), "cpu" the CPU core profile."""
    n = str(device_name).lower()
    for key in ("h200", "h100", "a6000"):
        if key in n:
            return HARDWARE[key]
    if n == "cpu":
        return HARDWARE["cpu"]
    return HARDWARE["h100"].replace(name=f"{device_name} (priced as an H100 SXM)")


def hardware_spec(name: str) -> HardwareSpec:
    """A hardware preset by name: a6000, h100, h200, cpu."""
    key = str(name).lower().replace("-", "").replace("_", "").replace("sxm", "").replace("rtx", "")
    if key not in HARDWARE:
        raise ValueError(f"hardware: unknown {name!r}; presets: {', '.join(HARDWARE)}")
    return HARDWARE[key]
