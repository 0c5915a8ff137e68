"""combine against a float64 sum and its own second backend; determinism; edge shapes; bad input.

The Triton path runs under the interpreter on CPU, so its shapes are tiny.
"""
import pytest
import torch

from moeless_kernels.combine import combine as _combine
from moeless_kernels.combine import combine_reference
from triton_device import on_triton_device


def combine(*args, **kwargs):
    """combine with Triton's inputs on the Triton device (CUDA on a GPU machine), results on the CPU."""
    return on_triton_device(_combine, *args, **kwargs)


# dtype -> (rtol, atol) against the float64 sum: one final rounding to the dtype, plus fp32 accumulation
TOLERANCES = {torch.float32: (1e-6, 1e-6), torch.float16: (1e-3, 1e-3), torch.bfloat16: (8e-3, 8e-3)}

# (T, K, H): edge shapes commented
SHAPES = [
    (1, 1, 8),  # T = 1, K = 1
    (5, 3, 13),  # odd H, T < BLOCK_T
    (7, 8, 70),  # K = E-like wide top-k, H not a power of two
    (3, 2, 1500),  # H spans two column blocks (BLOCK_H = 1024)
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"T{s[0]}-K{s[1]}-H{s[2]}")
def test_against_float64_sum(shape, dtype, backend):
    num_tokens, top_k, hidden = shape
    gen = torch.Generator().manual_seed(num_tokens + top_k + hidden)
    pair_out = torch.randn(num_tokens * top_k, hidden, generator=gen).to(dtype)
    out = combine(pair_out, top_k, backend=backend)
    want = pair_out.double().view(num_tokens, top_k, hidden).sum(dim=1)
    assert out.dtype == dtype and out.shape == (num_tokens, hidden)
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double(), want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_triton_matches_reference(dtype):
    gen = torch.Generator().manual_seed(1)
    pair_out = torch.randn(6 * 4, 40, generator=gen).to(dtype)
    got = combine(pair_out, 4, backend="triton")
    want = combine_reference(pair_out, 4)
    # both sum in fp32 and round once; only the fp32 summation order may differ
    torch.testing.assert_close(got.float(), want.float(), rtol=TOLERANCES[dtype][0], atol=TOLERANCES[dtype][1])


def test_accumulates_in_fp32():
    # fp16 would lose the small terms one by one (2048 + 1 == 2048 in fp16); fp32 keeps them
    top_k = 8
    pair_out = torch.ones(top_k, 4, dtype=torch.float16)
    pair_out[0] = 2048.0
    out = combine(pair_out, top_k, backend="triton")
    assert out.dtype == torch.float16
    assert out.float().tolist() == [[2056.0] * 4]


def test_deterministic_and_noncontiguous():
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(40, 9 * 2, generator=gen)
    pair_out = base.t()  # (18, 40) with strides (1, 18): T=9, K=2, H=40
    first = combine(pair_out, 2, backend="triton")
    second = combine(pair_out, 2, backend="triton")
    assert torch.equal(first, second)
    torch.testing.assert_close(first, pair_out.contiguous().view(9, 2, 40).double().sum(1).float())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zero_tokens(backend):
    out = combine(torch.empty(0, 16, dtype=torch.bfloat16), 3, backend=backend)
    assert out.shape == (0, 16) and out.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "pair_out, top_k, match",
    [
        (torch.zeros(6, 4), 4, "pair_out"),  # 6 rows are not T*4
        (torch.zeros(6), 2, "pair_out"),
        (torch.zeros(6, 4, dtype=torch.int32), 2, "pair_out"),
        (torch.zeros(6, 4), 0, "top_k"),
        (torch.zeros(6, 4), 2.0, "top_k"),
    ],
)
def test_bad_input_raises(pair_out, top_k, match):
    with pytest.raises(ValueError, match=match):
        combine(pair_out, top_k)
