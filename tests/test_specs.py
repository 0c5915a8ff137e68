"""moeless.specs: model sizes read from Hugging Face configs against hand computations, presets, bad input."""
import json
import os
from pathlib import Path

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


# ../shared/data/moe_model_configs beside the repository (MIT configs of 27 MoE models with an independent table,
# models.jsonl, of their layers, experts and top-k), or $MOELESS_MODEL_CONFIGS; read by path, never bundled
_REAL_CONFIGS = Path(os.environ.get("MOELESS_MODEL_CONFIGS",
                                    Path(__file__).resolve().parents[2] / "shared" / "data" / "moe_model_configs"))


@pytest.mark.skipif(not (_REAL_CONFIGS / "models.jsonl").is_file(), reason="no moe_model_configs folder beside the repo")
def test_every_real_config_reads_as_its_independent_table_says():
    rows = [json.loads(line) for line in (_REAL_CONFIGS / "models.jsonl").read_text().splitlines() if line.strip()]
    assert len(rows) >= 20
    for row in rows:
        spec = model_spec(str(_REAL_CONFIGS / f"{row['key']}.config.json"))
        assert (spec.num_experts, spec.top_k) == (row["num_experts"], row["top_k"]), row["name"]
        assert 1 <= spec.num_moe_layers <= row["num_layers"], row["name"]
        assert spec.name == row["key"] and spec.expert_bytes > 0


def test_moe_layers_of_interleaved_and_encoder_decoder_models_follow_transformers():
    """Which layers hold experts, counted by transformers' own configs and modelling rules."""
    tf = pytest.importorskip("transformers")
    jamba = tf.JambaConfig(num_hidden_layers=32, num_experts=16, expert_layer_period=2, expert_layer_offset=1)
    assert ModelSpec.from_hf_config(jamba.to_dict()).num_moe_layers == sum(n > 1 for n in jamba.layers_num_experts)
    jamba3 = tf.JambaConfig(num_hidden_layers=12, num_experts=8, expert_layer_period=3, expert_layer_offset=2)
    assert ModelSpec.from_hf_config(jamba3.to_dict()).num_moe_layers == sum(n > 1 for n in jamba3.layers_num_experts)
    # NllbMoe: layer i of a stack is sparse where (i + 1) % sparse_step == 0
    nllb = tf.NllbMoeConfig(encoder_layers=24, decoder_layers=12, encoder_sparse_step=4, decoder_sparse_step=3,
                            num_experts=128)
    want = sum((i + 1) % 4 == 0 for i in range(24)) + sum((i + 1) % 3 == 0 for i in range(12))
    spec = ModelSpec.from_hf_config(nllb.to_dict())
    assert (spec.num_moe_layers, spec.num_experts, spec.top_k) == (want, 128, 2)
    # SwitchTransformersStack: layer i is sparse where i % step == 1 (every layer for a step of 1)
    switch = tf.SwitchTransformersConfig(num_layers=12, num_sparse_encoder_layers=4, num_decoder_layers=12,
                                         num_sparse_decoder_layers=6, num_experts=64)
    enc, dec = switch.encoder_sparse_step, switch.decoder_sparse_step
    want = sum(i % enc == 1 or enc == 1 for i in range(12)) + sum(i % dec == 1 or dec == 1 for i in range(12))
    spec = ModelSpec.from_hf_config(switch.to_dict())
    assert (spec.num_moe_layers, spec.num_experts, spec.top_k) == (want, 64, 1)
    # Ernie4_5_MoeDecoderLayer: MoE where (i + 1) % interval == 0 and start <= i <= end
    ernie = tf.Ernie4_5_MoeConfig(num_hidden_layers=28, moe_layer_start_index=3, moe_layer_interval=2)
    end = ernie.moe_layer_end_index
    want = sum((i + 1) % 2 == 0 and 3 <= i <= end for i in range(28))
    spec = ModelSpec.from_hf_config(ernie.to_dict())
    assert (spec.num_moe_layers, spec.num_experts, spec.top_k) == (want, ernie.moe_num_experts, ernie.moe_k)
    assert spec.num_shared_experts == ernie.moe_num_shared_experts
    oss = tf.GptOssConfig(num_hidden_layers=4, num_local_experts=32, num_experts_per_tok=4,
                          quantization_config={"quant_method": "mxfp4"})
    spec = ModelSpec.from_hf_config(oss.to_dict())
    assert (spec.num_moe_layers, spec.num_experts, spec.top_k) == (4, 32, 4) and spec.bytes_per_param < 1
    # DBRX nests its MoE sizes
    dbrx = tf.DbrxConfig(d_model=512, n_layers=6, n_heads=8,
                         ffn_config={"moe_num_experts": 16, "moe_top_k": 4, "ffn_hidden_size": 1024})
    spec = ModelSpec.from_hf_config(dbrx.to_dict())
    assert (spec.num_moe_layers, spec.num_experts, spec.top_k, spec.moe_intermediate_size) == (6, 16, 4, 1024)


def test_sampling_top_k_is_not_the_router_and_names_come_from_the_path(tmp_path):
    cfg = bundled_config("mixtral-8x7b")
    del cfg["num_experts_per_tok"]
    cfg["top_k"] = 50  # a generation setting
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        ModelSpec.from_hf_config(cfg)
    cfg = bundled_config("mixtral-8x7b")
    (tmp_path / "mymoe.config.json").write_text(json.dumps(cfg))
    assert model_spec(str(tmp_path / "mymoe.config.json")).name == "mymoe"
    snap = tmp_path / "models--acme--Big-MoE" / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(cfg))
    assert model_spec(str(snap)).name == "acme/Big-MoE"
    assert model_spec(str(snap / "config.json")).num_experts == 8
