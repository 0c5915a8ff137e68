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
"""
from __future__ import annotations

import numpy as np

from moeless.planner import Plan, plan_layers
from moeless.policy import _kernels
from moeless.policy.base import LayerContext, Policy

__all__ = ["MoelessPolicy"]


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
        self.profile = cost.profile(self.G).as_array()
        self.free_moves = bool(free_moves)
        self.copy_host = 0.0 if free_moves else float(cost.cold_start_s(from_peer=False))
        self.copy_peer = 0.0 if free_moves else float(cost.cold_start_s(from_peer=True))
        self.max_moves = int(max_moves) if max_moves is not None else 2 * (self.E + self.G * self.S) + 16
        home = np.zeros((self.E, self.G), dtype=np.bool_)
        home[np.arange(self.E), self.home_gpu] = True
        self.home = home
        self.homes_per_gpu = home.sum(0)
        self._home_row = self.homes.phy2log[0]
        self._home_layer = self.homes[0]

    # -- the serve-time split ------------------------------------------------------------------------------
    def split(self, layer: int, plan: Plan, counts) -> tuple[np.ndarray, float]:
        """Time-aware split of the true counts [E] over the one-layer plan: (replica_tokens int64 [E, R],
        predicted layer seconds). Lossless: each expert's pairs go to its own replicas only."""
        c = self.check_counts(counts)
        d = self.dense(plan)
        n = np.zeros((self.E, self.G))
        t = _kernels.time_split(c.astype(np.float64), d.has, d.primary, self.profile, self.max_moves, n)
        return d.replica_tokens(n), float(t)

    def layer_time(self, plan: Plan, loads) -> float:
        """Predicted layer seconds of `plan` for `loads` [E] under the time-aware split."""
        d = self.dense(plan)
        n = np.zeros((self.E, self.G))
        return float(_kernels.time_split(np.asarray(loads, dtype=np.float64), d.has, d.primary, self.profile,
                                         self.max_moves, n))

    # -- the decision --------------------------------------------------------------------------------------
    def decide(self, ctx: LayerContext) -> Plan | None:
        W = np.rint(np.clip(np.asarray(ctx.loads, dtype=np.float64), 0.0, None))
        if W.sum() <= 0:
            return None
        no_pin = np.zeros(len(ctx.live), dtype=np.bool_)
        pinned = no_pin if ctx.pinned is None or self.free_moves else np.asarray(ctx.pinned, dtype=np.bool_)
        horizon = max(float(ctx.horizon), 1e-9)
        code, inst, _ = self._decide(W, ctx, pinned, horizon)
        point = ctx.current if code == 1 else self._home_layer if code == 2 else self._plan_of(inst)
        if ctx.refresh and ctx.scenarios is not None and len(ctx.scenarios):
            point = self._robust(W, ctx, pinned, horizon, point)
        if self._same_instances(point, ctx.current):
            return None
        return point

    def _robust(self, W, ctx, pinned, horizon, point: Plan) -> Plan:
        """The decision well ahead: candidates (the current plan, the homes alone, the point decision, and the
        hedged plans: homes, plus the pinned instances or not, plus ring hedges in every free slot) priced by
        their mean time over the load scenarios (the layer's recent true loads and the prediction), plus each
        new instance's copy seconds over its expected warm life; the cheapest wins (ties: the earlier)."""
        E, G, S = self.E, self.G, self.S
        scen = np.vstack([np.asarray(ctx.scenarios, dtype=np.float64), W[None]])
        live = np.asarray(ctx.live, dtype=np.int64)
        occ = live >= 0
        live_has = np.zeros((E, G), dtype=np.bool_)
        live_has[live[occ], np.flatnonzero(occ) // S] = True
        cands = [self.dense(ctx.current).has, self.home, self.dense(point).has]
        for keep_pinned in (True, False):
            keep = self.home.copy()
            if keep_pinned:
                keep[live[occ & pinned], np.flatnonzero(occ & pinned) // S] = True
            room = (S - keep.sum(0)).astype(np.int64)
            hedged = np.zeros((E, G), dtype=np.bool_)
            _kernels.hedge_fill(keep, room, W, S, hedged)
            cands.append(hedged)
        src = self._copy_seconds(live, np.asarray(ctx.loaded, dtype=np.bool_), max(1, int(ctx.link_group)))
        best, best_cost = 0, np.inf
        prim = np.zeros(E, dtype=np.int64)
        seen = set()
        for i, has in enumerate(cands):
            key = has.tobytes()
            if key in seen:  # the same instances as an earlier candidate: the earlier wins a tie anyway
                continue
            seen.add(key)
            _kernels.primary_of(has, self.home_gpu, prim)
            cost = _kernels.mean_time(scen, has, prim, self.profile, self.max_moves)
            cost += float(src[has & ~live_has].sum()) / horizon
            if cost < best_cost * (1 - 1e-12):
                best, best_cost = i, cost
        if best == 0:
            return ctx.current
        if best == 1:
            return self._home_layer
        if best == 2:
            return point
        return self._plan_of(cands[best])

    def _copy_seconds(self, live, loaded, link_group: int) -> np.ndarray:
        """[E, G] seconds of the copy a new instance of e on GPU g needs: from a peer GPU of g's link group that
        holds a loaded instance of e, else from the host."""
        src = np.full((self.E, self.G), self.copy_host)
        if link_group > 1 and self.copy_peer < self.copy_host:
            ok = (live >= 0) & loaded
            holder = np.zeros((self.E, -(-self.G // link_group)), dtype=bool)
            holder[live[ok], (np.flatnonzero(ok) // self.S) // link_group] = True
            src = np.where(holder[:, np.arange(self.G) // link_group], self.copy_peer, src)
        return src

    def _decide(self, W, ctx, pinned, horizon):
        inst = np.zeros((self.E, self.G), dtype=np.bool_)
        out = np.zeros(2)
        code = _kernels.decide_layer(
            W, np.asarray(ctx.live, dtype=np.int64), np.asarray(ctx.loaded, dtype=np.bool_), pinned, self.S,
            self.dense(ctx.current).has, self.home, self.home_gpu, self.profile, self.max_moves, self.copy_host,
            self.copy_peer, max(1, int(ctx.link_group)), np.asarray(ctx.link_wait, dtype=np.float64).copy(),
            float(ctx.lookahead), horizon, inst, out)
        return code, inst, out

    def _plan_of(self, inst: np.ndarray) -> Plan:
        """One-layer plan of the instance set inst bool [E, G]: homes in their slots, replicas in the next free
        slots of their GPU (the engine aligns slots to the pool's live instances)."""
        p2l = self._home_row.copy()
        extra = inst & ~self.home
        g_idx, e_idx = np.nonzero(extra.T)  # GPU-major order
        if e_idx.size:
            free = p2l.reshape(self.G, self.S) < 0
            rank = np.arange(g_idx.size) - np.searchsorted(g_idx, g_idx)  # the k-th replica on its GPU
            slot_of = np.argsort(~free, axis=1, kind="stable")  # free slots of each GPU first
            p2l[g_idx * self.S + slot_of[g_idx, rank]] = e_idx
        return Plan.from_phy2log(p2l[None], self.E, self.G, self.S)

    def _same_instances(self, a: Plan, b: Plan) -> bool:
        return bool(np.array_equal(self.dense(a).has, self.dense(b).has))

    # -- serverful use (engine plug-ins) -------------------------------------------------------------------
    def rebalance(self, history, *, previous: Plan | None = None, half_life: float | None = None) -> Plan:
        """A plan of all layers for the next window of a serverful engine (every slot filled, as the engines
        expect) from per-iteration loads `history` float [T, L, E] (oldest first): an exponentially weighted
        forecast of the loads (half-life `half_life` iterations, default T / 4), then the planner's hedged
        placement, keeping `previous`'s instances where the balance allows."""
        h = np.asarray(history, dtype=np.float64)
        if h.ndim != 3 or h.shape[1:] != (self.L, self.E):
            raise ValueError(f"history must have shape [T, L={self.L}, E={self.E}], got {list(h.shape)}")
        if h.shape[0] == 0 or not np.isfinite(h).all() or (h < 0).any():
            raise ValueError("history must hold at least one iteration of finite non-negative loads")
        T = h.shape[0]
        hl = max(1.0, T / 4.0) if half_life is None else float(half_life)
        w = 0.5 ** ((T - 1 - np.arange(T)) / hl)
        forecast = np.tensordot(w / w.sum(), h, axes=1)
        return plan_layers(forecast, self.G, self.S, previous=previous, hedge=True)
