"""The simulator's runners: each drives one control-plane policy (moeless.policy, the same objects the serving loop
runs) over chunks of iterations, and one cost model prices every layout.

- `ServerfulRunner`: a serverful policy (megatron = `StaticEPPolicy`, eplb = `EPLBPolicy` at a deployment's
  cadence) or the lossy oracle. Its plan stays fixed between rebuilds, so a chunk is priced at once; EPLB's
  `end_iteration` is called iteration by iteration (rebuilds re-price what follows them).
- `moeless.sim.serverless.ServerlessRunner`: moeless, through `moeless.engine.Engine` layer by layer, exactly as
  `moeless.serve` calls it.
- `LoadPrediction`: the predictor of layer l+d from layer l's routing (the predictors' own protocol).

Memory x time is one accounting for all: every policy's instances live in a `moeless.pool.FunctionPool` that
bills each live instance (resident, warm, idle under keep-alive, or loading) from load to release; a serverful
policy's instances are resident (never released) and its rebuilds' copies are counted like cold starts.

This module never decides a plan itself (the policies do), never reads a wall clock, and never changes routing:
every pair is served by a replica of the expert the router chose, except under the oracle, which is the paper's
lossy upper bound and is labelled so.
"""
from __future__ import annotations

import numpy as np

from moeless import baselines as _baselines
from moeless import planner as _planner
from moeless.costmodel import equation2_cost
from moeless.pool import FunctionPool

POLICY_NAMES = ("megatron", "eplb", "eplb-vllm", "oracle", "moeless", "moeless-bound")


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


def resident_pool(setup, keep_alive_s: float = float("inf")) -> FunctionPool:
    """A function pool of the setup's shape whose copies take the cost model's times (moeless.engine.cost_pool:
    the one serving builds too)."""
    from moeless.engine import cost_pool

    return cost_pool(setup.cost, setup.model.num_moe_layers, setup.config.gpus, setup.slots_per_gpu,
                     keep_alive_s=keep_alive_s)


class ServerfulRunner:
    """A serverful policy (or the lossy oracle over static EP) priced chunk by chunk."""

    serverless = False

    def __init__(self, name: str, policy, setup, *, oracle: bool = False):
        self.name, self.policy, self.setup, self.lossy = name, policy, setup, oracle
        self.pool = resident_pool(setup)
        self.plan = policy.initial_plan()
        self.pool.apply(self.plan, 0.0)  # loaded before the first batch is ready
        self.initial_loads = int(self.pool.meter.cold_starts)
        self.rerouted_pairs = 0.0
        self._rg = replica_gpu(self.plan)

    @property
    def resident(self) -> int:
        return int(self.plan.logcnt.sum())

    def warm(self, loads: np.ndarray, topk, weights: np.ndarray, times: np.ndarray) -> None:
        """History before the window (a running deployment): EPLB's statistics and its plan from them."""
        if hasattr(self.policy, "warm"):
            self.plan = self.policy.warm(loads, weights, times)
            self._rg = replica_gpu(self.plan)
            self.pool.apply(self.plan, 0.0)
            self.initial_loads = int(self.pool.meter.cold_starts)

    def _layout(self, loads: np.ndarray):
        """replica_tokens float [n, L, E, R] of the chunk's loads [n, L, E] on the current plan (the policy's split:
        one instance per expert, or EPLB's even split over its replicas)."""
        n, L, E = loads.shape
        if self.plan.max_replicas == 1:
            return loads[..., None].astype(np.float64)
        tiled = tile_plan(self.plan, n)
        return _planner.even_split(tiled, loads.reshape(n * L, E)).reshape(n, L, E, -1).astype(np.float64)

    def _price(self, chunk, sl: slice):
        m, G = self.setup.model, self.setup.config.gpus
        loads = chunk.loads[sl].astype(np.float64)
        if self.lossy:  # capacity-aware rerouting: every expert at most ceil(total / E) pairs (changes routing)
            n, L, E = loads.shape
            rerouted, moved = _baselines.oracle_reroute(chunk.loads[sl].reshape(n * L, E))
            loads = rerouted.reshape(n, L, E).astype(np.float64)
            self.rerouted_pairs += float((moved.reshape(n, L).sum(1) * chunk.weight[sl]).sum())
        rt = self._layout(loads)
        gpu = np.broadcast_to(self._rg, rt.shape)
        times = self.setup.cost.layer_times(rt, gpu, G, chunk.tokens[sl][:, None])
        m_misc = m.dense_params_per_layer * m.bytes_per_param * G
        eq2 = equation2_cost(times, gpu, m.expert_bytes, m_misc).sum(1)
        return times.moe_latency, times.misc, eq2

    def run_chunk(self, chunk, meter) -> None:
        from moeless.sim.engine import _clock_scan

        n = len(chunk.tokens)
        start = 0
        while start < n:
            sl = slice(start, n)
            moe, misc, eq2 = self._price(chunk, sl)
            it_s = (moe + misc).sum(1)
            begin, end = _clock_scan(chunk.ready_s[sl], it_s * chunk.weight[sl], meter.clock)
            stop = n
            rebuilt = None
            if not self.lossy:
                for i in range(start, n):  # EPLB's statistics and cadence, iteration by iteration
                    new = self.policy.end_iteration(chunk.loads[i], float(begin[i - start]), float(chunk.weight[i]))
                    if new is not None:
                        stop, rebuilt = i + 1, new
                        break
            k = stop - start
            meter.result.add(moe[:k], it_s[:k], chunk.weight[start:stop], np.full(k, float(self.resident)),
                             np.zeros(k, dtype=np.int64), begin[:k], prefill=chunk.prefill[start:stop])
            meter.result.eq2_byte_s += float((eq2[:k] * chunk.weight[start:stop]).sum())
            meter.clock = float(begin[k - 1] + it_s[k - 1] * chunk.weight[stop - 1]) if k < len(begin) else end
            if rebuilt is not None:  # the new plan's copies are realised (counted) when the rebuild happens
                self.pool.apply(rebuilt, meter.clock)
                self.plan = rebuilt
                self._rg = replica_gpu(rebuilt)
            start = stop

    def finish(self, meter) -> None:
        pr, m = meter.result, self.setup.model
        bill = self.pool.close(meter.clock)
        pr.cost_gb_s = bill.gb_seconds
        pr.gpu_seconds = bill.gpu_seconds
        pr.extra["gb_copied"] = (bill.bytes_copied - self.initial_loads * m.expert_bytes) / 1e9
        pr.extra["copies"] = int(bill.cold_starts - self.initial_loads)
        pr.extra["resident_instances"] = self.resident
        if hasattr(self.policy, "rebuilds"):
            pr.extra["rebuilds"] = int(self.policy.rebuilds)
        pr.accounting = (f"serverful (moeless.pool, never released): {self.resident} resident expert instances x "
                         f"{m.expert_bytes / 1e9:.3f} GB for the whole run ({meter.clock:.1f} s); rebuilds' copies "
                         f"counted as copies, without stalls (engines move weights in the background)")


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
        if self.predictor.name == "history":
            # layer l+d is predicted from its share before this iteration's update (updates run in layer order,
            # l+d after l), all layers at once
            pred[d:] = self.predictor.predict_loads(T * top_k)[d:]
            if self.online:
                self.predictor.observe_loads(loads, T)
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
