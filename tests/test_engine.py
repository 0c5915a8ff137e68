"""moeless.engine: the per-layer control plane against the planner and pool called directly, and the torch
gate-replica counts against the numpy predictor."""
from __future__ import annotations

import numpy as np
import pytest

from moeless.baselines import static_plan
from moeless.engine import Engine, GateReplicaLoads, default_slots_per_gpu
from moeless.planner import plan_layers, serve_time_split
from moeless.predictors import GateReplicaPredictor

L, E, G = 3, 8, 4


def test_ep_keeps_static_plan_and_splits_by_counts():
    eng = Engine(L, E, G, policy="ep")
    start = eng.start(0.0)
    assert len(start.cold) == L * E
    counts = np.array([9, 0, 3, 1, 0, 0, 2, 5])
    for layer in range(L):
        assert eng.observe(layer, counts, counts, now=1.0 + layer) is None
        assert eng.plan(layer) == static_plan(L, E, G, E // G)[layer]
        np.testing.assert_array_equal(eng.split(layer, counts)[:, 0], counts)


def test_moeless_plans_layer_plus_d_like_the_planner():
    S = default_slots_per_gpu(E, G)
    eng = Engine(L, E, G, policy="moeless", distance=1, keep_alive_s=float("inf"))
    eng.start(0.0)
    rng = np.random.default_rng(0)
    t = 1.0
    for it in range(3):
        true = rng.integers(0, 50, size=(L, E))
        true[:, 0] += 200  # a hot expert
        pred = rng.integers(0, 50, size=(L, E))
        pred[:, 0] += 200
        for layer in range(L):
            before = eng.plan(layer)
            np.testing.assert_array_equal(eng.split(layer, true[layer]), serve_time_split(before, true[layer][None])[0])
            target = (layer + 1) % L
            loads = pred[target] if layer + 1 < L else true[target]  # wrap: this iteration's true counts
            want = plan_layers(loads[None].astype(float), G, S, previous=eng.plan(target))
            got_target, applied = eng.observe(layer, true[layer], pred[target] if layer + 1 < L else None, now=t)
            assert got_target == target and eng.plan(target) == want
            t += 1.0
    assert eng.stats.plans_made == 3 * L
    assert np.all(eng.plan(0).num_replicas() > E)  # the hot expert got replicas


def test_cold_starts_are_slots_whose_expert_changed():
    eng = Engine(1, E, G, 3, policy=lambda layer, loads, prev: plans.pop(0), keep_alive_s=float("inf"))
    a = static_plan(1, E, G, 3).phy2log[0]
    b = a.copy()
    b[[2, 5]] = [0, 1]  # two new replicas in free slots
    c = b.copy()
    c[[0, 1]] = c[[1, 0]]  # two experts swap slots
    from moeless.planner import Plan

    plans = [Plan.from_phy2log(x[None], E, G, 3) for x in (b, c)]
    eng.start(0.0)
    _, r1 = eng.observe(0, np.ones(E), None, now=1.0)
    _, r2 = eng.observe(0, np.ones(E), None, now=2.0)
    assert sorted(r1.cold[:, 1].tolist()) == [2, 5]
    assert sorted(r2.cold[:, 1].tolist()) == [0, 1]
    assert eng.stats.cold_starts == E + 4  # the initial placement, then 2 + 2


def test_gate_replica_counts_match_numpy_predictor():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    gates = rng.standard_normal((L, E, 16)).astype(np.float32)
    pred = GateReplicaPredictor(gates, top_k=2, distance=1)
    x = rng.standard_normal((37, 16)).astype(np.float32)
    ids = np.zeros((37, 2), dtype=np.int64)
    loads = GateReplicaLoads(pred)
    for layer in range(L - 1):
        want = pred.predict(layer, ids, x)
        got = loads.counts(layer, torch.from_numpy(x)).numpy()
        np.testing.assert_array_equal(got, want)
    assert loads.counts(L - 1, torch.from_numpy(x)) is None


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="policy"):
        Engine(L, E, G, policy="nope")
    with pytest.raises(ValueError, match="slots_per_gpu"):
        Engine(L, E, G, 1)
    eng = Engine(L, E, G)
    eng.start(0.0)
    with pytest.raises(ValueError, match="layer"):
        eng.plan(L)
    with pytest.raises(ValueError, match="counts"):
        eng.split(0, np.ones(E + 1))
    with pytest.raises(ValueError, match="counts"):
        eng.observe(0, -np.ones(E))
    with pytest.raises(ValueError, match="predictor"):
        GateReplicaLoads(object())


def test_hysteresis_keeps_a_plan_exactly_when_the_split_still_balances():
    from moeless.planner import Plan, gpu_loads

    S = default_slots_per_gpu(E, G)
    rng = np.random.default_rng(3)
    kept = 0
    for trial in range(30):
        slack, floor = float(rng.choice([0.0, 0.1, 0.3])), int(rng.choice([0, 20]))
        eng = Engine(2, E, G, policy="moeless", replan_slack=slack, replan_min_pairs=floor)
        eng.start(0.0)
        prev = eng.plan(1)
        if trial % 2:  # near-even loads: often kept
            loads = rng.integers(30, 40, size=E)
        else:  # skewed: mostly re-planned
            loads = rng.integers(0, 60, size=E) * (1 + 10 * (rng.random(E) < 0.2))
        per_gpu = gpu_loads(prev, serve_time_split(prev, loads[None]))[0]  # brute force of the rule
        keep = per_gpu.max() - per_gpu.mean() <= max(slack * per_gpu.mean(), floor)
        got = eng.observe(0, loads, loads, now=1.0)
        if loads.sum() == 0:
            continue
        assert (got is None) == keep, (trial, per_gpu, slack, floor)
        assert eng.stats.plans_kept == int(keep)
        kept += int(keep)
        if keep:
            assert eng.plan(1) == prev
    assert 5 <= kept <= 25  # both branches were exercised
    # replan=False only records: no plan, no pool change
    eng = Engine(2, E, G, policy="moeless")
    eng.start(0.0)
    hot = np.array([500, 1, 1, 1, 1, 1, 1, 1])
    assert eng.observe(0, hot, hot, now=1.0, replan=False) is None and eng.stats.plans_made == 0
    assert eng.observe(0, hot, hot, now=2.0) is not None and eng.stats.plans_made == 1
    with pytest.raises(ValueError, match="replan_slack"):
        Engine(L, E, G, replan_slack=-1.0)
    with pytest.raises(ValueError, match="replan_min_pairs"):
        Engine(L, E, G, replan_min_pairs=-1)


def test_split_without_exact_puts_each_expert_on_its_first_replica():
    eng = Engine(1, E, G, policy=lambda layer, loads, prev: plan, keep_alive_s=float("inf"))
    from moeless.planner import Plan

    S = default_slots_per_gpu(E, G)
    p2l = static_plan(1, E, G, S).phy2log[0].copy()
    p2l[p2l < 0] = [0, 0, 3, 5][: int((p2l < 0).sum())]
    plan = Plan.from_phy2log(p2l[None], E, G, S)
    eng.start(0.0)
    eng.observe(0, np.ones(E), None, now=1.0)
    counts = np.array([40, 0, 3, 9, 1, 7, 2, 5])
    rt = eng.split(0, counts, exact=False)
    np.testing.assert_array_equal(rt.sum(1), counts)
    np.testing.assert_array_equal(rt[:, 0], counts)
    np.testing.assert_array_equal(eng.split(0, counts), serve_time_split(plan, counts[None])[0])


def test_align_renumbers_slots_inside_gpus_only_and_never_costs_cold_starts():
    pool_mod = pytest.importorskip("moeless.pool")
    if not hasattr(pool_mod.FunctionPool, "align"):
        pytest.skip("this pool has no align()")
    rng = np.random.default_rng(5)
    S = default_slots_per_gpu(E, G)
    engines = {a: Engine(L, E, G, policy="moeless", keep_alive_s=float("inf"), align=a) for a in (False, True)}
    for eng in engines.values():
        eng.start(0.0)
    t = 1.0
    for it in range(4):
        true = rng.integers(0, 50, size=(L, E))
        true[:, rng.integers(0, E)] += 300
        for layer in range(L):
            plain, aligned = engines[False], engines[True]
            prev = aligned.plan((layer + 1) % L)
            want = plan_layers(true[(layer + 1) % L][None].astype(float), G, S, previous=prev)
            aligned.observe(layer, true[layer], true[(layer + 1) % L] if layer + 1 < L else None, now=t)
            plain.observe(layer, true[layer], true[(layer + 1) % L] if layer + 1 < L else None, now=t)
            got = aligned.plan((layer + 1) % L)
            if got != prev:  # re-planned: the planner's plan, slots permuted inside each GPU
                np.testing.assert_array_equal(np.sort(got.phy2log.reshape(G, S), 1),
                                              np.sort(want.phy2log.reshape(G, S), 1))
            t += 1.0
    assert engines[True].stats.cold_starts <= engines[False].stats.cold_starts
