"""Two models built from one config object keep their own experts implementation (moeless.hf.register).

transformers' `from_config(config, experts_implementation=...)` writes the choice into the config it is given and
the experts modules read it at every call; without moeless's copy, building an "eager" model from the config of a
"moeless" model switched the moeless one to eager, silently. The reference is transformers' own eager model: the
moeless model must still dispatch to moeless (seen through a spy) and give the eager model's logits.
"""
import torch
from transformers import AutoModelForCausalLM, MixtralConfig
from transformers.integrations.moe import ExpertsInterface

from moeless import hf


def _config():
    return MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                         max_position_embeddings=64)


def test_models_from_one_config_keep_their_own_implementation(monkeypatch):
    calls = []

    def spy(self, hidden, ids, weights):
        calls.append(type(self).__name__)
        return hf.moeless_experts_forward(self, hidden, ids, weights)

    monkeypatch.setitem(ExpertsInterface._global_mapping, "moeless", spy)
    monkeypatch.setenv("MOELESS_BACKEND", "torch")
    config = _config()
    torch.manual_seed(0)
    fast = AutoModelForCausalLM.from_config(config, experts_implementation="moeless").eval()
    eager = AutoModelForCausalLM.from_config(config, experts_implementation="eager").eval()
    eager.load_state_dict(fast.state_dict())
    assert fast.config._experts_implementation == "moeless"
    assert eager.config._experts_implementation == "eager"
    assert fast.config is not eager.config
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out_fast = fast(ids).logits
        assert calls == ["MixtralExperts"] * 2  # both MoE layers of the moeless model ran moeless
        out_eager = eager(ids).logits
    assert calls == ["MixtralExperts"] * 2  # the eager model did not
    torch.testing.assert_close(out_fast, out_eager, rtol=1e-5, atol=1e-5)


def test_register_is_idempotent_and_keeps_one_wrapper():
    from transformers import PreTrainedModel

    hf.register()
    first = PreTrainedModel.__dict__["_from_config"].__func__
    hf.register()
    assert PreTrainedModel.__dict__["_from_config"].__func__ is first
    assert first._moeless_copies_config
