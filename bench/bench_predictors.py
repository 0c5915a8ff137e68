"""CPU benchmark of the load predictors: time of one `predict` (layer l -> load of layer l+1).

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest bench/bench_predictors.py --benchmark-only
    (CI: --benchmark-disable runs each case once, checking that every prediction sums to T*K)

Shape: DeepSeek-V2-Lite-like routing (L 26 MoE layers, E 64, K 6; H 2048 for the gate replica), T = 64 and 512
tokens of random skewed routing. The paper's budget is under 0.2 ms per layer. Each case records its shapes,
threads and versions in extra_info. Benchmarks measure; they never assert a time.
"""
from __future__ import annotations

import platform

import numpy as np
import pytest
import torch

from moeless.predictors import GateReplicaPredictor, make_predictor
from moeless.traces import RoutingTrace

L, E, K, H = 26, 64, 6, 2048
TOKENS = (64, 512)
PREDICTORS = ("history", "affinity", "regression", "gate-replica")
_FITTED: dict[str, object] = {}


def _trace(n_tokens: int, seed: int) -> RoutingTrace:
    rng = np.random.default_rng(seed)
    popularity = rng.dirichlet(np.full(E, 0.3), size=L)  # skewed per layer, as in real routing
    keys = np.log(rng.random((L, n_tokens, E))) / popularity[:, None, :]
    return RoutingTrace(topk_ids=np.argsort(-keys, axis=-1)[..., :K], num_experts=E)


def _predictor(name: str):
    if name not in _FITTED:
        fit = _trace(2048, 0)
        if name == "gate-replica":
            gates = np.random.default_rng(1).standard_normal((L, E, H)).astype(np.float32) * H**-0.5
            _FITTED[name] = GateReplicaPredictor(gates, K)  # predict cost does not depend on fine-tuning
        else:
            _FITTED[name] = make_predictor(name, 1).fit(fit)
    return _FITTED[name]


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("name", PREDICTORS)
def test_predict_one_layer(benchmark, name, tokens):
    pred = _predictor(name)
    batch = _trace(tokens, 2)
    layer = 12
    gate_input = np.random.default_rng(3).standard_normal((tokens, H)).astype(np.float32)
    pred.begin_batch()
    for l in range(layer):  # earlier layers of the batch, the regression's context
        pred.predict(l, batch.topk_ids[l], gate_input)
    benchmark.extra_info.update(predictor=name, tokens=tokens, layers=L, experts=E, top_k=K,
                                hidden=H if name == "gate-replica" else None, threads=torch.get_num_threads(),
                                numpy=np.__version__, python=platform.python_version())
    out = benchmark(pred.predict, layer, batch.topk_ids[layer], gate_input)
    assert out.shape == (E,) and out.sum() == pytest.approx(tokens * K)
