"""Hugging Face transformers glue: registers "moeless" in transformers' ExpertsInterface.

After `register()` (which `import moeless` calls), every experts class decorated with transformers'
`@use_experts_implementation` runs moeless's kernels when the model is built or switched with
`experts_implementation="moeless"`:

    AutoModelForCausalLM.from_pretrained(path, experts_implementation="moeless")
    AutoModelForCausalLM.from_config(config, experts_implementation="moeless")
    model.set_experts_implementation("moeless")

transformers validates the name against the keys of `ALL_EXPERTS_FUNCTIONS`, whose class-wide mapping
`ExpertsInterface.register` extends, so all three entry points accept it once registered.

One config, one model: transformers' `from_config(config, experts_implementation=...)` writes the choice into the
config object it is handed, and every experts module reads it from there at each call, so building a second
model ("eager", say) from the same config object used to switch the first one too, silently. `register()`
makes `from_config` build on a copy of the config whenever an implementation is requested (as `from_pretrained`
already does with a config object), so each model keeps its own. `model.set_experts_implementation` still
changes the model's config in place: two models built without `experts_implementation` from one config object
share it (give each its own config).

Two paths, chosen per call from the experts module's layout flags (set by `@use_experts_implementation`):

- fast path, `moeless_kernels.fused_moe.fused_moe`: gated experts (`has_gate`) whose gate is transformers'
  default `_apply_gate` with SiLU, gate/up concatenated ([gate; up], `is_concatenated=True`) or interleaved
  ([g0, u0, g1, u1, ...], `is_concatenated=False`: the flag is honoured, as sonicmoe does), weights
  [E, 2I, H] / [E, H, I] or transposed ([E, H, 2I] / [E, I, H], passed as a transposed view, no copy), no bias,
  no post-expert norm, and no autograd graph needed (the kernels have no backward).
- generic torch path, exact for every flag the interface defines: biases, a custom `_apply_gate` (e.g. GPT-OSS's
  clamped SwiGLU), `has_gate=False` (`up_proj` + `act_fn`), any `act_fn`, `has_post_expert_norm`, and a backward.

Per-feature decisions (`fast_path_blockers(module)` lists what keeps a module off the fast path):

| feature | backend auto / torch | backend triton |
|---|---|---|
| has_bias, custom `_apply_gate`, act_fn not SiLU, has_gate=False, has_post_expert_norm, autograd | generic path | NotImplementedError naming it |
| is_transposed, is_concatenated=False | fast path | fast path |
| expert-parallel sentinels (ids >= num_experts when `_is_expert_parallel`) | zero weight, id clamped | same |
| ids outside [0, num_experts) without expert parallelism | ValueError | ValueError |
| top_k_weights dense [T, E] (E != K) | gathered to [T, K] | same |

With K == E a [T, E] weight tensor cannot be told from [T, K]; it is read as [T, K], as transformers' own
implementations do. Sentinel pairs cost wasted work on the fast path (clamped to expert E-1 with zero weight),
because the kernels take a dense [T, K] routing.

The backend comes from the environment variable MOELESS_BACKEND (auto | triton | torch, default auto), read at
every call so a test or a server can switch it without rebuilding the model. "auto" runs Triton on CUDA tensors
and the kernels' torch reference elsewhere.

This module must never copy kernels or routing logic: kernels live in `moeless_kernels`, routing stays the
model's. It must never change a model's weights or routing, and never falls back silently where the user forced
a backend.
"""
from __future__ import annotations

import copy
import functools
import logging
import os

import torch
import torch.nn.functional as F
from transformers.activations import SiLUActivation
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface, _default_apply_gate

IMPLEMENTATION_NAME = "moeless"
BACKEND_ENV = "MOELESS_BACKEND"
BACKENDS = ("auto", "triton", "torch")

logger = logging.getLogger(__name__)
_warned: set[tuple[str, tuple[str, ...]]] = set()


def register() -> None:
    """Add "moeless" to transformers' ExpertsInterface (class-wide, so every model sees it), and give every model
    built by `from_config(..., experts_implementation=...)` its own config (module docstring). Idempotent."""
    ExpertsInterface.register(IMPLEMENTATION_NAME, moeless_experts_forward)
    _copy_config_in_from_config()


def _copy_config_in_from_config() -> None:
    from transformers import PreTrainedModel

    original = PreTrainedModel.__dict__["_from_config"].__func__
    if getattr(original, "_moeless_copies_config", False):
        return

    @functools.wraps(original)
    def _from_config(cls, config, **kwargs):
        if "experts_implementation" in kwargs:
            config = copy.deepcopy(config)  # the choice is written into the config: keep the caller's unchanged
        return original(cls, config, **kwargs)

    _from_config._moeless_copies_config = True
    PreTrainedModel._from_config = classmethod(_from_config)


def is_registered() -> bool:
    return IMPLEMENTATION_NAME in ALL_EXPERTS_FUNCTIONS


def selected_backend() -> str:
    """The backend named by MOELESS_BACKEND (default "auto"); ValueError on anything else."""
    backend = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV} must be one of {BACKENDS}, got {os.environ.get(BACKEND_ENV)!r}")
    return backend


def _is_silu(act_fn) -> bool:
    # exact types: a subclass may compute something else under the same name
    return type(act_fn) in (SiLUActivation, torch.nn.SiLU) or act_fn is F.silu


def _uses_default_gate(module: torch.nn.Module) -> bool:
    gate = getattr(module, "_apply_gate", None)
    return getattr(gate, "__func__", None) is _default_apply_gate


def fast_path_blockers(module: torch.nn.Module) -> tuple[str, ...]:
    """The layout features of an experts module that the fused kernels do not cover (empty: fast path)."""
    blockers = []
    if not module.has_gate:
        blockers.append("has_gate=False (up_proj + act_fn experts)")
    else:
        if not _uses_default_gate(module):
            blockers.append(f"custom _apply_gate of {type(module).__name__}")
        elif not _is_silu(getattr(module, "act_fn", None)):
            blockers.append(f"act_fn {type(getattr(module, 'act_fn', None)).__name__} (kernels fuse SiLU only)")
    if module.has_bias:
        blockers.append("has_bias=True")
    if module.has_post_expert_norm:
        blockers.append("has_post_expert_norm=True")
    return tuple(blockers)


def _routing_pairs(module, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    """Validate the routing and return (ids [T, K] int64 in [0, E], weights [T, K]); id E marks a sentinel."""
    num_experts = module.num_experts
    if top_k_index.dim() != 2:
        raise ValueError(f"top_k_index must be [T, K], got shape {tuple(top_k_index.shape)}")
    num_tokens, top_k = top_k_index.shape
    if top_k_weights.dim() != 2 or top_k_weights.shape[0] != num_tokens:
        raise ValueError(
            f"top_k_weights must be [T, K] or [T, E] with T={num_tokens}, got shape {tuple(top_k_weights.shape)}"
        )
    _check_ids_in_range(top_k_index, num_experts, module._is_expert_parallel)
    ids = top_k_index.long()
    if module._is_expert_parallel:
        sentinel = ids >= num_experts
        ids = ids.clamp(max=num_experts)
    else:
        sentinel = None
    if top_k_weights.shape[1] == top_k:
        weights = top_k_weights
    elif top_k_weights.shape[1] == num_experts:
        # dense router scores: the weight of pair (t, k) is scores[t, ids[t, k]]
        weights = top_k_weights.gather(1, ids.clamp(max=num_experts - 1))
    else:
        raise ValueError(
            f"top_k_weights must be [T, K={top_k}] or [T, E={num_experts}], got shape {tuple(top_k_weights.shape)}"
        )
    if sentinel is not None:
        weights = weights.masked_fill(sentinel, 0.0)
    return ids, weights


def _check_ids_in_range(ids: torch.Tensor, num_experts: int, expert_parallel: bool) -> None:
    # one host sync; the kernels would otherwise read out of bounds or fail far from the cause
    if ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or (high >= num_experts and not expert_parallel):
        raise ValueError(
            f"top_k_index must hold expert ids in [0, {num_experts}) (ids >= num_experts are sentinels only under "
            f"expert parallelism, module._is_expert_parallel), got values in [{low}, {high}]"
        )


def _generic_experts(module, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Exact torch path for every layout flag: pairs sorted by expert, one matmul pair per hit expert."""
    num_tokens, top_k = ids.shape
    num_experts = module.num_experts
    flat_ids = ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)  # sentinels (id E) sort to the tail
    counts = torch.bincount(flat_ids, minlength=num_experts + 1).tolist()
    # autocast can hand fp32 activations to bf16 experts: compute in the weights' dtype, as transformers does
    pair_hidden = hidden[order // top_k].to(module.down_proj.dtype)

    up_weight = module.gate_up_proj if module.has_gate else module.up_proj
    up_bias = (module.gate_up_proj_bias if module.has_gate else module.up_proj_bias) if module.has_bias else None
    down_bias = module.down_proj_bias if module.has_bias else None
    default_gate = module.has_gate and _uses_default_gate(module)

    def linear(x, weight, bias):
        y = x @ weight if module.is_transposed else F.linear(x, weight)
        return y if bias is None else y + bias

    pieces, start = [], 0
    for expert, count in enumerate(counts[:num_experts]):
        if count == 0:
            continue
        x = pair_hidden[start : start + count]
        start += count
        proj = linear(x, up_weight[expert], None if up_bias is None else up_bias[expert])
        if not module.has_gate:
            proj = module.act_fn(proj)
        elif default_gate and not module.is_concatenated:
            proj = module.act_fn(proj[..., 0::2]) * proj[..., 1::2]
        else:
            proj = module._apply_gate(proj)
        out = linear(proj, module.down_proj[expert], None if down_bias is None else down_bias[expert])
        if module.has_post_expert_norm:
            out = module.post_expert_norm(out)
        pieces.append(out)
    if counts[num_experts]:
        pieces.append(pair_hidden.new_zeros(counts[num_experts], hidden.shape[1]))
    pair_out = torch.cat(pieces) if pieces else pair_hidden.new_zeros(0, hidden.shape[1])
    weighted = pair_out.float() * weights.reshape(-1)[order].float().unsqueeze(-1)
    # back to flat t*K+k order, then a deterministic fp32 sum over K
    unsorted = torch.empty_like(weighted).index_copy(0, order, weighted)
    return unsorted.view(num_tokens, top_k, -1).sum(dim=1).to(hidden.dtype)


def _fused_experts(module, hidden, ids, weights, backend: str) -> torch.Tensor:
    from moeless_kernels.fused_moe import fused_moe  # lazy: Triton must see TRITON_INTERPRET before import

    gate_up, down = module.gate_up_proj, module.down_proj
    if module.is_transposed:
        # [E, H, 2I] / [E, I, H] -> [E, 2I, H] / [E, H, I] as views: the kernels read through strides
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    # sentinels (id E) run on a real expert with zero weight: the kernels take a dense [T, K] routing
    topk_ids = ids.clamp(max=module.num_experts - 1).to(torch.int32)
    result = fused_moe(
        hidden.to(gate_up.dtype),  # autocast may hand fp32 activations to bf16 experts
        gate_up,
        down,
        topk_ids=topk_ids,
        topk_weights=weights.float(),
        interleaved=not module.is_concatenated,
        backend=backend,
    )
    return result.out.to(hidden.dtype)


def _needs_autograd(module, hidden: torch.Tensor, weights: torch.Tensor) -> bool:
    if not torch.is_grad_enabled():
        return False
    return hidden.requires_grad or weights.requires_grad or any(p.requires_grad for p in module.parameters())


def moeless_experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """ExpertsInterface entry: hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K] or [T, E] -> [T, H].

    Honours the module's layout flags (see the module docstring); backend from MOELESS_BACKEND.
    """
    backend = selected_backend()
    if hidden_states.dim() != 2:
        raise ValueError(f"hidden_states must be [T, H], got shape {tuple(hidden_states.shape)}")
    ids, weights = _routing_pairs(self, top_k_index, top_k_weights)

    blockers = fast_path_blockers(self)
    if _needs_autograd(self, hidden_states, weights):
        blockers = blockers + ("autograd (the fused kernels have no backward; run under torch.no_grad())",)
    if not blockers:
        return _fused_experts(self, hidden_states, ids, weights, backend)
    if backend == "triton":
        raise NotImplementedError(
            f"{BACKEND_ENV}=triton: the moeless kernels do not support {', '.join(blockers)} "
            f"({type(self).__name__}); use {BACKEND_ENV}=auto or torch for the exact torch path"
        )
    key = (type(self).__name__, blockers)
    if hidden_states.device.type == "cuda" and key not in _warned:
        _warned.add(key)
        logger.warning("moeless: %s runs the generic torch path because of %s", key[0], ", ".join(blockers))
    return _generic_experts(self, hidden_states, ids, weights)


# Importing this module first (before transformers) loads transformers from here, while the module is half
# built; moeless's import hook then leaves the registration to this line.
register()
