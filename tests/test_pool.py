"""The function pool on a simulated clock against hand computation."""
import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from moeless.planner import Plan
from moeless.pool import FunctionPool, RealClock, SimulatedClock

GB = 1e9


def _pool(**kw):
    args = dict(expert_bytes=2 * GB, link_bandwidth=1 * GB, keep_alive_s=10.0)
    args.update(kw)
    return FunctionPool(1, 2, 2, **args)


def test_lifecycle_and_meter_by_hand():
    pool = _pool()
    a = Plan.from_phy2log([[0, 1, 2, -1]], 3, 2, 2)
    r = pool.apply(a, now=0.0)
    assert r.cold.tolist() == [[0, 0], [0, 1], [0, 2]] and r.warm.size == 0
    # 2 GB at 1 GB/s = 2 s per copy; GPU 0 loads two in a row, GPU 1 one
    assert r.ready_in_s.tolist() == [4.0, 2.0]
    assert pool.state(1.0)[0].tolist() == ["cold", "cold", "cold", "free"]
    # at t = 5 expert 1 leaves the plan and expert 0 gets a second replica on GPU 1
    b = Plan.from_phy2log([[0, -1, 2, 0]], 3, 2, 2)
    r = pool.apply(b, now=5.0)
    assert r.warm.tolist() == [[0, 0], [0, 2]] and r.cold.tolist() == [[0, 3]]
    assert r.ready_in_s.tolist() == [0.0, 2.0]
    assert pool.state(6.0)[0].tolist() == ["warm", "idle", "warm", "cold"]
    # expert 1 is idle from t = 5 and released at t = 15
    pool.advance_to(20.0)
    assert pool.state()[0].tolist() == ["warm", "free", "warm", "warm"]
    m = pool.close(20.0)
    # GB-s: slots 0, 2 live 0..20 (20 s each), slot 1 0..15, slot 3 5..20: (20 + 20 + 15 + 15) s x 2 GB
    assert m.gb_seconds == pytest.approx(140.0)
    # both GPUs hold something from 0 to 20
    assert m.gpu_seconds == pytest.approx(40.0)
    assert (m.cold_starts, m.warm_starts, m.releases, m.evictions) == (4, 2, 4, 0)
    assert m.bytes_copied == 8 * GB and m.copy_seconds == pytest.approx(8.0)


def test_eviction_and_reuse_after_idle():
    pool = _pool(keep_alive_s=3.0)
    pool.apply(Plan.from_phy2log([[0, 1, -1, -1]], 2, 2, 2), now=0.0)
    pool.apply(Plan.from_phy2log([[0, -1, -1, -1]], 2, 2, 2), now=1.0)  # expert 1 idle from 1
    r = pool.apply(Plan.from_phy2log([[0, 1, -1, -1]], 2, 2, 2), now=3.5)  # within keep-alive: warm
    assert r.warm.tolist() == [[0, 0], [0, 1]]
    r = pool.apply(Plan.from_phy2log([[0, 0, -1, -1]], 2, 2, 2), now=4.0)  # slot 1 changes expert: evict
    assert r.evicted.tolist() == [[0, 1]] and pool.meter.evictions == 1
    # keep-alive ran out for nothing here: every instance was in use
    pool.apply(Plan.from_phy2log([[-1, -1, -1, -1]], 2, 2, 2), now=5.0)
    pool.advance_to(8.0)  # released at 5 + 3
    assert pool.live_instances() == 0
    assert pool.meter.gpu_seconds == pytest.approx(8.0)  # GPU 0 held from 0 to 8, GPU 1 never


def test_prewarm_hides_the_cold_start():
    pool = _pool()
    ready = pool.prewarm(0, 3, 2, now=0.0)
    assert ready == 2.0
    r = pool.apply(Plan.from_phy2log([[0, 1, -1, 2]], 3, 2, 2), now=3.0)
    assert [0, 3] in r.warm.tolist() and r.ready_in_s[1] == 0.0
    assert pool.meter.cold_starts == 3


def test_keep_alive_inf_charges_like_serverful():
    pool = _pool(keep_alive_s=math.inf)
    pool.apply(Plan.from_phy2log([[0, 1, 2, 3]], 4, 2, 2), now=0.0)
    pool.apply(Plan.from_phy2log([[-1, -1, -1, -1]], 4, 2, 2), now=1.0)
    m = pool.close(100.0)
    assert m.gb_seconds == pytest.approx(4 * 2 * 100.0)
    assert m.releases == 4


def test_layer_plans_and_clocks():
    clock = SimulatedClock()
    pool = FunctionPool(2, 1, 2, expert_bytes=1.0, link_bandwidth=1.0, clock=clock)
    clock.advance(1.0)
    pool.apply(Plan.from_phy2log([[1, -1]], 2, 1, 2), layer=1)
    assert pool.expert.tolist() == [[-1, -1], [1, -1]]
    assert pool.last_used[1, 0] == 1.0
    assert 0.0 <= RealClock().now() < 1.0


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(expert_bytes=0), "expert_bytes"),
        (dict(link_bandwidth=-1), "link_bandwidth"),
        (dict(keep_alive_s=float("nan")), "keep_alive_s"),
    ],
)
def test_bad_input(kw, match):
    with pytest.raises(ValueError, match=match):
        _pool(**kw)


def test_bad_apply():
    pool = _pool()
    pool.apply(Plan.from_phy2log([[0, 1, -1, -1]], 2, 2, 2), now=2.0)
    with pytest.raises(ValueError, match="now"):
        pool.apply(Plan.from_phy2log([[0, 1, -1, -1]], 2, 2, 2), now=1.0)
    with pytest.raises(ValueError, match="gpus"):
        pool.apply(Plan.from_phy2log([[0, 1]], 2, 1, 2), now=3.0)
    with pytest.raises(ValueError, match="layer"):
        pool.apply(Plan.from_phy2log([[0, 1, -1, -1]], 2, 2, 2), now=3.0, layer=4)
    with pytest.raises(ValueError, match="dt"):
        SimulatedClock().advance(-1)


def test_align_keeps_live_instances_in_their_slots():
    """Warm identity: the plan's experts per GPU are kept, live instances keep their slot (warm), new ones take
    a free slot before an idle one, and an idle one whose keep-alive ends sooner before a later one."""
    pool = FunctionPool(1, 2, 3, expert_bytes=1.0, link_bandwidth=1.0, keep_alive_s=10.0)
    pool.apply(Plan.from_phy2log([[0, 1, 2, 3, 4, -1]], 6, 2, 3), now=0.0)
    pool.apply(Plan.from_phy2log([[0, -1, 2, 3, -1, -1]], 6, 2, 3), now=1.0)  # 1, 4 idle from 1
    pool.apply(Plan.from_phy2log([[0, -1, -1, 3, -1, -1]], 6, 2, 3), now=2.0)  # 2 idle from 2
    # GPU 0 gets {2, 0, 5}: 0 and 2 are live in slots 0 and 2, 5 must take slot 1 (idle expert 1)
    # GPU 1 gets {5, 3, 0}: 3 keeps slot 3; 5 and 0 take slot 5 (free), then slot 4 (idle expert 4)
    plan = Plan.from_phy2log([[2, 0, 5, 5, 3, 0]], 6, 2, 3)
    got = pool.align(plan).phy2log[0].tolist()
    assert got == [0, 5, 2, 3, 0, 5]
    for g in range(2):  # same multiset of experts on each GPU as the plan
        assert sorted(got[3 * g:3 * g + 3]) == sorted(plan.phy2log[0, 3 * g:3 * g + 3].tolist())
    # brute force: no within-GPU permutation of the plan reuses more live instances
    import itertools

    live = pool.expert[0].tolist()
    best = max(sum(a == b for a, b in zip(perm0 + perm1, live))
               for perm0 in itertools.permutations(plan.phy2log[0, :3].tolist())
               for perm1 in itertools.permutations(plan.phy2log[0, 3:].tolist()))
    assert best == 3
    r = pool.apply(pool.align(plan), now=3.0)
    assert r.warm.tolist() == [[0, 0], [0, 2], [0, 3]]


def test_align_idle_preference_by_deadline():
    pool = FunctionPool(1, 1, 3, expert_bytes=1.0, link_bandwidth=1.0, keep_alive_s=10.0)
    pool.apply(Plan.from_phy2log([[0, 1, 2]], 4, 1, 3), now=0.0)
    pool.apply(Plan.from_phy2log([[-1, 1, 2]], 4, 1, 3), now=1.0)  # expert 0 idle from 1
    pool.apply(Plan.from_phy2log([[-1, -1, 2]], 4, 1, 3), now=2.0)  # expert 1 idle from 2
    # expert 3 replaces the idle instance whose keep-alive ends first (expert 0, slot 0)
    assert pool.align(Plan.from_phy2log([[3, 2, -1]], 4, 1, 3)).phy2log.tolist() == [[3, -1, 2]]


def test_peer_copies_by_hand():
    """A cold start copies from a GPU of the same link group that holds a loaded instance (peer link), else from
    the host; each link queues its own copies."""
    pool = FunctionPool(1, 4, 2, expert_bytes=4.0, link_bandwidth=1.0, keep_alive_s=10.0,
                        peer_bandwidth=4.0, link_group=2)
    assert (pool.cold_start_s, pool.peer_cold_start_s) == (4.0, 1.0)
    pool.apply(Plan.from_phy2log([[0, -1, 1, -1, 2, -1, 3, -1]], 4, 4, 2), now=0.0)
    # at t = 10 all are loaded; GPU 1 wants 0 (on its peer GPU 0) and 2 (on GPU 2, another group): one peer
    # copy (1 s) and one host copy (4 s), in parallel on the two links; GPU 3 wants 0 twice... from the host
    plan = Plan.from_phy2log([[0, -1, 1, 0, 2, -1, 3, 0]], 4, 4, 2)
    src = pool.copy_sources([0], plan.phy2log, now=10.0)
    assert src.tolist() == [[0, 0, 0, 2, 0, 0, 0, 1]]
    plan2 = Plan.from_phy2log([[0, -1, 1, 2, 2, -1, 3, 0]], 4, 4, 2)
    assert pool.copy_sources([0], plan2.phy2log, now=10.0).tolist() == [[0, 0, 0, 1, 0, 0, 0, 1]]
    r = pool.apply(Plan.from_phy2log([[0, -1, 0, 2, 2, -1, 3, 0]], 4, 4, 2), now=10.0)
    # GPU 1 slot 2 (expert 0, peer) and slot 3 (expert 2, host); GPU 3 slot 7 (expert 0, host)
    assert r.cold.tolist() == [[0, 2], [0, 3], [0, 7]]
    assert r.from_peer.tolist() == [True, False, False]
    assert r.ready_in_s.tolist() == [0.0, 4.0, 0.0, 4.0]
    assert pool.meter.copy_seconds == pytest.approx(4 * 4.0 + 1.0 + 4.0 + 4.0)


def test_bad_peer_link():
    with pytest.raises(ValueError, match="peer_bandwidth"):
        _pool(peer_bandwidth=0.0)
    with pytest.raises(ValueError, match="link_group"):
        _pool(link_group=0)


def test_copies_queue_per_link_like_a_simulation():
    """Random plans applied over time (one layer, or every layer at once as an engine's start and EPLB's rebuilds
    do; peer links in groups of 2): every cold start's source is a peer exactly when another GPU of its group
    holds a loaded instance of the expert in that layer, and its ready time is what a first-come-first-served
    simulation of each GPU's host and peer links gives, the copies queued in (layer, slot) order."""
    rng = np.random.default_rng(21)
    L, G, S, E = 2, 4, 3, 5
    pool = FunctionPool(L, G, S, expert_bytes=4.0, link_bandwidth=1.0, keep_alive_s=2.0, peer_bandwidth=4.0,
                        link_group=2)
    free = {(g, peer): -math.inf for g in range(G) for peer in (False, True)}
    t = 0.0
    for step in range(60):
        t += float(rng.choice([0.0, 0.5, 3.0]))
        whole = step % 3 == 0
        layers = list(range(L)) if whole else [int(rng.integers(L))]
        p2l = rng.integers(-1, E, (len(layers), G * S))
        pool.advance_to(t)
        expert, ready_at = pool.expert.copy(), pool.ready_at.copy()
        plan = Plan.from_phy2log(p2l, E, G, S)
        r = pool.apply(plan, now=t) if whole else pool.apply(plan, now=t, layer=layers[0])
        want_cold = [[l, s] for i, l in enumerate(layers) for s in range(G * S)
                     if p2l[i, s] >= 0 and expert[l, s] != p2l[i, s]]
        assert r.cold.tolist() == want_cold
        for (l, s), peer in zip(r.cold.tolist(), r.from_peer):
            e, g = p2l[layers.index(l), s], s // S
            group = range((g // 2) * 2 * S, min((g // 2 + 1) * 2 * S, G * S))
            assert peer == any(q // S != g and expert[l, q] == e and ready_at[l, q] <= t for q in group)
            finish = max(free[g, bool(peer)], t) + (1.0 if peer else 4.0)
            free[g, bool(peer)] = finish
            assert pool.ready_at[l, s] == pytest.approx(finish, rel=1e-12)


def test_copy_sources_rejects_bad_rows():
    pool = FunctionPool(2, 4, 2, expert_bytes=1.0, link_bandwidth=1.0, peer_bandwidth=4.0, link_group=2)
    for layers, rows, match in (([5], np.zeros((1, 8)), "layers"), ([0], np.zeros((3, 8)), "shape"),
                                ([0], np.zeros((1, 12)), "shape"), ([0], np.zeros(8), "shape"),
                                ([0], np.full((1, 8), -2), "entries")):
        with pytest.raises(ValueError, match=match):
            pool.copy_sources(layers, rows)


def _reference_advance(expert, in_plan, last_used, keep_alive, t0, t, S):
    """The meter from t0 to t as whole-array numpy (a second code path to the pool's compiled pass and its O(1)
    quiet interval): (GB-s factor: instance-seconds, GPU-seconds, releases), releasing in `expert`."""
    live = expert >= 0
    deadline = np.where(live, last_used + keep_alive, -np.inf)
    end = np.minimum(np.where(in_plan, np.inf, deadline), t)
    end = np.where(live, np.maximum(end, t0), t0)
    L, P = expert.shape
    per_gpu = end.reshape(L, P // S, S).max(axis=(0, 2))
    gone = live & ~in_plan & (deadline <= t)
    expert[gone] = -1
    return float((end - t0).sum()), float((per_gpu - t0).sum()), int(gone.sum())


_STEP = st.tuples(
    st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.5, 7.0]),  # time to the next step (deadlines are hit exactly)
    st.sampled_from(["advance", "apply", "prewarm"]),
    st.lists(st.integers(-1, 2), min_size=8, max_size=8),  # a plan of 2 layers x 4 slots (2 GPUs x 2)
    st.integers(0, 7))  # the prewarmed slot


@settings(max_examples=80, deadline=None)
@given(st.sampled_from([0.0, 1.0, 3.0, math.inf]), st.lists(_STEP, min_size=1, max_size=25))
@example(1.0, [(0.0, "apply", [0, 1, -1, -1, -1, -1, -1, -1], 0),  # expert 1 idle from t = 1, due at t = 2:
               (1.0, "apply", [0, -1, -1, -1, -1, -1, -1, -1], 0),  # a pass at 1.5 sees it, 2.0 must release it
               (0.5, "advance", [-1] * 8, 0), (0.5, "advance", [-1] * 8, 0)])
def test_meter_matches_a_whole_array_reference(keep_alive, steps):
    """advance_to's compiled pass and its O(1) charge between releases give the meter and the releases that the
    whole-array formula gives, step by step, whatever plans, prewarms and clock steps come between; where the pool
    says the step is quiet (FunctionPool.quiet: only the meter moves), nothing is released."""
    pool = FunctionPool(2, 2, 2, expert_bytes=GB, link_bandwidth=GB, keep_alive_s=keep_alive)
    ref_expert = pool.expert.copy()
    inst_s = gpu_s = 0.0
    releases = 0
    t = 0.0
    for dt, action, p2l, slot in steps:
        t0, t = t, t + dt
        quiet = pool.quiet(t)
        if t > t0:
            i, g, r = _reference_advance(ref_expert, pool.in_plan.copy(), pool.last_used.copy(), keep_alive, t0, t,
                                         pool.slots_per_gpu)
            inst_s, gpu_s, releases = inst_s + i, gpu_s + g, releases + r
            assert not (quiet and r)
        pool.advance_to(t)
        np.testing.assert_array_equal(pool.expert, ref_expert)
        assert pool.meter.gb_seconds == pytest.approx(inst_s, rel=1e-12, abs=1e-12)
        assert pool.meter.gpu_seconds == pytest.approx(gpu_s, rel=1e-12, abs=1e-12)
        assert pool.meter.releases == releases
        if action == "apply":
            pool.apply(Plan.from_phy2log(np.reshape(p2l, (2, 4)), 3, 2, 2), now=t)
        elif action == "prewarm" and not pool.in_plan[slot // 4, slot % 4]:
            pool.prewarm(slot // 4, slot % 4, 1, now=t)
        ref_expert = pool.expert.copy()
