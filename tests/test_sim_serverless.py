"""moeless.sim.serverless and the time-aware split: copy stalls and cost-aware choices by hand, the split
against brute force, the one-instance-per-expert layout, merged weight reads against a loop, end to end."""
import itertools

import numpy as np
import pytest

from moeless.planner import Plan
from moeless.sim import SimConfig, run_simulation
from moeless.costmodel import RooflineCost, merged_replicas
from moeless.sim.policies import lpt_split, split_layers
from moeless.sim.serverless import link_timeline, one_per_expert
from moeless.specs import HardwareSpec, ModelSpec

TINY = ModelSpec("tiny", num_moe_layers=1, num_experts=3, top_k=1, hidden_size=4, moe_intermediate_size=8)
HW = HardwareSpec("toy", peak_flops=1000.0, hbm_bandwidth=100.0, memory_bytes=1e4, link_bandwidth=10.0,
                  link_group=2, host_bandwidth=5.0, launch_s=0.5)


def test_link_timeline_by_hand():
    # 3 layers, 2 GPUs, d = 1; layer times 1 s each, no misc; host copy 3 s, peer copy 1 s
    moe, misc = np.ones((1, 3)), np.zeros(3)
    host = np.zeros((1, 3, 2), dtype=int)
    peer = np.zeros((1, 3, 2), dtype=int)
    host[0, 1, 0] = 1  # layer 1 needs a host copy on GPU 0: issued at layer 0's start (0), ready at 3
    peer[0, 2, 1] = 2  # layer 2 needs two peer copies on GPU 1: issued when layer 1 starts
    _, stall = link_timeline(host, peer, moe, misc, (3.0, 1.0), distance=1)
    # layer 1 starts at 1, waits 2 (until 3); layer 2 starts at 4; its copies issued at 1 end at 3: hidden
    assert stall.tolist() == [0.0, 2.0, 0.0]
    host[0, 2, 1] = 1  # plus a host copy for layer 2 on GPU 1: issued at 1 (layer 1's start), ready at 4
    _, stall = link_timeline(host, peer, moe, misc, (3.0, 1.0), distance=1)
    assert stall.tolist() == [0.0, 2.0, 0.0]
    host[0, 0, 0] = 1  # layer 0's copy can only start with the iteration: 3 s; layer 1's queues behind it
    _, stall = link_timeline(host, peer, moe, misc, (3.0, 1.0), distance=1)
    assert stall.tolist() == [3.0, 2.0, 0.0]  # layer 1 starts at 4, its copy ends at 6


def test_cost_aware_choice_by_hand():
    """A layout with copies is taken only when H x (time saved) exceeds its stall."""
    moe = np.array([[2.0], [1.0]])  # candidate 0: 2 s, no copies; candidate 1: 1 s, one host copy of 3 s
    host = np.zeros((2, 1, 1), dtype=int)
    host[1, 0, 0] = 1
    peer = np.zeros_like(host)
    for H, want in ((1.0, 0), (2.9, 0), (3.1, 1)):
        chosen, stall = link_timeline(host, peer, moe, np.zeros(1), (3.0, 1.0), 1, horizon=H)
        assert chosen.tolist() == [want] and stall.tolist() == [3.0 if want else 0.0]


def test_merged_replicas_against_a_loop():
    rng = np.random.default_rng(0)
    t = rng.integers(0, 5, size=(4, 3, 5)).astype(float)
    g = rng.integers(-1, 3, size=(4, 3, 5))
    t[g < 0] = 0
    got = merged_replicas(t, g)
    for m in range(4):
        for e in range(3):
            for gpu in range(3):
                idx = np.flatnonzero(g[m, e] == gpu)
                if idx.size:
                    assert got[m, e, idx[0]] == t[m, e, idx].sum() and (got[m, e, idx[1:]] == 0).all()
            assert (got[m, e, g[m, e] < 0] == 0).all()


def _brute_best_one_replica(cost, plan, loads):
    """The fastest layout putting each expert whole on one of its replicas, by enumeration."""
    gpu = plan.replica_gpu[0]
    E = loads.shape[0]
    options = [np.flatnonzero(gpu[e] >= 0) for e in range(E)]
    best = np.inf
    for pick in itertools.product(*options):
        rt = np.zeros(gpu.shape)
        rt[np.arange(E), list(pick)] = loads
        best = min(best, float(cost.layer_times(rt[None], gpu[None], plan.gpus, loads.sum()).moe_latency[0]))
    return best


@pytest.mark.parametrize("loads", [[1, 1, 1], [40, 2, 1], [0, 3, 1]])
def test_time_aware_split_is_lossless_and_no_slower(loads):
    cost = RooflineCost(TINY, HW)
    loads = np.array([loads])
    # 2 GPUs x 2 slots: expert 0 on both GPUs, experts 1 and 2 on GPU 0 and GPU 1
    plan = Plan.from_phy2log([[0, 1, 0, 2]], 3, 2, 2)
    rt, times = split_layers(plan, loads, cost, loads.sum())
    assert np.array_equal(rt.sum(-1), loads)  # every pair served by a replica of its own expert
    assert (rt[plan.replica_gpu < 0] == 0).all()
    even, _ = split_layers(plan, loads, cost, loads.sum(), split="even")
    t_even = cost.layer_times(even, plan.replica_gpu, 2, loads.sum()).moe_latency[0]
    assert times.moe_latency[0] <= t_even + 1e-12
    assert times.moe_latency[0] <= _brute_best_one_replica(cost, plan, loads[0]) + 1e-12


def test_lpt_reads_each_expert_once():
    # decode-like: expert 0 has 2 replicas; the one-replica split puts its pairs on one GPU
    rg = np.array([[[0, 1], [0, -1], [1, -1]]])
    out = lpt_split(rg, np.array([[3.0, 1.0, 1.0]]), lambda n: np.where(np.asarray(n) > 0, 1.0, 0.0))
    assert ((out > 0).sum(-1) <= 1).all() and np.array_equal(out.sum(-1), [[3.0, 1.0, 1.0]])


def test_one_per_expert_layout():
    rng = np.random.default_rng(1)
    L, E, G, S = 6, 5, 3, 3
    live = rng.integers(-1, E, size=(L, G * S))
    out = one_per_expert(live, E, G, S)
    cap = -(-E // G)
    for l in range(L):
        row = out[l]
        assert sorted(row[row >= 0].tolist()) == list(range(E))  # every expert exactly once
        assert ((row.reshape(G, S) >= 0).sum(1) <= cap).all()
        # an expert lands on a GPU where it lives whenever it lives somewhere with room to spare
        lives = {e: {p // S for p in np.flatnonzero(live[l] == e)} for e in range(E)}
        kept = sum(1 for p in np.flatnonzero(row >= 0) if p // S in lives[row[p]])
        assert kept >= min(sum(1 for e in range(E) if lives[e]), 1)


SMALL = dict(window_s=20.0, iteration_budget=40)


def test_moeless_end_to_end_accounting():
    res = run_simulation(SimConfig(**SMALL, policies=("megatron", "moeless", "moeless-nowarm")))
    d = res.to_dict()["policies"]
    meg, mo = res.policies["megatron"], res.policies["moeless"]
    # the same iterations, whatever the policy (a stalled iteration is split into two weighted samples)
    assert mo.series("weights").sum() == pytest.approx(meg.series("weights").sum())
    # the pool's bill: at least the initial instances for the whole run, at most every slot for the whole run
    expert_gb = res.setup["expert_gb"]
    slots = res.setup["slots_per_gpu"] * res.setup["gpus"] * res.setup["moe_layers"]
    assert d["moeless"]["cost_gb_s"] <= slots * expert_gb * d["moeless"]["makespan_s"] * (1 + 1e-9)
    assert d["moeless"]["initial_loads"] == 256
    # warm identity and cost-awareness: far fewer cold starts than the plan-and-take-it ablation
    assert d["moeless"]["cold_starts"] < d["moeless-nowarm"]["cold_starts"]


def test_slot_split_matches_the_planner_and_the_padded_split():
    """split_slots against the planner's even split and split_layers' [L, E, R] layout, slot by slot; slot_rank
    against log2phy."""
    from moeless.planner import even_split, plan_layers
    from moeless.sim.policies import slot_rank, split_slots

    cost = RooflineCost(TINY, HW)
    rng = np.random.default_rng(5)
    loads = rng.integers(0, 30, (4, 3))
    loads[0] = 0
    plan = plan_layers(loads.astype(np.float64) + 1, 2, 3)
    l2p = plan.log2phy
    rank = slot_rank(plan.phy2log, 3)
    for li, e, r in zip(*np.nonzero(l2p >= 0)):
        assert rank[li, l2p[li, e, r]] == r
    assert (rank[plan.phy2log < 0] == -1).all()
    for split, want_rt in (("even", even_split(plan, loads)), ("serve-time", split_layers(plan, loads, cost, 9)[0])):
        st, times = split_slots(plan, loads, cost, 9, split=split)
        for li, e, r in zip(*np.nonzero(l2p >= 0)):
            assert st[li, l2p[li, e, r]] == want_rt[li, e, r]
        assert (st[plan.phy2log < 0] == 0).all()
        want = cost.layer_times(want_rt.astype(np.float64), plan.replica_gpu, 2, 9)
        assert np.array_equal(times.moe_latency, want.moe_latency)
    with pytest.raises(ValueError, match="loads"):
        split_slots(plan, loads[:2], cost, 9)
