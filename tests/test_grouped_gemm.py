"""grouped_swiglu (Triton under the interpreter, and the torch reference) against a float64 per-pair loop.

The permutation (sorted_token_ids, block_slot_ids) is built here by brute force from per-pair slot ids, so these
tests do not depend on moe_align. Triton cases use tiny shapes (the interpreter's cost grows with programs x
loop trips); the reference, the CPU serving path, also runs at larger shapes and through both of its GEMM
routes (torch._grouped_mm and the per-weight loop).
"""
import pytest
import torch
import torch.nn.functional as F

from moeless_kernels.grouped_gemm import _grouped_swiglu_torch, grouped_swiglu, grouped_swiglu_reference

BLOCK_M = 16
# Triton runs on CUDA tensors where there is a GPU, else on CPU tensors under the interpreter (tests/conftest.py)
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def swiglu_call(backend, *args, **kwargs):
    """grouped_swiglu (backend "triton"/"torch") or grouped_swiglu_reference; Triton inputs go to TRITON_DEVICE."""
    if backend == "reference":
        return grouped_swiglu_reference(*args, **kwargs)
    if backend == "triton":
        args = [a.to(TRITON_DEVICE) if isinstance(a, torch.Tensor) else a for a in args]
    return grouped_swiglu(*args, **kwargs, backend=backend).cpu()


def build_permutation(slot_ids: torch.Tensor, num_slots: int, block_m: int, slot_order=None, skip_slots=()):
    """Pairs (flat t*K+k) grouped by slot in `slot_order`, each run padded to block_m with the pad T*K.

    Slots in `skip_slots` keep their pairs in the permutation but their blocks are marked -1 (to be skipped).
    """
    flat = slot_ids.reshape(-1).tolist()
    pad = len(flat)
    ids, blocks = [], []
    for s in slot_order if slot_order is not None else range(num_slots):
        pairs = [i for i, v in enumerate(flat) if v == s]
        if not pairs:
            continue
        n = -(-len(pairs) // block_m) * block_m
        ids += pairs + [pad] * (n - len(pairs))
        blocks += [-1 if s in skip_slots else s] * (n // block_m)
    return torch.tensor(ids, dtype=torch.int32), torch.tensor(blocks, dtype=torch.int32), len(ids)


def swiglu_per_pair(hidden, gate_up, down, slot_ids, slot_to_weight, topk_weights, interleaved=False,
                    dtype=torch.float64, skip_slots=()):
    """One pair at a time, in `dtype` (float64 for the truth; the activation dtype for torch's own error)."""
    num_tokens, top_k = slot_ids.shape
    inter = down.shape[2]
    out = torch.zeros(num_tokens * top_k, hidden.shape[1], dtype=dtype)
    for t in range(num_tokens):
        for k in range(top_k):
            s = int(slot_ids[t, k])
            if s < 0 or s in skip_slots:
                continue
            w = int(slot_to_weight[s])
            h = F.linear(hidden[t].to(dtype), gate_up[w].to(dtype))
            gate, up = (h[0::2], h[1::2]) if interleaved else (h[:inter], h[inter:])
            y = F.linear(F.silu(gate) * up, down[w].to(dtype))
            if topk_weights is not None:
                y = y * topk_weights[t, k].to(dtype)
            out[t * top_k + k] = y
    return out


def make_layer(num_tokens, hidden_size, inter, num_weights, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, hidden_size, generator=g).to(dtype)
    gate_up = (torch.randn(num_weights, 2 * inter, hidden_size, generator=g) / hidden_size**0.5).to(dtype)
    down = (torch.randn(num_weights, hidden_size, inter, generator=g) / inter**0.5).to(dtype)
    return hidden, gate_up, down


def random_slots(num_tokens, top_k, num_slots, seed=0):
    """Distinct slots per token (as distinct experts would give), uniformly at random."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(num_slots, generator=g)[:top_k] for _ in range(num_tokens)]).to(torch.int32) \
        if num_tokens else torch.empty(0, top_k, dtype=torch.int32)


def run(backend, hidden, gate_up, down, slot_ids, slot_to_weight, topk_weights, interleaved=False, **perm_kw):
    ids, blocks, n_post = build_permutation(slot_ids, slot_to_weight.numel(), BLOCK_M, **perm_kw)
    return swiglu_call(backend, hidden, gate_up, down, ids, blocks, n_post, slot_to_weight, topk_weights,
                       top_k=slot_ids.shape[1], block_m=BLOCK_M, interleaved=interleaved)


# ---------------------------------------------------------------------------------------------------------------
# accuracy by dtype and layout (Triton, tiny shapes: T=7, odd H=19 and I=23, prime E=5, 7 slots over 5 weights)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_matches_float64_per_pair(backend, dtype, interleaved):
    hidden, gate_up, down = make_layer(7, 19, 23, 5, dtype)
    slot_to_weight = torch.tensor([0, 1, 2, 3, 4, 1, 3], dtype=torch.int32)  # slots 5, 6 replicate experts 1, 3
    slot_ids = random_slots(7, 2, 7)
    topk_weights = torch.rand(7, 2, generator=torch.Generator().manual_seed(1))
    got = run(backend, hidden, gate_up, down, slot_ids, slot_to_weight, topk_weights, interleaved)
    assert got.dtype == dtype and got.shape == (14, 19)
    truth = swiglu_per_pair(hidden, gate_up, down, slot_ids, slot_to_weight, topk_weights, interleaved)
    err = (got.double() - truth).abs().max().item()
    if dtype == torch.float32:
        assert err < 1e-5
    else:
        # torch's own error in this dtype, same math pair by pair; the kernel may be at most 2x worse
        own = swiglu_per_pair(hidden, gate_up, down, slot_ids, slot_to_weight, topk_weights, interleaved, dtype)
        own_err = (own.double() - truth).abs().max().item()
        assert err <= 2 * own_err, (err, own_err)


# ---------------------------------------------------------------------------------------------------------------
# edge shapes (fp32): each case is (T, E, K, slot assignment); E = number of slots = number of weights


def _slots_all_to_one(T, E, K):
    # all tokens to expert 0 (K = 1), more pairs than one block
    return torch.zeros(T, K, dtype=torch.int32)


def _slots_one_expert_empty(T, E, K):
    s = random_slots(T, K, E - 1)
    return torch.where(s >= 2, s + 1, s)  # expert 2 never chosen


EDGE_CASES = {
    "T=0": (0, 3, 2, lambda T, E, K: torch.empty(0, K, dtype=torch.int32)),
    "T=1": (1, 3, 2, lambda T, E, K: random_slots(T, K, E)),
    "K=1": (5, 3, 1, lambda T, E, K: random_slots(T, K, E)),
    "K=E": (5, 3, 3, lambda T, E, K: random_slots(T, K, E)),
    "all tokens to one expert": (20, 3, 1, _slots_all_to_one),
    "an expert with no tokens": (6, 5, 2, _slots_one_expert_empty),
}


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("case", list(EDGE_CASES))
def test_edge_shapes(case, backend):
    T, E, K, make_slots = EDGE_CASES[case]
    hidden, gate_up, down = make_layer(T, 8, 12, E, torch.float32)
    slot_ids = make_slots(T, E, K)
    topk_weights = torch.rand(T, K)
    slot_to_weight = torch.arange(E, dtype=torch.int32)
    got = run(backend, hidden, gate_up, down, slot_ids, slot_to_weight, topk_weights)
    truth = swiglu_per_pair(hidden, gate_up, down, slot_ids, slot_to_weight, topk_weights)
    assert got.shape == (T * K, 8)
    torch.testing.assert_close(got.double(), truth, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_skipped_blocks_unused_tail_and_no_routed_weight(backend):
    # blocks of slot 1 are marked -1: their pairs' rows must stay zero. The permutation visits slots out of
    # weight order (3, 0, 2, 1) and carries an unused tail past num_tokens_post_padded (poisoned with pair 0,
    # which a kernel reading the tail would overwrite). topk_weights None = routed weight 1.
    hidden, gate_up, down = make_layer(6, 8, 12, 3, torch.float32)
    slot_to_weight = torch.tensor([0, 1, 2, 0], dtype=torch.int32)
    slot_ids = random_slots(6, 2, 4, seed=3)
    ids, blocks, n_post = build_permutation(slot_ids, 4, BLOCK_M, slot_order=[3, 0, 2, 1], skip_slots=(1,))
    ids = torch.cat([ids, torch.zeros(BLOCK_M, dtype=torch.int32)])
    blocks = torch.cat([blocks, torch.zeros(1, dtype=torch.int32)])
    got = swiglu_call(backend, hidden, gate_up, down, ids, blocks, n_post, slot_to_weight, None, top_k=2,
                      block_m=BLOCK_M)
    truth = swiglu_per_pair(hidden, gate_up, down, slot_ids, slot_to_weight, None, skip_slots=(1,))
    torch.testing.assert_close(got.double(), truth, atol=1e-5, rtol=1e-5)
    assert (got[(slot_ids == 1).reshape(-1)] == 0).all()


# ---------------------------------------------------------------------------------------------------------------
# the reference at larger shapes, both GEMM routes


@pytest.mark.parametrize("use_grouped_mm", [True, False])
def test_reference_routes_larger_shapes(use_grouped_mm):
    # E=13 weights, 17 slots (4 replicas), aligned sizes so torch._grouped_mm's 16-byte rule holds
    hidden, gate_up, down = make_layer(64, 64, 48, 13, torch.float32)
    slot_to_weight = torch.tensor(list(range(13)) + [0, 5, 5, 12], dtype=torch.int32)
    slot_ids = random_slots(64, 3, 17, seed=2)
    topk_weights = torch.rand(64, 3)
    ids, blocks, n_post = build_permutation(slot_ids, 17, BLOCK_M)
    got = _grouped_swiglu_torch(hidden, gate_up, down, ids, blocks, n_post, slot_to_weight, topk_weights, 3,
                                BLOCK_M, False, use_grouped_mm=use_grouped_mm)
    truth = swiglu_per_pair(hidden, gate_up, down, slot_ids, slot_to_weight, topk_weights)
    torch.testing.assert_close(got.double(), truth, atol=1e-5, rtol=1e-5)


def test_replicas_sharing_a_weight_equal_the_unreplicated_result():
    # the same pairs served by one slot, or split over 3 replicas of that weight: identical numbers (fp32)
    hidden, gate_up, down = make_layer(9, 16, 24, 2, torch.float32)
    slot_ids = random_slots(9, 2, 2, seed=4)
    one = run("triton", hidden, gate_up, down, slot_ids, torch.tensor([0, 1], dtype=torch.int32), None)
    split = slot_ids.clone()
    flat_expert0 = (slot_ids.reshape(-1) == 0).nonzero().reshape(-1)
    split.view(-1)[flat_expert0[1::3]] = 2
    split.view(-1)[flat_expert0[2::3]] = 3
    three = run("triton", hidden, gate_up, down, split, torch.tensor([0, 1, 0, 0], dtype=torch.int32), None)
    torch.testing.assert_close(three, one, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# bad input


def _good_args():
    hidden, gate_up, down = make_layer(4, 8, 6, 3, torch.float32)
    slot_ids = random_slots(4, 2, 3)
    ids, blocks, n_post = build_permutation(slot_ids, 3, BLOCK_M)
    return dict(hidden=hidden, gate_up_proj=gate_up, down_proj=down, sorted_token_ids=ids, block_slot_ids=blocks,
                num_tokens_post_padded=n_post, slot_to_weight=torch.arange(3, dtype=torch.int32),
                topk_weights=torch.rand(4, 2), top_k=2, block_m=BLOCK_M)


BAD_INPUTS = {
    "hidden": lambda a: a["hidden"].double(),
    "gate_up_proj": lambda a: a["gate_up_proj"][:, :, :5],
    "down_proj": lambda a: a["down_proj"][:, :, :4],
    "sorted_token_ids": lambda a: a["sorted_token_ids"].long(),
    "block_slot_ids": lambda a: a["block_slot_ids"][:-1],
    "num_tokens_post_padded": lambda a: a["num_tokens_post_padded"] + 1,
    "slot_to_weight": lambda a: torch.tensor([0, 1, 3], dtype=torch.int32),  # weight 3 does not exist
    "topk_weights": lambda a: a["topk_weights"][:, :1],
    "top_k": lambda a: 0,
    "block_m": lambda a: 5,  # does not divide the permutation's length
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_value_error_naming_it(name):
    args = _good_args()
    args[name] = BAD_INPUTS[name](args)
    with pytest.raises(ValueError, match=name):
        grouped_swiglu(**args, backend="torch")


def test_bad_backend_and_non_power_of_two_block_m_for_triton():
    args = _good_args()
    with pytest.raises(ValueError, match="backend"):
        grouped_swiglu(**args, backend="cuda")
    ids, blocks, n_post = build_permutation(random_slots(4, 2, 3), 3, 12)
    args.update(sorted_token_ids=ids, block_slot_ids=blocks, num_tokens_post_padded=n_post, block_m=12)
    grouped_swiglu(**args, backend="torch")  # any block_m is fine for the reference
    args = {k: v.to(TRITON_DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(ValueError, match="block_m"):
        grouped_swiglu(**args, backend="triton")


def test_torch_version_is_compared_as_numbers():
    # as text, "2.10" < "2.9": the CPU grouped-mm path was skipped on torch 2.10 to 2.13
    from moeless_kernels.grouped_gemm import _release

    assert _release("2.13.0+cpu") == (2, 13) and _release("2.9.0a0+git123") == (2, 9)
    assert _release("2.10.1") >= (2, 9) > _release("2.8.0") and _release("nightly") == (0, 0)
