"""Hypothesis properties of the kernels: dispatch and align invariants over random plans and capacities, and
lossless replication of fused_moe over random plans.

Separate from the kernel tests so that a machine without hypothesis (a GPU machine offline) skips only these.
"""
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from moeless_kernels.dispatch import max_aligned_blocks  # noqa: E402
from moeless_kernels.fused_moe import fused_moe  # noqa: E402
from test_dispatch import BACKENDS, _plan, moe_align, replica_dispatch  # noqa: E402
from test_fused_moe import make_layer, random_plan  # noqa: E402


@st.composite
def _dispatch_problem(draw):
    num_experts = draw(st.integers(1, 6))
    logcnt = draw(st.lists(st.integers(0, 3), min_size=num_experts, max_size=num_experts))
    if not any(logcnt):
        logcnt[0] = 1
    routable = [e for e, n in enumerate(logcnt) if n > 0]
    top_k = draw(st.integers(1, len(routable)))
    num_tokens = draw(st.integers(0, 30))
    free_slots = draw(st.integers(0, 2))
    seed = draw(st.integers(0, 2**31 - 1))
    skew = draw(st.booleans())  # half the time, pile tokens onto the first routable experts
    gen = torch.Generator().manual_seed(seed)
    num_slots = sum(logcnt) + free_slots
    log2phy, logcnt_t = _plan(logcnt, num_slots, gen)
    rows = []
    for _ in range(num_tokens):
        order = list(range(len(routable))) if skew else torch.randperm(len(routable), generator=gen).tolist()
        rows.append([routable[i] for i in order[:top_k]])
    topk_ids = torch.tensor(rows, dtype=torch.int32).reshape(num_tokens, top_k)
    counts = torch.bincount(topk_ids.long().flatten(), minlength=num_experts)
    replica_tokens = None
    if draw(st.booleans()):
        replica_tokens = torch.zeros_like(log2phy)
        for e, n in enumerate(logcnt):
            if n:
                cuts = sorted(draw(st.lists(st.integers(0, int(counts[e])), min_size=n - 1, max_size=n - 1)))
                bounds = [0] + cuts + [int(counts[e])]
                replica_tokens[e, :n] = torch.tensor([b - a for a, b in zip(bounds, bounds[1:])])
    policy = draw(st.sampled_from(["none", "position", "probability"]))
    kwargs = dict(num_slots=num_slots, capacity_policy=policy)
    if policy != "none":
        if draw(st.booleans()):
            kwargs["slot_capacity"] = draw(st.integers(0, 4))
        else:
            kwargs["slot_capacity"] = torch.randint(0, 5, (num_slots,), generator=gen)
        kwargs["topk_weights"] = (torch.rand(num_tokens, top_k, generator=gen) * 4).floor()  # ties on purpose
    block_m = draw(st.sampled_from([1, 2, 4, 16]))
    local = torch.rand(num_slots, generator=gen) < 0.7 if draw(st.booleans()) else None
    return topk_ids, log2phy, logcnt_t, replica_tokens, kwargs, block_m, local


@settings(max_examples=60, deadline=None)
@given(_dispatch_problem())
def test_dispatch_and_align_invariants(problem):
    topk_ids, log2phy, logcnt, replica_tokens, kwargs, block_m, local = problem
    num_tokens, top_k = topk_ids.shape
    num_slots = kwargs["num_slots"]
    num_pairs = num_tokens * top_k
    result = replica_dispatch(topk_ids, log2phy, logcnt, replica_tokens, backend="torch", **kwargs)
    triton_result = replica_dispatch(topk_ids, log2phy, logcnt, replica_tokens, backend="triton", **kwargs)
    for field in ("slot_ids", "slot_counts", "dropped_indices"):
        assert torch.equal(getattr(result, field), getattr(triton_result, field)), field
    assert result.dropped_count == triton_result.dropped_count

    flat_ids = topk_ids.long().flatten()
    slots = result.slot_ids.long().flatten()
    kept = slots >= 0
    # routing unchanged: a kept pair sits in a replica of its own expert
    slot_owner = torch.full((num_slots,), -1, dtype=torch.long)
    for e in range(log2phy.shape[0]):
        slot_owner[log2phy[e, : int(logcnt[e])]] = e
    assert torch.equal(slot_owner[slots[kept]], flat_ids[kept])
    # drops are reported exactly
    assert result.dropped_count == result.dropped_indices.numel() == num_pairs - int(kept.sum())
    assert result.dropped_indices.tolist() == torch.nonzero(~kept).flatten().tolist()
    assert torch.equal(result.slot_counts.long(), torch.bincount(slots[kept], minlength=num_slots))
    capacity = kwargs.get("slot_capacity")
    if capacity is None:
        assert result.dropped_count == 0
        # each replica gets exactly its quota; the even split differs by at most one, larger chunks first
        counts = torch.bincount(flat_ids, minlength=log2phy.shape[0])
        for e in range(log2phy.shape[0]):
            got = [int(result.slot_counts[log2phy[e, j]]) for j in range(int(logcnt[e]))]
            if replica_tokens is not None:
                assert got == replica_tokens[e, : int(logcnt[e])].tolist()
            elif got:
                assert sum(got) == int(counts[e]) and max(got) - min(got) <= 1 and got == sorted(got, reverse=True)
    else:
        cap = capacity if isinstance(capacity, torch.Tensor) else torch.full((num_slots,), capacity)
        assert bool((result.slot_counts <= cap).all())

    aligned = moe_align(result.slot_ids, num_slots, block_m, local, backend="torch")
    triton_aligned = moe_align(result.slot_ids, num_slots, block_m, local, backend="triton")
    assert torch.equal(aligned[0], triton_aligned[0]) and torch.equal(aligned[1], triton_aligned[1])
    assert aligned[2] == triton_aligned[2]
    sorted_ids, block_ids, n_pad = aligned
    assert n_pad % block_m == 0 and sorted_ids.numel() == n_pad and block_ids.numel() == n_pad // block_m
    # every kept pair of a local slot appears exactly once, in a block of its slot; the rest is padding
    is_local = torch.ones(num_slots, dtype=torch.bool) if local is None else local
    expected = torch.nonzero(kept & is_local[slots.clamp(min=0)]).flatten()
    real = sorted_ids[sorted_ids < num_pairs].long()
    assert sorted(real.tolist()) == expected.tolist()
    assert bool((sorted_ids[sorted_ids >= num_pairs] == num_pairs).all())
    row_slot = block_ids.long().repeat_interleave(block_m)
    assert torch.equal(slots[real], row_slot[sorted_ids < num_pairs])
    # blocks are in ascending slot order and each has at least one real pair (no empty-slot blocks)
    assert block_ids.tolist() == sorted(block_ids.tolist())
    if n_pad:
        assert bool((sorted_ids.view(-1, block_m) < num_pairs).any(dim=1).all())

    # static shapes: the same layout in a worst-case buffer (its length depends on shapes only), a -1 tail, and
    # the padded count as a device tensor; both backends agree
    for backend in BACKENDS:
        static_ids, static_blocks, count = moe_align(result.slot_ids, num_slots, block_m, local, backend=backend,
                                                     static_shapes=True)
        num_blocks = max_aligned_blocks(num_pairs, num_slots, block_m)
        assert static_blocks.numel() == num_blocks and static_ids.numel() == num_blocks * block_m
        assert isinstance(count, torch.Tensor) and count.tolist() == [n_pad]
        assert torch.equal(static_ids[:n_pad], sorted_ids) and bool((static_ids[n_pad:] == num_pairs).all())
        assert torch.equal(static_blocks[: n_pad // block_m], block_ids)
        assert bool((static_blocks[n_pad // block_m:] == -1).all())




@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), num_experts=st.integers(1, 7), top_k=st.integers(1, 3),
       extra=st.integers(0, 6), free=st.integers(0, 3), split=st.sampled_from(["even", "random"]))
def test_random_plans_lossless_torch_path(seed, num_experts, top_k, extra, free, split):
    top_k = min(top_k, num_experts)
    hidden, gate_up, down, logits = make_layer(10, 16, 8, num_experts, seed=seed)
    base = fused_moe(hidden, gate_up, down, router_logits=logits, top_k=top_k, backend="torch")
    plan = random_plan(num_experts, extra, free, seed, split=split, topk_ids=base.topk_ids)
    replicated = fused_moe(hidden, gate_up, down, router_logits=logits, top_k=top_k, plan=plan, backend="torch")
    assert torch.equal(replicated.out, base.out)
