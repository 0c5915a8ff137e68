"""Model discovery: load a Hugging Face MoE causal LM and find the MoE blocks whose experts are served.

A served MoE block is a module with a router (`gate` or `router`) and routed `experts` in the transformers 5
layout (3-D `gate_up_proj` / `down_proj`): Mixtral's `block_sparse_moe`, the `mlp` of Qwen, OLMoE, DeepSeek
and PhiMoE; shared experts stay in the block and run data-parallel. This module never changes a model's weights
or routing; it only reads them and says clearly (ValueError naming `model`) what it cannot serve.
"""
from __future__ import annotations

from pathlib import Path

import torch

from moeless.serve.experts import ExpertParallelExperts

__all__ = ["cache_of", "check_model_path", "check_supported", "find_moe_blocks", "load_model"]


def find_moe_blocks(model) -> list[tuple[str, torch.nn.Module]]:
    """(name, block) of every MoE block of a Hugging Face model, in layer order."""
    found = []
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        if experts is None or not (hasattr(module, "gate") or hasattr(module, "router")):
            continue
        if isinstance(experts, ExpertParallelExperts):
            found.append((name, module))
            continue
        gu, dn = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
        if isinstance(gu, torch.Tensor) and isinstance(dn, torch.Tensor) and gu.ndim == 3 and dn.ndim == 3:
            found.append((name, module))
    return found


def _experts_blockers(experts) -> tuple[str, ...]:
    from moeless.hf import fast_path_blockers

    if not hasattr(experts, "has_gate"):  # not decorated by transformers' @use_experts_implementation
        return (f"{type(experts).__name__} is not a transformers 5 experts module",)
    return fast_path_blockers(experts)


# the weight files transformers' from_pretrained reads from a local folder
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "pytorch_model*.bin.index.json")


def check_model_path(path: str | Path):
    """The transformers config of the model folder `path`; ValueError naming `model` for a missing path or a
    folder that is not a Hugging Face model (no config.json, one transformers cannot read, or no weight files).
    Cheap: reads the config only, so callers can check before starting any process."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"model: no such path {str(path)!r}")
    if not (p / "config.json").is_file():
        raise ValueError(f"model: {str(path)!r} has no config.json (not a Hugging Face model folder)")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(p)
    except (ValueError, KeyError, OSError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"model: {str(path)!r} is not a Hugging Face model transformers can read: {first}") from err
    if p.is_dir() and not any(next(p.glob(pattern), None) for pattern in WEIGHT_FILES):
        raise ValueError(f"model: {str(path)!r} has a config.json but no weights ({', '.join(WEIGHT_FILES)})")
    return config


def load_model(path: str | Path | None = None, *, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A Hugging Face MoE causal LM from a local folder, or the embedded tiny model (path None).

    The tiny model's shipped weights are used when present (moeless/data/tiny_moe), else a seeded random one.
    ValueError (naming `model`) for a missing path, a folder that is not a model, or an architecture whose
    experts the serving loop cannot run (no MoE block, biases, a non-SwiGLU activation)."""
    from moeless import tiny_moe

    if path is None:
        if (tiny_moe.MODEL_DIR / "config.json").exists():
            model = tiny_moe.load(dtype=dtype)
        else:
            from transformers import MixtralForCausalLM

            torch.manual_seed(seed)
            model = MixtralForCausalLM(tiny_moe.build_config()).to(dtype).eval()
    else:
        check_model_path(path)
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(Path(path), dtype=dtype).eval()
        except (ValueError, KeyError, OSError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"model: cannot load {str(path)!r} with transformers: {first}") from err
    check_supported(model)
    return model


def check_supported(model) -> None:
    """ValueError naming `model` unless every MoE block's experts can be served expert-parallel."""
    blocks = find_moe_blocks(model)
    arch = type(model).__name__
    if not blocks:
        raise ValueError(f"model: unsupported architecture {arch}: no MoE block (a module with a gate/router and "
                         f"experts holding 3-D gate_up_proj / down_proj)")
    for name, block in blocks:
        if isinstance(block.experts, ExpertParallelExperts):
            continue
        blockers = _experts_blockers(block.experts)
        if blockers:
            raise ValueError(f"model: unsupported architecture {arch}: {name}.experts has {', '.join(blockers)}")


def cache_of(out):
    """The KV cache of a model output, under transformers' new name (cache) or its old one."""
    for key in ("cache", "past_key_values"):
        if key in out.keys():
            return out[key]
    return None
