"""Host syncs of a decode-sized fused_moe call with a plan, counted as CUDA would see them; CUDA-graph capture.

On CPU the Triton path runs under the interpreter with MOELESS_DEBUG=0, which is the path a GPU takes (value
checks off): moeless_kernels.sync_audit names every op that would make the host wait for the device. The
audit is first shown to see each kind of sync, so a zero count means something. With a GPU the same test also
runs under torch.cuda.set_sync_debug_mode("error"), the device's own witness, and a decode layer is captured
in a CUDA graph and replayed on new inputs.
"""
import pytest
import torch

from moeless_kernels.fused_moe import ReplicaPlan, fused_moe
from moeless_kernels.sync_audit import count_host_syncs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # Triton: CUDA, or the interpreter on CPU


def test_audit_sees_every_kind_of_host_sync():
    t = torch.arange(6)
    mask = t > 2
    syncing = {
        "item": lambda: t[0].item(),
        "int": lambda: int(t[1]),
        "bool": lambda: bool(mask.any()),
        "tolist": lambda: t.tolist(),
        "cpu": lambda: t.cpu(),
        "nonzero": lambda: torch.nonzero(t),
        "boolean mask": lambda: t[mask],
        "boolean mask store": lambda: t.clone().__setitem__(mask, 0),
        "bincount": lambda: torch.bincount(t, minlength=8),
        "unique": lambda: torch.unique(t),
        "repeat_interleave without output_size": lambda: torch.repeat_interleave(t, t),
        "masked_select": lambda: torch.masked_select(t, mask),
    }
    try:
        import numpy  # noqa: F401 - torch works without it; .numpy() needs it
        syncing["numpy"] = lambda: t.numpy()
    except ImportError:
        pass
    for name, call in syncing.items():
        with count_host_syncs() as syncs:
            call()
        assert len(syncs) >= 1, name
    with count_host_syncs() as syncs:  # device-side work of the same kinds, with shapes known to the host
        torch.repeat_interleave(t, t, output_size=15)
        torch.zeros(8, dtype=torch.long).scatter_add_(0, t, torch.ones_like(t))
        torch.where(mask, t, -1)
        torch.searchsorted(torch.cumsum(t, 0), t)
        torch.sort(t, stable=True)
    assert len(syncs) == 0, syncs.report()


def _decode_layer(plan_kind: str, seed: int = 0):
    """T = 8 decode tokens, E = 6 experts, K = 2; a plan of the given kind, all on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    T, H, I, E, K = 8, 32, 16, 6, 2
    hidden = torch.randn(T, H, generator=g)
    gate_up = torch.randn(E, 2 * I, H, generator=g) / H**0.5
    down = torch.randn(E, H, I, generator=g) / I**0.5
    logits = torch.randn(T, E, generator=g)
    weights, ids = torch.topk(torch.softmax(logits, -1), K)
    phy2log = torch.tensor([0, 1, 2, 3, 4, 5, 1, 4, -1])  # experts 1 and 4 replicated, one free slot
    plan = None
    if plan_kind == "replicated":
        plan = ReplicaPlan.from_phy2log(phy2log, E)
        counts = torch.bincount(ids.flatten(), minlength=E)
        quotas = torch.zeros_like(plan.log2phy)
        quotas[:, 0] = counts
        quotas[[1, 4], 0] = counts[[1, 4]] // 3  # uneven split between the two replicas
        quotas[[1, 4], 1] = counts[[1, 4]] - counts[[1, 4]] // 3
        plan = ReplicaPlan(plan.phy2log, plan.log2phy, plan.logcnt, replica_tokens=quotas)
    elif plan_kind == "rank_local":
        # this rank holds slots 5..8 (experts 5, 1, 4, free) in a 3-row weight buffer
        local = torch.arange(9) >= 5
        slot_to_weight = torch.tensor([-1, -1, -1, -1, -1, 0, 1, 2, -1])
        plan = ReplicaPlan.from_phy2log(phy2log, E, local_slots=local, slot_to_weight=slot_to_weight)
        gate_up, down = gate_up[[5, 1, 4]], down[[5, 1, 4]]
    move = (lambda t: t.to(DEVICE))
    return (move(hidden), move(gate_up), move(down), move(logits), move(ids.int()), move(weights),
            None if plan is None else plan.to(DEVICE), K)


@pytest.mark.parametrize("routing", ["router_logits", "topk_ids"])
@pytest.mark.parametrize("plan_kind", ["identity", "replicated", "rank_local"])
def test_fused_moe_with_a_plan_makes_no_host_sync(routing, plan_kind, monkeypatch):
    hidden, gate_up, down, logits, ids, weights, plan, top_k = _decode_layer(plan_kind)
    route = dict(router_logits=logits, top_k=top_k) if routing == "router_logits" else \
        dict(topk_ids=ids, topk_weights=weights)
    monkeypatch.setenv("MOELESS_DEBUG", "0")  # the GPU's default: no value checks on the hot path
    fused_moe(hidden, gate_up, down, plan=plan, backend="triton", **route)  # first call: the plan's checks, once
    with count_host_syncs() as syncs:
        got = fused_moe(hidden, gate_up, down, plan=plan, backend="triton", **route)
    assert len(syncs) == 0, syncs.report()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fused_moe(hidden, gate_up, down, plan=plan, backend="triton", **route)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # and it is the layer's output: the torch path with every value check on
    monkeypatch.setenv("MOELESS_DEBUG", "1")
    want = fused_moe(hidden.cpu(), gate_up.cpu(), down.cpu(), plan=None if plan is None else plan.to("cpu"),
                     backend="torch", **{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in route.items()})
    torch.testing.assert_close(got.out.cpu(), want.out, atol=1e-5, rtol=1e-5)
    assert got.dispatch.dropped_count == 0


def test_value_checks_stay_available_behind_the_debug_flag(monkeypatch):
    hidden, gate_up, down, logits, ids, weights, plan, top_k = _decode_layer("replicated")
    bad = ids.clone()
    bad[0, 0] = 6  # no such expert
    monkeypatch.setenv("MOELESS_DEBUG", "1")
    with pytest.raises(ValueError, match="topk_ids"):
        fused_moe(hidden, gate_up, down, topk_ids=bad, topk_weights=weights, plan=plan, backend="triton")
    with count_host_syncs() as syncs:
        fused_moe(hidden, gate_up, down, topk_ids=ids, topk_weights=weights, plan=plan, backend="triton")
    assert len(syncs) > 0  # the checks themselves are what syncs
    monkeypatch.setenv("MOELESS_DEBUG", "yes")
    with pytest.raises(ValueError, match="MOELESS_DEBUG"):
        fused_moe(hidden, gate_up, down, topk_ids=ids, topk_weights=weights, plan=plan, backend="triton")


def test_unchecked_bad_routing_is_dropped_and_reported_not_read_out_of_range(monkeypatch):
    # without checks (a GPU's default) an id past the experts cannot be refused without a sync: its pair is
    # dropped, reported in result.dispatch, and contributes zero; every other pair is computed
    hidden, gate_up, down, logits, ids, weights, plan, top_k = _decode_layer("replicated")
    bad = ids.clone()
    bad[0, 0] = 6
    monkeypatch.setenv("MOELESS_DEBUG", "0")
    got = fused_moe(hidden, gate_up, down, topk_ids=bad, topk_weights=weights, plan=plan, backend="triton")
    assert got.dispatch.dropped_indices.tolist() == [0]
    kept = weights.clone()
    kept[0, 0] = 0
    monkeypatch.setenv("MOELESS_DEBUG", "1")
    want = fused_moe(hidden, gate_up, down, topk_ids=ids, topk_weights=kept, plan=plan, backend="torch")
    torch.testing.assert_close(got.out, want.out, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_decode_layer_has_no_host_sync_and_captures_in_a_cuda_graph():
    torch.manual_seed(0)
    T, H, I, E, K = 16, 2048, 768, 128, 8  # Qwen3-30B-A3B's expert shapes, one decode step
    hidden = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    gate_up = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) * H**-0.5
    down = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) * I**-0.5
    logits = torch.randn(T, E, device="cuda")
    plan = ReplicaPlan.from_phy2log(torch.cat([torch.arange(E), torch.arange(8)]).cuda(), E)

    def layer():
        return fused_moe(hidden, gate_up, down, router_logits=logits, top_k=K, renormalize=True, plan=plan,
                         backend="triton").out

    layer()  # warm-up: compiles, looks up the tuned table, caches the plan's tensors
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync in the layer raises
    try:
        layer()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = layer()
    hidden.copy_(torch.randn_like(hidden))
    logits.copy_(torch.randn_like(logits))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, layer())  # same kernels, same inputs: bitwise
