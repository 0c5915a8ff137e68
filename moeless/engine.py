"""The per-iteration control plane: it drives one policy (moeless.policy) layer by layer and realises its plans in
the serverless function pool. The real serving loop (moeless.serve) and the simulator (moeless.sim) both run it,
the same way, so a simulated figure describes what serving does.

In every iteration the data plane calls, for every MoE layer l in order:

    begin_iteration(tokens, prefill)  once, before layer 0: the batch's tokens (its non-expert time) and phase
    plan(l)                           the one-layer Plan layer l runs with (decided d layers earlier)
    split(l, counts)                  replica_tokens [E, R] of layer l for its true counts (the policy's split)
    observe(l, counts, predicted)     layer l's true counts and the predicted counts of layer l+d arrived: the
                                      policy decides layer l+d, the pool realises it; returns (l+d, ApplyResult)
                                      whose cold starts the data plane must copy, or None
    prepare(l)                        layer l has run: the policy decides its plan for the next iteration (the
                                      copies have an iteration to arrive; see prepare_every in the class
                                      docstring); (l, ApplyResult) or None
    end_iteration(now)                after the last layer: the policy's end-of-iteration plan (EPLB's rebuild),
                                      realised in the pool (ApplyResult or None)

Layers l+d past the last layer are decided for the next iteration from this iteration's true counts of layer
l+d-L (nothing predicts the next batch's first layers before it exists).

What the policy is told (`Policy.decide_live`: the engine's live state, from which a policy decides as `decide`
would on the `LayerContext` it describes) is computed in *model time*, the cost model's predicted seconds of the
layers served so far, not the wall clock: the copy links' queues (a cold start queues on its GPU's link for
the cost model's copy time), the look-ahead (d layers of the recent mean layer time) and the expected warm life
of a new instance (iterations in which the instances this engine cold-started served pairs, over how many of
them have ended: `Engine.horizon`, measured online). So the same inputs give the same plans in serving and in
simulation; only the pool's keep-alive (releases) follows the clock passed as `now`.

Load prediction: `GateReplicaLoads` runs the paper's gate-replica predictor on the gate input of layer l as torch
ops on the data plane's device and returns per-expert counts; without it the engine predicts layer l+d from its
true counts in the previous iteration.

Every rank runs one engine on the same inputs (global counts, rank 0's clock), so the plans agree without being
broadcast. This module is floor 3: it never imports torch.distributed, never copies weights (the data plane
does) and never changes routing.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np

from moeless._jit import njit
from moeless.planner import Plan
from moeless.planner.plan import _positive_int
from moeless.policy import Policy
from moeless.policy.base import _I64, _SCANNED, check_count_values, raise_count_status as _raise_count_status
from moeless.policy._kernels import count_status, slot_flags, total as _total
from moeless.pool import ApplyResult, FunctionPool, Meter, SimulatedClock

__all__ = ["Engine", "EngineStats", "GateReplicaLoads", "cost_pool", "default_slots_per_gpu"]


def cost_pool(cost, num_layers: int, gpus: int, slots_per_gpu: int, *, keep_alive_s: float,
              expert_bytes: float | None = None) -> FunctionPool:
    """A function pool whose copies take the cost model's times: host copies take cold_start_s(host), peer
    copies inside the hardware's link groups the peer's (the paper's linear model has no copy term: infinitely
    fast links). The bill counts `expert_bytes` per instance (default: the cost model's; serving passes its
    weights' real size). Serving and the simulator both build theirs here, so the policy sees the same copy
    links in both."""
    nbytes = float(cost.model.expert_bytes if expert_bytes is None else expert_bytes)
    host_s, peer_s = cost.cold_start_s(from_peer=False), cost.cold_start_s(from_peer=True)
    hw = getattr(cost, "hardware", None)
    return FunctionPool(num_layers, gpus, slots_per_gpu, expert_bytes=nbytes,
                        link_bandwidth=nbytes / host_s if host_s > 0 else float("inf"),
                        peer_bandwidth=nbytes / peer_s if peer_s > 0 else float("inf"),
                        link_group=int(getattr(hw, "link_group", 1)), keep_alive_s=keep_alive_s,
                        clock=SimulatedClock())


@njit
def _observe_counts(counts, layer, last_counts, iter_counts, recent, n_recent, share, has_share, w, target_loads,
                    check_target):
    """Layer `layer`'s true counts into the engine's per-layer state (one pass; see Engine.observe): this
    iteration's and the latest counts, the ring of recent counts, and the load shares averaged with weight w on
    the old ones (the first loaded iteration sets them). First the checks, before anything is written. Returns
    (status, the sum of target_loads [E]: the loads the decision d layers ahead plans for, another layer's row or
    these counts): status is count_status of the counts (whole ones), or 3 + that of target_loads (if
    check_target: a caller's prediction), or 0."""
    status = count_status(counts, True)
    if status:
        return status, 0.0
    if check_target:
        status = count_status(target_loads, False)
        if status:
            return 3 + status, 0.0
    target_total = 0.0
    for e in range(target_loads.shape[0]):
        target_total += target_loads[e]
    E = counts.shape[0]
    total = 0.0
    slot = n_recent[layer] % recent.shape[1]
    for e in range(E):
        c = counts[e]
        iter_counts[layer, e] = c
        last_counts[layer, e] = c
        recent[layer, slot, e] = c
        total += c
    n_recent[layer] += 1
    if total > 0:
        if has_share[layer]:
            for e in range(E):
                share[layer, e] = w * share[layer, e] + (1 - w) * (counts[e] / total)
        else:
            for e in range(E):
                share[layer, e] = counts[e] / total
            has_share[layer] = 1
    return 0, target_total


@njit
def _steady(loads, k, l, ref_loads, live, ref_live, ready, last_use, model_t, since, ref_flags, link_free, scal,
            ref_scal, tol, z):
    """Whether the inputs of layer l's decision of kind k are those of its last one (ref_*[k, l]) within their
    noise (see Engine's steady): the same live instances (live [L, G*S]), each loaded (ready <= model_t) and pinned
    (last_use >= since) as then, no copy link busy (link_free [G] <= model_t), the look-ahead, warm lives and
    heaviest scenario (scal [4]) within a relative `tol` of then (ref_scal [K, L, 8]: the four, then the range of
    each warm life, lo and hi, for which the decision is known to stay the same (Policy.life_range): where known, a
    warm life counts as unchanged if it is then's or strictly inside it, instead of within tol), and the loads
    within the sampling noise of then: the sum over experts of (w - r)^2 / (w + r + 1) (two counts' difference over
    its Poisson variance: about E - 1 for two samples of one popularity) at most E + z sqrt(2E)."""
    for s in range(live.shape[1]):
        v = live[l, s]
        if v != ref_live[k, l, s] or _flags(v, ready[l, s], last_use[l, s], model_t, since) != ref_flags[k, l, s]:
            return False
    for g in range(link_free.shape[0]):
        if link_free[g] > model_t:
            return False
    for i in range(scal.shape[0]):
        v = scal[i]
        r = ref_scal[k, l, i]
        if v == r:
            continue
        if i == 1 or i == 2:
            lo = ref_scal[k, l, 2 + 2 * i]
            if not np.isnan(lo):
                if not lo < v < ref_scal[k, l, 3 + 2 * i]:
                    return False
                continue
        if abs(v - r) > tol * abs(r):
            return False
    E = loads.shape[0]
    stat = 0.0
    for e in range(E):
        d = loads[e] - ref_loads[k, l, e]
        stat += d * d / (loads[e] + ref_loads[k, l, e] + 1.0)
    return stat <= E + z * np.sqrt(2.0 * E)


@njit
def _steady_record(loads, k, l, ref_loads, live, ref_live, ready, last_use, model_t, since, ref_flags, scal, ref_scal,
                   life_range):
    """Record the inputs of layer l's decision of kind k as its reference (see _steady), with the warm lives'
    range life_range [4] within which its plan stays the same (NaN: not known)."""
    for e in range(loads.shape[0]):
        ref_loads[k, l, e] = loads[e]
    for s in range(live.shape[1]):
        ref_live[k, l, s] = live[l, s]
        ref_flags[k, l, s] = _flags(live[l, s], ready[l, s], last_use[l, s], model_t, since)
    for i in range(scal.shape[0]):
        ref_scal[k, l, i] = scal[i]
    for i in range(4):
        ref_scal[k, l, 4 + i] = life_range[i]


_UNKNOWN_RANGE = np.full(4, np.nan)  # (a policy that does not say where its decision holds: Policy.life_range)


@njit
def _flags(expert, ready, last_use, model_t, since):
    """A slot's state as _steady compares it: 1 if its copy is in, plus 2 if it holds a pinned instance (the
    policy's context, _kernels.slot_flags)."""
    loaded, pinned = slot_flags(expert, ready, last_use, model_t, since)
    return (1 if loaded else 0) + (2 if pinned else 0)


@njit
def _mark_used(rt, l2p, p2l, made_row, kind_row, last_use_row, now):
    """The slots whose replicas serve pairs (rt > 0) were used at `now`; returns how many of them hold the
    instance this engine cold-started there (made_row), as (point instances, hedges) by kind_row."""
    uses = 0
    hedges = 0
    for e in range(rt.shape[0]):
        for r in range(rt.shape[1]):
            s = l2p[e, r]
            if s >= 0 and rt[e, r] > 0:
                last_use_row[s] = now
                if made_row[s] == p2l[s]:
                    if kind_row[s]:
                        hedges += 1
                    else:
                        uses += 1
    return uses, hedges


@njit
def _count_live_made(made, kind, expert):
    """How many slots still hold the instance this engine cold-started there (made [L, G*S], -1 where none), as
    (point instances, hedges) by kind [L, G*S]."""
    n = 0
    hedges = 0
    for l in range(made.shape[0]):
        for s in range(made.shape[1]):
            if made[l, s] >= 0 and made[l, s] == expert[l, s]:
                if kind[l, s]:
                    hedges += 1
                else:
                    n += 1
    return n, hedges


@njit
def _scaled_share(share, counts, out):
    """out [E] = share [E] times the pairs of counts [E] (prepare's loads), in one pass; returns their sum."""
    pairs = 0
    for e in range(counts.shape[0]):
        pairs += counts[e]
    tot = 0.0
    for e in range(share.shape[0]):
        out[e] = share[e] * float(pairs)
        tot += out[e]
    return tot


# the engine's scalar state: one float64 array (Engine._sc) that the compiled steps below read and write, so that a
# layer's bookkeeping and its steady check are one compiled call: model time, the recent mean layer seconds (NaN
# before the first layer), the last layer's seconds, the iterations' seconds weighted and their weights, the
# pairs served by the instances this engine made (point, hedge), the iteration's weight and non-expert seconds per
# layer, the pool's keep-alive, the warm-life prior (NaN: the keep-alive's iterations) and the ended instances
_MODEL_T, _LAYER_S, _LAST_S, _WEIGHTED_T, _ITERATIONS, _USES, _HEDGE_USES, _WEIGHT, _MISC_S, _KEEP_ALIVE, _PRIOR, \
    _ENDED, _HEDGES_ENDED = range(13)


@njit
def _life(sc, cap):
    """(iterations in one keep-alive at the mean iteration time so far (1 before any), the expected warm life of a
    point decision's new instance, that of a hedged one's; see Engine.horizon), each at most `cap`, from the
    engine's scalars sc."""
    it = sc[_ITERATIONS]
    mean_it = sc[_WEIGHTED_T] / it if it > 0 else 0.0
    keep = 1.0 if mean_it <= 0 else min(cap, max(1.0, sc[_KEEP_ALIVE] / mean_it))
    prior = keep if np.isnan(sc[_PRIOR]) else sc[_PRIOR]
    point = (sc[_USES] + prior) / (sc[_ENDED] + 1.0)
    hedge = (sc[_HEDGE_USES] + prior) / (sc[_HEDGES_ENDED] + 1.0)
    return keep, max(1.0, min(cap, point)), max(1.0, min(cap, hedge))


@njit
def _split_account(rt, l2p, p2l, made_row, kind_row, last_use_row, now, sc, t):
    """A layer's split ran (replica_tokens rt, predicted seconds t): its used instances (_mark_used), the warm-life
    pairs, the layer's seconds (plus the non-expert ones) into the mean layer time and model time."""
    uses, hedges = _mark_used(rt, l2p, p2l, made_row, kind_row, last_use_row, now)
    w = sc[_WEIGHT]
    if uses:
        sc[_USES] += w * uses
    if hedges:
        sc[_HEDGE_USES] += w * hedges
    last = t + sc[_MISC_S]
    sc[_LAST_S] = last
    ls = sc[_LAYER_S]
    sc[_LAYER_S] = last if np.isnan(ls) else 0.9 * ls + 0.1 * last
    sc[_MODEL_T] += last
    sc[_WEIGHTED_T] += last * w  # (real iterations' seconds: thinned ones weighted)


@njit
def _steady_now(loads, k, l, ref_loads, live, ref_live, ready, last_use, since, ref_flags, link_free, ref_scal, sc,
                cap, layers_ahead, peak, tol, z, scal):
    """A decision's scalars into scal [4] (its look-ahead: `layers_ahead` mean layers; the warm lives; the
    heaviest scenario `peak`), then whether layer l's decision of kind k is steady (_steady; never for k < 0)."""
    point, hedge = _life(sc, cap)[1:]
    ls = sc[_LAYER_S]
    scal[0] = layers_ahead * (0.0 if np.isnan(ls) else ls)
    scal[1] = point
    scal[2] = hedge
    scal[3] = peak
    if k < 0:
        return False
    return _steady(loads, k, l, ref_loads, live, ref_live, ready, last_use, sc[_MODEL_T], since, ref_flags, link_free,
                   scal, ref_scal, tol, z)


# observe's and prepare's compiled steps run for every layer and read some twenty of the engine's arrays; passed one
# by one, numba unboxes each (about 0.1 us apiece: most of a skipped decision's time). So the engine keeps these
# arrays as views into two flat ones, a float64 and an int64 (_pack), and the steps take the two and cut the same
# views (_state). The int64 one begins with the layout: per section, in the order below, its offset and its shape
# (three dimensions, 1 where unused).
_F_SHARE, _F_RECENT, _F_REF_LOADS, _F_READY, _F_LAST_USE, _F_LINK_FREE, _F_REF_SCAL, _F_SC, _F_SCAL, _F_PREPARE, \
    _I_LAST_COUNTS, _I_ITER_COUNTS, _I_N_RECENT, _I_HAS_SHARE, _I_PLAN_REPS, _I_ITER_REPS, _I_REF_LIVE, \
    _I_REF_FLAGS = range(18)
_N_FLOAT = _I_LAST_COUNTS  # (the float64 sections come first)
_SECTIONS = ("_share", "_recent", "_ref_loads", "_ready", "_last_use", "_link_free", "_ref_scal", "_sc", "_scal",
             "_prepare_loads", "_last_counts", "_iter_counts", "_n_recent", "_has_share", "_plan_reps",
             "_iteration_replicas", "_ref_live", "_ref_flags")  # (the Engine attributes of the sections, in order)


def _pack(arrays: list) -> tuple[np.ndarray, np.ndarray, list]:
    """The flat float64 and int64 arrays holding `arrays` (one per section, in section order: see _F_SHARE), the
    int64 one headed by the layout; returns them and the views of each section (holding its array's values)."""
    head = 4 * len(arrays)
    fs = np.empty(sum(a.size for a in arrays[:_N_FLOAT]))
    is_ = np.empty(head + sum(a.size for a in arrays[_N_FLOAT:]), dtype=np.int64)
    views, at = [], [0, head]
    for i, a in enumerate(arrays):
        flat, o = (fs, 0) if i < _N_FLOAT else (is_, 1)
        is_[4 * i:4 * i + 4] = (at[o], *a.shape, *(1,) * (3 - a.ndim))
        view = flat[at[o]:at[o] + a.size].reshape(a.shape)
        view[...] = a
        views.append(view)
        at[o] += a.size
    return fs, is_, views


@njit
def _section(flat, is_, i):
    """Section i of flat (see _pack), 1-D; _section2 / _section3: in its shape."""
    o = is_[4 * i]
    return flat[o:o + is_[4 * i + 1] * is_[4 * i + 2] * is_[4 * i + 3]]


@njit
def _section2(flat, is_, i):
    return _section(flat, is_, i).reshape((is_[4 * i + 1], is_[4 * i + 2]))


@njit
def _section3(flat, is_, i):
    return _section(flat, is_, i).reshape((is_[4 * i + 1], is_[4 * i + 2], is_[4 * i + 3]))


@njit
def _state(fs, is_):
    """The views of the sections of the engine's flat arrays fs and is_ (see _pack), in section order."""
    return (_section2(fs, is_, _F_SHARE), _section3(fs, is_, _F_RECENT), _section3(fs, is_, _F_REF_LOADS),
            _section2(fs, is_, _F_READY), _section2(fs, is_, _F_LAST_USE), _section(fs, is_, _F_LINK_FREE),
            _section3(fs, is_, _F_REF_SCAL), _section(fs, is_, _F_SC), _section(fs, is_, _F_SCAL),
            _section(fs, is_, _F_PREPARE), _section2(is_, is_, _I_LAST_COUNTS), _section2(is_, is_, _I_ITER_COUNTS),
            _section(is_, is_, _I_N_RECENT), _section(is_, is_, _I_HAS_SHARE), _section(is_, is_, _I_PLAN_REPS),
            _section(is_, is_, _I_ITER_REPS), _section3(is_, is_, _I_REF_LIVE), _section3(is_, is_, _I_REF_FLAGS))


@njit
def _observe_step(counts, layer, loads, check, k, target, since, decide, refs, live, fs, is_, cap, distance, tol, z,
                  refresh_every, prepare_every):
    """Engine.observe's bookkeeping in one pass (_observe_counts with the shares' weight from the keep-alive's
    iterations; the layer's replicas this iteration), then, for k >= 0 and some load, whether the decision of
    kind k for `target` is steady (_steady_now; `decide`: observe asks for one). Then, where observe asks the
    policy nothing (not decide, or steady), whether prepare(layer) would find its decision steady at once: its
    kind's plan still the layer's (refs: bit 0 for kind 1, bit 1 for kind 2; see Engine._checks) and
    _prepare_check steady. The engine's state: live (the pool's experts [L, G*S]) and the views of fs and is_
    (_state). Returns (status, the loads' sum, steady, prepare's steady)."""
    state = _state(fs, is_)
    share, recent, ref_loads, ready, last_use, link_free, ref_scal, sc, scal, _, last_counts, iter_counts, \
        n_recent, has_share, plan_reps, iteration_replicas, ref_live, ref_flags = state
    w = 0.5 ** (sc[_WEIGHT] / _life(sc, cap)[0]) if has_share[layer] else 0.0
    status, total = _observe_counts(counts, layer, last_counts, iter_counts, recent, n_recent, share, has_share, w,
                                    loads, check)
    if status:
        return status, total, False, False
    iteration_replicas[layer] = plan_reps[layer]
    steady = False
    if k >= 0 and total > 0:
        steady = _steady_now(loads, k, target, ref_loads, live, ref_live, ready, last_use, since, ref_flags,
                             link_free, ref_scal, sc, cap, distance, 0.0, tol, z, scal)
    if (decide and not steady) or not refs or not has_share[layer]:
        return 0, total, steady, False
    kind = _prepare_kind(n_recent[layer] + layer, layer, distance, refresh_every, prepare_every)  # (counts booked)
    if not kind or not (refs >> (kind - 1)) & 1:
        return 0, total, steady, False
    return 0, total, steady, _prepare_check(layer, kind == 2, kind, since, live, state, cap,
                                            live.shape[0] - distance, tol, z)[1]


@njit
def _prepare_kind(n, layer, distance, refresh_every, prepare_every):
    """The kind of Engine.prepare's decision for `layer` once its n-th counts are booked (n: n_recent + layer, so
    that the layers take turns): 0 when it decides nothing this iteration (only every prepare_every-th; the first
    `distance` layers always), 2 with the robust alternatives (every refresh_every-th), else 1."""
    if layer >= distance and n % prepare_every:
        return 0
    return 2 if n % refresh_every == 0 else 1


_prepare_kind_py = getattr(_prepare_kind, "py_func", _prepare_kind)  # (prepare calls it from Python: no dispatch)


@njit
def _prepare_check(l, refresh, k, since, live, state, cap, layers_ahead, tol, z):
    """Engine.prepare's loads into its buffer (the section _F_PREPARE: _scaled_share of layer l's shares and
    counts), then, for k >= 0 and some load, whether its decision of kind k is steady (_steady_now; with
    `refresh`, the heaviest of the layer's recent scenarios, the first n_recent[l] of recent [L, SCENARIOS, E]).
    state: the views of the engine's flat arrays (_state). Returns (the loads' sum, steady)."""
    share, recent, ref_loads, ready, last_use, link_free, ref_scal, sc, scal, loads, counts, _, n_recent, _, _, _, \
        ref_live, ref_flags = state
    total = _scaled_share(share[l], counts[l], loads)
    if k < 0 or not total > 0:
        return total, False
    peak = 0.0
    if refresh:
        for r in range(min(n_recent[l], recent.shape[1])):
            s = 0.0
            for e in range(recent.shape[2]):
                s += recent[l, r, e]
            peak = max(peak, s)
    return total, _steady_now(loads, k, l, ref_loads, live, ref_live, ready, last_use, since, ref_flags, link_free,
                              ref_scal, sc, cap, layers_ahead, peak, tol, z, scal)


@njit
def _prepare_step(l, refresh, k, since, live, fs, is_, cap, layers_ahead, tol, z):
    """_prepare_check on the engine's flat arrays fs and is_ (see _pack)."""
    return _prepare_check(l, refresh, k, since, live, _state(fs, is_), cap, layers_ahead, tol, z)


def default_slots_per_gpu(num_experts: int, gpus: int, extra: int = 1) -> int:
    """Expert parallelism's share ceil(E / G) plus `extra` slots per GPU for replicas."""
    if isinstance(extra, bool) or not isinstance(extra, (int, np.integer)) or extra < 0:
        raise ValueError(f"extra must be an integer >= 0, got {extra!r}")
    return -(-int(num_experts) // int(gpus)) + int(extra)


@dataclass
class EngineStats:
    """What the control plane did: per (iteration, layer) replicas in use; decisions; cold starts realised."""

    replicas: list = field(default_factory=list)  # [iterations] of int64 [L]
    plans_made: int = 0  # layers whose plan the policy changed
    plans_kept: int = 0  # decisions that kept the current plan
    plans_skipped: int = 0  # decisions not asked: the layer's inputs had not moved beyond their noise (Engine.steady)
    cold_starts: int = 0
    warm_starts: int = 0
    rebuilds: int = 0  # whole-model plans from end_iteration (EPLB)

    @property
    def plan_changes(self) -> int:
        """The serving summary's name for plans_made."""
        return self.plans_made


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
                bias = torch.from_numpy(np.ascontiguousarray(self.predictor.bias))
                bias = bias.to(device=device, dtype=torch.float32)
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
    """Drive `policy` (a moeless.policy.Policy) over its layers (see the module docstring).

    pool: a `moeless.pool.FunctionPool` of the policy's shape (None: `cost_pool` of the policy's cost model with
    `keep_alive_s`, billing `expert_bytes` per instance if given; a policy without one gets `expert_bytes`
    (default 1), the host link's `link_bandwidth` and the peer link's `peer_bandwidth` (bytes/s) inside groups
    of `link_group` GPUs; on a simulated clock: pass `now` (seconds) to start / observe / prepare /
    end_iteration / close).
    copy_s: (host, peer) seconds of one cold start in model time (default: the policy's cost model's, else the
    pool's). misc: seconds of non-expert work per layer for an iteration of t tokens, `misc(t)` (default: the
    policy's cost model's, else 0), which the look-ahead counts. horizon_prior: the expected warm life
    (iterations) counted as one more measured instance, one whose life ended (see `horizon`); None: the
    iterations that fit in the pool's keep-alive at the mean iteration time so far (an instance stays at least
    that long; the measurements correct it where popularity moves faster), capped at MAX_LIFE. prewarm: after a
    layer runs, `prepare` decides its plan for the next iteration (copies then have an iteration to arrive); off:
    only the decision d layers ahead.
    refresh_every: `prepare` lets the policy weigh robust alternatives (LayerContext.refresh) for a layer once
    every this many iterations (staggered over the layers), the costlier decision; in between it decides
    incrementally. prepare_every: `prepare` decides a layer only once every this many iterations (staggered
    alike; the first d layers, which no decision d layers ahead covers, every iteration): its loads are
    averaged over a keep-alive and move slowly, so where the control plane's CPU time is tight most of its
    decisions can be skipped (bench/bench_policy.py measures what that saves, `bench/regimes.py --prepare-every`
    what it costs); the decision d layers ahead, fed the batch's own prediction, always runs every iteration.
    steady (default on; always off for a policy with free moves, the lossless bound): a decision is not asked of the
    policy again while its inputs have not moved since the layer's last decision of the same kind (d layers ahead,
    for the next iteration, or that with the robust alternatives) and that decision's plan is still the layer's: the
    same live instances, each loaded and pinned as then, no copy in flight, the look-ahead and the robust step's
    heaviest scenario within STEADY_TOL (10%) of then, the warm lives inside the range for which the policy said its
    decision holds (Policy.life_range: MoelessPolicy's is exact; a policy that does not say, within STEADY_TOL), and
    the loads within their sampling noise of then (`_steady`: a chi-square of the two count vectors within STEADY_Z
    = 3 standard deviations of its mean under one popularity). The plan then stays, as the policy would have kept it
    on the same inputs; a shift of popularity, a batch of another size, a release, an eviction or a copy's arrival
    asks again. Stable popularity then costs a check per decision instead of a time-aware split and search
    (bench/bench_policy.py measures it; `bench/regimes.py --no-steady` what it changes). observe's compiled pass
    also checks the layer's next prepare decision on the state it leaves, so a prepare(layer, now) that follows
    with nothing in between (no other call of this engine, the pool unchanged) and finds it steady only skips it.
    """

    # recent true loads per layer kept as the scenarios of the decision well ahead (`prepare`)
    SCENARIOS = 4
    # the longest warm life (iterations) an instance is expected to have: the cap of horizon() and of the
    # keep-alive's iterations
    MAX_LIFE = 1000.0
    # steady: the relative change of the look-ahead (and of the warm lives where the policy gives no range), and
    # the z-score of the loads' change, within which a layer's decision is not asked again
    STEADY_TOL = 0.1
    STEADY_Z = 3.0

    def __init__(self, policy: Policy, *, distance: int = 1, pool: FunctionPool | None = None,
                 expert_bytes: float | None = None, keep_alive_s: float = 60.0, link_bandwidth: float = 25e9,
                 peer_bandwidth: float | None = None, link_group: int = 1, copy_s=None, misc=None,
                 horizon_prior: float | None = None, prewarm: bool = True, refresh_every: int = 4,
                 prepare_every: int = 1, steady: bool = True):
        if not isinstance(policy, Policy):
            raise ValueError(f"policy must be a moeless.policy.Policy (see moeless.policy.make_policy), got "
                             f"{type(policy).__name__}")
        _positive_int("distance", distance)
        self.policy = policy
        self.L, self.E, self.G, self.S = policy.L, policy.E, policy.G, policy.S
        self._shape = (self.E,)  # (of every counts array)
        if distance >= self.L and self.L > 1:
            raise ValueError(f"distance={distance} must be smaller than the {self.L} layers")
        self.distance = int(distance)
        if pool is None and getattr(policy, "cost", None) is not None:
            pool = cost_pool(policy.cost, self.L, self.G, self.S, keep_alive_s=float(keep_alive_s),
                             expert_bytes=expert_bytes)
        elif pool is None:
            nbytes = 1.0 if expert_bytes is None else float(expert_bytes)
            pool = FunctionPool(self.L, self.G, self.S, expert_bytes=nbytes,
                                link_bandwidth=float(link_bandwidth), keep_alive_s=float(keep_alive_s),
                                peer_bandwidth=peer_bandwidth, link_group=int(link_group), clock=SimulatedClock())
        elif (pool.num_layers, pool.gpus, pool.slots_per_gpu) != (self.L, self.G, self.S):
            raise ValueError(f"pool has (layers, gpus, slots) = ({pool.num_layers}, {pool.gpus}, "
                             f"{pool.slots_per_gpu}), the policy ({self.L}, {self.G}, {self.S})")
        self.pool = pool
        cost = getattr(policy, "cost", None)
        if copy_s is None:
            copy_s = ((cost.cold_start_s(False), cost.cold_start_s(True)) if cost is not None
                      else (pool.cold_start_s, pool.peer_cold_start_s))
        self.copy_host, self.copy_peer = (float(c) for c in copy_s)
        if getattr(policy, "free_moves", False):
            self.copy_host = self.copy_peer = 0.0
        if misc is None:  # (the cost model's, cached per token count: numpy's per-call overhead, once per iteration)
            misc = functools.lru_cache(4096)(lambda t: float(cost.misc_time(t, self.G))) if cost is not None \
                else (lambda t: 0.0)
        self._misc = misc
        if horizon_prior is not None and not (math.isfinite(horizon_prior) and horizon_prior >= 1):
            raise ValueError(f"horizon_prior must be None or a finite number >= 1, got {horizon_prior!r}")
        self.horizon_prior = None if horizon_prior is None else float(horizon_prior)
        self.prewarm = bool(prewarm)
        self.refresh_every = _positive_int("refresh_every", refresh_every)
        self.prepare_every = _positive_int("prepare_every", prepare_every)
        # (see steady in the class docstring) per kind of decision (0: d layers ahead, 1: for the next iteration,
        # 2: that with the robust alternatives) and layer: the last asked decision's loads, live instances, their
        # loaded / pinned flags, its look-ahead, warm lives and heaviest scenario, and the plan it left
        self.steady = bool(steady) and not getattr(policy, "free_moves", False)
        P = self.G * self.S
        self._ref_loads = np.zeros((3, self.L, self.E))
        self._ref_live = np.full((3, self.L, P), -2, dtype=np.int64)
        self._ref_flags = np.zeros((3, self.L, P), dtype=np.int64)
        self._ref_scal = np.zeros((3, self.L, 8))  # (see _steady)
        self._scal = np.zeros(4)  # (this decision's look-ahead, warm lives and heaviest scenario)
        self._prepare_loads = np.empty(self.E)  # (prepare's loads, written by its compiled step)
        self._ref_plan: list = [[None] * self.L for _ in range(3)]
        # the scalars the compiled steps share (see _MODEL_T and below): model time, the mean layer seconds, ...
        self._sc = np.zeros(_HEDGES_ENDED + 1)
        self._sc[_LAYER_S] = np.nan
        self._sc[_WEIGHT] = 1.0
        self._sc[_KEEP_ALIVE] = pool.keep_alive_s
        self._sc[_PRIOR] = np.nan if self.horizon_prior is None else self.horizon_prior
        initial = policy.initial_plan()
        self._plans = [initial[l] for l in range(self.L)]
        self._last_counts = np.zeros((self.L, self.E), dtype=np.int64)  # true counts, latest iteration
        self._share = np.zeros((self.L, self.E))  # per layer, load shares averaged over one keep-alive
        self._has_share = np.zeros(self.L, dtype=np.int64)
        self._recent = np.zeros((self.L, self.SCENARIOS, self.E))  # per layer, its last true counts (a ring)
        self._n_recent = np.zeros(self.L, dtype=np.int64)
        self._iter_counts = np.zeros((self.L, self.E), dtype=np.int64)
        self._iteration_replicas = np.zeros(self.L, dtype=np.int64)
        self._plan_reps = np.array([int(p.logcnt.sum()) for p in self._plans], dtype=np.int64)  # replicas per plan
        # model time (model_t, in _sc): the cost model's seconds of the layers served so far; each GPU's copy link is
        # free at link_free (model time); the recent mean layer seconds (moe + misc, in _sc) give the look-ahead
        self._link_free = np.zeros(self.G)
        self._tokens = 0.0
        self._prefill = False
        # warm life of the instances this engine cold-started: slots' expert if made here (-1 otherwise), and
        # their kind (1: made by a hedged decision, see Policy.hedged; 0: a point decision); per kind: how many
        # were made, the iterations in which they served pairs, how many of them ended
        self._made = np.full((self.L, self.G * self.S), -1, dtype=np.int64)
        self._made_kind = np.zeros((self.L, self.G * self.S), dtype=np.int8)
        self._last_use = np.full((self.L, self.G * self.S), -np.inf)  # when each slot's instance last served
        self._ready = np.zeros((self.L, self.G * self.S))  # model time at which each slot's copy is in
        self._n_made = [0, 0]
        self._ended_key = (0, 0, 0, 0)  # (see _ended) the ended counts in _sc are recounted when it changes
        self.stats = EngineStats()
        self.applied: list[tuple[float, int, np.ndarray]] = []  # (now, layer, phy2log [G*S]) in pool order
        # the arrays above that observe's and prepare's compiled steps read become views into two flat ones (see
        # _pack; updated in place, never rebound), which the steps take after their per-call arguments with the
        # pool's experts and the constants
        self._fs, self._is, views = _pack([getattr(self, name) for name in _SECTIONS])
        for name, view in zip(_SECTIONS, views):
            setattr(self, name, view)
        state = (self.pool.expert, self._fs, self._is, self.MAX_LIFE)
        self._observe_state = (*state, self.distance, self.STEADY_TOL, self.STEADY_Z, self.refresh_every,
                               self.prepare_every)
        self._prepare_state = (*state, self.L - self.distance, self.STEADY_TOL, self.STEADY_Z)
        # (layer, now, the pool's quiet_token) of the decision prepare(layer, now) is to skip: observe's pass found it
        # steady (see _checks); any other call in between drops it
        self._early = None
        self._started = False
        self._now = 0.0

    @property
    def model_t(self) -> float:
        """Model time: the cost model's predicted seconds of the layers served so far."""
        return float(self._sc[_MODEL_T])

    @property
    def last_layer_s(self) -> float:
        """The last layer's predicted seconds (its experts' split plus the non-expert work)."""
        return float(self._sc[_LAST_S])

    # -- lifecycle -----------------------------------------------------------------------------------------
    def start(self, now: float | None = None) -> ApplyResult:
        """Realise the policy's initial plan in the pool: every slot of every layer cold-starts (before the first
        batch, as a serverful deployment loads its weights)."""
        self._early = None  # (see observe)
        if self._started:
            raise ValueError("engine already started")
        self._started = True
        full = Plan.from_phy2log(np.stack([p.phy2log[0] for p in self._plans]), self.E, self.G, self.S)
        t = self.pool.advance_to(now)
        self._now = t
        res = self.pool.apply(full, t)
        for l in range(self.L):
            self.applied.append((t, l, full.phy2log[l].copy()))
        self.stats.cold_starts += len(res.cold)
        return res

    def close(self, now: float | None = None) -> Meter:
        """Charge the pool up to `now`, release everything, return the meter."""
        self._early = None  # (see observe)
        return self.pool.close(now)

    def begin_iteration(self, tokens: float, prefill: bool = False, weight: float = 1.0) -> None:
        """The coming iteration's tokens, phase and weight (how many real iterations it stands for)."""
        self._early = None  # (see observe)
        if not (math.isfinite(tokens) and tokens >= 0):
            raise ValueError(f"tokens must be a finite number >= 0, got {tokens!r}")
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"weight must be a finite number > 0, got {weight!r}")
        self._tokens = float(tokens)
        self._prefill = bool(prefill)
        self._sc[_WEIGHT] = weight
        self._sc[_MISC_S] = self._misc(self._tokens)

    def wants_plan(self, batch_tokens: int, top_k: int = 1) -> bool:
        """Whether the policy decides per layer at all for a batch of `batch_tokens` tokens (a serverful policy
        never does; an empty batch has nothing to decide): the data plane skips the prediction otherwise."""
        return bool(self.policy.serverless) and batch_tokens > 0

    # -- per layer -----------------------------------------------------------------------------------------
    def plan(self, layer: int) -> Plan:
        """The one-layer Plan layer `layer` runs with now."""
        return self._plans[self._layer(layer)]

    def split(self, layer: int, counts) -> np.ndarray:
        """replica_tokens int64 [E, R] of `layer` for its true global counts [E] (pairs per expert), by the
        policy's split; advances the model clock by the layer's predicted seconds."""
        self._early = None  # (see observe)
        layer = self._layer(layer)
        counts = self._counts(counts, "counts")
        plan = self._plans[layer]
        rt, t = self.policy.split(layer, plan, counts)
        # the instances that serve pairs now were used now (warm life: how many of them this engine made); model
        # time and the mean layer time move on
        _split_account(rt, plan.log2phy[0], plan.phy2log[0], self._made[layer], self._made_kind[layer],
                       self._last_use[layer], self._now, self._sc, float(t))
        return rt

    def observe(self, layer: int, counts, predicted=None, now: float | None = None, *, replan: bool = True):
        """Layer `layer`'s true global counts [E] arrived, with the predicted counts [E] of layer + d (or None).

        The policy decides layer + d of this iteration (with `prewarm` off, also the next iteration's layers
        when l + d wraps past the last layer, from this iteration's true counts); a new plan is realised in the
        pool at `now`. Returns (target layer, ApplyResult), or None when the layer keeps its plan."""
        layer = self._layer(layer)
        # (int64 counts and int64 / float64 predictions of the right shape are checked in the compiled update
        # below, before it writes anything; other arrays here)
        if not (type(counts) is np.ndarray and counts.dtype == _I64 and counts.shape == self._shape):
            counts = self._counts(counts, "counts")
        target = layer + self.distance
        check = False
        if target >= self.L:
            target -= self.L
            loads = self._last_counts[target] if target < layer else counts  # true counts of this iteration
        elif predicted is not None:
            if type(predicted) is np.ndarray and predicted.dtype in _SCANNED and predicted.shape == self._shape:
                loads, check = predicted, True
            else:
                loads = self._counts(predicted, "predicted", integral=False)
        else:
            loads = self._last_counts[target]  # the previous iteration's true counts of the target layer
        decide = replan and not (self.prewarm and layer + self.distance >= self.L)
        # the layer's counts, and its load shares averaged over one keep-alive; then whether the decision is steady
        # (checked here, in the same compiled pass, where the pool's clock moves to `now` without a release), and
        # whether prepare(layer, now)'s will be
        k, refs, since = self._checks(decide, target, layer, now)
        status, total, skip, early = _observe_step(counts, layer, loads, check, k, target, since, decide, refs,
                                                   *self._observe_state)
        self._early = (layer, now, self.pool.quiet_token) if early else None
        if status:
            _raise_count_status(status % 3, "counts" if status < 3 else "predicted")
        if layer == self.L - 1:
            self.stats.replicas.append(self._iteration_replicas.copy())
        if not decide:
            return None
        if skip:
            return self._skip(now)
        if check:
            loads = loads.astype(np.float64)  # (a copy: the policy's context must not alias the caller's array)
        return self._decide(target, loads, now, self.distance, total=total, kind=0, checked=k >= 0)

    def prepare(self, layer: int, now: float | None = None):
        """After layer `layer` ran (its instances are free again): decide its plan for the next iteration, so
        that the copies have an iteration to arrive instead of d layers (the decision d layers ahead then
        refines it with the prediction, the new instances already live). The loads it plans for are the layer's
        shares averaged over time times this iteration's pairs (an exponential average whose half-life is the
        iterations of one keep-alive: the time an instance is committed for). It may re-plan the replicas from
        the homes alone (LayerContext.refresh, every `refresh_every` iterations) and decides only every
        `prepare_every` iterations (see the class docstring). Returns (layer, ApplyResult) or None; nothing with
        `prewarm` off."""
        early, self._early = self._early, None
        if early is not None and type(layer) is int and early[:2] == (layer, now) and early[2] is self.pool.quiet_token:
            return self._skip(now)  # (observe's pass found this decision steady, and nothing moved since)
        layer = self._layer(layer)
        if not self.prewarm or not self._has_share[layer]:
            return None
        kind = _prepare_kind_py(int(self._n_recent[layer]) + layer, layer, self.distance, self.refresh_every,
                                self.prepare_every)
        if not kind:
            return None  # (see prepare_every)
        refresh = kind == 2
        _, refs, since = self._checks(False, layer, layer, now)
        k = kind if (refs >> (kind - 1)) & 1 else -1
        loads = self._prepare_loads
        total, skip = _prepare_step(layer, refresh, k, since, *self._prepare_state)
        if skip:
            return self._skip(now)
        # (a copy: the policy's context keeps no engine buffer)
        return self._decide(layer, loads.copy(), now, self.L - self.distance, refresh=refresh, total=total,
                            kind=kind, checked=k >= 0)

    def decide(self, layer: int, loads, now: float | None = None, layers_ahead: int = 0):
        """Ask the policy for layer `layer`'s plan for `loads` [E] now (outside the protocol: the lossless bound
        decides the first d layers of an iteration from their true loads with it). Returns (layer, ApplyResult)
        or None."""
        self._early = None  # (see observe)
        return self._decide(self._layer(layer), self._counts(loads, "loads", integral=False), now, int(layers_ahead))

    def _checks(self, decide: bool, target: int, layer: int, now) -> tuple[int, int, float]:
        """The steady checks observe's and prepare's compiled passes can make: the kind of observe's decision for
        `target` (0; -1: none, or not `decide`), which of prepare's decisions for `layer` (bit 0: kind 1, bit 1:
        kind 2; 0: none; with prewarm), and the keep-alive's start. A decision can be checked there when its plan
        is still the layer's (see steady) and advancing the pool to `now` releases nothing (FunctionPool.quiet), so
        the check sees what _decide would after the advance; else _decide checks."""
        if not (self.steady and self.pool.quiet(now)):
            return -1, 0, 0.0
        k = 0 if decide and self._has_reference(0, target) else -1
        plan = self._plans[layer]
        refs = (self._ref_plan[1][layer] is plan) + 2 * (self._ref_plan[2][layer] is plan) if self.prewarm else 0
        if k < 0 and not refs:
            return -1, 0, 0.0
        self._ended()
        return k, refs, now - self.pool.keep_alive_s

    def _has_reference(self, kind: int, target: int) -> bool:
        """Whether a steady check can skip the decision of `kind` (>= 0) for `target`: the plan its last asked
        decision left is still the layer's (see steady)."""
        return self.steady and kind >= 0 and self._ref_plan[kind][target] is self._plans[target]

    def _skip(self, now) -> None:
        """A steady decision is not asked (see steady): the pool's clock still moves to `now`."""
        self._now = self.pool.advance_to(now)
        self.stats.plans_skipped += 1
        return None

    def _decide(self, target: int, loads: np.ndarray, now, layers_ahead: int, refresh: bool = False,
                total: float | None = None, kind: int = -1, checked: bool = False):
        """The policy's decision for `target` given its predicted loads (`total`: their sum, if known);
        `layers_ahead` layers hide its copies. `checked`: the caller found the decision of `kind` not steady."""
        if not self.policy.serverless or not (_total(loads) if total is None else total) > 0:
            return None
        scenarios = None
        peak = 0.0
        if refresh:
            k = min(int(self._n_recent[target]), self.SCENARIOS)
            scenarios = self._recent[target, :k]
            peak = float(scenarios.sum(1).max()) if k else 0.0
        t = self.pool.advance_to(now)
        self._now = t
        since = t - self.pool.keep_alive_s
        steady = self.steady and kind >= 0
        if not checked:  # (else the caller's compiled step filled _scal with the same scalars)
            # the look-ahead and warm lives into _scal; a steady decision is not asked again
            self._ended()
            check = kind if self._has_reference(kind, target) else -1
            if _steady_now(loads, check, target, self._ref_loads, self.pool.expert, self._ref_live, self._ready,
                           self._last_use, since, self._ref_flags, self._link_free, self._ref_scal, self._sc,
                           self.MAX_LIFE, layers_ahead, peak, self.STEADY_TOL, self.STEADY_Z, self._scal):
                self.stats.plans_skipped += 1
                return None
        scal = self._scal
        live, ready, last_use = self.pool.expert[target], self._ready[target], self._last_use[target]
        new = self.policy.decide_live(
            target, loads, self._plans[target], live, ready, self.model_t, self._link_free, last_use, since,
            lookahead=float(scal[0]), horizon=float(scal[1]), link_group=self.pool.link_group, tokens=self._tokens,
            refresh=refresh, scenarios=scenarios, hedge_horizon=float(scal[2]))
        if new is None:
            self.stats.plans_kept += 1
            if steady:
                self._remember(kind, target, loads, since)
            return None
        # warm identity (layer, GPU, expert): the policy's slot order inside a GPU is arbitrary, so take the
        # order that keeps every instance the pool holds in its slot (balance unchanged)
        new = self.pool.align(new, layer=target)
        self.stats.plans_made += 1
        self._plans[target] = new
        self._plan_reps[target] = int(new.logcnt.sum())
        res = self.pool.apply(new, t, layer=target)
        self.applied.append((t, target, new.phy2log[0].copy()))
        self._account_copies(res, int(bool(self.policy.hedged)))
        if steady:
            self._remember(kind, target, loads, since)
        return target, res

    def _remember(self, kind: int, target: int, loads: np.ndarray, since: float) -> None:
        """Remember the inputs of layer `target`'s decision of `kind` (its scalars in _scal) and the plan it left
        (see steady)."""
        life_range = self.policy.life_range
        _steady_record(loads, kind, target, self._ref_loads, self.pool.expert, self._ref_live, self._ready,
                       self._last_use, self.model_t, since, self._ref_flags, self._scal, self._ref_scal,
                       _UNKNOWN_RANGE if life_range is None else life_range)
        self._ref_plan[kind][target] = self._plans[target]

    def end_iteration(self, now: float | None = None, weight: float = 1.0) -> ApplyResult | None:
        """After the last layer: count the warm life of this engine's instances, and realise the policy's
        whole-model plan if it has one (EPLB's rebuild at its cadence)."""
        self._early = None  # (see observe)
        self._sc[_ITERATIONS] += weight
        new = self.policy.end_iteration(self._iter_counts.copy(), float(self._now if now is None else now), weight)
        if new is None:
            return None
        t = self.pool.advance_to(now)
        self._now = t
        self._plans = [new[l] for l in range(self.L)]
        self._plan_reps[:] = new.logcnt.sum(1)
        res = self.pool.apply(new, t)
        for l in range(self.L):
            self.applied.append((t, l, new.phy2log[l].copy()))
        self.stats.rebuilds += 1
        self.stats.cold_starts += len(res.cold)
        return res

    def _keep_iterations(self) -> float:
        """Iterations in one keep-alive at the mean iteration time so far (1 before any), at most MAX_LIFE: the warm
        life's prior unless horizon_prior is given, and the half-life of prepare's load shares."""
        return float(_life(self._sc, self.MAX_LIFE)[0])

    def horizon(self, hedges: bool = False) -> float:
        """Expected warm life, in iterations, of an instance cold-started now by a point decision (by a hedged
        one if `hedges`, see Policy.hedged): the iterations in which the instances of that kind this engine
        cold-started served pairs, over how many of them have ended (released or evicted), with `horizon_prior`
        counted as one more instance that served that many and ended; at most MAX_LIFE.

        The lives of the instances still live are not over: dividing by every instance made (ended or not) would
        count each of them as if it ended now, and the longer they live, the more that understates the mean life
        (a layout that serves for the whole window would be priced as if it lived a few iterations). Dividing the
        iterations served so far by the lives that ended is the maximum-likelihood mean of exponentially
        distributed lives observed until now (right-censored data); before the first life ends it only grows,
        hence the cap.

        The two kinds are measured apart because they live differently long: a point decision's replica serves
        while its expert stays hot at that moment, a hedge serves across the load scenarios it was chosen for;
        one estimate over both would over-credit the marginal point replica wherever hedges live long."""
        self._ended()
        return float(_life(self._sc, self.MAX_LIFE)[2 if hedges else 1])

    def _ended(self) -> None:
        """How many of the instances this engine cold-started are no longer live, per kind (point, hedge), into
        the scalars (_ENDED, _HEDGES_ENDED) that the warm lives read: recounted (one compiled pass over the slots)
        only when the pool released or evicted an instance or this engine made one since."""
        m = self.pool.meter
        key = (m.releases, m.evictions, self._n_made[0], self._n_made[1])
        if key != self._ended_key:
            self._ended_key = key
            live = _count_live_made(self._made, self._made_kind, self.pool.expert)
            self._sc[_ENDED] = self._n_made[0] - live[0]
            self._sc[_HEDGES_ENDED] = self._n_made[1] - live[1]

    def _account_copies(self, res: ApplyResult, kind: int = 0) -> None:
        """The cold starts of a decision (`kind` 1: a hedged one): model-time link queues, warm-life tracking,
        statistics."""
        self.stats.cold_starts += len(res.cold)
        self.stats.warm_starts += len(res.warm)
        if not len(res.cold):
            return
        layer, slot = res.cold[:, 0], res.cold[:, 1]
        self._made[layer, slot] = self.pool.expert[layer, slot]
        self._made_kind[layer, slot] = kind
        self._last_use[layer, slot] = self._now  # a new instance is kept for a keep-alive, used or not
        self._n_made[kind] += len(res.cold)
        secs = np.where(res.from_peer, self.copy_peer, self.copy_host) if len(res.from_peer) == len(res.cold) \
            else np.full(len(res.cold), self.copy_host)
        add = np.bincount(slot // self.S, weights=secs, minlength=self.G)
        self._link_free[:] = np.where(add > 0, np.maximum(self._link_free, self.model_t) + add, self._link_free)
        self._ready[layer, slot] = self._link_free[slot // self.S]  # in when its GPU's queue is (at the latest)

    # -- checks --------------------------------------------------------------------------------------------
    def _layer(self, layer) -> int:
        if type(layer) is int and 0 <= layer < self.L:  # (the common case, checked in one step)
            return layer
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < self.L:
            raise ValueError(f"layer must be an integer in [0, {self.L}), got {layer!r}")
        return int(layer)

    def _counts(self, counts, name, integral: bool = True) -> np.ndarray:
        """counts as int64 [E] (float64 if not `integral`), checked (ValueError naming `name`)."""
        c = counts if type(counts) is np.ndarray else np.asarray(counts)
        if c.shape != self._shape:
            raise ValueError(f"{name} must have shape [E={self.E}], got {c.shape}")
        check_count_values(c, name, integral)
        # (loads are copied: they reach the policy's context, which must not alias the caller's array)
        return c.astype(np.int64, copy=False) if integral else c.astype(np.float64)
