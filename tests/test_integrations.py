"""moeless.integrations without the engines: the policy bridge, the adapters' pure functions, the dump readers,
the --init-expert-location writer and the CLI additions. Each engine's own code is exercised in
tests/test_integrations_engines.py (skipped where the engine packages are absent)."""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from moeless import planner
from moeless.integrations import _policy
from moeless.integrations import sglang as msg
from moeless.integrations import vllm as mvl
from moeless.integrations.replica_choice import (
    gpu_pairs,
    sample_replicas,
    sglang_dynamic_choice,
    sglang_static_table,
    vllm_hash_choice,
)
from moeless.traces import load_trace, read_sglang_dump, read_sglang_logical_count

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _history(T=12, L=3, E=16, seed=0, skew=1.3):
    rng = np.random.default_rng(seed)
    base = rng.zipf(skew, size=(L, E)).astype(float)
    base = np.minimum(base, 50.0)
    return rng.poisson(base[None] * 4, size=(T, L, E)).astype(np.int64)


def _maps_brute(phy2log, E):
    """log2phy (ascending slots, -1 pad) and logcnt by plain loops: the reference for consistency checks."""
    L, P = phy2log.shape
    lists = [[[p for p in range(P) if phy2log[l, p] == e] for e in range(E)] for l in range(L)]
    X = max(1, max(len(s) for row in lists for s in row))
    log2phy = np.full((L, E, X), -1)
    for l, e in itertools.product(range(L), range(E)):
        log2phy[l, e, : len(lists[l][e])] = lists[l][e]
    return log2phy, np.array([[len(s) for s in row] for row in lists])


# ---- the policy bridge -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("G,S,E", [(4, 5, 16), (2, 9, 16), (8, 9, 64), (1, 20, 16), (3, 7, 20)])
def test_rebalance_fills_every_slot_and_covers_every_expert(G, S, E):
    h = _history(E=E)
    plan = _policy.rebalance(h, G * S, G)
    assert plan.phy2log.shape == (3, G * S) and plan.gpus == G and plan.slots_per_gpu == S
    assert (plan.phy2log >= 0).all(), "every slot must hold an expert"
    assert (plan.logcnt >= 1).all(), "every expert needs a replica"
    log2phy, logcnt = _maps_brute(plan.phy2log, E)
    assert np.array_equal(logcnt, plan.logcnt)
    assert np.array_equal(log2phy, plan.log2phy)


def test_rebalance_is_deterministic_and_keeps_a_plan_that_still_fits():
    h = _history(T=20, E=32)
    a = _policy.rebalance(h, 40, 4)
    b = _policy.rebalance(h.copy(), 40, 4)
    assert np.array_equal(a.phy2log, b.phy2log)
    # the same load again with the live placement: nothing needs to move
    c = _policy.rebalance(h, 40, 4, previous_phy2log=a.phy2log)
    assert np.array_equal(c.phy2log, a.phy2log)


def test_rebalance_keeps_more_slots_with_the_previous_placement():
    h1, h2 = _history(T=20, E=32, seed=1), _history(T=20, E=32, seed=2)
    old = _policy.rebalance(h1, 40, 4)
    warm = _policy.rebalance(h2, 40, 4, previous_phy2log=old.phy2log)
    cold = _policy.rebalance(h2, 40, 4)
    assert (warm.phy2log == old.phy2log).sum() >= (cold.phy2log == old.phy2log).sum()
    # a placement of another size is ignored, not an error
    other = _policy.rebalance(h2, 40, 4, previous_phy2log=np.zeros((3, 36), dtype=np.int64))
    assert np.array_equal(other.phy2log, cold.phy2log)


def test_rebalance_rejects_bad_input():
    h = _history(E=16)
    with pytest.raises(ValueError, match=r"history must have shape \[T, L, E\]"):
        _policy.rebalance(h[0], 20, 4)
    with pytest.raises(ValueError, match="non-negative"):
        _policy.rebalance(-h, 20, 4)
    with pytest.raises(ValueError, match="finite"):
        _policy.rebalance(np.where(h > 3, np.nan, h), 20, 4)
    with pytest.raises(ValueError, match="multiple of gpus"):
        _policy.rebalance(h, 21, 4)
    with pytest.raises(ValueError, match="cannot hold the 16 experts"):
        _policy.rebalance(h, 12, 4)
    with pytest.raises(ValueError, match="gpus must be a positive integer"):
        _policy.rebalance(h, 20, 0)


def _ema_reference(h, fraction):
    """The history predictor's rule written out per layer and pass, in plain Python floats."""
    T, L, E = h.shape
    out = np.zeros((L, E))
    for l in range(L):
        total = float(h[:, l].sum())
        share, seen = [1.0 / E] * E, False
        for t in range(T):
            n = float(h[t, l].sum())
            if n == 0:
                continue
            w = 0.5 ** (n / (fraction * total)) if seen else 0.0
            share = [w * s + (1 - w) * float(c) / n for s, c in zip(share, h[t, l])]
            seen = True
        out[l] = np.array(share) * total / T
    return out


def test_forecast_loads_matches_the_history_rule_and_the_window_mean():
    h = _history(T=15, E=8).astype(float)
    h[3] = 0  # an idle pass changes nothing
    h[5, 1] = 0
    for fraction in (0.5, 0.1, 3.0):
        assert np.allclose(_policy.forecast_loads(h, half_life_fraction=fraction), _ema_reference(h, fraction))
    assert np.allclose(_policy.forecast_loads(h, half_life_fraction=None), h.mean(0))
    zero = np.zeros((4, 2, 5))
    assert np.allclose(_policy.forecast_loads(zero), 0.0)
    with pytest.raises(ValueError, match="half_life_fraction"):
        _policy.forecast_loads(h, half_life_fraction=0)


def test_forecast_leans_toward_recent_passes_where_the_window_mean_does_not():
    h = np.zeros((100, 1, 4))
    h[:60, 0, 0] = 10  # expert 0 hot, then expert 1
    h[60:, 0, 1] = 10
    ema = _policy.forecast_loads(h)[0]
    mean = _policy.forecast_loads(h, half_life_fraction=None)[0]
    assert mean[1] / mean[0] == pytest.approx(40 / 60)
    # the last 40 passes are 0.8 half-lives: weight 1 - 0.5 ** 0.8 against 0.5 ** 0.8
    assert ema[1] / ema[0] == pytest.approx((1 - 0.5 ** 0.8) / 0.5 ** 0.8)
    assert ema[1] / ema[0] > mean[1] / mean[0]


def test_split_quotas_is_the_exact_serve_time_split():
    h = _history(E=16)
    plan = _policy.rebalance(h, 20, 4)
    counts = h[-1]
    rt = _policy.split_quotas(plan, counts)
    assert np.array_equal(rt, planner.serve_time_split(plan, counts))
    assert np.array_equal(rt.sum(2), counts)
    assert (rt[plan.log2phy < 0] == 0).all()


def test_rebalance_is_the_same_in_separate_processes():
    """Every rank runs the policy in its own process: the plan must not depend on process state."""
    code = ("import numpy as np, hashlib; from moeless.integrations import _policy;"
            "rng=np.random.default_rng(7); h=rng.poisson(rng.zipf(1.4,(4,32)).clip(max=40)*3,(30,4,32));"
            "p=_policy.rebalance(h, 40, 8); print(hashlib.sha256(p.phy2log.tobytes()).hexdigest())")
    outs = set()
    for seed in ("0", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=REPO)
        outs.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                check=True, timeout=300).stdout.strip())
    assert len(outs) == 1


# ---- SGLang adapter (pure functions) ---------------------------------------------------------------------------
def test_sglang_rebalance_experts_returns_deepseek_style_tensors():
    h = torch.from_numpy(_history(E=16)).to(torch.int32)
    phy2log, log2phy, logcnt = msg.rebalance_experts(h, 24, 6)
    for t in (phy2log, log2phy, logcnt):
        assert t.dtype == torch.int64 and t.device.type == "cpu"
    assert phy2log.shape == (3, 24) and logcnt.shape == (3, 16)
    assert log2phy.shape == (3, 16, int(logcnt.max()))
    ref_l2p, ref_cnt = _maps_brute(phy2log.numpy(), 16)
    assert np.array_equal(log2phy.numpy(), ref_l2p) and np.array_equal(logcnt.numpy(), ref_cnt)
    # one [L, E] matrix is one pass, as SGLang's init_by_eplb allows
    one = msg.rebalance_experts(h[0], 24, 6)[0]
    assert np.array_equal(one.numpy(), _policy.rebalance(h[:1].numpy(), 24, 4).phy2log)


def test_sglang_ring_buffer_order():
    h = _history(T=10, E=16)
    k = 4
    ring = np.roll(h, k, axis=0)  # what the recorder holds when it writes row k next
    a = msg.rebalance_experts(torch.from_numpy(ring), 24, 6, oldest_index=k)[0]
    b = msg.rebalance_experts(torch.from_numpy(h), 24, 6)[0]
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="oldest_index"):
        msg.rebalance_experts(torch.from_numpy(h), 24, 6, oldest_index=10)


def test_sglang_rebalance_rejects_bad_input():
    h = torch.from_numpy(_history(E=16))
    with pytest.raises(ValueError, match=r"\[T, L, E\] or \[L, E\]"):
        msg.rebalance_experts(h[0, 0], 24, 6)
    with pytest.raises(ValueError, match="multiple of num_local_physical_experts"):
        msg.rebalance_experts(h, 25, 6)
    with pytest.raises(ValueError, match="cannot hold the 16 experts"):
        msg.rebalance_experts(h, 12, 6)


def _best_split_brute(counts, l2p, S, G):
    """Smallest max GPU load over all integer splits (tiny inputs only)."""
    choices = []
    for e, c in enumerate(counts):
        slots = [p for p in l2p[e] if p >= 0]
        splits = [s for s in itertools.product(range(c + 1), repeat=len(slots)) if sum(s) == c]
        choices.append([(slots, s) for s in splits])
    best = None
    for combo in itertools.product(*choices):
        g = np.zeros(G)
        for slots, s in combo:
            for p, n in zip(slots, s):
                g[p // S] += n
        best = g.max() if best is None else min(best, g.max())
    return best


def test_lp_probabilities_are_the_exact_split_in_sglangs_column_order():
    G, S = 3, 2
    # expert 0 on slots 4, 0 (listed out of order), expert 1 on 2 and 5, experts 2, 3 once
    l2p = np.array([[4, 0], [2, 5], [1, -1], [3, -1]])
    counts = torch.tensor([5.0, 3.0, 2.0, 4.0])
    prob = msg.lp_probabilities(counts, torch.from_numpy(l2p), 6, G)
    assert prob.dtype == torch.float32 and prob.shape == (4, 2)
    served = prob.numpy().astype(np.float64) * float(counts.sum())
    assert np.allclose(served.sum(1), counts.numpy())
    assert (served[l2p < 0] == 0).all()
    g = np.zeros(G)
    for e, j in zip(*np.nonzero(l2p >= 0)):
        g[l2p[e, j] // S] += served[e, j]
    assert g.max() == pytest.approx(_best_split_brute([5, 3, 2, 4], l2p, S, G))
    # a rank-local map that lists only some slots: the others are treated as free
    part = msg.lp_probabilities(counts, torch.from_numpy(np.array([[0, -1], [2, 5], [1, -1], [3, -1]])), 6, G)
    assert part[0, 0] * counts.sum() == pytest.approx(5.0)


def test_init_expert_location_file_contents():
    plan = _policy.rebalance(_history(E=16), 20, 4)
    d = msg.init_expert_location(plan, num_layers=3, num_experts=16)
    assert list(d) == ["physical_to_logical_map"]
    assert np.array_equal(np.array(d["physical_to_logical_map"]), plan.phy2log)
    with pytest.raises(ValueError, match="layers"):
        msg.init_expert_location(plan, num_layers=4)
    with pytest.raises(ValueError, match="experts"):
        msg.init_expert_location(plan, num_experts=17)
    holes = planner.Plan.from_phy2log(np.where(np.arange(20) < 16, np.arange(20), -1)[None], 16, 4, 5)
    with pytest.raises(ValueError, match="empty slot"):
        msg.init_expert_location(holes)


# ---- vLLM adapter (pure function) ------------------------------------------------------------------------------
def test_vllm_rebalance_phy2log_contract():
    w = torch.from_numpy(_history(E=16).sum(0))
    out = mvl.rebalance_phy2log(w, 24, 4)
    assert out.dtype == torch.int64 and out.device.type == "cpu" and out.shape == (3, 24)
    assert np.array_equal(out.numpy(), _policy.rebalance(w.numpy()[None], 24, 4).phy2log)
    assert all(set(row.tolist()) == set(range(16)) for row in out)
    with pytest.raises(ValueError, match=r"weight must have shape \[L, E\]"):
        mvl.rebalance_phy2log(w[None], 24, 4)


def test_vllm_register_needs_the_opt_in(monkeypatch):
    monkeypatch.delenv(mvl.ENV, raising=False)
    before = set(sys.modules)
    mvl.register()  # without MOELESS_VLLM_EPLB=1: does nothing, imports nothing of vLLM
    assert not any(m == "vllm" or m.startswith("vllm.") for m in set(sys.modules) - before)


# ---- replica-choice models: properties (the engines' own code: test_integrations_engines.py) -----------------
def _layer(seed=0, E=12, G=4, S=4):
    h = _history(T=6, L=1, E=E, seed=seed)
    plan = _policy.rebalance(h, G * S, G)
    return plan, h[-1, 0]


def test_hash_and_dynamic_choices_serve_the_chosen_expert():
    plan, _ = _layer()
    rng = np.random.default_rng(0)
    ids = np.stack([rng.choice(12, size=3, replace=False) for _ in range(200)])
    for choose in (vllm_hash_choice, sglang_dynamic_choice):
        slots = choose(ids, plan.log2phy[0], plan.logcnt[0])
        assert np.array_equal(plan.phy2log[0][slots], ids)
    # vLLM: every pair of a token uses the same replica index
    t = np.arange(200)
    idx = ((t * 2654435769) & 0xFFFFFFFF)[:, None] % plan.logcnt[0][ids]
    assert np.array_equal(plan.log2phy[0][ids, idx], vllm_hash_choice(ids, plan.log2phy[0], plan.logcnt[0]))


def test_static_table_prefers_a_replica_on_the_rank():
    plan, _ = _layer()
    table = sglang_static_table(plan.log2phy, 4, 16)
    assert table.shape == (4, 1, 12)
    for r, e in itertools.product(range(4), range(12)):
        slots = [p for p in plan.log2phy[0, e] if p >= 0]
        assert table[r, 0, e] in slots
        local = [p for p in slots if p // 4 == r]
        if local:
            assert table[r, 0, e] == local[0]


def test_sampling_follows_the_probabilities():
    plan, counts = _layer()
    l2p = plan.log2phy[0]
    prob = np.where(l2p >= 0, np.arange(1, l2p.shape[1] + 1)[None, :], 0).astype(np.float32)
    prob[3] = 0  # an all-zero row: uniform over the valid replicas
    ids = np.repeat(np.arange(12), 4000)[:, None]
    slots = sample_replicas(ids, prob, l2p, np.random.default_rng(0).random(ids.size))
    for e in range(12):
        got = np.array([(slots[ids[:, 0] == e] == p).mean() for p in l2p[e] if p >= 0])
        want = prob[e][l2p[e] >= 0] if prob[e].sum() > 0 else np.ones(int(plan.logcnt[0, e]))
        assert np.allclose(got, want / want.sum(), atol=0.03)
    assert gpu_pairs(slots, 4, 4).sum() == ids.size


# ---- SGLang dumps -> traces and loads ------------------------------------------------------------------------
def _write_per_token_dump(path, logical, p2l, rank=0, pass_ids=None, pad_k=8, pad_rows=1):
    """A per_token dump as SGLang's recorder writes it (physical ids, K padded to 8, padded rows -1, a dense
    layer 0 that records nothing). logical: list of [L, N, K] per pass."""
    rng = np.random.default_rng(rank)
    L = p2l.shape[0]
    records = []
    for i, lg in enumerate(logical):
        Lm, N, K = lg.shape
        phys = np.full((L, N + pad_rows, pad_k), -1, dtype=np.int32)
        for l in range(Lm):
            for t, k in itertools.product(range(N), range(K)):
                slots = np.flatnonzero(p2l[l + 1] == lg[l, t, k])
                phys[l + 1, t, k] = rng.choice(slots)
        records.append({"forward_pass_id": (pass_ids or list(range(len(logical))))[i], "rank": rank,
                        "gatherer_key": "primary", "input_ids": list(range(100 * i, 100 * i + N + pad_rows)),
                        "positions": list(range(N + pad_rows)), "extend_seq_lens": [N - 2, 2, pad_rows],
                        "forward_mode": 1, "topk_ids_of_layer": torch.from_numpy(phys), "misc_objects": [],
                        "global_physical_count": torch.from_numpy(
                            np.stack([np.bincount(phys[l][phys[l] >= 0], minlength=p2l.shape[1]) for l in range(L)]))})
    torch.save({"records": records, "last_physical_to_logical_map": torch.from_numpy(p2l)}, path)


def _dump_fixture(tmp_path, E=8, P=10):
    rng = np.random.default_rng(3)
    p2l = np.stack([np.r_[np.arange(E), rng.integers(0, E, P - E)] for _ in range(3)])  # layer 0 dense
    logical = [np.stack([np.stack([rng.choice(E, 2, replace=False) for _ in range(n)]) for _ in range(2)])
               for n in (5, 4)]
    return p2l, logical


def test_read_sglang_per_token_dump(tmp_path):
    p2l, logical = _dump_fixture(tmp_path)
    f = tmp_path / "expert_distribution_recorder_1.0_0.pt"
    _write_per_token_dump(f, logical, p2l)
    tr = read_sglang_dump(f)
    assert tr.num_experts == 8 and tr.top_k == 2 and list(tr.layer_ids) == [1, 2]
    assert np.array_equal(tr.topk_ids, np.concatenate(logical, axis=1))
    # extend_seq_lens split the passes into requests: [3, 2] and [2, 2] real tokens
    assert len(np.unique(tr.sequence_ids)) == 4
    assert load_trace(str(f), "sglang").num_tokens == 9


def test_read_sglang_dump_folder_deduplicates_replicated_ranks(tmp_path):
    p2l, logical = _dump_fixture(tmp_path)
    _write_per_token_dump(tmp_path / "expert_distribution_recorder_1.0_0.pt", logical, p2l, rank=0)
    _write_per_token_dump(tmp_path / "expert_distribution_recorder_1.0_1.pt", logical, p2l, rank=1)
    tr = read_sglang_dump(tmp_path)
    assert tr.num_tokens == 9  # attention replicated over 2 ranks: the same tokens once
    counts = read_sglang_logical_count(tmp_path)
    assert counts.shape == (2, 3, 8)
    assert np.array_equal(counts[:, 1:].sum((0, 1)), np.bincount(np.concatenate(logical, 1).ravel(), minlength=8))
    assert (counts[:, 0] == 0).all()


def test_read_sglang_dump_drops_partial_tokens_loudly(tmp_path):
    p2l, logical = _dump_fixture(tmp_path)
    f = tmp_path / "d.pt"
    _write_per_token_dump(f, logical, p2l)
    d = torch.load(f, weights_only=True)
    d["records"][0]["topk_ids_of_layer"][2, 0, :] = -1  # token 0 routed in layer 1 only
    torch.save(d, f)
    with pytest.warns(UserWarning, match="dropped 1 token"):
        tr = read_sglang_dump(f)
    assert tr.num_tokens == 8


def test_read_sglang_dumps_reject_other_models_and_modes(tmp_path):
    p2l, logical = _dump_fixture(tmp_path)
    f = tmp_path / "d.pt"
    _write_per_token_dump(f, logical, p2l)
    with pytest.raises(ValueError, match="expected 16 .*another model"):
        read_sglang_dump(f, num_experts=16)
    stat = tmp_path / "expert_distribution_recorder_2.0.pt"
    torch.save({"rank": 0, "logical_count": torch.ones(4, 3, 8, dtype=torch.int32),
                "average_utilization_rate_over_window": None}, stat)
    with pytest.raises(ValueError, match="per_token"):
        read_sglang_dump(stat)
    assert read_sglang_logical_count(stat).shape == (4, 3, 8)
    with pytest.raises(ValueError, match="another model"):
        read_sglang_logical_count(stat, num_experts=16)
    other = tmp_path / "other"
    other.mkdir()
    _write_per_token_dump(other / "expert_distribution_recorder_1_0.pt", logical, p2l)
    _write_per_token_dump(other / "expert_distribution_recorder_1_1.pt", logical, np.concatenate([p2l, p2l[:1]]))
    with pytest.raises(ValueError, match="another model"):
        read_sglang_dump(other)
    bad = tmp_path / "bad.pt"
    torch.save({"x": 1}, bad)
    with pytest.raises(ValueError, match="not an SGLang expert-distribution dump"):
        read_sglang_logical_count(bad)


# ---- CLI: plan --format sglang, plan --loads dump.pt, predict fit --format sglang ------------------------------
def test_cli_plan_writes_an_init_expert_location_file(tmp_path, capsys):
    from moeless.cli import main

    loads = tmp_path / "loads.npy"
    np.save(loads, _history(E=16).sum(0).astype(float))
    out = tmp_path / "init.json"
    assert main(["plan", "--loads", str(loads), "--gpus", "4", "--slots-per-gpu", "5", "--format", "sglang",
                 "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert list(d) == ["physical_to_logical_map"]
    p2l = np.array(d["physical_to_logical_map"])
    assert p2l.shape == (3, 20) and (p2l >= 0).all() and all(set(r) == set(range(16)) for r in p2l.tolist())


def test_cli_reads_sglang_dumps(tmp_path, capsys):
    from moeless.cli import main

    stat = tmp_path / "expert_distribution_recorder_2.0.pt"
    torch.save({"rank": 0, "logical_count": torch.from_numpy(_history(E=16)).to(torch.int32)}, stat)
    assert main(["plan", "--loads", str(stat), "--gpus", "4", "--slots-per-gpu", "5", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert np.array(got["phy2log"]).shape == (3, 20)
    p2l, logical = _dump_fixture(tmp_path, E=8, P=10)
    big = [np.concatenate([lg] * 6, axis=1) for lg in logical]
    _write_per_token_dump(tmp_path / "expert_distribution_recorder_1_0.pt", big, p2l)
    model = tmp_path / "pred.npz"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["predict", "fit", "--routing", str(tmp_path / "expert_distribution_recorder_1_0.pt"),
                     "--format", "sglang", "--out", str(model)]) == 0
    assert model.exists()
