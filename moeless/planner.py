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
  With ``hedge=True`` (the default of `plan_layers`) the rule spends every slot instead: see Hedging.

Hedging (``hedge=True``, default). A prediction is wrong by a few tokens per expert, and those errors add up
per GPU (ESFT, 64-token batches, 8 GPUs: a GPU's load is off by ~15% of C from sampling alone). The serve-time
split can move a GPU's excess only through experts that also have a replica elsewhere, so the planner buys
flexibility with the spare slots: (a) every slot holds a replica, the spare ones going by EPLB's min-max
greedy to the experts with the largest predicted load per replica (the largest absolute errors); (b) in a cold
placement the replicated experts form a chain around the ring of GPUs: the k-th replicated expert (largest
per-replica load first) takes GPUs s_k .. s_k + R_k - 1 (mod G), with s_k = sum over earlier ones of (R_i -
1), so consecutive experts share a GPU and every GPU is linked to its neighbours (LPT alone puts the two
replicas of each hot expert on the two lightest GPUs: disjoint pairs, ~2 components of 8 GPUs per ESFT layer;
the chain gives 1). Across a link the split can move up to the whole true load of the linking expert, so an
error on one GPU spreads over all of them. Layers where the chain would overfill a GPU or wrap an expert onto
itself keep plain LPT. (c) Warm, optional (`reuse_whole=True`): a layer whose previous plan still admits a
split of the new predicted loads that reaches the mean (max over GPU sets X of W(X) / |X| = C, exact for G <=
EXACT_SPLIT_MAX_GPUS) keeps it whole: every instance stays and there is no placement work, but the links stay
on the experts that were hottest before, so errors are absorbed less well. Measured with real predictors on
held-out ESFT routing (bench/esft_balance.py, bench/results/esft_balance.md; 8 GPUs x 9 slots, online,
serve-time split, 64 / 512-token batches, in-distribution): the regression predictor reaches 1.019 / 1.002
(1.025 / 1.004 with reuse_whole=True) instead of 1.197 / 1.091 without hedging, the oracle 1.0001 instead of
1.013. The price: every slot holds an instance (G*S per layer instead of ~E + G), and fewer instances stay in
place in warm serving (ESFT oracle loads, one task, 64 / 512-token batches: 31% / 46%, vs 62% / 89% without
hedging and 54% / 99.6% with reuse_whole=True).

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

# Bridging rounds that pair GPUs one to one before the transport on a line takes over (see _place_arrays).
_LINE_ROUNDS = 4

# Proposal rounds of the GPU matching in _relabel_to (each round matches most of the rest; what is left is
# matched in order). More rounds keep a few more instances in place, never change the balance.
_RELABEL_ROUNDS = 4

# replicate_minmax sorts all candidate increments when there are at most this many per layer (else bisection).
_MINMAX_SORT = 2048

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


def _starts(ks: np.ndarray) -> np.ndarray:
    """bool mask of the entries of the 1-D `ks` that differ from their predecessor (the first always does)."""
    out = np.empty(ks.size, dtype=bool)
    out[:1] = True
    np.not_equal(ks[1:], ks[:-1], out=out[1:])
    return out


def _take_rows(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """np.take_along_axis(a, idx, 1) for 2-D arrays, without its per-call overhead (a hot path)."""
    n, m = a.shape
    return a.ravel()[idx + (np.arange(n) * m)[:, None]]


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
        return cls._derived(p2l, num_experts, gpus, slots_per_gpu)

    @classmethod
    def _derived(cls, p2l: np.ndarray, num_experts: int, gpus: int, slots_per_gpu: int) -> "Plan":
        """The plan of a checked int64 phy2log (no argument checks: the planner's own output)."""
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
    key = np.where(p2l >= 0, p2l, E)
    # a stable sort per layer keeps one expert's slots in slot order; int16 keys get numpy's radix sort
    order = np.argsort(key.astype(np.int16) if E < 1 << 15 else key, axis=1, kind="stable")
    counts = np.bincount((key + np.arange(L)[:, None] * (E + 1)).ravel(), minlength=L * (E + 1)).reshape(L, E + 1)
    logcnt = counts[:, :E].astype(np.int64)
    R = max(1, int(logcnt.max(initial=0)))
    ks = _take_rows(key, order)
    rank = np.arange(P) - _take_rows(np.cumsum(counts, 1) - counts, ks)
    occ = ks < E
    log2phy = np.full(L * E * R, -1, dtype=np.int64)
    log2phy[((np.arange(L)[:, None] * E + ks) * R + rank)[occ]] = order[occ]
    return log2phy.reshape(L, E, R), logcnt


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
    M = num_replicas - E
    R = np.ones((L, E), dtype=np.int64)
    if M == 0 or cap == 1:
        return R
    # The greedy takes the increments W_e / k (k = 1 .. cap-1: the load per replica before replica k+1) in
    # descending order (ties: lower expert id), so every increment above a threshold t is taken as long as
    # fewer than M lie above t. t <= total / M always qualifies; a few bisection steps (on a log scale, down
    # to total / (M + E), below which more than M lie) bring it close, and the greedy finishes from there:
    # the same result as the plain greedy, in a few dozen numpy calls instead of M rounds.
    rows = np.arange(L)
    K = min(cap - 1, M)  # an expert takes at most K of the spare replicas
    if E * K <= _MINMAX_SORT:
        # the increments W_e / k, k = 1..K, in (expert, k) order; a stable sort by value descending puts ties
        # in the greedy's order (lower expert id first), and the greedy takes the first M of them
        vals = (W[:, :, None] / np.arange(1, K + 1)).reshape(L, E * K)
        top = np.argsort(-vals, axis=1, kind="stable")[:, :M] // K
        return R + np.bincount((rows[:, None] * E + top).ravel(), minlength=L * E).reshape(L, E)
    tot = W.sum(1)
    hi = tot / M
    lo = tot / (M + E)

    def above(t):  # [L, E] number of increments W_e / k > t, k <= cap - 1 (exact in floating point)
        with np.errstate(divide="ignore", invalid="ignore"):
            c = np.clip(np.ceil(W / t[:, None]) - 1, 0, cap - 1).astype(np.int64)
            c -= (c >= 1) & ~(W / np.maximum(c, 1) > t[:, None])
            c += (c < cap - 1) & (W / (c + 1) > t[:, None])
        return c

    pos = tot > 0
    if pos.any():
        for _ in range(5):
            mid = np.sqrt(lo * hi)
            ok = above(np.where(pos, mid, 1.0)).sum(1) <= M
            hi = np.where(ok, mid, hi)
            lo = np.where(ok, lo, mid)
        c = above(np.where(pos, hi, 1.0))
        good = pos & (c.sum(1) <= M)  # floating point could break the bound: those layers start from one
        R += np.where(good[:, None], c, 0)
    return _minmax_greedy(W, R, M - (R - 1).sum(1), cap, rows)


def _minmax_greedy(W, R, left, cap, rows):
    """EPLB's greedy from R: `left` [L] more replicas, each to the expert with the largest load per replica."""
    for _ in range(int(left.max(initial=0))):
        per = np.where(R < cap, W / R, -np.inf)
        e = per.argmax(1)
        ok = (left > 0) & (per[rows, e] > -np.inf)
        if not ok.any():
            break
        R[rows[ok], e[ok]] += 1
        left = left - ok
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
    hedge: bool = False,
) -> Plan:
    """Place logcnt[l, e] replicas of each expert (each carrying loads[l, e] / logcnt[l, e]) on G x S slots:
    warm reuse from `previous`, (if `hedge`, cold) the replicated experts chained around the ring of GPUs,
    then longest-load-first onto the least-loaded GPU with a free slot that does not hold the expert yet, then
    (if `bridge`) bridging replicas in the remaining free slots, (if `hedge`) ring replicas in what is left.
    See the module docstring. Deterministic."""
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
    return _place(W, R, G, S, previous, float(tolerance), bool(bridge), cap, _slack(reuse_slack), bool(hedge))


class _Items:
    """The replicas of every layer as items, sorted by per-replica load descending (ties: lower expert id,
    then lower rank), padded to P = G*S per layer: e (-1 pad), r, w [L, P]; n [L] items per layer."""

    __slots__ = ("e", "r", "w", "n")

    def __init__(self, W: np.ndarray, R: np.ndarray, P: int):
        L, E = W.shape
        per = W / R
        order = np.argsort(-per, axis=1, kind="stable")
        flat = (order + np.arange(L)[:, None] * E).ravel()  # flat (layer, expert) ids in item order
        Rf = R.ravel()[flat]
        src = np.repeat(flat, Rf)  # item -> flat (layer, expert)
        k = np.arange(src.size)
        n = R.sum(1)
        at = src // E * P + k - np.repeat(np.cumsum(n) - n, n)  # flat (layer, position) of each item
        self.e = np.full(L * P, -1, dtype=np.int64)
        self.r = np.zeros(L * P, dtype=np.int64)
        self.w = np.zeros(L * P)
        self.e[at] = src % E
        self.r[at] = k - np.repeat(np.cumsum(Rf) - Rf, Rf)
        self.w[at] = per.ravel()[src]
        self.e, self.r, self.w = self.e.reshape(L, P), self.r.reshape(L, P), self.w.reshape(L, P)
        self.n = n

    def take(self, rows: np.ndarray) -> "_Items":
        out = object.__new__(_Items)
        out.e, out.r, out.w, out.n = self.e[rows], self.r[rows], self.w[rows], self.n[rows]
        return out


def _group_rank(key: np.ndarray) -> np.ndarray:
    """Rank of each entry among the entries with the same key, in array order (0 for the first)."""
    o = np.argsort(key, kind="stable")
    ks = key[o]
    start = _starts(ks)
    first = np.maximum.accumulate(np.where(start, np.arange(ks.size), 0))
    rank = np.empty_like(o)
    rank[o] = np.arange(ks.size) - first
    return rank


def _place_arrays(W, R, G, S, previous, tolerance, bridge, cap, items=None, hedge=False):
    """phy2log [L, P] and planned GPU loads [L, G] of one placement (warm from `previous` if given)."""
    L, E = W.shape
    P = G * S
    rows = np.arange(L)
    ideal = W.sum(1) / G  # [L]
    limit = ideal * (1.0 + tolerance) + 1e-9 * np.maximum(ideal, 1.0)
    it = _Items(W, R, P) if items is None else items
    it_e, it_w = it.e, it.w
    valid = it_e >= 0
    e_safe = np.maximum(it_e, 0)

    p2lf = np.full(L * P, -1, dtype=np.int64)  # flat views: every update is a 1-D gather/scatter
    slf = np.zeros(L * P)  # planned load of each slot
    hasf = np.zeros(L * G * E, dtype=bool)  # hasf[(l*G + g)*E + e]: GPU g of layer l holds a replica of e

    # ---- 1. warm reuse: keep the previous slot of (e, r), largest loads first, up to the GPU's limit ------
    if previous is not None:
        le = rows[:, None] * E + e_safe  # flat (layer, expert) ids: 1-D gathers instead of 2-D/3-D fancy indexing
        in_prev = valid & (it.r < previous.logcnt.reshape(-1)[le])
        Rp = previous.max_replicas
        prev_slot = np.where(in_prev, previous.log2phy.reshape(-1)[le * Rp + np.minimum(it.r, Rp - 1)], -1)
        prev_gpu = np.where(prev_slot >= 0, prev_slot // S, G)  # G: not a candidate
        # previous duplicates of an expert on one GPU (unavoidable then) are not kept twice: an expert's items
        # are adjacent in item order, so comparing with the few items before suffices
        # log2phy lists slots in ascending order, so an expert's previous GPUs are non-decreasing in rank and
        # a duplicate follows its twin directly: one comparison (k = 1) then finds them all; a hand-made
        # previous plan out of order gets the general loop
        same_e = it_e[:, 1:] == it_e[:, :-1]
        k_max = 2 if not (same_e & (prev_gpu[:, 1:] < prev_gpu[:, :-1])).any() else int(R.max()) if R.size else 1
        for k in range(1, k_max):
            dup = (prev_gpu[:, k:] < G) & (prev_gpu[:, k:] == prev_gpu[:, :-k]) & (it_e[:, k:] == it_e[:, :-k])
            prev_gpu[:, k:][dup] = G
        # per (layer, GPU), in item order (load descending): the prefix whose cumulated load stays within the
        # limit is kept. Largest first: what then moves is small, which LPT packs well (keeping the smallest
        # first keeps ~1% more instances but leaves the big ones nowhere to go: balance 1.11 vs 1.00 on ESFT,
        # 64-token batches).
        seg = (rows[:, None] * (G + 1) + prev_gpu).ravel()
        order = np.argsort(seg.astype(np.int16 if L * (G + 1) < 1 << 15 else np.int64), kind="stable")  # radix sort
        segk = seg[order]
        wk = it_w.ravel()[order]
        csum = np.cumsum(wk)
        seg_start = _starts(segk)
        base = np.maximum.accumulate(np.where(seg_start, csum - wk, -np.inf))
        keep_sorted = (prev_gpu.ravel()[order] < G) & (csum - base <= limit[segk // (G + 1)])
        kept = order[keep_sorted]  # flat (layer, item) ids
        kl = kept // P
        ks = kl * P + prev_slot.ravel()[kept]
        ke = it_e.ravel()[kept]
        p2lf[ks] = ke
        slf[ks] = it_w.ravel()[kept]
        hasf[(ks // S) * E + ke] = True  # ks // S = l*G + g
        placed = np.zeros(L * P, dtype=bool)
        placed[kept] = True
        todo = valid & ~placed.reshape(L, P)
        # the queue: unplaced items, still in item order
        qo = np.argsort(~todo, axis=1, kind="stable")
        q_e = _take_rows(it_e, qo).ravel()
        q_w = _take_rows(it_w, qo).ravel()
        n_todo = todo.sum(1)
        free = (p2lf < 0).reshape(L * G, S)
        fo = np.argsort(~free, axis=1, kind="stable").ravel()  # per GPU: free slots first, ascending
        room = free.sum(1)
        gl = np.bincount(np.repeat(np.arange(L * G), S), weights=slf, minlength=L * G)
    else:
        q_e, q_w, n_todo = it_e.ravel(), it_w.ravel(), it.n
        fo = None  # every slot free: the next free slot of GPU g is g*S + (slots used)
        room = np.full(L * G, S, dtype=np.int64)
        gl = np.zeros(L * G)
    nxt = np.zeros(L * G, dtype=np.int64)  # slots taken so far on (layer, GPU) by steps 1b, 2 and 3

    # ---- 1b. hedging, cold: the replicated experts form a chain around the ring of GPUs ------------------
    # The k-th replicated expert (item order) takes GPUs s_k, s_k + 1, .., s_k + R_k - 1 (mod G) with
    # s_k = sum_{i<k} (R_i - 1): consecutive experts share a GPU, so the replicas connect GPU g to g + 1 all
    # around the ring instead of pairing GPUs off (LPT puts the two replicas of each hot expert on the two
    # lightest GPUs: disjoint pairs, ~2 components of 8 GPUs on ESFT). The serve-time split moves up to an
    # expert's whole true load across each link, so a prediction error on one GPU spreads over all of them.
    # Layers where the chain would overfill a GPU (or wrap onto itself) keep plain LPT.
    if hedge and previous is None and G > 1:
        Ri = np.where(valid, R[rows[:, None], e_safe], 1)
        rep = Ri >= 2
        if rep.any():
            q = np.cumsum(rep, 1) - 1
            k = np.cumsum(rep & (it.r == 0), 1) - 1
            cg = (q - k) % G
            li, ii = np.nonzero(rep)
            cnt = np.bincount(li * G + cg[li, ii], minlength=L * G).reshape(L, G)
            use = (cnt.max(1) <= S) & (Ri.max(1, where=rep, initial=1) <= G)
            sel = use[li]
            li, ii = li[sel], ii[sel]
            if li.size:
                tg = li * G + cg[li, ii]
                ts = tg * S + _group_rank(tg)
                te = it_e[li, ii]
                tw = it_w[li, ii]
                p2lf[ts] = te
                slf[ts] = tw
                hasf[tg * E + te] = True
                nxt += np.bincount(tg, minlength=L * G)
                room -= np.bincount(tg, minlength=L * G)
                gl += np.bincount(tg, weights=tw, minlength=L * G)
                todo = valid.copy()
                todo[li, ii] = False
                qo = np.argsort(~todo, axis=1, kind="stable")
                q_e = _take_rows(it_e, qo).ravel()
                q_w = _take_rows(it_w, qo).ravel()
                n_todo = todo.sum(1)
    room2 = room.reshape(L, G)
    gl2 = gl.reshape(L, G)
    cols = np.arange(G)

    # ---- 2. longest processing time first onto the least-loaded GPU with room ---------------------------
    # LPT in rounds: the next items go one each to the GPUs in ascending load order, as far as exact LPT
    # would do the same (item j's GPU is still the lightest when j comes: its load <= every earlier GPU of the
    # round plus the item it took). Ties go to the GPU not yet used in the round, so zero-load experts are
    # dealt round-robin. A round is ~25 numpy calls for up to G items instead of ~20 per item.
    # Each round works on the layers that still have items only (they finish at different rounds).
    ptr = np.zeros(L, dtype=np.int64)
    any_zero = bool((valid & (it_w == 0)).any())
    al = rows
    while True:
        al = al[ptr[al] < n_todo[al]]
        if al.size == 0:
            break
        pa = ptr[al]
        room_a = room2[al]
        gl_a = gl2[al]
        key = np.where(room_a > 0, gl_a, np.inf)
        qa = (al * P)[:, None]
        if any_zero:
            # once only zero-load items are left they go to the heaviest GPUs with room: they cost nothing
            # there, and the light GPUs keep their free slots for bridging
            zero = q_w[al * P + np.minimum(pa, P - 1)] == 0
            og = np.argsort(np.where(zero[:, None], np.where(room_a > 0, -gl_a, np.inf), key), axis=1,
                            kind="stable")
        else:
            og = np.argsort(key, axis=1, kind="stable")
        ls = _take_rows(key, og)
        gid = (al * G)[:, None] + og  # flat (layer, GPU) ids, lightest first
        j = pa[:, None] + cols
        inq = j < n_todo[al, None]
        qi = qa + np.minimum(j, P - 1)
        e = q_e[qi]
        w = q_w[qi]
        reach = np.minimum.accumulate(ls + w, axis=1)
        ok = inq & (ls < np.inf) & ~hasf[gid * E + e]
        if any_zero:
            ok[:, 1:] &= (ls[:, 1:] <= reach[:, :-1]) | zero[:, None]
        else:
            ok[:, 1:] &= ls[:, 1:] <= reach[:, :-1]
        m = np.cumprod(ok, axis=1).sum(1)
        stuck = np.flatnonzero(m == 0)
        if stuck.size:  # the lightest GPU already holds the next item's expert: one item, slow path
            ks = key[stuck]
            has_e = hasf[(al[stuck, None] * G + cols) * E + e[stuck, :1]]
            kb = np.where(has_e, np.inf, ks)
            g0 = kb.argmin(1)
            dup = kb[np.arange(stuck.size), g0] == np.inf
            g0[dup] = ks[dup].argmin(1)  # every GPU with room holds e: a duplicate is unavoidable
            gid[stuck, 0] = al[stuck] * G + g0
            m[stuck] = 1
        k = np.flatnonzero(cols < m[:, None])
        tg = gid.ravel()[k]
        te = e.ravel()[k]
        tw = w.ravel()[k]
        ts = tg * S + (nxt[tg] if fo is None else fo[tg * S + nxt[tg]])  # tg * S = l*P + g*S
        nxt[tg] += 1
        room[tg] -= 1
        p2lf[ts] = te
        slf[ts] = tw
        gl[tg] += tw
        hasf[tg * E + te] = True
        ptr[al] = pa + m

    # ---- 3. bridging: settle heavy GPUs' excess against light GPUs' deficit with extra replicas ----------
    # In rounds: the k-th heaviest GPU above the limit pairs with the k-th lightest GPU below the mean that
    # has a free slot; each pair adds one replica of an expert of the heavy GPU on the light one and moves
    # min(excess, deficit) of its load there, so each bridge settles at least one side of its pair. The
    # replica moved is the smallest one that carries the whole amount, else the largest. Pairing big with big
    # spends few slots, which matters when they are scarce; but one heavy GPU facing many slightly light
    # ones settles one of them per round. So after LINE_ROUNDS rounds the pairing becomes a transport on a
    # line (McNaughton's wrap-around): the heavy GPUs' excesses laid end to end against the light GPUs'
    # deficits, each overlap a bridge, so one heavy GPU bridges to several light ones in one round.
    if bridge:
        cntf = R.ravel().copy()
        sidx = np.arange(S)
        tiny = 1e-9 * np.maximum(ideal, 1.0)
        active = (room2 > 0).any(1) & (gl2.max(1) > limit)
        for rnd in range(4 * G + 4):  # each round settles at least one side of a bridge; a safety bound
            al = np.flatnonzero(active)
            if al.size == 0:
                break
            g_al = gl2[al]
            exc = g_al - ideal[al, None]
            heavy = g_al > limit[al, None]
            light = (room2[al] > 0) & (exc < -tiny[al, None])
            line = rnd >= _LINE_ROUNDS
            if not line:
                oh = np.argsort(np.where(heavy, -exc, np.inf), axis=1, kind="stable")
                ol = np.argsort(np.where(light, exc, np.inf), axis=1, kind="stable")
                npair = np.minimum(heavy.sum(1), light.sum(1))
                ai, hk = np.nonzero(cols < npair[:, None])
                lk = hk
                excf = exc.ravel()
                move = np.minimum(excf[ai * G + oh[ai, hk]], -excf[ai * G + ol[ai, lk]])
            else:
                xs = np.where(heavy, exc, 0.0)
                ds = np.where(light, -exc, 0.0)
                oh = np.argsort(-xs, axis=1, kind="stable")
                ol = np.argsort(-ds, axis=1, kind="stable")
                ch = np.cumsum(_take_rows(xs, oh), 1)
                cd = np.cumsum(_take_rows(ds, ol), 1)
                total = np.minimum(ch[:, -1], cd[:, -1])
                o = np.argsort(np.concatenate([ch, cd], 1), axis=1, kind="stable")  # at ties heavy ends first
                ends = np.minimum(_take_rows(np.concatenate([ch, cd], 1), o), total[:, None])
                is_h = o < G
                hk_all = np.cumsum(is_h, 1) - is_h  # rank of the heavy GPU of the segment that ends here
                lk_all = np.cumsum(~is_h, 1) - ~is_h
                seg = np.diff(ends, axis=1, prepend=0.0)
                ai, si = np.nonzero((seg > tiny[al, None]) & (hk_all < G) & (lk_all < G))
                hk, lk, move = hk_all[ai, si], lk_all[ai, si], seg[ai, si]
            if ai.size == 0:
                break
            pi = al[ai]
            hid = pi * G + oh[ai, hk]  # flat (layer, GPU) ids of the heavy and light GPU of each bridge
            lid = pi * G + ol[ai, lk]
            cs = hid[:, None] * S + sidx  # [n, S] flat slot ids of the heavy GPU
            ce = p2lf[cs]
            cl = slf[cs]
            ces = np.maximum(ce, 0)
            elig = (ce >= 0) & (cl > 0) & ~hasf[lid[:, None] * E + ces] & (cntf[pi[:, None] * E + ces] < cap)
            fit = elig & (cl >= move[:, None])
            pick = np.where(fit.any(1), np.where(fit, cl, np.inf).argmin(1), np.where(elig, cl, -np.inf).argmax(1))
            ar = np.arange(pi.size)
            go = elig[ar, pick]
            src = cs[ar, pick]
            e = ce[ar, pick]
            # the bridges left out get unique negative keys, so that they do not count in the ranks below
            if not line:  # one new replica per expert and layer per round keeps max_replicas exact
                go &= _group_rank(np.where(go, pi * E + e, -1 - ar)) == 0
            else:  # one replica of an expert per light GPU, within its room and the expert's max_replicas
                go &= _group_rank(np.where(go, lid * E + e, -1 - ar)) == 0
                go &= _group_rank(np.where(go, lid, -1 - ar)) < room[lid]
                go &= _group_rank(np.where(go, pi * E + e, -1 - ar)) < cap - cntf[pi * E + e]
            go = np.flatnonzero(go)
            if go.size == 0:
                break
            src, e, lo, hi, pl, move = src[go], e[go], lid[go], hid[go], pi[go], move[go]
            if not line:
                amount = np.minimum(move, slf[src])
                rank = 0
            else:  # bridges from one replica share its planned load, in order
                order = np.argsort(src, kind="stable")
                mv = move[order]
                before = np.cumsum(mv) - mv
                start = _starts(src[order])
                before -= np.maximum.accumulate(np.where(start, before, 0.0))
                amount = np.empty_like(move)
                amount[order] = np.clip(slf[src[order]] - before, 0.0, mv)
                keep = amount > tiny[pl]
                src, e, lo, hi, pl, amount = src[keep], e[keep], lo[keep], hi[keep], pl[keep], amount[keep]
                rank = _group_rank(lo)
            dst = lo * S + (nxt[lo] + rank if fo is None else fo[lo * S + nxt[lo] + rank])
            np.add.at(nxt, lo, 1)
            np.subtract.at(room, lo, 1)
            p2lf[dst] = e
            np.subtract.at(slf, src, amount)
            slf[dst] = amount
            np.subtract.at(gl, hi, amount)
            np.add.at(gl, lo, amount)
            hasf[lo * E + e] = True
            np.add.at(cntf, pl * E + e, 1)
            progressed = np.zeros(L, dtype=bool)
            progressed[pl] = True
            active &= progressed & (room2 > 0).any(1) & (gl2.max(1) > limit)

    # ---- 4. hedging: the slots still free hold replicas that let the serve-time split absorb prediction error
    # Round j gives each GPU g with room one replica of the heaviest expert (predicted load) of GPU
    # g - 1 - j (mod G) that g does not hold yet: a ring at distance 1, then 2, ... (an expander over GPUs).
    # Hedge replicas carry no planned load; when the true counts differ from the prediction, the split moves
    # the excess of a GPU along these bridges (Hall's condition over GPU sets then has slack everywhere).
    if hedge and G > 1:
        cntf = R.ravel().copy() if not bridge else cntf
        sidx = np.arange(S)
        We = W.ravel()
        for j in range(min(S, G - 1) if S > 1 else 1):
            gid = np.flatnonzero(room > 0)
            if gid.size == 0:
                break
            pl = gid // G
            srcg = pl * G + (gid % G - 1 - j) % G
            cs = srcg[:, None] * S + sidx
            ce = p2lf[cs]
            ces = np.maximum(ce, 0)
            elig = (ce >= 0) & ~hasf[gid[:, None] * E + ces] & (cntf[pl[:, None] * E + ces] < cap)
            score = np.where(elig, We[pl[:, None] * E + ces], -1.0)
            pick = score.argmax(1)
            ar = np.arange(gid.size)
            go = elig[ar, pick]
            e = ce[ar, pick]
            go &= _group_rank(np.where(go, pl * E + e, -1 - ar)) < cap - cntf[pl * E + e]
            go = np.flatnonzero(go)
            if go.size == 0:
                continue
            g_, e = gid[go], e[go]
            dst = g_ * S + (nxt[g_] if fo is None else fo[g_ * S + nxt[g_]])
            nxt[g_] += 1
            room[g_] -= 1
            p2lf[dst] = e
            hasf[g_ * E + e] = True
            np.add.at(cntf, pl[go] * E + e, 1)

    return p2lf.reshape(L, P), gl2


def _place(W, R, G, S, previous, tolerance, bridge, cap, reuse_slack=0.05, hedge=False, whole=False) -> Plan:
    """Warm placement (pins from `previous`) where its planned max GPU load is within (1 + reuse_slack) of the cold
    placement's, else the cold placement with its GPUs renumbered to overlap `previous` most. Pins can block
    a needed swap (two hot experts pinned on one full GPU); renumbering GPUs never changes the balance.
    With `hedge` and `whole`, a layer whose previous plan still admits a split of the new loads that reaches
    the mean keeps it whole (G <= EXACT_SPLIT_MAX_GPUS, where that optimum is exact)."""
    E = W.shape[1]
    if previous is not None and hedge and whole and G <= EXACT_SPLIT_MAX_GPUS:
        ideal = W.sum(1) / G
        same = _split_optimum(previous, W) <= ideal + 1e-9 * np.maximum(ideal, 1.0)
        same &= (previous.logcnt <= cap).all(1)
        if same.all():
            return previous
        if same.any():
            rest = np.flatnonzero(~same)
            sub = Plan(previous.phy2log[rest], previous.log2phy[rest], previous.logcnt[rest], G, S)
            out = previous.phy2log.copy()
            out[rest] = _place(W[rest], R[rest], G, S, sub, tolerance, bridge, cap, reuse_slack, True, False).phy2log
            return Plan._derived(out, E, G, S)
    items = _Items(W, R, G * S)
    if previous is None:
        return Plan._derived(_place_arrays(W, R, G, S, None, tolerance, bridge, cap, items, hedge)[0], E, G, S)
    warm, warm_load = _place_arrays(W, R, G, S, previous, tolerance, bridge, cap, items, hedge)
    # a cold placement's max GPU load is at least the mean, so a layer whose warm plan is within
    # (1 + reuse_slack) of the mean keeps it whatever the cold plan would be: only the others are planned cold
    doubt = np.flatnonzero(warm_load.max(1) > W.sum(1) / G * (1.0 + reuse_slack))
    if doubt.size:
        cold, cold_load = _place_arrays(W[doubt], R[doubt], G, S, None, tolerance, bridge, cap, items.take(doubt),
                                         hedge)
        worse = warm_load[doubt].max(1) > cold_load.max(1) * (1.0 + reuse_slack) + 1e-9
        if worse.any():
            sub = doubt[worse]
            warm = warm.copy()
            warm[sub] = _relabel_to(cold[worse], previous.phy2log[sub], G, S, previous.log2phy[sub],
                                    previous.logcnt[sub])
    return Plan._derived(warm, E, G, S)


def _split_optimum(plan: Plan, W: np.ndarray) -> np.ndarray:
    """[L] the smallest max GPU load any split of loads W [L, E] (float) can reach on `plan`: max over GPU sets
    X of W(X) / |X| (Hall's condition, the fractional optimum), by the zeta transform of the exact split."""
    L = plan.num_layers
    G, nX = plan.gpus, 1 << plan.gpus
    bit = np.where(plan.log2phy >= 0, np.left_shift(1, plan.log2phy // plan.slots_per_gpu), 0)
    mask = np.bitwise_or.reduce(bit, axis=2)
    f = np.bincount((np.arange(L)[:, None] * nX + mask).ravel(), W.ravel(), L * nX).reshape(L, nX)
    for b in range(G):
        v = f.reshape(L, nX >> (b + 1), 2, 1 << b)
        v[:, :, 1, :] += v[:, :, 0, :]
    size = np.maximum(_popcount_table(G), 1)
    return (f / size).max(1)


def _relabel_to(p2l: np.ndarray, prev: np.ndarray, G: int, S: int, prev_log2phy=None, prev_cnt=None) -> np.ndarray:
    """Renumber the GPUs of p2l [L, G*S] (greedy maximum overlap of expert sets with prev's GPUs), then put
    each instance in the slot where its expert lived on that GPU before, if any; balance is unchanged."""
    L = p2l.shape[0]
    rows = np.arange(L)
    a = p2l.reshape(L, G, S)
    b = prev.reshape(L, G, S)
    # overlap[l, g, h]: experts on new GPU g that lived on old GPU h, counted from the pairs (instance, old
    # replica of its expert) only: sparse, instead of a dense [L, G, G, S, S] comparison
    if prev_log2phy is None:
        prev_log2phy, prev_cnt = _derive_log2phy(prev, int(max(prev.max(initial=-1), p2l.max(initial=-1))) + 1)
    elif prev_cnt is None:
        prev_cnt = (prev_log2phy >= 0).sum(2)
    Rp = prev_log2phy.shape[2]
    inst = np.flatnonzero(p2l >= 0)
    il = inst // (G * S)
    ie = p2l.ravel()[inst]
    n_old = prev_cnt[il, ie]
    src = np.repeat(np.arange(inst.size), n_old)
    r = np.arange(src.size) - np.repeat(np.cumsum(n_old) - n_old, n_old)
    old = prev_log2phy.reshape(-1)[(il[src] * prev_log2phy.shape[1] + ie[src]) * Rp + r] // S
    idx = (inst[src] // S) * G + old  # inst // S = l*G + g
    overlap = np.bincount(idx, minlength=L * G * G).reshape(L, G, G)
    # greedy maximum matching in parallel rounds: each unmatched new GPU proposes to its best unmatched old
    # GPU; each old GPU takes its best proposer (ties: lower id); a few rounds instead of G sequential steps
    perm = np.full((L, G), -1, dtype=np.int64)  # new GPU g -> old GPU perm[g]
    taken = np.zeros((L, G), dtype=bool)
    cols = np.arange(G)
    score = overlap  # matched new GPUs' rows and old GPUs' columns are set to -1 as they go
    for _ in range(_RELABEL_ROUNDS):
        best_h = score.argmax(2)  # [L, G]
        best_v = np.take_along_axis(score, best_h[:, :, None], 2)[:, :, 0]
        live = best_v > 0
        if not live.any():
            break
        # layers that are done propose nothing (no live overlap left); not compacting `score` saves its copy
        # old GPU h accepts the proposer with the largest overlap (ties: lower id): sort the live proposals by
        # (layer, old GPU, overlap descending, new GPU) and take the first of each (layer, old GPU)
        ai, gi = np.nonzero(live)
        hi = best_h[ai, gi]
        o = np.lexsort((gi, -best_v[ai, gi], ai * G + hi))
        grp = (ai * G + hi)[o]
        first = o[_starts(grp)]
        ai, gi, hi = ai[first], gi[first], hi[first]
        perm[ai, gi] = hi
        taken[ai, hi] = True
        score[ai, gi, :] = -1
        score[ai, :, hi] = -1
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
    hedge: bool = True,
    reuse_whole: bool = False,
) -> Plan:
    """Scale and place every layer of one iteration: loads float [L, E] -> Plan.

    `rule` is "ideal" (default) or "literal" (Algorithm 1 with `cv_threshold`); the memory budget is
    gpus * slots_per_gpu slots per layer; `max_replicas` caps the replicas of one expert; `previous` is the
    last plan, whose instances are reused where the balance allows; `bridge` (default: on for "ideal", off for
    "literal") spends free slots on bridging replicas while a GPU is above (1 + tolerance) x the mean;
    `reuse_slack`: a layer keeps `previous`'s instances in place (warm) when that plan's max GPU load is within
    (1 + reuse_slack) of a fresh placement's, else it takes the fresh one with GPUs renumbered to match
    `previous` as far as possible (0 = balance first, inf = always warm); `hedge` (rule "ideal" only) spends
    every slot on min-max replicas and links the GPUs in a ring by them, so that the serve-time split can
    absorb prediction error (module docstring, Hedging); hedge=False gives the fewest replicas; `reuse_whole`
    (with hedge, G <= EXACT_SPLIT_MAX_GPUS): a layer whose previous plan can still split the predicted loads
    to the mean keeps it whole (about twice the instances kept and a much faster warm plan, but less robust
    to prediction error: see the module docstring).
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
    if rule == "ideal" and hedge:
        # every slot holds a replica: each spare one goes to the expert with the largest predicted load per
        # replica, the largest absolute error of a prediction (see the module docstring, "Hedging")
        R = replicate_minmax(W, G * S, max_replicas=cap)
    elif rule == "ideal":
        R = scale_ideal(W, G, G * S, tolerance=tolerance, max_replicas=cap)
    elif rule == "literal":
        R = scale_literal(W, G * S, cv_threshold=cv_threshold, max_replicas=cap)
    else:
        raise ValueError(f"rule must be 'ideal' or 'literal', got {rule!r}")
    if bridge is None:
        bridge = rule == "ideal"
    hedge = bool(hedge) and rule == "ideal"
    return _place(W, R, G, S, previous, float(tolerance), bool(bridge), cap, _slack(reuse_slack), hedge,
                  bool(reuse_whole))


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
_POPCOUNT: dict[int, np.ndarray] = {}


def _popcount_table(n_bits: int) -> np.ndarray:
    """int64 [2^n_bits]: bits set in each index (cached: the exact split needs it on every call; read-only)."""
    t = _POPCOUNT.get(n_bits)
    if t is None:
        t = np.zeros(1, dtype=np.int64)
        for _ in range(n_bits):  # the table of n+1 bits is that of n bits, then the same plus one
            t = np.concatenate([t, t + 1])
        t.setflags(write=False)
        _POPCOUNT[n_bits] = t
    return t


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
        return _popcount_table(n_bits)

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
        return self.asarray(_popcount_table(n_bits).copy())  # a writable copy: torch warns on read-only

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
    # the GPU-set masks of a step depend on the plan only, not on what earlier steps decided: they are built
    # for a block of steps at once (blocks of ~2M sets bound the memory), the loop only reads them
    block = max(1, (1 << 21) // max(1, L * nX))
    for k in range(n_steps):
        if k % block == 0:
            qs = order[:, k : min(k + block, n_steps)]
            gbs = xp.gather(bit_flat, qs, 1)[:, :, None]
            rss = xp.gather(rest_flat, qs, 1)
            n_left_b = 1 + size[rss]  # replicas from this one on, one per GPU
            rss = rss[:, :, None]
            in_g_b = (X & gbs) != 0
            in_rest_b = (X & rss) == rss
            only_rest_b = in_rest_b & ~in_g_b  # the sets that must hold what this replica leaves to the later ones
            only_g_b = in_g_b & ~in_rest_b  # the sets that must hold what this replica takes
        act = n_dec > k
        q = order[:, k]
        e = q // Rm
        w = W_rem[rows, e]
        only_rest = only_rest_b[:, k % block]
        only_g = only_g_b[:, k % block]
        lo_min = xp.amin(xp.where(only_rest, slack, 1 << 62), 1)
        hi_min = xp.amin(xp.where(only_g, slack, 1 << 62), 1)
        lo = xp.where(w - lo_min > 0, w - lo_min, 0)
        hi = xp.where(hi_min < w, hi_min, w)
        # an even share of what is left, clipped into the feasible interval
        n_left = n_left_b[:, k % block]
        pref = (w + n_left - 1) // n_left
        x = xp.where(pref < lo, lo, xp.where(pref > hi, hi, pref))
        x = xp.where(act, x, 0)
        w_new = w - x
        # W(X) gains the expert's w on the sets that hold its whole GPU set (g and the rest), loses what the
        # rest still carries (w_new) on the sets holding the rest, and x on those holding g: on the sets with
        # both that is w - w_new - x = 0, so only the sets with one side change (x = 0 on inactive layers)
        slack = slack - (only_rest * xp.where(act, w_new, 0)[:, None] + only_g * x[:, None])
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
