"""The control plane's planner: expert scaling (Algorithm 1), placement (Algorithm 2), the serve-time split.

Per MoE layer and iteration, given per-expert loads (predicted token counts, [L, E]) and a memory budget of
G GPUs x S slots, the planner decides how many replicas each expert gets (`logcnt`), which physical slot holds
each replica (`phy2log` / `log2phy`), and -- once the true counts are known -- how many of each expert's
(token, k) pairs each replica serves (`replica_tokens`). Everything is numpy on small arrays, vectorised across
layers; loops run over replicas or GPUs, never over layers.

What it must never do: change routing (a split only decides which replica of the chosen expert serves a pair),
exceed a GPU's slots, import torch at module level or any kernel (the torch split imports torch lazily), or
read the clock (the pool owns time).

Index arrays (DeepSeek EPLB's and vLLM's names):

    loads          float [L, E]      predicted (or true) (token, k) pairs per logical expert
    phy2log        int64 [L, G*S]    logical expert held by physical slot p (-1 = free); slot p is on GPU p // S
    log2phy        int64 [L, E, R]   physical slots of expert e's replicas, ascending slot order (-1 = pad)
    logcnt         int64 [L, E]      replicas per expert (>= 1)
    replica_tokens int64 [L, E, R]   pairs served by replica r of expert e (0 on pads); sums to the counts

Scaling rules (`rule=`):

- ``"literal"``: the paper's Algorithm 1. Add one replica to the expert with the largest per-replica load
  while the coefficient of variation (std / mean over all replicas' loads) exceeds `cv_threshold` and the
  budget (G*S - E extra slots) lasts. On fine-grained MoE this spends the whole budget: with 64 experts and
  a 64-token batch most experts carry 0..3 pairs, and those replicas alone keep the CV above 0.2 whatever is
  replicated (ESFT, 8 GPUs x 9 slots: the literal rule fills all 72 slots in every layer; see
  bench/bench_planner.py).
- ``"ideal"`` (default): what matters is the GPU load, not the replica CV. With C = total / G the ideal GPU
  load, an expert needs R_e = ceil(W_e / ((1 + tolerance) C)) replicas, because no split can put more than
  C on each of R_e distinct GPUs otherwise; that is the fewest replicas that allow balance max/mean <= 1 +
  tolerance. If that exceeds the budget, the budget is spent by EPLB's min-max greedy instead (one replica at
  a time to the expert with the largest per-replica load, which minimises the largest replica load).
  The slots it leaves free are used by the placement's *bridging* step below, only where they help.

Placement (Algorithm 2 with what the paper leaves out):

1. warm reuse: a replica whose expert lived in `previous` keeps that very slot (no copy) unless its GPU's
   kept load would exceed C (1 + tolerance); kept replicas are chosen largest first (what then moves is
   small, which LPT packs well). Pins can still block a needed swap (two hot experts pinned on one full GPU),
   so a fresh placement is also made, its GPUs renumbered (and slots reordered) to overlap `previous` most,
   and a layer keeps the pinned plan only if its planned max GPU load is within (1 + reuse_slack) of the
   fresh one's (ESFT, 8 GPUs: 48% / 80% of instances kept at balance 1.013 / 1.022 for 64 / 512-token
   batches, vs 5% / 8% kept at 1.0003 / 1.006 when planning cold);
2. longest processing time first, join the shortest queue, among GPUs with a free slot that do not hold the
   expert yet (a second replica on the same GPU only when no other GPU has room);
3. bridging (``"ideal"`` only, on by default): while a GPU is above C (1 + tolerance) and a free slot exists on
   a lighter GPU, add a replica there of an expert of the heaviest GPU and move min(excess, deficit) of its
   load onto it. Each bridge settles either the heavy GPU's excess or the light GPU's deficit, so with
   divisible loads G - 1 bridges reach perfect balance (McNaughton's wrap-around rule, done greedily). The
   bridged amounts are only a plan: the serve-time split recomputes them from the true counts.

Serve-time split: given the plan and the true counts of a layer, choose integer replica_tokens that minimise
the maximum GPU load. The optimum is M* = max over GPU sets X of ceil(W(X) / |X|), W(X) = pairs of the experts
whose replicas all lie in X (Hall's condition for the transportation problem; integral by max-flow
integrality), i.e. within one token of the LP optimum. For G <= EXACT_SPLIT_MAX_GPUS it is computed exactly
by a subset-sum (zeta) transform over the 2^G GPU sets and realised one replica at a time, keeping every Hall
constraint satisfied (so the last replica of each expert always fits). For more GPUs a greedy water-filling
(two Gauss-Seidel sweeps) is used, and the even split replaces it in a layer where it would be worse.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

__all__ = [
    "EXACT_SPLIT_MAX_GPUS",
    "Plan",
    "balance",
    "even_split",
    "gpu_loads",
    "place_replicas",
    "plan_layers",
    "replicate_minmax",
    "scale_ideal",
    "scale_literal",
    "serve_time_split",
    "serve_time_split_torch",
]

# 2^G subsets per layer: 1024 for G = 10 keeps the exact split well under the 50 us/layer budget.
EXACT_SPLIT_MAX_GPUS = 10


# ----------------------------------------------------------------------------------------------------------
# Argument checks (the public boundary)
# ----------------------------------------------------------------------------------------------------------
def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_loads(loads, name: str = "loads", *, integral: bool = False) -> np.ndarray:
    """float64 [L, E] copy of `loads`; ValueError naming `name` if it is not finite, non-negative, 2-D."""
    if hasattr(loads, "detach"):  # a torch tensor, possibly on a GPU
        loads = loads.detach().cpu().numpy()
    try:
        a = np.array(loads, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a numeric array of shape [L, E]") from exc
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"{name} must have shape [L, E] with L, E >= 1, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} must be finite (no NaN or inf)")
    if (a < 0).any():
        raise ValueError(f"{name} must be non-negative")
    if integral and (a != np.round(a)).any():
        raise ValueError(f"{name} must hold integer token counts")
    return a


def _check_budget(num_experts: int, gpus: int, slots_per_gpu: int) -> None:
    if num_experts > gpus * slots_per_gpu:
        raise ValueError(
            f"slots_per_gpu={slots_per_gpu} x gpus={gpus} = {gpus * slots_per_gpu} slots cannot hold "
            f"{num_experts} experts once each"
        )


# ----------------------------------------------------------------------------------------------------------
# Plan
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Plan:
    """Replica placement of L MoE layers on `gpus` GPUs with `slots_per_gpu` expert slots each.

    phy2log int64 [L, G*S] (-1 = free slot; slot p on GPU p // S), log2phy int64 [L, E, R_max] (-1 pad,
    ascending slot order), logcnt int64 [L, E]. Build one with `Plan.from_phy2log` (which derives the other
    two); `plan[l]` / `plan.layer(l)` is the one-layer plan of layer l, `plan[a:b]` a slice of layers.
    """

    phy2log: np.ndarray
    log2phy: np.ndarray
    logcnt: np.ndarray
    gpus: int
    slots_per_gpu: int

    # -- construction --------------------------------------------------------------------------------------
    @classmethod
    def from_phy2log(cls, phy2log, num_experts: int, gpus: int, slots_per_gpu: int) -> "Plan":
        gpus = _positive_int("gpus", gpus)
        slots_per_gpu = _positive_int("slots_per_gpu", slots_per_gpu)
        num_experts = _positive_int("num_experts", num_experts)
        p2l = np.array(phy2log, dtype=np.int64)
        if p2l.ndim != 2 or p2l.shape[1] != gpus * slots_per_gpu:
            raise ValueError(f"phy2log must have shape [L, {gpus * slots_per_gpu}], got {p2l.shape}")
        if ((p2l < -1) | (p2l >= num_experts)).any():
            raise ValueError(f"phy2log entries must be -1 or expert ids in [0, {num_experts})")
        log2phy, logcnt = _derive_log2phy(p2l, num_experts)
        return cls(p2l, log2phy, logcnt, gpus, slots_per_gpu)

    # -- shape ---------------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.phy2log.shape[0]

    @property
    def num_experts(self) -> int:
        return self.logcnt.shape[1]

    @property
    def num_slots(self) -> int:
        return self.gpus * self.slots_per_gpu

    @property
    def max_replicas(self) -> int:
        return self.log2phy.shape[2]

    @property
    def replica_gpu(self) -> np.ndarray:
        """int64 [L, E, R_max]: GPU of each replica (-1 pad)."""
        return np.where(self.log2phy >= 0, self.log2phy // self.slots_per_gpu, -1)

    def slots_used(self) -> np.ndarray:
        """int64 [L, G]: occupied slots per GPU."""
        return (self.phy2log >= 0).reshape(self.num_layers, self.gpus, self.slots_per_gpu).sum(-1)

    def num_replicas(self) -> np.ndarray:
        """int64 [L]: live replicas (occupied slots) per layer."""
        return self.logcnt.sum(1)

    # -- per-layer access ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.num_layers

    def __getitem__(self, index) -> "Plan":
        sl = slice(index, index + 1) if isinstance(index, (int, np.integer)) else index
        if isinstance(index, (int, np.integer)) and not -self.num_layers <= index < self.num_layers:
            raise IndexError(f"layer {index} out of range for {self.num_layers} layers")
        if isinstance(index, (int, np.integer)) and index < 0:
            sl = slice(self.num_layers + index, self.num_layers + index + 1)
        p2l = self.phy2log[sl]
        return Plan.from_phy2log(p2l, self.num_experts, self.gpus, self.slots_per_gpu)

    def layer(self, index: int) -> "Plan":
        return self[index]

    # -- checks and (de)serialisation ----------------------------------------------------------------------
    def validate(self) -> "Plan":
        """Raise ValueError naming the field if the arrays are inconsistent; return self."""
        L, P = self.phy2log.shape
        E = self.num_experts
        if P != self.num_slots:
            raise ValueError(f"phy2log must have {self.num_slots} slots per layer, got {P}")
        if self.logcnt.shape != (L, E):
            raise ValueError(f"logcnt must have shape [{L}, {E}], got {self.logcnt.shape}")
        if self.log2phy.ndim != 3 or self.log2phy.shape[:2] != (L, E):
            raise ValueError(f"log2phy must have shape [{L}, {E}, R_max], got {self.log2phy.shape}")
        if ((self.phy2log < -1) | (self.phy2log >= E)).any():
            raise ValueError("phy2log entries must be -1 or expert ids")
        if (self.logcnt < 1).any():
            raise ValueError("logcnt: every expert needs at least one replica")
        log2phy, logcnt = _derive_log2phy(self.phy2log, E)
        if not np.array_equal(logcnt, self.logcnt):
            raise ValueError("logcnt does not match phy2log")
        R = max(log2phy.shape[2], self.log2phy.shape[2])
        if not np.array_equal(_pad_last(log2phy, R), _pad_last(self.log2phy, R)):
            raise ValueError("log2phy does not match phy2log (slots of each expert in ascending order)")
        return self

    def to_json(self) -> str:
        return json.dumps(
            {
                "gpus": self.gpus,
                "slots_per_gpu": self.slots_per_gpu,
                "num_experts": self.num_experts,
                "phy2log": self.phy2log.tolist(),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            d = json.loads(text)
            return cls.from_phy2log(d["phy2log"], d["num_experts"], d["gpus"], d["slots_per_gpu"]).validate()
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"text is not a Plan in JSON: {exc}") from exc

    def __eq__(self, other) -> bool:
        if not isinstance(other, Plan):
            return NotImplemented
        return (
            self.gpus == other.gpus
            and self.slots_per_gpu == other.slots_per_gpu
            and self.num_experts == other.num_experts
            and np.array_equal(self.phy2log, other.phy2log)
        )

    __hash__ = None


def _pad_last(a: np.ndarray, width: int) -> np.ndarray:
    if a.shape[-1] == width:
        return a
    pad = np.full(a.shape[:-1] + (width - a.shape[-1],), -1, dtype=a.dtype)
    return np.concatenate([a, pad], axis=-1)


def _derive_log2phy(p2l: np.ndarray, E: int) -> tuple[np.ndarray, np.ndarray]:
    """log2phy [L, E, R_max] (ascending slot order) and logcnt [L, E] from phy2log [L, P]."""
    L, P = p2l.shape
    key = (np.arange(L, dtype=np.int64)[:, None] * (E + 1) + np.where(p2l >= 0, p2l, E)).ravel()
    order = np.argsort(key, kind="stable")  # stable: a layer's slots of one expert stay in slot order
    counts = np.bincount(key, minlength=L * (E + 1))
    starts = np.cumsum(counts) - counts
    rank = np.empty_like(key)
    rank[order] = np.arange(key.size) - starts[key[order]]
    logcnt = counts.reshape(L, E + 1)[:, :E].astype(np.int64)
    R = max(1, int(logcnt.max(initial=0)))
    log2phy = np.full((L, E, R), -1, dtype=np.int64)
    occ = p2l.ravel() >= 0
    layer = np.repeat(np.arange(L), P)[occ]
    slot = np.tile(np.arange(P, dtype=np.int64), L)[occ]
    log2phy[layer, p2l.ravel()[occ], rank[occ]] = slot
    return log2phy, logcnt


# ----------------------------------------------------------------------------------------------------------
# Scaling (Algorithm 1 and the improved rule)
# ----------------------------------------------------------------------------------------------------------
def _replica_cv(W: np.ndarray, R: np.ndarray) -> np.ndarray:
    """[L] coefficient of variation of the per-replica loads (each of expert e's R_e replicas carries W_e/R_e)."""
    n = R.sum(1)
    mean = W.sum(1) / n
    second = (W * W / R).sum(1) / n
    std = np.sqrt(np.maximum(second - mean * mean, 0.0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean > 0, std / mean, 0.0)


def _replica_cap(max_replicas, total_slots: int) -> int:
    if max_replicas is None:
        return total_slots
    return _positive_int("max_replicas", max_replicas)


def scale_literal(loads, total_slots: int, *, cv_threshold: float = 0.2, max_replicas=None) -> np.ndarray:
    """Algorithm 1 as printed: replicate the expert with the largest per-replica load while CV > threshold.

    The memory budget M_cap is `total_slots` replicas (E of them are the experts themselves). Returns logcnt
    int64 [L, E]. Ties go to the lower expert id.
    """
    W = _check_loads(loads)
    L, E = W.shape
    total_slots = _positive_int("total_slots", total_slots)
    if not np.isfinite(cv_threshold) or cv_threshold < 0:
        raise ValueError(f"cv_threshold must be a finite number >= 0, got {cv_threshold!r}")
    if E > total_slots:
        raise ValueError(f"total_slots={total_slots} cannot hold {E} experts once each")
    cap = _replica_cap(max_replicas, total_slots)
    R = np.ones((L, E), dtype=np.int64)
    rows = np.arange(L)
    active = _replica_cv(W, R) > cv_threshold
    for _ in range(total_slots - E):
        if not active.any():
            break
        per = np.where(R < cap, W / R, -np.inf)
        e = per.argmax(1)
        active &= np.isfinite(per[rows, e])
        R[rows[active], e[active]] += 1
        active &= _replica_cv(W, R) > cv_threshold
    return R


def replicate_minmax(loads, num_replicas: int, *, max_replicas=None) -> np.ndarray:
    """EPLB's replicate_experts: give each layer exactly `num_replicas` replicas (capped per expert by
    `max_replicas`), one at a time to the expert with the largest per-replica load, which minimises the
    largest per-replica load. Returns logcnt int64 [L, E]."""
    W = _check_loads(loads)
    L, E = W.shape
    num_replicas = _positive_int("num_replicas", num_replicas)
    if num_replicas < E:
        raise ValueError(f"num_replicas={num_replicas} must be >= the number of experts {E}")
    cap = _replica_cap(max_replicas, num_replicas)
    R = np.ones((L, E), dtype=np.int64)
    rows = np.arange(L)
    for _ in range(num_replicas - E):
        per = np.where(R < cap, W / R, -np.inf)
        e = per.argmax(1)
        ok = np.isfinite(per[rows, e])
        if not ok.any():
            break
        R[rows[ok], e[ok]] += 1
    return R


def scale_ideal(loads, gpus: int, total_slots: int, *, tolerance: float = 0.01, max_replicas=None) -> np.ndarray:
    """The improved rule: R_e = ceil(W_e / ((1 + tolerance) * total / G)), at least 1, at most `max_replicas`;
    layers where that exceeds `total_slots` get `replicate_minmax(loads, total_slots)` instead.
    Returns logcnt int64 [L, E]."""
    W = _check_loads(loads)
    gpus = _positive_int("gpus", gpus)
    total_slots = _positive_int("total_slots", total_slots)
    if not np.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    L, E = W.shape
    if E > total_slots:
        raise ValueError(f"total_slots={total_slots} cannot hold {E} experts once each")
    cap = _replica_cap(max_replicas, total_slots)
    target = W.sum(1, keepdims=True) / gpus * (1.0 + tolerance)
    with np.errstate(invalid="ignore", divide="ignore"):
        # the 1e-9 keeps W_e = 2C exactly at 2 replicas despite rounding in total / G
        need = np.ceil(np.where(target > 0, W / target, 0.0) - 1e-9)
    R = np.clip(need, 1, cap).astype(np.int64)
    over = R.sum(1) > total_slots
    if over.any():
        R[over] = replicate_minmax(W[over], total_slots, max_replicas=cap)
    return R


# ----------------------------------------------------------------------------------------------------------
# Placement (Algorithm 2, capacity, anti-affinity, warm reuse, bridging)
# ----------------------------------------------------------------------------------------------------------
def _slack(reuse_slack) -> float:
    if not (isinstance(reuse_slack, (int, float, np.floating)) and reuse_slack >= 0):
        raise ValueError(f"reuse_slack must be a number >= 0 (inf allowed), got {reuse_slack!r}")
    return float(reuse_slack)


def _check_previous(previous, L: int, E: int, G: int, S: int) -> None:
    if previous is None:
        return
    if not isinstance(previous, Plan):
        raise ValueError(f"previous must be a Plan or None, got {type(previous).__name__}")
    if (previous.num_layers, previous.num_experts, previous.gpus, previous.slots_per_gpu) != (L, E, G, S):
        raise ValueError(
            f"previous has (layers, experts, gpus, slots_per_gpu) = ({previous.num_layers}, "
            f"{previous.num_experts}, {previous.gpus}, {previous.slots_per_gpu}), expected ({L}, {E}, {G}, {S})"
        )


def place_replicas(
    loads,
    logcnt,
    gpus: int,
    slots_per_gpu: int,
    *,
    previous: Plan | None = None,
    tolerance: float = 0.01,
    bridge: bool = True,
    max_replicas=None,
    reuse_slack: float = 0.05,
) -> Plan:
    """Place logcnt[l, e] replicas of each expert (each carrying loads[l, e] / logcnt[l, e]) on G x S slots:
    warm reuse from `previous`, then longest-load-first onto the least-loaded GPU with a free slot that does
    not hold the expert yet, then (if `bridge`) bridging replicas in the remaining free slots. See the module
    docstring. Deterministic."""
    W = _check_loads(loads)
    L, E = W.shape
    G = _positive_int("gpus", gpus)
    S = _positive_int("slots_per_gpu", slots_per_gpu)
    _check_budget(E, G, S)
    R = np.array(logcnt, dtype=np.int64)
    if R.shape != (L, E):
        raise ValueError(f"logcnt must have shape [{L}, {E}], got {R.shape}")
    if (R < 1).any():
        raise ValueError("logcnt must be >= 1 for every expert")
    if (R.sum(1) > G * S).any():
        raise ValueError(f"logcnt asks for more replicas than the {G * S} slots of a layer")
    _check_previous(previous, L, E, G, S)
    cap = _replica_cap(max_replicas, G * S)
    return _place(W, R, G, S, previous, float(tolerance), bool(bridge), cap, _slack(reuse_slack))


def _place_arrays(W, R, G, S, previous, tolerance, bridge, cap):
    L, E = W.shape
    P = G * S
    rows = np.arange(L)
    ideal = W.sum(1) / G  # [L]
    limit = ideal * (1.0 + tolerance) + 1e-9 * np.maximum(ideal, 1.0)

    # ---- replica items: one per (expert, rank), padded to P per layer, sorted by load descending --------
    n_items = R.sum(1)
    flat_l = np.repeat(np.repeat(rows, E), R.ravel())
    flat_e = np.repeat(np.tile(np.arange(E), L), R.ravel())
    first = np.concatenate([[0], np.cumsum(R.ravel())[:-1]])
    flat_r = np.arange(flat_e.size) - np.repeat(first, R.ravel())
    layer_first = np.concatenate([[0], np.cumsum(n_items)[:-1]])
    pos = np.arange(flat_e.size) - layer_first[flat_l]
    it_e = np.full((L, P), -1, dtype=np.int64)
    it_r = np.zeros((L, P), dtype=np.int64)
    it_e[flat_l, pos] = flat_e
    it_r[flat_l, pos] = flat_r
    valid = it_e >= 0
    e_safe = np.where(valid, it_e, 0)
    it_w = np.where(valid, W[rows[:, None], e_safe] / R[rows[:, None], e_safe], 0.0)

    phy2log = np.full((L, P), -1, dtype=np.int64)
    slot_load = np.zeros((L, P))
    has = np.zeros((L, G, E), dtype=bool)  # has[l, g, e]: GPU g already holds a replica of e
    placed = np.zeros((L, P), dtype=bool)

    # ---- 1. warm reuse: keep the previous slot of (e, r), smallest loads first, up to the GPU's limit -----
    if previous is not None:
        prev_slot = np.full((L, P), -1, dtype=np.int64)
        in_prev = valid & (it_r < previous.logcnt[rows[:, None], e_safe])
        r_safe = np.minimum(it_r, previous.max_replicas - 1)
        prev_slot[in_prev] = previous.log2phy[rows[:, None], e_safe, r_safe][in_prev]
        prev_gpu = np.where(prev_slot >= 0, prev_slot // S, G)  # G: not a candidate
        # previous duplicates of an expert on one GPU (unavoidable then) are not kept twice
        cand = np.flatnonzero(prev_gpu.ravel() < G)
        key = (np.repeat(rows, P)[cand] * E + e_safe.ravel()[cand]) * G + prev_gpu.ravel()[cand]
        _, first = np.unique(key, return_index=True)
        dup = np.ones(cand.size, dtype=bool)
        dup[first] = False
        prev_gpu.ravel()[cand[dup]] = G
        # per (layer, GPU), descending load: a prefix whose cumulated load stays within the limit is kept.
        # Largest first: what then moves is small, and small items are what LPT packs well (keeping the
        # smallest first keeps ~1% more instances but leaves the big ones nowhere to go: balance 1.11 vs
        # 1.00 on ESFT, 64-token batches).
        order = np.lexsort((-it_w.ravel(), prev_gpu.ravel(), np.repeat(rows, P)))
        gk = prev_gpu.ravel()[order]
        lk = np.repeat(rows, P)[order]
        wk = it_w.ravel()[order]
        seg = lk * (G + 1) + gk
        csum = np.cumsum(wk)
        seg_start = np.r_[True, seg[1:] != seg[:-1]]
        base = np.maximum.accumulate(np.where(seg_start, csum - wk, -np.inf))
        keep_sorted = (gk < G) & (csum - base <= limit[lk])
        keep = np.zeros(L * P, dtype=bool)
        keep[order] = keep_sorted
        keep = keep.reshape(L, P)
        kl, kp = np.nonzero(keep)
        ks = prev_slot[kl, kp]
        phy2log[kl, ks] = it_e[kl, kp]
        slot_load[kl, ks] = it_w[kl, kp]
        has[kl, ks // S, it_e[kl, kp]] = True
        placed = keep

    # ---- 2. longest processing time first onto the least-loaded GPU with room ---------------------------
    # State is kept in flat views so that every update is a 1-D gather/scatter (a 2-D or 3-D fancy index
    # costs 5-10x more in numpy, and this loop is the planner's hot path).
    free = (phy2log < 0).reshape(L, G, S)
    fo = np.argsort(~free, axis=2, kind="stable").ravel()  # per GPU: free slots first, ascending
    nxt = np.zeros(L * G, dtype=np.int64)  # next free slot of GPU (l, g) is fo[(l*G + g)*S + nxt]
    room2 = free.sum(2)
    room = room2.ravel()
    gl2 = slot_load.reshape(L, G, S).sum(2)
    gl = gl2.ravel()
    p2lf = phy2log.ravel()
    slf = slot_load.ravel()
    hasf = has.ravel()
    rowsG = rows[:, None] * G
    cols = np.arange(G)

    todo = valid & ~placed
    # unplaced items first, by load descending (stable: expert id, then rank, break ties)
    order = np.argsort(np.where(todo, -it_w, np.inf), axis=1, kind="stable")
    qidx = (rows[:, None] * P + order).ravel()
    q_e = it_e.ravel()[qidx]
    q_w = it_w.ravel()[qidx]
    n_todo = todo.sum(1)
    ptr = np.zeros(L, dtype=np.int64)
    # LPT in rounds: the next items go one each to the GPUs in ascending load order, as far as exact LPT
    # would do the same (item j's GPU is still the lightest when j comes: its load <= every earlier GPU of the
    # round plus the item it took). Ties go to the GPU not yet used in the round, so zero-load experts are
    # dealt round-robin. A round is ~25 numpy calls for up to G items instead of ~20 per item.
    while (ptr < n_todo).any():
        key = np.where(room2 > 0, gl2, np.inf)
        # once only zero-load items are left they go to the heaviest GPUs with room: they cost nothing there,
        # and the light GPUs keep their free slots for bridging
        zero = q_w[rows * P + np.minimum(ptr, P - 1)] == 0
        og = np.argsort(np.where(zero[:, None], np.where(room2 > 0, -gl2, np.inf), key), axis=1, kind="stable")
        gid = rowsG + og  # flat (layer, GPU) ids, lightest first
        ls = key.ravel()[gid]
        j = ptr[:, None] + cols
        inq = j < n_todo[:, None]
        qi = rows[:, None] * P + np.minimum(j, P - 1)
        e = q_e[qi]
        w = q_w[qi]
        reach = np.minimum.accumulate(ls + w, axis=1)
        ok = inq & (ls < np.inf) & ~hasf[gid * E + e]
        ok[:, 1:] &= (ls[:, 1:] <= reach[:, :-1]) | zero[:, None]
        m = np.cumprod(ok, axis=1).sum(1)
        stuck = np.flatnonzero(inq[:, 0] & (m == 0))
        if stuck.size:  # the lightest GPU already holds the next item's expert: one item, slow path
            kb = np.where(has[stuck, :, e[stuck, 0]], np.inf, key[stuck])
            g0 = kb.argmin(1)
            dup = kb[np.arange(stuck.size), g0] == np.inf
            g0[dup] = key[stuck][dup].argmin(1)  # every GPU with room holds e: a duplicate is unavoidable
            gid[stuck, 0] = stuck * G + g0
            m[stuck] = 1
        k = np.flatnonzero(cols < m[:, None])
        tg = gid.ravel()[k]
        te = e.ravel()[k]
        tw = w.ravel()[k]
        ts = (k // G) * P + (tg % G) * S + fo[tg * S + nxt[tg]]
        nxt[tg] += 1
        room[tg] -= 1
        p2lf[ts] = te
        slf[ts] = tw
        gl[tg] += tw
        hasf[tg * E + te] = True
        ptr += m

    # ---- 3. bridging: settle heavy GPUs' excess against light GPUs' deficit with extra replicas ----------
    # In rounds: the k-th heaviest GPU above the limit pairs with the k-th lightest GPU below the mean that
    # has a free slot; each pair adds one replica of an expert of the heavy GPU on the light one and moves
    # min(excess, deficit) of its load there, so each bridge settles at least one side of its pair.
    if bridge:
        cntf = R.copy().ravel()
        sidx = np.arange(S)
        tiny = 1e-9 * np.maximum(ideal, 1.0)
        active = (room2 > 0).any(1) & (gl2.max(1) > limit)
        while active.any():
            exc = gl2 - ideal[:, None]
            heavy = active[:, None] & (gl2 > limit[:, None])
            light = (room2 > 0) & (exc < -tiny[:, None])
            oh = np.argsort(np.where(heavy, -exc, np.inf), axis=1, kind="stable")
            ol = np.argsort(np.where(light, exc, np.inf), axis=1, kind="stable")
            npair = np.minimum(heavy.sum(1), light.sum(1))
            # only the pairs that exist: a few per layer, so the per-slot work stays small
            pi, pk = np.nonzero(cols < npair[:, None])
            hid = pi * G + oh[pi, pk]  # flat (layer, GPU) ids of the heavy and light GPU of each pair
            lid = pi * G + ol[pi, pk]
            excf = exc.ravel()
            move = np.minimum(excf[hid], -excf[lid])
            cs = (pi * P + (hid - pi * G) * S)[:, None] + sidx  # [n, S] flat slot ids of the heavy GPU
            ce = p2lf[cs]
            cl = slf[cs]
            ces = np.maximum(ce, 0)
            elig = (ce >= 0) & (cl > 0) & ~hasf[lid[:, None] * E + ces] & (cntf[pi[:, None] * E + ces] < cap)
            # the smallest replica that can carry the whole move, else the largest one
            fit = elig & (cl >= move[:, None])
            pick = np.where(fit.any(1), np.where(fit, cl, np.inf).argmin(1), np.where(elig, cl, -np.inf).argmax(1))
            n_pairs = pi.size
            go = np.flatnonzero(elig[np.arange(n_pairs), pick])
            src = cs[go, pick[go]]
            pl = pi[go]
            e = p2lf[src]
            # one new replica per expert and layer per round keeps max_replicas exact
            _, first = np.unique(pl * E + e, return_index=True)
            if first.size < go.size:
                go, src, pl, e = go[first], src[first], pl[first], e[first]
            lo = lid[go]
            hi = hid[go]
            amount = np.minimum(move[go], slf[src])
            dst = pl * P + (lo % G) * S + fo[lo * S + nxt[lo]]
            nxt[lo] += 1
            room[lo] -= 1
            p2lf[dst] = e
            slf[src] -= amount
            slf[dst] = amount
            gl[hi] -= amount
            gl[lo] += amount
            hasf[lo * E + e] = True
            cntf[pl * E + e] += 1
            progressed = np.zeros(L, dtype=bool)
            progressed[pl] = True
            active &= progressed & (room2 > 0).any(1) & (gl2.max(1) > limit)

    return phy2log, gl2


def _place(W, R, G, S, previous, tolerance, bridge, cap, reuse_slack=0.05) -> Plan:
    """Warm placement (pins from `previous`) where its planned max GPU load is within (1 + reuse_slack) of the cold
    placement's, else the cold placement with its GPUs renumbered to overlap `previous` most. Pins can block
    a needed swap (two hot experts pinned on one full GPU); renumbering GPUs never changes the balance."""
    E = W.shape[1]
    if previous is None:
        return Plan.from_phy2log(_place_arrays(W, R, G, S, None, tolerance, bridge, cap)[0], E, G, S)
    warm, warm_load = _place_arrays(W, R, G, S, previous, tolerance, bridge, cap)
    cold, cold_load = _place_arrays(W, R, G, S, None, tolerance, bridge, cap)
    cold = _relabel_to(cold, previous.phy2log, G, S)
    worse = warm_load.max(1) > cold_load.max(1) * (1.0 + reuse_slack) + 1e-9
    return Plan.from_phy2log(np.where(worse[:, None], cold, warm), E, G, S)


def _relabel_to(p2l: np.ndarray, prev: np.ndarray, G: int, S: int) -> np.ndarray:
    """Renumber the GPUs of p2l [L, G*S] (greedy maximum overlap of expert sets with prev's GPUs), then put
    each instance in the slot where its expert lived on that GPU before, if any; balance is unchanged."""
    L = p2l.shape[0]
    rows = np.arange(L)
    a = p2l.reshape(L, G, S)
    b = prev.reshape(L, G, S)
    # overlap[l, g, h]: experts on new GPU g that lived on old GPU h (sparse: one count per instance and
    # old GPU of its expert, instead of a dense [L, G, G, S, S] comparison)
    prev_plan_gpus = _expert_gpus(prev, G, S)  # [L, E, R] old GPUs of each expert (-1 pad)
    inst = np.nonzero(p2l >= 0)
    old = prev_plan_gpus[inst[0], p2l[inst]]  # [n, R]
    ok = old >= 0
    idx = ((inst[0][:, None] * G + inst[1][:, None] // S) * G + old)[ok]
    overlap = np.bincount(idx, minlength=L * G * G).reshape(L, G, G).astype(np.float64)
    # greedy maximum matching in parallel rounds: each unmatched new GPU proposes to its best unmatched old
    # GPU; each old GPU takes its best proposer (ties: lower id); a few rounds instead of G sequential steps
    perm = np.full((L, G), -1, dtype=np.int64)  # new GPU g -> old GPU perm[g]
    taken = np.zeros((L, G), dtype=bool)
    cols = np.arange(G)
    while True:
        score = np.where((perm < 0)[:, :, None] & ~taken[:, None, :], overlap, -1.0)
        best_h = score.argmax(2)  # [L, G]
        best_v = np.take_along_axis(score, best_h[:, :, None], 2)[:, :, 0]
        live = best_v > 0
        if not live.any():
            break
        # old GPU h accepts the proposer with the largest overlap
        prop = np.where(live[:, :, None] & (best_h[:, :, None] == cols), best_v[:, :, None], -1.0)  # [L, g, h]
        winner = prop.argmax(1)  # [L, h]
        won = np.take_along_axis(prop, winner[:, None, :], 1)[:, 0, :] > 0
        li, hi = np.nonzero(won)
        perm[li, winner[li, hi]] = hi
        taken[li, hi] = True
    # new GPUs without overlap take the remaining old GPUs in order
    rest_new = np.argsort(perm >= 0, axis=1, kind="stable")
    rest_old = np.argsort(taken, axis=1, kind="stable")
    n_left = (perm < 0).sum(1)
    li, k = np.nonzero(cols < n_left[:, None])
    perm[li, rest_new[li, k]] = rest_old[li, k]
    a_on = np.empty_like(a)
    a_on[rows[:, None], perm] = a  # GPU-renumbered
    b_match = (a_on[:, :, :, None] == b[:, :, None, :]) & (a_on[:, :, :, None] >= 0)  # [L, G, S(new), S(old)]
    has = b_match.any(3)
    want = b_match.argmax(3)
    # two replicas of one expert on one GPU would want the same old slot: only the first gets it
    earlier = np.tril(np.ones((S, S), dtype=bool), -1)  # earlier[s, t]: t < s
    clash = ((want[:, :, :, None] == want[:, :, None, :]) & has[:, :, None, :] & earlier).any(3)
    has &= ~clash
    taken = np.zeros((L, G, S), dtype=bool)
    li, gi, si = np.nonzero(has)
    taken[li, gi, want[li, gi, si]] = True
    # the others fill the untaken slots in ascending order: a permutation of each GPU's slots
    free_pos = np.argsort(taken, axis=2, kind="stable")
    rank = np.cumsum(~has, axis=2) - 1
    pos = np.where(has, want, np.take_along_axis(free_pos, np.maximum(rank, 0), 2))
    out = np.empty_like(a_on)
    out[rows[:, None, None], np.arange(G)[None, :, None], pos] = a_on
    return out.reshape(L, G * S)


def _expert_gpus(p2l: np.ndarray, G: int, S: int) -> np.ndarray:
    """[L, E_max + 1, R] GPUs holding each expert in p2l (-1 pad); E_max from the array itself."""
    L, P = p2l.shape
    E = int(p2l.max(initial=-1)) + 1
    log2phy, _ = _derive_log2phy(p2l, max(E, 1))
    out = np.where(log2phy >= 0, log2phy // S, -1)
    return np.concatenate([out, np.full((L, 1, out.shape[2]), -1, dtype=np.int64)], axis=1)


def plan_layers(
    loads,
    gpus: int,
    slots_per_gpu: int,
    *,
    previous: Plan | None = None,
    cv_threshold: float = 0.2,
    max_replicas=None,
    rule: str = "ideal",
    tolerance: float = 0.01,
    bridge: bool | None = None,
    reuse_slack: float = 0.05,
) -> Plan:
    """Scale and place every layer of one iteration: loads float [L, E] -> Plan.

    `rule` is "ideal" (default) or "literal" (Algorithm 1 with `cv_threshold`); the memory budget is
    gpus * slots_per_gpu slots per layer; `max_replicas` caps the replicas of one expert; `previous` is the
    last plan, whose instances are reused where the balance allows; `bridge` (default: on for "ideal", off for
    "literal") spends free slots on bridging replicas while a GPU is above (1 + tolerance) x the mean;
    `reuse_slack`: a layer keeps `previous`'s instances in place (warm) when that plan's max GPU load is within
    (1 + reuse_slack) of a fresh placement's, else it takes the fresh one with GPUs renumbered to match
    `previous` as far as possible (0 = balance first, inf = always warm).
    """
    W = _check_loads(loads)
    G = _positive_int("gpus", gpus)
    S = _positive_int("slots_per_gpu", slots_per_gpu)
    L, E = W.shape
    _check_budget(E, G, S)
    _check_previous(previous, L, E, G, S)
    if not np.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    cap = _replica_cap(max_replicas, G * S)
    if rule == "ideal":
        R = scale_ideal(W, G, G * S, tolerance=tolerance, max_replicas=cap)
    elif rule == "literal":
        R = scale_literal(W, G * S, cv_threshold=cv_threshold, max_replicas=cap)
    else:
        raise ValueError(f"rule must be 'ideal' or 'literal', got {rule!r}")
    if bridge is None:
        bridge = rule == "ideal"
    return _place(W, R, G, S, previous, float(tolerance), bool(bridge), cap, _slack(reuse_slack))


# ----------------------------------------------------------------------------------------------------------
# Splits and balance
# ----------------------------------------------------------------------------------------------------------
def _check_plan_counts(plan, loads, name="loads") -> np.ndarray:
    if not isinstance(plan, Plan):
        raise ValueError(f"plan must be a Plan, got {type(plan).__name__}")
    W = _check_loads(loads, name, integral=True)
    if W.shape != plan.logcnt.shape:
        raise ValueError(f"{name} must have shape {list(plan.logcnt.shape)} (the plan's [L, E]), got {list(W.shape)}")
    return W.astype(np.int64)


def even_split(plan: Plan, loads) -> np.ndarray:
    """The paper's split: expert e's pairs in contiguous chunks over its replicas, sizes differing by at most
    one, larger chunks first. loads int [L, E] -> replica_tokens int64 [L, E, R_max]."""
    W = _check_plan_counts(plan, loads)
    R = plan.logcnt[:, :, None]
    r = np.arange(plan.max_replicas)
    return np.where(r < R, W[:, :, None] // R + (r < W[:, :, None] % R), 0).astype(np.int64)


def gpu_loads(plan: Plan, replica_tokens) -> np.ndarray:
    """[L, G] pairs served per GPU. Integer replica_tokens give int64, float ones float64."""
    if not isinstance(plan, Plan):
        raise ValueError(f"plan must be a Plan, got {type(plan).__name__}")
    rt = np.asarray(replica_tokens.detach().cpu() if hasattr(replica_tokens, "detach") else replica_tokens)
    if rt.shape != plan.log2phy.shape:
        raise ValueError(f"replica_tokens must have shape {list(plan.log2phy.shape)}, got {list(rt.shape)}")
    L, G = plan.num_layers, plan.gpus
    valid = plan.log2phy >= 0
    idx = (np.arange(L)[:, None, None] * G + plan.log2phy // plan.slots_per_gpu)[valid]
    out = np.bincount(idx, weights=rt[valid].astype(np.float64), minlength=L * G).reshape(L, G)
    return out.astype(np.int64) if np.issubdtype(rt.dtype, np.integer) else out


def balance(gpu_loads) -> np.ndarray:
    """[L] max / mean GPU load per layer; 1.0 for a layer without load."""
    a = np.asarray(gpu_loads, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] < 1:
        raise ValueError(f"gpu_loads must have shape [L, G], got {a.shape}")
    mean = a.mean(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean > 0, a.max(1) / np.where(mean > 0, mean, 1.0), 1.0)


# ----------------------------------------------------------------------------------------------------------
# Serve-time split (numpy and torch share one implementation through a small array shim)
# ----------------------------------------------------------------------------------------------------------
class _NumpyOps:
    inf = np.inf

    def __init__(self, like=None):
        pass

    def asarray(self, a):
        return np.asarray(a)

    def arange(self, n):
        return np.arange(n, dtype=np.int64)

    def zeros(self, shape):
        return np.zeros(shape, dtype=np.int64)

    def full(self, shape, value):
        return np.full(shape, value, dtype=np.int64)

    def where(self, c, a, b):
        return np.where(c, a, b)

    def amin(self, a, axis):
        return a.min(axis)

    def amax(self, a, axis):
        return a.max(axis)

    def argsort(self, a, axis):
        return np.argsort(a, axis=axis, kind="stable")

    def gather(self, a, idx, axis):
        return np.take_along_axis(a, idx, axis)

    def cumsum(self, a, axis):
        return np.cumsum(a, axis=axis)

    def bincount(self, idx, weights, n):
        return np.bincount(idx, weights=weights, minlength=n).astype(np.int64)

    def popcount(self, n_bits):
        x = np.arange(1 << n_bits)
        return np.array([bin(v).count("1") for v in x], dtype=np.int64)

    def to_numpy(self, a):
        return a

    def shl1(self, a):
        return np.left_shift(np.int64(1), a)


class _TorchOps:
    def __init__(self, like):
        import torch

        self.t = torch
        self.device = like.device
        self.inf = float("inf")

    def asarray(self, a):
        return self.t.as_tensor(np.asarray(a), device=self.device)

    def arange(self, n):
        return self.t.arange(n, dtype=self.t.int64, device=self.device)

    def zeros(self, shape):
        return self.t.zeros(shape, dtype=self.t.int64, device=self.device)

    def full(self, shape, value):
        return self.t.full(shape, value, dtype=self.t.int64, device=self.device)

    def where(self, c, a, b):
        t = self.t
        if not isinstance(a, t.Tensor):
            a = t.tensor(a, device=self.device)
        if not isinstance(b, t.Tensor):
            b = t.tensor(b, device=self.device)
        if a.dtype != b.dtype:
            dt = t.promote_types(a.dtype, b.dtype)
            a, b = a.to(dt), b.to(dt)
        return t.where(c, a, b)

    def amin(self, a, axis):
        return a.amin(axis)

    def amax(self, a, axis):
        return a.amax(axis)

    def argsort(self, a, axis):
        return self.t.sort(a, dim=axis, stable=True).indices

    def gather(self, a, idx, axis):
        return self.t.gather(a, axis, idx)

    def cumsum(self, a, axis):
        return self.t.cumsum(a, dim=axis)

    def bincount(self, idx, weights, n):
        out = self.t.zeros(n, dtype=self.t.int64, device=self.device)
        return out.index_add_(0, idx, weights.to(self.t.int64))

    def popcount(self, n_bits):
        return self.asarray(_NumpyOps().popcount(n_bits))

    def to_numpy(self, a):
        return a.cpu().numpy()

    def shl1(self, a):
        return self.t.ones_like(a) << a


def serve_time_split(plan: Plan, loads) -> np.ndarray:
    """Integer replica_tokens int64 [L, E, R_max] that minimise the maximum GPU load for the true counts
    `loads` int [L, E] (lossless: each expert's row sums to its count). Exact for plan.gpus <=
    EXACT_SPLIT_MAX_GPUS; a water-filling heuristic, never worse than `even_split`, above that."""
    W = _check_plan_counts(plan, loads)
    return _split(_NumpyOps(), plan, W)


def serve_time_split_torch(plan: Plan, loads):
    """`serve_time_split` on torch tensors (any device), same result: loads int tensor [L, E] ->
    replica_tokens int64 tensor [L, E, R_max] on the same device."""
    import torch

    if not isinstance(loads, torch.Tensor):
        raise ValueError(f"loads must be a torch.Tensor, got {type(loads).__name__}")
    if loads.is_floating_point():
        bad = ~torch.isfinite(loads)
        if bad.any():
            raise ValueError("loads must be finite (no NaN or inf)")
        if (loads != loads.round()).any():
            raise ValueError("loads must hold integer token counts")
    if (loads < 0).any():
        raise ValueError("loads must be non-negative")
    if not isinstance(plan, Plan):
        raise ValueError(f"plan must be a Plan, got {type(plan).__name__}")
    if tuple(loads.shape) != plan.logcnt.shape:
        raise ValueError(f"loads must have shape {list(plan.logcnt.shape)} (the plan's [L, E]), got {list(loads.shape)}")
    return _split(_TorchOps(loads), plan, loads.to(torch.int64))


def _split(xp, plan: Plan, W):
    """Shared body of serve_time_split(_torch). `W` is int64 [L, E] of xp's kind."""
    L, E, Rm = plan.log2phy.shape
    G, S = plan.gpus, plan.slots_per_gpu
    log2phy = xp.asarray(plan.log2phy)
    logcnt = xp.asarray(plan.logcnt)
    r = xp.arange(Rm)
    valid = log2phy >= 0
    rgpu = xp.where(valid, log2phy // S, 0)
    even = xp.where(valid, W[:, :, None] // logcnt[:, :, None] + (r < W[:, :, None] % logcnt[:, :, None]), 0)
    if Rm == 1:
        return xp.to_numpy(even) if isinstance(xp, _NumpyOps) else even
    if G <= EXACT_SPLIT_MAX_GPUS:
        out = _split_exact(xp, W, rgpu, valid, logcnt, G)
    else:
        out = _split_waterfill(xp, W, rgpu, valid, logcnt, G, even)
    return out


def _layer_gpu_loads(xp, rt, rgpu, valid, G):
    L = rt.shape[0]
    idx = (xp.arange(L)[:, None, None] * G + rgpu)
    idx = xp.where(valid, idx, L * G)  # pads to a sink bucket
    return xp.bincount(idx.reshape(-1), rt.reshape(-1), L * G + 1)[: L * G].reshape(L, G)


def _split_exact(xp, W, rgpu, valid, logcnt, G):
    """Optimal integer split by Hall's condition over all 2^G GPU sets (see the module docstring)."""
    L, E, Rm = rgpu.shape
    nX = 1 << G
    X = xp.arange(nX)
    bit = xp.where(valid, xp.shl1(rgpu), 0)  # [L, E, R]
    mask = bit[:, :, 0]
    for j in range(1, Rm):
        mask = mask | bit[:, :, j]
    # f[l, m] = pairs of the experts whose GPU set is exactly m; zeta transform -> W(X) = sum over m subset X
    f = xp.bincount((xp.arange(L)[:, None] * nX + mask).reshape(-1), W.reshape(-1), L * nX).reshape(L, nX)
    for b in range(G):
        v = f.reshape(L, nX >> (b + 1), 2, 1 << b)
        v[:, :, 1, :] += v[:, :, 0, :]
    size = xp.popcount(G)
    size_safe = xp.where(size > 0, size, 1)
    best = xp.amax(xp.where(size > 0, (f + size_safe - 1) // size_safe, 0), 1)  # [L] integer optimum
    slack = best[:, None] * size - f  # >= 0 for every X; slack[:, 0] = 0

    # rest[l, e, r]: GPU set of replicas r+1.. of expert e (suffix OR)
    acc = xp.zeros((L, E))
    rest_cols = []
    for j in range(Rm - 1, -1, -1):
        rest_cols.append(acc)
        acc = acc | bit[:, :, j]
    rest = _stack_last(xp, rest_cols[::-1])
    # a replica needs a decision if its expert is replicated, it is not the last one, and its GPU does not
    # come again later (a later duplicate on the same GPU takes the GPU's share; this one keeps 0 for now)
    decide = valid & (rest != 0) & ((rest & bit) == 0)
    dflat = decide.reshape(L, E * Rm)
    n_dec = dflat.sum(1)
    order = xp.argsort(xp.where(dflat, 0, 1), 1)  # decided replicas first, in (expert, rank) order
    x_all = xp.zeros((L, E * Rm))
    W_rem = W.clone() if hasattr(W, "clone") else W.copy()
    rows = xp.arange(L)
    n_steps = int(xp.to_numpy(xp.amax(n_dec, 0))) if L else 0
    bit_flat = bit.reshape(L, E * Rm)
    rest_flat = rest.reshape(L, E * Rm)
    for k in range(n_steps):
        act = n_dec > k
        q = order[:, k]
        e = q // Rm
        gb = bit_flat[rows, q][:, None]
        rs = rest_flat[rows, q][:, None]
        w = W_rem[rows, e]
        sset = gb | rs
        in_g = (X & gb) != 0
        in_rest = (X & rs) == rs
        lo_min = xp.amin(xp.where(~in_g & in_rest, slack, 1 << 62), 1)
        hi_min = xp.amin(xp.where(in_g & ~in_rest, slack, 1 << 62), 1)
        lo = xp.where(w - lo_min > 0, w - lo_min, 0)
        hi = xp.where(hi_min < w, hi_min, w)
        # an even share of what is left, clipped into the feasible interval
        n_left = 1 + _popcount_vec(xp, rs[:, 0], G)
        pref = (w + n_left - 1) // n_left
        x = xp.where(pref < lo, lo, xp.where(pref > hi, hi, pref))
        x = xp.where(act, x, 0)
        w_new = w - x
        upd = xp.where((X & sset) == sset, w[:, None], 0) - xp.where(in_rest, w_new[:, None], 0) - xp.where(in_g, x[:, None], 0)
        slack = slack + xp.where(act[:, None], upd, 0)
        W_rem = _set_rows(xp, W_rem, rows, e, w_new, act)
        x_all = _set_rows(xp, x_all, rows, q, x, act)
    x_all = x_all.reshape(L, E, Rm)
    # the last replica of each expert on each GPU takes what is left (W_rem); earlier duplicates keep 0
    last = valid & ((rest & bit) == 0) & ~decide
    out = xp.where(last, W_rem[:, :, None], x_all)
    return _spread_duplicates(xp, out, rgpu, valid, bit, rest)


def _spread_duplicates(xp, out, rgpu, valid, bit, rest):
    """Replicas of one expert on one GPU share that GPU's part evenly (larger chunks first); the GPU load
    is unchanged. Rare (only when no other GPU had room), so a per-replica loop is fine."""
    dup = valid & ((rest & bit) != 0)
    if not bool(xp.to_numpy(dup).any()):
        return xp.to_numpy(out) if isinstance(xp, _NumpyOps) else out
    o = xp.to_numpy(out).copy()
    g = xp.to_numpy(rgpu)
    v = xp.to_numpy(valid)
    L, E, Rm = o.shape
    for l, e in zip(*np.nonzero(xp.to_numpy(dup).any(2))):
        for gpu in np.unique(g[l, e][v[l, e]]):
            idx = np.nonzero(v[l, e] & (g[l, e] == gpu))[0]
            tot = o[l, e, idx].sum()
            k = idx.size
            o[l, e, idx] = tot // k + (np.arange(k) < tot % k)
    return o if isinstance(xp, _NumpyOps) else xp.asarray(o)


def _split_waterfill(xp, W, rgpu, valid, logcnt, G, even):
    """Greedy water-filling for many GPUs: replicated experts, largest first, pour their pairs onto their
    GPUs' lowest levels given everything else assigned so far; two sweeps; per layer never worse than even."""
    L, E, Rm = rgpu.shape
    rows = xp.arange(L)
    replicated = logcnt > 1
    fixed = xp.where(replicated[:, :, None], 0, even)
    x = xp.zeros((L, E, Rm))
    order = xp.argsort(xp.where(replicated, -W, 1), 1)  # replicated experts, descending load
    n_rep = replicated.sum(1)
    n_steps = int(xp.to_numpy(xp.amax(n_rep, 0)))
    big = 1 << 40  # a closed column; small enough that R * big cannot overflow int64
    for _sweep in range(2):
        for k in range(n_steps):
            act = n_rep > k
            e = order[:, k]
            cur = x[rows, e]  # [L, R]
            x = _set_rows(xp, x, rows, e, xp.zeros((L, Rm)), act)
            load = _layer_gpu_loads(xp, fixed + x, rgpu, valid, G)  # [L, G] without expert e
            g = rgpu[rows, e]
            v = valid[rows, e]
            # duplicates of e on one GPU: only the first one takes water, the others 0
            first = v.clone() if hasattr(v, "clone") else v.copy()
            for j in range(1, Rm):
                for i in range(j):
                    first[:, j] = first[:, j] & ~(v[:, i] & (g[:, i] == g[:, j]))
            lv = xp.where(first, xp.gather(load, g, 1), big)
            pour = _waterfill(xp, lv, W[rows, e])
            pour = xp.where(act[:, None], pour, cur)
            x = _set_rows(xp, x, rows, e, pour, act)
    out = fixed + x
    worse = xp.amax(_layer_gpu_loads(xp, out, rgpu, valid, G), 1) > xp.amax(_layer_gpu_loads(xp, even, rgpu, valid, G), 1)
    out = xp.where(worse[:, None, None], even, out)
    return xp.to_numpy(out) if isinstance(xp, _NumpyOps) else out


def _waterfill(xp, levels, w):
    """Integer pour of w [L] units onto columns with levels [L, R] (huge = closed): raise the lowest ones to a
    common level; the remainder goes one unit each to the lowest columns (ties: lower column first)."""
    L, R = levels.shape
    order = xp.argsort(levels, 1)
    lv = xp.gather(levels, order, 1)
    open_ = lv < (1 << 39)
    csum = xp.cumsum(xp.where(open_, lv, 0), 1)
    k = xp.arange(R)[None, :] + 1
    # columns 0..j can all be raised to lv[j] with cost (j+1) lv[j] - csum[j]
    need = k * lv - csum
    usable = open_ & (need <= w[:, None])
    m = usable.sum(1)  # number of columns that end up wet (>= 1 since column 0 is open with need 0)
    m_safe = xp.where(m > 0, m, 1)
    tot = w + xp.gather(csum, (m_safe - 1)[:, None], 1)[:, 0]
    level = tot // m_safe
    extra = tot - level * m_safe
    idx = xp.arange(R)[None, :]
    pour_sorted = xp.where(idx < m[:, None], level[:, None] - lv + (idx < extra[:, None]), 0)
    pour_sorted = xp.where(open_, pour_sorted, 0)
    inv = xp.argsort(order, 1)
    return xp.gather(pour_sorted, inv, 1)


def _popcount_vec(xp, v, n_bits):
    c = v & 0
    for b in range(n_bits):
        c = c + ((v >> b) & 1)
    return c


def _stack_last(xp, cols):
    if isinstance(xp, _NumpyOps):
        return np.stack(cols, axis=-1)
    return xp.t.stack(cols, dim=-1)


def _set_rows(xp, a, rows, col, val, act):
    """a[rows, col] = val where act (a copy for numpy semantics parity)."""
    cur = a[rows, col]
    if cur.ndim == 2:
        new = xp.where(act[:, None], val, cur)
    else:
        new = xp.where(act, val, cur)
    a[rows, col] = new
    return a
