"""Routing traces: which experts every token chose in every MoE layer, read from files or captured from a model.

A `RoutingTrace` holds, for N tokens in order and L MoE layers, the router's selections `topk_ids [L, N, K]`
(int32, expert ids in [0, E)), optionally the selected experts' gate weights `gate_probs [L, N, K]` and the
router's input hidden states `gate_inputs [L, N, H]` (what the layer-aware gate-replica predictor needs), plus
`sequence_ids [N]` (which sequence each token belongs to) and optional per-token `task` labels.

Readers (all raise ValueError naming the file, and the line where there is one, on malformed content):
- `read_esft(path)`: DeepSeek ESFT `expert_scores/<task>/expert_weights_<L>.txt[.gz]` files; a task folder or
  a folder of task folders (tasks concatenated, tokens labelled with their task).
- `read_jsonl(path)`: one JSON object per (layer, token): {"layer", "token_idx", "experts", "gating_probs"},
  optionally "dataset" and "problem_id" naming the sequence.
- `read_npz(path)` / `write_npz(trace, path)`: the project's compact format.
- `read_sglang_dump(path)` / `read_sglang_logical_count(path)`: SGLang's expert-distribution recorder dumps
  (per-token routing / per-pass counts; see the end of this module).
- `load_trace(path, fmt)`: one dispatcher over the trace formats.
- `capture_routing(model, input_ids_batches)`: forward hooks on the routers of a Hugging Face MoE model.

This module is floor 1 (see docs/ARCHITECTURE.md): it must never import the planner, the predictors or the
kernels, and it never changes a model's routing (hooks only read).
"""
from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
import re
from typing import Iterable, Iterator

import numpy as np

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
    "read_sglang_dump",
    "read_sglang_logical_count",
]

TRACE_FORMATS = ("esft", "jsonl", "npz", "sglang")
_NPZ_VERSION = 1


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

    def __post_init__(self):
        ids = np.asarray(self.topk_ids)
        if ids.ndim != 3:
            raise ValueError(f"topk_ids must be [L, N, K], got shape {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"topk_ids must be integer, got {ids.dtype}")
        if int(self.num_experts) < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        self.num_experts = int(self.num_experts)
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
        )


def expert_loads(topk_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """Token counts per expert: topk_ids [..., T, K] -> [..., E] int64 (one count per (token, k) pair)."""
    ids = np.asarray(topk_ids)
    lead = ids.shape[:-2]
    flat = ids.reshape(int(np.prod(lead, dtype=np.int64)), -1).astype(np.int64)
    rows = np.arange(flat.shape[0], dtype=np.int64)[:, None] * num_experts
    counts = np.bincount((flat + rows).ravel(), minlength=flat.shape[0] * num_experts)
    return counts.reshape(*lead, num_experts)


# ---- ESFT ---------------------------------------------------------------------------------------------------
_ESFT_FILE = re.compile(r"^expert_weights_(\d+)\.txt(\.gz)?$")


def _open_text(path: str):
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _esft_layer_files(folder: str) -> list[tuple[int, str]]:
    found = []
    for name in os.listdir(folder):
        m = _ESFT_FILE.match(name)
        if m:
            found.append((int(m.group(1)), os.path.join(folder, name)))
    return sorted(found)


def _read_esft_task(folder: str, top_k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    files = _esft_layer_files(folder)
    layer_ids = np.array([lid for lid, _ in files], dtype=np.int64)
    if len(set(layer_ids.tolist())) != len(files):
        raise ValueError(f"{folder}: a layer has both .txt and .txt.gz files")
    ids_layers, w_layers, seq_lengths = [], [], None
    for lid, path in files:
        ids_lines, w_lines, lengths = [], [], []
        with _open_text(path) as fh:
            for lineno, line in enumerate(fh, 1):
                line = line.rstrip("\n")
                if not line:
                    continue
                parts = line.split("\t\t")
                if len(parts) != 2:
                    raise ValueError(f"{path}:{lineno}: expected 'ids<TAB><TAB>weights', found {len(parts)} parts")
                try:
                    ids = np.array(parts[0].split("\t"), dtype=np.int64)
                    w = np.array(parts[1].split("\t"), dtype=np.float32)
                except ValueError as exc:
                    raise ValueError(f"{path}:{lineno}: not a number ({exc})") from None
                if ids.size != w.size or ids.size % top_k:
                    raise ValueError(
                        f"{path}:{lineno}: {ids.size} ids and {w.size} weights; both must be the same multiple "
                        f"of top_k={top_k}"
                    )
                ids_lines.append(ids.reshape(-1, top_k))
                w_lines.append(w.reshape(-1, top_k))
                lengths.append(ids.size // top_k)
        if seq_lengths is None:
            seq_lengths = lengths
        elif lengths != seq_lengths:
            differs = [i for i, (a, b) in enumerate(zip(lengths, seq_lengths)) if a != b]
            bad = differs[0] if differs else min(len(lengths), len(seq_lengths))
            raise ValueError(
                f"{path}:{bad + 1}: sequence lengths differ from layer {files[0][0]}'s "
                f"({len(lengths)} vs {len(seq_lengths)} lines); every layer file must hold the same tokens"
            )
        ids_layers.append(np.concatenate(ids_lines) if ids_lines else np.zeros((0, top_k), np.int64))
        w_layers.append(np.concatenate(w_lines) if w_lines else np.zeros((0, top_k), np.float32))
    seq = np.repeat(np.arange(len(seq_lengths), dtype=np.int64), seq_lengths)
    return np.stack(ids_layers), np.stack(w_layers), seq, layer_ids


def read_esft(path: str, *, top_k: int = 6, num_experts: int | None = None) -> RoutingTrace:
    """Read DeepSeek ESFT expert scores: one task folder, or a folder holding task folders (concatenated).

    Line i of every `expert_weights_<L>.txt[.gz]` is the same sequence; a line is the token-major expert ids,
    a double tab, then the matching gate weights. `num_experts` defaults to the width of `summary.json`'s
    per-layer shares when present, else to the largest id + 1.
    """
    if not os.path.isdir(path):
        raise ValueError(f"path: {path!r} is not a directory (an ESFT task folder or expert_scores folder)")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if _esft_layer_files(path):
        task_dirs = [path]
    else:
        task_dirs = sorted(
            os.path.join(path, d) for d in os.listdir(path)
            if os.path.isdir(os.path.join(path, d)) and _esft_layer_files(os.path.join(path, d))
        )
    if not task_dirs:
        raise ValueError(f"path: no expert_weights_<L>.txt[.gz] files in {path!r} or its subfolders")
    parts = []
    for d in task_dirs:
        ids, w, seq, layer_ids = _read_esft_task(d, top_k)
        if parts and not np.array_equal(layer_ids, parts[0][3]):
            raise ValueError(f"{d}: layers {layer_ids.tolist()} differ from {task_dirs[0]}'s {parts[0][3].tolist()}")
        parts.append((ids, w, seq, layer_ids, os.path.basename(os.path.normpath(d))))
    if num_experts is None:
        num_experts = _esft_num_experts(task_dirs)
    if num_experts is None:
        num_experts = int(max(p[0].max(initial=-1) for p in parts)) + 1
    traces = [
        RoutingTrace(topk_ids=ids, num_experts=num_experts, sequence_ids=seq, gate_probs=w,
                     task=np.full(ids.shape[1], name), layer_ids=lids)
        for ids, w, seq, lids, name in parts
    ]
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
def read_jsonl(path: str, *, num_experts: int | None = None) -> RoutingTrace:
    """Read one JSON object per (layer, token): {"layer", "token_idx", "experts": [...], "gating_probs": [...]}.

    Optional "dataset" and "problem_id" name the sequence (and "dataset" becomes the task label); tokens are
    ordered by the first appearance of their sequence, then by token_idx. Every (layer, token) must appear
    exactly once, with the same number of experts.
    """
    if not os.path.isfile(path):
        raise ValueError(f"path: {path!r} is not a file")
    rows: dict[tuple, dict[int, tuple[list, list | None]]] = {}
    seq_order: dict[tuple, int] = {}
    layers: set[int] = set()
    top_k = None
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object")
            missing = [k for k in ("layer", "token_idx", "experts") if k not in row]
            if missing:
                raise ValueError(f"{where}: missing field(s) {missing}")
            layer, tok, experts = row["layer"], row["token_idx"], row["experts"]
            if not isinstance(layer, int) or not isinstance(tok, int) or tok < 0:
                raise ValueError(f"{where}: 'layer' and 'token_idx' must be non-negative ints")
            if not isinstance(experts, list) or not experts or not all(isinstance(e, int) and e >= 0 for e in experts):
                raise ValueError(f"{where}: 'experts' must be a non-empty list of non-negative ints")
            probs = row.get("gating_probs")
            if probs is not None and (not isinstance(probs, list) or len(probs) != len(experts)):
                raise ValueError(f"{where}: 'gating_probs' must be a list as long as 'experts' ({len(experts)})")
            if top_k is None:
                top_k = len(experts)
            elif len(experts) != top_k:
                raise ValueError(f"{where}: {len(experts)} experts, earlier rows have {top_k}")
            if num_experts is not None and max(experts) >= num_experts:
                raise ValueError(f"{where}: expert id {max(experts)} >= num_experts={num_experts}")
            seq_key = (str(row.get("dataset", "")), str(row.get("problem_id", "")))
            seq_order.setdefault(seq_key, len(seq_order))
            key = (seq_key, tok)
            per_layer = rows.setdefault(key, {})
            if layer in per_layer:
                raise ValueError(f"{where}: duplicate row for layer {layer}, token {tok} of sequence {seq_key}")
            per_layer[layer] = (experts, probs)
            layers.add(layer)
    if not rows:
        raise ValueError(f"{path}: no rows")
    layer_ids = sorted(layers)
    keys = sorted(rows, key=lambda k: (seq_order[k[0]], k[1]))
    L, N = len(layer_ids), len(keys)
    ids = np.empty((L, N, top_k), dtype=np.int64)
    has_probs = all(p is not None for r in rows.values() for _, p in r.values())
    probs = np.empty((L, N, top_k), dtype=np.float32) if has_probs else None
    for n, key in enumerate(keys):
        per_layer = rows[key]
        if len(per_layer) != L:
            lost = sorted(set(layer_ids) - set(per_layer))
            raise ValueError(f"{path}: token {key[1]} of sequence {key[0]} has no row for layer(s) {lost}")
        for li, layer in enumerate(layer_ids):
            e, p = per_layer[layer]
            ids[li, n] = e
            if has_probs:
                probs[li, n] = p
    seq = np.array([seq_order[k[0]] for k in keys], dtype=np.int64)
    datasets = [k[0][0] for k in keys]
    task = np.array(datasets) if any(datasets) else None
    if num_experts is None:
        num_experts = int(ids.max()) + 1
    return RoutingTrace(topk_ids=ids, num_experts=num_experts, sequence_ids=seq, gate_probs=probs, task=task,
                        layer_ids=np.array(layer_ids, dtype=np.int64))


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


def load_npz_arrays(path: str, what: str) -> dict[str, np.ndarray]:
    """Every array of an .npz file (no pickles); a ValueError saying `what` the file is not, on failure."""
    if not os.path.isfile(path):
        raise ValueError(f"path: {path!r} is not a file")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: {what} ({exc})") from None


def read_npz(path: str) -> RoutingTrace:
    """Read a trace written by `write_npz`."""
    data = load_npz_arrays(path, "not a readable .npz file")
    missing = [k for k in ("format_version", "num_experts", "topk_ids") if k not in data]
    if missing:
        raise ValueError(f"{path}: not a moeless trace, missing array(s) {missing}")
    if int(data["format_version"]) != _NPZ_VERSION:
        raise ValueError(f"{path}: trace format version {int(data['format_version'])}, expected {_NPZ_VERSION}")
    try:
        return RoutingTrace(
            topk_ids=data["topk_ids"],
            num_experts=int(data["num_experts"]),
            sequence_ids=data.get("sequence_ids"),
            gate_probs=data.get("gate_probs"),
            gate_inputs=data.get("gate_inputs"),
            task=data.get("task"),
            layer_ids=data.get("layer_ids"),
        )
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def load_trace(path: str, fmt: str | None = None, **kwargs) -> RoutingTrace:
    """Read a trace in format `fmt` ("esft", "jsonl" or "npz"); None guesses from the path."""
    if fmt is None:
        if os.path.isdir(path):
            fmt = "esft"
        elif path.endswith(".npz"):
            fmt = "npz"
        elif path.endswith((".jsonl", ".jsonl.gz", ".json")):
            fmt = "jsonl"
        else:
            raise ValueError(f"fmt: cannot guess the trace format of {path!r}; pass one of {TRACE_FORMATS}")
    if fmt == "esft":
        return read_esft(path, **kwargs)
    if fmt == "jsonl":
        return read_jsonl(path, **kwargs)
    if fmt == "npz":
        return read_npz(path, **kwargs)
    if fmt == "sglang":  # SGLang per_token recorder dumps (see the end of this module)
        return read_sglang_dump(path, **kwargs)
    raise ValueError(f"fmt must be one of {TRACE_FORMATS}, got {fmt!r}")


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
