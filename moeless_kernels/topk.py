"""fused_topk: router logits -> (topk_weights, topk_ids, per-expert load counts) in one pass.

Routing semantics (all math in fp32 whatever the logits' dtype):
- scoring "softmax" (Mixtral, Qwen2-MoE, OLMoE) or "sigmoid" (DeepSeek-V3);
- selection uses scores + e_score_correction_bias; the bias never reaches the weights;
- group-limited routing (DeepSeek-V3 `n_group`/`topk_group`): a group's score is the sum of its top-2 selection
  scores (top-1 if a group holds a single expert), the `topk_group` best groups are kept, and the top-k experts
  are chosen among the kept groups only;
- weights = unbiased scores of the chosen experts, divided by (their sum + 1e-20) if `renormalize`, then times
  `routed_scaling_factor`;
- topk_ids of a token are in descending selection score; ties (experts and groups) break toward the lower id.
  Hugging Face's routers leave tie order to torch.topk, so only untied inputs can be compared with them.

This module validates and picks the backend; it must never change routing (which experts a token picks)
between backends, and it holds no load-balancing policy.
"""
from __future__ import annotations

import torch

from moeless_kernels._backend import resolve_backend
from moeless_kernels.checks import (
    FLOAT_DTYPES,
    check_choice,
    check_finite,
    check_float,
    check_int,
    check_tensor,
    value_checks_enabled,
)
from moeless_kernels.launch_configs import cdiv, topk_tile

SCORINGS = ("softmax", "sigmoid")


def _validate(router_logits, top_k, scoring, renormalize, num_expert_group, topk_group, e_score_correction_bias,
              routed_scaling_factor):
    check_tensor("router_logits", router_logits, ndim=2, dtypes=FLOAT_DTYPES)
    num_experts = router_logits.shape[1]
    if num_experts < 1:
        raise ValueError(f"router_logits must have at least one expert column, got shape {tuple(router_logits.shape)}")
    check_int("top_k", top_k, lo=1, hi=num_experts)
    check_choice("scoring", scoring, SCORINGS)
    if not isinstance(renormalize, bool):
        raise ValueError(f"renormalize must be a bool, got {renormalize!r}")
    check_float("routed_scaling_factor", routed_scaling_factor)
    if (num_expert_group is None) != (topk_group is None):
        raise ValueError(
            f"num_expert_group and topk_group must be given together, got num_expert_group={num_expert_group!r}, "
            f"topk_group={topk_group!r}"
        )
    if num_expert_group is not None:
        check_int("num_expert_group", num_expert_group, lo=1, hi=num_experts)
        if num_experts % num_expert_group:
            raise ValueError(
                f"num_expert_group must divide the number of experts {num_experts}, got {num_expert_group}"
            )
        check_int("topk_group", topk_group, lo=1, hi=num_expert_group)
        reachable = topk_group * (num_experts // num_expert_group)
        if top_k > reachable:
            raise ValueError(
                f"top_k={top_k} exceeds the experts reachable in topk_group={topk_group} groups of "
                f"{num_experts // num_expert_group} ({reachable})"
            )
    if e_score_correction_bias is not None:
        check_tensor("e_score_correction_bias", e_score_correction_bias, shape=(num_experts,), dtypes=FLOAT_DTYPES,
                     device=router_logits.device)
    # value checks (host syncs on CUDA) only where enabled; the kernel keeps ids in range whatever the values
    if value_checks_enabled(router_logits.device):
        if e_score_correction_bias is not None:
            check_finite("e_score_correction_bias", e_score_correction_bias)
        check_finite("router_logits", router_logits)


def _fused_topk_torch(logits, top_k, scoring, renormalize, num_expert_group, topk_group, bias, scale):
    num_tokens, num_experts = logits.shape
    x = logits.float()
    scores = torch.softmax(x, dim=-1) if scoring == "softmax" else torch.sigmoid(x)
    sel = scores if bias is None else scores + bias.float()
    if num_expert_group is not None:
        group_size = num_experts // num_expert_group
        grouped = sel.view(num_tokens, num_expert_group, group_size)
        top2 = torch.sort(grouped, dim=-1, descending=True, stable=True).values[..., : min(2, group_size)]
        group_scores = top2.sum(dim=-1)
        # stable descending sort: among equal group scores the lower group id comes first
        kept = torch.sort(group_scores, dim=-1, descending=True, stable=True).indices[:, :topk_group]
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
        sel = sel.masked_fill(~group_mask.repeat_interleave(group_size, dim=1), float("-inf"))
    topk_ids = torch.sort(sel, dim=-1, descending=True, stable=True).indices[:, :top_k]
    topk_weights = scores.gather(1, topk_ids)
    if renormalize:
        topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    topk_weights = topk_weights * scale
    counts = torch.bincount(topk_ids.flatten(), minlength=num_experts).to(torch.int32)
    return topk_weights.contiguous(), topk_ids.to(torch.int32).contiguous(), counts


def _fused_topk_triton(logits, top_k, scoring, renormalize, num_expert_group, topk_group, bias, scale):
    # imported here: triton.jit reads TRITON_INTERPRET when the kernel module is first imported
    from moeless_kernels.jit.topk_kernels import fused_topk_kernel

    num_tokens, num_experts = logits.shape
    device = logits.device
    weights = torch.empty((num_tokens, top_k), dtype=torch.float32, device=device)
    ids = torch.empty((num_tokens, top_k), dtype=torch.int32, device=device)
    counts = torch.zeros((num_experts,), dtype=torch.int32, device=device)
    if num_tokens == 0:
        return weights, ids, counts
    # about 4K fp32 per tile: enough tokens per program to amortise the K rounds, few enough to stay in registers
    tile = topk_tile(num_experts, top_k, num_expert_group)
    use_groups = num_expert_group is not None
    bias_arg = bias.float().contiguous() if bias is not None else counts  # dummy pointer when HAS_BIAS=False
    grid = (cdiv(num_tokens, tile["BLOCK_T"]),)
    fused_topk_kernel[grid](
        logits, bias_arg, weights, ids, counts,
        num_tokens, num_experts, top_k,
        logits.stride(0), logits.stride(1),
        num_experts // num_expert_group if use_groups else 1,
        num_expert_group if use_groups else 1,
        topk_group if use_groups else 1,
        float(scale),
        SCORING_SIGMOID=scoring == "sigmoid",
        RENORMALIZE=renormalize,
        HAS_BIAS=bias is not None,
        USE_GROUPS=use_groups,
        GROUP_TOP2=use_groups and num_experts // num_expert_group >= 2,
        **tile,
        num_warps=4,
    )
    return weights, ids, counts


def fused_topk(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    scoring: str = "softmax",
    renormalize: bool = False,
    num_expert_group: int | None = None,
    topk_group: int | None = None,
    e_score_correction_bias: torch.Tensor | None = None,
    routed_scaling_factor: float = 1.0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Route T tokens over E experts: (topk_weights fp32 [T, K], topk_ids int32 [T, K], expert_counts int32 [E]).

    Mixtral / Qwen2-MoE(norm_topk_prob): scoring="softmax", renormalize=True. OLMoE: softmax, renormalize=False.
    DeepSeek-V3: scoring="sigmoid", renormalize=norm_topk_prob, num_expert_group=n_group, topk_group,
    e_score_correction_bias, routed_scaling_factor. See the module docstring for the exact semantics.
    """
    _validate(router_logits, top_k, scoring, renormalize, num_expert_group, topk_group, e_score_correction_bias,
              routed_scaling_factor)
    args = (router_logits, top_k, scoring, renormalize, num_expert_group, topk_group, e_score_correction_bias,
            routed_scaling_factor)
    if resolve_backend(backend, router_logits.device) == "triton":
        return _fused_topk_triton(*args)
    return _fused_topk_torch(*args)


def fused_topk_reference(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    scoring: str = "softmax",
    renormalize: bool = False,
    num_expert_group: int | None = None,
    topk_group: int | None = None,
    e_score_correction_bias: torch.Tensor | None = None,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure-torch fused_topk (same contract, same validation)."""
    return fused_topk(router_logits, top_k, scoring=scoring, renormalize=renormalize,
                      num_expert_group=num_expert_group, topk_group=topk_group,
                      e_score_correction_bias=e_score_correction_bias,
                      routed_scaling_factor=routed_scaling_factor, backend="torch")
