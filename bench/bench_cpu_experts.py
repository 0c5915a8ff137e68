"""CPU benchmark of one experts layer: moeless's torch path vs transformers' "eager" and "grouped_mm" experts.

    .venv/bin/python -m pytest bench/bench_cpu_experts.py --benchmark-only
    (CI: --benchmark-disable runs each case once, as a parity test of the implementations against eager)

Single thread (torch.set_num_threads(1) for the duration of each case) and process CPU time
(time.process_time as pytest-benchmark's timer): on a shared machine, wall time counts the other tenants'
work, CPU time much less of it. Read min and median; the machine's noise shows in their gap.

Shapes: Mixtral-like (H 1024, I 2048, E 8, K 2) and fine-grained (H 512, I 256, E 64, K 6); T = 64 and 512 tokens;
fp32; the same random softmax routing for every implementation. "moeless_transposed" runs the same layer stored
transposed ([E, H, 2I] / [E, I, H], `is_transposed=True`): moeless reads that layout through a view, no copy.
Each case records its shapes, GFLOP/s (6*T*K*H*I flops: gate_up and down GEMMs), threads and versions in
extra_info. Benchmarks measure; they never assert a time.
"""
from __future__ import annotations

import copy
import time

import pytest
import torch
from transformers import MixtralConfig
from transformers.integrations.moe import grouped_mm_experts_forward
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

from moeless import hf

SHAPES = {  # name: (hidden H, intermediate I, experts E, top_k K)
    "mixtral": (1024, 2048, 8, 2),
    "fine_grained": (512, 256, 64, 6),
}
TOKENS = (64, 512)
DTYPE = torch.float32


def _eager_forward(module, hidden, ids, weights):
    # the class's own expert loop, past the ExpertsInterface dispatch
    return type(module).forward.__wrapped__(module, hidden, ids, weights)


def _moeless_transposed_forward(module, hidden, ids, weights):
    # the same layer stored transposed ([E, H, 2I] / [E, I, H], Aria's layout): moeless reads it through a view
    return hf.moeless_experts_forward(_transposed_twin(module), hidden, ids, weights)


IMPLEMENTATIONS = {
    "moeless": hf.moeless_experts_forward,
    "moeless_transposed": _moeless_transposed_forward,
    "eager": _eager_forward,
    "grouped_mm": grouped_mm_experts_forward,
}

_LAYERS: dict[str, MixtralExperts] = {}
_TWINS: dict[int, MixtralExperts] = {}
_EXPECTED: dict[tuple[str, int], torch.Tensor] = {}  # eager's output per case, computed once


def _transposed_twin(layer: MixtralExperts) -> MixtralExperts:
    if id(layer) not in _TWINS:
        twin = copy.deepcopy(layer)
        twin.gate_up_proj = torch.nn.Parameter(layer.gate_up_proj.transpose(1, 2).contiguous(), requires_grad=False)
        twin.down_proj = torch.nn.Parameter(layer.down_proj.transpose(1, 2).contiguous(), requires_grad=False)
        twin.is_transposed = True
        _TWINS[id(layer)] = twin
    return _TWINS[id(layer)]


def _layer(shape: str) -> MixtralExperts:
    if shape not in _LAYERS:
        hidden, inter, experts, top_k = SHAPES[shape]
        config = MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=experts,
                               num_experts_per_tok=top_k, num_attention_heads=8, num_key_value_heads=8)
        layer = MixtralExperts(config).eval()
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            layer.gate_up_proj.copy_(torch.randn(layer.gate_up_proj.shape, generator=g) * hidden**-0.5)
            layer.down_proj.copy_(torch.randn(layer.down_proj.shape, generator=g) * inter**-0.5)
        _LAYERS[shape] = layer.to(DTYPE).requires_grad_(False)
    return _LAYERS[shape]


def _routing(shape: str, num_tokens: int):
    hidden_size, _, experts, top_k = SHAPES[shape]
    g = torch.Generator().manual_seed(num_tokens)
    hidden = torch.randn(num_tokens, hidden_size, generator=g, dtype=DTYPE)
    probs = torch.softmax(torch.randn(num_tokens, experts, generator=g), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    return hidden, ids, (weights / weights.sum(-1, keepdim=True)).to(DTYPE)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.benchmark(timer=time.process_time)
@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATIONS))
def test_experts_forward_cpu(benchmark, implementation, shape, num_tokens, monkeypatch, one_thread):
    monkeypatch.setenv("MOELESS_BACKEND", "torch")
    layer = _layer(shape)
    hidden, ids, weights = _routing(shape, num_tokens)
    forward = IMPLEMENTATIONS[implementation]
    hidden_size, inter, experts, top_k = SHAPES[shape]
    flops = 6 * num_tokens * top_k * hidden_size * inter

    with torch.inference_mode():
        out = benchmark(forward, layer, hidden, ids, weights)
        key = (shape, num_tokens)
        if key not in _EXPECTED:
            _EXPECTED[key] = _eager_forward(layer, hidden, ids, weights)
    torch.testing.assert_close(out, _EXPECTED[key], rtol=1e-4, atol=1e-5)

    benchmark.group = f"{shape} T={num_tokens}"
    info = dict(implementation=implementation, T=num_tokens, H=hidden_size, I=inter, E=experts, K=top_k,
                dtype=str(DTYPE), device="cpu", threads=torch.get_num_threads(), timer="process_time",
                torch=torch.__version__)
    if benchmark.stats is not None:  # None under --benchmark-disable
        info["gflops"] = round(flops / benchmark.stats.stats.mean / 1e9, 2)
    benchmark.extra_info.update(info)
