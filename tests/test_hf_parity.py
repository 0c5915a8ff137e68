"""Parity of experts_implementation="moeless" with Hugging Face transformers' own experts ("eager").

Independent reference: each model's eager experts loop (the class's undecorated forward) and its logits. Models are
built offline from tiny configs with random weights (2 layers, hidden 32, 4-8 experts). Both moeless paths run:
MOELESS_BACKEND=torch (the kernels' torch reference) and MOELESS_BACKEND=triton (the kernels, under the Triton
interpreter on CPU). fp32 is compared tightly; bf16 by flash-attention's rule: moeless's error against an fp32
reference is at most twice eager bf16's own error (plus a small floor).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    GptOssConfig,
    MixtralConfig,
    OlmoeConfig,
    PretrainedConfig,
    Qwen2MoeConfig,
)
from transformers.activations import ACT2FN
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface, use_experts_implementation

import moeless  # noqa: F401  (registers "moeless")
from moeless import hf

VOCAB = 96
# the Triton backend needs CUDA tensors where CUDA exists (the interpreter runs only when there is none)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
    max_position_embeddings=64, initializer_range=0.1, bos_token_id=0, eos_token_id=1, pad_token_id=None,
)


def _config(name: str):
    if name == "mixtral":
        return MixtralConfig(**COMMON, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)
    if name == "qwen2_moe":  # with its sigmoid-gated shared expert; top-k weights not renormalised
        return Qwen2MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=24,
                              shared_expert_intermediate_size=40, num_experts=6, num_experts_per_tok=2,
                              decoder_sparse_step=1, norm_topk_prob=False)
    if name == "olmoe":
        return OlmoeConfig(**COMMON, intermediate_size=24, num_experts=8, num_experts_per_tok=2)
    if name == "deepseek_v3":  # group-limited routing: 4 groups of 2 experts, 2 groups kept, K = 3
        return DeepseekV3Config(**COMMON, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                                n_group=4, topk_group=2, num_experts_per_tok=3, n_shared_experts=1,
                                first_k_dense_replace=0, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
                                qk_nope_head_dim=8, v_head_dim=8, routed_scaling_factor=2.5, norm_topk_prob=True,
                                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if name == "gpt_oss":  # transposed, biased, interleaved gate/up with a clamped custom gate
        return GptOssConfig(**COMMON, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                            layer_types=["full_attention", "full_attention"])
    raise KeyError(name)


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(name), experts_implementation="eager").eval()
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                # random, non-zero, on the scale of the sigmoid scores so that it changes the selection
                module.e_score_correction_bias.copy_(torch.randn(module.e_score_correction_bias.shape) * 0.3)
            for attr in ("gate_up_proj_bias", "down_proj_bias"):
                if isinstance(getattr(module, attr, None), nn.Parameter):
                    getattr(module, attr).normal_(0.0, 0.1)  # GPT-OSS initialises biases to zero
    return model.to(DEVICE)


_MODELS: dict[str, nn.Module] = {}


def _model(name: str, dtype: torch.dtype) -> nn.Module:
    if name not in _MODELS:
        _MODELS[name] = _build(name)
    model = _MODELS[name]
    return model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)


def _input_ids():
    return torch.randint(2, VOCAB, (2, 4), generator=torch.Generator().manual_seed(1)).to(DEVICE)


def _experts_modules(model):
    return [m for m in model.modules() if hasattr(m, "is_concatenated") and hasattr(m, "has_gate")]


def _run(model, implementation: str):
    """Logits and, per experts module, (module, (hidden, ids, weights), output) of one forward."""
    model.set_experts_implementation(implementation)
    calls = []

    def hook(module, args, kwargs, output):
        inputs = tuple(args) + tuple(kwargs.values())
        calls.append((module, tuple(t.detach().clone() for t in inputs), output.detach().clone()))

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in _experts_modules(model)]
    try:
        with torch.no_grad():
            logits = model(_input_ids()).logits
    finally:
        for h in handles:
            h.remove()
        model.set_experts_implementation("eager")
    return logits, calls


def _eager(module, *inputs):
    """The class's own experts loop, bypassing the ExpertsInterface dispatch."""
    return type(module).forward.__wrapped__(module, *inputs)


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts calls into moeless_kernels.fused_moe.fused_moe and records the backend each asked for."""
    import importlib

    # the module, not the function of the same name that moeless_kernels re-exports
    fused_moe_module = importlib.import_module("moeless_kernels.fused_moe")

    calls = []
    real = fused_moe_module.fused_moe

    def counting(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return real(*args, **kwargs)

    monkeypatch.setattr(fused_moe_module, "fused_moe", counting)
    return calls


# --- registration and the three entry points ---------------------------------------------------------------


def test_registered_under_its_name():
    hf.register()  # idempotent
    assert hf.is_registered()
    assert ALL_EXPERTS_FUNCTIONS["moeless"] is hf.moeless_experts_forward


def test_entry_points_accept_moeless(tmp_path, monkeypatch):
    seen = []

    def spy(self, hidden, ids, weights):
        seen.append(type(self).__name__)
        return hf.moeless_experts_forward(self, hidden, ids, weights)

    # the interface looks the function up at every call, so a spy in the mapping sees every dispatch
    monkeypatch.setitem(ExpertsInterface._global_mapping, "moeless", spy)
    monkeypatch.setenv("MOELESS_BACKEND", "torch")
    config = _config("mixtral")
    torch.manual_seed(0)
    built = AutoModelForCausalLM.from_config(config, experts_implementation="moeless").eval()
    assert built.config._experts_implementation == "moeless"
    built.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="moeless").eval()
    assert loaded.config._experts_implementation == "moeless"
    switched = AutoModelForCausalLM.from_config(config, experts_implementation="eager").eval()
    switched.load_state_dict(built.state_dict())
    switched.set_experts_implementation("moeless")
    assert switched.config._experts_implementation == "moeless"

    with torch.no_grad():
        outs = [m(_input_ids()).logits for m in (built, loaded, switched)]
    assert seen == ["MixtralExperts"] * 6  # 2 layers x 3 models
    torch.testing.assert_close(outs[1], outs[0])
    torch.testing.assert_close(outs[2], outs[0])
    with pytest.raises(ValueError, match="not supported"):
        switched.set_experts_implementation("moeless_typo")


# --- model parity: per experts module and final logits -------------------------------------------------------

PARITY_MODELS = ["mixtral", "qwen2_moe", "olmoe", "deepseek_v3"]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", PARITY_MODELS)
def test_model_parity_with_eager(name, dtype, backend, monkeypatch, fused_calls):
    monkeypatch.setenv("MOELESS_BACKEND", backend)
    model = _model(name, dtype)
    eager_logits, _ = _run(model, "eager")
    moeless_logits, moeless_calls = _run(model, "moeless")
    assert len(moeless_calls) == 2
    assert fused_calls == [backend] * 2  # the fast path ran, on the backend asked for
    reference = _model(name, torch.float32)  # bf16: errors are measured against this fp32 copy
    ref_modules = dict(zip(map(id, _experts_modules(model)), _experts_modules(reference)))
    # each experts module against the eager loop on the very inputs moeless saw
    for module, inputs, out in moeless_calls:
        with torch.no_grad():
            eager_out = _eager(module, *inputs)
        assert out.dtype == eager_out.dtype == dtype and out.shape == eager_out.shape
        if dtype == torch.float32:
            torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-6)
            continue
        with torch.no_grad():
            ref = _eager(ref_modules[id(module)], inputs[0].float(), inputs[1], inputs[2].float())
        scale = ref.abs().max().item()
        assert _max_err(out, ref) <= 2 * _max_err(eager_out, ref) + 1e-3 * scale
    if dtype == torch.float32:
        torch.testing.assert_close(moeless_logits, eager_logits, rtol=1e-4, atol=1e-5)
    else:
        ref_logits, _ = _run(reference, "eager")
        scale = ref_logits.abs().max().item()
        assert _max_err(moeless_logits, ref_logits) <= 2 * _max_err(eager_logits, ref_logits) + 2e-3 * scale


# --- DeepSeek-V3 router reproduced by fused_topk -------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_topk_reproduces_deepseek_v3_router(backend):
    from moeless_kernels.topk import fused_topk

    model = _model("deepseek_v3", torch.float32)
    routers = [m for m in model.modules() if type(m).__name__ == "DeepseekV3TopkRouter"]
    captured = []
    handles = [r.register_forward_hook(lambda m, a, out: captured.append((m, out))) for r in routers]
    try:
        with torch.no_grad():
            model(_input_ids())
    finally:
        for h in handles:
            h.remove()
    assert len(captured) == 2
    for router, (logits, hf_weights, hf_ids) in captured:
        kwargs = dict(scoring="sigmoid", renormalize=router.norm_topk_prob, num_expert_group=router.num_group,
                      topk_group=router.topk_group, routed_scaling_factor=router.routed_scaling_factor)
        weights, ids, counts = fused_topk(logits, router.top_k, e_score_correction_bias=router.e_score_correction_bias,
                                          backend=backend, **kwargs)
        # HF leaves the order within a token to torch.topk(sorted=False): compare per token, sorted by expert id
        hf_sorted, hf_perm = hf_ids.sort(dim=-1)
        our_sorted, our_perm = ids.long().sort(dim=-1)
        assert torch.equal(our_sorted, hf_sorted)
        torch.testing.assert_close(weights.gather(1, our_perm), hf_weights.gather(1, hf_perm).float(),
                                   rtol=1e-5, atol=1e-6)
        assert torch.equal(counts.long(), torch.bincount(hf_ids.flatten(), minlength=router.num_experts))
        # the test must be able to fail: the bias and the group limit each change some token's experts
        no_bias = fused_topk(logits, router.top_k, backend="torch", **kwargs)[1].long().sort(dim=-1).values
        no_groups = fused_topk(logits, router.top_k, e_score_correction_bias=router.e_score_correction_bias,
                               backend="torch", **{**kwargs, "num_expert_group": None, "topk_group": None}
                               )[1].long().sort(dim=-1).values
        assert not torch.equal(no_bias, hf_sorted)
        assert not torch.equal(no_groups, hf_sorted)


# --- non-default layouts --------------------------------------------------------------------------------------


def test_gpt_oss_transposed_biased_custom_gate_matches_eager_on_torch(monkeypatch, fused_calls):
    monkeypatch.setenv("MOELESS_BACKEND", "torch")
    model = _model("gpt_oss", torch.float32)
    assert set(hf.fast_path_blockers(_experts_modules(model)[0])) == {
        "custom _apply_gate of GptOssExperts", "has_bias=True"}
    eager_logits, eager_calls = _run(model, "eager")
    moeless_logits, _ = _run(model, "moeless")
    for module, inputs, eager_out in eager_calls:
        torch.testing.assert_close(hf.moeless_experts_forward(module, *inputs), eager_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(moeless_logits, eager_logits, rtol=1e-4, atol=1e-5)
    assert fused_calls == []  # generic path: the kernels do not fuse bias or a custom gate


def test_gpt_oss_on_forced_triton_names_the_unsupported_features(monkeypatch):
    monkeypatch.setenv("MOELESS_BACKEND", "triton")
    model = _model("gpt_oss", torch.float32)
    model.set_experts_implementation("moeless")
    try:
        with torch.no_grad(), pytest.raises(NotImplementedError, match=r"custom _apply_gate.*has_bias=True"):
            model(_input_ids())
    finally:
        model.set_experts_implementation("eager")


class _ToyConfig(PretrainedConfig):
    model_type = "moeless_toy"


def _toy_config(**kwargs):
    return _ToyConfig(hidden_size=16, intermediate_size=8, num_experts=5, **kwargs)


@use_experts_implementation(is_concatenated=False)
class InterleavedExperts(nn.Module):
    """Gate/up interleaved per row ([g0, u0, g1, u1, ...]) with transformers' default gate and SiLU."""

    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_experts
        self.gate_up_proj = nn.Parameter(torch.randn(config.num_experts, 2 * config.intermediate_size,
                                                     config.hidden_size) * 0.3)
        self.down_proj = nn.Parameter(torch.randn(config.num_experts, config.hidden_size,
                                                  config.intermediate_size) * 0.3)
        self.act_fn = ACT2FN["silu"]

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for t in range(top_k_index.shape[0]):  # one pair at a time: the plainest reading of the layout
            for k in range(top_k_index.shape[1]):
                e = int(top_k_index[t, k])
                if e >= self.num_experts:  # expert-parallel sentinel
                    continue
                proj = self.gate_up_proj[e] @ hidden_states[t]
                y = self.down_proj[e] @ (self.act_fn(proj[0::2]) * proj[1::2])
                out[t] += top_k_weights[t, k] * y
        return out


def _layout_module(kind: str) -> nn.Module:
    """A small experts module of one layout, from transformers' own classes where one exists."""
    torch.manual_seed(3)
    small = dict(hidden_size=16, num_attention_heads=4, num_key_value_heads=4)
    if kind == "interleaved":
        return InterleavedExperts(_toy_config()).to(DEVICE)
    if kind == "transposed":  # Aria: [E, H, 2I] / [E, I, H]
        from transformers.models.aria.configuration_aria import AriaTextConfig
        from transformers.models.aria.modeling_aria import AriaExperts
        module = AriaExperts(AriaTextConfig(**small, intermediate_size=8, moe_num_experts=5, moe_topk=2))
    elif kind == "no_gate":  # Nemotron-H: up_proj + relu2
        from transformers.models.nemotron_h.configuration_nemotron_h import NemotronHConfig
        from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts
        module = NemotronHExperts(NemotronHConfig(**small, moe_intermediate_size=8, n_routed_experts=5,
                                                  num_experts_per_tok=2, mlp_hidden_act="relu2"))
    elif kind == "post_norm":  # MuseSpark: an RMS norm after each expert
        from transformers.models.muse_spark.configuration_muse_spark import MuseSparkTextConfig
        from transformers.models.muse_spark.modeling_muse_spark import MuseSparkExperts
        module = MuseSparkExperts(MuseSparkTextConfig(**small, moe_hidden_size=16, moe_intermediate_size=8,
                                                      num_local_experts=5))
    elif kind == "gelu":  # Mixtral layout with a GELU gate
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts
        module = MixtralExperts(MixtralConfig(**small, intermediate_size=8, num_local_experts=5, hidden_act="gelu"))
    else:
        raise KeyError(kind)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.3)
    return module.to(DEVICE)


def _routing(num_tokens=7, num_experts=5, top_k=2, seed=4):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, 16, generator=g)
    ids = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, top_k, generator=g)
    return hidden.to(DEVICE), ids.to(DEVICE), weights.to(DEVICE)


FAST_LAYOUTS = ["interleaved", "transposed"]
GENERIC_LAYOUTS = {"no_gate": "has_gate=False", "post_norm": "has_post_expert_norm=True",
                   "gelu": "act_fn GELUActivation"}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", FAST_LAYOUTS)
def test_fast_path_layouts_match_eager(kind, backend, monkeypatch, fused_calls):
    monkeypatch.setenv("MOELESS_BACKEND", backend)
    module = _layout_module(kind)
    assert hf.fast_path_blockers(module) == ()
    hidden, ids, weights = _routing()
    with torch.no_grad():
        out = hf.moeless_experts_forward(module, hidden, ids, weights)
        torch.testing.assert_close(out, _eager(module, hidden, ids, weights), rtol=1e-5, atol=1e-5)
    assert fused_calls == [backend]


@pytest.mark.parametrize("kind", sorted(GENERIC_LAYOUTS))
def test_generic_layouts_match_eager_and_refuse_forced_triton(kind, monkeypatch, fused_calls):
    module = _layout_module(kind)
    blockers = hf.fast_path_blockers(module)
    assert any(GENERIC_LAYOUTS[kind] in b for b in blockers), blockers
    hidden, ids, weights = _routing()
    with torch.no_grad():
        expected = _eager(module, hidden, ids, weights)
        monkeypatch.setenv("MOELESS_BACKEND", "torch")
        torch.testing.assert_close(hf.moeless_experts_forward(module, hidden, ids, weights), expected,
                                   rtol=1e-5, atol=1e-5)
        monkeypatch.setenv("MOELESS_BACKEND", "triton")
        with pytest.raises(NotImplementedError, match=GENERIC_LAYOUTS[kind]):
            hf.moeless_experts_forward(module, hidden, ids, weights)
    assert fused_calls == []


# --- routing inputs: sentinels, dense weights, bad input, autograd --------------------------------------------


@pytest.mark.parametrize("kind", ["interleaved", "post_norm"])  # one fast-path and one generic-path layout
def test_expert_parallel_sentinels_contribute_nothing(kind, monkeypatch):
    monkeypatch.setenv("MOELESS_BACKEND", "torch")
    module = _layout_module(kind)
    module._is_expert_parallel = True
    hidden, ids, weights = _routing()
    ids[0, 1] = ids[3, 0] = ids[5, 1] = module.num_experts  # not on this rank
    with torch.no_grad():
        out = hf.moeless_experts_forward(module, hidden, ids, weights)
        expected = _eager(module, hidden, ids, weights)  # the eager loops skip id == num_experts
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    module._is_expert_parallel = False
    with pytest.raises(ValueError, match="top_k_index"):
        hf.moeless_experts_forward(module, hidden, ids, weights)


@pytest.mark.parametrize("kind", ["interleaved", "gelu"])
def test_dense_router_weights_are_gathered(kind, monkeypatch):
    monkeypatch.setenv("MOELESS_BACKEND", "torch")
    module = _layout_module(kind)
    hidden, ids, weights = _routing(top_k=2)
    dense = torch.zeros(ids.shape[0], module.num_experts, device=DEVICE).scatter_(1, ids, weights)
    with torch.no_grad():
        out = hf.moeless_experts_forward(module, hidden, ids, dense)
        expected = _eager(module, hidden, ids, weights)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_bad_input_raises_value_error_naming_it(monkeypatch):
    module = _layout_module("interleaved")
    hidden, ids, weights = _routing()
    monkeypatch.setenv("MOELESS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="MOELESS_BACKEND"):
        hf.moeless_experts_forward(module, hidden, ids, weights)
    monkeypatch.setenv("MOELESS_BACKEND", "torch")
    bad_ids = ids.clone()
    bad_ids[2, 0] = -1
    with pytest.raises(ValueError, match="top_k_index"):
        hf.moeless_experts_forward(module, hidden, bad_ids, weights)
    with pytest.raises(ValueError, match="top_k_weights"):
        hf.moeless_experts_forward(module, hidden, ids, weights[:, :1])
    with pytest.raises(ValueError, match="hidden_states"):
        hf.moeless_experts_forward(module, hidden[None], ids, weights)


def test_autograd_takes_the_exact_path_and_matches_eager_gradients(monkeypatch, fused_calls):
    module = _layout_module("interleaved")
    hidden, ids, weights = _routing()
    grads = []
    for run in (_eager, hf.moeless_experts_forward):
        module.zero_grad()
        x = hidden.clone().requires_grad_(True)
        monkeypatch.setenv("MOELESS_BACKEND", "torch")
        run(module, x, ids, weights).square().sum().backward()
        grads.append((x.grad, module.gate_up_proj.grad.clone(), module.down_proj.grad.clone()))
    for ours, theirs in zip(grads[1], grads[0]):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert fused_calls == []
    monkeypatch.setenv("MOELESS_BACKEND", "triton")
    with pytest.raises(NotImplementedError, match="autograd"):
        hf.moeless_experts_forward(module, hidden, ids, weights)


@pytest.mark.parametrize("code", [
    "import moeless.hf as h",                                   # moeless.hf first: it imports transformers
    "import moeless; import transformers.integrations.moe",      # the lazy hook registers on transformers' import
    "import transformers.integrations.moe; import moeless",      # transformers already there: registered at once
])
def test_registration_in_every_import_order(code):
    import subprocess
    import sys

    check = "from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS as F; assert 'moeless' in F"
    proc = subprocess.run([sys.executable, "-c", f"{code}; {check}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
