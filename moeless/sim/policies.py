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
from moeless.costmodel import LayerTimes

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


def replica_gpu(plan: _planner.Plan) -> np.ndarray:
    """`plan.replica_gpu` (int64 [L, E, R_max], -1 pad) by one table lookup instead of a division over the
    padded array; Plan recomputes its property on every access, so callers keep the result."""
    P = plan.gpus * plan.slots_per_gpu
    gpu_of_slot = np.r_[np.arange(P, dtype=np.int64) // plan.slots_per_gpu, -1]  # index -1: the pad
    return gpu_of_slot[plan.log2phy]



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
        self.replica_gpu = replica_gpu(plan)  # the plan is fixed: computed once

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
        return ChunkLayout(replica_tokens=rt, replica_gpu=self.replica_gpu, replicas=np.full(n, float(self.resident)))


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
    M, E, R = rg.shape
    order, pick, Ws = _lpt_pick(rg, loads, replica_time)
    out = np.zeros((M, E, R))
    out[np.arange(M)[:, None], order, pick] = Ws
    return out


def _lpt_pick(rg: np.ndarray, loads, replica_time):
    """lpt_split's choices: (order [M, E] experts in processing order, pick [M, E] the replica index each
    gets, Ws [M, E] their pairs)."""
    W = np.asarray(loads, dtype=np.float64)
    M, E, R = rg.shape
    G = int(rg.max(initial=0)) + 1
    rows = np.arange(M)
    order = np.argsort(-W, axis=1, kind="stable")
    # everything that does not depend on the GPUs' busy times, gathered once in processing order
    Ws = np.take_along_axis(W, order, 1)
    Ts = replica_time(Ws)  # [M, E] elementwise: the same seconds as one expert at a time
    Tadd = np.where(Ws > 0, Ts, 0.0)
    gs = rg[rows[:, None], order]  # [M, E, R]
    live = gs >= 0
    cnt = live.sum(2).max(0)  # [E] the most replicas any row's k-th expert has
    # flat indices into busy [M * G + 1]: to look up (a missing replica looks up the last entry, +inf) and to
    # add to (a missing replica adds to the last GPU, as busy[rows, -1] did)
    # expert-major ([E, M, R], contiguous per step): one step gathers one block
    add = np.ascontiguousarray((rows[:, None, None] * G + np.where(live, gs, G - 1)).transpose(1, 0, 2))
    look = np.where(live.transpose(1, 0, 2), add, M * G)
    TsT, TaddT = np.ascontiguousarray(Ts.T), np.ascontiguousarray(Tadd.T)
    busy = np.zeros(M * G + 1)
    busy[-1] = np.inf
    pick = np.zeros((M, E), dtype=np.int64)
    # experts are in decreasing load: past the last one with pairs in any row, nothing is placed or added
    K = int((Ws > 0).sum(1).max(initial=0))
    for k in range(K):
        rk = int(cnt[k])
        if rk <= 1:  # at most one replica in every row: no choice
            busy[add[k, :, 0]] += TaddT[k]
            continue
        r = (busy[look[k, :, :rk]] + TsT[k][:, None]).argmin(1)
        pick[:, k] = r
        busy[add[k, rows, r]] += TaddT[k]
    return order, pick, Ws


def slot_rank(phy2log: np.ndarray, num_experts: int) -> np.ndarray:
    """int64 [M, G*S]: each slot's index among its expert's replicas (ascending slot order, log2phy's R
    index); -1 for a free slot."""
    p2l = np.asarray(phy2log)
    M, P = p2l.shape
    key = np.where(p2l >= 0, p2l, num_experts)
    order = np.argsort(key.astype(np.int16) if num_experts < 1 << 15 else key, axis=1, kind="stable")
    ks = np.take_along_axis(key, order, 1)
    new = np.ones((M, P), dtype=bool)
    new[:, 1:] = ks[:, 1:] != ks[:, :-1]
    pos = np.arange(P)
    first = np.maximum.accumulate(np.where(new, pos, 0), axis=1)
    rank = np.empty((M, P), dtype=np.int64)
    np.put_along_axis(rank, order, pos - first, 1)
    return np.where(p2l >= 0, rank, -1)


def _slot_even(p2l, rank, logcnt, W) -> np.ndarray:
    """moeless.planner.even_split per slot: expert e's pairs W // R + (rank < W % R) on its replica `rank`."""
    rows = np.arange(len(p2l))[:, None]
    e = np.maximum(p2l, 0)
    w, c = W[rows, e], logcnt[rows, e]
    return np.where(p2l >= 0, w // c + (rank < w % c), 0).astype(np.float64)


def _to_slots(rt: np.ndarray, log2phy: np.ndarray, num_slots: int) -> np.ndarray:
    """[M, E, R] replica pairs -> [M, G*S] slot pairs."""
    out = np.zeros((len(rt), num_slots))
    li, ei, ri = np.nonzero(log2phy >= 0)
    out[li, log2phy[li, ei, ri]] = rt[li, ei, ri]
    return out


def split_slots(plan: _planner.Plan, loads, cost, tokens, *, split: str = "serve-time", rank=None):
    """`split_layers` per slot: (slot_tokens float [M, G*S] (pairs each slot of plan.phy2log serves),
    LayerTimes of [M]), the same numbers without the [M, E, R] padding. `rank`: `slot_rank` of the plan
    when the caller has it."""
    G, S, E = plan.gpus, plan.slots_per_gpu, plan.num_experts
    p2l = plan.phy2log
    W = np.asarray(loads)
    if W.shape != plan.logcnt.shape:
        raise ValueError(f"loads must have shape {list(plan.logcnt.shape)} (the plan's [L, E]), got {list(W.shape)}")
    if not np.issubdtype(W.dtype, np.integer):
        if not np.array_equal(W, np.floor(W)) or (W < 0).any():
            raise ValueError("loads must be non-negative integer pair counts")
    W = W.astype(np.int64)
    if rank is None:
        rank = slot_rank(p2l, E)
    if split == "even":
        st = _slot_even(p2l, rank, plan.logcnt, W)
        return st, cost.slot_layer_times(st, p2l, G, tokens)
    rows = np.arange(len(W))[:, None]
    # layers with one replica per expert: nothing to split
    st = np.where(p2l >= 0, W[rows, np.maximum(p2l, 0)], 0).astype(np.float64)
    multi = np.flatnonzero((plan.logcnt > 1).any(1))
    if multi.size:
        sub = plan if multi.size == len(W) else _planner.Plan.from_phy2log(p2l[multi], E, G, S)
        Ws = W[multi]
        tok = np.broadcast_to(np.asarray(tokens, dtype=np.float64), (len(W),))[multi]
        if G <= _planner.EXACT_SPLIT_MAX_GPUS:
            base = _to_slots(_planner.serve_time_split(sub, Ws).astype(np.float64), sub.log2phy, G * S)
        else:
            base = _slot_even(p2l[multi], rank[multi], plan.logcnt[multi], Ws)
        order, pick, Wo = _lpt_pick(replica_gpu(sub), Ws, cost.replica_time)
        m = np.arange(len(multi))[:, None]
        one = np.zeros((len(multi), G * S))
        one[m, sub.log2phy[m, order, pick]] = Wo
        tb = cost.slot_layer_times(base, p2l[multi], G, tok)
        to = cost.slot_layer_times(one, p2l[multi], G, tok)
        take = to.moe_latency < tb.moe_latency
        st[multi] = np.where(take[:, None], one, base)
        if multi.size == len(W):  # every layer priced already: the chosen split's times (rows are independent)
            return st, LayerTimes(*(np.where(take, getattr(to, f), getattr(tb, f)) for f in ("compute", "a2a", "misc")))
    return st, cost.slot_layer_times(st, p2l, G, tokens)


def split_layers(plan: _planner.Plan, loads, cost, tokens, *, split: str = "serve-time"):
    """The data plane's split of true (or rounded predicted) counts `loads int [M, E]` over `plan`'s replicas,
    time-aware: per layer the faster, under `cost`, of the pair-balancing split (the planner's exact serve-time
    split; for more than EXACT_SPLIT_MAX_GPUS GPUs the even split, the exact one being too slow there) and
    `lpt_split` (each expert whole on one replica). Both are lossless: every pair goes to a replica of the
    expert its router chose. `split="even"`: the paper's even split only. Returns (replica_tokens float
    [M, E, R], LayerTimes of [M]); `split_slots` gives the same per slot, faster."""
    st, times = split_slots(plan, loads, cost, tokens, split=split)
    l2p = plan.log2phy
    rt = np.where(l2p >= 0, np.take_along_axis(st, np.maximum(l2p, 0).reshape(len(st), -1), 1).reshape(l2p.shape), 0.0)
    return rt, times


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
        if getattr(self, "_static", None) is None or self._static.plan is not self.plan:
            self._static = StaticPolicy(self.name, self.plan)  # one per plan: its replica_gpu is kept
        return self._static.layout(chunk)

    def observe(self, chunk, begin: np.ndarray) -> None:
        self.window += (chunk.loads * chunk.weight[:, None, None]).sum(0)
        if begin[-1] >= self.next_rebuild and self.window.sum() > 0:
            self.plan = _baselines.rebalance_experts(self.window, self.num_physical, self.gpus)
            self.window[:] = 0
            self.next_rebuild = float(begin[-1]) + self.interval
            self.rebuilds += 1
