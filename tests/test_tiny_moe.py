"""moeless.tiny_moe: the held-out metrics against independent references (Hugging Face's own loss and router
logits on small random models, brute force over the scoring windows), and the shipped model against its code
(config, fp16 weights, its training record, the predictor fitted to it) and against a compressor's baseline."""
import json
import lzma
import math

import numpy as np
import pytest
import torch

from moeless import tiny_moe

SMALL = dict(hidden_size=16, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)


def _small_model(seed=0):
    from transformers import MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_moe.build_config(**SMALL)
    cfg.output_router_logits = False
    return MixtralForCausalLM(cfg).eval()


def _bytes(n, seed=0):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n, width", [(1, 8), (2, 8), (7, 8), (8, 8), (9, 8), (37, 8), (40, 8), (41, 9),
                                      (100, 1), (100, 2), (100, 3), (64, 64), (300, 63)])
def test_windows_score_every_byte_once_with_half_a_window_of_context(n, width):
    wins = tiny_moe._windows(n, width)
    W = min(width, n)
    scored = []
    for start, first in wins:
        assert 0 <= start and start + W <= n  # every window lies inside the text
        assert 0 <= first < W
        for p in range(start + first, start + W):
            scored.append(p)
            assert p - start >= min(p, width // 2)  # context: half a window, or all that precedes
    assert sorted(scored) == list(range(n))  # each byte exactly once


def _bos(ids):
    return torch.cat([torch.tensor([tiny_moe.BOS_ID]), ids])


def test_bits_per_byte_is_hugging_face_loss_when_one_window_holds_the_data():
    model, data = _small_model(), _bytes(40)
    ids = _bos(data)[None]
    with torch.no_grad():
        ref = model(input_ids=ids, labels=ids).loss.item() / math.log(2)
    assert tiny_moe.bits_per_byte(model, data, seq_len=64) == pytest.approx(ref, rel=1e-5)
    assert tiny_moe.bits_per_byte(model, data, seq_len=41) == pytest.approx(ref, rel=1e-5)


def test_bits_per_byte_brute_force_over_windows():
    """Each byte's NLL recomputed alone, from BOS and the start of the window that scores it, one forward each."""
    model, data = _small_model(1), _bytes(29, seed=3)
    seq_len = 8
    total = 0.0
    with torch.no_grad():
        for start, first in tiny_moe._windows(len(data), seq_len - 1):
            for p in range(start + first, start + seq_len - 1):
                logits = model(input_ids=_bos(data[start:p])[None]).logits[0, -1].double()
                total -= float(torch.log_softmax(logits, -1)[data[p]])
    ref = total / len(data) / math.log(2)
    for batch_size in (1, 3, 64):
        got = tiny_moe.bits_per_byte(model, data, seq_len=seq_len, batch_size=batch_size)
        assert got == pytest.approx(ref, rel=1e-5)


def test_expert_load_matches_hugging_face_router_logits():
    model, data = _small_model(2), _bytes(200, seed=4)
    seq_len = 16
    seqs = data[: len(data) // (seq_len - 1) * (seq_len - 1)].reshape(-1, seq_len - 1)
    ids = torch.stack([_bos(r) for r in seqs])
    with torch.no_grad():
        router_logits = model(input_ids=ids, output_router_logits=True).router_logits
    E, K = SMALL["num_local_experts"], SMALL["num_experts_per_tok"]
    ref = []
    for lg in router_logits:  # [tokens, E] per layer
        counts = np.bincount(torch.topk(lg.float(), K, dim=-1).indices.reshape(-1).numpy(), minlength=E)
        ref.append(counts.max() / counts.mean())
    np.testing.assert_allclose(tiny_moe.expert_load(model, data, seq_len=seq_len), ref, rtol=1e-12)


def test_metrics_reject_bad_sizes():
    model = _small_model()
    with pytest.raises(ValueError, match="seq_len"):
        tiny_moe.bits_per_byte(model, _bytes(10), seq_len=1)
    with pytest.raises(ValueError, match="at least 1 byte"):
        tiny_moe.bits_per_byte(model, _bytes(0))
    with pytest.raises(ValueError, match="batch_size"):
        tiny_moe.bits_per_byte(model, _bytes(10), batch_size=0)
    with pytest.raises(ValueError, match="seq_len - 1 = 15"):
        tiny_moe.expert_load(model, _bytes(10), seq_len=16)
    with pytest.raises(ValueError, match="seq_len"):
        tiny_moe.expert_load(model, _bytes(10), seq_len=1)


def test_held_out_split_is_the_corpus_tail():
    data = tiny_moe.corpus()
    train, held = tiny_moe.split(data)
    assert torch.equal(torch.cat([train, held]), data)
    assert len(held) == len(data) - len(data) * 19 // 20  # the tail demo.fit_predictor holds out too


def test_lr_schedule_warms_up_then_anneals_to_the_floor():
    f = [tiny_moe._lr_factor(p, 0.1, 0.05) for p in np.linspace(0, 1, 101)]
    assert f[0] == 0.0 and f[10] == pytest.approx(1.0) and f[-1] == pytest.approx(0.05)
    assert all(a <= b for a, b in zip(f[:11], f[1:11])) and all(a >= b for a, b in zip(f[10:], f[11:]))


# ---- the shipped model ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped():
    if not (tiny_moe.MODEL_DIR / "config.json").exists():
        pytest.skip("no shipped tiny model")
    return tiny_moe.load()


@pytest.fixture(scope="module")
def held_out_bpb(shipped):
    _, held = tiny_moe.split()
    return tiny_moe.bits_per_byte(shipped, held)


def test_shipped_weights_are_the_code_s_config_in_fp16(shipped):
    from safetensors import safe_open

    from transformers import MixtralForCausalLM

    with safe_open(tiny_moe.MODEL_DIR / "model.safetensors", "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"F16"}
    with torch.device("meta"):
        fresh = MixtralForCausalLM(tiny_moe.build_config())
    assert {k: v.shape for k, v in shipped.state_dict().items()} == {k: v.shape for k, v in fresh.state_dict().items()}
    assert shipped.config.vocab_size == tiny_moe.VOCAB_SIZE and type(shipped).__name__ == "MixtralForCausalLM"


def test_shipped_training_record_matches_the_weights(held_out_bpb):
    record = json.loads((tiny_moe.MODEL_DIR / "training.json").read_text())
    assert record["held_out_bits_per_byte"] == pytest.approx(held_out_bpb, abs=1e-4)


def test_shipped_model_predicts_held_out_text_better_than_xz(held_out_bpb):
    """xz (LZMA, preset 9e) compressing the held-out tail on its own: 23 KB of context for every byte, where the
    model sees at most 511 bytes. (Given the whole training text as its dictionary, xz needs fewer bits than the
    model, about 1.08 bits/byte: it copies long passages the topics share; the README says so.)"""
    _, held = tiny_moe.split()
    held_b = bytes(held.tolist())
    xz_bpb = 8 * len(lzma.compress(held_b, preset=9 | lzma.PRESET_EXTREME)) / len(held_b)
    assert held_out_bpb < xz_bpb


def test_shipped_predictor_was_fitted_to_the_shipped_gates(shipped):
    from moeless.demo import PREDICTOR_FILE
    from moeless.predictors import load_predictor
    from moeless.traces import find_routers

    pred = load_predictor(str(tiny_moe.MODEL_DIR / PREDICTOR_FILE))
    gates = np.stack([r.weight.detach().float().numpy() for _, r in find_routers(shipped)])
    np.testing.assert_array_equal(pred.gate_weights, gates)


def test_residual_dropout_acts_in_training_only_and_comes_off():
    model, x = _small_model(), _bytes(24)[None]
    with torch.no_grad():
        ref = model(input_ids=x).logits
        hooks = tiny_moe._residual_dropout(model, 0.5)
        assert len(hooks) == 1 + 2 * SMALL["num_hidden_layers"]
        assert torch.equal(model(input_ids=x).logits, ref)  # eval mode: no dropout
        model.train()
        assert not torch.allclose(model(input_ids=x).logits, ref)
        for h in hooks:
            h.remove()
        assert torch.equal(model(input_ids=x).logits, ref)  # Mixtral itself has no dropout here
    assert tiny_moe._residual_dropout(model, 0.0) == []


def _trained(path, **kw):
    from safetensors.torch import load_file

    tiny_moe.train(path, steps=3, seq_len=32, batch_size=2, warmup_steps=1, threads=None, eval_every=1000,
                   config=SMALL, **kw)
    return load_file(path / "model.safetensors")


def test_train_is_seeded_and_saves_a_plain_fp16_mixtral(tmp_path):
    a = _trained(tmp_path / "a")
    b = _trained(tmp_path / "b")
    c = _trained(tmp_path / "c", seed=1)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert {v.dtype for v in a.values()} == {torch.float16}
    model = tiny_moe.load(tmp_path / "a")
    record = json.loads((tmp_path / "a" / "training.json").read_text())
    assert record["steps"] == 3 and record["settings"]["config"] == SMALL
    _, held = tiny_moe.split()
    assert record["held_out_bits_per_byte"] == pytest.approx(tiny_moe.bits_per_byte(model, held, seq_len=32), abs=1e-4)


@pytest.mark.parametrize("kw, match", [(dict(steps=0), "steps"), (dict(dropout=1.0), "dropout"),
                                       (dict(seq_len=65), "max_position_embeddings=64"),
                                       (dict(time_budget=0.0), "time_budget"), (dict(warmup_steps=3), "warmup")])
def test_train_rejects_bad_settings(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        tiny_moe.train(tmp_path, **{**dict(steps=3, warmup_steps=1, config=SMALL, threads=None), **kw})
    assert not any(tmp_path.iterdir())


def test_cli_bad_folders_get_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        tiny_moe.main(["--evaluate", "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"python -m moeless.tiny_moe: error: --out: no tiny MoE model at {tmp_path}: train one with "
                   f"`python -m moeless.tiny_moe --out {tmp_path}`"]
    afile = tmp_path / "weights.bin"
    afile.write_bytes(b"x")
    with pytest.raises(SystemExit) as exc:
        tiny_moe.main(["--out", str(afile), "--steps", "1"])
    assert exc.value.code == 2
    assert "--out must be a folder (or not exist yet)" in capsys.readouterr().err
    assert afile.read_bytes() == b"x"
