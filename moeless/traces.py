"""Routing traces: which experts every token chose in every MoE layer, read from files or captured from a model.

A `RoutingTrace` holds, for N tokens in order and L MoE layers, the router's selections `topk_ids [L, N, K]`
(int32, expert ids in [0, E)), optionally the selected experts' gate weights `gate_probs [L, N, K]` and the
router's input hidden states `gate_inputs [L, N, H]` (what the layer-aware gate-replica predictor needs), plus
`sequence_ids [N]` (which sequence each token belongs to) and optional per-token `task` labels.

Readers (all raise ValueError naming the file, and the line where there is one, on malformed content). Every
reader takes the same options: `top_k` (None: the file's own, detected for ESFT; an int: checked), and
`drop_incomplete` (drop the tokens that lack a row for some layer, counted in `RoutingTrace.dropped_tokens`,
instead of rejecting the file). A token's experts must be distinct, gate weights finite and non-negative, and
every size within `moeless.limits`. Formats: docs/FORMATS.md.
- `read_esft(path)`: DeepSeek ESFT `expert_scores/<task>/expert_weights_<L>.txt[.gz]` files; a task folder or
  a folder of task folders (tasks concatenated, tokens labelled with their task).
- `read_jsonl(path)`: one JSON object per (layer, token): {"layer", "token_idx", "experts", "gating_probs"},
  optionally "dataset" and "problem_id" naming the sequence.
- `read_npz(path)` / `write_npz(trace, path)`: the project's compact format.
- `read_sglang_dump(path)` / `read_sglang_logical_count(path)`: SGLang's expert-distribution recorder dumps
  (per-token routing / per-pass counts; see the end of this module).
- `load_trace(path, fmt)`: one dispatcher over `READERS` (a new format is one reader function and one entry).
- `capture_routing(model, input_ids_batches)`: forward hooks on the routers of a Hugging Face MoE model.

This module is floor 1 (see docs/ARCHITECTURE.md): it must never import the planner, the predictors or the
kernels, and it never changes a model's routing (hooks only read).
"""
from __future__ import annotations

import dataclasses
import gzip
import io
import json
import math
import os
import re
import zipfile
import zlib
from typing import Iterable, Iterator

import numpy as np

from moeless import limits

__all__ = [
    "RoutingTrace",
    "TraceBatch",
    "read_esft",
    "read_jsonl",
    "read_npz",
    "write_npz",
    "load_trace",
    "capture_routing",
    "expert_loads",
    "find_routers",
    "router_top_k",
    "TRACE_FORMATS",
    "READERS",
    "read_sglang_dump",
    "read_sglang_logical_count",
]

_NPZ_VERSION = 1
# what a gzip or text file that cannot be read raises while it is read (BadGzipFile is an OSError)
_UNREADABLE = (OSError, EOFError, UnicodeDecodeError, zlib.error)


@dataclasses.dataclass(frozen=True)
class TraceBatch:
    """One batch of consecutive tokens of a trace: tokens [start, stop)."""

    start: int
    stop: int
    loads: np.ndarray  # (L, E) int64: tokens routed to each expert of each layer
    topk_ids: np.ndarray  # (L, T, K) int32
    gate_inputs: np.ndarray | None  # (L, T, H) or None

    @property
    def num_tokens(self) -> int:
        return self.stop - self.start


@dataclasses.dataclass
class RoutingTrace:
    """Per-layer routing of N tokens in order. See the module docstring for the arrays' meaning."""

    topk_ids: np.ndarray  # (L, N, K) int32
    num_experts: int
    sequence_ids: np.ndarray | None = None  # (N,) int64; None = all tokens one sequence
    gate_probs: np.ndarray | None = None  # (L, N, K) float32
    gate_inputs: np.ndarray | None = None  # (L, N, H) float16 / float32
    task: np.ndarray | None = None  # (N,) str
    layer_ids: np.ndarray | None = None  # (L,) int64: the model's index of each MoE layer
    dropped_tokens: int = 0  # tokens the reader dropped for lacking a row for some layer (drop_incomplete)

    def __post_init__(self):
        ids = np.asarray(self.topk_ids)
        if ids.ndim != 3:
            raise ValueError(f"topk_ids must be [L, N, K], got shape {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"topk_ids must be integer, got {ids.dtype}")
        self.num_experts = limits.check_int("num_experts", self.num_experts, 1, limits.MAX_EXPERTS)
        limits.check_trace_shape(*ids.shape, self.num_experts, "topk_ids [L, N, K]")
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_experts):
            raise ValueError(
                f"topk_ids must lie in [0, num_experts={self.num_experts}), got [{ids.min()}, {ids.max()}]"
            )
        self.topk_ids = ids.astype(np.int32, copy=False)
        L, N, K = ids.shape
        if self.sequence_ids is None:
            self.sequence_ids = np.zeros(N, dtype=np.int64)
        self.sequence_ids = np.asarray(self.sequence_ids, dtype=np.int64)
        if self.sequence_ids.shape != (N,):
            raise ValueError(f"sequence_ids must be [N={N}], got shape {self.sequence_ids.shape}")
        if self.gate_probs is not None:
            self.gate_probs = np.asarray(self.gate_probs, dtype=np.float32)
            if self.gate_probs.shape != ids.shape:
                raise ValueError(f"gate_probs must be [L, N, K]={ids.shape}, got shape {self.gate_probs.shape}")
        if self.gate_inputs is not None:
            gi = np.asarray(self.gate_inputs)
            if gi.ndim != 3 or gi.shape[:2] != (L, N):
                raise ValueError(f"gate_inputs must be [L={L}, N={N}, H], got shape {gi.shape}")
            if gi.dtype not in (np.float16, np.float32):
                gi = gi.astype(np.float32)
            self.gate_inputs = gi
        if self.task is not None:
            self.task = np.asarray(self.task, dtype=str)
            if self.task.shape != (N,):
                raise ValueError(f"task must be [N={N}] labels, got shape {self.task.shape}")
        if self.layer_ids is None:
            self.layer_ids = np.arange(L, dtype=np.int64)
        self.layer_ids = np.asarray(self.layer_ids, dtype=np.int64)
        if self.layer_ids.shape != (L,):
            raise ValueError(f"layer_ids must be [L={L}], got shape {self.layer_ids.shape}")
        if L and (self.layer_ids.min() < 0 or len(np.unique(self.layer_ids)) != L):
            raise ValueError(f"layer_ids must be distinct and >= 0, got {self.layer_ids.tolist()}")
        self.dropped_tokens = limits.check_int("dropped_tokens", self.dropped_tokens, 0)
        if self.gate_probs is not None:
            bad = ~np.isfinite(self.gate_probs) | (self.gate_probs < 0)
            if bad.any():
                l, n, k = (int(i) for i in np.argwhere(bad)[0])
                raise ValueError(f"gate_probs must be finite and >= 0, got {self.gate_probs[l, n, k]} at layer "
                                 f"index {l}, token {n}")

    # ---- shape -------------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.topk_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.topk_ids.shape[1]

    @property
    def top_k(self) -> int:
        return self.topk_ids.shape[2]

    @property
    def hidden_size(self) -> int | None:
        return None if self.gate_inputs is None else self.gate_inputs.shape[2]

    @property
    def tasks(self) -> list[str]:
        """Task names in order of first appearance ([] when the trace has no task labels)."""
        if self.task is None:
            return []
        _, first = np.unique(self.task, return_index=True)
        return [str(self.task[i]) for i in sorted(first)]

    def __len__(self) -> int:
        return self.num_tokens

    # ---- loads and batches ---------------------------------------------------------------------------------
    def loads(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Per-layer per-expert token counts [L, E] (int64) of tokens [start, stop)."""
        return expert_loads(self.topk_ids[:, start:stop], self.num_experts)

    def batches(self, n_tokens: int, *, drop_last: bool = False) -> Iterator[TraceBatch]:
        """Consecutive batches of `n_tokens` tokens in trace order (the last one shorter unless drop_last)."""
        if not isinstance(n_tokens, (int, np.integer)) or n_tokens < 1:
            raise ValueError(f"n_tokens must be a positive int, got {n_tokens!r}")
        N = self.num_tokens
        for start in range(0, N, int(n_tokens)):
            stop = min(start + int(n_tokens), N)
            if drop_last and stop - start < n_tokens:
                return
            ids = self.topk_ids[:, start:stop]
            gi = None if self.gate_inputs is None else self.gate_inputs[:, start:stop]
            yield TraceBatch(start, stop, expert_loads(ids, self.num_experts), ids, gi)

    # ---- selections ----------------------------------------------------------------------------------------
    def select_tokens(self, index) -> "RoutingTrace":
        """A new trace of the tokens chosen by `index` (a slice, a bool mask [N] or an int array), in order."""
        if isinstance(index, slice):
            idx = index
        else:
            idx = np.asarray(index)
            if idx.dtype == bool:
                if idx.shape != (self.num_tokens,):
                    raise ValueError(f"index mask must be [N={self.num_tokens}], got shape {idx.shape}")
                idx = np.flatnonzero(idx)
        return RoutingTrace(
            topk_ids=self.topk_ids[:, idx],
            num_experts=self.num_experts,
            sequence_ids=self.sequence_ids[idx],
            gate_probs=None if self.gate_probs is None else self.gate_probs[:, idx],
            gate_inputs=None if self.gate_inputs is None else self.gate_inputs[:, idx],
            task=None if self.task is None else self.task[idx],
            layer_ids=self.layer_ids,
        )

    def select_tasks(self, names: Iterable[str]) -> "RoutingTrace":
        """The tokens whose task label is in `names` (trace order kept)."""
        names = [names] if isinstance(names, str) else list(names)
        if self.task is None:
            raise ValueError("this trace has no task labels; select_tasks needs them")
        unknown = sorted(set(names) - set(self.tasks))
        if unknown:
            raise ValueError(f"names: unknown task(s) {unknown}; the trace has {self.tasks}")
        return self.select_tokens(np.isin(self.task, names))

    def split_sequences(self, fraction: float) -> tuple["RoutingTrace", "RoutingTrace"]:
        """Split by whole sequences, in order: the first `fraction` of sequences, then the rest."""
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"fraction must be in (0, 1), got {fraction}")
        # a change of id between consecutive tokens starts a new sequence (ids may repeat across tasks)
        starts = np.flatnonzero(np.r_[True, np.diff(self.sequence_ids) != 0])
        if len(starts) > 1:
            cut = int(starts[min(max(int(round(fraction * len(starts))), 1), len(starts) - 1)])
        else:  # one sequence: cut by tokens
            cut = int(round(fraction * self.num_tokens))
        return self.select_tokens(slice(0, cut)), self.select_tokens(slice(cut, None))

    @staticmethod
    def concat(traces: Iterable["RoutingTrace"]) -> "RoutingTrace":
        """Tokens of several traces one after the other (same L, K, E; sequence ids kept distinct)."""
        traces = list(traces)
        if not traces:
            raise ValueError("traces must not be empty")
        first = traces[0]
        for i, t in enumerate(traces[1:], 1):
            if t.topk_ids.shape[0] != first.topk_ids.shape[0] or t.top_k != first.top_k:
                raise ValueError(f"traces[{i}] has [L, N, K]={t.topk_ids.shape}, traces[0] {first.topk_ids.shape}")
            if t.num_experts != first.num_experts:
                raise ValueError(f"traces[{i}] has num_experts={t.num_experts}, traces[0] {first.num_experts}")
        seq, offset = [], 0
        for t in traces:
            seq.append(t.sequence_ids + offset)
            offset += int(t.sequence_ids.max(initial=-1)) + 1

        def cat(field, axis):
            vals = [getattr(t, field) for t in traces]
            if any(v is None for v in vals):
                return None
            return np.concatenate(vals, axis=axis)

        return RoutingTrace(
            topk_ids=cat("topk_ids", 1),
            num_experts=first.num_experts,
            sequence_ids=np.concatenate(seq),
            gate_probs=cat("gate_probs", 1),
            gate_inputs=cat("gate_inputs", 1),
            task=cat("task", 0),
            layer_ids=first.layer_ids,
            dropped_tokens=sum(t.dropped_tokens for t in traces),
        )


def _check_distinct(topk_ids: np.ndarray) -> None:
    """A token's top-k experts are distinct: a repeat in a file means a misread trace (e.g. the wrong top-k).
    The readers check it; the constructor does not, because load-level callers build traces whose grouping of
    pairs into tokens is arbitrary (moeless.sim.policies.synthetic_topk)."""
    if topk_ids.shape[2] < 2 or topk_ids.size == 0:
        return
    s = np.sort(topk_ids, axis=2)
    rep = (s[..., 1:] == s[..., :-1]).any(axis=2)
    if rep.any():
        l, n = (int(i) for i in np.argwhere(rep)[0])
        raise ValueError(f"topk_ids: token {n} of layer index {l} repeats an expert ({topk_ids[l, n].tolist()}); "
                         f"a token's top-k experts are distinct (is top_k={topk_ids.shape[2]} right?)")


def expert_loads(topk_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """Token counts per expert: topk_ids [..., T, K] -> [..., E] int64 (one count per (token, k) pair)."""
    ids = np.asarray(topk_ids)
    lead = ids.shape[:-2]
    flat = ids.reshape(int(np.prod(lead, dtype=np.int64)), -1).astype(np.int64)
    rows = np.arange(flat.shape[0], dtype=np.int64)[:, None] * num_experts
    counts = np.bincount((flat + rows).ravel(), minlength=flat.shape[0] * num_experts)
    return counts.reshape(*lead, num_experts)


# ---- shared by the readers ----------------------------------------------------------------------------------
def _open_text(path: str):
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _unreadable(path: str, exc: Exception) -> ValueError:
    what = "a truncated or corrupt gzip file" if path.endswith(".gz") else "not a readable text file"
    return ValueError(f"{path}: {what} ({type(exc).__name__}: {exc})")


def _check_top_k(top_k) -> int | None:
    return None if top_k is None else limits.check_int("top_k", top_k, 1, limits.MAX_TOP_K)


def _expert_limit(num_experts) -> int:
    if num_experts is None:
        return limits.MAX_EXPERTS
    return limits.check_int("num_experts", num_experts, 1, limits.MAX_EXPERTS)


def _id_range_error(where: str, expert: int, num_experts) -> ValueError:
    if num_experts is None:
        return ValueError(f"{where}: expert id {expert} is outside [0, {limits.MAX_EXPERTS}) "
                          f"(at most {limits.MAX_EXPERTS} experts: moeless.limits.MAX_EXPERTS)")
    return ValueError(f"{where}: expert id {expert} is outside [0, num_experts={num_experts})")


def _incomplete_hint(n: int) -> str:
    return (f"pass drop_incomplete=True (--drop-incomplete) to drop the {n} token(s) that lack a row for some "
            "layer")


# ---- ESFT ---------------------------------------------------------------------------------------------------
_ESFT_FILE = re.compile(r"^expert_weights_(\d+)\.txt(\.gz)?$")
# Top-k detection: how many shared experts the rejected alternative (a smaller top-k) predicts where none was
# seen. exp(-20) = 2e-9 is the chance of seeing none were the smaller top-k true.
_DETECT_EVIDENCE = 20.0


@dataclasses.dataclass
class _EsftLayer:
    """One `expert_weights_<L>.txt[.gz]` file as read: per line (sequence), its ids and weights, token-major."""

    path: str
    layer: int
    ids: list  # per line: expert ids, 1-D int64
    weights: list  # per line: gate weights, 1-D float32
    linenos: list  # per line: its line number in the file


def _esft_layer_files(folder: str) -> list[tuple[int, str]]:
    found = []
    for name in os.listdir(folder):
        m = _ESFT_FILE.match(name)
        if m:
            layer = int(m.group(1))
            if layer >= limits.MAX_LAYERS:
                raise ValueError(f"{os.path.join(folder, name)}: layer {layer} is outside [0, {limits.MAX_LAYERS}) "
                                 "(moeless.limits.MAX_LAYERS)")
            found.append((layer, os.path.join(folder, name)))
    return sorted(found)


def _read_esft_file(path: str, layer: int, num_experts) -> _EsftLayer:
    limit = _expert_limit(num_experts)
    out = _EsftLayer(path, layer, [], [], [])
    try:
        with _open_text(path) as fh:
            for lineno, line in enumerate(fh, 1):
                line = line.rstrip("\n")
                if not line:
                    continue
                where = f"{path}:{lineno}"
                parts = line.split("\t\t")
                if len(parts) != 2:
                    raise ValueError(f"{where}: expected 'ids<TAB><TAB>weights', found {len(parts)} parts")
                try:
                    ids = np.array(parts[0].split("\t"), dtype=np.int64)
                    with np.errstate(over="ignore"):
                        w = np.array(parts[1].split("\t"), dtype=np.float32)
                except (ValueError, OverflowError) as exc:
                    raise ValueError(f"{where}: not a number ({exc})") from None
                if ids.size != w.size:
                    raise ValueError(f"{where}: {ids.size} expert ids but {w.size} gate weights")
                bad = (ids < 0) | (ids >= limit)
                if bad.any():
                    raise _id_range_error(where, int(ids[bad][0]), num_experts)
                if not np.isfinite(w).all() or (w < 0).any():
                    raise ValueError(f"{where}: gate weights must be finite and >= 0, got "
                                     f"{w[~np.isfinite(w) | (w < 0)][0]}")
                out.ids.append(ids)
                out.weights.append(w)
                out.linenos.append(lineno)
    except _UNREADABLE as exc:
        raise _unreadable(path, exc) from None
    return out


def _read_esft_task(folder: str, num_experts) -> list[_EsftLayer]:
    files = _esft_layer_files(folder)
    if len({lid for lid, _ in files}) != len(files):
        raise ValueError(f"{folder}: a layer has both .txt and .txt.gz files")
    return [_read_esft_file(path, lid, num_experts) for lid, path in files]


def _first_repeat(flat: np.ndarray, k: int) -> int | None:
    """Index of the first k-group of `flat` that repeats an id (None: every group is distinct)."""
    if k < 2:
        return None
    s = np.sort(flat.reshape(-1, k), axis=1)
    rep = np.flatnonzero((s[:, 1:] == s[:, :-1]).any(axis=1))
    return int(rep[0]) if rep.size else None


def _esft_top_k(layers: list[_EsftLayer], top_k) -> int:
    """The given top-k, checked (every line a multiple of it, a token's experts distinct), or the detected one."""
    if top_k is None:
        return _detect_esft_top_k(layers)
    for layer in layers:
        for ids, lineno in zip(layer.ids, layer.linenos):
            if ids.size % top_k:
                raise ValueError(f"{layer.path}:{lineno}: {ids.size} expert ids, not a multiple of top_k={top_k}")
            t = _first_repeat(ids, top_k)
            if t is not None:
                raise ValueError(f"{layer.path}:{lineno}: token {t} repeats an expert "
                                 f"({ids.reshape(-1, top_k)[t].tolist()}) with top_k={top_k}; a token's experts are "
                                 "distinct: is top_k right? (leave it out to detect it)")
    return top_k


def _detect_esft_top_k(layers: list[_EsftLayer]) -> int:
    """The largest K that divides every line and leaves no token with a repeated expert, provided the data rule
    out every smaller K' dividing it: were K' the top-k, adjacent K'-groups inside a K-group would share experts
    as often as adjacent K'-groups across K-groups do; seeing none where `_DETECT_EVIDENCE` are expected is
    the evidence. ESFT lines give no top-k of their own, and a wrong one makes tokens of several real ones."""
    lengths = [ids.size for layer in layers for ids in layer.ids]
    if not lengths:
        raise ValueError(f"{os.path.dirname(layers[0].path)}: the ESFT files hold no token" if layers else
                         "no ESFT layer file")
    g = math.gcd(*lengths)
    flats = [np.concatenate(layer.ids) for layer in layers]
    top = min(g, limits.MAX_TOP_K)
    K = next(k for k in range(top, 0, -1) if g % k == 0 and all(_first_repeat(f, k) is None for f in flats))
    for k in (d for d in range(1, K) if K % d == 0):
        within = cross = shared = 0
        for layer, flat in zip(layers, flats):
            w, c, s = _adjacent_sharing(flat, [ids.size for ids in layer.ids], K, k)
            within, cross, shared = within + w, cross + c, shared + s
        expected = within * shared / cross if cross else 0.0
        if expected < _DETECT_EVIDENCE:
            where = os.path.dirname(layers[0].path)
            raise ValueError(f"{where}: cannot tell the top-k of this ESFT trace from its "
                             f"{sum(lengths) // K // len(layers)} tokens per layer (top-k {K} fits, and too few tokens share experts to rule out "
                             f"{k}); pass top_k (--top-k), the model's experts per token")
    return K


def _adjacent_sharing(flat: np.ndarray, line_sizes: list, K: int, k: int) -> tuple[int, int, int]:
    """Over adjacent k-groups of one layer (never across lines): (pairs inside a K-group, pairs across K-groups,
    pairs across K-groups that share an expert)."""
    sub = flat.reshape(-1, k)
    starts = np.zeros(len(sub) + 1, dtype=bool)
    starts[np.cumsum([0] + line_sizes) // k] = True
    valid = ~starts[1:len(sub)]  # pair (i, i + 1) stays in its line
    across = (np.arange(1, len(sub)) % (K // k)) == 0
    share = (sub[:-1, :, None] == sub[1:, None, :]).any(axis=(1, 2))
    return int((valid & ~across).sum()), int((valid & across).sum()), int((valid & across & share).sum())


def _esft_task_arrays(layers: list[_EsftLayer], K: int, drop_incomplete: bool):
    """(ids [L, N, K], weights [L, N, K], sequence ids [N], layer ids [L], dropped tokens) of one task folder."""
    n_lines = [len(layer.ids) for layer in layers]
    if len(set(n_lines)) > 1 and not drop_incomplete:
        short = layers[int(np.argmin(n_lines))]
        raise ValueError(f"{short.path}: {min(n_lines)} lines (sequences), {layers[int(np.argmax(n_lines))].path} has "
                         f"{max(n_lines)}; every layer file must hold the same sequences ("
                         f"{_incomplete_hint(_esft_lost(layers, K))})")
    n_seq = min(n_lines)
    counts = np.array([[ids.size // K for ids in layer.ids[:n_seq]] for layer in layers]).reshape(len(layers), n_seq)
    keep = counts.min(axis=0)
    if (counts != keep).any() and not drop_incomplete:
        li, si = (int(i) for i in np.argwhere(counts != keep)[0])
        ref = int(np.argmin(counts[:, si]))
        raise ValueError(f"{layers[li].path}:{layers[li].linenos[si]}: {counts[li, si]} tokens, but "
                         f"{layers[ref].path}:{layers[ref].linenos[si]} has {counts[ref, si]}; every layer file "
                         f"must hold the same tokens ({_incomplete_hint(_esft_lost(layers, K))})")
    ids = np.stack([np.concatenate([np.zeros((0, K), np.int64)] + [a.reshape(-1, K)[:n] for a, n in
                                                                    zip(layer.ids, keep)]) for layer in layers])
    w = np.stack([np.concatenate([np.zeros((0, K), np.float32)] + [a.reshape(-1, K)[:n] for a, n in
                                                                    zip(layer.weights, keep)]) for layer in layers])
    seq = np.repeat(np.arange(n_seq, dtype=np.int64), keep)
    layer_ids = np.array([layer.layer for layer in layers], dtype=np.int64)
    return ids, w, seq, layer_ids, _esft_lost(layers, K)


def _esft_lost(layers: list[_EsftLayer], K: int) -> int:
    """Tokens some layer file holds and another lacks (whole sequences included)."""
    n_max = max(len(layer.ids) for layer in layers)
    counts = np.zeros((len(layers), n_max), dtype=np.int64)
    for i, layer in enumerate(layers):
        counts[i, :len(layer.ids)] = [a.size // K for a in layer.ids]
    return int((counts.max(axis=0) - counts.min(axis=0)).sum())


def read_esft(path: str, *, top_k: int | None = None, num_experts: int | None = None,
              drop_incomplete: bool = False) -> RoutingTrace:
    """Read DeepSeek ESFT expert scores: one task folder, or a folder holding task folders (concatenated).

    Line i of every `expert_weights_<L>.txt[.gz]` is the same sequence; a line is the token-major expert ids,
    a double tab, then the matching gate weights. `top_k` None detects it (see `_detect_esft_top_k`; an error
    asks for it when the data cannot tell); a given top_k is checked. `num_experts` defaults to the width of
    `summary.json`'s per-layer shares when present, else to the largest id + 1. `drop_incomplete` keeps, of each
    sequence, the tokens every layer file holds (the rest are counted in `dropped_tokens`).
    """
    if not os.path.isdir(path):
        raise ValueError(f"path: {path!r} is not a directory (an ESFT task folder or expert_scores folder)")
    top_k = _check_top_k(top_k)
    if _esft_layer_files(path):
        task_dirs = [path]
    else:
        task_dirs = sorted(
            os.path.join(path, d) for d in os.listdir(path)
            if os.path.isdir(os.path.join(path, d)) and _esft_layer_files(os.path.join(path, d))
        )
    if not task_dirs:
        raise ValueError(f"path: no expert_weights_<L>.txt[.gz] files in {path!r} or its subfolders")
    raw = [_read_esft_task(d, num_experts) for d in task_dirs]
    for d, layers in zip(task_dirs[1:], raw[1:]):
        got, want = [x.layer for x in layers], [x.layer for x in raw[0]]
        if got != want:
            raise ValueError(f"{d}: layers {got} differ from {task_dirs[0]}'s {want}")
    K = _esft_top_k([layer for layers in raw for layer in layers], top_k)
    parts = [(*_esft_task_arrays(layers, K, drop_incomplete), os.path.basename(os.path.normpath(d)))
             for d, layers in zip(task_dirs, raw)]
    if sum(p[0].shape[1] for p in parts) == 0:
        raise ValueError(f"{path}: no token is held by every layer file")
    if num_experts is None:
        num_experts = _esft_num_experts(task_dirs)
    if num_experts is None:
        num_experts = int(max(p[0].max(initial=-1) for p in parts)) + 1
    try:
        traces = [
            RoutingTrace(topk_ids=ids, num_experts=num_experts, sequence_ids=seq, gate_probs=w,
                         task=np.full(ids.shape[1], name), layer_ids=lids, dropped_tokens=lost)
            for ids, w, seq, lids, lost, name in parts
        ]
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return traces[0] if len(traces) == 1 else RoutingTrace.concat(traces)


def _esft_num_experts(task_dirs: list[str]) -> int | None:
    for d in task_dirs:
        p = os.path.join(d, "summary.json")
        if os.path.exists(p):
            try:
                with open(p, encoding="utf-8") as fh:
                    shares = json.load(fh).get("token_scores")
                if isinstance(shares, dict):  # {layer: {expert: share}} or {layer: [shares]}
                    shares = list(shares.values())
                row = shares[0]
                return len(row)
            except (ValueError, TypeError, KeyError, IndexError, AttributeError):
                return None  # summary.json is advisory; fall back to the ids
    return None


# ---- JSONL --------------------------------------------------------------------------------------------------
def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _jsonl_row(row, where: str, top_k, limit: int, num_experts) -> tuple[int, int, list, list | None]:
    """(layer, token_idx, experts, gating_probs or None) of one checked row."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object")
    missing = [k for k in ("layer", "token_idx", "experts") if k not in row]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}")
    layer, tok, experts = row["layer"], row["token_idx"], row["experts"]
    if not _is_int(layer) or not 0 <= layer < limits.MAX_LAYERS:
        raise ValueError(f"{where}: 'layer' must be an integer in [0, {limits.MAX_LAYERS}), got {layer!r}")
    if not _is_int(tok) or not 0 <= tok < 2**62:
        raise ValueError(f"{where}: 'token_idx' must be a non-negative integer, got {tok!r}")
    if not isinstance(experts, list) or not experts or not all(_is_int(e) for e in experts):
        raise ValueError(f"{where}: 'experts' must be a non-empty list of non-negative ints")
    bad = [e for e in experts if not 0 <= e < limit]
    if bad:
        raise _id_range_error(where, bad[0], num_experts)
    if len(experts) > limits.MAX_TOP_K:
        raise ValueError(f"{where}: {len(experts)} experts; at most {limits.MAX_TOP_K} (moeless.limits.MAX_TOP_K)")
    if len(set(experts)) != len(experts):
        raise ValueError(f"{where}: 'experts' repeats an expert ({experts}); a token's experts are distinct")
    if top_k is not None and len(experts) != top_k:
        raise ValueError(f"{where}: {len(experts)} experts, but top_k={top_k}")
    probs = row.get("gating_probs")
    if probs is not None:
        if not isinstance(probs, list) or len(probs) != len(experts):
            raise ValueError(f"{where}: 'gating_probs' must be a list as long as 'experts' ({len(experts)})")
        if not all(isinstance(p, (int, float)) and not isinstance(p, bool) and math.isfinite(p) and p >= 0
                   for p in probs):
            raise ValueError(f"{where}: 'gating_probs' must be finite numbers >= 0, got {probs}")
    return layer, tok, experts, probs


def _sequence_name(seq_key: tuple) -> str:
    dataset, problem = seq_key
    return f"sequence (dataset={dataset!r}, problem_id={problem!r})" if dataset or problem else "the sequence"


def read_jsonl(path: str, *, top_k: int | None = None, num_experts: int | None = None,
               drop_incomplete: bool = False) -> RoutingTrace:
    """Read one JSON object per (layer, token): {"layer", "token_idx", "experts": [...], "gating_probs": [...]}.

    Optional "dataset" and "problem_id" name the sequence (and "dataset" becomes the task label); tokens are
    ordered by the first appearance of their sequence, then by token_idx. Every (layer, token) must appear
    exactly once, with the same number of experts (`top_k` when given), all distinct. A token without a row
    for some layer is an error, or with `drop_incomplete` dropped and counted in `dropped_tokens`.
    """
    if not os.path.isfile(path):
        raise ValueError(f"path: {path!r} is not a file")
    top_k = _check_top_k(top_k)
    limit = _expert_limit(num_experts)
    rows: dict[tuple, dict[int, tuple[list, list | None]]] = {}
    seq_order: dict[tuple, int] = {}
    layers: set[int] = set()
    with_probs = without_probs = 0
    try:
        with _open_text(path) as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{where}: not JSON ({exc.msg})") from None
                layer, tok, experts, probs = _jsonl_row(row, where, top_k, limit, num_experts)
                if top_k is None:
                    top_k = len(experts)
                elif len(experts) != top_k:
                    raise ValueError(f"{where}: {len(experts)} experts, earlier rows have {top_k}")
                with_probs += probs is not None
                without_probs += probs is None
                if with_probs and without_probs:
                    raise ValueError(f"{where}: some rows have 'gating_probs' and some do not")
                seq_key = (str(row.get("dataset", "")), str(row.get("problem_id", "")))
                seq_order.setdefault(seq_key, len(seq_order))
                per_layer = rows.setdefault((seq_key, tok), {})
                if layer in per_layer:
                    raise ValueError(f"{where}: duplicate row for layer {layer}, token {tok} of "
                                     f"{_sequence_name(seq_key)}")
                per_layer[layer] = (experts, probs)
                layers.add(layer)
    except _UNREADABLE as exc:
        raise _unreadable(path, exc) from None
    if not rows:
        raise ValueError(f"{path}: no rows")
    layer_ids = sorted(layers)
    L = len(layer_ids)
    keys = sorted(rows, key=lambda k: (seq_order[k[0]], k[1]))
    incomplete = [k for k in keys if len(rows[k]) != L]
    if incomplete and not drop_incomplete:
        key = incomplete[0]
        lost = sorted(set(layer_ids) - set(rows[key]))
        raise ValueError(f"{path}: token {key[1]} of {_sequence_name(key[0])} has no row for layer(s) {lost}; "
                         f"{_incomplete_hint(len(incomplete))}")
    if incomplete:
        keys = [k for k in keys if len(rows[k]) == L]
        if not keys:
            raise ValueError(f"{path}: no token has a row for every layer {layer_ids}")
    N = len(keys)
    ids = np.empty((L, N, top_k), dtype=np.int64)
    probs = np.empty((L, N, top_k), dtype=np.float32) if with_probs else None
    for n, key in enumerate(keys):
        per_layer = rows[key]
        for li, layer in enumerate(layer_ids):
            e, p = per_layer[layer]
            ids[li, n] = e
            if probs is not None:
                probs[li, n] = p
    seq = np.array([seq_order[k[0]] for k in keys], dtype=np.int64)
    datasets = [k[0][0] for k in keys]
    task = np.array(datasets) if any(datasets) else None
    if num_experts is None:
        num_experts = int(ids.max()) + 1
    return RoutingTrace(topk_ids=ids, num_experts=num_experts, sequence_ids=seq, gate_probs=probs, task=task,
                        layer_ids=np.array(layer_ids, dtype=np.int64), dropped_tokens=len(incomplete))


# ---- npz ----------------------------------------------------------------------------------------------------
def write_npz(trace: RoutingTrace, path: str, *, compress: bool = True) -> None:
    """Write the project's compact trace format (numpy .npz; no pickled objects)."""
    if not isinstance(trace, RoutingTrace):
        raise ValueError(f"trace must be a RoutingTrace, got {type(trace).__name__}")
    arrays = {
        "format_version": np.int64(_NPZ_VERSION),
        "num_experts": np.int64(trace.num_experts),
        "topk_ids": trace.topk_ids,
        "sequence_ids": trace.sequence_ids,
        "layer_ids": trace.layer_ids,
    }
    for name in ("gate_probs", "gate_inputs", "task"):
        value = getattr(trace, name)
        if value is not None:
            arrays[name] = value
    (np.savez_compressed if compress else np.savez)(path, **arrays)


def _npz_bytes(z) -> int:
    """The bytes the arrays of an open .npz will take once read, from their headers (nothing is read)."""
    total = 0
    for member in z.zip.namelist():
        with z.zip.open(member) as fh:
            version = np.lib.format.read_magic(fh)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(fh)
        total += math.prod(shape) * dtype.itemsize
    return total


def load_npz_arrays(path: str, what: str) -> dict[str, np.ndarray]:
    """Every array of an .npz file (no pickles); a ValueError saying `what` the file is not, on failure. The
    arrays' sizes are read from their headers first: more than `limits.MAX_ARRAY_BYTES` is refused unread."""
    if not os.path.isfile(path):
        raise ValueError(f"path: {path!r} is not a file")
    try:
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "zip"):
                raise ValueError("a single .npy array, not an .npz archive")
            size = _npz_bytes(z)
            if size > limits.MAX_ARRAY_BYTES:
                raise ValueError(f"its arrays take {size / 2**30:.1f} GiB, more than the {limits.MAX_ARRAY_BYTES / 2**30:.0f} "
                                 "GiB of moeless.limits.MAX_ARRAY_BYTES")
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, KeyError, AttributeError, zipfile.BadZipFile, zlib.error) as exc:
        raise ValueError(f"{path}: {what} ({exc or type(exc).__name__})") from None


def read_npz(path: str, *, top_k: int | None = None, num_experts: int | None = None,
             drop_incomplete: bool = False) -> RoutingTrace:
    """Read a trace written by `write_npz` (always complete: `drop_incomplete` has nothing to drop); a given
    `top_k` or `num_experts` must match the file's."""
    top_k = _check_top_k(top_k)
    data = load_npz_arrays(path, "not a readable .npz file")
    missing = [k for k in ("format_version", "num_experts", "topk_ids") if k not in data]
    if missing:
        raise ValueError(f"{path}: not a moeless trace, missing array(s) {missing}")
    if data["format_version"].size != 1 or int(data["format_version"]) != _NPZ_VERSION:
        raise ValueError(f"{path}: trace format version {data['format_version'].tolist()}, expected {_NPZ_VERSION}")
    try:
        trace = RoutingTrace(
            topk_ids=data["topk_ids"],
            num_experts=data["num_experts"].item() if data["num_experts"].size == 1 else data["num_experts"],
            sequence_ids=data.get("sequence_ids"),
            gate_probs=data.get("gate_probs"),
            gate_inputs=data.get("gate_inputs"),
            task=data.get("task"),
            layer_ids=data.get("layer_ids"),
        )
        _check_distinct(trace.topk_ids)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    if top_k is not None and trace.top_k != top_k:
        raise ValueError(f"{path}: the trace has top-k {trace.top_k}, but top_k={top_k}")
    if num_experts is not None and trace.num_experts != num_experts:
        raise ValueError(f"{path}: the trace has {trace.num_experts} experts, but num_experts={num_experts}")
    return trace


# ---- dispatch -----------------------------------------------------------------------------------------------
# format name -> reader(path, *, top_k=None, num_experts=None, drop_incomplete=False) -> RoutingTrace.
# A new format is one reader with these options and one entry here (and a line in docs/FORMATS.md).
READERS = {"esft": read_esft, "jsonl": read_jsonl, "npz": read_npz}
TRACE_FORMATS = tuple(READERS)


def guess_format(path: str) -> str:
    """The format of `path` from its name: a folder is ESFT, .npz npz, .jsonl[.gz] / .json JSONL."""
    if os.path.isdir(path):
        return "esft"
    if path.endswith(".npz"):
        return "npz"
    if path.endswith((".jsonl", ".jsonl.gz", ".json")):
        return "jsonl"
    raise ValueError(f"fmt: cannot guess the trace format of {path!r}; pass one of {TRACE_FORMATS}")


def load_trace(path: str, fmt: str | None = None, **options) -> RoutingTrace:
    """Read a trace in format `fmt` (a key of READERS); None guesses from the path. `options` go to the reader
    (top_k, num_experts, drop_incomplete)."""
    if fmt is None:
        fmt = guess_format(path)
    if fmt not in READERS:
        raise ValueError(f"fmt must be one of {TRACE_FORMATS}, got {fmt!r}")
    return READERS[fmt](path, **options)


# ---- capture from a Hugging Face model ----------------------------------------------------------------------
def find_routers(model) -> list[tuple[str, object]]:
    """(name, module) of every MoE router of a Hugging Face model, in layer order.

    A router is the `gate` of a module that also has `experts` (the layout of Mixtral, OLMoE, Qwen-MoE,
    DeepSeek, PhiMoE in transformers), with a 2-D weight [E, H].
    """
    found = []
    for name, module in model.named_modules():
        gate = getattr(module, "gate", None)
        if gate is None or getattr(module, "experts", None) is None:
            continue
        weight = getattr(gate, "weight", None)
        if weight is None or weight.ndim != 2:
            continue
        found.append((f"{name}.gate" if name else "gate", gate))
    return found


def router_top_k(model, router) -> int:
    for obj in (router, getattr(model, "config", None)):
        for attr in ("top_k", "num_experts_per_tok", "moe_topk"):
            k = getattr(obj, attr, None)
            if isinstance(k, int) and k > 0:
                return k
    raise ValueError("model: cannot tell the router's top-k (no top_k / num_experts_per_tok)")


def capture_routing(model, input_ids_batches, *, gate_inputs: bool = True,
                    gate_input_dtype="float32") -> RoutingTrace:
    """Run `model` on each batch and record every MoE router's input and selections.

    `input_ids_batches`: an iterable of LongTensor [B, S] (or [S]), or of dicts with "input_ids" and optional
    "attention_mask" (tokens with mask 0 are not recorded). Each row is one sequence; tokens are recorded in
    row-major order. The hooks only read: the model's outputs are unchanged.
    """
    import torch  # local: the readers above must work without torch

    routers = find_routers(model)
    if not routers:
        raise ValueError("model: no MoE router found (expected modules with `.gate` [E, H] and `.experts`)")
    ks = [router_top_k(model, r) for _, r in routers]
    num_experts = int(routers[0][1].weight.shape[0])
    if any(r.weight.shape[0] != num_experts for _, r in routers) or len(set(ks)) != 1:
        raise ValueError("model: MoE layers differ in expert count or top-k; capture_routing needs them equal")
    top_k = ks[0]
    np_dtype = np.dtype(gate_input_dtype)
    if np_dtype not in (np.float16, np.float32):
        raise ValueError(f"gate_input_dtype must be float16 or float32, got {gate_input_dtype!r}")
    layer_of = {id(r): i for i, (_, r) in enumerate(routers)}
    current: dict[int, tuple] = {}

    def hook(module, args, kwargs, output):
        x = args[0] if args else kwargs.get("hidden_states")
        x = x.detach().reshape(-1, module.weight.shape[1])
        if isinstance(output, tuple) and len(output) >= 3:  # transformers 5: (logits, weights, indices)
            weights, indices = output[1], output[2]
        else:  # a plain Linear gate returns logits; the block applies softmax + top-k
            logits = output[0] if isinstance(output, tuple) else output
            probs = torch.softmax(logits.detach().float(), dim=-1)
            weights, indices = torch.topk(probs, top_k, dim=-1)
        current[layer_of[id(module)]] = (x, weights.detach().reshape(x.shape[0], -1),
                                         indices.detach().reshape(x.shape[0], -1))

    handles = [r.register_forward_hook(hook, with_kwargs=True) for _, r in routers]
    ids_parts, w_parts, gi_parts, seq_parts = [], [], [], []
    n_seq = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for bi, batch in enumerate(input_ids_batches):
                if isinstance(batch, dict):
                    input_ids, mask = batch["input_ids"], batch.get("attention_mask")
                else:
                    input_ids, mask = batch, None
                input_ids = torch.as_tensor(input_ids)
                if input_ids.ndim == 1:
                    input_ids = input_ids[None]
                    mask = None if mask is None else torch.as_tensor(mask)[None]
                if input_ids.ndim != 2:
                    raise ValueError(f"input_ids_batches[{bi}] must be [B, S] or [S], got {tuple(input_ids.shape)}")
                B, S = input_ids.shape
                current.clear()
                kwargs = {} if mask is None else {"attention_mask": torch.as_tensor(mask)}
                model(input_ids=input_ids.to(model.device), **kwargs)
                if len(current) != len(routers):
                    raise ValueError(f"input_ids_batches[{bi}]: only {len(current)} of {len(routers)} routers ran")
                keep = np.ones(B * S, bool) if mask is None else torch.as_tensor(mask).reshape(-1).cpu().numpy() != 0
                order = [current[i] for i in range(len(routers))]
                ids_parts.append(np.stack([o[2].cpu().numpy()[keep] for o in order]))
                w_parts.append(np.stack([o[1].float().cpu().numpy()[keep] for o in order]))
                if gate_inputs:
                    gi_parts.append(np.stack([o[0].float().cpu().numpy()[keep].astype(np_dtype) for o in order]))
                seq_parts.append((np.repeat(np.arange(B), S) + n_seq)[keep])
                n_seq += B
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not ids_parts:
        raise ValueError("input_ids_batches is empty")
    return RoutingTrace(
        topk_ids=np.concatenate(ids_parts, axis=1),
        num_experts=num_experts,
        sequence_ids=np.concatenate(seq_parts),
        gate_probs=np.concatenate(w_parts, axis=1),
        gate_inputs=np.concatenate(gi_parts, axis=1) if gate_inputs else None,
        layer_ids=np.array([_layer_index(n, i) for i, (n, _) in enumerate(routers)], dtype=np.int64),
    )


def _layer_index(name: str, fallback: int) -> int:
    """The decoder layer index in a module name like 'model.layers.3.mlp.gate' (the position otherwise)."""
    m = re.search(r"layers\.(\d+)\.", name)
    return int(m.group(1)) if m else fallback


# ---- SGLang expert-distribution dumps -------------------------------------------------------------------------
# SGLang's recorder (sglang.srt.eplb.expert_distribution, verified on sglang 0.5.23) writes torch.save dicts to
# $SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR on /dump_expert_distribution_record:
#   stat / stat_approx:  expert_distribution_recorder_<time>.pt (rank 0)
#                        {"rank", "logical_count" int [T, L, E] (per pass, all ranks summed), ...}
#   per_token / per_pass: expert_distribution_recorder_<time>_<rank>.pt (one per rank)
#                        {"records": [{"forward_pass_id", "rank", "global_physical_count" [L, P],
#                                      per_token also "topk_ids_of_layer" [L, N, 8] (PHYSICAL slot ids, -1 pad),
#                                      "input_ids", "positions", "extend_seq_lens", ...}],
#                         "last_physical_to_logical_map" [L, P]}
# L counts the model's layers as SGLang does (dense layers included: they record nothing).
def _sglang_dump_files(path) -> list[str]:
    path = os.fspath(path)
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if f.startswith("expert_distribution_recorder_") and f.endswith(".pt"))
        if not files:
            raise ValueError(f"{path}: no expert_distribution_recorder_*.pt file in this folder")
        return files
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file or folder")
    return [path]


def _load_sglang_dump(path: str) -> dict:
    import torch

    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same error to the user
        raise ValueError(f"{path}: not a readable SGLang expert-distribution dump ({exc})") from None
    if not isinstance(d, dict) or not ({"records", "logical_count"} & set(d)):
        raise ValueError(f"{path}: not an SGLang expert-distribution dump (no 'records' or 'logical_count')")
    return d


def _sglang_map(path: str, d: dict, num_experts: int | None) -> tuple[np.ndarray, int]:
    """The dump's physical -> logical map [L, P] and the model's number of logical experts."""
    if "last_physical_to_logical_map" not in d:
        raise ValueError(f"{path}: the dump has no 'last_physical_to_logical_map'")
    p2l = np.asarray(d["last_physical_to_logical_map"], dtype=np.int64)
    if p2l.ndim != 2 or p2l.size == 0 or p2l.min() < 0:
        raise ValueError(f"{path}: last_physical_to_logical_map must be a filled [L, P] map, got shape {p2l.shape}")
    E = int(p2l.max()) + 1  # every logical expert holds at least one slot
    if num_experts is not None and E != num_experts:
        raise ValueError(f"{path}: the dump's model has {E} experts, expected {num_experts} (a dump from another model?)")
    return p2l, E


def read_sglang_dump(path, *, num_experts: int | None = None) -> RoutingTrace:
    """Per-token routing from SGLang's per_token dumps (a .pt file, or a folder of one per rank), as a
    RoutingTrace of the layers that route (dense layers dropped; `layer_ids` keeps SGLang's layer indices).

    Physical slot ids are mapped to logical experts with each dump's `last_physical_to_logical_map` (exact unless
    EPLB moved experts while recording). Records of several ranks are ordered by forward pass, then rank; a
    record equal to an earlier one (same pass id and input ids: attention replicated over ranks) is kept once.
    Padded rows (-1 in every routed layer) are skipped; a token with -1 in some routed layers only is dropped
    with a warning giving the count. Each request's tokens of an extend pass form one sequence, each decode
    pass one. `num_experts`, when given, must match the dumps' model."""
    import warnings

    records, L0, E0 = [], None, None
    for f in _sglang_dump_files(path):
        d = _load_sglang_dump(f)
        if "records" not in d:
            raise ValueError(f"{f}: a stat-mode dump holds per-pass counts only, no per-token routing: record with "
                             "--expert-distribution-recorder-mode per_token, or read it with read_sglang_logical_count")
        p2l, E = _sglang_map(f, d, num_experts)
        if L0 is not None and (p2l.shape[0], E) != (L0, E0):
            raise ValueError(f"{f}: {p2l.shape[0]} layers x {E} experts, the first dump {L0} x {E0} (another model?)")
        L0, E0 = p2l.shape[0], E
        for rec in d["records"]:
            if "topk_ids_of_layer" not in rec:
                raise ValueError(f"{f}: records without 'topk_ids_of_layer' (a per_pass dump): record with "
                                 "--expert-distribution-recorder-mode per_token for per-token routing")
            phys = np.asarray(rec["topk_ids_of_layer"], dtype=np.int64)
            if phys.ndim != 3 or phys.shape[0] != L0:
                raise ValueError(f"{f}: topk_ids_of_layer must be [L={L0}, N, K], got {phys.shape}")
            if phys.size and phys.max() >= p2l.shape[1]:
                raise ValueError(f"{f}: slot id {int(phys.max())} outside the map's {p2l.shape[1]} slots")
            logical = np.where(phys >= 0, p2l[np.arange(L0)[:, None, None], np.maximum(phys, 0)], -1)
            key = (int(rec.get("forward_pass_id", len(records))), tuple(rec.get("input_ids") or ()))
            records.append((key, int(rec.get("rank", 0)), logical, rec.get("extend_seq_lens")))
    records.sort(key=lambda r: (r[0][0], r[1]))
    seen, ids_parts, seq_parts, next_seq = set(), [], [], 0
    for key, _rank, logical, seq_lens in records:
        if key[1] and key in seen:
            continue
        seen.add(key)
        n = logical.shape[1]
        if isinstance(seq_lens, (list, tuple)) and sum(int(x) for x in seq_lens) == n and len(seq_lens):
            seq = np.repeat(np.arange(len(seq_lens)), [int(x) for x in seq_lens]) + next_seq
            next_seq += len(seq_lens)
        else:
            seq = np.full(n, next_seq)
            next_seq += 1
        ids_parts.append(logical)
        seq_parts.append(seq)
    if not ids_parts:
        raise ValueError(f"{path}: the dumps hold no record")
    ids = np.concatenate(ids_parts, axis=1)
    seq = np.concatenate(seq_parts)
    valid = ids >= 0
    routed = valid.any(axis=(1, 2))
    if not routed.any():
        raise ValueError(f"{path}: no routed token in the dumps")
    cols = valid[routed].any(axis=(0, 1))
    K = int(np.flatnonzero(cols).max()) + 1
    ids = ids[routed][:, :, :K]
    full = (ids >= 0).all(axis=(0, 2))
    empty = (ids < 0).all(axis=(0, 2))
    partial = int((~full & ~empty).sum())
    if partial:
        warnings.warn(f"{path}: dropped {partial} token(s) routed in some layers only", stacklevel=2)
    if not full.any():
        raise ValueError(f"{path}: no token is routed in every routed layer")
    return RoutingTrace(topk_ids=ids[:, full].astype(np.int32), num_experts=E0, sequence_ids=seq[full],
                        layer_ids=np.flatnonzero(routed).astype(np.int64))


def read_sglang_logical_count(path, *, num_experts: int | None = None) -> np.ndarray:
    """Per-pass logical counts int64 [T, L, E] from SGLang's dumps: a stat dump's `logical_count` as is; per_pass
    and per_token dumps (a file or a folder of one per rank) from each record's `global_physical_count` through
    the dump's map, the ranks of one forward pass summed (a record equal to another of the same pass, attention
    replicated over ranks, counted once). Passes in recording order (a stat dump's rows in buffer order)."""
    files = _sglang_dump_files(path)
    per_pass: dict[int, list[np.ndarray]] = {}
    stat, shape = [], None
    for f in files:
        d = _load_sglang_dump(f)
        if "logical_count" in d:
            c = np.asarray(d["logical_count"], dtype=np.int64)
            if c.ndim == 2:
                c = c[None]
            if c.ndim != 3 or (c < 0).any():
                raise ValueError(f"{f}: logical_count must be non-negative [T, L, E], got shape {c.shape}")
            if num_experts is not None and c.shape[2] != num_experts:
                raise ValueError(f"{f}: {c.shape[2]} experts, expected {num_experts} (a dump from another model?)")
            stat.append(c)
            got = c.shape[1:]
        else:
            p2l, E = _sglang_map(f, d, num_experts)
            L = p2l.shape[0]
            got = (L, E)
            for rec in d["records"]:
                g = np.asarray(rec["global_physical_count"], dtype=np.int64)
                if g.shape != p2l.shape:
                    raise ValueError(f"{f}: global_physical_count must be {list(p2l.shape)}, got {list(g.shape)}")
                c = np.zeros((L, E), dtype=np.int64)
                np.add.at(c, (np.arange(L)[:, None], p2l), g)
                same = per_pass.setdefault(int(rec["forward_pass_id"]), [])
                if not any(np.array_equal(c, o) for o in same):
                    same.append(c)
        if shape is not None and got != shape:
            raise ValueError(f"{f}: {got[0]} layers x {got[1]} experts, the first dump {shape[0]} x {shape[1]}")
        shape = got
    if stat and per_pass:
        raise ValueError(f"{path}: mixes stat dumps with per_pass/per_token dumps")
    if stat:
        return np.concatenate(stat, axis=0)
    return np.stack([np.sum(per_pass[k], axis=0) for k in sorted(per_pass)])


def _read_sglang(path, *, top_k: int | None = None, num_experts: int | None = None,
                 drop_incomplete: bool = False) -> RoutingTrace:
    """The "sglang" entry of READERS: read_sglang_dump with the readers' common options (a dump says its top-k;
    tokens without a row in some routed layer are always dropped, with a warning)."""
    trace = read_sglang_dump(path, num_experts=num_experts)
    if top_k is not None and trace.top_k != top_k:
        raise ValueError(f"--top-k {top_k}: the SGLang dump {str(path)!r} routes top-{trace.top_k}")
    return trace


READERS["sglang"] = _read_sglang
TRACE_FORMATS = tuple(READERS)


def default_esft_path() -> str:
    """Where the evaluation-only ESFT routing traces are read from: $MOELESS_ESFT, else the workplace's shared
    data folder beside the repository (../shared/data/esft_routing/expert_scores from the checkout's root).
    They carry no license: read by path, never bundled."""
    env = os.environ.get("MOELESS_ESFT")
    if env:
        return env
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(os.path.dirname(root), "shared", "data", "esft_routing", "expert_scores")
