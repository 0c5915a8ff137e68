"""`moeless demo`: every bad option is one `error:` line before any process starts, a rank's failure comes back
as one line, and the table reports the requests the model cannot serve."""
from __future__ import annotations

import json

import pytest

from moeless import demo, tiny_moe

BAD = [
    (["--requests", "0"], "--requests must be an integer in [1, "),
    (["--max-new-tokens", "0"], "--max-new-tokens must be an integer in [1, "),
    (["--max-prompt-tokens", "-3"], "--max-prompt-tokens must be an integer in [1, "),
    (["--trace", "bogus"], "--trace: 'bogus' is neither a bundled trace"),
    (["--timeout", "0"], "--timeout must be a finite number > 0, got 0.0"),
    (["--timeout", "nan"], "--timeout must be a finite number > 0, got nan"),
    (["--world", "0"], "--world must be an integer in [1, 1024], got 0"),
    (["--world", "-1"], "--world must be an integer in [1, 1024], got -1"),
    (["--world", "3"], "--world 3 does not divide the model's"),
    (["--batch-window", "0"], "--batch-window must be a finite number > 0"),
    (["--keep-alive", "-1"], "--keep-alive must be a finite number >= 0"),
    (["--repeats", "0"], "--repeats must be an integer in [1, "),
    (["--extra-slots", "-1"], "--extra-slots must be an integer in [0, "),
    (["--model", "{tmp}/missing"], "--model: no such path"),
    (["--model", "{tmp}"], "--model: '{tmp}' has no config.json (not a Hugging Face model folder)"),
    (["--model", "{tmp}/notmodel"], "--model: '{tmp}/notmodel' is not a Hugging Face model transformers can read"),
    (["--model", "{tmp}/noweights"], "--model: '{tmp}/noweights' has a config.json but no weights"),
    (["--predictor", "{tmp}/missing.npz"], "--predictor: no such file"),
    (["--model", "{tmp}/short", "--requests", "2"], "none of the 2 requests fits the model's context of 4 tokens"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_options_fail_before_any_process(argv, message, tmp_path, capsys, monkeypatch):
    (tmp_path / "notmodel").mkdir()
    (tmp_path / "notmodel" / "config.json").write_text('{"foo": 1}')
    tiny_moe.build_config().save_pretrained(tmp_path / "noweights")  # a config, no weight files
    from transformers import MixtralForCausalLM

    short = tiny_moe.build_config()
    short.max_position_embeddings = 4  # a model whose context no request fits
    MixtralForCausalLM(short).save_pretrained(tmp_path / "short")
    capsys.readouterr()  # the save's own progress bar

    def spawn(*args, **kwargs):
        raise AssertionError("a process was started")

    monkeypatch.setattr(demo, "_run_ranks", spawn)
    out = tmp_path / "report"
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv] + ["--out", str(out)]
    assert demo.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moeless demo: error: "), err
    assert message.replace("{tmp}", str(tmp_path)) in err[0]
    assert not out.exists()  # nothing written


def test_cli_demo_errors_are_one_line(tmp_path, capsys, monkeypatch):
    from moeless import cli

    monkeypatch.setattr(demo, "_run_ranks", lambda *a, **k: pytest.fail("a process was started"))
    assert cli.main(["demo", "--world", "0", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["moeless demo: error: --world must be an integer in [1, 1024], got 0"]


def test_a_rank_failure_is_one_line(tmp_path, capfd):
    """A model the ranks cannot serve (a dense Llama: no MoE block) fails in every rank; the demo prints the
    first rank's error, one line, and no traceback."""
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path / "dense")
    capfd.readouterr()  # the save's own progress bar
    report = tmp_path / "report"
    report.mkdir()
    earlier = {name: f"an earlier run's {name}" for name in ("raw.json", "report.md", "summary.json")}
    for name, text in earlier.items():
        (report / name).write_text(text)
    code = demo.main(["--model", str(tmp_path / "dense"), "--world", "2", "--requests", "2", "--timeout", "20",
                      "--out", str(report), "--json"])
    err = capfd.readouterr().err.strip().splitlines()  # the ranks' stderr included
    assert code == 2
    assert len(err) == 1 and err[0].startswith("moeless demo: error: rank "), err
    assert "model: unsupported architecture LlamaForCausalLM: no MoE block" in err[0]
    # the failed run left the earlier report as it was: same files, same bytes, nothing of its own
    assert {p.name: p.read_text() for p in report.iterdir()} == earlier


def test_demo_reports_refused_requests(tmp_path, capsys):
    """Prompts past the tiny model's context are refused by both policies and counted in the table; the others
    are served with the same tokens by both."""
    out = tmp_path / "report"
    code = demo.main(["--world", "2", "--requests", "6", "--max-prompt-tokens", "1000", "--max-new-tokens", "2",
                      "--repeats", "1", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0
    raw = json.loads((out / "raw.json").read_text())
    errors = [r["error"] for r in raw["moeless"]["results"]]
    assert errors == [r["error"] for r in raw["ep"]["results"]]
    n_bad = sum(e is not None for e in errors)
    assert 0 < n_bad < 6 and all(e.startswith("context: ") for e in errors if e is not None)
    assert f"requests: {6 - n_bad} of 6 served; {n_bad} refused before serving: context {n_bad} (e.g. request " in text
    assert "generated tokens identical to plain EP: True" in text
    assert f"{n_bad} refused before serving" in (out / "report.md").read_text()
