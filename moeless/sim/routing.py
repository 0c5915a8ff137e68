"""Routing for the simulator: per iteration and MoE layer, how many tokens each expert receives.

Two sources, one interface (`RoutingSource.route(tokens, batch, decode_step, rng)`):
- `PopularityRouting`: a per-layer expert popularity profile `p [L, E]` with batch-to-batch variation: each batch
  of requests draws its shares from Dirichlet(kappa_l * p_l), and each iteration's (token, expert) pairs are a
  multinomial draw of T*K from them. `fit_popularity` fits p and kappa to measured loads (the bundled Mixtral
  popularity of seven MMLU subjects, or the batches of a routing trace) by the method of moments.
- `TraceRouting`: real token-level routing from a `moeless.traces.RoutingTrace` (ESFT, JSONL, or captured from a
  live model's routers with `moeless.traces.capture_routing`): a prefill takes a contiguous span of T trace
  tokens; a decode step advances every live request by one token of its own place in the trace. It also
  returns the token-level `topk_ids`, which token-level predictors need.

Routing is drawn once per iteration and shared by every policy: this module never sees a plan or a policy.
A multinomial draw lets an expert receive more pairs than there are tokens only when one share exceeds 1/K,
which the fitted profiles never come near; the cap is not enforced.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

import numpy as np

from moeless.traces import RoutingTrace, expert_loads

MIXTRAL_POPULARITY_VARIANTS = ("mixtral_8x7b_original", "mixtral_8x7b_instruct")


@dataclass(frozen=True)
class RoutedIteration:
    """One iteration's routing: `loads [L, E]` int64 and, from token-level sources, `topk_ids [L, T, K]`."""

    loads: np.ndarray
    topk_ids: np.ndarray | None = None


@dataclass(frozen=True)
class PopularityProfile:
    """Mean expert shares `p [L, E]` (rows sum to 1) and per-layer Dirichlet concentration `kappa [L]`
    (np.inf: no batch-to-batch variation beyond the multinomial's)."""

    p: np.ndarray
    kappa: np.ndarray
    top_k: int
    source: str = ""

    def __post_init__(self):
        p, kappa = np.asarray(self.p, dtype=np.float64), np.asarray(self.kappa, dtype=np.float64)
        if p.ndim != 2 or (p < 0).any() or not np.allclose(p.sum(1), 1.0):
            raise ValueError(f"PopularityProfile.p must be [L, E] non-negative rows summing to 1, got {p.shape}")
        if kappa.shape != (p.shape[0],) or (kappa <= 0).any():
            raise ValueError(f"PopularityProfile.kappa must be [L={p.shape[0]}] positive, got {kappa.shape}")
        if not 1 <= self.top_k <= p.shape[1]:
            raise ValueError(f"PopularityProfile.top_k must be in [1, E={p.shape[1]}], got {self.top_k}")
        object.__setattr__(self, "p", p)
        object.__setattr__(self, "kappa", kappa)

    @property
    def num_layers(self) -> int:
        return self.p.shape[0]

    @property
    def num_experts(self) -> int:
        return self.p.shape[1]


def fit_popularity(loads: np.ndarray, top_k: int, source: str = "") -> PopularityProfile:
    """Fit p and kappa to measured loads `[B, L, E]` (B batches of the same layers; each batch's rows hold its
    T_b * K pairs). Method of moments for a Dirichlet-multinomial: with n_b = T_b * K pairs, the share of an
    expert has Var = p (1 - p) (n + kappa) / (n (1 + kappa)); kappa solves that for the pooled, normalised
    between-batch variance of each layer (np.inf when the batches vary no more than sampling explains)."""
    x = np.asarray(loads, dtype=np.float64)
    if x.ndim != 3 or x.shape[0] < 2:
        raise ValueError(f"loads must be [B >= 2, L, E], got shape {x.shape}")
    if (x < 0).any():
        raise ValueError("loads must be non-negative")
    n = x.sum(2)  # [B, L] pairs per batch and layer
    if (n <= 0).any():
        raise ValueError("loads: every batch must route at least one token in every layer")
    shares = x / n[:, :, None]
    p = x.sum(0) / n.sum(0)[:, None]
    denom = np.maximum(p * (1 - p), 1e-12)
    v = (shares.var(0, ddof=1) / denom).mean(1)  # [L]: normalised variance, pooled over experts
    nbar = n.mean(0)
    nv = nbar * v
    with np.errstate(divide="ignore", invalid="ignore"):
        kappa = np.where(nv > 1.0, nbar * (1.0 - v) / (nv - 1.0), np.inf)
    kappa = np.where(np.isfinite(kappa) & (kappa > 0), kappa, np.inf)
    return PopularityProfile(p=p, kappa=kappa, top_k=top_k, source=source)


def mixtral_popularity(variant: str = "mixtral_8x7b_original") -> PopularityProfile:
    """The bundled measured Mixtral-8x7B expert popularity (efeslab/fiddler, Apache-2.0; seven MMLU subjects,
    prefill), fitted with `fit_popularity`: each subject is one batch."""
    if variant not in MIXTRAL_POPULARITY_VARIANTS:
        raise ValueError(f"variant must be one of {MIXTRAL_POPULARITY_VARIANTS}, got {variant!r}")
    folder = resources.files("moeless").joinpath("data", "mixtral_expert_popularity", variant)
    batches = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            batches.append(json.loads(entry.read_text("utf-8"))["expert_popularity"])
    return fit_popularity(np.asarray(batches), top_k=2, source=f"bundled {variant} popularity (7 MMLU subjects)")


def profile_from_trace(trace: RoutingTrace, batch_tokens: int = 512) -> PopularityProfile:
    """Fit a popularity profile to a routing trace cut into consecutive batches of `batch_tokens` tokens."""
    loads = np.stack([b.loads for b in trace.batches(batch_tokens, drop_last=True)])
    return fit_popularity(loads, top_k=trace.top_k, source=f"fitted to a routing trace ({batch_tokens}-token batches)")


class RoutingSource:
    """Base of the routing sources: `route(tokens, batch, decode_step, rng) -> RoutedIteration`."""

    num_layers: int
    num_experts: int
    top_k: int
    token_level = False
    description = ""

    def route(self, tokens: int, batch: int, decode_step: int, rng: np.random.Generator) -> RoutedIteration:
        raise NotImplementedError

    def route_many(self, tokens: np.ndarray, batch: np.ndarray, decode_step: np.ndarray,
                   rng: np.random.Generator) -> np.ndarray:
        """Loads [n, L, E] of n iterations (only for sources without token-level ids)."""
        return np.stack([self.route(int(t), int(b), int(s), rng).loads
                         for t, b, s in zip(tokens, batch, decode_step)])


class PopularityRouting(RoutingSource):
    """Loads drawn from a `PopularityProfile`; shares are redrawn when the batch id changes."""

    def __init__(self, profile: PopularityProfile):
        self.profile = profile
        self.num_layers, self.num_experts, self.top_k = profile.num_layers, profile.num_experts, profile.top_k
        self.description = profile.source
        self._batch = None
        self._shares = None

    def _batch_shares(self, batch: int, rng: np.random.Generator) -> np.ndarray:
        if batch != self._batch:
            prof = self.profile
            finite = np.isfinite(prof.kappa)
            shares = prof.p.copy()
            if finite.any():
                alpha = prof.kappa[finite, None] * prof.p[finite]
                g = rng.gamma(np.maximum(alpha, 1e-12))
                shares[finite] = g / np.maximum(g.sum(1, keepdims=True), 1e-300)
            self._batch, self._shares = batch, shares
        return self._shares

    def route(self, tokens: int, batch: int, decode_step: int, rng: np.random.Generator) -> RoutedIteration:
        shares = self._batch_shares(batch, rng)
        loads = rng.multinomial(int(tokens) * self.top_k, shares)
        return RoutedIteration(loads=loads.astype(np.int64))

    def route_many(self, tokens, batch, decode_step, rng) -> np.ndarray:
        tokens, batch = np.asarray(tokens), np.asarray(batch)
        out = np.empty((len(tokens), self.num_layers, self.num_experts), dtype=np.int64)
        change = np.flatnonzero(np.r_[True, batch[1:] != batch[:-1]])
        bounds = np.r_[change, len(tokens)]
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            shares = self._batch_shares(int(batch[lo]), rng)
            n = (tokens[lo:hi] * self.top_k)[:, None]  # one multinomial per (iteration, layer)
            out[lo:hi] = rng.multinomial(np.broadcast_to(n, (hi - lo, self.num_layers)), shares)
        return out


class TraceRouting(RoutingSource):
    """Token-level routing replayed from a RoutingTrace (wrapping around its end)."""

    token_level = True

    def __init__(self, trace: RoutingTrace, description: str = "routing trace"):
        if trace.num_tokens < 1:
            raise ValueError("trace: the routing trace holds no token")
        self.trace = trace
        self.num_layers, self.num_experts, self.top_k = trace.num_layers, trace.num_experts, trace.top_k
        self.description = description
        self._batch = None
        self._starts = None

    def route(self, tokens: int, batch: int, decode_step: int, rng: np.random.Generator) -> RoutedIteration:
        n = self.trace.num_tokens
        tokens = int(tokens)
        if batch != self._batch or decode_step == 0:
            # a new batch: a prompt span for the prefill, then each request decodes from its own place
            self._batch = batch
            self._prefill_start = int(rng.integers(n))
            self._starts = None
        if decode_step == 0:
            idx = (self._prefill_start + np.arange(tokens)) % n
        else:
            if self._starts is None or len(self._starts) < tokens:
                self._starts = rng.integers(n, size=max(tokens, 1))
            idx = (self._starts[:tokens] + decode_step) % n
        ids = self.trace.topk_ids[:, idx, :]
        return RoutedIteration(loads=expert_loads(ids, self.num_experts), topk_ids=ids)
