"""moeless.specs: model sizes read from Hugging Face configs against hand computations, presets, bad input."""
import json

import pytest

from moeless.specs import (HARDWARE, MODEL_NAMES, HardwareSpec, ModelSpec, bundled_config, hardware_for_device,
                           hardware_spec, model_spec)


def test_mixtral_expert_size_by_hand():
    m = model_spec("mixtral-8x7b")
    assert (m.num_moe_layers, m.num_experts, m.top_k) == (32, 8, 2)
    # gate, up, down: 3 x 4096 x 14336 weights in bf16 (the paper's 0.33 GB is this in GiB)
    assert m.expert_bytes == 3 * 4096 * 14336 * 2
    assert abs(m.expert_bytes / 1024**3 - 0.328) < 1e-3
    assert m.flops_per_token == 2 * 3 * 4096 * 14336
    # attention (32 query heads, 8 KV heads of 128) + router
    assert m.dense_params_per_layer == 4096 * 128 * (2 * 32 + 2 * 8) + 4096 * 8


def test_deepseek_v2_lite_skips_dense_layer_and_counts_shared_experts():
    m = model_spec("deepseek-v2-lite")
    assert (m.num_moe_layers, m.num_experts, m.top_k, m.moe_intermediate_size) == (26, 64, 6, 1408)
    assert (m.num_shared_experts, m.shared_intermediate_size) == (2, 2 * 1408)


def test_qwen_shared_expert_and_olmoe_fp32():
    q = model_spec("qwen1.5-moe-a2.7b")
    assert (q.num_experts, q.top_k, q.moe_intermediate_size, q.shared_intermediate_size) == (60, 4, 1408, 5632)
    o = model_spec("olmoe-1b-7b")
    assert o.bytes_per_param == 4.0 and o.num_experts == 64


def test_every_preset_loads():
    for name in MODEL_NAMES:
        spec = model_spec(name)
        assert spec.expert_bytes > 0 and spec.source
    assert model_spec("deepseek-v3").bytes_per_param == 1.0
    assert model_spec("llama-4-scout").top_k == 1


def test_config_path_and_missing_key(tmp_path):
    cfg = bundled_config("phi-3.5-moe")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    assert model_spec(str(tmp_path)).num_experts == 16
    cfg.pop("num_local_experts")
    with pytest.raises(ValueError, match="num_experts"):
        ModelSpec.from_hf_config(cfg)
    with pytest.raises(ValueError, match="model"):
        model_spec("no-such-model")


def test_hardware_presets_and_checks():
    assert set(HARDWARE) == {"a6000", "h100", "h200", "cpu"}
    assert hardware_for_device("NVIDIA H200") is HARDWARE["h200"] and hardware_for_device("cpu") is HARDWARE["cpu"]
    assert "priced as an H100" in hardware_for_device("NVIDIA L40S").name
    a = hardware_spec("RTX-A6000")
    assert a.link_group == 2 and a.memory_bytes == 48e9
    assert hardware_spec("H200-SXM").hbm_bandwidth == 4.8e12
    with pytest.raises(ValueError, match="hardware"):
        hardware_spec("tpu")
    with pytest.raises(ValueError, match="peak_flops"):
        HardwareSpec("x", 0, 1, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="top_k"):
        ModelSpec("m", 1, 2, 3, 4, 4)
