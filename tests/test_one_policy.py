"""One policy for serving and simulation: the routing the serving loop saw (moeless.serve, gloo, world 2, the
tiny model, its gate-replica predictions) is fed to the simulator's per-iteration data plane
(moeless.sim.serverless.ServerlessRunner) with the same settings, and both must decide the same plans, layer by
layer, in the same order. Both run moeless.engine.Engine over a moeless.policy.MoelessPolicy; this test proves
the plumbing (protocol order, inputs, model time) is the same, so a simulated figure describes serving."""
from __future__ import annotations

import types

import numpy as np

from moeless import serve
from moeless.costmodel import RooflineCost
from moeless.policy import MoelessPolicy
from moeless.sim.serverless import ServerlessRunner
from moeless.specs import ModelSpec, hardware_for_device
from serve_harness import run_ranks

PROMPTS = [[256, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100] * 3, [256, 65, 66], [256, 1, 2, 3, 4, 5, 6],
           [256, 33, 34, 35, 36, 37, 38, 39, 40] * 4, [256, 97] * 9, [256, 120, 121]]
NEW_TOKENS = [6, 3, 5, 6, 4, 2]


def _serve_and_record(rank, world, ctx):
    """Serve two batches with moeless (infinite keep-alive: no decision depends on the wall clock) and record
    what the engine was told, iteration by iteration, and what it decided."""
    model = serve.load_model(None)
    srv = serve.ExpertParallelServer(model, ctx, policy="moeless", keep_alive_s=float("inf"))
    eng = srv.engine
    L, E = eng.L, eng.E
    iterations = []
    orig = {k: getattr(eng, k) for k in ("begin_iteration", "split", "observe")}

    def begin_iteration(tokens, prefill=False, weight=1.0):
        iterations.append({"tokens": tokens, "prefill": prefill, "loads": np.zeros((L, E), dtype=np.int64),
                           "pred": np.full((L, E), np.nan)})
        return orig["begin_iteration"](tokens, prefill, weight)

    def split(layer, counts):
        iterations[-1]["loads"][layer] = counts
        return orig["split"](layer, counts)

    def observe(layer, counts, predicted=None, now=None, *, replan=True):
        if predicted is not None and layer + eng.distance < L:
            iterations[-1]["pred"][layer + eng.distance] = predicted
        return orig["observe"](layer, counts, predicted, now, replan=replan)

    eng.begin_iteration, eng.split, eng.observe = begin_iteration, split, observe
    for batch in (slice(0, 3), slice(3, 6)):
        srv.generate(PROMPTS[batch], NEW_TOKENS[batch])
    decided = [(layer, p2l.tolist()) for _, layer, p2l in eng.applied]
    srv.close()
    return {"iterations": iterations, "decided": decided, "config": model.config.to_dict(),
            "slots_per_gpu": srv.slots_per_gpu, "L": L, "E": E, "distance": eng.distance}


class _Recorded:
    """The serving loop's predictions, handed to the simulator's runner in its predictor's place."""

    def __init__(self, iterations):
        self.preds = [it["pred"] for it in iterations]
        self.i = 0

    def predict(self, loads, topk_ids, top_k):
        out = self.preds[self.i]
        self.i += 1
        return out


def test_serving_and_simulation_decide_the_same_plans(tmp_path):
    outcomes = run_ranks(2, _serve_and_record, tmp_path)
    for r, o in enumerate(outcomes):
        assert not o.hung and o.result is not None and "exception" not in o.result, f"rank {r}: {o.result}"
    rec = outcomes[0].result
    # every rank's engine decided the same (they see the same global counts and predictions)
    assert outcomes[1].result["decided"] == rec["decided"]
    L, E, S = rec["L"], rec["E"], rec["slots_per_gpu"]
    assert any(np.isfinite(it["pred"]).any() for it in rec["iterations"])  # the gate-replica predictions flowed

    # the simulator, with the same model (its config), hardware profile, cost model and settings
    spec = ModelSpec.from_hf_config(rec["config"], bytes_per_param=4.0)
    cost = RooflineCost(spec, hardware_for_device("cpu"))
    setup = types.SimpleNamespace(
        model=spec, cost=cost, hardware=cost.hardware, slots_per_gpu=S,
        config=types.SimpleNamespace(gpus=2, distance=rec["distance"], keep_alive_s=float("inf"),
                                     prepare_every=1, steady=True))
    runner = ServerlessRunner("moeless", MoelessPolicy(L, E, 2, S, cost), _Recorded(rec["iterations"]), setup)
    for i, it in enumerate(rec["iterations"]):
        runner._step(it["loads"], None, it["tokens"], it["prefill"], float(i), 1.0)
    sim = [(layer, p2l.tolist()) for _, layer, p2l in runner.engine.applied]
    assert len(rec["decided"]) > L  # the initial homes, then decisions
    assert sim == rec["decided"]
    assert runner.engine.stats.plans_skipped > 0  # (the steady skip is part of what both sides run)
