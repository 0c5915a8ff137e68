"""What a simulation returns: per-policy latency distributions, costs, replicas and cold starts over time.

`PolicyResult` collects a policy's samples as the engine produces them; `SimResult` holds every policy and the
setup, and renders the one JSON object the CLI prints. This module never simulates and never plots.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

GB = 1e9


def weighted_quantiles(values: np.ndarray, weights: np.ndarray, qs) -> np.ndarray:
    """Quantiles of a weighted sample: the smallest value whose cumulative weight reaches q of the total
    (the inverse of the weighted empirical CDF; equals numpy's 'inverted_cdf' method for unit weights)."""
    v, w = np.asarray(values, dtype=np.float64).ravel(), np.asarray(weights, dtype=np.float64).ravel()
    if v.size == 0:
        return np.full(len(qs), np.nan)
    order = np.argsort(v, kind="stable")
    v, cw = v[order], np.cumsum(w[order])
    targets = np.asarray(qs, dtype=np.float64) * cw[-1]
    idx = np.minimum(np.searchsorted(cw, targets * (1 - 1e-12), side="left"), len(v) - 1)
    return v[idx]


@dataclass
class PolicyResult:
    """One policy's outcome. Latency samples are per (iteration, MoE layer), weighted by how many real
    iterations the simulated one stands for; iteration times are whole iterations (all layers + non-MoE)."""

    name: str
    serverless: bool
    layer_latency_s: list = field(default_factory=list)  # chunks of [n, L]
    iteration_s: list = field(default_factory=list)  # chunks of [n]
    weights: list = field(default_factory=list)  # chunks of [n]
    replicas: list = field(default_factory=list)  # chunks of [n]: live instances over all layers
    cold_starts: list = field(default_factory=list)  # chunks of [n]
    clock_s: list = field(default_factory=list)  # chunks of [n]: iteration start on the policy's clock
    live: list = field(default_factory=list)  # serverless: chunks of [n] live instances (idle ones included)
    prefill: list = field(default_factory=list)  # chunks of [n] bool: the iteration holds prompt tokens (if given)
    eq2_byte_s: float = 0.0
    cost_gb_s: float = 0.0
    gpu_seconds: float = 0.0
    makespan_s: float = 0.0
    accounting: str = ""
    extra: dict = field(default_factory=dict)

    def add(self, layer_latency, iteration, weight, replicas, cold_starts, clock, prefill=None):
        """One chunk of n iterations: layer_latency [n, L] s, iteration [n] s, weight [n], replicas [n],
        cold_starts [n], clock [n] s, and optionally prefill [n] bool (the report then splits latency by phase)."""
        if prefill is not None:
            self.prefill.append(np.asarray(prefill, dtype=bool))
        self.layer_latency_s.append(np.asarray(layer_latency, dtype=np.float32))
        self.iteration_s.append(np.asarray(iteration, dtype=np.float64))
        self.weights.append(np.asarray(weight, dtype=np.float64))
        self.replicas.append(np.asarray(replicas, dtype=np.float64))
        self.cold_starts.append(np.asarray(cold_starts, dtype=np.int64))
        self.clock_s.append(np.asarray(clock, dtype=np.float64))

    def _cat(self, name):
        parts = getattr(self, name)
        return np.concatenate(parts) if parts else np.zeros(0)

    @property
    def latencies(self) -> tuple[np.ndarray, np.ndarray]:
        """(MoE-layer latency samples [n * L] in seconds, their weights)."""
        lat = self._cat("layer_latency_s")
        w = self._cat("weights")
        if lat.size == 0:
            return lat.ravel(), w
        return lat.ravel(), np.repeat(w, lat.shape[1])

    def series(self, name: str) -> np.ndarray:
        return self._cat(name)

    @property
    def phases(self) -> np.ndarray | None:
        """prefill flag of every latency sample [n * L] (None when the engine did not give the phases)."""
        flags = self._cat("prefill").astype(bool)
        lat = self._cat("layer_latency_s")
        if lat.size == 0 or flags.shape != lat.shape[:1]:
            return None
        return np.repeat(flags, lat.shape[1])

    def summary(self) -> dict:
        lat, lw = self.latencies
        it, w = self._cat("iteration_s"), self._cat("weights")
        qs = (0.5, 0.9, 0.99)
        lq = weighted_quantiles(lat, lw, qs) * 1e3
        iq = weighted_quantiles(it, w, qs) * 1e3
        rep = self._cat("replicas")
        return {
            "latency_ms": {"mean": float(np.average(lat, weights=lw) * 1e3), "p50": float(lq[0]),
                           "p90": float(lq[1]), "p99": float(lq[2])},
            "iteration_ms": {"mean": float(np.average(it, weights=w) * 1e3), "p50": float(iq[0]),
                             "p90": float(iq[1]), "p99": float(iq[2])},
            "cost_gb_s": float(self.cost_gb_s),
            "eq2_cost_gb_s": float(self.eq2_byte_s / GB),
            "gpu_seconds": float(self.gpu_seconds),
            "cold_starts": int(self._cat("cold_starts").sum()),
            "mean_replicas": float(np.average(rep, weights=w)) if rep.size else 0.0,
            "mean_live_instances": (float(np.average(self._cat("live"), weights=w)) if self.live
                                    else float(np.average(rep, weights=w)) if rep.size else 0.0),
            "makespan_s": float(self.makespan_s),
            "serverless": self.serverless,
            "accounting": self.accounting,
            **self.extra,
        }


@dataclass
class SimResult:
    policies: dict
    setup: dict
    wall_s: float = 0.0

    def to_dict(self) -> dict:
        return {"policies": {name: pr.summary() for name, pr in self.policies.items()},
                "setup": {**self.setup, "wall_s": round(self.wall_s, 3)}}

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=_jsonable)


def _jsonable(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)
