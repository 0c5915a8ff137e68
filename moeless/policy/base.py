"""The policy interface: what every control-plane policy answers, layer by layer, and the pieces they share.

A policy decides, for one MoE layer at a time, which instances the layer runs with (a one-layer `Plan`) and how
the layer's true pairs are split over them. The engine (moeless.engine) calls it the same way from the real
serving loop (moeless.serve), the simulator (moeless.sim) and the engine plug-ins (moeless.integrations):

    policy.initial_plan()              -> Plan of all layers, realised before the first batch
    policy.decide(ctx: LayerContext)   -> one-layer Plan for ctx.layer, or None to keep the current one
    policy.decide_live(layer, ...)     -> the same, from the engine's live state (what the engine calls; the
                                          default builds the LayerContext and calls decide)
    policy.split(layer, plan, counts)  -> (replica_tokens int64 [E, R], predicted layer seconds)
    policy.end_iteration(loads, now, w) -> Plan of all layers to switch to (serverful rebalancing), or None
    policy.rebalance(history)          -> Plan of all layers from a window of per-iteration loads [T, L, E]

What it must never do: change routing (a split only chooses which replica of the router's expert serves a
pair), read a clock (time comes in the context), copy weights or touch the pool (the engine realises plans).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeless.baselines import static_plan
from moeless.planner import Plan
from moeless.planner.plan import _positive_int
from moeless.policy import _kernels

__all__ = ["DenseLayout", "LayerContext", "Policy", "check_count_values", "home_plan", "price_dense"]


def home_plan(num_layers: int, num_experts: int, gpus: int, slots_per_gpu: int) -> Plan:
    """Megatron-LM's expert parallelism as a plan (`moeless.baselines.static_plan`: experts in contiguous blocks of
    E / G per GPU); round-robin over GPUs when E is not a multiple of G. Every layer alike."""
    L = _positive_int("num_layers", num_layers)
    E = _positive_int("num_experts", num_experts)
    G = _positive_int("gpus", gpus)
    S = _positive_int("slots_per_gpu", slots_per_gpu)
    per = -(-E // G)
    if per > S:
        raise ValueError(f"slots_per_gpu={S} cannot hold the {per} experts per GPU of expert parallelism "
                         f"({E} experts on {G} GPUs)")
    if E % G == 0:
        return static_plan(L, E, G, S)
    e = np.arange(E)
    p2l = np.full(G * S, -1, dtype=np.int64)
    p2l[(e % G) * S + e // G] = e
    return Plan.from_phy2log(np.tile(p2l, (L, 1)), E, G, S)


@dataclass(slots=True)
class LayerContext:
    """What the control plane knows when it decides layer `layer` (d layers ahead of the one running).

    loads float [E]: predicted pairs of the layer; tokens: tokens of the iteration; current: the one-layer plan
    the layer runs now; live int [G*S]: the expert of each slot's live instance (warm, loading or idle; -1
    free) and loaded bool [G*S]: whose weights are in (a copy source for peers); link_wait float [G]: seconds
    until each GPU's copy links are free; lookahead: seconds until the layer runs (what a copy issued now can
    hide); horizon: iterations a new instance is expected to serve (hedge_horizon: one the robust step's hedged
    or fill layouts make; None: horizon); link_group: GPUs per peer-link group;
    pinned bool [G*S] (or None): the live instances the plan keeps whatever their predicted pairs (served
    pairs within their keep-alive: hedges the split can use for free; their slots are not taken); refresh:
    the policy may weigh robust alternatives (a decision well ahead), against `scenarios` float [K, E]: loads
    the layer may see (its recent true loads). Treat it as read-only (a plain slotted class, not a frozen one:
    the engine builds one per decision, and a frozen dataclass costs microseconds to build)."""

    layer: int
    loads: np.ndarray
    tokens: float
    current: Plan
    live: np.ndarray
    loaded: np.ndarray
    link_wait: np.ndarray
    lookahead: float
    horizon: float
    link_group: int = 1
    pinned: np.ndarray | None = None
    refresh: bool = False
    scenarios: np.ndarray | None = None
    hedge_horizon: float | None = None


class DenseLayout:
    """One layer's plan as dense arrays for the compiled loops: has bool [E, G] (an instance of e on GPU g),
    primary int [E] (the GPU that serves an expert whole first: its home when the plan holds it, else its
    first replica's), and the map back to the plan's replicas (first replica of e on each GPU takes that GPU's
    pairs; later duplicates 0). `lists`: the compiled loops' instance lists of `has` (built once per plan), and
    `count` its instances."""

    __slots__ = ("has", "primary", "rg", "first", "valid", "E", "G", "_lists", "_count")

    def __init__(self, plan: Plan, home_gpu: np.ndarray | None = None):
        E, G, S = plan.num_experts, plan.gpus, plan.slots_per_gpu
        l2p = plan.log2phy[0]
        R = l2p.shape[1]
        has = np.zeros((E, G), dtype=np.bool_)
        primary = np.empty(E, dtype=np.int64)
        rg = np.empty((E, R), dtype=np.int64)
        first = np.empty((E, R), dtype=np.bool_)
        valid = np.empty((E, R), dtype=np.bool_)
        _kernels.dense_layout(l2p, S, _NO_HOME if home_gpu is None else home_gpu, home_gpu is not None, has, primary,
                              rg, first, valid)
        self.has, self.primary, self.rg, self.first, self.valid, self.E, self.G = has, primary, rg, first, valid, E, G
        self._lists = None
        self._count = -1

    @property
    def lists(self) -> tuple:
        """(ig, cnt, gl, gcnt) of `has` (moeless.policy._kernels' per-expert and per-GPU instance lists)."""
        if self._lists is None:
            self._lists = _kernels.instance_lists(self.has)
        return self._lists

    @property
    def count(self) -> int:
        """The plan's instances (entries of `has`)."""
        if self._count < 0:
            self._count = int(self.lists[1].sum())
        return self._count

    def replica_tokens(self, n: np.ndarray) -> np.ndarray:
        """Dense pairs n [E, G] -> replica_tokens int64 [E, R] (n is read on the instances only)."""
        out = np.empty(self.rg.shape, dtype=np.int64)
        _kernels.replica_tokens(n, self.rg, self.first, out)
        return out


# the dtypes of counts and loads that the compiled loops read as they are (count_status scans them; other
# dtypes are converted or checked by numpy)
_I64, _F64 = np.dtype(np.int64), np.dtype(np.float64)
_SCANNED = (_I64, _F64)
_NO_HOME = np.zeros(0, dtype=np.int64)


def check_count_values(c: np.ndarray, name: str, integral: bool) -> None:
    """ValueError naming `name` unless the array c holds finite non-negative numbers (whole ones if `integral`).
    The engine's and the policies' checks of every call's counts: one compiled pass for int64 and float64."""
    if c.dtype in _SCANNED:
        status = _kernels.count_status(c if c.ndim == 1 else c.reshape(-1), integral)
    elif not np.issubdtype(c.dtype, np.number) or np.iscomplexobj(c) or not np.all(np.isfinite(c)) \
            or (c < 0).any():
        status = 1
    else:
        status = 2 if integral and c.dtype.kind not in "iu" and (c != np.round(c)).any() else 0
    raise_count_status(status, name)


def raise_count_status(status: int, name: str) -> None:
    """The ValueError naming `name` for a count_status of 1 (a negative or non-finite entry) or 2 (a fractional
    one where whole counts are required); nothing for 0."""
    if status == 1:
        raise ValueError(f"{name} must be finite non-negative counts")
    if status == 2:
        raise ValueError(f"{name} must hold integer counts")


def price_dense(n: np.ndarray, profile: np.ndarray) -> float:
    """Predicted layer seconds (expert time + 2 x all-to-all) of a dense split n [E, G]."""
    return float(_kernels.dense_times(n, profile, float(n.sum())))


class Policy:
    """Base class. `name`, `serverless` (instances come and go and are billed while live, instead of staying
    resident) and the six methods of the module docstring; the defaults keep the initial plan forever."""

    name = "policy"
    serverless = False
    # whether the plan the last decide / decide_live returned is a hedge (a layout for several load scenarios:
    # MoelessPolicy's robust step) rather than a point decision: the engine tracks the two kinds' warm lives apart
    hedged = False
    # the warm lives (point lo, hi, hedge lo, hi: iterations; LayerContext.horizon and hedge_horizon) for which
    # the last decide / decide_live would return the same plan: its comparisons keep their outcomes strictly
    # inside them (MoelessPolicy's are exact up to a margin of 1e-9 for float rounding). None: not known; the
    # engine then treats lives within Engine.STEADY_TOL of the decision's as unchanged (see Engine's steady)
    life_range: np.ndarray | None = None

    def __init__(self, num_layers: int, num_experts: int, gpus: int, slots_per_gpu: int):
        self.L = _positive_int("num_layers", num_layers)
        self.E = _positive_int("num_experts", num_experts)
        self.G = _positive_int("gpus", gpus)
        self.S = _positive_int("slots_per_gpu", slots_per_gpu)
        if self.E > self.G * self.S:
            raise ValueError(f"slots_per_gpu={self.S} x gpus={self.G} = {self.G * self.S} slots cannot hold "
                             f"{self.E} experts once each")
        self.homes = home_plan(self.L, self.E, self.G, self.S)
        self.home_gpu = self.homes.log2phy[0, :, 0] // self.S  # [E] every layer alike
        self._dense: dict[int, tuple[Plan, DenseLayout]] = {}

    # -- the interface -------------------------------------------------------------------------------------
    def initial_plan(self) -> Plan:
        return self.homes

    def decide(self, ctx: LayerContext) -> Plan | None:
        return None

    def decide_live(self, layer: int, loads, current: Plan, live, ready, model_t: float, link_free, last_use,
                    since: float, *, lookahead: float, horizon: float, link_group: int = 1, tokens: float = 0.0,
                    refresh: bool = False, scenarios=None, hedge_horizon: float | None = None) -> Plan | None:
        """The engine's entry: `decide` for the context its live state describes. live int [G*S] (each slot's
        live expert, -1 free), ready float [G*S] (model time at which each slot's copy is in), link_free float [G]
        (model time at which each GPU's copy links are free), last_use float [G*S] (when each slot's instance last
        served) and since (the keep-alive's start: an instance used since then is pinned) give the context's
        loaded (ready <= model_t), link_wait (link_free - model_t, at least 0) and pinned; the other arguments
        are the context's fields. This default builds the LayerContext and calls decide; a policy may answer
        without building it (MoelessPolicy does), but must give the same plan."""
        live = np.asarray(live)
        loaded = np.empty(live.shape, dtype=np.bool_)
        pinned = np.empty(live.shape, dtype=np.bool_)
        link_wait = np.empty(np.shape(link_free))
        _kernels.context_arrays(live, np.asarray(ready, dtype=np.float64), float(model_t),
                                np.asarray(link_free, dtype=np.float64), np.asarray(last_use, dtype=np.float64),
                                float(since), loaded, link_wait, pinned)
        return self.decide(LayerContext(
            layer=layer, loads=np.asarray(loads, dtype=np.float64), tokens=tokens, current=current, live=live,
            loaded=loaded, link_wait=link_wait, lookahead=lookahead, horizon=horizon, link_group=link_group,
            pinned=pinned, refresh=refresh, scenarios=scenarios, hedge_horizon=hedge_horizon))

    def split(self, layer: int, plan: Plan, counts: np.ndarray) -> tuple[np.ndarray, float]:
        raise NotImplementedError

    def end_iteration(self, loads: np.ndarray, now: float, weight: float = 1.0) -> Plan | None:
        return None

    def rebalance(self, history) -> Plan:
        return self.initial_plan()

    # -- shared helpers ------------------------------------------------------------------------------------
    def dense(self, plan: Plan) -> DenseLayout:
        """The dense layout of a one-layer plan of this policy's shape (else ValueError), cached per plan object
        (plans are immutable)."""
        hit = self._dense.get(id(plan))
        if hit is not None and hit[0] is plan:
            return hit[1]
        if not isinstance(plan, Plan) or plan.num_layers != 1 or \
                (plan.num_experts, plan.gpus, plan.slots_per_gpu) != (self.E, self.G, self.S):
            raise ValueError(f"the plan must be a one-layer Plan of {self.E} experts on {self.G} GPUs x {self.S} "
                             f"slots (the compiled loops index it without bounds checks)")
        if len(self._dense) > 4 * self.L + 64:
            self._dense.clear()
        d = DenseLayout(plan, self.home_gpu)
        self._dense[id(plan)] = (plan, d)
        return d

    def check_counts(self, counts, name: str = "counts") -> np.ndarray:
        """counts as an array [E] of finite non-negative numbers (not converted); ValueError naming `name`."""
        c = np.asarray(counts)
        if c.shape != (self.E,):
            raise ValueError(f"{name} must have shape [E={self.E}], got {c.shape}")
        check_count_values(c, name, integral=False)
        return c
