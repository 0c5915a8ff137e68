"""The per-iteration control plane of real serving: predict -> scale -> place, and the function pool realises it.

One `Engine` per served model and policy. In every iteration, for every MoE layer l in order, the data plane
(`moeless.serve`) calls:

    plan(l)                           the one-layer Plan that layer l runs with (decided d layers earlier)
    split(l, counts)                  replica_tokens [E, R] of layer l for its true counts (serve-time split)
    observe(l, counts, predicted)     layer l's true counts and the predicted counts of layer l+d arrived:
                                      scale and place layer l+d, realise it in the pool; returns the cold starts
                                      the data plane must copy (the instances that are not warm)

Layers l+d past the last layer are planned for the next iteration from this iteration's true counts of
layer l+d-L (nothing can predict the next batch's first layers before it exists).

Policies: "moeless" (the planner's `plan_layers`, warm reuse of the layer's previous plan), "ep" (Megatron
static expert parallelism: E/G experts per GPU, never re-planned), or a callable
`policy(layer, loads [E] float, previous one-layer Plan) -> one-layer Plan` (tests and experiments).

Hysteresis (`replan_slack`, `replan_min_pairs`): a layer keeps its plan -- no planning, no cold start -- while
that plan still serves the new loads well: its max GPU load under the exact serve-time split is within
(1 + replan_slack) x the mean GPU load, or within `replan_min_pairs` pairs of it (small decode batches, whose
counts are mostly noise and whose imbalance costs less than re-copying experts). None = plan every time.

Load prediction: `GateReplicaLoads` runs the paper's gate-replica predictor on the gate input of layer l as torch
ops on the data plane's device (the serving loop puts it on a side CUDA stream) and returns per-expert counts;
without it the engine predicts layer l+d from its true counts in the previous iteration.

Every rank runs one engine on the same inputs (global counts, rank 0's clock), so the plans agree without being
broadcast. This module is floor 3: it never imports torch.distributed, never copies weights (the data plane
does) and never changes routing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from moeless.baselines import static_plan
from moeless.planner import Plan, _positive_int, gpu_loads, plan_layers, serve_time_split
from moeless.pool import ApplyResult, FunctionPool, Meter, SimulatedClock

__all__ = ["Engine", "EngineStats", "GateReplicaLoads", "POLICIES", "default_slots_per_gpu", "replay_pool"]

POLICIES = ("moeless", "ep")


def default_slots_per_gpu(num_experts: int, gpus: int, extra: int = 1) -> int:
    """Static EP's share ceil(E / G) plus `extra` slots per GPU for replicas."""
    if not isinstance(extra, (int, np.integer)) or extra < 0:
        raise ValueError(f"extra must be an int >= 0, got {extra!r}")
    return -(-int(num_experts) // int(gpus)) + int(extra)


@dataclass
class EngineStats:
    """What the control plane did: per (iteration, layer) replicas in use; plans made; cold starts realised."""

    replicas: list = field(default_factory=list)  # [iterations] of int64 [L]
    plans_made: int = 0
    plan_changes: int = 0  # plans whose phy2log differs from the layer's previous one
    plans_kept: int = 0  # layers whose previous plan still served the new loads well (hysteresis)
    cold_starts: int = 0
    warm_starts: int = 0


class GateReplicaLoads:
    """Per-expert counts of layer l+d predicted from layer l's gate input, as torch ops on any device.

    Wraps a fitted (or freshly copied) `moeless.predictors.GateReplicaPredictor`: its replica of layer l+d's
    gate [E, H] times layer l's gate input [T, H], then the predictor's selection (top-k of the logits, or of
    sigmoid + bias where the model has a correction bias), counted per expert. Same numbers as
    `GateReplicaPredictor.predict`, without a host round trip of the hidden states.
    """

    def __init__(self, predictor):
        from moeless.predictors import GateReplicaPredictor

        if not isinstance(predictor, GateReplicaPredictor):
            raise ValueError(f"predictor must be a GateReplicaPredictor, got {type(predictor).__name__}")
        self.predictor = predictor
        self.distance = predictor.distance
        self.num_layers = predictor.num_layers
        self.num_experts = predictor.num_experts
        self.top_k = predictor.top_k
        self._weights = {}  # (device, dtype) -> (replicas [L-d, E, H], bias [L, E] or None)

    def _on(self, device, dtype):
        import torch

        key = (str(device), dtype)
        if key not in self._weights:
            rep = torch.from_numpy(np.ascontiguousarray(self.predictor.replicas)).to(device=device, dtype=dtype)
            bias = None
            if self.predictor.bias is not None:
                bias = torch.from_numpy(np.ascontiguousarray(self.predictor.bias)).to(device=device, dtype=torch.float32)
            self._weights[key] = (rep, bias)
        return self._weights[key]

    def counts(self, layer: int, gate_input):
        """int64 tensor [E] on gate_input's device: predicted pairs per expert of layer `layer + d`, or None when
        layer + d is past the last layer."""
        import torch

        if layer + self.distance >= self.num_layers:
            return None
        rep, bias = self._on(gate_input.device, gate_input.dtype)
        if gate_input.shape[0] == 0:
            return torch.zeros(self.num_experts, dtype=torch.int64, device=gate_input.device)
        logits = (gate_input @ rep[layer].T).float()
        if bias is not None:
            logits = torch.sigmoid(logits) + bias[layer + self.distance]
        ids = torch.topk(logits, self.top_k, dim=-1).indices
        return torch.bincount(ids.reshape(-1), minlength=self.num_experts)


class Engine:
    """The control plane of `num_layers` MoE layers on `gpus` x `slots_per_gpu` slots (see the module docstring).

    pool: a `moeless.pool.FunctionPool` of the same shape (None: one with `expert_bytes`, `keep_alive_s`,
    `link_bandwidth` bytes/s for its cold-start time model, and a simulated clock: pass `now` (seconds) to
    `start` / `observe` / `close`, e.g. the serving loop's wall clock). planner_options go to
    `moeless.planner.plan_layers`. replan_slack / replan_min_pairs: the hysteresis of the module docstring.
    align: renumber each new plan's slots inside a GPU to the pool's live instances (`FunctionPool.align`),
    so an expert that stays on a GPU is never copied again, whatever slot the planner gave it.
    """

    def __init__(self, num_layers: int, num_experts: int, gpus: int, slots_per_gpu: int | None = None, *,
                 policy="moeless", distance: int = 1, pool: FunctionPool | None = None,
                 expert_bytes: float = 1.0, keep_alive_s: float = 60.0, link_bandwidth: float = 25e9,
                 planner_options: dict | None = None, replan_slack: float | None = None,
                 replan_min_pairs: int = 0, align: bool = False):
        for name, v in (("num_layers", num_layers), ("num_experts", num_experts), ("gpus", gpus),
                        ("distance", distance)):
            _positive_int(name, v)
        if slots_per_gpu is None:
            slots_per_gpu = default_slots_per_gpu(num_experts, gpus, 1 if policy != "ep" else 0)
        _positive_int("slots_per_gpu", slots_per_gpu)
        if gpus * slots_per_gpu < num_experts:
            raise ValueError(f"slots_per_gpu={slots_per_gpu} x gpus={gpus} cannot hold {num_experts} experts once")
        if not (callable(policy) or policy in POLICIES):
            raise ValueError(f"policy must be one of {POLICIES} or a callable, got {policy!r}")
        if policy == "ep" and num_experts % gpus:
            raise ValueError(f"policy 'ep' needs num_experts={num_experts} divisible by gpus={gpus}")
        if replan_slack is not None and not (isinstance(replan_slack, (int, float)) and math.isfinite(replan_slack)
                                             and replan_slack >= 0):
            raise ValueError(f"replan_slack must be None or a finite number >= 0, got {replan_slack!r}")
        if isinstance(replan_min_pairs, bool) or not isinstance(replan_min_pairs, (int, np.integer)) \
                or replan_min_pairs < 0:
            raise ValueError(f"replan_min_pairs must be an int >= 0, got {replan_min_pairs!r}")
        self.replan_slack = None if replan_slack is None else float(replan_slack)
        self.replan_min_pairs = int(replan_min_pairs)
        self.align = bool(align)
        self.L, self.E, self.G, self.S = int(num_layers), int(num_experts), int(gpus), int(slots_per_gpu)
        self.distance = int(distance)
        self.policy = policy
        self.planner_options = dict(planner_options or {})
        if pool is None:
            pool = FunctionPool(self.L, self.G, self.S, expert_bytes=float(expert_bytes),
                                link_bandwidth=float(link_bandwidth), keep_alive_s=float(keep_alive_s),
                                clock=SimulatedClock())
        elif (pool.num_layers, pool.gpus, pool.slots_per_gpu) != (self.L, self.G, self.S):
            raise ValueError(f"pool has (layers, gpus, slots) = ({pool.num_layers}, {pool.gpus}, "
                             f"{pool.slots_per_gpu}), the engine ({self.L}, {self.G}, {self.S})")
        self.pool = pool
        if self.E % self.G == 0 and self.E // self.G <= self.S:
            initial = static_plan(self.L, self.E, self.G, self.S)
        else:  # experts round-robin over GPUs when E / G is not whole
            p2l = np.full((self.L, self.G * self.S), -1, dtype=np.int64)
            e = np.arange(self.E)
            p2l[:, (e % self.G) * self.S + e // self.G] = e
            initial = Plan.from_phy2log(p2l, self.E, self.G, self.S)
        self._plans = [initial[l] for l in range(self.L)]
        self._last_counts = np.zeros((self.L, self.E), dtype=np.int64)  # true counts, latest iteration
        self._iteration_replicas = np.zeros(self.L, dtype=np.int64)
        self.stats = EngineStats()
        self.applied: list[tuple[float, int, np.ndarray]] = []  # (now, layer, phy2log [G*S]) in pool order
        self._started = False

    # -- lifecycle -----------------------------------------------------------------------------------------
    def start(self, now: float | None = None) -> ApplyResult:
        """Realise the initial placement (static EP layout) in the pool: every slot of every layer cold-starts."""
        if self._started:
            raise ValueError("engine already started")
        self._started = True
        full = Plan.from_phy2log(np.stack([p.phy2log[0] for p in self._plans]), self.E, self.G, self.S)
        t = self.pool.advance_to(now)
        res = self.pool.apply(full, t)
        for l in range(self.L):
            self.applied.append((t, l, full.phy2log[l].copy()))
        self.stats.cold_starts += len(res.cold)
        return res

    def close(self, now: float | None = None) -> Meter:
        """Charge the pool up to `now`, release everything, return the meter."""
        return self.pool.close(now)

    # -- per layer -----------------------------------------------------------------------------------------
    def plan(self, layer: int) -> Plan:
        """The one-layer Plan layer `layer` runs with now."""
        return self._plans[self._layer(layer)]

    def split(self, layer: int, counts, *, exact: bool = True) -> np.ndarray:
        """replica_tokens int64 [E, R] of `layer` for its true global counts [E] (pairs per expert): the exact
        serve-time split, or (exact=False, for batches too small for balance to matter) every pair on its
        expert's first replica: fewer, larger GEMM groups per rank."""
        counts = self._counts(counts, "counts")
        plan = self._plans[self._layer(layer)]
        if exact:
            return serve_time_split(plan, counts[None])[0]
        rt = np.zeros(plan.log2phy.shape[1:], dtype=np.int64)
        rt[:, 0] = counts
        return rt

    def observe(self, layer: int, counts, predicted=None, now: float | None = None, *, replan: bool = True):
        """Layer `layer`'s true global counts [E] arrived, with the predicted counts [E] of layer + d (or None).

        Plans layer (layer + d) mod L (the next iteration's when it wraps), realises it in the pool at `now`
        and returns (target layer, ApplyResult) -- or None when the layer keeps its plan ("ep", `replan` False,
        or the hysteresis found the current plan still good for the loads)."""
        layer = self._layer(layer)
        counts = self._counts(counts, "counts")
        self._iteration_replicas[layer] = int(self._plans[layer].logcnt.sum())
        target = layer + self.distance
        if target >= self.L:
            target -= self.L
            loads = self._last_counts[target] if target < layer else counts  # true counts of this iteration
        elif predicted is not None:
            loads = self._counts(predicted, "predicted")
        else:
            loads = self._last_counts[target]  # the previous iteration's true counts of the target layer
        self._last_counts[layer] = counts
        if layer == self.L - 1:
            self.stats.replicas.append(self._iteration_replicas.copy())
        if self.policy == "ep" or loads.sum() == 0 or not replan:
            return None
        previous = self._plans[target]
        if self.policy == "moeless" and self._still_balanced(previous, loads):
            self.stats.plans_kept += 1
            return None
        if callable(self.policy):
            new = self.policy(target, loads.astype(np.float64), previous)
            if not isinstance(new, Plan) or new.num_layers != 1 or new.logcnt.shape != (1, self.E) \
                    or (new.gpus, new.slots_per_gpu) != (self.G, self.S):
                raise ValueError(f"policy must return a one-layer Plan on {self.G} x {self.S} slots for "
                                 f"{self.E} experts")
            new.validate()
        else:
            new = plan_layers(loads[None].astype(np.float64), self.G, self.S, previous=previous,
                              **self.planner_options)
        if self.align and hasattr(self.pool, "align"):
            # warm identity (layer, GPU, expert): the planner's slot order inside a GPU is arbitrary, so take
            # the order that keeps every instance the pool holds in its slot (balance unchanged)
            new = self.pool.align(new, layer=target)
        self.stats.plans_made += 1
        if not np.array_equal(new.phy2log, previous.phy2log):
            self.stats.plan_changes += 1
        self._plans[target] = new
        t = self.pool.advance_to(now)
        res = self.pool.apply(new, t, layer=target)
        self.applied.append((t, target, new.phy2log[0].copy()))
        self.stats.cold_starts += len(res.cold)
        self.stats.warm_starts += len(res.warm)
        return target, res

    def _still_balanced(self, plan: Plan, loads: np.ndarray) -> bool:
        """Does `plan` serve `loads` within the hysteresis (max GPU load under the exact split vs the mean)?"""
        if self.replan_slack is None:
            return False
        mean = loads.sum() / self.G
        limit = max(self.replan_slack * mean, self.replan_min_pairs)
        # cheap bound first: a GPU serves at most the whole load of the experts it holds a replica of
        holds = np.zeros((self.E, self.G), dtype=bool)
        valid = plan.log2phy[0] >= 0
        holds[np.nonzero(valid)[0], plan.log2phy[0][valid] // self.S] = True
        if (loads @ holds).max() - mean <= limit:
            return True
        per_gpu = gpu_loads(plan, serve_time_split(plan, loads[None]))[0]
        return bool(per_gpu.max() - mean <= limit)

    # -- checks --------------------------------------------------------------------------------------------
    def _layer(self, layer) -> int:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < self.L:
            raise ValueError(f"layer must be an int in [0, {self.L}), got {layer!r}")
        return int(layer)

    def _counts(self, counts, name) -> np.ndarray:
        c = np.asarray(counts)
        if c.shape != (self.E,):
            raise ValueError(f"{name} must have shape [E={self.E}], got {c.shape}")
        if not np.issubdtype(c.dtype, np.number) or (c < 0).any() or not np.all(np.isfinite(c)):
            raise ValueError(f"{name} must be finite non-negative counts")
        if (c != np.round(c)).any():
            raise ValueError(f"{name} must hold integer counts")
        return c.astype(np.int64)

    # -- batch size gate (asked by the data plane before it predicts and splits a layer) ---------------------
    def wants_plan(self, batch_tokens: int, top_k: int) -> bool:
        """Can an iteration of `batch_tokens` tokens (all GPUs), each routed to `top_k` experts, ever make this
        engine re-plan a layer? False for "ep" (never re-planned) and when the hysteresis keeps every plan for
        it: even all its pairs on one GPU stay within `replan_min_pairs` of the mean. Then the data plane needs
        neither the prediction nor the exact split (every pair may go to its expert's first replica)."""
        if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, (int, np.integer)) or batch_tokens < 0:
            raise ValueError(f"batch_tokens must be an int >= 0, got {batch_tokens!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
        if self.policy == "ep":
            return False
        if self.replan_slack is None:
            return True
        return batch_tokens * top_k * (self.G - 1) > self.replan_min_pairs * self.G


def replay_pool(applied, num_layers: int, num_experts: int, gpus: int, slots_per_gpu: int, *,
                expert_bytes: float, link_bandwidth: float, keep_alive_s: float, end: float) -> Meter:
    """A fresh pool fed the same (now, layer, phy2log) sequence as an engine's: the independent bill of a run."""
    pool = FunctionPool(num_layers, gpus, slots_per_gpu, expert_bytes=expert_bytes, link_bandwidth=link_bandwidth,
                        keep_alive_s=keep_alive_s, clock=SimulatedClock())
    for now, layer, p2l in applied:
        plan = Plan.from_phy2log(p2l[None], num_experts, gpus, slots_per_gpu)
        pool.apply(plan, now, layer=layer)
    return pool.close(end if math.isfinite(end) else None)
