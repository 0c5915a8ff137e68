"""fused_moe against a float64 Hugging Face-style eager expert loop; plans, replicas, local slots, capacity, errors.

Triton cases run under the interpreter at tiny shapes (T <= 12, H, I <= 24); the torch path (CPU serving) runs
the same cases (and a hypothesis sweep of random plans: tests/test_kernel_properties.py). The `gpu` section runs the Triton path on CUDA in bf16 at
real layer shapes against an fp32 reference.
"""
import pytest
import torch
import torch.nn.functional as F

from moeless_kernels.dispatch import DispatchResult
from moeless_kernels.fused_moe import MoEResult, ReplicaPlan, default_block_m, fused_moe

BACKENDS = ["triton", "torch"]
# Triton runs on CUDA tensors where there is a GPU, else on CPU tensors under the interpreter (tests/conftest.py)
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def moe(hidden, gate_up, down, *, backend, plan=None, **kwargs):
    """fused_moe with Triton's inputs on TRITON_DEVICE; the result comes back on the CPU."""
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    result = fused_moe(hidden.to(device), gate_up.to(device), down.to(device), backend=backend,
                       plan=None if plan is None else plan.to(device), **kwargs)
    d = result.dispatch
    return MoEResult(result.out.cpu(), result.topk_ids.cpu(), result.topk_weights.cpu(),
                     DispatchResult(d.slot_ids.cpu(), d.slot_counts.cpu(), d.dropped_count, d.dropped_indices.cpu()))


def hf_eager_experts(hidden, gate_up, down, topk_ids, topk_weights, interleaved=False, dtype=torch.float64):
    """Hugging Face v5's eager experts loop (MixtralExperts.forward), in `dtype`."""
    num_experts = gate_up.shape[0]
    inter = down.shape[2]
    x = hidden.to(dtype)
    out = torch.zeros_like(x)
    expert_mask = F.one_hot(topk_ids.long(), num_classes=num_experts).permute(2, 1, 0)
    for e in range(num_experts):
        top_k_pos, token_idx = torch.where(expert_mask[e])
        if token_idx.numel() == 0:
            continue
        h = F.linear(x[token_idx], gate_up[e].to(dtype))
        gate, up = (h[..., 0::2], h[..., 1::2]) if interleaved else h.chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down[e].to(dtype))
        y = y * topk_weights[token_idx, top_k_pos, None].to(dtype)
        out.index_add_(0, token_idx, y)
    return out


def make_layer(num_tokens, hidden_size, inter, num_experts, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, hidden_size, generator=g).to(dtype)
    gate_up = (torch.randn(num_experts, 2 * inter, hidden_size, generator=g) / hidden_size**0.5).to(dtype)
    down = (torch.randn(num_experts, hidden_size, inter, generator=g) / inter**0.5).to(dtype)
    logits = torch.randn(num_tokens, num_experts, generator=g)
    return hidden, gate_up, down, logits


def softmax_routing(logits, top_k, renormalize):
    """Independent routing in float64 (random logits: no ties)."""
    probs = torch.softmax(logits.double(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights


def random_plan(num_experts, extra_replicas, free_slots, seed, split="even", topk_ids=None):
    """Every expert has one replica; `extra_replicas` more go to random experts; slots shuffled, some free."""
    g = torch.Generator().manual_seed(seed)
    extra = torch.randint(0, num_experts, (extra_replicas,), generator=g)
    phy2log = torch.cat([torch.arange(num_experts), extra, torch.full((free_slots,), -1)])
    phy2log = phy2log[torch.randperm(phy2log.numel(), generator=g)]
    plan = ReplicaPlan.from_phy2log(phy2log, num_experts)
    if split == "random":
        # random chunk sizes per replica, rows summing to the expert's pair count
        counts = torch.bincount(topk_ids.reshape(-1).long(), minlength=num_experts)
        tokens = torch.zeros_like(plan.log2phy)
        for e in range(num_experts):
            cuts = torch.sort(torch.randint(0, int(counts[e]) + 1, (int(plan.logcnt[e]) - 1,), generator=g)).values
            edges = torch.cat([torch.tensor([0]), cuts, torch.tensor([int(counts[e])])])
            tokens[e, : int(plan.logcnt[e])] = edges[1:] - edges[:-1]
        plan = ReplicaPlan(plan.phy2log, plan.log2phy, plan.logcnt, replica_tokens=tokens)
    return plan


# ---------------------------------------------------------------------------------------------------------------
# against the eager loop


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "shape",
    [
        # (T, H, I, E, K, interleaved, renormalize)
        (9, 16, 24, 5, 2, False, True),  # aligned H, I (the torch path may use torch._grouped_mm)
        (12, 19, 13, 7, 3, True, False),  # odd H and I, prime E, interleaved gate/up rows
        (4, 8, 8, 3, 3, False, True),  # K = E
        (1, 8, 8, 3, 1, False, False),  # T = 1, K = 1
    ],
)
def test_router_logits_path_matches_hf_eager(backend, shape):
    T, H, I, E, K, interleaved, renormalize = shape
    hidden, gate_up, down, logits = make_layer(T, H, I, E)
    result = moe(hidden, gate_up, down, router_logits=logits, top_k=K, renormalize=renormalize,
                       interleaved=interleaved, backend=backend)
    ids, weights = softmax_routing(logits, K, renormalize)
    assert isinstance(result, MoEResult) and isinstance(result.dispatch, DispatchResult)
    assert torch.equal(torch.sort(result.topk_ids, dim=-1).values, torch.sort(ids, dim=-1).values.int())
    assert result.dispatch.dropped_count == 0
    truth = hf_eager_experts(hidden, gate_up, down, ids, weights, interleaved)
    assert result.out.shape == (T, H) and result.out.dtype == torch.float32
    torch.testing.assert_close(result.out.double(), truth, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_given_routing_edge_cases(backend):
    # all tokens to one expert (more pairs than one block), an expert with no tokens, T = 0
    hidden, gate_up, down, _ = make_layer(20, 8, 8, 4)
    ids = torch.zeros(20, 1, dtype=torch.int32)
    weights = torch.rand(20, 1)
    out = moe(hidden, gate_up, down, topk_ids=ids, topk_weights=weights, backend=backend).out
    torch.testing.assert_close(out.double(), hf_eager_experts(hidden, gate_up, down, ids, weights), atol=2e-6,
                               rtol=1e-5)
    empty = moe(hidden[:0], gate_up, down, topk_ids=ids[:0], topk_weights=weights[:0], backend=backend)
    assert empty.out.shape == (0, 8)


def test_bf16_error_at_most_twice_torch_own():
    hidden, gate_up, down, logits = make_layer(12, 24, 16, 5, dtype=torch.bfloat16)
    ids, weights = softmax_routing(logits, 2, True)
    truth = hf_eager_experts(hidden, gate_up, down, ids, weights)
    own = hf_eager_experts(hidden, gate_up, down, ids, weights.float(), dtype=torch.bfloat16)
    own_err = (own.double() - truth).abs().max().item()
    for backend in BACKENDS:
        out = moe(hidden, gate_up, down, topk_ids=ids, topk_weights=weights.float(), backend=backend).out
        assert out.dtype == torch.bfloat16
        err = (out.double() - truth).abs().max().item()
        assert err <= 2 * own_err, (backend, err, own_err)


# ---------------------------------------------------------------------------------------------------------------
# plans: replication is lossless, local slots partition the work, capacity drops are reported


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("split", ["even", "random"])
def test_replicated_plan_is_lossless(backend, split):
    # torch path: bitwise. It merges the replicas of an expert into one GEMM, and with from_phy2log's ascending
    # replica slots the chunks come back in flat order: the very GEMM of the unreplicated plan.
    # Triton: within fp32 rounding. A pair's row meets the same weights in the same K tiles on any replica,
    # but lands at another row of another block, and the interpreter's numpy matmul (like any BLAS) does not
    # promise bitwise-equal rows across positions; the sum over K runs in the same order.
    hidden, gate_up, down, logits = make_layer(12, 16, 8, 5)
    base = moe(hidden, gate_up, down, router_logits=logits, top_k=2, backend=backend)
    plan = random_plan(5, extra_replicas=4, free_slots=2, seed=1, split=split, topk_ids=base.topk_ids)
    replicated = moe(hidden, gate_up, down, router_logits=logits, top_k=2, plan=plan, backend=backend)
    if backend == "torch":
        assert torch.equal(replicated.out, base.out)
    else:
        torch.testing.assert_close(replicated.out, base.out, atol=1e-6, rtol=1e-6)
    assert int(replicated.dispatch.slot_counts[5:].sum()) > 0  # the extra replicas did serve pairs
    # every pair went to a replica of its own expert
    assert torch.equal(plan.phy2log[replicated.dispatch.slot_ids.long()].int(), base.topk_ids)


@pytest.mark.parametrize("backend", BACKENDS)
def test_local_slots_of_the_ranks_sum_to_the_full_output(backend):
    # 3 "GPUs" of 4 slots each; each rank computes only its slots' pairs. Sums agree to fp32 rounding (the
    # order of the K-sum differs: a rank adds zeros for the other ranks' pairs).
    hidden, gate_up, down, logits = make_layer(10, 16, 8, 6)
    plan = random_plan(6, extra_replicas=6, free_slots=0, seed=2)
    full = moe(hidden, gate_up, down, router_logits=logits, top_k=3, plan=plan, backend=backend)
    total = torch.zeros_like(full.out)
    for rank in range(3):
        local = (torch.arange(12) // 4) == rank
        part = moe(hidden, gate_up, down, router_logits=logits, top_k=3, plan=ReplicaPlan(
            plan.phy2log, plan.log2phy, plan.logcnt, local_slots=local), backend=backend)
        # tokens with no pair on this rank get exactly zero
        touched = local[full.dispatch.slot_ids.long()].any(dim=1)
        assert (part.out[~touched] == 0).all()
        total += part.out
    torch.testing.assert_close(total, full.out, atol=1e-6, rtol=1e-6)


def test_rank_local_weight_buffer_through_slot_to_weight():
    # a rank holds instances of experts 4 and 1 only, in a 2-row weight buffer; slot_to_weight points its
    # slots at buffer rows. Its output equals the full layer's contribution of those slots' pairs.
    hidden, gate_up, down, logits = make_layer(10, 16, 8, 5)
    phy2log = torch.tensor([0, 1, 2, 3, 4, 1])
    local = torch.tensor([False, False, False, False, True, True])
    slot_to_weight = torch.tensor([-1, -1, -1, -1, 0, 1])
    plan = ReplicaPlan.from_phy2log(phy2log, local_slots=local, slot_to_weight=slot_to_weight)
    got = fused_moe(hidden, gate_up[[4, 1]], down[[4, 1]], router_logits=logits, top_k=2, plan=plan,
                    backend="torch")
    full = ReplicaPlan.from_phy2log(phy2log, local_slots=local)
    want = fused_moe(hidden, gate_up, down, router_logits=logits, top_k=2, plan=full, backend="torch")
    assert torch.equal(got.out, want.out)
    assert got.out.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy", ["position", "probability"])
def test_capacity_drops_are_reported_and_removed(backend, policy):
    hidden, gate_up, down, logits = make_layer(12, 16, 8, 4)
    result = moe(hidden, gate_up, down, router_logits=logits, top_k=2, slot_capacity=4,
                       capacity_policy=policy, backend=backend)
    dispatch = result.dispatch
    assert dispatch.dropped_count > 0 and dispatch.dropped_count == dispatch.dropped_indices.numel()
    assert torch.equal((dispatch.slot_ids.reshape(-1) < 0).nonzero().flatten(), dispatch.dropped_indices)
    assert int(dispatch.slot_counts.max()) <= 4
    kept_weights = result.topk_weights.double().reshape(-1).clone()
    kept_weights[dispatch.dropped_indices] = 0
    truth = hf_eager_experts(hidden, gate_up, down, result.topk_ids, kept_weights.view(12, 2))
    torch.testing.assert_close(result.out.double(), truth, atol=2e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# ReplicaPlan


def test_replica_plan_identity_and_from_phy2log():
    ident = ReplicaPlan.identity(4)
    assert ident.num_slots == 4 and ident.num_experts == 4
    assert torch.equal(ident.log2phy.flatten(), torch.arange(4, dtype=torch.int32))
    assert torch.equal(ident.logcnt, torch.ones(4, dtype=torch.int32))
    phy2log = torch.tensor([2, 0, -1, 2, 1, 2, 0])
    plan = ReplicaPlan.from_phy2log(phy2log)
    assert torch.equal(plan.logcnt, torch.tensor([2, 1, 3]))
    # brute force: the slots of each expert, ascending, padded with -1
    for e in range(3):
        slots = [p for p, v in enumerate(phy2log.tolist()) if v == e]
        assert plan.log2phy[e].tolist() == slots + [-1] * (3 - len(slots))
    assert ReplicaPlan.from_phy2log(phy2log, 5).logcnt.tolist() == [2, 1, 3, 0, 0]


def test_plan_without_a_replica_for_a_routed_expert_is_rejected():
    hidden, gate_up, down, logits = make_layer(8, 8, 8, 3)
    plan = ReplicaPlan.from_phy2log(torch.tensor([0, 2, 2]), 3)  # expert 1 has no replica
    ids = torch.tensor([[0], [1]] * 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="plan"):
        fused_moe(hidden, gate_up, down, topk_ids=ids, topk_weights=torch.ones(8, 1), plan=plan)
    # but an expert without replica and without tokens is fine
    ids = torch.tensor([[0], [2]] * 4, dtype=torch.int32)
    fused_moe(hidden, gate_up, down, topk_ids=ids, topk_weights=torch.ones(8, 1), plan=plan)


def test_inconsistent_plan_is_rejected_when_built():
    good = ReplicaPlan.from_phy2log(torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="plan is inconsistent"):  # expert 0 listed on slots 1, 2
        ReplicaPlan(good.phy2log, good.log2phy.flip(0), good.logcnt.flip(0))


def test_slot_to_weight_contradicting_phy2log_is_rejected_when_built():
    # slot 2 holds expert 1 but reads weight row 0, which slot 0 (expert 0) reads too: one weight row cannot be
    # two experts. Unchecked, expert 1's pairs on slot 2 ran with expert 0's weights and the output was wrong with
    # no error (issue 11); the plan is refused once, when built, never per call.
    phy2log = torch.tensor([0, 1, 1])
    with pytest.raises(ValueError, match="slot_to_weight contradicts plan.phy2log: weight row 0"):
        ReplicaPlan.from_phy2log(phy2log, slot_to_weight=torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="slot_to_weight must be >= -1"):
        ReplicaPlan.from_phy2log(phy2log, slot_to_weight=torch.tensor([0, 1, -2]))
    with pytest.raises(ValueError, match="slot 2, a local slot"):  # a served replica without a weight row
        ReplicaPlan.from_phy2log(phy2log, slot_to_weight=torch.tensor([0, 1, -1]))
    with pytest.raises(ValueError, match="slot_to_weight"):
        ReplicaPlan.from_phy2log(phy2log, slot_to_weight=torch.tensor([0, 1]))
    # consistent: the replicas of expert 1 share row 1, a free slot reads nothing, a remote slot needs no row
    ReplicaPlan.from_phy2log(torch.tensor([0, 1, 1, -1]), slot_to_weight=torch.tensor([0, 1, 1, -1]))
    ReplicaPlan.from_phy2log(phy2log, slot_to_weight=torch.tensor([0, 1, -1]),
                             local_slots=torch.tensor([True, True, False]))
    # a row past this layer's weights is refused at the first call with those weights
    plan = ReplicaPlan.from_phy2log(phy2log, slot_to_weight=torch.tensor([0, 1, 5]))
    hidden, gate_up, down, logits = make_layer(4, 8, 8, 2)
    with pytest.raises(ValueError, match="plan.slot_to_weight"):
        fused_moe(hidden, gate_up, down, router_logits=logits, top_k=1, plan=plan)


@pytest.mark.parametrize("block_m", [4, 16, 64])
def test_triton_output_does_not_depend_on_block_m(block_m):
    # worst-case buffers and -1 tail blocks at every BLOCK_M; the torch path is the reference
    hidden, gate_up, down, logits = make_layer(12, 16, 8, 5)
    plan = random_plan(5, extra_replicas=3, free_slots=1, seed=3)
    got = moe(hidden, gate_up, down, router_logits=logits, top_k=2, plan=plan, block_m=block_m, backend="triton")
    want = moe(hidden, gate_up, down, router_logits=logits, top_k=2, plan=plan, backend="torch")
    torch.testing.assert_close(got.out, want.out, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# bad input


def _args():
    hidden, gate_up, down, logits = make_layer(4, 8, 8, 3)
    return dict(hidden=hidden, gate_up_proj=gate_up, down_proj=down, router_logits=logits, top_k=2)


def _meta(t):
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


BAD = {
    "hidden": lambda a: a.update(hidden=a["hidden"].int()),
    "gate_up_proj": lambda a: a.update(gate_up_proj=a["gate_up_proj"][:, :, :5]),
    "down_proj": lambda a: a.update(down_proj=a["down_proj"].half()),
    "router_logits": lambda a: a.update(router_logits=a["router_logits"][:3]),
    "top_k": lambda a: a.update(top_k=None),
    "topk_ids": lambda a: a.update(router_logits=None, top_k=None, topk_ids=torch.zeros(4, dtype=torch.int32),
                                   topk_weights=torch.ones(4, 2)),
    "topk_weights": lambda a: a.update(router_logits=None, top_k=None, topk_ids=torch.zeros(4, 2, dtype=torch.int32),
                                       topk_weights=torch.ones(4, 3)),
    "plan": lambda a: a.update(plan="identity"),
    "plan.phy2log": lambda a: a.update(plan=ReplicaPlan(torch.zeros(3, 3, dtype=torch.int32),  # 2-D
                                                        torch.arange(3)[:, None], torch.ones(3, dtype=torch.int32))),
    "block_m": lambda a: a.update(block_m=0),
    "backend": lambda a: a.update(backend="gpu"),
    "capacity_policy": lambda a: a.update(capacity_policy="random", slot_capacity=2),
    "device of down_proj": lambda a: a.update(down_proj=_meta(a["down_proj"])),
    "device of router_logits": lambda a: a.update(router_logits=_meta(a["router_logits"])),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_value_error_naming_it(name):
    args = _args()
    with pytest.raises(ValueError, match=name.split(" of ")[-1]):
        BAD[name](args)  # a malformed ReplicaPlan is rejected when it is built
        fused_moe(**args)


def test_routing_given_twice_or_not_at_all():
    args = _args()
    with pytest.raises(ValueError, match="not both"):
        fused_moe(**args, topk_ids=torch.zeros(4, 2, dtype=torch.int32), topk_weights=torch.ones(4, 2))
    args.pop("router_logits")
    with pytest.raises(ValueError, match="router_logits"):
        fused_moe(**args)
    with pytest.raises(ValueError, match="router_logits"):  # routing options need logits
        fused_moe(**args, topk_ids=torch.zeros(4, 2, dtype=torch.int32), topk_weights=torch.ones(4, 2),
                  scoring="sigmoid")


def test_default_block_m_grows_with_pairs_per_slot():
    sizes = [default_block_m(n, 8) for n in (8, 128, 256, 2048, 65536)]
    assert sizes == sorted(sizes) and sizes[0] == 16 and sizes[-1] == 128
    # decode on Mixtral's shape, T = 64, K = 2, E = 8: 16 pairs per expert on average, one 32-row block each
    assert default_block_m(64 * 2, 8) == 32


# ---------------------------------------------------------------------------------------------------------------
# CUDA: the Triton path in bf16 at real layer shapes against an fp32 reference


GPU_SHAPES = {  # name: (T, H, I, E, K)
    "mixtral-8x7b": (256, 4096, 14336, 8, 2),
    "qwen3-30b-a3b": (512, 2048, 768, 128, 8),
    # all 256 experts: gate_up_proj holds 7.5e9 elements, so weight offsets overflow int32
    "deepseek-v3": (128, 7168, 2048, 256, 8),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_SHAPES))
def test_cuda_triton_bf16_matches_fp32_reference(name):
    T, H, I, E, K = GPU_SHAPES[name]
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(T, H, device="cuda", generator=g, dtype=torch.bfloat16)
    gate_up = (torch.randn(E, 2 * I, H, device="cuda", generator=g, dtype=torch.bfloat16) * H**-0.5)
    down = (torch.randn(E, H, I, device="cuda", generator=g, dtype=torch.bfloat16) * I**-0.5)
    # route some tokens to the last experts so the largest weight offsets are read
    logits = torch.randn(T, E, device="cuda", generator=g)
    logits[: T // 4, -K:] += 10.0
    got = fused_moe(hidden, gate_up, down, router_logits=logits, top_k=K, renormalize=True, backend="triton")
    assert got.out.dtype == torch.bfloat16
    ids, weights = got.topk_ids, got.topk_weights
    assert bool((ids == E - 1).any())
    fp32 = fused_moe(hidden.float(), gate_up.float(), down.float(), topk_ids=ids, topk_weights=weights,
                     backend="torch").out
    own = fused_moe(hidden, gate_up, down, topk_ids=ids, topk_weights=weights, backend="torch").out
    err = (got.out.float() - fp32).abs().max().item()
    own_err = (own.float() - fp32).abs().max().item()
    assert err <= 2 * own_err, (err, own_err)
    # replicas of the hottest experts: the same output. Not asserted bitwise here: the replicated permutation is
    # longer (more padding), so the autotuner may pick another K tile, which reorders the fp32 accumulation.
    plan = ReplicaPlan.from_phy2log(torch.cat([torch.arange(E), torch.arange(E - K, E).repeat(3)]).cuda(), E)
    replicated = fused_moe(hidden, gate_up, down, topk_ids=ids, topk_weights=weights, plan=plan, backend="triton")
    assert replicated.dispatch.slot_counts[E:].sum() > 0
    replica_err = (replicated.out.float() - fp32).abs().max().item()
    assert replica_err <= 2 * own_err, (replica_err, own_err)
