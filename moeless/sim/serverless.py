"""The serverless side of a simulated policy: drive moeless.pool.FunctionPool with each iteration's plan on
the policy's simulated clock, and turn its cold starts into stalls on the critical path.

The pool owns the lifecycle (cold start, warm reuse of the same expert in the same slot, keep-alive, release)
and the bill (GB-s of live instances, keep-alive included; GPU-seconds while a GPU hosts an instance). This
module adds the timing the pool leaves to its data plane: the copies of one iteration queue on each GPU's host
link in layer order, and the copies of layer l can start only when layer l is predicted, d layers ahead
(when layer l-d starts); layer l waits for its copies on its slowest GPU.

It never plans (the planner does) and never reads the wall clock.
"""
from __future__ import annotations

import numpy as np

from moeless.pool import FunctionPool, SimulatedClock


class PoolDriver:
    """One serverless policy's function pool and its clock over the whole run."""

    def __init__(self, setup):
        m, cfg = setup.model, setup.config
        self.model, self.hardware = m, setup.hardware
        self.G, self.S, self.L = cfg.gpus, setup.slots_per_gpu, m.num_moe_layers
        self.distance = cfg.distance
        copy_s = setup.cost.cold_start_s(from_peer=False)
        # the paper-linear model has no cold-start term: an infinitely fast link keeps the pool's bill
        bandwidth = m.expert_bytes / copy_s if copy_s > 0 else float("inf")
        self.clock = SimulatedClock()
        self.pool = FunctionPool(self.L, self.G, self.S, expert_bytes=m.expert_bytes, link_bandwidth=bandwidth,
                                 keep_alive_s=float(cfg.keep_alive_s), clock=self.clock)
        self.copy_s = self.pool.cold_start_s

    def stalls(self, cold: np.ndarray, layer_time: np.ndarray) -> np.ndarray:
        """Per-layer waits [L] of one iteration: cold (layer, slot) [n, 2] cold starts, layer_time [L] the
        layers' own times (MoE + non-MoE) without waits."""
        stall = np.zeros(self.L)
        if cold.size == 0 or self.copy_s == 0:
            return stall
        copies = np.zeros((self.L, self.G))
        np.add.at(copies, (cold[:, 0], cold[:, 1] // self.S), self.copy_s)
        ready = np.zeros(self.G)  # each GPU's link, relative to the iteration's start
        start = np.zeros(self.L)
        t = 0.0
        d = self.distance
        for l in range(self.L):
            start[l] = t
            issue = start[l - d] if l >= d else 0.0  # predicted while layer l-d runs
            if copies[l].any():
                ready = np.maximum(ready, issue) + copies[l]
                stall[l] = max(0.0, float(ready[copies[l] > 0].max()) - t)
            t += stall[l] + layer_time[l]
        return stall

    def advance(self, plans, moe, misc, chunk, meter):
        """Walk a chunk's iterations on this policy's clock. moe, misc [n, L] seconds. Returns (layer
        latencies [n, L] with stalls, iteration seconds [n], start times [n], cold starts [n])."""
        n = len(plans)
        lat = np.empty_like(moe)
        it_s = np.empty(n)
        begin = np.empty(n)
        cold = np.zeros(n, dtype=np.int64)
        for i, plan in enumerate(plans):
            t = max(float(chunk.ready_s[i]), meter.clock)
            applied = self.pool.apply(plan, t)
            cold[i] = len(applied.cold)
            lat[i] = moe[i] + self.stalls(applied.cold, moe[i] + misc[i])
            it_s[i] = float((lat[i] + misc[i]).sum())
            begin[i] = t
            meter.clock = t + it_s[i] * float(chunk.weight[i])
        return lat, it_s, begin, cold

    def finish(self, meter) -> None:
        bill = self.pool.close(meter.clock)
        pr, m = meter.result, self.model
        pr.cost_gb_s = bill.gb_seconds
        pr.gpu_seconds = bill.gpu_seconds
        pr.extra["evictions"] = bill.evictions
        pr.extra["warm_starts"] = bill.warm_starts
        pr.accounting = (f"serverless (moeless.pool): live instances x {m.expert_bytes / 1e9:.3f} GB from cold start "
                         f"to release ({self.pool.keep_alive_s:g} s keep-alive after last use), GPU-seconds while a "
                         f"GPU hosts an instance")
