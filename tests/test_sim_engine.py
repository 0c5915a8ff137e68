"""moeless.sim end to end on small windows: determinism, the JSON contract, the report, bad configs, routing."""
import json
import os

import numpy as np
import pytest

from moeless.sim import SimConfig, run_simulation, write_report
from moeless.sim.routing import fit_popularity, mixtral_popularity
from moeless.traces import default_esft_path

SMALL = dict(window_s=20.0, iteration_budget=40)


@pytest.fixture(scope="module")
def small_result():
    return run_simulation(SimConfig(**SMALL))


def test_json_contract(small_result):
    d = json.loads(small_result.to_json())
    assert set(d["policies"]) == {"megatron", "eplb", "eplb-vllm", "oracle", "moeless"}
    for p in d["policies"].values():
        assert set(p["latency_ms"]) == {"mean", "p50", "p90", "p99"}
        assert p["latency_ms"]["p50"] <= p["latency_ms"]["p90"] <= p["latency_ms"]["p99"]
        for key in ("cost_gb_s", "gpu_seconds", "cold_starts", "mean_replicas"):
            assert key in p
    assert d["setup"]["model"] == "mixtral-8x7b" and d["setup"]["gpus"] == 8
    # serverful accounting: every resident instance for the whole run
    meg = d["policies"]["megatron"]
    assert meg["cost_gb_s"] == pytest.approx(256 * d["setup"]["expert_gb"] * meg["makespan_s"], rel=1e-3)
    assert meg["gpu_seconds"] == pytest.approx(8 * meg["makespan_s"])
    assert d["policies"]["moeless"]["cold_starts"] > 0 and meg["cold_starts"] == 0


def test_same_seed_same_result(small_result):
    again = run_simulation(SimConfig(**SMALL))
    strip = lambda r: {**r.to_dict(), "setup": {k: v for k, v in r.to_dict()["setup"].items() if k != "wall_s"}}
    assert strip(again) == strip(small_result)
    other = run_simulation(SimConfig(**SMALL, seed=1, policies=("megatron",)))
    assert other.to_dict()["policies"]["megatron"] != small_result.to_dict()["policies"]["megatron"]


def test_report(small_result, tmp_path):
    paths = write_report(small_result, str(tmp_path))
    for p in paths.values():
        assert os.path.getsize(p) > 0
    text = open(paths["markdown"]).read()
    assert "| moeless |" in text and "-43.19%" in text


@pytest.mark.parametrize("kw, match", [
    (dict(policies=("nope",)), "policies"),
    (dict(batching="odd"), "batching"),
    (dict(routing="zipf:1", model="deepseek-v2-lite", gpus=0), "gpus"),
    (dict(routing="esft"), "needs a path"),
    (dict(model="phi-3.5-moe"), "routing"),  # Mixtral's popularity has 8 experts, Phi 16
    (dict(window_start_s=1e7), "holds no request"),
    (dict(prepare_every=0), "prepare_every"),
])
def test_bad_configs(kw, match):
    with pytest.raises(ValueError, match=match):
        run_simulation(SimConfig(**{**SMALL, **kw}))


def test_fit_popularity_recovers_concentration():
    rng = np.random.default_rng(0)
    p = np.array([[0.4, 0.3, 0.2, 0.1]])
    kappa, n = 50.0, 4000
    loads = np.stack([rng.multinomial(n, rng.dirichlet(kappa * p[0]))[None] for _ in range(400)])
    prof = fit_popularity(loads, top_k=1)
    assert np.allclose(prof.p, p, atol=0.01)
    assert 35 < prof.kappa[0] < 70
    mix = mixtral_popularity()
    assert mix.p.shape == (32, 8) and np.isfinite(mix.kappa).all()


ESFT = os.path.join(default_esft_path(), "law")


@pytest.mark.skipif(not os.path.isdir(ESFT), reason="ESFT routing traces not present")
def test_token_level_routing_with_each_predictor():
    res = run_simulation(SimConfig(model="deepseek-v2-lite", routing=f"esft:{ESFT}", window_s=5.0,
                                   iteration_budget=4, policies=("moeless", "moeless:oracle")))
    d = res.to_dict()["policies"]
    assert d["moeless"]["predictor"] == "affinity" and d["moeless:oracle"]["predictor"] == "oracle"
    assert d["moeless"]["iteration_ms"]["mean"] > 0
    assert all(v["latency_ms"]["mean"] > 0 for v in d.values())
