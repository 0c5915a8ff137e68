"""The policies the simulator compares, each a thin driver of the real control plane (moeless.planner,
moeless.baselines, moeless.predictors, moeless.pool) over chunks of iterations.

A policy turns one chunk of iterations (their true per-layer loads, shared by every policy) into where every
replica sits and how many pairs it serves (`replica_tokens [n, L, E, R]`, `replica_gpu [n, L, E, R]`), the
cold starts it caused, and the live instances. The engine prices the layouts with one cost model for all.

This module never decides a plan itself (the planner and the baselines do), never reads a wall clock, and
never changes routing: every pair is served by a replica of the expert the router chose, except under the
oracle, which is the paper's lossy upper bound and is labelled so.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeless import baselines as _baselines
from moeless import planner as _planner

POLICY_NAMES = ("megatron", "eplb", "oracle", "moeless", "moeless-history", "moeless-noscale",
                "moeless-nowarm", "moeless-evensplit")


@dataclass
class ChunkLayout:
    """A chunk's layouts: replica_tokens float [n, L, E, R], replica_gpu int64 [n, L, E, R] (or [L, E, R],
    shared by the chunk), replicas [n] live instances over all layers, and for serverless policies each
    iteration's `moeless.planner.Plan` (the pool turns them into instances, cold starts and bills)."""

    replica_tokens: np.ndarray
    replica_gpu: np.ndarray
    replicas: np.ndarray
    plans: list | None = None


def tile_plan(plan: _planner.Plan, n: int) -> _planner.Plan:
    """n copies of a plan's layers, stacked as n * L layers (the planner is vectorised across layers)."""
    return _planner.Plan.from_phy2log(np.tile(plan.phy2log, (n, 1)), plan.num_experts, plan.gpus,
                                      plan.slots_per_gpu)


def stack_plans(plans) -> _planner.Plan:
    first = plans[0]
    return _planner.Plan.from_phy2log(np.concatenate([p.phy2log for p in plans]), first.num_experts,
                                      first.gpus, first.slots_per_gpu)


def _pad_r(a: np.ndarray, width: int, fill) -> np.ndarray:
    if a.shape[-1] == width:
        return a
    pad = np.full(a.shape[:-1] + (width - a.shape[-1],), fill, dtype=a.dtype)
    return np.concatenate([a, pad], axis=-1)


class Policy:
    """Base: `name`, `serverless`, `resident` (instances a serverful policy keeps for the whole run) and
    `layout(chunk) -> ChunkLayout`."""

    name = "policy"
    serverless = False
    lossy = False
    resident = 0

    def layout(self, chunk) -> ChunkLayout:
        raise NotImplementedError


class StaticPolicy(Policy):
    """A fixed plan for the whole run: Megatron-LM's expert parallelism (one instance of every expert), or the
    oracle, which serves the same instances but spreads every iteration's pairs perfectly evenly over experts
    (lossy: it ignores the router, the paper's upper bound)."""

    def __init__(self, name: str, plan: _planner.Plan, *, oracle: bool = False):
        self.name, self.plan, self.lossy = name, plan, oracle
        self.resident = int(plan.logcnt.sum())
        self.rerouted_pairs = 0.0

    def layout(self, chunk) -> ChunkLayout:
        loads = chunk.loads.astype(np.float64)  # [n, L, E]
        n, L, E = loads.shape
        if self.lossy:  # moeless.baselines' capacity-aware rerouting: every expert at most ceil(total / E)
            rerouted, moved = _baselines.oracle_reroute(chunk.loads.reshape(n * L, E))
            loads = rerouted.reshape(n, L, E).astype(np.float64)
            self.rerouted_pairs += float((moved.reshape(n, L).sum(1) * chunk.weight).sum())
        if self.plan.max_replicas == 1:
            rt = loads[..., None]
        else:  # redundant copies: the even split
            tiled = tile_plan(self.plan, n)
            rt = _planner.even_split(tiled, loads.reshape(n * L, E)).reshape(n, L, E, -1).astype(np.float64)
        gpu = self.plan.replica_gpu
        return ChunkLayout(replica_tokens=rt, replica_gpu=gpu, replicas=np.full(n, float(self.resident)))


def synthetic_topk(loads_l: np.ndarray, top_k: int) -> np.ndarray:
    """topk_ids [T, K] whose per-expert counts are exactly `loads_l [E]` (sum T*K). The grouping of pairs into
    tokens is arbitrary: only load-level predictors (history, oracle) may be fed with it."""
    ids = np.repeat(np.arange(len(loads_l), dtype=np.int32), loads_l.astype(np.int64))
    return ids.reshape(-1, top_k)


class LoadPrediction:
    """Drives a moeless.predictors predictor through one iteration: for layers l >= d the load of layer l
    is predicted from layer l-d's routing (the predictor's own protocol); the first d layers, which no
    earlier layer precedes, take the previous iteration's shares of that layer scaled to this iteration's
    pairs (the plan for them is made while the previous iteration ends)."""

    LOAD_LEVEL = ("history", "oracle")

    def __init__(self, predictor, token_level: bool, online: bool = True):
        self.predictor = predictor
        self.token_level = token_level
        self.online = online
        if not token_level and predictor.name not in self.LOAD_LEVEL:
            raise ValueError(f"predictor: {predictor.name!r} needs token-level routing (a routing trace); "
                             f"with popularity routing use one of {self.LOAD_LEVEL}")
        self._last_share = None

    def predict(self, loads: np.ndarray, topk_ids: np.ndarray | None, top_k: int) -> np.ndarray:
        from moeless.traces import TraceBatch

        L, E = loads.shape
        d = self.predictor.distance
        if topk_ids is None:
            topk_ids = np.stack([synthetic_topk(loads[l], top_k) for l in range(L)])
        T = topk_ids.shape[1]
        pred = np.empty((L, E))
        if self._last_share is None:
            self._last_share = np.full((L, E), 1.0 / E)
        pred[:d] = self._last_share[:d] * T * top_k
        self.predictor.begin_batch(TraceBatch(0, T, loads, topk_ids, None))
        for layer in range(L - d):
            ids = topk_ids[layer]
            if self.online:
                self.predictor.update(layer, ids)
            pred[layer + d] = self.predictor.predict(layer, ids)
        total = loads.sum(1, keepdims=True)
        self._last_share = np.where(total > 0, loads / np.maximum(total, 1), 1.0 / E)
        return pred


class MoelessPolicy(Policy):
    """moeless: per iteration, predict every layer's load, scale and place with `moeless.planner.plan_layers`
    (warm reuse of the previous plan's instances), then split the true pairs over the replicas (the
    serve-time split, or the paper's even split). Ablations: `scale=False` (one replica per expert, placement
    only), `warm=False` (no previous plan: every placement starts cold), `split="even"`."""

    serverless = True

    def __init__(self, name: str, prediction: LoadPrediction, gpus: int, slots_per_gpu: int, top_k: int, *,
                 scale: bool = True, warm: bool = True, split: str = "serve-time", rule: str = "ideal",
                 cv_threshold: float = 0.2):
        if split not in ("serve-time", "even"):
            raise ValueError(f"split must be 'serve-time' or 'even', got {split!r}")
        self.name, self.prediction = name, prediction
        self.gpus, self.slots, self.top_k = gpus, slots_per_gpu, top_k
        self.scale, self.warm, self.split, self.rule, self.cv_threshold = scale, warm, split, rule, cv_threshold
        self.previous: _planner.Plan | None = None

    def plan(self, loads: np.ndarray, topk_ids) -> _planner.Plan:
        predicted = self.prediction.predict(loads, topk_ids, self.top_k)
        plan = _planner.plan_layers(predicted, self.gpus, self.slots,
                                    previous=self.previous if self.warm else None,
                                    max_replicas=None if self.scale else 1, rule=self.rule,
                                    cv_threshold=self.cv_threshold)
        self.previous = plan
        return plan

    def layout(self, chunk) -> ChunkLayout:
        n, L, E = chunk.loads.shape
        plans = [self.plan(chunk.loads[i], None if chunk.topk_ids is None else chunk.topk_ids[i])
                 for i in range(n)]
        stacked = stack_plans(plans)
        flat = chunk.loads.reshape(n * L, E)
        if self.split == "even":
            rt = _planner.even_split(stacked, flat)
        elif self.gpus <= _planner.EXACT_SPLIT_MAX_GPUS:  # the exact split is fastest over many layers at once
            rt = _planner.serve_time_split(stacked, flat)
        else:  # the water-filling split grows faster than linearly in stacked layers: one iteration at a time
            R = stacked.max_replicas
            rt = np.concatenate([_pad_r(_planner.serve_time_split(p, chunk.loads[i]), R, 0)
                                 for i, p in enumerate(plans)])
        R = stacked.max_replicas
        return ChunkLayout(replica_tokens=rt.reshape(n, L, E, R).astype(np.float64),
                           replica_gpu=stacked.replica_gpu.reshape(n, L, E, R),
                           replicas=np.array([p.logcnt.sum() for p in plans], dtype=np.float64),
                           plans=plans)


class EplbPolicy(Policy):
    """EPLB (moeless.baselines.rebalance_experts): E + redundant physical experts per layer, every slot
    filled, rebuilt from the mean loads seen over the last `eplb_interval_s` of the policy's clock (about
    every 10 minutes in the paper); pairs split evenly over an expert's replicas. Like
    moeless.baselines.EPLB, the first plan is built from uniform loads (no history yet)."""

    def __init__(self, name: str, setup):
        m, cfg = setup.model, setup.config
        self.name, self.gpus = name, cfg.gpus
        self.num_physical = cfg.gpus * setup.slots_per_gpu
        self.interval = float(cfg.eplb_interval_s)
        self.next_rebuild = self.interval
        self.window = np.zeros((m.num_moe_layers, m.num_experts))
        self.plan = _baselines.rebalance_experts(np.ones_like(self.window), self.num_physical, self.gpus)
        self.resident = int(self.plan.logcnt.sum())
        self.rebuilds = 0

    def layout(self, chunk) -> ChunkLayout:
        return StaticPolicy(self.name, self.plan).layout(chunk)

    def observe(self, chunk, begin: np.ndarray) -> None:
        self.window += (chunk.loads * chunk.weight[:, None, None]).sum(0)
        if begin[-1] >= self.next_rebuild and self.window.sum() > 0:
            self.plan = _baselines.rebalance_experts(self.window, self.num_physical, self.gpus)
            self.window[:] = 0
            self.next_rebuild = float(begin[-1]) + self.interval
            self.rebuilds += 1
