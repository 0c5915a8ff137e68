"""moeless's policy: time-aware serverless replicas on top of resident home instances.

Every expert keeps one *home* instance where expert parallelism (Megatron-LM) puts it: resident, never copied,
so every layer can always fall back to plain EP. The spare slots of each GPU hold *replicas*: serverless
instances created when they pay, kept warm while they serve, idle (keep-alive) when they do not, released by
the pool. Per layer, d layers ahead (`decide`):

1. the predicted pairs are split over the instances the layer can use for free (homes, and every live replica:
   warm, idle or still loading) by the time-aware split (`split`): each expert whole on one instance where a
   weight read dominates (decode), spread where compute does (prefill), whichever the cost model prices faster;
2. a local search moves pairs off the busiest GPU: onto a live instance when that lowers the layer time, onto a
   new instance (a cold start) only when the layer time it saves over the instance's expected warm life
   (`LayerContext.horizon`, measured online) exceeds the stall its copy adds beyond what the look-ahead hides
   (the copy queues on the receiving GPU's host link, or its peer link when a GPU of its link group holds a
   loaded instance);
3. the plan is the homes plus the instances that carry predicted pairs; it is kept only if its predicted time
   (the same split on the same loads) is at most that of the current plan and of plain EP (do no harm);
   otherwise the better of those two is kept.

Stable popularity gives the same plan again (the live instances are free, new ones must pay): no churn. With
`free_moves` copies cost nothing (the bound of the lossless family when fed the true loads).

For a serverful engine (SGLang's and vLLM's EPLB, through moeless.integrations), `rebalance_plan` is the
decision: a forecast of the next window's loads from the per-pass history (the history predictor's rule), the
planner's hedged placement with every slot filled, and a layer keeps its live placement unless the new one is
predicted strictly better (every changed slot is a weight transfer in the engine).
"""
from __future__ import annotations

import numpy as np

from moeless.planner import Plan, gpu_loads, plan_layers, serve_time_split
from moeless.planner.plan import _positive_int
from moeless.policy import _kernels
from moeless.policy.base import _F64, _I64, LayerContext, Policy

__all__ = ["HALF_LIFE_FRACTION", "MoelessPolicy", "forecast_loads", "rebalance_plan"]

# the robust step prices its candidates' cuts over warm lives within this factor of the given ones (either way),
# so its pick, and the decision's life_range, hold at most that far (a layer's robust decision is asked again at
# most every 16-fold change of a warm life); wider prices more before a cut (measured: within 4% of the robust
# step's time from a factor of 2 to no bound, at Mixtral's and DeepSeek-V3's prefill)
_LIFE_BOX = 16.0


def _horizons(horizon, hedge_horizon) -> tuple[float, float]:
    """(horizon, hedge_horizon) as the compiled loops take them: at least 1e-9 iterations (they divide by them),
    hedge_horizon None meaning the same as horizon."""
    h = max(float(horizon), 1e-9)
    return h, h if hedge_horizon is None else max(float(hedge_horizon), 1e-9)


class MoelessPolicy(Policy):
    """The time-aware serverless policy (module docstring). cost: a moeless.costmodel model (RooflineCost or
    PaperLinearCost); free_moves: copies cost nothing; max_moves: cap of the local search per layer."""

    name = "moeless"
    serverless = True

    def __init__(self, num_layers: int, num_experts: int, gpus: int, slots_per_gpu: int, cost, *,
                 free_moves: bool = False, max_moves: int | None = None, name: str = "moeless"):
        super().__init__(num_layers, num_experts, gpus, slots_per_gpu)
        if not hasattr(cost, "profile"):
            raise ValueError(f"cost must be a moeless.costmodel model (RooflineCost or PaperLinearCost), got "
                             f"{type(cost).__name__}")
        self.name = name
        self.cost = cost
        prof = cost.profile(self.G)
        self.profile = prof.as_array()
        self.free_moves = bool(free_moves)
        self.copy_host = 0.0 if free_moves else float(cost.cold_start_s(from_peer=False))
        self.copy_peer = 0.0 if free_moves else float(cost.cold_start_s(from_peer=True))
        self.max_moves = int(max_moves) if max_moves is not None else 2 * (self.E + self.G * self.S) + 16
        # pairs at which an instance's compute time reaches its weight read (the roofline's ridge)
        self.ridge = prof.read_s / (prof.flop_s - prof.act_s) if prof.flop_s > prof.act_s else 0.0
        home = np.zeros((self.E, self.G), dtype=np.bool_)
        home[np.arange(self.E), self.home_gpu] = True
        self.home = home
        self.homes_per_gpu = home.sum(0)
        self._home_row = self.homes.phy2log[0]
        self._home_layer = self.homes[0]
        # decide_live's working arrays W, loaded, link_wait, pinned and the chosen instances: read within the call
        # only (a policy object decides for one engine, one layer at a time)
        P = self.G * self.S
        self._scratch = (np.empty(self.E), np.empty(P, dtype=np.bool_), np.empty(self.G), np.empty(P, dtype=np.bool_),
                         np.empty((self.E, self.G), dtype=np.bool_))
        # the inverse warm lives (1 / horizon, 1 / hedge_horizon: [lo, hi] each) within which the decision's
        # comparisons keep their outcomes: narrowed by the compiled loops, read into life_range
        self._rng = np.empty(4)
        self.life_range = np.array([0.0, np.inf, 0.0, np.inf])

    # -- the serve-time split ------------------------------------------------------------------------------
    def split(self, layer: int, plan: Plan, counts) -> tuple[np.ndarray, float]:
        """Time-aware split of the true counts [E] over the one-layer plan: (replica_tokens int64 [E, R],
        predicted layer seconds). Lossless: each expert's pairs go to its own replicas only."""
        c = self.check_counts(counts)
        d = self.dense(plan)
        n = np.empty((self.E, self.G))  # (written and read on the plan's instances only)
        t = _kernels.time_split_on(c.astype(np.float64), d.has, *d.lists, d.primary, self.profile, self.max_moves, n)
        return d.replica_tokens(n), float(t)

    def layer_time(self, plan: Plan, loads) -> float:
        """Predicted layer seconds of `plan` for `loads` [E] under the time-aware split."""
        d = self.dense(plan)
        n = np.zeros((self.E, self.G))
        return float(_kernels.time_split(np.asarray(loads, dtype=np.float64), d.has, d.primary, self.profile,
                                         self.max_moves, n))

    # -- the decision --------------------------------------------------------------------------------------
    def decide(self, ctx: LayerContext) -> Plan | None:
        loads = np.asarray(ctx.loads, dtype=np.float64)
        if loads.shape != (self.E,):
            raise ValueError(f"ctx.loads must have shape [E={self.E}], got {loads.shape}")
        W = np.empty(self.E)
        total, w_max = _kernels.round_loads(loads, W)
        rng = self._open_range()
        if not total > 0:
            self._close_range()
            return None
        live = np.asarray(ctx.live, dtype=np.int64)
        loaded = np.asarray(ctx.loaded, dtype=np.bool_)
        link_wait = np.asarray(ctx.link_wait, dtype=np.float64)
        if ctx.pinned is None or self.free_moves:
            pinned = np.zeros(len(live), dtype=np.bool_)
        else:
            pinned = np.asarray(ctx.pinned, dtype=np.bool_)
        # (the compiled loops index these without bounds checks: a malformed context must not reach them; the
        # current plan is checked by self.dense)
        if not (live.ndim == loaded.ndim == pinned.ndim == link_wait.ndim == 1) or \
                not _kernels.context_ok(live, loaded, pinned, link_wait, self.E, self.G, self.S):
            raise ValueError(f"ctx.live, ctx.loaded and ctx.pinned must have shape [G*S={self.G * self.S}] (live: "
                             f"experts in [-1, {self.E})) and ctx.link_wait [G={self.G}]")
        horizon, hedge_horizon = _horizons(ctx.horizon, ctx.hedge_horizon)
        self.hedged = False
        cur = self.dense(ctx.current)
        inst = np.zeros((self.E, self.G), dtype=np.bool_)
        code = _kernels.decide_layer(
            W, live, loaded, pinned, self.S, cur.has, cur.count, self.home, self.home_gpu, self.profile,
            self.max_moves, self.copy_host, self.copy_peer, max(1, int(ctx.link_group)), link_wait,
            float(ctx.lookahead), horizon, inst, rng)
        return self._conclude(code, inst, W, w_max, ctx.current, ctx.refresh, ctx.scenarios, ctx.link_group, live,
                              loaded, pinned, horizon, hedge_horizon)

    def decide_live(self, layer: int, loads, current: Plan, live, ready, model_t: float, link_free, last_use,
                    since: float, *, lookahead: float, horizon: float, link_group: int = 1, tokens: float = 0.0,
                    refresh: bool = False, scenarios=None, hedge_horizon: float | None = None) -> Plan | None:
        """`decide` for the context that the engine's live state describes (see Policy.decide_live), in one
        compiled call (_kernels.decide_live): the same plan as decide(LayerContext(...)), without the Python
        around the context (the engine decides every layer twice per iteration; that Python cost more than the
        decision itself at Mixtral's size)."""
        try:
            one_dim = loads.ndim == live.ndim == ready.ndim == link_free.ndim == last_use.ndim == 1
        except AttributeError:
            one_dim = False
        if not one_dim:
            raise ValueError("loads, live, ready, link_free and last_use must be one-dimensional numpy arrays")
        self.hedged = False
        cur = self.dense(current)
        if live.dtype != _I64:
            live = live.astype(np.int64)
        if loads.dtype != _F64:
            loads = loads.astype(np.float64)
        W, loaded, link_wait, pinned, inst = self._scratch  # (inst: cleared by the kernel)
        rng = self._open_range()
        code, w_max = _kernels.decide_live(
            loads, live, ready, float(model_t), link_free, last_use, float(since), not self.free_moves, self.S,
            cur.has, cur.count, self.home, self.home_gpu, self.profile, self.max_moves, self.copy_host,
            self.copy_peer, int(link_group), float(lookahead), float(horizon), W, loaded, link_wait, pinned, inst,
            rng)
        if code == -1 or (code == 1 and not refresh):  # (no pair; or the current plan's instances again)
            self._close_range()
            return None
        if code == -2:
            raise ValueError(f"loads must have shape [E={self.E}], live, ready and last_use [G*S={self.G * self.S}] "
                             f"(live: experts in [-1, {self.E})) and link_free [G={self.G}]")
        return self._conclude(code, inst, W, w_max, current, refresh, scenarios, max(1, int(link_group)),
                              live, loaded, pinned, *_horizons(horizon, hedge_horizon))

    def _conclude(self, code, inst, W, w_max, current, refresh, scenarios, link_group, live, loaded, pinned,
                  horizon, hedge_horizon) -> Plan | None:
        """The plan of the compiled decision's outcome (code, inst), weighed against the robust alternatives where
        `refresh` asks for it; None when it holds the current plan's instances."""
        robust = refresh and scenarios is not None and len(scenarios) \
            and max(w_max, float(np.max(scenarios))) > self.ridge
        if code == 1 and not robust:  # (the kernel found the current plan's instances again)
            self._close_range()
            return None
        point = current if code == 1 else self._home_layer if code == 2 else self._plan_of(inst)
        if robust:
            # (where no expert's load reaches the roofline's ridge a replica cannot shorten anything: every
            # instance reads its weights whatever its pairs, so the robust alternatives are not weighed)
            point = self._robust(W, scenarios, current, link_group, live, loaded, pinned, horizon, hedge_horizon,
                                 point)
        self._close_range()
        if self._same_instances(point, current):
            return None
        return point

    def _open_range(self) -> np.ndarray:
        """The decision's interval of inverse warm lives, before the compiled loops narrow it: all of them."""
        rng = self._rng
        rng[0] = rng[2] = 0.0
        rng[1] = rng[3] = np.inf
        return rng

    def _close_range(self) -> None:
        """life_range (see Policy.life_range) from the narrowed inverse lives."""
        lo_x, hi_x, lo_y, hi_y = self._rng.tolist()
        self.life_range = np.array([1.0 / hi_x if hi_x > 0 else np.inf, 1.0 / lo_x if lo_x > 0 else np.inf,
                                    1.0 / hi_y if hi_y > 0 else np.inf, 1.0 / lo_y if lo_y > 0 else np.inf])

    def _robust(self, W, scenarios, current: Plan, link_group: int, live, loaded, pinned, horizon, hedge_horizon,
                point: Plan) -> Plan:
        """The decision well ahead: candidates (the current plan, the homes alone, the point decision, and the
        hedged plans: homes, plus the pinned instances or not, plus ring hedges in every free slot; and the fill
        of the heaviest scenario over every spare slot, pinned ones included: the layout for the layer's spikes,
        a prefill chunk among decode steps) priced by their mean time over the load scenarios (the layer's
        recent true loads and the prediction), plus each new instance's copy seconds over its expected warm
        life (`horizon` for the point decision's instances, `hedge_horizon` for the hedged and fill layouts': the
        two kinds live differently long, and the engine measures each); the cheapest wins (ties: the earlier).
        Sets `hedged` when a hedged or fill layout wins.

        The candidates are first priced by an estimate (each scenario split by its faster seed's search alone,
        never below the full split, at about half its cost); a winner other than the current plan is then
        priced exactly (time_split on every scenario), with the current plan and the homes, and kept only if it
        is still strictly the cheapest of the three (do no harm, as the point decision). The pricing is one
        compiled call (_kernels.robust_pick) on the candidates stacked in that order."""
        E, G, S = self.E, self.G, self.S
        given = np.asarray(scenarios, dtype=np.float64)
        given = given[None] if given.ndim == 1 else given
        if given.ndim != 2 or given.shape[1] != E:
            raise ValueError(f"scenarios must have shape [K, E={E}], got {np.shape(scenarios)}")
        scen = np.vstack([given, W[None]])
        cands = np.zeros((6, E, G), dtype=np.bool_)
        cands[0] = self.dense(current).has
        cands[1] = self.home
        cands[2] = self.dense(point).has
        _kernels.hedged_candidates(live, pinned, S, self.home, W, cands[3], cands[4])
        # the copies a candidate needs: its instances that are not live, each from a peer GPU of its link group
        # holding a loaded instance, else from the host
        group = max(1, int(link_group))
        peer = group > 1 and self.copy_peer < self.copy_host
        live_has = np.zeros((E, G), dtype=np.bool_)
        holder = np.zeros((E, -(-G // group) if peer else 1), dtype=np.bool_)
        _kernels.live_instances(live, loaded, S, group, peer, live_has, holder)
        # the fill candidate (_kernels.fill_replicas) of the heaviest scenario: the layout for the layer's spikes
        # (a prefill chunk) over every spare slot, pinned instances included (what dropping them loses is
        # priced over the scenarios), live instances preferred to copies
        # (the inverse lives' box: the cuts of robust_pick's pricing hold over it)
        rng = self._rng
        rng[0], rng[1] = max(rng[0], 1.0 / (_LIFE_BOX * horizon)), min(rng[1], _LIFE_BOX / horizon)
        rng[2], rng[3] = max(rng[2], 1.0 / (_LIFE_BOX * hedge_horizon)), min(rng[3], _LIFE_BOX / hedge_horizon)
        _kernels.fill_replicas(scen[int(np.argmax(scen.sum(1)))], self.home, live_has, S, self.profile,
                               self.copy_host, self.copy_peer, holder, group, hedge_horizon, cands[5], rng)
        best = _kernels.robust_pick(scen, cands, live_has, holder, group, peer, self.copy_host, self.copy_peer,
                                    horizon, hedge_horizon, self.home_gpu, self.profile, self.max_moves, rng)
        if best == 0:
            return current
        if best == 1:
            return self._home_layer
        if best == 2:
            return point
        self.hedged = True
        return self._plan_of(cands[best])

    def _plan_of(self, inst: np.ndarray) -> Plan:
        """One-layer plan of the instance set inst bool [E, G]: homes in their slots, replicas in the next free
        slots of their GPU (the engine aligns slots to the pool's live instances)."""
        p2l = self._home_row.copy()
        if not _kernels.place_replicas(inst, self.home, self.S, p2l):
            raise RuntimeError("a decision chose more instances on a GPU than it has slots")
        return Plan._derived(p2l[None], self.E, self.G, self.S)

    def _same_instances(self, a: Plan, b: Plan) -> bool:
        return bool(_kernels.same_instances(self.dense(a).has, self.dense(b).has))

    # -- serverful use (engine plug-ins) -------------------------------------------------------------------
    def rebalance(self, history, *, previous: Plan | None = None) -> Plan:
        """A plan of all layers for the next window of a serverful engine (every slot filled, as the engines
        expect) from per-iteration loads `history` float [T, L, E] (oldest first): `rebalance_plan`."""
        h = _check_history(history)
        if h.shape[1:] != (self.L, self.E):
            raise ValueError(f"history must have shape [T, L={self.L}, E={self.E}], got {list(h.shape)}")
        prev = None if previous is None else previous.phy2log
        return rebalance_plan(h, self.G * self.S, self.G, previous_phy2log=prev)


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


def _previous_plan(previous_phy2log, L: int, E: int, gpus: int, slots_per_gpu: int) -> Plan | None:
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
    return Plan.from_phy2log(prev, E, gpus, slots_per_gpu)


def rebalance_plan(history, num_physical: int, gpus: int, *, previous_phy2log=None) -> Plan:
    """moeless's plan for the next interval from the per-pass counts `history` [T, L, E] (see the module
    docstring). `previous_phy2log` [L, num_physical] (the live placement) lets instances stay in their slots;
    a map of another shape is ignored. Deterministic: the same input gives the same plan on every rank."""
    h = _check_history(history)
    num_physical = _positive_int("num_physical", num_physical)
    gpus = _positive_int("gpus", gpus)
    T, L, E = h.shape
    if num_physical % gpus:
        raise ValueError(f"num_physical={num_physical} must be a multiple of gpus={gpus} (equal slots per GPU)")
    if E > num_physical:
        raise ValueError(f"num_physical={num_physical} slots cannot hold the {E} experts of the history once each")
    slots = num_physical // gpus
    loads = forecast_loads(h)
    previous = _previous_plan(previous_phy2log, L, E, gpus, slots)
    plan = plan_layers(loads, gpus, slots, previous=previous)
    if (plan.phy2log < 0).any():  # the hedged plan fills every slot; an engine cannot run with an empty one
        raise RuntimeError("moeless's planner left a slot empty; the engines need every slot filled")
    return plan if previous is None else _keep_unless_better(plan, previous, loads)


def _busiest_gpu(plan: Plan, counts: np.ndarray) -> np.ndarray:
    """[L] the busiest GPU's pairs under the serve-time split of `counts` (the planner's objective)."""
    return gpu_loads(plan, serve_time_split(plan, counts)).max(1)


def _keep_unless_better(plan: Plan, previous: Plan, loads: np.ndarray) -> Plan:
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
    return Plan.from_phy2log(p2l, plan.num_experts, plan.gpus, plan.slots_per_gpu)


