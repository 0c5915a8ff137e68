"""replica_dispatch and moe_align against a plain-Python brute force and each other's backend (hypothesis invariants:
tests/test_kernel_properties.py).

The Triton path runs under the interpreter on CPU: tiny shapes (its block is 16 pairs there, so even these
shapes span several programs and exercise the cross-block offsets).
"""
import pytest
import torch

from moeless_kernels.dispatch import DispatchResult, max_aligned_blocks, moe_align_reference, replica_dispatch_reference
from moeless_kernels.dispatch import moe_align as _moe_align
from moeless_kernels.dispatch import replica_dispatch as _replica_dispatch
from triton_device import on_triton_device


def replica_dispatch(*args, **kwargs):
    """replica_dispatch with Triton's inputs on the Triton device (CUDA on a GPU machine), results on the CPU."""
    return on_triton_device(_replica_dispatch, *args, **kwargs)


def moe_align(*args, **kwargs):
    """moe_align with Triton's inputs on the Triton device (CUDA on a GPU machine), results on the CPU."""
    return on_triton_device(_moe_align, *args, **kwargs)

BACKENDS = ["torch", "triton"]


def _plan(logcnt, num_slots, gen):
    """log2phy [E, max(logcnt)] with every replica in its own random slot of [0, num_slots), -1 pad."""
    num_experts, max_replicas = len(logcnt), max(1, max(logcnt))
    slots = torch.randperm(num_slots, generator=gen).tolist()
    log2phy = torch.full((num_experts, max_replicas), -1, dtype=torch.int64)
    for e, n in enumerate(logcnt):
        for j in range(n):
            log2phy[e, j] = slots.pop()
    return log2phy, torch.tensor(logcnt, dtype=torch.int64)


def _brute_force_dispatch(topk_ids, log2phy, logcnt, replica_tokens, num_slots, capacity, policy, weights):
    """Pair by pair in Python: chunk each expert's flat-ordered pairs, then apply the slot capacity."""
    flat = topk_ids.flatten().tolist()
    slot_of = [-1] * len(flat)
    for e in range(log2phy.shape[0]):
        pairs = [i for i, x in enumerate(flat) if x == e]
        n = int(logcnt[e])
        if replica_tokens is None:
            sizes = [len(pairs) // n + (1 if j < len(pairs) % n else 0) for j in range(n)] if n else []
        else:
            sizes = replica_tokens[e, :n].tolist()
        pos = 0
        for j, size in enumerate(sizes):
            for i in pairs[pos:pos + size]:
                slot_of[i] = int(log2phy[e, j])
            pos += size
        assert pos == len(pairs)
    if capacity is not None:
        w = weights.flatten().tolist() if weights is not None else None
        for p in range(num_slots):
            members = [i for i, s in enumerate(slot_of) if s == p]
            if policy == "probability":
                members = sorted(members, key=lambda i: (-w[i], i))
            for i in members[int(capacity[p]):]:
                slot_of[i] = -1
    counts = [sum(1 for s in slot_of if s == p) for p in range(num_slots)]
    dropped = [i for i, s in enumerate(slot_of) if s < 0]
    return slot_of, counts, dropped


def _brute_force_align(slot_ids, num_slots, block_m, local_slots):
    flat = slot_ids.flatten().tolist()
    sentinel = len(flat)
    rows, blocks = [], []
    for p in range(num_slots):
        if local_slots is not None and not bool(local_slots[p]):
            continue
        members = [i for i, s in enumerate(flat) if s == p]
        if not members:
            continue
        num_blocks = -(-len(members) // block_m)
        rows += members + [sentinel] * (num_blocks * block_m - len(members))
        blocks += [p] * num_blocks
    return rows, blocks


def _assert_dispatch_equals(result, want):
    slot_of, counts, dropped = want
    assert isinstance(result, DispatchResult)
    assert result.slot_ids.dtype == torch.int32 and result.slot_counts.dtype == torch.int32
    assert result.dropped_indices.dtype == torch.int64
    assert result.slot_ids.flatten().tolist() == slot_of
    assert result.slot_counts.tolist() == counts
    assert result.dropped_indices.tolist() == dropped
    assert result.dropped_count == len(dropped)


# (T, K, logcnt per expert, free slots, options): edge shapes commented
DISPATCH_CASES = [
    (1, 1, [1], 0, dict()),  # T = 1, E = 1
    (9, 2, [1, 2, 3, 1, 2, 1, 3], 2, dict()),  # prime E, uneven replica counts, free slots
    (13, 3, [2, 0, 3, 1, 1, 2, 1], 0, dict(idle_expert=1)),  # expert 1: no tokens, no replica
    (11, 2, [3, 3, 3], 1, dict(one_expert=True)),  # every token to expert 2, the others share the rest
    (8, 1, [3], 0, dict()),  # K = 1, E = 1: all pairs to one expert with three replicas
    (7, 4, [2, 1, 3, 1], 0, dict(quotas=True)),  # K = E, explicit replica_tokens (zeros allowed)
    (10, 2, [2, 1, 2, 1, 1], 0, dict(capacity=3, policy="position")),
    (10, 2, [2, 1, 2, 1, 1], 1, dict(capacity="tensor", policy="position", quotas=True)),
    (10, 2, [2, 1, 2, 1, 1], 0, dict(capacity=2, policy="probability")),
    (12, 3, [1, 2, 1, 3, 1, 1, 2], 0, dict(capacity="tensor", policy="probability", tied_weights=True)),
    (3, 2, [3, 2, 1, 3], 0, dict()),  # fewer pairs than replicas: some replicas get nothing
]


def _make_case(case, seed):
    num_tokens, top_k, logcnt, free_slots, opts = case
    gen = torch.Generator().manual_seed(seed)
    num_experts = len(logcnt)
    num_slots = sum(logcnt) + free_slots
    log2phy, logcnt_t = _plan(logcnt, num_slots, gen)
    experts_with_replicas = torch.tensor([e for e, n in enumerate(logcnt) if n > 0])
    if opts.get("one_expert"):
        # every token's first choice is expert 2; the second alternates between experts 0 and 1
        topk_ids = torch.full((num_tokens, top_k), 2, dtype=torch.int32)
        topk_ids[:, 1] = torch.arange(num_tokens) % 2
    else:
        # distinct experts per token, as a router gives
        choice = torch.stack([experts_with_replicas[torch.randperm(len(experts_with_replicas), generator=gen)[:top_k]]
                              for _ in range(num_tokens)]) if num_tokens else torch.zeros(0, top_k)
        topk_ids = choice.to(torch.int32).reshape(num_tokens, top_k)
    counts = torch.bincount(topk_ids.long().flatten(), minlength=num_experts)
    kwargs = dict(num_slots=num_slots)
    replica_tokens = None
    if opts.get("quotas"):
        replica_tokens = torch.zeros_like(log2phy)
        for e, n in enumerate(logcnt):
            if n:  # random composition of counts[e] into n parts, zeros allowed
                cuts = torch.sort(torch.randint(0, int(counts[e]) + 1, (n - 1,), generator=gen)).values.tolist()
                bounds = [0] + cuts + [int(counts[e])]
                replica_tokens[e, :n] = torch.tensor([b - a for a, b in zip(bounds, bounds[1:])])
    capacity = opts.get("capacity")
    if capacity == "tensor":
        capacity = torch.randint(0, 4, (num_slots,), generator=gen)
    if capacity is not None:
        kwargs.update(slot_capacity=capacity, capacity_policy=opts["policy"])
        if opts["policy"] == "probability":
            weights = torch.rand(num_tokens, top_k, generator=gen)
            if opts.get("tied_weights"):
                weights = (weights * 3).floor() / 3  # many exact ties: the lower flat index must win
            kwargs["topk_weights"] = weights
    return topk_ids, log2phy, logcnt_t, replica_tokens, kwargs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_index", range(len(DISPATCH_CASES)))
def test_dispatch_against_brute_force(case_index, backend):
    topk_ids, log2phy, logcnt, replica_tokens, kwargs = _make_case(DISPATCH_CASES[case_index], case_index)
    result = replica_dispatch(topk_ids, log2phy, logcnt, replica_tokens, backend=backend, **kwargs)
    capacity = kwargs.get("slot_capacity")
    if isinstance(capacity, int):
        capacity = [capacity] * kwargs["num_slots"]
    want = _brute_force_dispatch(topk_ids, log2phy, logcnt, replica_tokens, kwargs["num_slots"], capacity,
                                 kwargs.get("capacity_policy"), kwargs.get("topk_weights"))
    _assert_dispatch_equals(result, want)


def test_dispatch_reference_larger_against_brute_force():
    gen = torch.Generator().manual_seed(11)
    logcnt = [1, 4, 2, 1, 3, 1, 1, 2, 1, 5, 1, 1, 2]
    topk_ids, log2phy, logcnt_t, _, _ = _make_case((200, 4, logcnt, 3, dict()), 99)
    weights = torch.rand(200, 4, generator=gen)
    num_slots = sum(logcnt) + 3
    for kwargs in [dict(), dict(slot_capacity=20, capacity_policy="position"),
                   dict(slot_capacity=20, capacity_policy="probability", topk_weights=weights)]:
        result = replica_dispatch_reference(topk_ids, log2phy, logcnt_t, num_slots=num_slots, **kwargs)
        want = _brute_force_dispatch(topk_ids, log2phy, logcnt_t, None, num_slots,
                                     [20] * num_slots if kwargs else None,
                                     kwargs.get("capacity_policy"), weights)
        _assert_dispatch_equals(result, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dispatch_zero_tokens(backend):
    log2phy, logcnt = _plan([1, 2], 4, torch.Generator().manual_seed(0))
    result = replica_dispatch(torch.empty(0, 2, dtype=torch.int32), log2phy, logcnt, backend=backend)
    assert result.slot_ids.shape == (0, 2) and result.slot_ids.dtype == torch.int32
    assert result.slot_counts.tolist() == [0] * (int(log2phy.max()) + 1)
    assert result.dropped_count == 0 and result.dropped_indices.numel() == 0


def test_dispatch_default_num_slots_is_max_slot_plus_one():
    log2phy = torch.tensor([[5, -1], [0, 2]])
    result = replica_dispatch(torch.tensor([[0, 1], [1, 0]]), log2phy, torch.tensor([1, 2]))
    assert result.slot_counts.shape == (6,)
    assert result.slot_ids.tolist() == [[5, 0], [2, 5]]


# ------------------------------------------------------------------------------------ moe_align


ALIGN_CASES = [
    # (T, K, P, block_m, local pattern): edge shapes commented
    (1, 1, 1, 4, None),  # T = 1, one slot
    (9, 2, 7, 4, None),  # prime P, T*K < a few blocks
    (13, 3, 5, 1, None),  # block_m = 1: no padding
    (8, 2, 6, 16, "half"),  # block_m > pairs per slot; only even slots local
    (10, 3, 4, 4, "none_local"),  # nothing local: empty permutation
    (6, 2, 3, 2, "drops"),  # -1 slots (dropped pairs) are skipped
]


def _align_inputs(case, seed):
    num_tokens, top_k, num_slots, block_m, pattern = case
    gen = torch.Generator().manual_seed(seed)
    slot_ids = torch.randint(0, num_slots, (num_tokens, top_k), generator=gen, dtype=torch.int32)
    local = None
    if pattern == "half":
        local = torch.arange(num_slots) % 2 == 0
    elif pattern == "none_local":
        local = torch.zeros(num_slots, dtype=torch.bool)
    elif pattern == "drops":
        slot_ids[torch.rand(num_tokens, top_k, generator=gen) < 0.4] = -1
    return slot_ids, num_slots, block_m, local


def _assert_align_equals(got, want):
    sorted_ids, block_ids, n_pad = got
    rows, blocks = want
    assert sorted_ids.dtype == torch.int32 and block_ids.dtype == torch.int32
    assert isinstance(n_pad, int) and n_pad == len(rows)
    assert sorted_ids.tolist() == rows
    assert block_ids.tolist() == blocks


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_index", range(len(ALIGN_CASES)))
def test_align_against_brute_force(case_index, backend):
    slot_ids, num_slots, block_m, local = _align_inputs(ALIGN_CASES[case_index], case_index)
    got = moe_align(slot_ids, num_slots, block_m, local, backend=backend)
    _assert_align_equals(got, _brute_force_align(slot_ids, num_slots, block_m, local))


def test_align_reference_larger_against_brute_force():
    slot_ids, num_slots, block_m, local = _align_inputs((300, 4, 37, 16, "half"), 5)
    got = moe_align_reference(slot_ids, num_slots, block_m, local)
    _assert_align_equals(got, _brute_force_align(slot_ids, num_slots, block_m, local))


@pytest.mark.parametrize("backend", BACKENDS)
def test_align_zero_tokens(backend):
    sorted_ids, block_ids, n_pad = moe_align(torch.empty(0, 2, dtype=torch.int32), 3, 4, backend=backend)
    assert n_pad == 0 and sorted_ids.numel() == 0 and block_ids.numel() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_worst_case_blocks_is_tight(backend):
    # every slot gets one pair: each pads to a full block, exactly max_aligned_blocks of them
    slot_ids = torch.arange(6, dtype=torch.int32)[:, None]
    _, blocks, count = moe_align(slot_ids, 6, 4, backend=backend, static_shapes=True)
    assert max_aligned_blocks(6, 6, 4) == 6 and blocks.tolist() == list(range(6)) and count.tolist() == [24]


# ------------------------------------------------------------------------------------ without value checks


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_pairs_without_a_replica_are_dropped_and_reported(backend, monkeypatch):
    # MOELESS_DEBUG=0: the path a GPU takes (no value check, no host sync). Pairs of an expert without a replica,
    # pairs beyond short quotas and (Triton) out-of-range ids get slot -1 and show in the drop report; the rest
    # is dispatched as usual. With checks on (MOELESS_DEBUG=1, or CPU tensors), the same input is a ValueError.
    topk_ids = torch.tensor([[0, 1], [1, 2], [2, 0], [1, 2]])
    log2phy = torch.tensor([[0, -1], [1, 2], [3, -1]])
    logcnt = torch.tensor([0, 2, 1])  # expert 0 has two pairs, no replica
    quotas = torch.tensor([[0, 0], [1, 1], [2, 0]])  # expert 1: 3 pairs, quotas for 2; expert 2: 3 pairs, 2
    monkeypatch.setenv("MOELESS_DEBUG", "1")
    with pytest.raises(ValueError, match="logcnt"):
        replica_dispatch(topk_ids, log2phy, logcnt, quotas, num_slots=4, backend=backend)
    monkeypatch.setenv("MOELESS_DEBUG", "0")
    result = replica_dispatch(topk_ids, log2phy, logcnt, quotas, num_slots=4, backend=backend)
    # flat pairs: 0:e0 1:e1 2:e1 3:e2 4:e2 5:e0 6:e1 7:e2 -> e1's pairs 1, 2 fill slots 1, 2; pair 6 has no quota;
    # e2's pairs 3, 4 fill slot 3; pair 7 has no quota
    assert result.slot_ids.flatten().tolist() == [-1, 1, 2, 3, 3, -1, -1, -1]
    assert result.dropped_indices.tolist() == [0, 5, 6, 7] and result.dropped_count == 4
    assert result.slot_counts.tolist() == [0, 1, 1, 2]
    if backend == "triton":
        bad = replica_dispatch(torch.tensor([[1, 3], [-1, 2]]), log2phy, torch.tensor([1, 2, 1]), num_slots=4,
                               backend=backend)
        assert bad.slot_ids.flatten().tolist() == [1, -1, -1, 3] and bad.dropped_count == 2


def test_dispatch_result_reports_drops_lazily():
    slot_ids = torch.tensor([[0, -1], [2, -1]], dtype=torch.int32)
    result = DispatchResult(slot_ids, torch.tensor([1, 0, 1], dtype=torch.int32))
    assert result._dropped_indices is None  # nothing computed (no host sync) until asked
    assert result.dropped_indices.tolist() == [1, 3] and result.dropped_count == 2
    given = DispatchResult(slot_ids, torch.zeros(3, dtype=torch.int32), 2, torch.tensor([1, 3]))
    assert given.dropped_count == 2
    with pytest.raises(ValueError, match="dropped_count"):
        DispatchResult(slot_ids, torch.zeros(3, dtype=torch.int32), 2, None)
    with pytest.raises(ValueError, match="dropped_count"):
        DispatchResult(slot_ids, torch.zeros(3, dtype=torch.int32), 1, torch.tensor([1, 3]))


# ------------------------------------------------------------------------------------ bad input


def _good():
    return dict(topk_ids=torch.tensor([[0, 1], [1, 2]]), log2phy=torch.tensor([[0, -1], [1, 2], [3, -1]]),
                logcnt=torch.tensor([1, 2, 1]))


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(topk_ids=torch.tensor([[0, 3], [1, 2]])), "topk_ids"),
        (dict(topk_ids=torch.tensor([[0, -1], [1, 2]])), "topk_ids"),
        (dict(topk_ids=torch.tensor([[0.0, 1.0]])), "topk_ids"),
        (dict(topk_ids=torch.tensor([0, 1])), "topk_ids"),
        (dict(logcnt=torch.tensor([0, 2, 1])), "logcnt"),  # expert 0 has tokens, no replica
        (dict(logcnt=torch.tensor([1, 3, 1])), "logcnt"),  # more replicas than log2phy columns
        (dict(logcnt=torch.tensor([1, 2])), "logcnt"),
        (dict(log2phy=torch.tensor([[0, -1], [1, -1], [3, -1]])), "log2phy"),  # replica 1 of expert 1: no slot
        (dict(log2phy=torch.tensor([[0, -1], [1, 0], [3, -1]])), "log2phy"),  # slot 0 holds two replicas
        (dict(num_slots=3), "log2phy"),  # slot 3 outside [0, 3)
        (dict(num_slots=-1), "num_slots"),
        (dict(replica_tokens=torch.tensor([[1, 0], [1, 0], [1, 0]])), "replica_tokens"),  # row 1 sums to 1, not 2
        (dict(replica_tokens=torch.tensor([[0, 1], [1, 1], [1, 0]])), "replica_tokens"),  # beyond logcnt[0]
        (dict(replica_tokens=torch.tensor([[1, 0], [3, -1], [1, 0]])), "replica_tokens"),
        (dict(replica_tokens=torch.tensor([[1, 0], [1, 1]])), "replica_tokens"),
        (dict(slot_capacity=2), "slot_capacity"),  # capacity without a policy
        (dict(slot_capacity=-1, capacity_policy="position"), "slot_capacity"),
        (dict(slot_capacity=torch.tensor([1, 1]), capacity_policy="position"), "slot_capacity"),
        (dict(slot_capacity=1, capacity_policy="probability"), "topk_weights"),
        (dict(slot_capacity=1, capacity_policy="probability", topk_weights=torch.ones(2, 3)), "topk_weights"),
        (dict(slot_capacity=1, capacity_policy="probability",
              topk_weights=torch.tensor([[1.0, float("nan")], [1.0, 1.0]])), "topk_weights"),
        (dict(capacity_policy="random"), "capacity_policy"),
        (dict(backend="gpu"), "backend"),
    ],
)
def test_dispatch_bad_input_raises(change, match):
    kwargs = {**_good(), **change}
    with pytest.raises(ValueError, match=match):
        replica_dispatch(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(slot_ids=torch.tensor([[0, 4]]), num_slots=4, block_m=2), "slot_ids"),
        (dict(slot_ids=torch.tensor([[0, -2]]), num_slots=4, block_m=2), "slot_ids"),
        (dict(slot_ids=torch.tensor([0, 1]), num_slots=4, block_m=2), "slot_ids"),
        (dict(slot_ids=torch.tensor([[0, 1]]), num_slots=0, block_m=2), "num_slots"),
        (dict(slot_ids=torch.tensor([[0, 1]]), num_slots=4, block_m=0), "block_m"),
        (dict(slot_ids=torch.tensor([[0, 1]]), num_slots=4, block_m=2, local_slots=torch.ones(3, dtype=torch.bool)),
         "local_slots"),
        (dict(slot_ids=torch.tensor([[0, 1]]), num_slots=4, block_m=2, local_slots=torch.ones(4)), "local_slots"),
        (dict(slot_ids=torch.tensor([[0, 1]]), num_slots=4, block_m=2, static_shapes=1), "static_shapes"),
    ],
)
def test_align_bad_input_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        moe_align(**kwargs)
