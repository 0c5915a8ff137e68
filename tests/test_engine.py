"""moeless.engine: the engine drives a policy layer by layer (d ahead, prewarm for the next iteration, EPLB's
rebuild at the iteration's end), realises its plans in the pool with warm identity, and is deterministic."""
from __future__ import annotations

import numpy as np
import pytest

from moeless.costmodel import RooflineCost
from moeless.engine import Engine, GateReplicaLoads, default_slots_per_gpu
from moeless.policy import EPLBPolicy, StaticEPPolicy, make_policy
from moeless.predictors import GateReplicaPredictor
from moeless.specs import hardware_spec, model_spec

L, E, G = 4, 8, 4
COST = RooflineCost(model_spec("mixtral-8x7b"), hardware_spec("a6000"))


def _moeless(S=3, **kw):
    return make_policy("moeless", num_layers=L, num_experts=E, gpus=G, slots_per_gpu=S, cost=COST, **kw)


def _drive(eng, loads, t0=0.0, predictions=None):
    """One iteration through the engine protocol; returns the (layer, phy2log) decided, in order."""
    decided = []
    eng.begin_iteration(float(loads[0].sum()) / 2, prefill=False)
    for layer in range(L):
        eng.split(layer, loads[layer])
        pred = None if predictions is None or layer + 1 >= L else predictions[layer + 1]
        r = eng.observe(layer, loads[layer], pred, t0)
        if r is not None:
            decided.append((r[0], eng.plan(r[0]).phy2log[0].tolist()))
        r = eng.prepare(layer, t0)
        if r is not None:
            decided.append((r[0], eng.plan(r[0]).phy2log[0].tolist()))
    eng.end_iteration(t0)
    return decided


def test_static_ep_never_changes_and_splits_by_counts():
    pol = StaticEPPolicy(L, E, G, 2, COST)
    eng = Engine(pol)
    eng.start(0.0)
    rng = np.random.default_rng(0)
    for _ in range(3):
        loads = rng.integers(0, 100, (L, E))
        assert _drive(eng, loads) == []
    assert all(eng.plan(l) == pol.homes[l] for l in range(L))
    counts = np.arange(E)
    np.testing.assert_array_equal(eng.split(0, counts)[:, 0], counts)


def test_moeless_replicates_a_hot_expert_and_then_keeps_its_plan():
    """Skewed, stable loads: replicas are created once (prepared, hidden copies), then the plans stay: no churn.
    (Every layer weighs its robust alternatives once per refresh_every = 4 iterations, the first time with its
    recent loads as scenarios within the first 4 + L iterations; from then on nothing changes.)"""
    eng = Engine(_moeless(), keep_alive_s=60.0)
    eng.start(0.0)
    loads = np.full((L, E), 200)
    loads[:, 3] = 6000
    cold = []
    for it in range(24):
        _drive(eng, loads, t0=it * 0.1, predictions=loads)
        cold.append(eng.stats.cold_starts)
    assert cold[0] > L * E  # replicas of the hot expert on top of the homes
    assert cold[-1] == cold[4 + L]  # stable popularity: no copies after the first refresh of every layer
    plan = eng.plan(0)
    assert plan.logcnt[0, 3] > 1 and (plan.logcnt[0] >= 1).all()
    # lossless split of the hot expert over its replicas
    rt = eng.split(0, loads[0])
    np.testing.assert_array_equal(rt.sum(1), loads[0])


def test_decisions_are_deterministic_and_clock_free():
    """With infinite keep-alive the decisions depend on the counts and predictions only (model time), not on the
    clock passed as `now`: the serving loop and the simulator reach the same plans."""
    rng = np.random.default_rng(3)
    seq = [rng.integers(0, 3000, (L, E)) for _ in range(6)]
    preds = [s + rng.integers(0, 300, (L, E)) for s in seq]
    runs = []
    for scale in (1.0, 37.0):
        eng = Engine(_moeless(), keep_alive_s=float("inf"))
        eng.start(0.0)
        decided = []
        for it in range(6):
            decided += _drive(eng, seq[it], t0=it * scale, predictions=preds[it])
        runs.append(decided)
    assert runs[0] == runs[1] and len(runs[0]) > 0


def test_eplb_rebuilds_at_its_cadence_from_its_window():
    pol = EPLBPolicy(L, E, G, 3, COST, window=2, interval=3, unit="iterations")
    eng = Engine(pol)
    eng.start(0.0)
    rng = np.random.default_rng(1)
    seq = [rng.integers(0, 100, (L, E)) for _ in range(7)]
    for it, loads in enumerate(seq):
        _drive(eng, loads)
        if it == 2:  # the third iteration ends: a rebuild from the last two
            from moeless.baselines import rebalance_experts

            want = rebalance_experts((seq[1] + seq[2]).astype(float), G * 3, G)
            assert eng.plan(0) == want[0] and eng.stats.rebuilds == 1
    assert eng.stats.rebuilds == 2  # after iterations 3 and 6


def test_cold_starts_copy_only_experts_new_to_a_gpu():
    eng = Engine(_moeless(), keep_alive_s=float("inf"))
    eng.start(0.0)
    loads = np.full((L, E), 100)
    loads[:, 0] = 9000
    for it in range(3):
        _drive(eng, loads, t0=float(it))
    # every instance the pool holds is (layer, GPU, expert) unique, and each GPU's plan lives in its slots
    for layer in range(L):
        p2l = eng.plan(layer).phy2log[0].reshape(G, 3)
        for g in range(G):
            held = [e for e in p2l[g] if e >= 0]
            assert len(held) == len(set(held))
        live = eng.pool.expert[layer]
        planned = eng.plan(layer).phy2log[0]
        assert ((planned < 0) | (live == planned)).all()


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
        Engine("moeless")
    with pytest.raises(ValueError, match="slots_per_gpu"):
        make_policy("moeless", num_layers=L, num_experts=E, gpus=G, slots_per_gpu=1, cost=COST)
    with pytest.raises(ValueError, match="cost"):
        make_policy("moeless", num_layers=L, num_experts=E, gpus=G, slots_per_gpu=3)
    with pytest.raises(ValueError, match="policy"):
        make_policy("nope", num_layers=L, num_experts=E, gpus=G, slots_per_gpu=3)
    eng = Engine(_moeless())
    eng.start(0.0)
    with pytest.raises(ValueError, match="layer"):
        eng.plan(L)
    with pytest.raises(ValueError, match="counts"):
        eng.split(0, np.ones(E + 1))
    with pytest.raises(ValueError, match="counts"):
        eng.observe(0, -np.ones(E))
    with pytest.raises(ValueError, match="predicted"):
        eng.observe(0, np.ones(E), np.full(E, np.nan))
    with pytest.raises(ValueError, match="tokens"):
        eng.begin_iteration(-1)
    with pytest.raises(ValueError, match="predictor"):
        GateReplicaLoads(object())
    assert default_slots_per_gpu(E, G) == 3


def test_wants_plan_only_for_serverless_policies_and_real_batches():
    assert Engine(_moeless()).wants_plan(5, 2)
    assert not Engine(_moeless()).wants_plan(0, 2)
    assert not Engine(StaticEPPolicy(L, E, G, 2)).wants_plan(5, 2)


@pytest.mark.parametrize("every", [1, 3])
def test_prepare_every_skips_the_decisions_well_ahead_but_not_the_first_layers(every, monkeypatch):
    """prepare decides a layer once every `prepare_every` iterations (staggered); the first d layers, which no
    decision d layers ahead covers, and the decisions d layers ahead run every iteration."""
    eng = Engine(_moeless(), keep_alive_s=60.0, prepare_every=every)
    eng.start(0.0)
    calls = []
    inner = eng._decide
    monkeypatch.setattr(eng, "_decide", lambda target, loads, now, ahead, **kw: (
        calls.append((target, ahead)), inner(target, loads, now, ahead, **kw))[1])
    rng = np.random.default_rng(5)
    iterations = 6
    for it in range(iterations):
        loads = rng.integers(0, 3000, (L, E))
        _drive(eng, loads, t0=it * 0.1, predictions=loads)
    well_ahead = [t for t, ahead in calls if ahead == L - 1]  # prepare's (d = 1)
    d_ahead = [t for t, ahead in calls if ahead == 1]
    for layer in range(L):
        want = iterations if layer == 0 or every == 1 else iterations // every
        assert well_ahead.count(layer) == want
    assert sorted(set(d_ahead)) == list(range(1, L)) and len(d_ahead) == iterations * (L - 1)
    with pytest.raises(ValueError, match="prepare_every"):
        Engine(_moeless(), prepare_every=0)


@pytest.mark.parametrize("dtype", [np.int64, np.float64, np.int32, np.float32, np.uint8])
def test_counts_are_checked_like_numpy_says(dtype):
    """Every call's counts are checked (one compiled pass for int64 / float64, numpy for the other dtypes): the
    engine accepts exactly what a plain numpy reference calls finite, non-negative (and whole where counts
    must be), and its errors name the argument."""
    rng = np.random.default_rng(3)
    specials = [0.0, 1.0, 7.0, 2.5, -1.0, np.nan, np.inf, -np.inf]
    for _ in range(60):
        c = rng.choice(specials, size=E, p=[0.3, 0.3, 0.25, 0.05, 0.03, 0.03, 0.02, 0.02])
        if np.dtype(dtype).kind in "iu":
            c = np.where(np.isfinite(c), np.abs(np.round(c)) * np.sign(c), 0).astype(dtype)
        else:
            c = c.astype(dtype)
        cf = c.astype(np.float64)
        ok = bool(np.all(np.isfinite(cf)) and np.all(cf >= 0))
        whole = ok and bool(np.all(cf == np.round(cf)))
        eng = Engine(_moeless(), keep_alive_s=60.0)
        eng.start(0.0)
        eng.begin_iteration(8.0)
        if whole:
            np.testing.assert_array_equal(eng.split(0, c).sum(1), cf.astype(np.int64))
        else:
            with pytest.raises(ValueError, match="integer counts" if ok else "finite non-negative counts"):
                eng.split(0, c)
        good = np.full(E, 2, dtype=np.int64)
        before = (eng._last_counts.copy(), eng._n_recent.copy(), eng._share.copy())
        if ok:
            eng.observe(0, good, c, 0.0)  # predicted counts may be fractional
        else:
            with pytest.raises(ValueError, match="predicted must be finite non-negative"):
                eng.observe(0, good, c, 0.0)
        if not whole:  # observe's own counts: the same check, and a rejected call changes nothing
            state = (eng._last_counts.copy(), eng._n_recent.copy(), eng._share.copy())
            with pytest.raises(ValueError, match="counts must hold integer counts" if ok
                               else "counts must be finite non-negative counts"):
                eng.observe(0, c, good, 0.0)
            for a, b in zip(state, (eng._last_counts, eng._n_recent, eng._share)):
                np.testing.assert_array_equal(a, b)
        if not ok:  # a rejected prediction left the layer's state as it was
            for a, b in zip(before, (eng._last_counts, eng._n_recent, eng._share)):
                np.testing.assert_array_equal(a, b)


def test_horizon_is_the_censored_mean_life_of_the_instances_it_made():
    """Engine.horizon against a brute-force record of every instance the engine cold-started (from the decisions'
    ApplyResults and the pool's slots), each of the kind the policy said its decision was (Policy.hedged):
    iterations in which the live ones served pairs (from each split's replica tokens), how many of them ended
    (released after their keep-alive, or replaced), and per kind the maximum-likelihood mean life
    (uses + prior) / (ended + 1), capped. Popularity moves every few iterations and the keep-alive is short, so
    instances end while others live on."""
    rng = np.random.default_rng(7)
    eng = Engine(_moeless(), keep_alive_s=0.5)
    eng.start(0.0)
    records = []  # [layer, slot, expert, ended, hedge]
    uses = [0.0, 0.0]
    t = 0.0
    ended_seen = [0, 0]
    for it in range(40):
        if it % 5 == 0:
            hot = rng.choice(E, size=2, replace=False)
        loads = rng.integers(20, 200, (L, E))
        loads[:, hot] *= 30
        eng.begin_iteration(float(loads[0].sum()) / 2)
        for layer in range(L):
            plan = eng.plan(layer)
            rt = eng.split(layer, loads[layer])
            used = {int(plan.log2phy[0][e, r]) for e in range(E) for r in range(rt.shape[1])
                    if rt[e, r] > 0 and plan.log2phy[0][e, r] >= 0}
            for rec in records:
                if not rec[3] and rec[0] == layer and rec[1] in used:
                    uses[rec[4]] += 1
            for call in (lambda: eng.observe(layer, loads[layer], None, t), lambda: eng.prepare(layer, t)):
                res = call()
                for rec in records:  # releases (at the decision's pool advance) and replacements end a life
                    if not rec[3] and eng.pool.expert[rec[0], rec[1]] != rec[2]:
                        rec[3] = True
                if res is not None:
                    for layer_c, slot in res[1].cold:
                        for rec in records:
                            if not rec[3] and (rec[0], rec[1]) == (layer_c, slot):
                                rec[3] = True
                        records.append([int(layer_c), int(slot), int(eng.pool.expert[layer_c, slot]), False,
                                        int(eng.policy.hedged)])
                prior = eng._keep_iterations()
                for kind in (0, 1):
                    ended = sum(rec[3] for rec in records if rec[4] == kind)
                    want = max(1.0, min(Engine.MAX_LIFE, (uses[kind] + prior) / (ended + 1)))
                    assert eng.horizon(hedges=bool(kind)) == pytest.approx(want, rel=1e-12)
                    ended_seen[kind] = max(ended_seen[kind], ended)
        eng.end_iteration(t)
        t += 0.2
    for kind in (0, 1):  # (of either kind, lives ended while others were live)
        assert sum(rec[4] == kind for rec in records) > ended_seen[kind] > 0 and uses[kind] > 0
