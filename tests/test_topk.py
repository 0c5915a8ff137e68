"""fused_topk against Hugging Face's routers, a float64 brute force, and its own second backend.

The Triton path runs under the interpreter on CPU, so its shapes are tiny; the torch reference takes the
larger ones. Random logits are continuous, so ties between experts have probability ~0; ties are tested on
purpose with constant logits (lower expert / group id wins).
"""
import math

import pytest
import torch

from moeless_kernels.topk import fused_topk as _fused_topk
from moeless_kernels.topk import fused_topk_reference
from triton_device import on_triton_device


def fused_topk(*args, **kwargs):
    """fused_topk with Triton's inputs on the Triton device (CUDA on a GPU machine), results on the CPU."""
    return on_triton_device(_fused_topk, *args, **kwargs)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (T, E, K, routing options): edge shapes commented
CASES = [
    (1, 8, 2, dict()),  # T = 1, OLMoE-like softmax without renormalisation
    (5, 7, 2, dict(renormalize=True)),  # prime E, T < BLOCK_T, Mixtral-like
    (19, 13, 1, dict(renormalize=True)),  # prime E, K = 1
    (6, 5, 5, dict(renormalize=True)),  # K = E
    (9, 6, 6, dict(scoring="sigmoid")),  # K = E, sigmoid
    (11, 16, 4, dict(scoring="sigmoid", renormalize=True, num_expert_group=4, topk_group=2,
                     bias=True, routed_scaling_factor=2.5)),  # DeepSeek-V3-like
    (7, 12, 3, dict(scoring="sigmoid", num_expert_group=3, topk_group=1, bias=True)),  # K = all of one group
    (4, 6, 2, dict(scoring="softmax", num_expert_group=6, topk_group=3)),  # groups of one expert
    (70, 8, 2, dict(renormalize=True)),  # more tokens than one program's block (BLOCK_T = 64 at E = 8)
]


def _options(opts, num_experts, gen):
    opts = dict(opts)
    if opts.pop("bias", False):
        opts["e_score_correction_bias"] = torch.randn(num_experts, generator=gen) * 0.3
    return opts


def _brute_force(logits, top_k, scoring="softmax", renormalize=False, num_expert_group=None, topk_group=None,
                 e_score_correction_bias=None, routed_scaling_factor=1.0):
    """Token by token in float64 with Python sorting: the routing rules written out one more time."""
    x = logits.double()
    num_tokens, num_experts = x.shape
    bias = [0.0] * num_experts if e_score_correction_bias is None else e_score_correction_bias.double().tolist()
    weights, ids = [], []
    for t in range(num_tokens):
        row = x[t].tolist()
        if scoring == "softmax":
            m = max(row)
            z = sum(math.exp(v - m) for v in row)
            score = [math.exp(v - m) / z for v in row]
        else:
            score = [1.0 / (1.0 + math.exp(-v)) for v in row]
        sel = [s + b for s, b in zip(score, bias)]
        allowed = set(range(num_experts))
        if num_expert_group is not None:
            size = num_experts // num_expert_group
            group_scores = []
            for g in range(num_expert_group):
                members = sorted(sel[g * size:(g + 1) * size], reverse=True)
                group_scores.append((-sum(members[:2]), g))
            kept = [g for _, g in sorted(group_scores)[:topk_group]]
            allowed = {e for e in range(num_experts) if e // size in kept}
        chosen = [e for _, e in sorted((-sel[e], e) for e in allowed)[:top_k]]
        w = [score[e] for e in chosen]
        if renormalize:
            w = [v / (sum(w) + 1e-20) for v in w]
        weights.append([v * routed_scaling_factor for v in w])
        ids.append(chosen)
    return (torch.tensor(weights, dtype=torch.float64).reshape(num_tokens, top_k),
            torch.tensor(ids, dtype=torch.int64).reshape(num_tokens, top_k))


def _check_counts(ids, counts, num_experts):
    assert counts.dtype == torch.int32 and counts.shape == (num_experts,)
    assert torch.equal(counts.long(), torch.bincount(ids.long().flatten(), minlength=num_experts))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}-E{c[1]}-K{c[2]}")
def test_against_float64_brute_force(case, backend):
    num_tokens, num_experts, top_k, opts = case
    gen = torch.Generator().manual_seed(num_tokens * 100 + num_experts)
    logits = torch.randn(num_tokens, num_experts, generator=gen) * 2
    opts = _options(opts, num_experts, gen)
    weights, ids, counts = fused_topk(logits, top_k, backend=backend, **opts)
    want_w, want_ids = _brute_force(logits, top_k, **opts)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert torch.equal(ids.long(), want_ids)
    torch.testing.assert_close(weights.double(), want_w, rtol=1e-5, atol=1e-6)
    _check_counts(ids, counts, num_experts)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES[:3] + CASES[5:6], ids=lambda c: f"T{c[0]}-E{c[1]}-K{c[2]}")
def test_triton_matches_reference(case, dtype):
    """Same logits in any dtype: same experts, weights to fp32 rounding (both upcast exactly, then fp32 math)."""
    num_tokens, num_experts, top_k, opts = case
    gen = torch.Generator().manual_seed(7)
    logits = (torch.randn(num_tokens, num_experts, generator=gen) * 2).to(dtype)
    opts = _options(opts, num_experts, gen)
    got = fused_topk(logits, top_k, backend="triton", **opts)
    want = fused_topk_reference(logits, top_k, **opts)
    torch.testing.assert_close(got[0], want[0], rtol=2e-6, atol=1e-7)
    assert torch.equal(got[1], want[1])
    assert torch.equal(got[2], want[2])


def test_reference_large_against_brute_force():
    # a bigger batch for the torch path only (the interpreter would be slow here)
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(300, 64, generator=gen)
    opts = dict(scoring="sigmoid", renormalize=True, num_expert_group=8, topk_group=4,
                e_score_correction_bias=torch.rand(64, generator=gen) * 0.1, routed_scaling_factor=2.5)
    weights, ids, counts = fused_topk_reference(logits, 8, **opts)
    want_w, want_ids = _brute_force(logits, 8, **opts)
    assert torch.equal(ids.long(), want_ids)
    torch.testing.assert_close(weights.double(), want_w, rtol=1e-5, atol=1e-6)
    _check_counts(ids, counts, 64)


def test_noncontiguous_logits():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(9, 6, generator=gen).t()  # (6, 9) view with strides (1, 6)
    got = fused_topk(logits, 3, renormalize=True, backend="triton")
    want = fused_topk_reference(logits.contiguous(), 3, renormalize=True)
    torch.testing.assert_close(got[0], want[0], rtol=2e-6, atol=1e-7)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


# ------------------------------------------------------------------------------------ Hugging Face routers


def _hf_router(name):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if name == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
        cfg = transformers.MixtralConfig(num_local_experts=7, num_experts_per_tok=2, hidden_size=16)
        return MixtralTopKRouter(cfg), dict(top_k=2, renormalize=True)
    if name in ("qwen2_moe", "qwen2_moe_unnormalised"):
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter
        norm = name == "qwen2_moe"
        cfg = transformers.Qwen2MoeConfig(num_experts=13, num_experts_per_tok=3, hidden_size=16, norm_topk_prob=norm)
        return Qwen2MoeTopKRouter(cfg), dict(top_k=3, renormalize=norm)
    if name == "olmoe":
        from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter
        cfg = transformers.OlmoeConfig(num_experts=8, num_experts_per_tok=2, hidden_size=16, norm_topk_prob=False)
        return OlmoeTopKRouter(cfg), dict(top_k=2, renormalize=False)
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
    cfg = transformers.DeepseekV3Config(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                                        hidden_size=16, norm_topk_prob=True, routed_scaling_factor=2.5)
    router = DeepseekV3TopkRouter(cfg)
    router.e_score_correction_bias.copy_(torch.randn(16) * 0.1)
    return router, dict(top_k=4, scoring="sigmoid", renormalize=True, num_expert_group=4, topk_group=2,
                        e_score_correction_bias=router.e_score_correction_bias, routed_scaling_factor=2.5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen2_moe_unnormalised", "olmoe", "deepseek_v3"])
def test_matches_hugging_face_router(name, backend):
    router, opts = _hf_router(name)
    with torch.no_grad():
        torch.nn.init.normal_(router.weight, std=0.5)
        hidden = torch.randn(12, router.weight.shape[1])
        router_logits, hf_weights, hf_ids = router(hidden)
    top_k = opts.pop("top_k")
    weights, ids, _ = fused_topk(router_logits, top_k, backend=backend, **opts)
    # DeepSeek's router returns its top-k unsorted: compare per token as sets, ordered by expert id
    hf_ids, order = torch.sort(hf_ids.long(), dim=-1)
    hf_weights = hf_weights.float().gather(1, order)
    ids, order = torch.sort(ids.long(), dim=-1)
    weights = weights.gather(1, order)
    assert torch.equal(ids, hf_ids)
    torch.testing.assert_close(weights, hf_weights, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------ edges and ties


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zero_tokens(backend):
    weights, ids, counts = fused_topk(torch.empty(0, 7), 3, backend=backend)
    assert weights.shape == (0, 3) and ids.shape == (0, 3)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert torch.equal(counts, torch.zeros(7, dtype=torch.int32))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_all_tokens_to_one_expert_and_idle_experts(backend):
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(10, 13, generator=gen)
    logits[:, 11] += 50.0  # every token's first choice: expert 11
    weights, ids, counts = fused_topk(logits, 1, renormalize=True, backend=backend)
    assert torch.equal(ids, torch.full((10, 1), 11, dtype=torch.int32))
    torch.testing.assert_close(weights, torch.ones(10, 1))  # renormalised single weight
    want = torch.zeros(13, dtype=torch.int32)
    want[11] = 10
    assert torch.equal(counts, want)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ties_break_toward_lower_expert_id(backend):
    logits = torch.zeros(3, 7)
    logits[1, 4] = 1.0  # token 1: expert 4 first, then the tied rest in id order
    _, ids, _ = fused_topk(logits, 3, backend=backend)
    assert ids.tolist() == [[0, 1, 2], [4, 0, 1], [0, 1, 2]]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_group_ties_break_toward_lower_group_id(backend):
    logits = torch.zeros(2, 8)
    logits[1, 6] = 1.0  # token 1: group 3 (experts 6, 7) scores highest; groups 0..2 tie
    _, ids, _ = fused_topk(logits, 3, scoring="sigmoid", num_expert_group=4, topk_group=2, backend=backend)
    assert ids.tolist() == [[0, 1, 2], [6, 0, 1]]


# ------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(router_logits=torch.tensor([[0.0, float("nan")]]), top_k=1), "router_logits"),
        (dict(router_logits=torch.tensor([[0.0, float("inf")]]), top_k=1), "router_logits"),
        (dict(router_logits=torch.zeros(2, 3, dtype=torch.int32), top_k=1), "router_logits"),
        (dict(router_logits=torch.zeros(2, 3, 1), top_k=1), "router_logits"),
        (dict(router_logits=torch.zeros(2, 3), top_k=0), "top_k"),
        (dict(router_logits=torch.zeros(2, 3), top_k=4), "top_k"),
        (dict(router_logits=torch.zeros(2, 3), top_k=1, scoring="relu"), "scoring"),
        (dict(router_logits=torch.zeros(2, 6), top_k=1, num_expert_group=4, topk_group=1), "num_expert_group"),
        (dict(router_logits=torch.zeros(2, 6), top_k=1, num_expert_group=3, topk_group=4), "topk_group"),
        (dict(router_logits=torch.zeros(2, 6), top_k=1, num_expert_group=3), "topk_group"),
        (dict(router_logits=torch.zeros(2, 6), top_k=3, num_expert_group=3, topk_group=1), "top_k"),
        (dict(router_logits=torch.zeros(2, 6), top_k=1, e_score_correction_bias=torch.zeros(5)),
         "e_score_correction_bias"),
        (dict(router_logits=torch.zeros(2, 6), top_k=1, e_score_correction_bias=torch.full((6,), float("nan"))),
         "e_score_correction_bias"),
        (dict(router_logits=torch.zeros(2, 6), top_k=1, routed_scaling_factor=float("inf")),
         "routed_scaling_factor"),
        (dict(router_logits=torch.zeros(2, 6), top_k=1, backend="cuda"), "backend"),
    ],
)
def test_bad_input_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fused_topk(**kwargs)
