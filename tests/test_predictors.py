"""Load predictors on generated routing whose truth is known (planted transitions, deterministic maps,
stationary loads), the gate replica on a tiny Hugging Face model, persistence, metrics, and the evaluator
against a second path through the planner."""
import numpy as np
import pytest

from moeless import planner
from moeless.prediction_eval import evaluate, evaluate_saved, fit_predictors, format_table, held_out_splits
from moeless.predictors import (
    AffinityPredictor,
    GateReplicaPredictor,
    HistoryPredictor,
    OraclePredictor,
    RegressionPredictor,
    load_predictor,
    load_predictors,
    make_predictor,
    pearson,
    relative_l1,
    save_predictors,
    topk_recall,
)
from moeless.traces import RoutingTrace, capture_routing, expert_loads, write_npz


def random_sets(rng, N, K, E, p=None):
    """[N, K] distinct experts per token, drawn without replacement with probabilities p."""
    if p is None:
        return np.argsort(rng.random((N, E)), axis=1)[:, :K]
    keys = np.log(rng.random((N, E))) / p  # Efraimidis-Spirakis weighted sampling without replacement
    return np.argsort(-keys, axis=1)[:, :K]


def permuted_trace(rng, N, K, E, L, perms, p=None):
    """Layer 0 random (expert probabilities p); layer l+1 = perms[l] applied to layer l's experts."""
    ids = [random_sets(rng, N, K, E, p)]
    for l in range(L - 1):
        ids.append(perms[l][ids[-1]])
    return RoutingTrace(topk_ids=np.stack(ids), num_experts=E)


# ---- metrics ------------------------------------------------------------------------------------------------
def test_metrics_against_definitions():
    assert topk_recall([[0, 1], [2, 3]], [[1, 0], [2, 5]]) == 0.75
    rng = np.random.default_rng(0)
    a, b = rng.random(9), rng.random(9)
    assert pearson(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1])
    assert np.isnan(pearson(np.ones(4), a[:4]))
    assert relative_l1([1.0, 3.0], [2.0, 2.0]) == 0.5
    with pytest.raises(ValueError, match="same shape"):
        relative_l1([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="positive total"):
        relative_l1([1.0], [0.0])
    with pytest.raises(ValueError, match="same T"):
        topk_recall([[0]], [[0], [1]])


# ---- affinity -----------------------------------------------------------------------------------------------
def test_affinity_recovers_a_planted_transition_matrix():
    rng = np.random.default_rng(1)
    E, N = 5, 20000
    planted = rng.dirichlet(np.ones(E) * 0.7, size=E)  # P(b at l+1 | a at l), top-1 routing
    src = rng.integers(0, E, N)
    dst = (rng.random(N)[:, None] > np.cumsum(planted[src], 1)).sum(1)
    tr = RoutingTrace(topk_ids=np.stack([src, dst])[:, :, None], num_experts=E)
    aff = AffinityPredictor(smoothing=0.0).fit(tr)
    np.testing.assert_allclose(aff.transition(0), planted, atol=0.04)
    # predicted load = sum over tokens of their source expert's row
    ids = rng.integers(0, E, (50, 1))
    np.testing.assert_allclose(aff.predict(0, ids), expert_loads(ids, E) @ aff.transition(0))


def test_affinity_rows_sum_to_k_and_load_to_t_times_k():
    rng = np.random.default_rng(2)
    tr = permuted_trace(rng, 300, 3, 8, 3, [rng.permutation(8) for _ in range(2)])
    aff = AffinityPredictor(smoothing=2.0).fit(tr)
    np.testing.assert_allclose(aff.transition(1).sum(1), 3.0)
    assert aff.predict(1, tr.topk_ids[1, :17]).sum() == pytest.approx(17 * 3)
    # top-1: a permutation is recovered exactly, per token and in load
    tr1 = permuted_trace(rng, 300, 1, 8, 2, [rng.permutation(8)])
    aff1 = AffinityPredictor(smoothing=0.0).fit(tr1)
    np.testing.assert_array_equal(aff1.predict_topk(0, tr1.topk_ids[0]), tr1.topk_ids[1])


def test_affinity_online_decay_tracks_a_task_shift():
    rng = np.random.default_rng(3)
    E, K = 8, 1
    p = np.array([0.4, 0.2, 0.12, 0.1, 0.08, 0.05, 0.03, 0.02])  # skewed, so the two maps' loads differ
    before = permuted_trace(rng, 2000, K, E, 2, [rng.permutation(E)], p)
    after = permuted_trace(rng, 4000, K, E, 2, [rng.permutation(E)], p)

    def error_after_stream(half_life):
        aff = AffinityPredictor(half_life_tokens=half_life, smoothing=0.0).fit(before)
        for b in after.batches(100):
            aff.begin_batch()
            for l in range(2):
                aff.update(l, b.topk_ids[l])
        test = after.topk_ids[:, :200]
        return relative_l1(aff.predict(0, test[0]), expert_loads(test[1], E))

    assert error_after_stream(250.0) < 0.01  # 16 half-lives: the old map weighs 2^-16
    assert error_after_stream(None) > 0.2  # without decay a third of the counts are still the old map


# ---- history ------------------------------------------------------------------------------------------------
def test_history_converges_on_stationary_loads_and_follows_its_formula():
    rng = np.random.default_rng(4)
    E, K, L = 6, 2, 2
    p = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    skewed = RoutingTrace(topk_ids=np.stack([np.tile([[0, 1]], (50, 1))] * L), num_experts=E)
    hist = HistoryPredictor(half_life_tokens=1000).fit(skewed)
    stream = RoutingTrace(topk_ids=np.stack([random_sets(rng, 20000, K, E, p) for _ in range(L)]), num_experts=E)
    for b in stream.batches(200):
        hist.begin_batch()
        before = hist.share[1].copy()
        hist.update(1, b.topk_ids[1])
        w = 0.5 ** (200 / 1000)
        np.testing.assert_allclose(hist.share[1], w * before + (1 - w) * b.loads[1] / (200 * K))
    truth = stream.loads()[1] / stream.loads()[1].sum()
    pred = hist.predict(0, stream.topk_ids[0, :100])
    assert pred.sum() == pytest.approx(100 * K)
    assert relative_l1(pred / (100 * K), truth) < 0.1


# ---- regression ---------------------------------------------------------------------------------------------
def test_regression_learns_a_linear_map_exactly():
    rng = np.random.default_rng(5)
    E, K = 8, 2
    perms = [rng.permutation(E) for _ in range(3)]
    tr = permuted_trace(rng, 1500, K, E, 4, perms)
    reg = RegressionPredictor(lags=1, ridge=1e-3).fit(tr.select_tokens(slice(0, 1000)))
    test = tr.select_tokens(slice(1000, None))
    for l in range(3):
        assert topk_recall(reg.predict_topk(l, test.topk_ids[l]), test.topk_ids[l + 1]) == 1.0
        assert relative_l1(reg.predict(l, test.topk_ids[l]), test.loads()[l + 1]) < 1e-3


def test_regression_uses_earlier_layers_of_the_batch():
    """Layer 2 is a function of layer 0, and layer 1 is independent noise: only lags >= 2 can predict it."""
    rng = np.random.default_rng(6)
    E, K, N = 8, 2, 3000
    l0 = random_sets(rng, N, K, E)
    l1 = random_sets(rng, N, K, E)
    tr = RoutingTrace(topk_ids=np.stack([l0, l1, rng.permutation(E)[l0]]), num_experts=E)
    fit, test = tr.select_tokens(slice(0, 2500)), tr.select_tokens(slice(2500, 2516))  # a 16-token batch
    one = RegressionPredictor(lags=1, ridge=1e-3).fit(fit)
    two = RegressionPredictor(lags=2, ridge=1e-3).fit(fit)
    true = test.loads()[2]
    two.begin_batch()
    two.predict(0, test.topk_ids[0])  # layer 0 of this batch, remembered as context
    assert relative_l1(two.predict(1, test.topk_ids[1]), true) < 1e-3
    assert topk_recall(two.predict_topk(1, test.topk_ids[1]), test.topk_ids[2]) == 1.0
    # lags=1 sees only the noise layer: it predicts the marginal, wrong on a small batch and per token
    assert relative_l1(one.predict(1, test.topk_ids[1]), true) > 0.2
    assert topk_recall(one.predict_topk(1, test.topk_ids[1]), test.topk_ids[2]) < 0.6
    two.begin_batch()  # a new batch: layer 0 unseen, so it falls back to the lag-1 sub-model
    np.testing.assert_allclose(two.predict(1, test.topk_ids[1]), one.predict(1, test.topk_ids[1]), rtol=1e-6,
                               atol=1e-6)


def test_regression_online_refit_follows_a_shift():
    rng = np.random.default_rng(7)
    E, K = 8, 2
    p = np.array([0.4, 0.2, 0.12, 0.1, 0.08, 0.05, 0.03, 0.02])
    before = permuted_trace(rng, 1500, K, E, 2, [rng.permutation(E)], p)
    after = permuted_trace(rng, 3000, K, E, 2, [rng.permutation(E)], p)
    reg = RegressionPredictor(lags=1, ridge=1e-3, half_life_tokens=300).fit(before)
    test = after.topk_ids[:, -300:]
    assert relative_l1(reg.predict(0, test[0]), expert_loads(test[1], E)) > 0.3
    for b in after.batches(100):
        reg.begin_batch()
        for l in range(2):
            reg.update(l, b.topk_ids[l])
    assert relative_l1(reg.predict(0, test[0]), expert_loads(test[1], E)) < 0.01


# ---- oracle, persistence, bad input -------------------------------------------------------------------------
def test_oracle_returns_the_truth_and_needs_the_batch():
    rng = np.random.default_rng(8)
    tr = permuted_trace(rng, 64, 2, 8, 3, [rng.permutation(8)] * 2)
    orc = OraclePredictor(distance=2).fit(tr)
    b = next(tr.batches(32))
    orc.begin_batch(b)
    np.testing.assert_array_equal(orc.predict(0, b.topk_ids[0]), b.loads[2])
    with pytest.raises(ValueError, match="TraceBatch"):
        orc.begin_batch(None)


@pytest.mark.parametrize("name", ["history", "affinity", "regression", "oracle"])
def test_save_and_load_give_the_same_predictions(tmp_path, name):
    rng = np.random.default_rng(9)
    tr = permuted_trace(rng, 200, 2, 8, 3, [rng.permutation(8) for _ in range(2)])
    pred = make_predictor(name, 1).fit(tr)
    path = pred.save(str(tmp_path / "p"))
    back = load_predictor(path)
    b = next(tr.batches(50))
    for p in (pred, back):
        p.begin_batch(b)
    for l in range(2):
        np.testing.assert_allclose(back.predict(l, b.topk_ids[l]), pred.predict(l, b.topk_ids[l]))
    both = load_predictors(save_predictors({"x": pred, "y": make_predictor("history").fit(tr)}, str(tmp_path / "b")))
    assert sorted(both) == ["x", "y"]
    with pytest.raises(ValueError, match="holds 2 predictors"):
        load_predictor(str(tmp_path / "b.npz"))


def test_bad_inputs_are_rejected_with_the_argument_named(tmp_path):
    rng = np.random.default_rng(10)
    tr = permuted_trace(rng, 40, 2, 6, 3, [rng.permutation(6)] * 2)
    with pytest.raises(ValueError, match="distance"):
        AffinityPredictor(distance=0)
    with pytest.raises(ValueError, match="not fitted"):
        HistoryPredictor().predict(0, tr.topk_ids[0])
    aff = AffinityPredictor().fit(tr)
    with pytest.raises(ValueError, match=r"layer must be an integer in \[0, 2\)"):
        aff.predict(2, tr.topk_ids[2])
    with pytest.raises(ValueError, match="topk_ids must be int"):
        aff.predict(0, tr.topk_ids[0, :, :1])
    with pytest.raises(ValueError, match="topk_ids must lie"):
        aff.predict(0, tr.topk_ids[0] + 6)
    with pytest.raises(ValueError, match="distance=2 needs more"):
        AffinityPredictor(distance=2).fit(RoutingTrace(topk_ids=tr.topk_ids[:2], num_experts=6))
    with pytest.raises(ValueError, match="name must be one of"):
        make_predictor("crystal-ball")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.npz"):
        load_predictor(str(tmp_path / "junk.npz"))
    with pytest.raises(ValueError, match="gate_inputs"):
        GateReplicaPredictor(np.zeros((3, 6, 4)), top_k=2).fit(tr)


# ---- gate replica on a tiny Hugging Face model ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_mixtral_traces():
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=16, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    g = torch.Generator().manual_seed(1)
    fit = capture_routing(model, [torch.randint(0, 128, (16, 48), generator=g)])
    held_out = capture_routing(model, [torch.randint(0, 128, (8, 48), generator=g)])
    return model, fit, held_out


def test_gate_replica_copies_the_next_gate(tiny_mixtral_traces):
    import torch

    model, _, held = tiny_mixtral_traces
    rep = GateReplicaPredictor.from_model(model)
    gate2 = model.model.layers[2].mlp.gate.weight.detach()
    x1 = torch.from_numpy(held.gate_inputs[1])
    by_hand = torch.topk(torch.softmax(x1 @ gate2.T, -1), 2).indices.numpy()
    got = rep.predict_topk(1, held.topk_ids[1], held.gate_inputs[1])
    np.testing.assert_array_equal(np.sort(got, 1), np.sort(by_hand, 1))
    np.testing.assert_array_equal(rep.predict(1, held.topk_ids[1], held.gate_inputs[1]), expert_loads(got, 8))
    with pytest.raises(ValueError, match="gate_input is required"):
        rep.predict(1, held.topk_ids[1])


def test_gate_replica_fine_tuning_improves_a_perturbed_gate(tiny_mixtral_traces, tmp_path):
    model, fit, held = tiny_mixtral_traces
    rep = GateReplicaPredictor.from_model(model, threshold=1.0, epochs=15, lr=3e-3, batch_size=64)
    rng = np.random.default_rng(0)
    rep.replicas += rng.standard_normal(rep.replicas.shape).astype(np.float32) * 2 * rep.replicas.std()

    def held_out_recall(p):
        return np.mean([topk_recall(p.predict_topk(l, held.topk_ids[l], held.gate_inputs[l]), held.topk_ids[l + 1])
                        for l in range(2)])

    before = held_out_recall(rep)
    rep.fit(fit)
    after = held_out_recall(rep)
    assert after > before + 0.1
    np.testing.assert_array_equal(rep.fine_tuned, rep.profile_recall < rep.threshold)
    back = load_predictor(rep.save(str(tmp_path / "g")))
    assert held_out_recall(back) == after
    strict = GateReplicaPredictor.from_model(model, threshold=0.0).fit(fit)  # everything passes: no tuning
    assert not strict.fine_tuned.any()


# ---- evaluation ---------------------------------------------------------------------------------------------
def skewed_trace(rng, N=512, K=2, E=8, L=3):
    p = rng.dirichlet(np.ones(E) * 0.5)
    perms = [rng.permutation(E) for _ in range(L - 1)]
    ids = [random_sets(rng, N, K, E, p)]
    for l in range(L - 1):
        ids.append(perms[l][ids[-1]])
    token_index = np.broadcast_to(np.arange(N, dtype=np.float32)[None, :, None], (L, N, K))  # marks each token
    return RoutingTrace(topk_ids=np.stack(ids), num_experts=E, sequence_ids=np.repeat(np.arange(N // 32), 32),
                        task=np.repeat(["a", "b"], N // 2), gate_probs=token_index)


def test_evaluate_oracle_matches_planning_on_the_true_loads():
    rng = np.random.default_rng(11)
    tr = skewed_trace(rng)
    preds = {n: make_predictor(n).fit(tr) for n in ("oracle", "history", "affinity", "regression")}
    res = evaluate(preds, tr, 128, gpus=4, slots_per_gpu=3, baselines=False)
    orc = res["predictors"]["oracle"]
    assert (orc["pearson"], orc["rel_l1"], orc["recall"]) == (1.0, 0.0, 1.0)
    assert res["predictors"]["history"]["recall"] is None
    assert res["batches"] == 4 and res["layers"] == [1, 2]
    # second path: plan each batch on its true loads, serve with both splits
    bal, bal_even, prev = [], [], None
    for b in tr.batches(128):
        true = b.loads[1:]
        plan = planner.plan_layers(true.astype(float), 4, 3, previous=prev)
        prev = plan
        bal.extend(planner.balance(planner.gpu_loads(plan, planner.serve_time_split(plan, true))))
        bal_even.extend(planner.balance(planner.gpu_loads(plan, planner.even_split(plan, true))))
    assert orc["balance"] == pytest.approx(np.mean(bal))
    assert orc["balance_even"] == pytest.approx(np.mean(bal_even))
    assert orc["balance"] <= orc["balance_even"] + 1e-12
    # the deterministic permutations make the regression exact too
    assert res["predictors"]["regression"]["rel_l1"] < 0.05


def test_evaluate_static_baseline_by_brute_force():
    """Static EP puts experts [g*E/G, (g+1)*E/G) on GPU g: its balance is that of contiguous block sums."""
    rng = np.random.default_rng(13)
    tr = skewed_trace(rng)
    res = evaluate(make_predictor("history").fit(tr), tr, 128, gpus=4, slots_per_gpu=3)
    blocks = [b.loads[1:].reshape(2, 4, 2).sum(-1) for b in tr.batches(128)]  # [L-d, G] per batch
    expect = np.mean([g.max(1) / g.mean(1) for g in blocks])
    assert res["static"]["balance"] == pytest.approx(expect)
    assert res["static"]["balance_even"] == pytest.approx(expect)
    assert res["eplb"]["balance"] <= res["eplb"]["balance_even"] + 1e-12


def test_held_out_splits_and_saved_round_trip(tmp_path):
    rng = np.random.default_rng(12)
    tr = skewed_trace(rng)
    splits = held_out_splits(tr)
    for fit, ev in splits.values():
        fit_tokens, ev_tokens = fit.gate_probs[0, :, 0].astype(int), ev.gate_probs[0, :, 0].astype(int)
        assert set(tr.sequence_ids[fit_tokens]).isdisjoint(tr.sequence_ids[ev_tokens])  # no sequence shared
        assert sorted(np.r_[fit_tokens, ev_tokens]) == list(range(tr.num_tokens))
    assert splits["task-shift"][1].tasks == ["b"] and splits["task-shift"][0].tasks == ["a"]
    fit, ev = splits["in-distribution"]
    write_npz(fit, str(tmp_path / "fit.npz"))
    write_npz(ev, str(tmp_path / "ev.npz"))
    model = fit_predictors([str(tmp_path / "fit.npz")], "npz", 1, str(tmp_path / "m.npz"))
    saved = evaluate_saved(model, str(tmp_path / "ev.npz"), "npz", 64, 4, 3, online=True, baselines=False)
    direct = evaluate({n: make_predictor(n).fit(fit) for n in ("history", "affinity", "regression", "oracle")},
                      ev, 64, 4, 3, online=True, baselines=False)
    assert saved == direct
    table = format_table(saved)
    assert table.splitlines()[0].split() == ["predictor", "pearson", "rel_l1", "recall", "balance", "balance_even"]
    assert len(table.splitlines()) == 1 + 4 + 1  # header, four predictors, footnote (no baselines asked)
    default = evaluate_saved(model, str(tmp_path / "ev.npz"), "npz", 64, 4, baselines=False)  # 8/4 + 1 slots
    assert default["predictors"]["oracle"] == evaluate(make_predictor("oracle").fit(ev), ev, 64, 4, 3,
                                                        baselines=False)["predictors"]["oracle"]
    with pytest.raises(ValueError, match="batch_tokens"):
        evaluate(make_predictor("history").fit(fit), ev, 0, 4, 3)
