"""The serverful baselines as policies: static expert parallelism (Megatron-LM) and EPLB at a deployment's cadence.

- `StaticEPPolicy`: E / G experts per GPU, one instance each, never moved.
- `EPLBPolicy`: DeepSeek's expert-parallel load balancer (moeless.baselines.rebalance_experts) filling every
  slot with redundant experts, rebuilt every `interval` (iterations or seconds) from the loads of the last
  `window`; a deployment that has been running comes with history (`warm`). Pairs are split evenly over an
  expert's replicas, as vLLM's and SGLang's token-to-replica choice does. Rebalancing copies experts (the
  engine counts them); a real engine moves weights in the background, so they cost no stall here, which
  favours the baseline. Cadences used in the benchmarks: the paper's (every 10 minutes, from everything
  since the last rebuild) and vLLM's defaults (statistics over 1,000 iterations, a rebuild every 3,000).

Both are resident for the whole run: the bill charges every slot they fill, all the time.
"""
from __future__ import annotations

from collections import deque

import numpy as np

from moeless.baselines import rebalance_experts
from moeless.planner import Plan, even_split
from moeless.policy.base import Policy, price_dense

__all__ = ["EPLBPolicy", "StaticEPPolicy"]


class _Priced(Policy):
    """A policy whose layer time is priced with a cost model's profile (optional: 0.0 without one)."""

    def __init__(self, num_layers, num_experts, gpus, slots_per_gpu, cost=None):
        super().__init__(num_layers, num_experts, gpus, slots_per_gpu)
        self.cost = cost
        self.profile = None if cost is None else cost.profile(self.G).as_array()

    def _price(self, plan: Plan, rt: np.ndarray) -> float:
        if self.profile is None:
            return 0.0
        d = self.dense(plan)
        n = np.zeros((self.E, self.G))
        np.add.at(n, (np.nonzero(d.valid)[0], d.rg[d.valid]), rt[d.valid])
        return price_dense(n, self.profile)


class StaticEPPolicy(_Priced):
    """Megatron-LM expert parallelism: the home plan, never changed; every pair on its expert's one instance."""

    name = "megatron"

    def split(self, layer, plan, counts):
        c = self.check_counts(counts).astype(np.int64)
        rt = even_split(plan, c[None])[0]
        return rt, self._price(plan, rt)


class EPLBPolicy(_Priced):
    """EPLB at a cadence (module docstring). window / interval in `unit` ("iterations" or "seconds");
    num_groups / num_nodes: EPLB's hierarchical mode (1 / 1 = global)."""

    def __init__(self, num_layers, num_experts, gpus, slots_per_gpu, cost=None, *, window: float = 1000,
                 interval: float = 3000, unit: str = "iterations", num_groups: int = 1, num_nodes: int = 1,
                 name: str = "eplb"):
        super().__init__(num_layers, num_experts, gpus, slots_per_gpu, cost)
        if unit not in ("iterations", "seconds"):
            raise ValueError(f"unit must be 'iterations' or 'seconds', got {unit!r}")
        for k, v in (("window", window), ("interval", interval)):
            if not (np.isfinite(v) and v > 0):
                raise ValueError(f"{k} must be a finite number > 0, got {v!r}")
        self.name = name
        self.window, self.interval, self.unit = float(window), float(interval), unit
        self.num_groups, self.num_nodes = int(num_groups), int(num_nodes)
        self._entries: deque = deque()  # (position in `unit`, weight, loads [L, E] x weight)
        self._sum = np.zeros((self.L, self.E))
        self._pos = 0.0  # iterations seen, or the clock
        self._last = 0.0  # position of the last rebuild
        self.rebuilds = 0
        self.plan = self._build(np.ones((self.L, self.E)))

    def _build(self, loads: np.ndarray) -> Plan:
        return rebalance_experts(loads, self.G * self.S, self.G, num_groups=self.num_groups,
                                 num_nodes=self.num_nodes)

    def initial_plan(self) -> Plan:
        return self.plan

    def record(self, loads, weight: float = 1.0, now: float | None = None) -> None:
        """Add one (weighted) iteration's true loads [L, E] to the statistics window."""
        W = np.asarray(loads, dtype=np.float64)
        if W.shape != (self.L, self.E):
            raise ValueError(f"loads must have shape [{self.L}, {self.E}], got {list(W.shape)}")
        self._pos = self._pos + weight if self.unit == "iterations" else float(now if now is not None else self._pos)
        self._entries.append((self._pos, weight, W * weight))
        self._sum += W * weight
        while self._entries and self._entries[0][0] <= self._pos - self.window:
            self._sum -= self._entries.popleft()[2]

    def warm(self, history, weights=None, times=None) -> Plan:
        """A running deployment: feed per-iteration loads [T, L, E] seen before the run, then rebuild once."""
        h = np.asarray(history, dtype=np.float64)
        if h.ndim != 3 or h.shape[1:] != (self.L, self.E):
            raise ValueError(f"history must have shape [T, L={self.L}, E={self.E}], got {list(h.shape)}")
        for i in range(h.shape[0]):
            self.record(h[i], 1.0 if weights is None else float(weights[i]), None if times is None else times[i])
        if self._sum.sum() > 0:
            self.plan = self._build(self._sum)
        self._last = self._pos
        return self.plan

    def end_iteration(self, loads, now: float, weight: float = 1.0) -> Plan | None:
        """Record the iteration; at the cadence, rebuild from the window. Returns the new plan, or None."""
        self.record(loads, weight, now)
        if self._pos - self._last >= self.interval and self._sum.sum() > 0:
            self._last = self._pos
            self.rebuilds += 1
            new = self._build(self._sum)
            if not np.array_equal(new.phy2log, self.plan.phy2log):
                self.plan = new
                return new
        return None

    def split(self, layer, plan, counts):
        c = self.check_counts(counts).astype(np.int64)
        rt = even_split(plan, c[None])[0]
        return rt, self._price(plan, rt)

    def rebalance(self, history) -> Plan:
        h = np.asarray(history, dtype=np.float64)
        if h.ndim != 3 or h.shape[1:] != (self.L, self.E):
            raise ValueError(f"history must have shape [T, L={self.L}, E={self.E}], got {list(h.shape)}")
        return self._build(h.sum(0) if h.sum() > 0 else np.ones((self.L, self.E)))
