"""The one door through which the engine plug-ins reach moeless's decisions.

Every adapter in `moeless.integrations` (SGLang, vLLM, the offline tools, the balance benchmark) calls only
the two functions below, so that moeless's policy can be rewired here without touching an adapter:

    rebalance(history, num_physical, gpus, *, previous_phy2log=None) -> moeless.planner.Plan
        history       float [T, L, E]  per-pass logical (token, k) counts of every layer, oldest pass first
        num_physical  int              physical expert slots per layer (a multiple of `gpus`)
        returns       a Plan of L layers on gpus x num_physical/gpus slots: every expert has >= 1 replica
                      and every slot holds one (the engines cannot leave a slot empty)
    split_quotas(plan, counts) -> replica_tokens int64 [L, E, R]
        the serve-time split of the true counts int [L, E] over the plan's replicas

How `rebalance` decides (moeless.policy.serverless.rebalance_plan, the policy's serverful decision):
- Predict: moeless's history predictor (an exponential moving average of each layer's load shares, the rule
  of `moeless.predictors.HistoryPredictor`), run online over the passes of `history` in order, one update
  per pass, weighted by the pass's pairs; the half-life is half the pairs of the history, so the oldest pass
  keeps about a quarter of the newest one's weight (`HALF_LIFE_FRACTION`). With a single pass (vLLM hands
  over only a window sum) the prediction is that pass's shares.
- Plan: `moeless.planner.plan_layers` (ideal scaling with hedging: every slot holds a replica, replicated
  experts chained over the GPUs so a serve-time split can absorb prediction error; warm reuse of the previous
  plan's instances, GPUs renumbered to keep slot contents where the balance allows). A layer keeps its live
  placement unless the new one is predicted strictly better (smaller busiest GPU under the serve-time split
  of the predicted load): every changed slot is a weight transfer in the engine.

It must never: import an engine, torch, or a kernel; keep state between calls (every rank of an engine
calls it on the same all-reduced input and must get the same plan); read the clock.
"""
from __future__ import annotations

import numpy as np

from moeless import planner

from moeless.policy.serverless import HALF_LIFE_FRACTION, forecast_loads, rebalance_plan

__all__ = ["HALF_LIFE_FRACTION", "forecast_loads", "rebalance", "split_quotas"]


def rebalance(history, num_physical: int, gpus: int, *, previous_phy2log=None) -> planner.Plan:
    """moeless's plan for the next interval from the per-pass counts `history` [T, L, E]: the policy's
    `moeless.policy.serverless.rebalance_plan` (see the module docstring). `previous_phy2log` [L, num_physical]
    (the live placement) lets instances stay in their slots; a map of another shape is ignored. Deterministic:
    the same input gives the same plan on every rank."""
    return rebalance_plan(history, num_physical, gpus, previous_phy2log=previous_phy2log)


def split_quotas(plan: planner.Plan, counts) -> np.ndarray:
    """replica_tokens int64 [L, E, R]: how many of each expert's pairs each replica serves, for the true
    counts int [L, E] (the exact serve-time split: it minimises the busiest GPU's pairs)."""
    return planner.serve_time_split(plan, counts)
