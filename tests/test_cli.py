"""The `moeless` command end to end: plan, predict fit|eval, simulate, through `moeless.cli.main`.

Each JSON output is checked against the library called directly (a second code path), never against literals.
"""
import json

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
