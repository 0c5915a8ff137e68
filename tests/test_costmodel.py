"""moeless.costmodel: the roofline against hand computations, the paper's Equations 1 and 2 against a
brute-force evaluation written from the paper's formulas, end to end through the simulator."""
import numpy as np
import pytest

from moeless.costmodel import PaperLinearCost, RooflineCost, equation2_cost
from moeless.specs import HardwareSpec, ModelSpec

TINY = ModelSpec("tiny", num_moe_layers=1, num_experts=2, top_k=1, hidden_size=4, moe_intermediate_size=8)
HW = HardwareSpec("toy", peak_flops=1000.0, hbm_bandwidth=100.0, memory_bytes=1e4, link_bandwidth=10.0,
                  link_group=2, host_bandwidth=5.0, launch_s=0.5)


def test_roofline_by_hand():
    cost = RooflineCost(TINY, HW)
    # one expert: 3*4*8 = 96 weights, 192 bytes, 192 FLOP per pair, 2*(4+8)*2 = 48 activation bytes per pair
    assert (TINY.expert_bytes, TINY.flops_per_token, TINY.activation_bytes_per_token) == (192, 192, 48)
    # 3 pairs: compute 0.576 s < memory (192 + 144) / 100 = 3.36 s, plus the 0.5 s launch floor
    assert cost.replica_time(3) == pytest.approx(3.86)
    assert cost.replica_time(0) == 0.0
    # expert 0: 3 pairs on GPU 0 and 1 pair on GPU 1; expert 1: 2 pairs on GPU 1
    rt = np.array([[3.0, 1.0], [2.0, 0.0]])
    gpu = np.array([[0, 1], [1, -1]])
    t = cost.layer_times(rt, gpu, 2, tokens=6)
    # GPU 1 reads two experts: 2.4 + 0.5 + 2.88 + 0.5
    assert t.compute == pytest.approx(6.28)
    # each GPU receives 3 pairs, half from its peer, 8 bytes each, over the 10 B/s link (a group of 2)
    assert t.a2a == pytest.approx(3 * 0.5 * 8 / 10)
    assert t.moe_latency == pytest.approx(6.28 + 2 * 1.2)
    # replicas of one expert on one GPU share one weight read
    merged = cost.layer_times(np.array([[2.0, 1.0], [0.0, 0.0]]), np.array([[0, 0], [1, -1]]), 2, tokens=3)
    assert merged.compute == pytest.approx(3.86)
    assert cost.cold_start_s() == pytest.approx(192 / 5.0)
    assert cost.cold_start_s(from_peer=True) == pytest.approx(192 / 10.0)


def test_pcie_beyond_the_link_group():
    cost = RooflineCost(TINY, HW.replace(link_group=2))
    pairs = np.array([4.0, 4.0, 4.0, 4.0])
    # 4 GPUs: 3/4 of a GPU's pairs come from peers, 1/3 of those over the link, 2/3 over PCIe
    moved = 4 * 0.75 * 8
    assert cost.a2a_gpu(pairs, 4) == pytest.approx(np.full(4, max(moved / 3 / 10, moved * 2 / 3 / 5)))


def brute_force_paper(W, gpu, G, alpha, beta, t_misc, m_misc, m_e):
    """Equations 1 and 2, written loop by loop from the paper's text."""
    T = C = 0.0
    for l in range(W.shape[0]):
        t_rep = max(alpha * W[l, e, r] for e in range(W.shape[1]) for r in range(W.shape[2]) if gpu[l, e, r] >= 0)
        t_g = [beta * sum(W[l, e, r] for e in range(W.shape[1]) for r in range(W.shape[2]) if gpu[l, e, r] == g)
               for g in range(G)]
        mem = m_e * sum(1 for e in range(W.shape[1]) for r in range(W.shape[2]) if gpu[l, e, r] >= 0)
        T += t_rep + 2 * max(t_g) + t_misc
        C += (t_rep + 2 * max(t_g)) * mem + t_misc * m_misc
    return T, C


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equations_1_and_2_exact(seed):
    rng = np.random.default_rng(seed)
    L, E, R, G = 3, 4, 3, 3
    gpu = rng.integers(-1, G, size=(L, E, R))
    gpu[:, :, 0] = rng.integers(0, G, size=(L, E))  # every expert has a replica
    W = np.where(gpu >= 0, rng.integers(0, 50, size=(L, E, R)), 0).astype(float)
    alpha, beta, t_misc, m_misc = 1e-3, 2e-4, 5e-3, 7.0
    cost = PaperLinearCost(TINY, alpha, beta, t_misc, m_misc)
    times = cost.layer_times(W, gpu, G, tokens=W.sum((1, 2)))
    T = float((times.moe_latency + times.misc).sum())
    C = float(equation2_cost(times, gpu, TINY.expert_bytes, m_misc).sum())
    T_ref, C_ref = brute_force_paper(W, gpu, G, alpha, beta, t_misc, m_misc, TINY.expert_bytes)
    assert T == pytest.approx(T_ref, rel=1e-12)
    assert C == pytest.approx(C_ref, rel=1e-12)


def test_bad_layouts():
    cost = RooflineCost(TINY, HW)
    with pytest.raises(ValueError, match="replica_gpu must lie"):
        cost.layer_times(np.ones((2, 1)), np.array([[0], [5]]), 2, 2)
    with pytest.raises(ValueError, match="must be 0 where"):
        cost.layer_times(np.ones((2, 1)), np.array([[0], [-1]]), 2, 2)
    with pytest.raises(ValueError, match="alpha"):
        PaperLinearCost(TINY, -1.0, 0.0)


def test_simulator_reproduces_equation_1_for_megatron():
    """End to end: with the linear model, the simulator's per-layer latencies of Megatron-LM equal Equation 1
    evaluated by hand from the same routing (regenerated from the seed)."""
    from moeless.sim import engine

    cfg = engine.SimConfig(window_s=15.0, iteration_budget=30, policies=("megatron",), cost_model="paper-linear",
                           alpha=2e-6, beta=3e-7, t_misc=1e-4, seed=3)
    res = engine.run_simulation(cfg)
    setup = engine.build_setup(cfg)
    rng = np.random.default_rng(cfg.seed)
    m, G = setup.model, cfg.gpus
    per = m.num_experts // G
    lat_ref, eq2_ref = [], 0.0
    for chunk in engine._chunks(setup, rng):
        for i in range(len(chunk.tokens)):
            W = chunk.loads[i].astype(float)  # [L, E]
            t_rep = cfg.alpha * W.max(1)
            t_g = cfg.beta * W.reshape(m.num_moe_layers, G, per).sum(2).max(1)
            lat = t_rep + 2 * t_g
            lat_ref.append(lat)
            m_misc = m.dense_params_per_layer * m.bytes_per_param * G
            eq2_ref += chunk.weight[i] * float((lat * m.num_experts * m.expert_bytes + cfg.t_misc * m_misc).sum())
    lat, _ = res.policies["megatron"].latencies
    assert np.allclose(lat, np.concatenate(lat_ref), rtol=1e-6)
    assert res.policies["megatron"].eq2_byte_s == pytest.approx(eq2_ref, rel=1e-9)


@pytest.mark.parametrize("cost", [RooflineCost(TINY, HW), PaperLinearCost(TINY, 0.3, 0.07, 0.5)],
                         ids=["roofline", "paper-linear"])
def test_slot_layer_times_match_the_padded_layout(cost):
    """The per-slot pricing against the [..., E, R] one on random plans (two replicas of one expert on one GPU
    included): the same numbers, bit for bit (the simulator's results must not move)."""
    from moeless.planner import Plan

    rng = np.random.default_rng(3)
    G, S, E, L = 3, 4, 5, 6
    p2l = np.where(rng.random((L, G * S)) < 0.8, rng.integers(0, E, (L, G * S)), -1)
    p2l[:, :E] = np.arange(E)  # every expert resident
    p2l[:, E] = 0  # expert 0 twice on GPU 1 (slots 4, 5) in every layer
    plan = Plan.from_phy2log(p2l, E, G, S)
    l2p = plan.log2phy
    rt = np.where(l2p >= 0, rng.integers(0, 9, l2p.shape), 0).astype(np.float64)
    slot = np.zeros((L, G * S))
    for li, e, r in zip(*np.nonzero(l2p >= 0)):
        slot[li, l2p[li, e, r]] = rt[li, e, r]
    tokens = rt.sum((1, 2))
    want = cost.layer_times(rt, plan.replica_gpu, G, tokens)
    got = cost.slot_layer_times(slot, p2l, G, tokens)
    for field in ("compute", "a2a", "misc"):
        assert np.array_equal(getattr(got, field), getattr(want, field)), field
    with pytest.raises(ValueError, match="slot_tokens"):
        cost.slot_layer_times(np.where(p2l < 0, 1.0, slot), p2l, G, tokens)
    with pytest.raises(ValueError, match="num_gpus"):
        cost.slot_layer_times(slot, p2l, 5, tokens)
