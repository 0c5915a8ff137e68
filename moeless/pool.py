"""The serverless function pool: one expert instance per occupied slot, its lifecycle, and the billing meter.

An instance is a copy of one logical expert's weights in one physical slot (layer l, slot p on GPU p // S).
Lifecycle: *cold start* (the weights are copied in: over the GPU's host link at `link_bandwidth`, or, when a
GPU of the same link group already holds a loaded instance of that expert in that layer, from that peer at
`peer_bandwidth`; the copies of one `apply` queue on each GPU's host and peer links) -> *warm* (in the
current plan) -> *idle* (not in the current plan, kept alive until `keep_alive_s` after its last use) ->
*released*. A plan that puts another expert in a slot evicts whatever lives there. `prewarm` starts a cold
start ahead of time (off the critical path).

Warm identity: an instance is (layer, GPU, expert); which slot index of its GPU holds it does not matter to
the data plane. `align(plan)` renumbers a plan's slots inside each GPU so that every instance the pool already
holds (warm or idle) keeps its slot and new instances take free slots first, then the idle slots whose
keep-alive ends soonest; `apply` does not renumber by itself (a caller that fixed its slots keeps them).

The meter charges, between any two instants, every live instance (loading, warm or idle): memory x time in
GB-s (bytes x seconds / 1e9, the paper's Equation 2 style) and GPU-seconds (a GPU is held while it hosts at
least one live instance). Serverful baselines are charged the same way with keep_alive_s = inf: every
resident expert for the whole run.

Clocks: `RealClock` (time.perf_counter) or `SimulatedClock` (`advance(dt)`); every method takes an explicit
`now` or reads the pool's clock. Time never goes backwards (ValueError).

The per-slot passes of `apply`, `copy_sources` and `advance_to` (and `align_slots`, the planner's) are
compiled with numba (moeless._jit): the control plane changes a layer's plan at every scale-out and advances
the pool at every decision, and as numpy passes they cost more than the decision itself at DeepSeek-V3's 512
slots.

What it must never do: import torch or copy weights (the data plane copies; the pool only decides and
accounts), or change a plan.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from moeless._jit import njit
from moeless.planner import Plan, align_slots

__all__ = ["ApplyResult", "FunctionPool", "Meter", "RealClock", "SimulatedClock"]


class RealClock:
    """Seconds since construction, from time.perf_counter."""

    def __init__(self):
        self._t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self._t0


class SimulatedClock:
    """A clock that moves only when told to."""

    def __init__(self, start: float = 0.0):
        if not math.isfinite(start):
            raise ValueError(f"start must be finite, got {start!r}")
        self._t = float(start)

    def now(self) -> float:
        return self._t

    def advance(self, dt: float) -> float:
        if not (math.isfinite(dt) and dt >= 0):
            raise ValueError(f"dt must be a finite number >= 0, got {dt!r}")
        self._t += float(dt)
        return self._t


@dataclass
class Meter:
    """Accumulated charges. gb_seconds: live instances' bytes x time / 1e9; gpu_seconds: time GPUs held."""

    gb_seconds: float = 0.0
    gpu_seconds: float = 0.0
    cold_starts: int = 0
    warm_starts: int = 0
    releases: int = 0
    evictions: int = 0
    bytes_copied: int = 0
    copy_seconds: float = 0.0


@dataclass
class ApplyResult:
    """What realising a plan did. cold / warm: (layer, slot) int64 [n, 2] of the plan's occupied slots that
    cold-started or reused a live instance; evicted: slots whose instance of another expert was dropped;
    ready_in_s [G]: seconds from `now` until each GPU's instances of this plan are all loaded (0 if warm);
    from_peer bool [n]: which cold starts copy from a peer GPU of the link group (the others from the host)."""

    cold: np.ndarray
    warm: np.ndarray
    evicted: np.ndarray
    ready_in_s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    from_peer: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))

    @property
    def stall_s(self) -> float:
        """The critical-path wait for cold starts: the slowest GPU's ready time."""
        return float(self.ready_in_s.max(initial=0.0))


@njit
def _copy_sources(layers, p2l, expert, ready_at, t, S, grp, peer, out):
    """FunctionPool.copy_sources into out int8 (0 on entry): 1 where a slot of p2l [n, G*S] (rows of `layers`)
    needs a copy, 2 where a slot of another GPU of its link group of grp GPUs holds a loaded instance of the
    expert (with `peer`)."""
    n, P = p2l.shape
    for i in range(n):
        row = layers[i]
        for s in range(P):
            e = p2l[i, s]
            if e < 0 or expert[row, s] == e:
                continue
            out[i, s] = 1
            if not peer:
                continue
            g = s // S
            first = (g // grp) * grp
            end = min((first + grp) * S, P)
            for q in range(first * S, end):
                if q // S != g and expert[row, q] == e and ready_at[row, q] <= t:
                    out[i, s] = 2
                    break


@njit
def _queue_copies(gpu, from_peer, t, link_free, peer_free, host_s, peer_s, ready):
    """Ready times of copies onto GPUs gpu [n] (from a peer link where from_peer, else the host link), queued in
    order on each GPU's link: the k-th copy on a link finishes k+1 copy times after the link is free (or at t);
    link_free / peer_free [G] become each link's last finish."""
    G = link_free.shape[0]
    for peer in (False, True):
        free = peer_free if peer else link_free
        copy_s = peer_s if peer else host_s
        start = np.empty(G)
        for g in range(G):
            start[g] = free[g] if free[g] > t else t
        k = np.zeros(G, dtype=np.int64)
        for i in range(gpu.shape[0]):
            if from_peer[i] != peer:
                continue
            g = gpu[i]
            r = start[g] + (k[g] + 1) * copy_s
            k[g] += 1
            ready[i] = r
            if r > free[g]:
                free[g] = r


@njit
def _apply_rows(layers, p2l, expert, ready_at, last_used, in_plan, t, S, grp, peer, link_free, peer_free, host_s,
                peer_s):
    """FunctionPool.apply on the pool's arrays (updated in place) for the rows p2l [n, G*S] of `layers`: the
    instances of the same expert already in a slot are reused (last used now), the others cold-start (their
    copies queued on their GPU's host or peer link, see _copy_sources and _queue_copies; whatever lived there
    is evicted), the instances the plan leaves out become idle now. Returns (cold [c, 2], from_peer [c],
    warm [w, 2], evicted [v, 2], ready_in [G]) as ApplyResult holds them, in slot order."""
    n, P = p2l.shape
    G = link_free.shape[0]
    src = np.zeros((n, P), dtype=np.int8)
    _copy_sources(layers, p2l, expert, ready_at, t, S, grp, peer, src)  # (on the state before this apply)
    nc = 0
    nw = 0
    nv = 0
    for i in range(n):
        for s in range(P):
            if src[i, s] > 0:
                nc += 1
                if expert[layers[i], s] >= 0:
                    nv += 1
            elif p2l[i, s] >= 0:
                nw += 1
    cold = np.empty((nc, 2), dtype=np.int64)
    cold_i = np.empty(nc, dtype=np.int64)  # (its row of p2l)
    from_peer = np.empty(nc, dtype=np.bool_)
    warm = np.empty((nw, 2), dtype=np.int64)
    evicted = np.empty((nv, 2), dtype=np.int64)
    c = 0
    w = 0
    v = 0
    for i in range(n):
        row = layers[i]
        for s in range(P):
            if src[i, s] > 0:
                cold[c, 0] = row
                cold[c, 1] = s
                cold_i[c] = i
                from_peer[c] = src[i, s] == 2
                c += 1
                if expert[row, s] >= 0:
                    evicted[v, 0] = row
                    evicted[v, 1] = s
                    v += 1
            elif p2l[i, s] >= 0:
                warm[w, 0] = row
                warm[w, 1] = s
                w += 1
    gpu = np.empty(nc, dtype=np.int64)
    for k in range(nc):
        gpu[k] = cold[k, 1] // S
    ready = np.empty(nc)
    _queue_copies(gpu, from_peer, t, link_free, peer_free, host_s, peer_s, ready)
    ready_in = np.zeros(G)
    for k in range(nc):
        row, s = cold[k, 0], cold[k, 1]
        expert[row, s] = p2l[cold_i[k], s]
        ready_at[row, s] = ready[k]
        last_used[row, s] = t
        if ready[k] - t > ready_in[gpu[k]]:
            ready_in[gpu[k]] = ready[k] - t
    for k in range(nw):
        row, s = warm[k, 0], warm[k, 1]
        last_used[row, s] = t
        if ready_at[row, s] > t and ready_at[row, s] - t > ready_in[s // S]:
            ready_in[s // S] = ready_at[row, s] - t  # (a prewarm still loading also makes its GPU wait)
    for i in range(n):
        row = layers[i]
        for s in range(P):
            want = p2l[i, s] >= 0
            if in_plan[row, s] and not want:
                last_used[row, s] = t  # leaving the plan: idle from now (keep-alive counts from its last use)
            in_plan[row, s] = want
    return cold, from_peer, warm, evicted, ready_in


@njit
def _advance(expert, in_plan, last_used, keep_alive, t0, t, S):
    """FunctionPool.advance_to's pass from t0 to t > t0 over the slots expert [L, G*S]: every live instance is
    charged from t0 until t, or until its keep-alive deadline (last_used + keep_alive) if it is idle (not
    in_plan) and that comes first; idle instances whose deadline is at most t are released (expert = -1). Returns
    (instance-seconds, GPU-seconds (a GPU is held until its last live instance's end), releases, the earliest
    deadline of the idle instances left (inf if none), live instances left, GPUs holding one)."""
    L, P = expert.shape
    G = P // S
    gpu_end = np.full(G, t0)
    held = np.zeros(G, dtype=np.bool_)
    inst_s = 0.0
    gone = 0
    until = np.inf
    n_live = 0
    for row in range(L):
        for s in range(P):
            if expert[row, s] < 0:
                continue
            end = t
            if not in_plan[row, s]:
                deadline = last_used[row, s] + keep_alive
                if deadline <= t:
                    end = deadline if deadline > t0 else t0
                    expert[row, s] = -1
                    gone += 1
                elif deadline < until:
                    until = deadline
            g = s // S
            inst_s += end - t0
            if end > gpu_end[g]:
                gpu_end[g] = end
            if expert[row, s] >= 0:
                n_live += 1
                held[g] = True
    gpu_s = 0.0
    n_held = 0
    for g in range(G):
        gpu_s += gpu_end[g] - t0
        if held[g]:
            n_held += 1
    return inst_s, gpu_s, gone, until, n_live, n_held


class FunctionPool:
    """Instances of `num_layers` x `gpus` x `slots_per_gpu` slots.

    expert_bytes: bytes of one expert's weights; link_bandwidth: bytes/s of a GPU's host link;
    keep_alive_s: idle time before release (inf = never); cold_start_overhead_s: fixed cost per cold start
    (container / allocation), added to the copy time; peer_bandwidth: bytes/s of the GPU-to-GPU link inside a
    link group of `link_group` consecutive GPUs (None: no peer copies, every copy comes from the host).
    """

    def __init__(
        self,
        num_layers: int,
        gpus: int,
        slots_per_gpu: int,
        *,
        expert_bytes: float,
        link_bandwidth: float,
        keep_alive_s: float = 60.0,
        cold_start_overhead_s: float = 0.0,
        clock=None,
        peer_bandwidth: float | None = None,
        link_group: int = 1,
    ):
        for name, v in (("num_layers", num_layers), ("gpus", gpus), ("slots_per_gpu", slots_per_gpu)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not (math.isfinite(expert_bytes) and expert_bytes > 0):
            raise ValueError(f"expert_bytes must be a finite number > 0, got {expert_bytes!r}")
        if not (link_bandwidth > 0) or math.isnan(link_bandwidth):
            raise ValueError(f"link_bandwidth must be > 0 (bytes/s), got {link_bandwidth!r}")
        if math.isnan(keep_alive_s) or keep_alive_s < 0:
            raise ValueError(f"keep_alive_s must be >= 0 (inf allowed), got {keep_alive_s!r}")
        if not (math.isfinite(cold_start_overhead_s) and cold_start_overhead_s >= 0):
            raise ValueError(f"cold_start_overhead_s must be a finite number >= 0, got {cold_start_overhead_s!r}")
        if peer_bandwidth is not None and (not (peer_bandwidth > 0) or math.isnan(peer_bandwidth)):
            raise ValueError(f"peer_bandwidth must be > 0 (bytes/s) or None, got {peer_bandwidth!r}")
        if isinstance(link_group, bool) or not isinstance(link_group, (int, np.integer)) or link_group < 1:
            raise ValueError(f"link_group must be a positive integer, got {link_group!r}")
        self.num_layers, self.gpus, self.slots_per_gpu = int(num_layers), int(gpus), int(slots_per_gpu)
        self.peer_bandwidth = None if peer_bandwidth is None else float(peer_bandwidth)
        self.link_group = int(min(link_group, gpus))
        self.expert_bytes = float(expert_bytes)
        self.link_bandwidth = float(link_bandwidth)
        self.keep_alive_s = float(keep_alive_s)
        self.cold_start_overhead_s = float(cold_start_overhead_s)
        self.clock = clock if clock is not None else SimulatedClock()
        shape = (self.num_layers, self.gpus * self.slots_per_gpu)
        self.expert = np.full(shape, -1, dtype=np.int64)  # -1: no instance
        self.ready_at = np.zeros(shape)  # when its weights are in
        self.last_used = np.zeros(shape)  # keep-alive counts from here
        self.in_plan = np.zeros(shape, dtype=bool)  # part of the last applied plan (warm, not idle)
        self.meter = Meter()
        self._t = float(self.clock.now())
        self._link_free = np.full(self.gpus, -np.inf)  # when each GPU's host link finishes its queued copies
        self._peer_free = np.full(self.gpus, -np.inf)  # the same for its peer link
        # (until, live instances, GPUs holding one) as of the last pass of advance_to: until the earliest idle
        # deadline nothing is released; None once the state changed (apply, prewarm, close)
        self._quiet = None

    # -- time and the meter -------------------------------------------------------------------------------
    @property
    def cold_start_s(self) -> float:
        """Seconds of one cold start from the host."""
        return self.cold_start_overhead_s + self.expert_bytes / self.link_bandwidth

    @property
    def peer_cold_start_s(self) -> float:
        """Seconds of one cold start from a peer GPU of the link group (the host's when there is no peer link)."""
        if self.peer_bandwidth is None:
            return self.cold_start_s
        return self.cold_start_overhead_s + self.expert_bytes / self.peer_bandwidth

    def _now(self, now) -> float:
        t = float(self.clock.now()) if now is None else float(now)
        if not math.isfinite(t):
            raise ValueError(f"now must be finite, got {now!r}")
        if t < self._t - 1e-12:
            raise ValueError(f"now={t} is before the pool's last time {self._t}: time never goes backwards")
        return max(t, self._t)

    def _deadline(self) -> np.ndarray:
        # an instance in the current plan is in use until the next apply; keep-alive starts at its last use
        return np.where(self.expert >= 0, self.last_used + self.keep_alive_s, -np.inf)

    def quiet(self, now) -> bool:
        """Whether advancing to `now` (a float, not before the pool's time) only charges the meter: no keep-alive
        runs out by then and nothing changed since the last pass (see advance_to)."""
        quiet = self._quiet
        return quiet is not None and type(now) is float and self._t <= now < quiet[0]

    @property
    def quiet_token(self):
        """An object that stays the same (by identity) while advancing the pool only charges its meter (see quiet):
        apply, prewarm, close and every pass of advance_to over the slots replace it."""
        return self._quiet

    def advance_to(self, now=None) -> float:
        """Charge the meter up to `now` and release the instances whose keep-alive ran out.

        One compiled pass over the slots (_advance) notes the earliest keep-alive deadline of the idle instances
        and how many instances and GPUs are live; until that deadline, or until the pool's state changes (apply,
        prewarm, close), nothing can be released, so a later call charges those counts times the elapsed time in
        O(1). The engine advances the pool at every decision, two per layer on a serving clock: a pass over
        DeepSeek-V3's 58 x 512 slots each time would cost several times the decision."""
        quiet = self._quiet
        t = now if self.quiet(now) else self._now(now)  # (the common case without the checks of _now)
        if t == self._t:
            return t  # nothing to charge, and releases due by t happened when the clock reached t
        if quiet is not None and t < quiet[0]:
            dt = t - self._t
            self.meter.gb_seconds += quiet[1] * dt * self.expert_bytes / 1e9
            self.meter.gpu_seconds += quiet[2] * dt
        else:
            inst_s, gpu_s, gone, until, n_live, n_held = _advance(
                self.expert, self.in_plan, self.last_used, self.keep_alive_s, self._t, t, self.slots_per_gpu)
            self.meter.gb_seconds += inst_s * self.expert_bytes / 1e9
            self.meter.gpu_seconds += gpu_s
            self.meter.releases += gone
            self._quiet = (until, n_live, n_held)
        self._t = t
        return t

    # -- lifecycle -----------------------------------------------------------------------------------------
    def copy_sources(self, layers, phy2log, now=None) -> np.ndarray:
        """int8 [len(layers), G*S] for a plan's rows `phy2log` of `layers`: 0 = no copy (free slot, or the slot
        already holds a live instance of that expert), 1 = a cold start from the host, 2 = one from a peer GPU
        of the same link group holding a loaded instance of that expert in that layer. Changes nothing."""
        layers = np.ascontiguousarray(layers, dtype=np.int64)
        p2l = np.ascontiguousarray(phy2log, dtype=np.int64)
        P = self.gpus * self.slots_per_gpu
        if layers.ndim != 1 or ((layers < 0) | (layers >= self.num_layers)).any():
            raise ValueError(f"layers must be a list of layer indices in [0, {self.num_layers}), got {layers!r}")
        if p2l.shape != (layers.size, P):
            raise ValueError(f"phy2log must have shape [len(layers)={layers.size}, G*S={P}], got {p2l.shape}")
        if ((p2l < -1)).any():
            raise ValueError("phy2log entries must be -1 (free) or expert ids")
        t = self._t if now is None else float(now)
        out = np.zeros(p2l.shape, dtype=np.int8)
        peer = self.peer_bandwidth is not None and self.link_group >= 2
        _copy_sources(layers, p2l, self.expert, self.ready_at, t, self.slots_per_gpu, self.link_group, peer, out)
        return out

    def _start(self, layer: np.ndarray, slot: np.ndarray, expert: np.ndarray, t: float,
               from_peer: np.ndarray | None = None) -> np.ndarray:
        """Cold-start instances (copies queue per GPU link, host or peer, in the given order); returns their
        ready times."""
        gpu = slot // self.slots_per_gpu
        ready = np.empty(layer.size)
        if from_peer is None:
            from_peer = np.zeros(layer.size, dtype=bool)
        _queue_copies(np.ascontiguousarray(gpu, dtype=np.int64), np.ascontiguousarray(from_peer, dtype=np.bool_),
                      t, self._link_free, self._peer_free, self.cold_start_s, self.peer_cold_start_s, ready)
        evict = (self.expert[layer, slot] >= 0) & (self.expert[layer, slot] != expert)
        self.expert[layer, slot] = expert
        self.ready_at[layer, slot] = ready
        self.last_used[layer, slot] = t
        self._quiet = None
        self._charge_copies(from_peer, int(evict.sum()))
        return ready

    def _charge_copies(self, from_peer: np.ndarray, evictions: int) -> None:
        """The meter's share of cold starts (one per entry of from_peer, from a peer where it is set) that evicted
        `evictions` instances."""
        self.meter.evictions += evictions
        self.meter.cold_starts += int(from_peer.size)
        self.meter.bytes_copied += int(round(from_peer.size * self.expert_bytes))
        self.meter.copy_seconds += float(np.where(from_peer, self.peer_cold_start_s, self.cold_start_s).sum())

    def _targets(self, plan: Plan, layer) -> tuple[np.ndarray, np.ndarray]:
        if not isinstance(plan, Plan):
            raise ValueError(f"plan must be a Plan, got {type(plan).__name__}")
        if plan.gpus != self.gpus or plan.slots_per_gpu != self.slots_per_gpu:
            raise ValueError(
                f"plan has gpus={plan.gpus}, slots_per_gpu={plan.slots_per_gpu}; the pool has "
                f"{self.gpus}, {self.slots_per_gpu}"
            )
        if layer is None:
            if plan.num_layers != self.num_layers:
                raise ValueError(
                    f"plan has {plan.num_layers} layers, the pool {self.num_layers}: pass layer= for a layer plan"
                )
            return np.arange(self.num_layers), plan.phy2log
        if plan.num_layers != 1:
            raise ValueError(f"layer= needs a one-layer plan, got {plan.num_layers} layers")
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer!r}")
        return np.array([int(layer)]), plan.phy2log

    def apply(self, plan: Plan, now=None, *, layer=None) -> ApplyResult:
        """Realise `plan` (all layers, or the one-layer plan of `layer`) at time `now`: reuse live instances of
        the same expert in the same slot, cold-start the others (evicting what lived there), and mark the
        instances the plan leaves out as idle (released after keep-alive)."""
        layers, p2l = self._targets(plan, layer)
        t = self.advance_to(now)
        peer = self.peer_bandwidth is not None and self.link_group >= 2
        cold, from_peer, warm, evicted, ready_in = _apply_rows(
            np.ascontiguousarray(layers, dtype=np.int64), np.ascontiguousarray(p2l, dtype=np.int64), self.expert,
            self.ready_at, self.last_used, self.in_plan, t, self.slots_per_gpu, self.link_group, peer,
            self._link_free, self._peer_free, self.cold_start_s, self.peer_cold_start_s)
        self._quiet = None
        self._charge_copies(from_peer, len(evicted))
        self.meter.warm_starts += len(warm)
        return ApplyResult(cold=cold, warm=warm, evicted=evicted, ready_in_s=ready_in, from_peer=from_peer)

    def align(self, plan: Plan, *, layer=None) -> Plan:
        """`plan` with its slots renumbered inside each GPU to fit this pool (warm identity: an instance is
        (layer, GPU, expert), its slot index does not matter): an instance the pool holds live (warm or idle)
        keeps its slot; the plan's new instances take the free slots first, then the idle slots whose keep-alive
        ends soonest, then the slots of instances this plan leaves out. The experts on each GPU, hence the
        balance, are unchanged. Changes nothing in the pool."""
        layers, p2l = self._targets(plan, layer)
        L, G, S = len(layers), self.gpus, self.slots_per_gpu
        cur = self.expert[layers].reshape(L, G, S)
        # the untaken slots by preference: free, then idle by keep-alive deadline (expired ones first), then
        # the slots of instances in the current plan
        deadline = (self.last_used[layers] + self.keep_alive_s).reshape(L, G, S)
        idle = (cur >= 0) & ~self.in_plan[layers].reshape(L, G, S)
        key = np.where(cur < 0, -np.inf, np.where(idle, deadline, np.inf))
        out = align_slots(p2l.reshape(L, G, S), cur, key)
        # (the plan's own instances, renumbered inside each GPU: a valid plan already)
        return Plan._derived(out.reshape(L, G * S), plan.num_experts, self.gpus, self.slots_per_gpu)

    def live_phy2log(self) -> np.ndarray:
        """int64 [L, G*S]: the expert of each slot's live instance (warm, loading or idle), -1 where free."""
        return self.expert.copy()

    def prewarm(self, layer: int, slot: int, expert: int, now=None) -> float:
        """Start loading `expert` into (layer, slot) ahead of its plan; returns when it will be ready. A slot
        that already holds a live instance of `expert` is left alone. The instance is idle (keep-alive
        counting) until a plan uses it."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer!r}")
        if not 0 <= slot < self.gpus * self.slots_per_gpu:
            raise ValueError(f"slot must be in [0, {self.gpus * self.slots_per_gpu}), got {slot!r}")
        if expert < 0:
            raise ValueError(f"expert must be >= 0, got {expert!r}")
        t = self.advance_to(now)
        if self.expert[layer, slot] == expert:
            return float(self.ready_at[layer, slot])
        if self.in_plan[layer, slot]:
            raise ValueError(f"slot {slot} of layer {layer} is in use by the current plan")
        ready = self._start(np.array([layer]), np.array([slot]), np.array([expert]), t)
        self.last_used[layer, slot] = t
        return float(ready[0])

    def close(self, now=None) -> Meter:
        """Charge up to `now` and release every instance; returns the meter."""
        t = self.advance_to(now)
        live = self.expert >= 0
        self.meter.releases += int(live.sum())
        self.expert[:] = -1
        self.in_plan[:] = False
        self._quiet = None
        self._t = t
        return self.meter

    # -- views ---------------------------------------------------------------------------------------------
    def state(self, now=None) -> np.ndarray:
        """[L, G*S] str: "free", "cold" (loading), "warm" (in the plan, loaded) or "idle" at `now` (or the
        pool's last time); does not advance the meter."""
        t = self._t if now is None else float(now)
        out = np.full(self.expert.shape, "free", dtype=object)
        live = self.expert >= 0
        alive = live & (self.in_plan | (self._deadline() > t))
        out[alive & (self.ready_at > t)] = "cold"
        out[alive & (self.ready_at <= t) & self.in_plan] = "warm"
        out[alive & (self.ready_at <= t) & ~self.in_plan] = "idle"
        return out

    def live_instances(self) -> int:
        return int((self.expert >= 0).sum())
