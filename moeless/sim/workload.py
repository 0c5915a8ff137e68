"""Request traces and batching: what the simulated server is asked to do, iteration by iteration.

Reads request traces (the bundled Azure LLM 2023 code and conv traces, Mooncake JSONL, any CSV with timestamp,
input-token and output-token columns), cuts a window (default: the busiest 10 minutes), scales the arrival
rate, and turns requests into an `IterationSchedule`: how many tokens pass through every MoE layer in each
iteration, under the paper's batching (requests arriving within one window form a batch: one prefill iteration,
then decode iterations until the longest output ends) or continuous batching (requests join and leave between
iterations under a token budget, with chunked prefill).

The schedule is decided once, before any policy runs, so every policy sees the same iterations. This module
never looks at routing, plans or costs; it never drops or reorders a request silently (bad traces raise: a
request over `moeless.limits.MAX_REQUEST_TOKENS`, a window whose requests hold no token at all, a file that
cannot be read).
"""
from __future__ import annotations

import csv
import datetime as _dt
import gzip
import io
import json
import os
import zlib
from dataclasses import dataclass, field
from importlib import resources
from typing import Callable, Iterable

import numpy as np

from moeless import limits

BUNDLED_TRACES = {
    "azure-conv": "AzureLLMInferenceTrace_conv.csv.gz",
    "azure-code": "AzureLLMInferenceTrace_code.csv.gz",
}

_TIME_COLUMNS = ("timestamp", "time", "arrival_time", "arrival", "arrival_s", "created")
_INPUT_COLUMNS = ("contexttokens", "input_tokens", "input_length", "prompt_tokens", "num_prefill_tokens",
                  "input", "context_tokens")
_OUTPUT_COLUMNS = ("generatedtokens", "output_tokens", "output_length", "completion_tokens", "num_decode_tokens",
                   "output", "generated_tokens")


@dataclass(frozen=True)
class RequestTrace:
    """Requests sorted by arrival: `arrival_s` float64 [N] (seconds from the trace's first request),
    `input_tokens` and `output_tokens` int64 [N] (prompt length; generated tokens, the first one included)."""

    arrival_s: np.ndarray
    input_tokens: np.ndarray
    output_tokens: np.ndarray
    name: str = "trace"

    def __post_init__(self):
        a, i, o = (np.asarray(x) for x in (self.arrival_s, self.input_tokens, self.output_tokens))
        if not (a.ndim == i.ndim == o.ndim == 1 and len(a) == len(i) == len(o)):
            raise ValueError(f"trace {self.name!r}: arrival_s, input_tokens and output_tokens must be 1-D of one "
                             f"length, got {a.shape}, {i.shape}, {o.shape}")
        if len(a) and not np.all(np.isfinite(a)):
            raise ValueError(f"trace {self.name!r}: timestamps must be finite")
        if len(a) > 1 and np.any(np.diff(a) < 0):
            first = int(np.argmax(np.diff(a) < 0)) + 1
            raise ValueError(f"trace {self.name!r}: timestamps are not sorted (request {first} arrives at "
                             f"{a[first]:.6f} s, before request {first - 1} at {a[first - 1]:.6f} s)")
        for label, x in (("input", i), ("output", o)):
            if len(x) and x.min() < 0:
                bad = int(np.argmin(x))
                raise ValueError(f"trace {self.name!r}: negative {label} token count {x[bad]} at request {bad}")
            if len(x) and x.max() > limits.MAX_REQUEST_TOKENS:
                bad = int(np.argmax(x))
                raise ValueError(f"trace {self.name!r}: request {bad} has {x[bad]} {label} tokens; at most "
                                 f"{limits.MAX_REQUEST_TOKENS:,} (moeless.limits.MAX_REQUEST_TOKENS)")
        object.__setattr__(self, "arrival_s", a.astype(np.float64))
        object.__setattr__(self, "input_tokens", i.astype(np.int64))
        object.__setattr__(self, "output_tokens", o.astype(np.int64))

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def duration_s(self) -> float:
        return float(self.arrival_s[-1] - self.arrival_s[0]) if len(self) else 0.0


# --- readers ---------------------------------------------------------------------------------------------
def _parse_time(text: str) -> float:
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    # Azure's timestamps carry 7 fractional digits; Python's parser takes at most 6.
    if "." in text:
        head, frac = text.rsplit(".", 1)
        digits = "".join(ch for ch in frac if ch.isdigit())
        rest = frac[len(digits):]
        text = f"{head}.{digits[:6]}{rest}"
    try:
        stamp = _dt.datetime.fromisoformat(text)
    except ValueError as err:
        raise ValueError(f"timestamp {text!r} is neither seconds nor an ISO date-time") from err
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=_dt.timezone.utc)
    return stamp.timestamp()


def _open_text(path_or_file):
    if hasattr(path_or_file, "read"):
        return path_or_file, False
    path = os.fspath(path_or_file)
    if not os.path.exists(path):
        raise ValueError(f"trace: no file at {path!r}")
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8"), True
    return open(path, encoding="utf-8", newline=""), True


def _pick(columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str, name: str) -> int:
    lowered = [c.strip().lower() for c in columns]
    if wanted is not None:
        if wanted.lower() not in lowered:
            raise ValueError(f"trace {name!r}: no column {wanted!r} ({what}); columns are {columns}")
        return lowered.index(wanted.lower())
    for cand in candidates:
        if cand in lowered:
            return lowered.index(cand)
    raise ValueError(f"trace {name!r}: missing the {what} column (looked for {', '.join(candidates)}); "
                     f"columns are {columns}")


def read_request_csv(path_or_file, *, timestamp_column: str | None = None, input_column: str | None = None,
                     output_column: str | None = None, name: str | None = None) -> RequestTrace:
    """A CSV (optionally .gz) with a header and timestamp, input-token and output-token columns.

    Timestamps are seconds or ISO date-times (any number of fractional digits). Columns are found by common
    names (Azure's TIMESTAMP, ContextTokens, GeneratedTokens included) unless named explicitly.
    """
    name = name or (os.path.basename(os.fspath(path_or_file)) if not hasattr(path_or_file, "read") else "csv")
    fh, close = _open_text(path_or_file)
    try:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"trace {name!r}: the file is empty (no header row)")
        ti = _pick(header, timestamp_column, _TIME_COLUMNS, "timestamp", name)
        ii = _pick(header, input_column, _INPUT_COLUMNS, "input tokens", name)
        oi = _pick(header, output_column, _OUTPUT_COLUMNS, "output tokens", name)
        times, inputs, outputs = [], [], []
        for line_no, row in enumerate(reader, start=2):
            if not row or all(not cell.strip() for cell in row):
                continue
            try:
                times.append(_parse_time(row[ti]))
                inputs.append(_token_count(row[ii]))
                outputs.append(_token_count(row[oi]))
            except (ValueError, IndexError, OverflowError) as err:
                raise ValueError(f"trace {name!r}: line {line_no} is malformed ({err}): {row}") from None
    except _UNREADABLE as err:
        raise _unreadable(name, err) from None
    finally:
        if close:
            fh.close()
    return _request_trace(times, inputs, outputs, name)


# what a gzip or text file that cannot be read raises while it is read (BadGzipFile is an OSError)
_UNREADABLE = (OSError, EOFError, UnicodeDecodeError, zlib.error, csv.Error)


def _unreadable(name: str, err: Exception) -> ValueError:
    return ValueError(f"trace {name!r}: not a readable file: truncated, corrupt or not text "
                      f"({type(err).__name__}: {err})")


def _token_count(value) -> int:
    """A token count from a CSV cell or a JSON value: a whole number (no bool, no fraction, no NaN)."""
    if isinstance(value, bool):
        raise ValueError(f"token count {value!r} is not a number")
    x = float(value)
    if not np.isfinite(x) or x != int(x):
        raise ValueError(f"token count {value!r} is not a whole number")
    return int(x)


def _request_trace(times, inputs, outputs, name: str) -> RequestTrace:
    """A RequestTrace from parsed columns, times rebased to the first request."""
    t = np.asarray(times, dtype=np.float64)
    if len(t):
        t = t - t[0]
    return RequestTrace(t, np.asarray(inputs, dtype=np.int64), np.asarray(outputs, dtype=np.int64), name=name)


def read_mooncake_jsonl(path_or_file, *, name: str | None = None) -> RequestTrace:
    """Mooncake's JSONL: one request a line, {"timestamp": ms, "input_length": n, "output_length": n, ...}."""
    name = name or (os.path.basename(os.fspath(path_or_file)) if not hasattr(path_or_file, "read") else "jsonl")
    fh, close = _open_text(path_or_file)
    times, inputs, outputs = [], [], []
    try:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"trace {name!r}: line {line_no} is not JSON ({err})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"trace {name!r}: line {line_no} is not a JSON object")
            for key in ("timestamp", "input_length", "output_length"):
                if key not in rec:
                    raise ValueError(f"trace {name!r}: line {line_no} misses the {key!r} field")
            try:
                if isinstance(rec["timestamp"], bool):
                    raise ValueError(f"timestamp {rec['timestamp']!r} is not a number")
                times.append(float(rec["timestamp"]) / 1000.0)
                inputs.append(_token_count(rec["input_length"]))
                outputs.append(_token_count(rec["output_length"]))
            except (ValueError, TypeError, OverflowError) as err:
                raise ValueError(f"trace {name!r}: line {line_no} is malformed ({err})") from None
    except _UNREADABLE as err:
        raise _unreadable(name, err) from None
    finally:
        if close:
            fh.close()
    return _request_trace(times, inputs, outputs, name)


def load_trace(name_or_path: str) -> RequestTrace:
    """A bundled trace ("azure-conv", "azure-code") or a file: .jsonl (Mooncake) or .csv (optionally .gz)."""
    key = str(name_or_path)
    if key in BUNDLED_TRACES:
        data = resources.files("moeless").joinpath("data", BUNDLED_TRACES[key]).read_bytes()
        text = io.TextIOWrapper(io.BytesIO(gzip.decompress(data)), encoding="utf-8", newline="")
        return read_request_csv(text, name=key)
    if key.endswith((".jsonl", ".jsonl.gz")):
        return read_mooncake_jsonl(key)
    if key.endswith((".csv", ".csv.gz")):
        return read_request_csv(key)
    raise ValueError(f"trace: {name_or_path!r} is neither a bundled trace ({', '.join(BUNDLED_TRACES)}) "
                     f"nor a .csv / .jsonl file")


# --- windows and rate ------------------------------------------------------------------------------------
def select_window(trace: RequestTrace, start_s: float, seconds: float) -> RequestTrace:
    """Requests arriving in [start_s, start_s + seconds), times shifted to start at 0. Empty: ValueError."""
    if not seconds > 0:
        raise ValueError(f"window seconds must be > 0, got {seconds}")
    lo = np.searchsorted(trace.arrival_s, start_s, side="left")
    hi = np.searchsorted(trace.arrival_s, start_s + seconds, side="left")
    if hi <= lo:
        raise ValueError(f"trace {trace.name!r}: the window [{start_s}, {start_s + seconds}) s holds no request "
                         f"(the trace spans 0 to {trace.duration_s:.1f} s)")
    return RequestTrace(trace.arrival_s[lo:hi] - start_s, trace.input_tokens[lo:hi], trace.output_tokens[lo:hi],
                        name=f"{trace.name}[{start_s:.0f}s+{seconds:.0f}s]")


def busiest_window(trace: RequestTrace, seconds: float = 600.0) -> tuple[float, RequestTrace]:
    """The window of `seconds` that starts at a request and holds the most tokens (input + output); ties go
    to the earliest. Returns (start_s, window). A trace shorter than the window is returned whole."""
    if len(trace) == 0:
        raise ValueError(f"trace {trace.name!r} is empty")
    if not seconds > 0:
        raise ValueError(f"window seconds must be > 0, got {seconds}")
    tokens = np.concatenate([[0], np.cumsum(trace.input_tokens + trace.output_tokens)])
    ends = np.searchsorted(trace.arrival_s, trace.arrival_s + seconds, side="left")
    load = tokens[ends] - tokens[np.arange(len(trace))]
    start = float(trace.arrival_s[int(np.argmax(load))])
    return start, select_window(trace, start, seconds)


def scale_rate(trace: RequestTrace, factor: float) -> RequestTrace:
    """The same requests arriving `factor` times as fast (2.0 halves every gap)."""
    if not factor > 0:
        raise ValueError(f"rate scale must be > 0, got {factor}")
    return RequestTrace(trace.arrival_s / factor, trace.input_tokens, trace.output_tokens,
                        name=trace.name if factor == 1 else f"{trace.name}x{factor:g}")


# --- iterations ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IterationSchedule:
    """Iterations in order: `tokens` int64 [N] (tokens through every MoE layer), `prefill` bool [N] (holds
    prompt tokens), `batch` int64 [N] (the batch of the paper's batching; the iteration index under
    continuous batching), `ready_s` float64 [N] (earliest start: the arrival of the work it holds) and
    `weight` float64 [N] (how many real iterations this one stands for; 1 unless thinned)."""

    tokens: np.ndarray
    prefill: np.ndarray
    batch: np.ndarray
    ready_s: np.ndarray
    weight: np.ndarray = field(default=None)
    mode: str = "paper"

    def __post_init__(self):
        if self.weight is None:
            object.__setattr__(self, "weight", np.ones(len(self.tokens)))
        n = len(self.tokens)
        for name in ("prefill", "batch", "ready_s", "weight"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"IterationSchedule.{name} must have {n} entries")
        if n == 0:
            raise ValueError("IterationSchedule: no iteration (an empty window?)")

    def __len__(self) -> int:
        return len(self.tokens)

    def thin(self, decode_stride: int) -> "IterationSchedule":
        """Keep every prefill iteration and one decode iteration in each run of `decode_stride` consecutive
        decode iterations of one batch, weighted by the run's length, so totals stay unbiased while the
        per-iteration control plane runs `decode_stride` times less often. 1 returns self."""
        if not isinstance(decode_stride, (int, np.integer)) or decode_stride < 1:
            raise ValueError(f"decode_stride must be an integer >= 1, got {decode_stride!r}")
        if decode_stride == 1:
            return self
        n = len(self.tokens)
        idx = np.arange(n)
        if self.mode == "continuous":  # iterations mix prompts and decodes: keep every decode_stride-th
            keep = idx % decode_stride == 0
        else:
            # position of each decode iteration inside its batch's run of decode iterations
            new_run = self.prefill | np.concatenate([[True], self.batch[1:] != self.batch[:-1]])
            run_start = np.maximum.accumulate(np.where(new_run, idx, 0))
            pos = idx - run_start - self.prefill[run_start].astype(np.int64)
            keep = self.prefill | (pos % decode_stride == 0)
        keep_idx = idx[keep]
        group = np.cumsum(keep) - 1
        weight = np.bincount(group, weights=self.weight, minlength=len(keep_idx))
        return IterationSchedule(self.tokens[keep_idx], self.prefill[keep_idx], self.batch[keep_idx],
                                 self.ready_s[keep_idx], weight, self.mode)


def paper_batches(trace: RequestTrace, window_s: float = 1.0) -> IterationSchedule:
    """The paper's batching: requests arriving within each `window_s` form a batch, ready at the window's end;
    one prefill iteration (all prompt tokens), then decode iterations while any request still generates:
    decode step j holds one token of every request with more than j output tokens (the prefill emits the
    first). A request with no output token contributes its prompt only."""
    if not window_s > 0:
        raise ValueError(f"batch window must be > 0 s, got {window_s}")
    if len(trace) == 0:
        raise ValueError(f"trace {trace.name!r} is empty: nothing to batch")
    if not (trace.input_tokens.any() or (trace.output_tokens > 1).any()):
        raise ValueError(f"trace {trace.name!r}: its {len(trace)} requests hold no token to serve (every prompt is "
                         "empty and no request generates more than its first token)")
    bid = np.floor(trace.arrival_s / window_s).astype(np.int64)
    uniq, first = np.unique(bid, return_index=True)
    bounds = np.append(first, len(trace))
    tokens, prefill, batch, ready = [], [], [], []
    for b, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        outs = np.sort(trace.output_tokens[lo:hi])
        steps = max(int(outs[-1]) - 1, 0)
        ready_s = float((uniq[b] + 1) * window_s)
        tokens.append([int(trace.input_tokens[lo:hi].sum())])
        prefill.append([True])
        if steps:
            j = np.arange(1, steps + 1)
            tokens.append(len(outs) - np.searchsorted(outs, j, side="right"))
            prefill.append(np.zeros(steps, dtype=bool))
        batch.append(np.full(steps + 1, b))
        ready.append(np.full(steps + 1, ready_s))
    return IterationSchedule(np.concatenate(tokens).astype(np.int64), np.concatenate(prefill),
                             np.concatenate(batch), np.concatenate(ready), mode="paper")


def continuous_batches(trace: RequestTrace, iteration_time: Callable[[int], float] | float,
                       token_budget: int = 8192, max_requests: int | None = None) -> IterationSchedule:
    """Continuous batching with chunked prefill: before each iteration, arrived requests join (first come,
    first served) while the iteration's token budget lasts; a running request adds one decode token per
    iteration; a prompt longer than what is left of the budget is split over iterations. A request leaves
    once its output is complete. `iteration_time(tokens)` (seconds) is a nominal, policy-independent clock
    that decides arrivals; every policy then replays the same iterations on its own clock."""
    if not isinstance(token_budget, (int, np.integer)) or token_budget < 1:
        raise ValueError(f"token_budget must be an integer >= 1, got {token_budget!r}")
    if len(trace) == 0:
        raise ValueError(f"trace {trace.name!r} is empty: nothing to batch")
    time_fn = iteration_time if callable(iteration_time) else (lambda _tokens, _s=float(iteration_time): _s)
    n = len(trace)
    arrival, prompt_left = trace.arrival_s, trace.input_tokens.copy()
    out_left = np.maximum(trace.output_tokens, 1)
    max_requests = max_requests or n
    now, nxt = 0.0, 0
    running: list[int] = []  # admitted requests in admission order
    tokens, prefill, ready = [], [], []
    while nxt < n or running:
        if not running and nxt < n and arrival[nxt] > now:
            now = float(arrival[nxt])
        while nxt < n and arrival[nxt] <= now and len(running) < max_requests:
            running.append(nxt)
            nxt += 1
        budget, used, has_prompt, done = token_budget, 0, False, []
        for r in running:  # decoders first (one token each), then prompts in admission order
            if prompt_left[r] == 0 and budget > 0:
                budget -= 1
                used += 1
                out_left[r] -= 1
                if out_left[r] == 0:
                    done.append(r)
        for r in running:
            if prompt_left[r] > 0 and budget > 0:
                take = int(min(prompt_left[r], budget))
                prompt_left[r] -= take
                budget -= take
                used += take
                has_prompt = True
                if prompt_left[r] == 0:  # the last prompt chunk emits the first output token
                    out_left[r] -= 1
                    if out_left[r] == 0:
                        done.append(r)
        if used == 0:  # nothing fit (cannot happen with budget >= 1), guard against an endless loop
            raise RuntimeError("continuous batching made no progress")
        tokens.append(used)
        prefill.append(has_prompt)
        ready.append(now)
        now += float(time_fn(used))
        if done:
            gone = set(done)
            running = [r for r in running if r not in gone]
    k = len(tokens)
    return IterationSchedule(np.asarray(tokens, dtype=np.int64), np.asarray(prefill, dtype=bool),
                             np.arange(k, dtype=np.int64), np.asarray(ready), mode="continuous")


def iter_chunks(n: int, size: int) -> Iterable[slice]:
    for lo in range(0, n, size):
        yield slice(lo, min(n, lo + size))
