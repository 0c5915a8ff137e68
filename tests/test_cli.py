"""The `moeless` command end to end: plan, predict fit|eval, simulate, through `moeless.cli.main`.

Each JSON output is checked against the library called directly (a second code path), never against literals.
"""
import argparse
import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moeless import baselines, planner
from moeless.cli import main
from moeless.traces import RoutingTrace, write_npz


def run_json(capsys, argv):
    rc = main(argv + ["--json"])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1, f"--json must print exactly one line, got {len(lines)}"
    return json.loads(lines[0])


@pytest.fixture
def loads_file(tmp_path):
    rng = np.random.default_rng(1)
    loads = rng.zipf(1.5, size=(3, 16)).clip(0, 300).astype(float)
    path = tmp_path / "loads.npy"
    np.save(path, loads)
    return path, loads


@pytest.mark.parametrize("policy", ["moeless", "eplb", "static"])
def test_plan_json_matches_the_library(capsys, loads_file, policy):
    path, loads = loads_file
    out = run_json(capsys, ["plan", "--loads", str(path), "--gpus", "4", "--slots-per-gpu", "5",
                            "--policy", policy])
    if policy == "moeless":
        plan = planner.plan_layers(loads, 4, 5)
    elif policy == "eplb":
        plan = baselines.rebalance_experts(loads, 20, 4)
    else:
        plan = baselines.static_plan(3, 16, 4, 5)
    assert np.array_equal(np.asarray(out["phy2log"]), plan.phy2log)
    assert np.array_equal(np.asarray(out["logcnt"]), plan.logcnt)
    counts = np.rint(loads).astype(np.int64)
    want = planner.balance(planner.gpu_loads(plan, planner.serve_time_split(plan, counts)))
    assert np.allclose(out["balance"]["serve_time_split"]["per_layer"], want, atol=1e-5)
    assert out["balance"]["serve_time_split"]["mean"] <= out["balance"]["even_split"]["mean"] + 1e-9


def test_plan_accepts_json_and_a_single_layer(capsys, tmp_path):
    loads = [5.0, 0.0, 40.0, 3.0, 9.0, 1.0, 0.0, 2.0]
    path = tmp_path / "loads.json"
    path.write_text(json.dumps(loads))
    out = run_json(capsys, ["plan", "--loads", str(path), "--gpus", "2", "--slots-per-gpu", "5"])
    assert np.asarray(out["phy2log"]).shape == (1, 10)
    assert np.all(np.asarray(out["logcnt"]) >= 1)


def test_plan_reuses_a_previous_plan(capsys, loads_file, tmp_path):
    path, loads = loads_file
    prev = tmp_path / "plan.json"
    assert main(["plan", "--loads", str(path), "--gpus", "4", "--slots-per-gpu", "5", "--out", str(prev)]) == 0
    capsys.readouterr()
    out = run_json(capsys, ["plan", "--loads", str(path), "--gpus", "4", "--slots-per-gpu", "5",
                            "--previous", str(prev)])
    want = planner.plan_layers(loads, 4, 5, previous=planner.Plan.from_json(prev.read_text()))
    assert np.array_equal(np.asarray(out["phy2log"]), want.phy2log)


@pytest.mark.parametrize("content, needle", [
    (np.array([[1.0, -2.0, 3.0, 4.0]]), "loads"),        # negative load
    (np.array([[1.0, np.nan, 3.0, 4.0]]), "loads"),      # NaN load
    (np.zeros((2, 2, 2)), "shape"),                       # 3-D
])
def test_plan_bad_loads_are_clear_errors(capsys, tmp_path, content, needle):
    path = tmp_path / "bad.npy"
    np.save(path, content)
    rc = main(["plan", "--loads", str(path), "--gpus", "2", "--slots-per-gpu", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err


def test_plan_missing_file_and_bad_slots(capsys, loads_file, tmp_path):
    assert main(["plan", "--loads", str(tmp_path / "none.npy"), "--gpus", "2", "--slots-per-gpu", "2"]) == 2
    assert "no such file" in capsys.readouterr().err
    path, _ = loads_file  # 16 experts cannot fit in 2 GPUs x 2 slots
    assert main(["plan", "--loads", str(path), "--gpus", "2", "--slots-per-gpu", "2"]) == 2
    assert "slots" in capsys.readouterr().err


def test_predict_fit_then_eval(capsys, tmp_path):
    rng = np.random.default_rng(0)
    L, N, K, E = 4, 600, 2, 8
    # layer l+1 routes mostly by a fixed map of layer l's choice, so prediction has signal
    ids = np.empty((L, N, K), dtype=np.int64)
    ids[0] = np.stack([rng.permutation(E)[:K] for _ in range(N)])
    for layer in range(1, L):
        nxt = (ids[layer - 1] * 3 + 1) % E
        noise = rng.random((N, K)) < 0.1
        nxt[noise] = rng.integers(0, E, noise.sum())
        nxt[:, 1] = np.where(nxt[:, 1] == nxt[:, 0], (nxt[:, 0] + 1) % E, nxt[:, 1])
        ids[layer] = nxt
    trace_path = tmp_path / "trace.npz"
    write_npz(RoutingTrace(topk_ids=ids, num_experts=E), trace_path)
    model = tmp_path / "pred.npz"
    out = run_json(capsys, ["predict", "fit", "--routing", str(trace_path), "--format", "npz", "--out", str(model)])
    assert model.exists() and out["model"].endswith("pred.npz")
    res = run_json(capsys, ["predict", "eval", "--model", str(model), "--routing", str(trace_path),
                            "--format", "npz", "--batch-tokens", "64", "--gpus", "4", "--slots-per-gpu", "3"])
    preds = res["predictors"]
    assert {"history", "affinity", "oracle"} <= set(preds)
    for name, m in preds.items():
        assert set(m) >= {"pearson", "rel_l1", "balance", "balance_even", "recall"}
        assert m["balance"] <= m["balance_even"] + 1e-9, name
    assert preds["oracle"]["rel_l1"] == pytest.approx(0.0, abs=1e-12)
    # the planted map is learnable: affinity must beat history's rel_l1
    assert preds["affinity"]["rel_l1"] < preds["history"]["rel_l1"]


def test_predict_unknown_format_is_rejected(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["predict", "fit", "--routing", str(tmp_path), "--format", "csv", "--out", str(tmp_path / "m")])


def test_simulate_json_has_the_issue_shape(capsys, tmp_path):
    out = run_json(capsys, ["simulate", "--window-s", "20", "--iteration-budget", "30",
                            "--policies", "megatron,moeless", "--out", str(tmp_path / "rep")])
    assert set(out) >= {"policies", "setup"}
    for name in ("megatron", "moeless"):
        p = out["policies"][name]
        assert set(p["latency_ms"]) == {"mean", "p50", "p90", "p99"}
        assert p["latency_ms"]["p50"] <= p["latency_ms"]["p90"] <= p["latency_ms"]["p99"]
        for key in ("cost_gb_s", "gpu_seconds", "cold_starts", "mean_replicas"):
            assert key in p
    assert out["policies"]["megatron"]["cold_starts"] == 0
    assert (tmp_path / "rep" / "report.md").exists()


# ---- bad input: one `error:` line naming the input, and nothing written (issue 11) ----------------------------
def run_error(capsys, argv):
    """Run the command; it must fail with exactly one stderr line `moeless <command>: error: ...`."""
    rc = main(argv)
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert rc == 2, captured.out
    assert len(lines) == 1 and re.match(r"moeless [a-z ]+: error: ", lines[0]), lines
    return lines[0]


def parser_error(capsys, argv):
    """argparse's own errors (unknown choice, not a number) are one line too."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert info.value.code == 2 and len(lines) == 1 and ": error: " in lines[0], lines
    return lines[0]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def jsonl_rows(L=2, N=3, experts=lambda layer, t: [0, 1], probs=lambda layer, t: [0.6, 0.4]):
    return [{"layer": layer, "token_idx": t, "experts": experts(layer, t), "gating_probs": probs(layer, t)}
            for layer in range(L) for t in range(N)]


def files_in(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("flags, needle", [
    (["--gpus", "100000", "--slots-per-gpu", "1"], "--gpus must be an integer in [1, 1024], got 100000"),
    (["--gpus", "4", "--slots-per-gpu", "100000"], "--slots-per-gpu must be an integer in [1, 4096], got 100000"),
    (["--gpus", "4", "--slots-per-gpu", "0"], "--slots-per-gpu must be an integer in [1, 4096], got 0"),
    (["--gpus", "-1", "--slots-per-gpu", "5"], "--gpus must be an integer in [1, 1024], got -1"),
    (["--gpus", "1024", "--slots-per-gpu", "17"], "at most 16384 (moeless.limits.MAX_SLOTS_PER_LAYER)"),
    (["--gpus", "4", "--slots-per-gpu", "5", "--cv-threshold", "0.5"], "--cv-threshold applies to --rule literal"),
    (["--gpus", "4", "--slots-per-gpu", "5", "--rule", "literal", "--cv-threshold", "nan"],
     "--cv-threshold must be a finite number >= 0, got nan"),
    (["--gpus", "4", "--slots-per-gpu", "5", "--rule", "literal", "--cv-threshold", "-1"],
     "--cv-threshold must be a finite number >= 0, got -1.0"),
    (["--gpus", "4", "--slots-per-gpu", "5", "--policy", "eplb", "--rule", "literal"],
     "--rule applies to --policy moeless only"),
    (["--gpus", "4", "--slots-per-gpu", "5", "--previous", "missing.json"], "--previous: no such file 'missing.json'"),
    (["--gpus", "4", "--slots-per-gpu", "5", "--out", "no/such/folder/plan.json"],
     "--out: the folder 'no/such/folder' of 'no/such/folder/plan.json' does not exist"),
])
def test_plan_bad_arguments(capsys, loads_file, tmp_path, monkeypatch, flags, needle):
    path, _ = loads_file
    monkeypatch.chdir(tmp_path)
    before = files_in(tmp_path)
    assert needle in run_error(capsys, ["plan", "--loads", str(path)] + flags)
    assert files_in(tmp_path) == before


@pytest.mark.parametrize("name, content, needle", [
    ("huge.json", "[[1e300, 1, 2, 3]]", "--loads must be finite token counts in [0, 1,000,000,000,000], got 1e+300"),
    ("inf.json", "[[1e400, 1, 2, 3]]", "--loads must be finite token counts"),
    ("ragged.json", "[[1, 2], [3]]", "does not hold a [L, E] or [E] array"),
    ("text.json", '["a", "b"]', "--loads must hold real numbers"),
    ("bad.json", "[1, 2", "is not readable JSON"),
    ("complex.npy", np.array([[1 + 2j, 3, 4, 5]]), "--loads must hold real numbers (token counts), got complex"),
    ("wide.npy", np.ones((1, 5000)), "--loads: experts (columns) must be an integer in [1, 4096], got 5000"),
    ("empty.npy", b"", "is not a readable .npy file"),
])
def test_plan_bad_loads_files(capsys, tmp_path, name, content, needle):
    path = tmp_path / name
    if isinstance(content, np.ndarray):
        np.save(path, content)
    else:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert needle in run_error(capsys, ["plan", "--loads", str(path), "--gpus", "4", "--slots-per-gpu", "4"])


def test_plan_out_may_not_overwrite_an_input(capsys, loads_file, tmp_path):
    path, _ = loads_file
    before = path.read_bytes()
    err = run_error(capsys, ["plan", "--loads", str(path), "--gpus", "4", "--slots-per-gpu", "5", "--out", str(path)])
    assert "is also an input" in err and path.read_bytes() == before
    prev = tmp_path / "prev.json"
    assert main(["plan", "--loads", str(path), "--gpus", "4", "--slots-per-gpu", "5", "--out", str(prev)]) == 0
    capsys.readouterr()
    plan_before = prev.read_bytes()
    alias = tmp_path / "." / "prev.json"  # the same file by another name
    err = run_error(capsys, ["plan", "--loads", str(path), "--gpus", "4", "--slots-per-gpu", "5",
                             "--previous", str(prev), "--out", str(alias)])
    assert "is also an input" in err and prev.read_bytes() == plan_before


def test_plan_cv_threshold_works_with_the_literal_rule(capsys, loads_file):
    path, loads = loads_file
    seen = {}
    for cv in ("0", "0.5", "100"):
        out = run_json(capsys, ["plan", "--loads", str(path), "--gpus", "4", "--slots-per-gpu", "8", "--rule",
                                "literal", "--cv-threshold", cv])
        want = planner.plan_layers(loads, 4, 8, rule="literal", cv_threshold=float(cv))
        assert np.array_equal(np.asarray(out["phy2log"]), want.phy2log)
        seen[cv] = int(np.sum(out["logcnt"]))
    # a threshold no layer's replicas exceed adds no replica; a zero threshold adds the most
    assert seen["100"] == 3 * 16 <= seen["0.5"] <= seen["0"]
    assert seen["0"] > seen["100"]


def test_predict_fit_bounds_expert_ids_before_allocating(capsys, tmp_path):
    rows = jsonl_rows(experts=lambda layer, t: [0, 10**9 if (layer, t) == (1, 2) else 1])
    trace = write_jsonl(tmp_path / "big.jsonl", rows)
    err = run_error(capsys, ["predict", "fit", "--routing", str(trace), "--out", str(tmp_path / "m")])
    assert "big.jsonl:6: expert id 1000000000 is outside [0, 4096)" in err
    assert not (tmp_path / "m.npz").exists()


@pytest.mark.parametrize("rows, needle", [
    (jsonl_rows(experts=lambda layer, t: [1, 1]), "'experts' repeats an expert ([1, 1])"),
    (jsonl_rows(probs=lambda layer, t: [float("nan"), 0.5]), "'gating_probs' must be finite numbers >= 0"),
    (jsonl_rows(probs=lambda layer, t: [-0.1, 0.5]), "'gating_probs' must be finite numbers >= 0"),
    ([dict(r, layer=r["layer"] - 1) for r in jsonl_rows()], "'layer' must be an integer in [0, 1024), got -1"),
    (jsonl_rows()[:-1], "no row for layer(s) [1]; pass drop_incomplete=True (--drop-incomplete)"),
])
def test_predict_fit_rejects_misreadable_jsonl(capsys, tmp_path, rows, needle):
    trace = write_jsonl(tmp_path / "t.jsonl", rows)
    err = run_error(capsys, ["predict", "fit", "--routing", str(trace), "--out", str(tmp_path / "m")])
    assert needle in err and "t.jsonl" in err
    assert not (tmp_path / "m.npz").exists()


def test_drop_incomplete_drops_and_counts(capsys, tmp_path):
    rng = np.random.default_rng(3)
    ids = np.argsort(rng.random((2, 40, 6)), axis=-1)[..., :2]
    rows = [{"layer": layer, "token_idx": t, "experts": ids[layer, t].tolist()} for layer in range(2) for t in range(40)]
    lacking = [r for r in rows if not (r["layer"] == 1 and r["token_idx"] in (7, 39))]  # 2 tokens lack layer 1
    trace = write_jsonl(tmp_path / "t.jsonl", lacking)
    out = run_json(capsys, ["predict", "fit", "--routing", str(trace), "--drop-incomplete", "--out",
                            str(tmp_path / "m")])
    assert out["trace"]["dropped_tokens"] == 2 and out["trace"]["tokens"] == 38
    # the same as fitting on a file holding the complete tokens only
    complete = write_jsonl(tmp_path / "c.jsonl", [r for r in rows if r["token_idx"] not in (7, 39)])
    ref = run_json(capsys, ["predict", "fit", "--routing", str(complete), "--out", str(tmp_path / "ref")])
    assert ref["trace"]["dropped_tokens"] == 0
    from moeless.predictors import load_predictors

    a, b = load_predictors(out["model"]), load_predictors(ref["model"])
    np.testing.assert_array_equal(a["affinity"].counts, b["affinity"].counts)
    main(["predict", "fit", "--routing", str(trace), "--drop-incomplete", "--out", str(tmp_path / "m2")])
    assert "dropped 2 token(s)" in capsys.readouterr().out


def write_esft(folder, ids, weights=None):
    """ESFT task folder: one line per sequence of 6 tokens, ids [L, N, K]."""
    folder.mkdir(parents=True, exist_ok=True)
    L, N, K = ids.shape
    for layer in range(L):
        lines = []
        for s in range(0, N, 6):
            a = "\t".join(str(x) for x in ids[layer, s:s + 6].ravel())
            b = "\t".join("0.3" for _ in ids[layer, s:s + 6].ravel())
            lines.append(f"{a}\t\t{b}\n")
        (folder / f"expert_weights_{layer + 1}.txt").write_text("".join(lines))
    return folder


def test_esft_top_k_is_checked_or_detected(capsys, tmp_path):
    rng = np.random.default_rng(7)
    E, K = 8, 2
    ids = np.argsort(rng.random((3, 600, E)), axis=-1)[..., :K]  # top-2, 100 sequences of 6 tokens
    folder = write_esft(tmp_path / "scores" / "task", ids)
    err = run_error(capsys, ["predict", "fit", "--routing", str(folder), "--top-k", "6", "--out", str(tmp_path / "m")])
    assert "repeats an expert" in err and "top_k=6" in err
    out = run_json(capsys, ["predict", "fit", "--routing", str(folder), "--out", str(tmp_path / "m")])
    assert out["trace"]["top_k"] == 2 and out["trace"]["tokens"] == 600  # detected
    few = write_esft(tmp_path / "few" / "task", ids[:, :12])  # 12 tokens cannot rule out top-1
    err = run_error(capsys, ["predict", "fit", "--routing", str(few), "--out", str(tmp_path / "m3")])
    assert "cannot tell the top-k" in err and "--top-k" in err
    assert not (tmp_path / "m3.npz").exists()


@pytest.mark.parametrize("make, needle", [
    (lambda p: p.write_bytes(gzip.compress(b'{"layer": 0, "token_idx": 0, "experts": [1, 2]}\n' * 50)[:40]),
     "a truncated or corrupt gzip file"),
    (lambda p: p.write_bytes(b'{"layer": 0, "token_idx": 0, "experts": [1, 2]}\n'), "a truncated or corrupt gzip file"),
])
def test_unreadable_gzip_traces(capsys, tmp_path, make, needle):
    path = tmp_path / "t.jsonl.gz"
    make(path)
    assert needle in run_error(capsys, ["predict", "fit", "--routing", str(path), "--out", str(tmp_path / "m")])


def test_unreadable_npz_traces_and_models(capsys, tmp_path):
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    err = run_error(capsys, ["predict", "fit", "--routing", str(empty), "--out", str(tmp_path / "m")])
    assert "empty.npz: not a readable .npz file" in err
    err = run_error(capsys, ["predict", "eval", "--model", str(empty), "--routing", str(empty), "--batch-tokens", "8"])
    assert "empty.npz" in err
    err = run_error(capsys, ["predict", "eval", "--model", str(tmp_path / "nope"), "--routing", str(empty),
                             "--batch-tokens", "8"])
    assert "--model: no such file" in err


def test_predict_fit_out_and_eval_model_name_the_same_file(capsys, tmp_path):
    rng = np.random.default_rng(2)
    ids = np.argsort(rng.random((3, 200, 6)), axis=-1)[..., :2]
    trace = tmp_path / "t.npz"
    write_npz(RoutingTrace(topk_ids=ids, num_experts=6), trace)
    out = run_json(capsys, ["predict", "fit", "--routing", str(trace), "--out", str(tmp_path / "model")])
    assert out["model"] == str(tmp_path / "model.npz") and (tmp_path / "model.npz").exists()
    res = run_json(capsys, ["predict", "eval", "--model", str(tmp_path / "model"), "--routing", str(trace),
                            "--batch-tokens", "50", "--gpus", "2"])
    assert res["batches"] == 4
    err = run_error(capsys, ["predict", "eval", "--model", str(tmp_path / "model"), "--routing", str(trace),
                             "--batch-tokens", "0"])
    assert "--batch-tokens must be an integer in [1, 100000000], got 0" in err


SIM_FAST = ["--window-s", "20", "--iteration-budget", "20", "--policies", "megatron,moeless", "--no-progress"]


@pytest.mark.parametrize("flags, needle", [
    (["--slots-per-gpu", "0"], "--slots-per-gpu must be an integer in [1, 4096], got 0"),
    (["--iteration-budget", "0"], "--iteration-budget must be an integer in [1, 1000000], got 0"),
    (["--gpus", "0"], "--gpus must be an integer in [1, 1024], got 0"),
    (["--routing", "zipf:-1"], "--routing zipf:S exponent S must be a finite number >= 0, got -1.0"),
    (["--routing", "esft:/no/such/folder"], "--routing: no such file or folder '/no/such/folder'"),
    (["--window-s", "0"], "--window-s must be a finite number > 0, got 0.0"),
    (["--eplb-step-iterations", "0"], "--eplb-step-iterations must be an integer in [1, "),
])
def test_simulate_bad_arguments(capsys, tmp_path, flags, needle):
    out = tmp_path / "rep"
    assert needle in run_error(capsys, ["simulate", *SIM_FAST, "--out", str(out), *flags])
    assert not out.exists()


def test_simulate_rejects_a_request_of_10_to_the_12_tokens(capsys, tmp_path):
    trace = tmp_path / "huge.csv"
    trace.write_text("timestamp,input_tokens,output_tokens\n0,1000000000000,2\n0.5,10,3\n")
    err = run_error(capsys, ["simulate", *SIM_FAST, "--trace", str(trace), "--out", str(tmp_path / "rep")])
    assert "request 0 has 1000000000000 input tokens; at most 10,000,000" in err


def test_failed_simulate_leaves_an_existing_report_byte_for_byte(capsys, tmp_path):
    out = tmp_path / "rep"
    assert main(["simulate", *SIM_FAST, "--out", str(out), "--json"]) == 0
    capsys.readouterr()
    before = files_in(out)
    assert set(before) == {"report.md", "result.json", "latency_cdf.png", "replicas.png"}
    zero = tmp_path / "zero.csv"
    zero.write_text("timestamp,input_tokens,output_tokens\n0,0,0\n0.5,0,1\n1.2,0,0\n")
    err = run_error(capsys, ["simulate", *SIM_FAST, "--trace", str(zero), "--out", str(out)])
    assert "hold no token to serve" in err
    assert files_in(out) == before  # same names (no temporaries left), same bytes


def test_failed_report_rendering_leaves_earlier_files(tmp_path, monkeypatch):
    from moeless.sim import report

    result = run_small_simulation()
    paths = report.write_report(result, str(tmp_path))
    before = files_in(tmp_path)
    monkeypatch.setattr(report, "_replicas_figure", lambda *a: 1 / 0)  # fails after the JSON and one plot render
    with pytest.raises(ZeroDivisionError):
        report.write_report(result, str(tmp_path))
    assert files_in(tmp_path) == before and len(paths) == 4


def run_small_simulation():
    from moeless.sim import SimConfig, run_simulation

    return run_simulation(SimConfig(window_s=20.0, iteration_budget=20, policies=("megatron", "eplb", "moeless")))


def test_simulate_report_states_the_drain_time(tmp_path):
    from moeless.sim import report

    result = run_small_simulation()
    d = result.to_dict()
    span = d["setup"]["window_s"] / d["setup"]["rate_scale"]
    ends = {name: p["makespan_s"] for name, p in d["policies"].items()}
    text = report.markdown(result)
    assert f"arrivals span {span:.1f} s" in text
    for name, end in ends.items():
        assert f"{name} {end:.1f} s" in text
    if max(ends.values()) > 2 * span:
        assert f"{max(ends.values()) / span:.1f}x the arrival span" in report.drain_note(result)


def test_latency_plot_has_phase_panels_and_names_coinciding_policies():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moeless.sim import report
    from moeless.sim.results import PolicyResult, SimResult

    rng = np.random.default_rng(0)
    lat = rng.random((10, 4))
    prefill = np.arange(10) % 5 == 0
    pols = {}
    for name, scale in (("megatron", 1.0), ("eplb", 1.0), ("moeless", 0.5)):
        pr = PolicyResult(name, serverless=False)
        pr.add(lat * scale, lat.sum(1), np.ones(10), np.full(10, 8.0), np.zeros(10, int), np.arange(10.0), prefill)
        pols[name] = pr
    result = SimResult(pols, {"window_s": 10.0, "rate_scale": 1.0})
    fig = report._latency_figure(result, plt)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["CDF, prefill iterations", "CDF, decode iterations", "tail, all iterations (1 - CDF)"]
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["megatron", "eplb (same as megatron)", "moeless"]
    # the prefill panel holds the prefill samples only: 2 iterations x 4 layers per policy
    assert [len(line.get_xdata()) for line in fig.axes[0].get_lines()] == [8, 8, 8]
    plt.close(fig)
    for pr in pols.values():  # no phases recorded: one CDF over all iterations, then the tail
        pr.prefill = []
    fig = report._latency_figure(result, plt)
    assert [ax.get_title() for ax in fig.axes] == ["CDF, all iterations", "tail, all iterations (1 - CDF)"]
    plt.close(fig)


def test_argparse_errors_are_one_line(capsys):
    assert "invalid int value: 'x'" in parser_error(capsys, ["plan", "--loads", "l.npy", "--gpus", "x",
                                                             "--slots-per-gpu", "1"])
    assert "invalid choice" in parser_error(capsys, ["simulate", "--hardware", "tpu"])


def test_help_states_the_limits_and_every_flag_has_help(capsys):
    from moeless.cli import build_parser

    with pytest.raises(SystemExit):
        main(["--help"])
    assert "at most 4096 experts per layer" in capsys.readouterr().out.replace("\n", " ")
    parser = build_parser()
    for command, sub in _subcommands(parser):
        for action in sub._actions:
            if action.option_strings and action.dest != "help" and command != "demo":
                assert action.help, f"moeless {command} {action.option_strings[0]} has no help text"


def _subcommands(parser, prefix=""):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (prefix + name, sub)
                yield from _subcommands(sub, prefix + name + " ")


def test_python_dash_m_moeless(tmp_path):
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-m", "moeless", "plan", "--help"], cwd=root, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and "--slots-per-gpu" in run.stdout
    run = subprocess.run([sys.executable, "-m", "moeless", "plan", "--loads", str(tmp_path / "x.npy"), "--gpus",
                          "2", "--slots-per-gpu", "0"], cwd=root, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        "moeless plan: error: --slots-per-gpu must be an integer in [1, 4096], got 0"]
