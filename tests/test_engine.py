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
    decision d layers ahead covers, and the decisions d layers ahead run every iteration. (steady off: a steady
    decision is skipped before it reaches _decide, which this test counts.)"""
    eng = Engine(_moeless(), keep_alive_s=60.0, prepare_every=every, steady=False)
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


def _steady_reference(loads, ref_loads, live, ref_live, loaded, pinned, ref_flags, link_busy, scal, ref_scal,
                      life_range, tol, z):
    """engine._steady's rule written out in numpy (the second code path): the warm lives (scal [1:3]) inside
    life_range (point lo, hi, hedge lo, hi) where it is known, every other scalar within tol."""
    flags = loaded.astype(int) + 2 * ((live >= 0) & pinned)
    stat = float((((loads - ref_loads) ** 2) / (loads + ref_loads + 1.0)).sum())
    near = np.abs(scal - ref_scal) <= tol * np.abs(ref_scal)
    if not np.isnan(life_range).any():
        for i, (lo, hi) in ((1, life_range[:2]), (2, life_range[2:])):
            near[i] = scal[i] == ref_scal[i] or lo < scal[i] < hi
    return bool((live == ref_live).all() and (flags == ref_flags).all() and not link_busy and near.all()
                and stat <= len(loads) + z * np.sqrt(2.0 * len(loads)))


def test_steady_rule_matches_numpy():
    """The compiled test of whether a decision's inputs moved beyond their noise (engine._steady) against the rule
    written in numpy, on random inputs near the boundary of each of its conditions."""
    from moeless.engine import _steady, _steady_record
    rng = np.random.default_rng(11)
    Ls, P, Gs, K = 3, 6, 3, 3
    agree = {True: 0, False: 0}
    for trial in range(600):
        k, l = int(rng.integers(K)), int(rng.integers(Ls))
        live = rng.integers(-1, 5, (Ls, P))
        ready = rng.uniform(0, 2, (Ls, P))
        last_use = rng.uniform(0, 2, (Ls, P))
        model_t, since = 1.0, 1.0
        ref_loads, ref_live = np.zeros((K, Ls, E)), np.full((K, Ls, P), -2)
        ref_flags, ref_scal = np.zeros((K, Ls, P), dtype=np.int64), np.zeros((K, Ls, 8))
        base = rng.uniform(0, 500, E).round()
        scal0 = rng.uniform(0.5, 2.0, 4)
        life_range = np.full(4, np.nan)  # (not known: the lives within tol)
        if trial % 2:  # known: each life's range around it, up to 60% either way
            life_range = np.repeat(scal0[1:3], 2) * (1 + np.tile([-1, 1], 2) * rng.uniform(0, 0.6, 4))
        _steady_record(base, k, l, ref_loads, live, ref_live, ready, last_use, model_t, since, ref_flags, scal0,
                       ref_scal, life_range)
        loads = np.maximum(0.0, base + rng.normal(0, rng.choice([1.0, 20.0, 60.0]), E).round())
        scal = scal0 * (1 + rng.choice([0.0, 0.05, -0.08, 0.3]))
        if rng.random() < 0.5:  # the lives alone move, each its own way
            scal = scal0.copy()
            scal[1:3] *= 1 + rng.choice([0.0, 0.05, -0.08, 0.3, -0.4, 0.5], 2)
        live2, ready2, last2 = live.copy(), ready.copy(), last_use.copy()
        what = rng.integers(5)
        if what == 1:
            live2[l, rng.integers(P)] += 1
        elif what == 2:
            ready2[l, rng.integers(P)] += 1.5
        elif what == 3:
            last2[l] = rng.uniform(0, 2, P)
        link_free = rng.uniform(0, 1.0 if what != 4 else 2.0, Gs)
        got = _steady(loads, k, l, ref_loads, live2, ref_live, ready2, last2, model_t, since, ref_flags, link_free,
                      scal, ref_scal, 0.1, 3.0)
        want = _steady_reference(loads, ref_loads[k, l], live2[l], ref_live[k, l], ready2[l] <= model_t,
                                 last2[l] >= since, ref_flags[k, l], (link_free > model_t).any(), scal,
                                 ref_scal[k, l, :4], life_range, 0.1, 3.0)
        assert got == want, trial
        agree[want] += 1
    assert min(agree.values()) > 50  # both outcomes exercised


def _spied(eng, monkeypatch):
    """Count the decisions the engine asks its policy for."""
    asked = []
    inner = eng.policy.decide_live
    monkeypatch.setattr(eng.policy, "decide_live", lambda layer, *a, **kw: (asked.append(layer),
                                                                            inner(layer, *a, **kw))[1])
    return asked


def test_steady_asks_the_policy_again_only_when_an_input_moved(monkeypatch):
    """Engine(steady=True), the default: once a layer's decisions keep its plan under stable popularity, the
    policy is mostly not asked again while the loads stay within their sampling noise and the live instances, copies,
    look-ahead and warm lives stay as they were; a shift of popularity, or a release of an instance, asks again.
    With steady=False every decision is asked."""
    rng = np.random.default_rng(2)
    pop = np.full(E, 1.0)
    pop[3] = 8.0
    pop /= pop.sum()
    runs = {}
    for steady in (False, True):
        eng = Engine(_moeless(), keep_alive_s=float("inf"), steady=steady)
        eng.start(0.0)
        asked = _spied(eng, monkeypatch)
        per_it = []
        for it in range(40):
            loads = np.stack([rng.multinomial(4000, pop) for _ in range(L)])
            n = len(asked)
            _drive(eng, loads, t0=it * 0.1, predictions=loads)
            per_it.append(len(asked) - n)
        runs[steady] = per_it
        if steady:
            # settled: at most one decision in ten is asked (noise beyond z = 3, a warm life past its decision's range)
            assert sum(per_it[-10:]) <= 0.1 * 10 * (2 * L - 1)
            # popularity moves: expert 6 becomes the hot one; every layer is asked again
            pop2 = np.full(E, 1.0)
            pop2[6] = 8.0
            loads = np.stack([rng.multinomial(4000, pop2 / pop2.sum()) for _ in range(L)])
            n = len(asked)
            _drive(eng, loads, t0=4.0, predictions=loads)
            assert sorted(set(asked[n:])) == list(range(L))
    assert all(n == 2 * L - 1 for n in runs[False])  # L - 1 decisions d ahead, L for the next iteration


def test_steady_asks_again_when_the_live_instances_change(monkeypatch):
    """A layer whose live instances changed (here an instance prewarmed into a free slot, as a release or an
    eviction would empty one) is asked again by both of its decisions, with the loads unchanged."""
    eng = Engine(_moeless(), keep_alive_s=float("inf"))
    eng.start(0.0)
    loads = np.full((L, E), 200)
    loads[:, 3] = 6000
    for it in range(120):  # (until the warm lives reach their cap: they grow while no instance ends)
        _drive(eng, loads, t0=it * 0.01, predictions=loads)
    asked = _spied(eng, monkeypatch)
    _drive(eng, loads, t0=1.20, predictions=loads)
    assert asked == []
    free = np.flatnonzero(eng.pool.expert[2] < 0)
    assert len(free)
    eng.pool.prewarm(2, int(free[0]), 5, 1.205)
    _drive(eng, loads, t0=1.21, predictions=loads)
    assert asked.count(2) == 2  # d layers ahead (from layer 1) and for the next iteration


def test_the_bound_never_skips():
    """The lossless bound (free moves, fed the true loads) decides every time: it stays a bound."""
    bound = _moeless(free_moves=True)
    assert not Engine(bound).steady
    assert Engine(_moeless()).steady and not Engine(_moeless(), steady=False).steady


@pytest.mark.parametrize("distance,prepare_every,refresh_every", [(1, 1, 4), (2, 3, 1)])
def test_prepare_settled_by_observes_pass_as_on_its_own(distance, prepare_every, refresh_every):
    """observe's compiled pass also checks whether prepare(layer, now), called next, will find its decision steady;
    prepare then only skips it (Engine._early). Against a twin engine whose prepare always checks on its own (the
    early verdict dropped before each call), over popularity that holds and shifts, batches of several sizes,
    releases (a keep-alive shorter than some gaps), iterations that do not replan, and calls in between that move
    the state prepare reads (a second split, a decision of another layer, another `now`): the same decisions,
    plans, statistics, bill and pool."""
    rng = np.random.default_rng(distance)
    engines = [Engine(_moeless(), distance=distance, keep_alive_s=0.5, prepare_every=prepare_every,
                      refresh_every=refresh_every) for _ in range(2)]
    for eng in engines:
        eng.start(0.0)
    early = 0
    pop = rng.dirichlet(np.full(E, 0.3))
    t = 0.0
    for it in range(200):
        if rng.random() < 0.05:
            pop = rng.dirichlet(np.full(E, 0.3))
        tokens = int(rng.choice([64, 64, 64, 512]))
        loads = np.stack([rng.multinomial(2 * tokens, pop) for _ in range(L)])
        replan = bool(rng.random() > 0.05)
        t += 0.8 if rng.random() < 0.1 else 0.01
        between, what = int(rng.integers(0, 2 * L)), int(rng.integers(0, 3))
        results = []
        for i, eng in enumerate(engines):
            out = []
            eng.begin_iteration(float(tokens))
            for layer in range(L):
                now = t + 0.001 * layer
                eng.split(layer, loads[layer])
                pred = loads[layer + distance] if layer + distance < L else None
                out.append(eng.observe(layer, loads[layer], pred, now, replan=replan))
                if layer == between and what == 0:
                    eng.split(layer, loads[layer])
                elif layer == between and what == 1:
                    out.append(eng.decide((layer + 1) % L, loads[(layer + 1) % L].astype(float), now))
                elif layer == between:
                    now += 1e-4
                if i == 0:
                    early += eng._early is not None
                else:
                    eng._early = None
                out.append(eng.prepare(layer, now))
            eng.end_iteration(now)
            results.append([None if r is None else (r[0], r[1].cold.tolist(), r[1].warm.tolist()) for r in out])
        assert results[0] == results[1], it
    a, b = engines
    assert early > 100  # (the early verdict served)
    assert a.stats.plans_skipped > 100 and a.stats.plans_made > 10 and a.pool.meter.releases > 0
    for name in ("plans_made", "plans_kept", "plans_skipped", "cold_starts", "warm_starts"):
        assert getattr(a.stats, name) == getattr(b.stats, name), name
    assert [(t, l, p.tolist()) for t, l, p in a.applied] == [(t, l, p.tolist()) for t, l, p in b.applied]
    assert a.pool.meter == b.pool.meter and a.model_t == b.model_t
    np.testing.assert_array_equal(a.pool.expert, b.pool.expert)


@pytest.mark.parametrize("between", ["prewarm", "split"])
def test_a_change_between_observe_and_prepare_makes_prepare_check_again(monkeypatch, between):
    """Once observe's pass found prepare's decision steady, a change in between (an instance prewarmed into the
    layer's free slot: the pool; a far heavier split of the layer: the look-ahead's mean layer time) has prepare
    ask the policy again, as it would without observe's verdict."""
    eng = Engine(_moeless(), keep_alive_s=float("inf"))
    eng.start(0.0)
    loads = np.full((L, E), 200)
    loads[:, 3] = 6000
    for it in range(120):  # (settled, as in the test above)
        _drive(eng, loads, t0=it * 0.01, predictions=loads)
    asked = _spied(eng, monkeypatch)
    now = 1.2
    eng.begin_iteration(float(loads[0].sum()) / 2)
    for layer in range(3):
        eng.split(layer, loads[layer])
        eng.observe(layer, loads[layer], loads[layer + 1], now)
        if layer < 2:
            eng.prepare(layer, now)
    assert eng._early is not None and asked == []  # (observe's verdict for prepare(2))
    if between == "prewarm":
        free = np.flatnonzero(eng.pool.expert[2] < 0)
        eng.pool.prewarm(2, int(free[0]), 5, now)
    else:
        eng.split(2, loads[2] * 50)
    eng.prepare(2, now)
    assert asked == [2]


def test_compiled_steps_see_the_engines_arrays():
    """observe's and prepare's compiled steps cut their views of the engine's two flat arrays (engine._state) as
    the engine laid them out (engine._pack): each the same memory and shape as the engine's attribute."""
    from moeless.engine import _SECTIONS, _state

    eng = Engine(_moeless(), distance=2)
    views = _state(eng._fs, eng._is)
    assert len(views) == len(_SECTIONS)
    for name, view in zip(_SECTIONS, views):
        mine = getattr(eng, name)
        assert view.shape == mine.shape and view.dtype == mine.dtype, name
        assert view.__array_interface__["data"][0] == mine.__array_interface__["data"][0], name
