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

How `rebalance` decides, today:
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

__all__ = ["HALF_LIFE_FRACTION", "forecast_loads", "rebalance", "split_quotas"]

# half-life of the pass-level history predictor, as a fraction of the pairs in the history it is fed
HALF_LIFE_FRACTION = 0.5


def _check_history(history) -> np.ndarray:
    """float64 [T, L, E] copy of `history`; ValueError naming it when the shape or values are wrong."""
    if hasattr(history, "detach"):  # a torch tensor, possibly on a GPU
        history = history.detach().cpu().numpy()
    try:
        h = np.array(history, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError("history must be a numeric array of shape [T, L, E]") from exc
    if h.ndim != 3 or min(h.shape) < 1:
        raise ValueError(f"history must have shape [T, L, E] (passes, layers, experts) with each >= 1, got {h.shape}")
    if not np.isfinite(h).all():
        raise ValueError("history must be finite (no NaN or inf)")
    if (h < 0).any():
        raise ValueError("history must hold non-negative token counts")
    return h


def forecast_loads(history, *, half_life_fraction: float | None = HALF_LIFE_FRACTION) -> np.ndarray:
    """Predicted per-pass load float64 [L, E] from the per-pass counts [T, L, E] (oldest first).

    Per layer, the history predictor's rule with a half-life in pairs: shares s <- w s + (1 - w) c / |c| for
    each pass's counts c with |c| > 0 pairs, w = 0.5 ** (|c| / half_life), half_life = half_life_fraction x
    the layer's pairs in the history; the first loaded pass sets s. `half_life_fraction=None` gives the plain
    window mean instead (what the engines' own EPLB uses). The result is s x the mean pairs per pass; a layer
    without any pair is predicted uniform."""
    h = _check_history(history)
    T, L, E = h.shape
    pairs = h.sum(2)  # [T, L]
    total = pairs.sum(0)  # [L]
    if half_life_fraction is None:
        share = np.where(total[:, None] > 0, h.sum(0) / np.maximum(total, 1.0)[:, None], 1.0 / E)
        return share * (total / T)[:, None]
    if not (isinstance(half_life_fraction, (int, float)) and 0 < half_life_fraction < float("inf")):
        raise ValueError(f"half_life_fraction must be a finite number > 0, or None, got {half_life_fraction!r}")
    share = np.full((L, E), 1.0 / E)
    seen = np.zeros(L, dtype=bool)
    half_life = np.maximum(total * float(half_life_fraction), 1e-300)
    for t in range(T):
        n = pairs[t]
        live = n > 0
        if not live.any():
            continue
        c = h[t] / np.where(live, n, 1.0)[:, None]
        w = np.where(seen, 0.5 ** (n / half_life), 0.0)[:, None]  # HistoryPredictor's decay, per layer
        share = np.where(live[:, None], w * share + (1.0 - w) * c, share)
        seen |= live
    return share * (total / T)[:, None]


def _previous_plan(previous_phy2log, L: int, E: int, gpus: int, slots_per_gpu: int) -> planner.Plan | None:
    """The previous placement as a Plan, or None when it does not describe the same layers and slots (an
    engine that changed its number of GPUs or slots, a map with entries outside [-1, E))."""
    if previous_phy2log is None:
        return None
    if hasattr(previous_phy2log, "detach"):
        previous_phy2log = previous_phy2log.detach().cpu().numpy()
    prev = np.asarray(previous_phy2log)
    if prev.shape != (L, gpus * slots_per_gpu) or not np.issubdtype(prev.dtype, np.integer):
        return None
    if ((prev < -1) | (prev >= E)).any():
        return None
    return planner.Plan.from_phy2log(prev, E, gpus, slots_per_gpu)


def rebalance(history, num_physical: int, gpus: int, *, previous_phy2log=None) -> planner.Plan:
    """moeless's plan for the next interval from the per-pass counts `history` [T, L, E] (see the module
    docstring). `previous_phy2log` [L, num_physical] (the live placement) lets instances stay in their slots;
    a map of another shape is ignored. Deterministic: the same input gives the same plan on every rank."""
    h = _check_history(history)
    num_physical = planner._positive_int("num_physical", num_physical)
    gpus = planner._positive_int("gpus", gpus)
    T, L, E = h.shape
    if num_physical % gpus:
        raise ValueError(f"num_physical={num_physical} must be a multiple of gpus={gpus} (equal slots per GPU)")
    if E > num_physical:
        raise ValueError(f"num_physical={num_physical} slots cannot hold the {E} experts of the history once each")
    slots = num_physical // gpus
    loads = forecast_loads(h)
    previous = _previous_plan(previous_phy2log, L, E, gpus, slots)
    plan = planner.plan_layers(loads, gpus, slots, previous=previous)
    if (plan.phy2log < 0).any():  # the hedged plan fills every slot; an engine cannot run with an empty one
        raise RuntimeError("moeless's planner left a slot empty; the engines need every slot filled")
    return plan if previous is None else _keep_unless_better(plan, previous, loads)


def _busiest_gpu(plan: planner.Plan, counts: np.ndarray) -> np.ndarray:
    """[L] the busiest GPU's pairs under the serve-time split of `counts` (the planner's objective)."""
    return planner.gpu_loads(plan, planner.serve_time_split(plan, counts)).max(1)


def _keep_unless_better(plan: planner.Plan, previous: planner.Plan, loads: np.ndarray) -> planner.Plan:
    """Per layer, the live placement stays unless the new one is predicted strictly better on `loads` (an
    engine pays a weight transfer for every slot that changes). Only a live layer that fills every slot and
    holds every expert can stay."""
    usable = (previous.phy2log >= 0).all(1) & (previous.logcnt >= 1).all(1)
    if not usable.any():
        return plan
    scale = 1e6 / max(float(loads.sum(1).max()), 1e-300)  # integer counts with six significant digits
    counts = np.rint(loads * scale).astype(np.int64)
    keep = usable & (_busiest_gpu(previous, counts) <= _busiest_gpu(plan, counts))
    if not keep.any():
        return plan
    p2l = np.where(keep[:, None], previous.phy2log, plan.phy2log)
    return planner.Plan.from_phy2log(p2l, plan.num_experts, plan.gpus, plan.slots_per_gpu)


def split_quotas(plan: planner.Plan, counts) -> np.ndarray:
    """replica_tokens int64 [L, E, R]: how many of each expert's pairs each replica serves, for the true
    counts int [L, E] (the exact serve-time split: it minimises the busiest GPU's pairs)."""
    return planner.serve_time_split(plan, counts)
