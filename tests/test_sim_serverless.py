"""moeless.sim.serverless: copy stalls by hand (link timeline, prepared copies across iterations), merged weight
reads against a loop, and moeless end to end (accounting, the bound, fair baselines)."""
import numpy as np
import pytest

from moeless.costmodel import merged_replicas
from moeless.sim import SimConfig, run_simulation
from moeless.sim.serverless import LinkState, link_timeline


def test_link_timeline_by_hand():
    # 3 layers, 2 GPUs, d = 1; layer times 1 s each, no misc; host copy 3 s, peer copy 1 s
    moe, misc = np.ones(3), np.zeros(3)
    host = np.zeros((3, 2), dtype=int)
    peer = np.zeros((3, 2), dtype=int)
    host[1, 0] = 1  # layer 1 needs a host copy on GPU 0: issued at layer 0's start (0), ready at 3
    peer[2, 1] = 2  # layer 2 needs two peer copies on GPU 1: issued when layer 1 starts
    stall = link_timeline(host, peer, moe, misc, (3.0, 1.0), distance=1)
    # layer 1 starts at 1, waits 2 (until 3); layer 2 starts at 4; its copies issued at 1 end at 3: hidden
    assert stall.tolist() == [0.0, 2.0, 0.0]
    host[2, 1] = 1  # plus a host copy for layer 2 on GPU 1: issued at 1 (layer 1's start), ready at 4
    assert link_timeline(host, peer, moe, misc, (3.0, 1.0), distance=1).tolist() == [0.0, 2.0, 0.0]
    host[0, 0] = 1  # layer 0's copy can only start with the iteration: 3 s; layer 1's queues behind it
    assert link_timeline(host, peer, moe, misc, (3.0, 1.0), distance=1).tolist() == [3.0, 2.0, 0.0]


def test_prepared_copies_carry_into_the_next_iteration():
    # a copy prepared for the next iteration's layer 0 when layer 0 ends (t = 1) takes 3 s on the host link:
    # this iteration ends at 3, so the next one's layer 0 waits 1 s; layer 2's copy, issued at 3, waits 3 s
    # into the next iteration and delays nothing that starts later
    moe, misc = np.ones(3), np.zeros(3)
    none = np.zeros((3, 1), dtype=int)
    prep = np.zeros((3, 1), dtype=int)
    prep[0, 0] = 1
    state = LinkState(3, 1)
    assert link_timeline(none, none, moe, misc, (3.0, 1.0), 1, prep, none, state).tolist() == [0.0, 0.0, 0.0]
    assert state.ready[0] == pytest.approx(1.0) and np.isinf(state.ready[1:]).all()
    assert link_timeline(none, none, moe, misc, (3.0, 1.0), 1, none, none, state).tolist() == [1.0, 0.0, 0.0]
    # nothing carried any more
    assert link_timeline(none, none, moe, misc, (3.0, 1.0), 1, none, none, state).tolist() == [0.0, 0.0, 0.0]


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


SMALL = dict(window_s=20.0, iteration_budget=40, batching="continuous", rate_scale=4.0, history_s=60.0)


@pytest.fixture(scope="module")
def small():
    return run_simulation(SimConfig(**SMALL, policies=("megatron", "eplb", "eplb-vllm", "oracle", "moeless",
                                                       "moeless-bound")))


def test_moeless_end_to_end_accounting(small):
    d = small.to_dict()["policies"]
    meg, mo = small.policies["megatron"], small.policies["moeless"]
    # the same iterations, whatever the policy (a stalled iteration is split into two weighted samples)
    assert mo.series("weights").sum() == pytest.approx(meg.series("weights").sum())
    expert_gb = small.setup["expert_gb"]
    L, G, S = small.setup["moe_layers"], small.setup["gpus"], small.setup["slots_per_gpu"]
    # one accounting: megatron's bill is its E instances per layer for the whole run, EPLB's every slot
    assert d["megatron"]["cost_gb_s"] == pytest.approx(8 * L * expert_gb * d["megatron"]["makespan_s"], rel=1e-3)
    assert d["eplb"]["cost_gb_s"] == pytest.approx(G * S * L * expert_gb * d["eplb"]["makespan_s"], rel=1e-3)
    # moeless: at least its resident homes for the whole run, at most every slot
    assert 8 * L * expert_gb * d["moeless"]["makespan_s"] * (1 - 1e-3) <= d["moeless"]["cost_gb_s"] \
        <= G * S * L * expert_gb * d["moeless"]["makespan_s"] * (1 + 1e-3)
    assert d["moeless"]["initial_loads"] == 8 * L
    assert d["moeless"]["gb_copied"] == pytest.approx(d["moeless"]["copies"] * expert_gb, rel=1e-3)
    assert small.setup["history"].endswith("requests)")  # EPLB and the predictors were warmed on history


def test_the_bound_copies_for_free_and_is_not_slower(small):
    d = small.to_dict()["policies"]
    # free copies: no stall, so no stalled iteration is split into two samples
    b = small.policies["moeless-bound"]
    assert len(b.series("weights")) == len(small.policies["megatron"].series("weights"))
    assert d["moeless-bound"]["latency_ms"]["mean"] <= d["megatron"]["latency_ms"]["mean"] * (1 + 1e-9)
