"""Requests and results of the serving loop, and why a request is refused.

A refusal or a failure is a Result with `error` set and no tokens: `error` starts with what it is about
("prompt:", "context:", "max_new_tokens:", "serving:", ...), so reports can group them (`error_kinds`). A
Result either holds every token its request asked for or says why it holds none; never a part.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Request", "Result", "check_request", "error_kinds"]


@dataclass
class Request:
    """One generation request: prompt token ids, arrival time (s from the trace start), tokens to generate."""

    prompt: list
    max_new_tokens: int
    arrival_s: float = 0.0
    id: int | None = None


@dataclass
class Result:
    """tokens: generated ids (greedy); error: why the request was refused or failed (then tokens is empty);
    batch: the batch that served it (-1: none); logits: per generated token the logits it was chosen from (only
    with record_logits); first_token_s / done_s: when its batch's prefill and its last token were done, on the
    serving clock (seconds since `serve` began; arrival_s is on the same clock)."""

    id: int
    tokens: list = field(default_factory=list)
    error: str | None = None
    batch: int = -1
    logits: np.ndarray | None = None
    arrival_s: float = 0.0
    first_token_s: float | None = None
    done_s: float | None = None


def check_request(req, max_context: int, vocab_size: int) -> str | None:
    """Why `req` cannot be served ("<input>: <reason>"), or None."""
    if not isinstance(req, Request):
        return f"request: must be a moeless.serve.Request, got {type(req).__name__}"
    prompt = req.prompt
    if not isinstance(prompt, (list, tuple)) or len(prompt) == 0:
        return "prompt: empty prompt"
    if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) and 0 <= t < vocab_size for t in prompt):
        return f"prompt: token ids must be ints in [0, {vocab_size})"
    if isinstance(req.max_new_tokens, bool) or not isinstance(req.max_new_tokens, (int, np.integer)) \
            or req.max_new_tokens < 1:
        return f"max_new_tokens: must be an integer >= 1, got {req.max_new_tokens!r}"
    if len(prompt) + req.max_new_tokens > max_context:
        return (f"context: {len(prompt)} prompt tokens + {req.max_new_tokens} new tokens exceed the model's "
                f"context of {max_context}")
    if isinstance(req.arrival_s, bool) or not isinstance(req.arrival_s, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(req.arrival_s)):
        return f"arrival_s: must be a finite number, got {req.arrival_s!r}"
    return None


def error_kinds(errors) -> list[tuple[str, int, str]]:
    """(kind, count, first message) per kind of the non-None `errors`, most frequent first."""
    errors = [e for e in errors if e is not None]
    kinds = Counter(e.split(":", 1)[0] for e in errors)
    first = {}
    for e in errors:
        first.setdefault(e.split(":", 1)[0], e)
    return [(k, n, first[k]) for k, n in kinds.most_common()]
