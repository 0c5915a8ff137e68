"""The function pool on a simulated clock against hand computation."""
import math

import numpy as np
import pytest

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
