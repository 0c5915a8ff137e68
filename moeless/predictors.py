"""Layer-aware load predictors: the per-expert token counts of MoE layer l+d, predicted while layer l runs.

Every predictor implements `LoadPredictor`:

    fit(trace)                                   learn from a RoutingTrace (offline)
    begin_batch(batch)                           a new batch starts (only the oracle looks inside it)
    update(layer, topk_ids, gate_input=None)     real routing of `layer` arrived (online learning)
    predict(layer, topk_ids, gate_input=None)    -> float64 [E]: predicted load of layer `layer + distance`
    predict_topk(layer, topk_ids, gate_input=None) -> int [T, K] per-token predictions, or None
    save(path) / load_predictor(path)            one .npz file, no pickled objects

`layer` is a position in the trace (0 .. L-1), `topk_ids` [T, K] the routing of that layer in the current
batch, `gate_input` [T, H] its router's input hidden states. Loads count (token, k) pairs, so a predicted load
sums to T*K. Calls for one batch come in layer order: `begin_batch`, then per layer `update` (if online) and
`predict`; the regression predictor remembers the routing of earlier layers of the batch from these calls.

Predictors:
- "gate-replica" (the paper's): per target layer l+d a copy of that layer's gate [E, H] applied to layer l's
  gate input; the layers whose top-k recall is below `threshold` are fine-tuned (MSE on logits, Adam, 7:3).
- "affinity": transition counts P(expert at l+d | expert at l); a token's prediction is the mean of its K
  experts' rows (each summing to K); online count updates with an exponential decay (a half-life in tokens).
- "history": exponential moving average of the layer's past load shares (EPLB-like, per layer).
- "regression": ridge regression from the multi-hot routing of layers l, l-1, .., l-lags+1 to layer l+d's,
  fitted jointly (so overlapping evidence of a token's K experts is not double counted, as in "affinity"),
  refitted online from exponentially decayed sufficient statistics (tracks task shifts).
- "oracle": the true load (an upper bound on accuracy).

Metrics: `topk_recall`, `pearson`, `relative_l1`.

This module is floor 2: it imports `moeless.traces` and `moeless.limits` only, never the planner or the kernels;
torch is imported lazily, only for fine-tuning and `from_model`. It never changes routing.
"""
from __future__ import annotations

import json

import numpy as np

from moeless import limits
from moeless.traces import RoutingTrace, TraceBatch, expert_loads, find_routers, load_npz_arrays, router_top_k

__all__ = [
    "LoadPredictor",
    "GateReplicaPredictor",
    "AffinityPredictor",
    "HistoryPredictor",
    "RegressionPredictor",
    "OraclePredictor",
    "PREDICTORS",
    "make_predictor",
    "load_predictor",
    "load_predictors",
    "save_predictors",
    "topk_recall",
    "pearson",
    "relative_l1",
]

_FORMAT_VERSION = 1


# ---- metrics ------------------------------------------------------------------------------------------------
def topk_recall(pred_topk, true_topk) -> float:
    """Fraction of true (token, expert) selections that the prediction also selected: [T, K'] vs [T, K]."""
    p, t = np.asarray(pred_topk), np.asarray(true_topk)
    if p.ndim != 2 or t.ndim != 2 or p.shape[0] != t.shape[0]:
        raise ValueError(f"pred_topk and true_topk must be [T, K] with the same T, got {p.shape} and {t.shape}")
    if t.size == 0:
        return float("nan")
    hit = (t[:, :, None] == p[:, None, :]).any(-1)
    return float(hit.mean())


def pearson(pred, true) -> float:
    """Pearson correlation of two load vectors [E]; nan when either is constant (undefined)."""
    p, t = np.asarray(pred, np.float64).ravel(), np.asarray(true, np.float64).ravel()
    if p.shape != t.shape:
        raise ValueError(f"pred and true must have the same shape, got {p.shape} and {t.shape}")
    p, t = p - p.mean(), t - t.mean()
    den = np.sqrt((p * p).sum() * (t * t).sum())
    return float((p * t).sum() / den) if den > 0 else float("nan")


def relative_l1(pred, true) -> float:
    """sum |pred - true| / sum true (0 = exact; 2 = all load on the wrong experts)."""
    p, t = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    if p.shape != t.shape:
        raise ValueError(f"pred and true must have the same shape, got {p.shape} and {t.shape}")
    total = t.sum()
    if total <= 0:
        raise ValueError("true must have a positive total load")
    return float(np.abs(p - t).sum() / total)


def _multi_hot(topk_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """[T, K] -> [T, E] float64 with a 1 at every selected expert."""
    out = np.zeros((topk_ids.shape[0], num_experts))
    np.put_along_axis(out, topk_ids.astype(np.int64), 1.0, axis=1)
    return out


def _topk_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores per row, ties toward the lower expert id (the kernels' rule)."""
    order = np.argsort(-scores, axis=1, kind="stable")
    return order[:, :k].astype(np.int32)


def _decay(n_tokens: int, half_life_tokens: float | None) -> float:
    return 1.0 if not half_life_tokens else 0.5 ** (n_tokens / float(half_life_tokens))


# ---- interface ----------------------------------------------------------------------------------------------
class LoadPredictor:
    """Predicts the per-expert load of layer `layer + distance` from layer `layer`'s routing (and gate input)."""

    name = "base"
    needs_gate_inputs = False

    def __init__(self, distance: int = 1):
        self.distance = limits.check_int("distance", distance, 1, limits.MAX_LAYERS - 1)
        self.num_layers: int | None = None
        self.num_experts: int | None = None
        self.top_k: int | None = None
        self._batch_serial = 0
        self._seen: dict[int, tuple[int, np.ndarray]] = {}  # layer -> (batch serial, topk_ids) of this batch

    # -- shape and checks -----------------------------------------------------------------------------------
    def _set_shape(self, num_layers: int, num_experts: int, top_k: int) -> None:
        limits.check_int("num_layers", num_layers, 1, limits.MAX_LAYERS)
        limits.check_int("num_experts", num_experts, 1, limits.MAX_EXPERTS)
        limits.check_int("top_k", top_k, 1, min(limits.MAX_TOP_K, num_experts))
        if num_layers <= self.distance:
            raise ValueError(f"the trace has {num_layers} layers; distance={self.distance} needs more")
        self.num_layers, self.num_experts, self.top_k = int(num_layers), int(num_experts), int(top_k)

    def _check_fitted(self) -> None:
        if self.num_layers is None:
            raise ValueError(f"{type(self).__name__} is not fitted: call fit(trace) first")

    def _check_trace(self, trace) -> RoutingTrace:
        if not isinstance(trace, RoutingTrace):
            raise ValueError(f"trace must be a RoutingTrace, got {type(trace).__name__}")
        if trace.num_tokens == 0:
            raise ValueError("trace has no tokens")
        if self.needs_gate_inputs and trace.gate_inputs is None:
            raise ValueError(f"trace has no gate_inputs; {self.name} needs them (capture_routing records them)")
        return trace

    def _check_layer(self, layer, *, target: bool = True) -> int:
        self._check_fitted()
        hi = self.num_layers - self.distance if target else self.num_layers
        if not isinstance(layer, (int, np.integer)) or not 0 <= layer < hi:
            raise ValueError(f"layer must be an integer in [0, {hi}), got {layer!r}")
        return int(layer)

    def _check_ids(self, topk_ids) -> np.ndarray:
        ids = np.asarray(topk_ids)
        if ids.ndim != 2 or ids.shape[1] != self.top_k or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"topk_ids must be int [T, K={self.top_k}], got {ids.dtype} {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_experts):
            raise ValueError(f"topk_ids must lie in [0, {self.num_experts})")
        return ids

    def _remember(self, layer: int, ids: np.ndarray) -> None:
        self._seen[layer] = (self._batch_serial, ids)

    def _recalled(self, layer: int, n_tokens: int) -> np.ndarray | None:
        """topk_ids of `layer` from the current batch, if a call of this batch gave them."""
        got = self._seen.get(layer)
        if got is None or got[0] != self._batch_serial or got[1].shape[0] != n_tokens:
            return None
        return got[1]

    # -- the protocol ---------------------------------------------------------------------------------------
    def fit(self, trace: RoutingTrace) -> "LoadPredictor":
        raise NotImplementedError

    def begin_batch(self, batch: TraceBatch | None = None) -> None:
        """A new batch starts. Only the oracle may look at `batch` (it holds the future layers)."""
        self._batch_serial += 1

    def update(self, layer: int, topk_ids, gate_input=None) -> None:
        """Real routing of `layer` in the current batch arrived (online learning; default: remember it)."""
        layer = self._check_layer(layer, target=False)
        self._remember(layer, self._check_ids(topk_ids))

    def predict(self, layer: int, topk_ids, gate_input=None) -> np.ndarray:
        raise NotImplementedError

    def predict_topk(self, layer: int, topk_ids, gate_input=None) -> np.ndarray | None:
        """Per-token top-k of layer `layer + distance` [T, K], where the predictor has them; else None."""
        return None

    # -- persistence ----------------------------------------------------------------------------------------
    def _meta(self) -> dict:
        return {}

    def _arrays(self) -> dict[str, np.ndarray]:
        return {}

    def _restore(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        pass

    def save(self, path: str) -> str:
        """Write the fitted predictor to one .npz file (returns the path written)."""
        return save_predictors({self.name: self}, path)

    def _state(self) -> tuple[dict, dict[str, np.ndarray]]:
        self._check_fitted()
        meta = {"kind": self.name, "version": _FORMAT_VERSION, "distance": self.distance,
                "num_layers": self.num_layers, "num_experts": self.num_experts, "top_k": self.top_k,
                **self._meta()}
        return meta, self._arrays()


def save_predictors(predictors: dict[str, LoadPredictor], path: str) -> str:
    """Write several fitted predictors, by label, to one .npz file (".npz" is appended if missing)."""
    if not isinstance(predictors, dict) or not predictors:
        raise ValueError("predictors must be a non-empty dict {label: LoadPredictor}")
    arrays = {}
    for i, (label, pred) in enumerate(predictors.items()):
        if not isinstance(pred, LoadPredictor):
            raise ValueError(f"predictors[{label!r}] must be a LoadPredictor, got {type(pred).__name__}")
        meta, arrs = pred._state()
        arrays[f"{i}.meta"] = np.array(json.dumps({**meta, "label": str(label)}))
        arrays.update({f"{i}.{k}": v for k, v in arrs.items()})
    path = str(path)
    if not path.endswith(".npz"):
        path = f"{path}.npz"
    np.savez_compressed(path, **arrays)
    return path


def load_predictors(path: str) -> dict[str, LoadPredictor]:
    """Read the predictors written by `save_predictors` (or `LoadPredictor.save`), by label."""
    arrays = load_npz_arrays(path, "not a saved moeless predictor")
    out = {}
    i = 0
    while f"{i}.meta" in arrays:
        try:
            meta = json.loads(str(arrays[f"{i}.meta"]))
        except ValueError:
            raise ValueError(f"{path}: predictor {i} has unreadable metadata") from None
        kind = meta.get("kind")
        if kind not in PREDICTORS:
            raise ValueError(f"{path}: unknown predictor kind {kind!r}; known: {sorted(PREDICTORS)}")
        if meta.get("version") != _FORMAT_VERSION:
            raise ValueError(f"{path}: predictor format version {meta.get('version')}, expected {_FORMAT_VERSION}")
        own = {k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith(f"{i}.") and k != f"{i}.meta"}
        pred = PREDICTORS[kind].__new__(PREDICTORS[kind])
        try:  # the sizes a file claims are bounded like any other input (moeless.limits)
            LoadPredictor.__init__(pred, meta["distance"])
            pred._set_shape(meta["num_layers"], meta["num_experts"], meta["top_k"])
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{path}: predictor {meta.get('label')!r} has bad metadata ({exc})") from None
        try:
            pred._restore(meta, own)
        except KeyError as exc:
            raise ValueError(f"{path}: predictor {meta.get('label')!r} lacks array {exc}") from None
        out[meta.get("label", kind)] = pred
        i += 1
    if not out:
        raise ValueError(f"{path}: holds no saved predictor")
    return out


def load_predictor(path: str) -> LoadPredictor:
    """Read the one predictor of a file written by `LoadPredictor.save`."""
    preds = load_predictors(path)
    if len(preds) != 1:
        raise ValueError(f"{path}: holds {len(preds)} predictors {sorted(preds)}; use load_predictors")
    return next(iter(preds.values()))


# ---- oracle -------------------------------------------------------------------------------------------------
class OraclePredictor(LoadPredictor):
    """The true load of layer l+d, read from the batch given to `begin_batch` (an accuracy upper bound)."""

    name = "oracle"

    def __init__(self, distance: int = 1):
        super().__init__(distance)
        self._batch: TraceBatch | None = None

    def _restore(self, meta, arrays):
        self._batch = None

    def fit(self, trace):
        trace = self._check_trace(trace)
        self._set_shape(trace.num_layers, trace.num_experts, trace.top_k)
        return self

    def begin_batch(self, batch=None):
        super().begin_batch(batch)
        if not isinstance(batch, TraceBatch):
            raise ValueError("batch: the oracle needs the TraceBatch (it reads the true future routing)")
        self._batch = batch

    def _target(self, layer, topk_ids):
        layer = self._check_layer(layer)
        ids = self._check_ids(topk_ids)
        if self._batch is None or self._batch.topk_ids.shape[1] != ids.shape[0]:
            raise ValueError("the oracle's begin_batch(batch) must name the batch being predicted")
        return layer + self.distance

    def predict(self, layer, topk_ids, gate_input=None):
        return self._batch.loads[self._target(layer, topk_ids)].astype(np.float64)

    def predict_topk(self, layer, topk_ids, gate_input=None):
        return self._batch.topk_ids[self._target(layer, topk_ids)]


# ---- history ------------------------------------------------------------------------------------------------
class HistoryPredictor(LoadPredictor):
    """EMA of each layer's past load shares; predicts share[l+d] * T * K (ignores the current routing)."""

    name = "history"

    def __init__(self, distance: int = 1, half_life_tokens: float = 2048.0):
        super().__init__(distance)
        if not half_life_tokens or half_life_tokens <= 0:
            raise ValueError(f"half_life_tokens must be > 0, got {half_life_tokens!r}")
        self.half_life_tokens = float(half_life_tokens)
        self.share: np.ndarray | None = None  # (L, E) float64, rows sum to 1

    def _meta(self):
        return {"half_life_tokens": self.half_life_tokens}

    def _arrays(self):
        return {"share": self.share}

    def _restore(self, meta, arrays):
        self.half_life_tokens = meta["half_life_tokens"]
        self.share = arrays["share"]

    def fit(self, trace):
        trace = self._check_trace(trace)
        self._set_shape(trace.num_layers, trace.num_experts, trace.top_k)
        loads = trace.loads().astype(np.float64)
        self.share = loads / loads.sum(1, keepdims=True)
        return self

    def update(self, layer, topk_ids, gate_input=None):
        super().update(layer, topk_ids)
        ids = np.asarray(topk_ids)
        if ids.shape[0] == 0:
            return
        w = _decay(ids.shape[0], self.half_life_tokens)
        self.share[layer] = w * self.share[layer] + (1 - w) * expert_loads(ids, self.num_experts) / ids.size

    def predict(self, layer, topk_ids, gate_input=None):
        layer = self._check_layer(layer)
        ids = self._check_ids(topk_ids)
        return self.share[layer + self.distance] * ids.size

    # load-level use, every layer at once (the simulator's popularity routing has loads, not tokens)
    def predict_loads(self, pairs: float) -> np.ndarray:
        """[L, E] the predicted pairs of every layer for an iteration of `pairs` (token, k) pairs: share * pairs
        (row l is the prediction of layer l, made from layer l-d's iteration)."""
        if self.share is None:
            raise ValueError("HistoryPredictor: fit it (or restore it) before predicting")
        return self.share * float(pairs)

    def observe_loads(self, loads, tokens: int) -> None:
        """All layers' true loads [L, E] of one iteration of `tokens` tokens: the same update as `update` layer
        by layer."""
        if self.share is None:
            raise ValueError("HistoryPredictor: fit it (or restore it) before updating")
        W = np.asarray(loads, dtype=np.float64)
        if W.shape != self.share.shape:
            raise ValueError(f"loads must have shape {list(self.share.shape)}, got {list(W.shape)}")
        if tokens <= 0:
            return
        w = _decay(int(tokens), self.half_life_tokens)
        self.share = w * self.share + (1 - w) * W / (int(tokens) * self.top_k)


# ---- affinity -----------------------------------------------------------------------------------------------
class AffinityPredictor(LoadPredictor):
    """Expert transition counts between layer l and l+d.

    counts[l, a, b] = tokens that chose a at layer l and b at layer l+d; P(b | a) = (counts[a, b] + s m_b) /
    (n_a + s), with n_a the tokens that chose a and m the mean selections per token at l+d (so each row sums
    to K; s = `smoothing` pseudo-tokens keeps rare experts near the marginal). A token's prediction is the
    mean of its K rows; the layer's load is their sum, i.e. (load_l @ P) / K.
    """

    name = "affinity"

    def __init__(self, distance: int = 1, half_life_tokens: float | None = 8192.0, smoothing: float = 1.0):
        super().__init__(distance)
        if half_life_tokens is not None and half_life_tokens <= 0:
            raise ValueError(f"half_life_tokens must be > 0 or None, got {half_life_tokens!r}")
        if smoothing < 0:
            raise ValueError(f"smoothing must be >= 0, got {smoothing!r}")
        self.half_life_tokens = half_life_tokens
        self.smoothing = float(smoothing)
        self.counts: np.ndarray | None = None  # (L-d, E, E)
        self.chosen: np.ndarray | None = None  # (L-d, E): n_a
        self.marginal: np.ndarray | None = None  # (L, E): mean selections per token, rows sum to K

    def _meta(self):
        return {"half_life_tokens": self.half_life_tokens, "smoothing": self.smoothing}

    def _arrays(self):
        return {"counts": self.counts, "chosen": self.chosen, "marginal": self.marginal}

    def _restore(self, meta, arrays):
        self.half_life_tokens, self.smoothing = meta["half_life_tokens"], meta["smoothing"]
        self.counts, self.chosen, self.marginal = arrays["counts"], arrays["chosen"], arrays["marginal"]

    def _pair_counts(self, ids_src: np.ndarray, ids_dst: np.ndarray) -> np.ndarray:
        E = self.num_experts
        pairs = ids_src.astype(np.int64)[:, :, None] * E + ids_dst.astype(np.int64)[:, None, :]
        return np.bincount(pairs.ravel(), minlength=E * E).reshape(E, E).astype(np.float64)

    def fit(self, trace):
        trace = self._check_trace(trace)
        self._set_shape(trace.num_layers, trace.num_experts, trace.top_k)
        L, d, E = self.num_layers, self.distance, self.num_experts
        limits.check_bytes("the affinity predictor's counts [L - d, E, E]", (L - d) * E * E * 8)
        self.counts = np.stack([self._pair_counts(trace.topk_ids[l], trace.topk_ids[l + d]) for l in range(L - d)])
        loads = trace.loads().astype(np.float64)
        self.chosen = loads[: L - d].copy()
        self.marginal = loads / trace.num_tokens
        return self

    def transition(self, layer: int) -> np.ndarray:
        """P(expert b at layer+d | expert a at layer) [E, E]; rows sum to K."""
        layer = self._check_layer(layer)
        s, m = self.smoothing, self.marginal[layer + self.distance]
        num = self.counts[layer] + s * m[None, :]
        den = self.chosen[layer][:, None] + s
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, num / np.where(den > 0, den, 1.0), m[None, :])

    def update(self, layer, topk_ids, gate_input=None):
        super().update(layer, topk_ids)
        ids = np.asarray(topk_ids)
        if ids.shape[0] == 0:
            return
        w = _decay(ids.shape[0], self.half_life_tokens)
        self.marginal[layer] = w * self.marginal[layer] + (1 - w) * expert_loads(ids, self.num_experts) / ids.shape[0]
        src_layer = layer - self.distance
        src = self._recalled(src_layer, ids.shape[0]) if src_layer >= 0 else None
        if src is None:
            return
        self.counts[src_layer] = w * self.counts[src_layer] + self._pair_counts(src, ids)
        self.chosen[src_layer] = w * self.chosen[src_layer] + expert_loads(src, self.num_experts)

    def predict(self, layer, topk_ids, gate_input=None):
        layer = self._check_layer(layer)
        ids = self._check_ids(topk_ids)
        self._remember(layer, ids)
        return expert_loads(ids, self.num_experts) @ self.transition(layer) / self.top_k

    def predict_topk(self, layer, topk_ids, gate_input=None):
        layer = self._check_layer(layer)
        ids = self._check_ids(topk_ids)
        return _topk_rows(self.transition(layer)[ids].sum(1), self.top_k)


# ---- regression ---------------------------------------------------------------------------------------------
class RegressionPredictor(LoadPredictor):
    """Ridge regression of layer l+d's multi-hot routing on layers l, l-1, .., l-lags+1 (and a bias).

    Features of a token: [onehot_l, onehot_{l-1}, .., 1] (E*lags + 1; a layer before the first is zeros).
    The fit keeps the sufficient statistics A = X'X and B = X'Y per layer; online updates decay them with a
    half-life in tokens and add the batch, so the map follows task shifts. A load prediction needs only the
    per-layer loads of the batch: (sum_t x_t) @ W, clipped at 0 and rescaled to T*K (the known total). When
    the earlier layers of the batch were not seen (calls out of order), the sub-model on the layers that
    were is solved from the same statistics. Memory: (L-d) (E lags + 1)^2 float64.
    """

    name = "regression"

    def __init__(self, distance: int = 1, lags: int = 3, ridge: float = 1.0,
                 half_life_tokens: float | None = 2048.0):
        super().__init__(distance)
        if not isinstance(lags, (int, np.integer)) or lags < 1:
            raise ValueError(f"lags must be an integer >= 1, got {lags!r}")
        if ridge <= 0:
            raise ValueError(f"ridge must be > 0, got {ridge!r}")
        if half_life_tokens is not None and half_life_tokens <= 0:
            raise ValueError(f"half_life_tokens must be > 0 or None, got {half_life_tokens!r}")
        self.lags, self.ridge, self.half_life_tokens = int(lags), float(ridge), half_life_tokens
        self.xtx: np.ndarray | None = None  # (L-d, D, D)
        self.xty: np.ndarray | None = None  # (L-d, D, E)
        self._weights: dict[tuple[int, int], np.ndarray] = {}  # (layer, lags used) -> W [D', E]

    def _meta(self):
        return {"lags": self.lags, "ridge": self.ridge, "half_life_tokens": self.half_life_tokens}

    def _arrays(self):
        return {"xtx": self.xtx, "xty": self.xty}

    def _restore(self, meta, arrays):
        self.lags, self.ridge, self.half_life_tokens = meta["lags"], meta["ridge"], meta["half_life_tokens"]
        self.xtx, self.xty = arrays["xtx"], arrays["xty"]
        self._weights = {}

    def _features(self, per_layer: list[np.ndarray | None], n_tokens: int) -> np.ndarray:
        """Multi-hot features [T, E*len + 1] of the given layers' topk_ids (None = a layer before the first)."""
        E = self.num_experts
        blocks = [np.zeros((n_tokens, E)) if ids is None else _multi_hot(ids, E) for ids in per_layer]
        return np.concatenate(blocks + [np.ones((n_tokens, 1))], axis=1)

    def fit(self, trace):
        trace = self._check_trace(trace)
        self._set_shape(trace.num_layers, trace.num_experts, trace.top_k)
        L, d, E, m = self.num_layers, self.distance, self.num_experts, self.lags
        D = E * m + 1
        limits.check_bytes("the regression predictor's statistics [L - d, D, D + E]", (L - d) * D * (D + E) * 8)
        self.xtx = np.zeros((L - d, D, D))
        self.xty = np.zeros((L - d, D, E))
        chunk = 4096  # bounds the dense [T, D] feature matrices
        for start in range(0, trace.num_tokens, chunk):
            ids = trace.topk_ids[:, start:start + chunk]
            T = ids.shape[1]
            hot = [_multi_hot(ids[l], E) for l in range(L)]
            for l in range(L - d):
                X = np.concatenate([hot[j] if j >= 0 else np.zeros((T, E)) for j in range(l, l - m, -1)]
                                   + [np.ones((T, 1))], axis=1)
                self.xtx[l] += X.T @ X
                self.xty[l] += X.T @ hot[l + d]
        self._weights = {}
        return self

    def _solve(self, layer: int, used: int) -> np.ndarray:
        W = self._weights.get((layer, used))
        if W is None:
            E = self.num_experts
            idx = np.r_[np.arange(used * E), self.lags * E]  # the layers seen, then the bias
            A = self.xtx[layer][np.ix_(idx, idx)] + self.ridge * np.eye(len(idx))
            A[-1, -1] -= self.ridge  # the bias is not shrunk
            W = np.linalg.solve(A, self.xty[layer][idx])
            self._weights[(layer, used)] = W
        return W

    def _context(self, layer: int, ids: np.ndarray) -> list[np.ndarray | None]:
        """topk_ids of layers layer, layer-1, ..; stops at the first earlier layer not seen in this batch."""
        ctx = [ids]
        for j in range(layer - 1, layer - self.lags, -1):
            if j < 0:
                ctx.append(None)
                continue
            got = self._recalled(j, ids.shape[0])
            if got is None:
                break
            ctx.append(got)
        return ctx

    def update(self, layer, topk_ids, gate_input=None):
        super().update(layer, topk_ids)
        ids = np.asarray(topk_ids)
        src_layer = layer - self.distance
        if ids.shape[0] == 0 or src_layer < 0:
            return
        src = self._recalled(src_layer, ids.shape[0])
        if src is None:
            return
        ctx = self._context(src_layer, src)
        if len(ctx) < self.lags:  # the full context is needed to update the full statistics
            return
        X = self._features(ctx, ids.shape[0])
        w = _decay(ids.shape[0], self.half_life_tokens)
        self.xtx[src_layer] = w * self.xtx[src_layer] + X.T @ X
        self.xty[src_layer] = w * self.xty[src_layer] + X.T @ _multi_hot(ids, self.num_experts)
        for used in range(1, self.lags + 1):
            self._weights.pop((src_layer, used), None)

    def predict(self, layer, topk_ids, gate_input=None):
        layer = self._check_layer(layer)
        ids = self._check_ids(topk_ids)
        self._remember(layer, ids)
        ctx = self._context(layer, ids)
        E, T = self.num_experts, ids.shape[0]
        x = np.concatenate([np.zeros(E) if c is None else expert_loads(c, E).astype(np.float64) for c in ctx]
                           + [np.array([float(T)])])
        pred = np.clip(x @ self._solve(layer, len(ctx)), 0.0, None)
        total = pred.sum()
        return pred * (ids.size / total) if total > 0 else np.full(E, ids.size / E)

    def predict_topk(self, layer, topk_ids, gate_input=None):
        layer = self._check_layer(layer)
        ids = self._check_ids(topk_ids)
        ctx = self._context(layer, ids)
        return _topk_rows(self._features(ctx, ids.shape[0]) @ self._solve(layer, len(ctx)), self.top_k)


# ---- gate replica -------------------------------------------------------------------------------------------
class GateReplicaPredictor(LoadPredictor):
    """The paper's layer-aware predictor: a replica of layer l+d's gate applied to layer l's gate input.

    `gate_weights` [L, E, H]: the model's router weights of the L MoE layers (in trace order). The replica
    for target layer l+d starts as a copy of gate_weights[l+d]; `fit` profiles each replica's top-k recall on
    a 30% validation split and fine-tunes only those below `threshold` (MSE between the replica's logits on
    layer l's gate input and the model's logits of layer l+d, Adam, `lr`, up to `epochs` epochs on the 70%
    split, stopping once recall passes), keeping the best replica seen. Selection: top-k of the logits
    (softmax and sigmoid are monotone) plus `e_score_correction_bias` [L, E] where the model has one;
    group-limited selection (DeepSeek-V3) is not modelled.
    """

    name = "gate-replica"
    needs_gate_inputs = True

    def __init__(self, gate_weights, top_k: int, distance: int = 1, *, threshold: float = 0.8, epochs: int = 15,
                 lr: float = 1e-3, batch_size: int = 256, e_score_correction_bias=None, seed: int = 0):
        super().__init__(distance)
        G = np.asarray(gate_weights, dtype=np.float32)
        if G.ndim != 3:
            raise ValueError(f"gate_weights must be [L, E, H], got shape {G.shape}")
        if not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= G.shape[1]:
            raise ValueError(f"top_k must be an integer in [1, E={G.shape[1]}], got {top_k!r}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
        if epochs < 0 or lr <= 0 or batch_size < 1:
            raise ValueError(f"need epochs >= 0, lr > 0, batch_size >= 1; got {epochs}, {lr}, {batch_size}")
        bias = None if e_score_correction_bias is None else np.asarray(e_score_correction_bias, np.float32)
        if bias is not None and bias.shape != G.shape[:2]:
            raise ValueError(f"e_score_correction_bias must be [L, E]={G.shape[:2]}, got {bias.shape}")
        self.gate_weights, self.bias = G, bias
        self.threshold, self.epochs, self.lr = float(threshold), int(epochs), float(lr)
        self.batch_size, self.seed = int(batch_size), int(seed)
        self._set_shape(G.shape[0], G.shape[1], int(top_k))
        self.replicas = G[self.distance:].copy()  # (L-d, E, H): replica for target layer l+d at index l
        self.profile_recall = np.full(self.num_layers - self.distance, np.nan)  # before fine-tuning
        self.recall = np.full(self.num_layers - self.distance, np.nan)  # after
        self.fine_tuned = np.zeros(self.num_layers - self.distance, dtype=bool)

    @classmethod
    def from_model(cls, model, distance: int = 1, **kwargs) -> "GateReplicaPredictor":
        """Copy the router weights (and top-k) of a Hugging Face MoE model, in layer order."""
        routers = find_routers(model)
        if not routers:
            raise ValueError("model: no MoE router found (expected modules with `.gate` [E, H] and `.experts`)")
        weights = np.stack([r.weight.detach().float().cpu().numpy() for _, r in routers])
        biases = [getattr(r, "e_score_correction_bias", None) for _, r in routers]
        if all(b is not None for b in biases) and "e_score_correction_bias" not in kwargs:
            kwargs["e_score_correction_bias"] = np.stack([b.detach().float().cpu().numpy() for b in biases])
        return cls(weights, router_top_k(model, routers[0][1]), distance, **kwargs)

    def _meta(self):
        return {"threshold": self.threshold, "epochs": self.epochs, "lr": self.lr, "batch_size": self.batch_size,
                "seed": self.seed}

    def _arrays(self):
        out = {"gate_weights": self.gate_weights, "replicas": self.replicas, "profile_recall": self.profile_recall,
               "recall": self.recall, "fine_tuned": self.fine_tuned}
        if self.bias is not None:
            out["bias"] = self.bias
        return out

    def _restore(self, meta, arrays):
        for k in ("threshold", "epochs", "lr", "batch_size", "seed"):
            setattr(self, k, meta[k])
        self.gate_weights, self.replicas = arrays["gate_weights"], arrays["replicas"]
        self.profile_recall, self.recall = arrays["profile_recall"], arrays["recall"]
        self.fine_tuned = arrays["fine_tuned"]
        self.bias = arrays.get("bias")

    def _select(self, logits: np.ndarray, target_layer: int) -> np.ndarray:
        if self.bias is not None:
            logits = 1.0 / (1.0 + np.exp(-logits)) + self.bias[target_layer]  # DeepSeek-V3 scores + bias
        return _topk_rows(logits, self.top_k)

    def _check_gate_input(self, gate_input, n_tokens: int) -> np.ndarray:
        if gate_input is None:
            raise ValueError("gate_input is required by the gate-replica predictor ([T, H] router input)")
        x = np.asarray(gate_input, dtype=np.float32)
        H = self.gate_weights.shape[2]
        if x.shape != (n_tokens, H):
            raise ValueError(f"gate_input must be [T={n_tokens}, H={H}], got {x.shape}")
        return x

    def replica_topk(self, layer: int, gate_input) -> np.ndarray:
        """Top-k of layer `layer + d` predicted from layer `layer`'s gate input [T, H] -> [T, K]."""
        layer = self._check_layer(layer)
        x = np.asarray(gate_input, dtype=np.float32)
        return self._select(x @ self.replicas[layer].T, layer + self.distance)

    def predict(self, layer, topk_ids, gate_input=None):
        return expert_loads(self.predict_topk(layer, topk_ids, gate_input), self.num_experts).astype(np.float64)

    def predict_topk(self, layer, topk_ids, gate_input=None):
        layer = self._check_layer(layer)
        ids = self._check_ids(topk_ids)
        return self.replica_topk(layer, self._check_gate_input(gate_input, ids.shape[0]))

    def fit(self, trace):
        trace = self._check_trace(trace)
        if trace.num_layers != self.num_layers or trace.num_experts != self.num_experts or trace.top_k != self.top_k:
            raise ValueError(f"trace has L, E, K = {trace.num_layers}, {trace.num_experts}, {trace.top_k}; the "
                             f"gates have {self.num_layers}, {self.num_experts}, {self.top_k}")
        if trace.hidden_size != self.gate_weights.shape[2]:
            raise ValueError(f"trace gate_inputs have H={trace.hidden_size}, the gates {self.gate_weights.shape[2]}")
        import torch

        rng = np.random.default_rng(self.seed)
        perm = rng.permutation(trace.num_tokens)
        n_train = int(round(0.7 * trace.num_tokens))
        tr_idx, va_idx = np.sort(perm[:n_train]), np.sort(perm[n_train:])
        if len(va_idx) == 0 or len(tr_idx) == 0:
            raise ValueError("trace is too short for a 7:3 split")
        gen = torch.Generator().manual_seed(self.seed)
        for l in range(self.num_layers - self.distance):
            t = l + self.distance
            x = trace.gate_inputs[l].astype(np.float32)
            true_va = trace.topk_ids[t][va_idx]
            profile = topk_recall(self._select(x[va_idx] @ self.replicas[l].T, t), true_va)
            self.profile_recall[l] = self.recall[l] = profile
            if self.recall[l] >= self.threshold or self.epochs == 0:
                continue
            # targets: the model's own router logits of layer t on its own gate input
            xs = torch.from_numpy(x[tr_idx])
            ys = torch.from_numpy(trace.gate_inputs[t][tr_idx].astype(np.float32) @ self.gate_weights[t].T)
            weight = torch.nn.Parameter(torch.from_numpy(self.replicas[l].copy()))
            opt = torch.optim.Adam([weight], lr=self.lr)
            best = (self.recall[l], self.replicas[l].copy())
            for _ in range(self.epochs):
                order = torch.randperm(len(tr_idx), generator=gen)
                for s in range(0, len(tr_idx), self.batch_size):
                    b = order[s:s + self.batch_size]
                    loss = torch.nn.functional.mse_loss(xs[b] @ weight.T, ys[b])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                w_np = weight.detach().numpy()
                rec = topk_recall(self._select(x[va_idx] @ w_np.T, t), true_va)
                if rec > best[0]:
                    best = (rec, w_np.copy())
                if rec >= self.threshold:
                    break
            self.recall[l], self.replicas[l] = best[0], best[1]
            self.fine_tuned[l] = True
        return self


# ---- registry -----------------------------------------------------------------------------------------------
PREDICTORS: dict[str, type] = {
    cls.name: cls
    for cls in (GateReplicaPredictor, AffinityPredictor, HistoryPredictor, RegressionPredictor, OraclePredictor)
}


def make_predictor(name: str, distance: int = 1, **kwargs) -> LoadPredictor:
    """A predictor by name ("affinity", "history", "regression", "oracle"); the gate replica needs the model's
    gates: use `GateReplicaPredictor.from_model`."""
    if name == GateReplicaPredictor.name:
        raise ValueError("name: build the gate-replica predictor with GateReplicaPredictor.from_model(model)")
    if name not in PREDICTORS:
        raise ValueError(f"name must be one of {sorted(PREDICTORS)}, got {name!r}")
    return PREDICTORS[name](distance, **kwargs)
