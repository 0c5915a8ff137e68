"""The policies the simulator compares, each a thin driver of the real control plane (moeless.planner,
moeless.baselines, moeless.predictors, moeless.pool) over chunks of iterations.

A serverful policy turns one chunk of iterations (their true per-layer loads, shared by every policy) into
where every replica sits and how many pairs it serves (`replica_tokens [n, L, E, R]`, `replica_gpu`); the
engine prices the layouts with one cost model for all. moeless (serverless) is driven iteration by iteration
by moeless.sim.serverless, which asks this module's `MoelessPolicy` for predictions and plans and serves them
with `split_layers`, priced by the same cost model.

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
        L, E = loads.shape
        d = self.predictor.distance
        T = int(loads[0].sum()) // top_k if topk_ids is None else topk_ids.shape[1]
        pred = np.empty((L, E))
        if self._last_share is None:
            self._last_share = np.full((L, E), 1.0 / E)
        pred[:d] = self._last_share[:d] * T * top_k
        total = loads.sum(1, keepdims=True)
        if self.online and self.predictor.name == "history" and getattr(self.predictor, "share", None) is not None:
            # HistoryPredictor's update/predict, all layers at once: layer l+d is predicted from its share
            # before this iteration's update (updates run in layer order, l+d after l)
            from moeless.predictors import _decay

            p = self.predictor
            pred[d:] = p.share[d:] * T * top_k
            if T > 0:
                w = _decay(T, p.half_life_tokens)
                p.share = w * p.share + (1 - w) * loads / (T * top_k)
        else:
            from moeless.traces import TraceBatch

            if topk_ids is None:
                topk_ids = np.stack([synthetic_topk(loads[l], top_k) for l in range(L)])
            self.predictor.begin_batch(TraceBatch(0, T, loads, topk_ids, None))
            for layer in range(L - d):
                ids = topk_ids[layer]
                if self.online:
                    self.predictor.update(layer, ids)
                pred[layer + d] = self.predictor.predict(layer, ids)
            if self.online:  # the last d layers' routing is known once the iteration ends
                for layer in range(L - d, L):
                    self.predictor.update(layer, topk_ids[layer])
        self._last_share = np.where(total > 0, loads / np.maximum(total, 1), 1.0 / E)
        return pred


def lpt_split(replica_gpu: np.ndarray, loads: np.ndarray, replica_time) -> np.ndarray:
    """One replica per expert: experts by load, largest first, each put whole on the replica whose GPU then
    finishes earliest (`replica_time(pairs)` seconds). replica_gpu int [M, E, R] (-1 pad), loads [M, E] ->
    replica_tokens float [M, E, R]. In a memory-bound layer (decode) this reads each expert's weights once,
    where a pair-balancing split would read every replica's."""
    rg = np.asarray(replica_gpu)
    W = np.asarray(loads, dtype=np.float64)
    M, E, R = rg.shape
    G = int(rg.max(initial=0)) + 1
    out = np.zeros((M, E, R))
    busy = np.zeros((M, G))
    rows = np.arange(M)
    order = np.argsort(-W, axis=1, kind="stable")
    for k in range(E):
        e = order[:, k]
        w = W[rows, e]
        g = rg[rows, e]  # [M, R]
        t = replica_time(w)  # [M]
        finish = np.where(g >= 0, busy[rows[:, None], np.maximum(g, 0)] + t[:, None], np.inf)
        r = finish.argmin(1)
        out[rows, e, r] = w
        gr = g[rows, r]
        busy[rows, gr] += np.where(w > 0, t, 0.0)
    return out


def split_layers(plan: _planner.Plan, loads, cost, tokens, *, split: str = "serve-time"):
    """The data plane's split of true (or rounded predicted) counts `loads int [M, E]` over `plan`'s replicas,
    time-aware: per layer the faster, under `cost`, of the pair-balancing split (the planner's exact serve-time
    split; for more than EXACT_SPLIT_MAX_GPUS GPUs the even split, the exact one being too slow there) and
    `lpt_split` (each expert whole on one replica). Both are lossless: every pair goes to a replica of the
    expert its router chose. `split="even"`: the paper's even split only. Returns (replica_tokens float
    [M, E, R], LayerTimes of [M])."""
    G = plan.gpus
    gpu = plan.replica_gpu
    W = np.asarray(loads)
    if split == "even":
        rt = _planner.even_split(plan, W).astype(np.float64)
        return rt, cost.layer_times(rt, gpu, G, tokens)
    rt = np.zeros(gpu.shape)
    rt[..., 0] = W  # layers with one replica per expert: nothing to split
    multi = np.flatnonzero((plan.logcnt > 1).any(1))
    if multi.size:
        sub = _planner.Plan.from_phy2log(plan.phy2log[multi], plan.num_experts, G, plan.slots_per_gpu)
        Ws = W[multi]
        tok = np.broadcast_to(np.asarray(tokens, dtype=np.float64), (len(W),))[multi]
        if G <= _planner.EXACT_SPLIT_MAX_GPUS:
            base = _planner.serve_time_split(sub, Ws).astype(np.float64)
        else:
            base = _planner.even_split(sub, Ws).astype(np.float64)
        one = lpt_split(sub.replica_gpu, Ws, cost.replica_time)
        tb = cost.layer_times(base, sub.replica_gpu, G, tok).moe_latency
        to = cost.layer_times(one, sub.replica_gpu, G, tok).moe_latency
        best = np.where((to < tb)[:, None, None], one, base)
        rt[multi] = 0.0
        rt[multi, :, : best.shape[2]] = best
    return rt, cost.layer_times(rt, gpu, G, tokens)


class MoelessPolicy(Policy):
    """moeless's control plane for one iteration: predict every layer's load (`predict`), and ask
    `moeless.planner.plan_layers` for a plan that reuses the instances live in the function pool
    (`candidate`: warm pins kept wherever the balance allows, no hedge replicas: a replica with no predicted
    load saves nothing, so it is never worth a cold start). moeless.sim.serverless decides, layer by layer,
    whether that plan is worth its cold starts and realises it in the pool; `split_layers` serves it.
    Ablations: `scale=False` (one replica per expert), `warm=False` (the planner sees no previous plan, the
    pool's slots are not aligned and every new plan is taken: the policy without warm identity or
    cost-awareness), `split="even"` (the paper's even split)."""

    serverless = True

    def __init__(self, name: str, prediction: LoadPrediction, gpus: int, slots_per_gpu: int, top_k: int, *,
                 scale: bool = True, warm: bool = True, split: str = "serve-time", rule: str = "ideal",
                 cv_threshold: float = 0.2):
        if split not in ("serve-time", "even"):
            raise ValueError(f"split must be 'serve-time' or 'even', got {split!r}")
        self.name, self.prediction = name, prediction
        self.gpus, self.slots, self.top_k = gpus, slots_per_gpu, top_k
        self.scale, self.warm, self.split, self.rule, self.cv_threshold = scale, warm, split, rule, cv_threshold

    def predict(self, loads: np.ndarray, topk_ids) -> np.ndarray:
        """Predicted loads float [L, E] of one iteration (layer l from layer l-d's routing)."""
        return self.prediction.predict(loads, topk_ids, self.top_k)

    def candidate(self, predicted: np.ndarray, live: _planner.Plan | None) -> _planner.Plan:
        """The planner's plan for `predicted`, reusing `live` (the pool's live instances, idle ones included)."""
        return _planner.plan_layers(predicted, self.gpus, self.slots, previous=live if self.warm else None,
                                    max_replicas=None if self.scale else 1, rule=self.rule,
                                    cv_threshold=self.cv_threshold, reuse_slack=float("inf"), hedge=False)


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
