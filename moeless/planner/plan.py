"""The replica plan of L MoE layers: `Plan` (phy2log / log2phy / logcnt) and the argument checks every planner
module shares.

Index arrays (DeepSeek EPLB's and vLLM's names):

    phy2log        int64 [L, G*S]    logical expert held by physical slot p (-1 = free); slot p is on GPU p // S
    log2phy        int64 [L, E, R]   physical slots of expert e's replicas, ascending slot order (-1 = pad)
    logcnt         int64 [L, E]      replicas per expert (>= 1)

What it must never do: decide anything (scaling, placement and splits live in their own modules), import torch
or read a clock.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from moeless._jit import njit

# ----------------------------------------------------------------------------------------------------------
# Argument checks (the public boundary)
# ----------------------------------------------------------------------------------------------------------
def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_loads(loads, name: str = "loads", *, integral: bool = False) -> np.ndarray:
    """float64 [L, E] copy of `loads`; ValueError naming `name` if it is not finite, non-negative, 2-D."""
    if hasattr(loads, "detach"):  # a torch tensor, possibly on a GPU
        loads = loads.detach().cpu().numpy()
    try:
        a = np.array(loads, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a numeric array of shape [L, E]") from exc
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"{name} must have shape [L, E] with L, E >= 1, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} must be finite (no NaN or inf)")
    if (a < 0).any():
        raise ValueError(f"{name} must be non-negative")
    if integral and (a != np.round(a)).any():
        raise ValueError(f"{name} must hold integer token counts")
    return a


def _check_budget(num_experts: int, gpus: int, slots_per_gpu: int) -> None:
    if num_experts > gpus * slots_per_gpu:
        raise ValueError(
            f"slots_per_gpu={slots_per_gpu} x gpus={gpus} = {gpus * slots_per_gpu} slots cannot hold "
            f"{num_experts} experts once each"
        )


def _starts(ks: np.ndarray) -> np.ndarray:
    """bool mask of the entries of the 1-D `ks` that differ from their predecessor (the first always does)."""
    out = np.empty(ks.size, dtype=bool)
    out[:1] = True
    np.not_equal(ks[1:], ks[:-1], out=out[1:])
    return out


def _take_rows(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """np.take_along_axis(a, idx, 1) for 2-D arrays, without its per-call overhead (a hot path)."""
    n, m = a.shape
    return a.ravel()[idx + (np.arange(n) * m)[:, None]]


# ----------------------------------------------------------------------------------------------------------
# Plan
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Plan:
    """Replica placement of L MoE layers on `gpus` GPUs with `slots_per_gpu` expert slots each.

    phy2log int64 [L, G*S] (-1 = free slot; slot p on GPU p // S), log2phy int64 [L, E, R_max] (-1 pad,
    ascending slot order), logcnt int64 [L, E]. Build one with `Plan.from_phy2log` (which derives the other
    two); `plan[l]` / `plan.layer(l)` is the one-layer plan of layer l, `plan[a:b]` a slice of layers.
    """

    phy2log: np.ndarray
    log2phy: np.ndarray
    logcnt: np.ndarray
    gpus: int
    slots_per_gpu: int

    # -- construction --------------------------------------------------------------------------------------
    @classmethod
    def from_phy2log(cls, phy2log, num_experts: int, gpus: int, slots_per_gpu: int) -> "Plan":
        gpus = _positive_int("gpus", gpus)
        slots_per_gpu = _positive_int("slots_per_gpu", slots_per_gpu)
        num_experts = _positive_int("num_experts", num_experts)
        p2l = np.array(phy2log, dtype=np.int64)
        if p2l.ndim != 2 or p2l.shape[1] != gpus * slots_per_gpu:
            raise ValueError(f"phy2log must have shape [L, {gpus * slots_per_gpu}], got {p2l.shape}")
        if ((p2l < -1) | (p2l >= num_experts)).any():
            raise ValueError(f"phy2log entries must be -1 or expert ids in [0, {num_experts})")
        return cls._derived(p2l, num_experts, gpus, slots_per_gpu)

    @classmethod
    def _derived(cls, p2l: np.ndarray, num_experts: int, gpus: int, slots_per_gpu: int) -> "Plan":
        """The plan of a checked int64 phy2log (no argument checks: the planner's own output)."""
        log2phy, logcnt = _derive_log2phy(p2l, num_experts)
        return cls(p2l, log2phy, logcnt, gpus, slots_per_gpu)

    # -- shape ---------------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.phy2log.shape[0]

    @property
    def num_experts(self) -> int:
        return self.logcnt.shape[1]

    @property
    def num_slots(self) -> int:
        return self.gpus * self.slots_per_gpu

    @property
    def max_replicas(self) -> int:
        return self.log2phy.shape[2]

    @property
    def replica_gpu(self) -> np.ndarray:
        """int64 [L, E, R_max]: GPU of each replica (-1 pad)."""
        return np.where(self.log2phy >= 0, self.log2phy // self.slots_per_gpu, -1)

    def slots_used(self) -> np.ndarray:
        """int64 [L, G]: occupied slots per GPU."""
        return (self.phy2log >= 0).reshape(self.num_layers, self.gpus, self.slots_per_gpu).sum(-1)

    def num_replicas(self) -> np.ndarray:
        """int64 [L]: live replicas (occupied slots) per layer."""
        return self.logcnt.sum(1)

    # -- per-layer access ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.num_layers

    def __getitem__(self, index) -> "Plan":
        sl = slice(index, index + 1) if isinstance(index, (int, np.integer)) else index
        if isinstance(index, (int, np.integer)) and not -self.num_layers <= index < self.num_layers:
            raise IndexError(f"layer {index} out of range for {self.num_layers} layers")
        if isinstance(index, (int, np.integer)) and index < 0:
            sl = slice(self.num_layers + index, self.num_layers + index + 1)
        p2l = self.phy2log[sl]
        return Plan.from_phy2log(p2l, self.num_experts, self.gpus, self.slots_per_gpu)

    def layer(self, index: int) -> "Plan":
        return self[index]

    # -- checks and (de)serialisation ----------------------------------------------------------------------
    def validate(self) -> "Plan":
        """Raise ValueError naming the field if the arrays are inconsistent; return self."""
        L, P = self.phy2log.shape
        E = self.num_experts
        if P != self.num_slots:
            raise ValueError(f"phy2log must have {self.num_slots} slots per layer, got {P}")
        if self.logcnt.shape != (L, E):
            raise ValueError(f"logcnt must have shape [{L}, {E}], got {self.logcnt.shape}")
        if self.log2phy.ndim != 3 or self.log2phy.shape[:2] != (L, E):
            raise ValueError(f"log2phy must have shape [{L}, {E}, R_max], got {self.log2phy.shape}")
        if ((self.phy2log < -1) | (self.phy2log >= E)).any():
            raise ValueError("phy2log entries must be -1 or expert ids")
        if (self.logcnt < 1).any():
            raise ValueError("logcnt: every expert needs at least one replica")
        log2phy, logcnt = _derive_log2phy(self.phy2log, E)
        if not np.array_equal(logcnt, self.logcnt):
            raise ValueError("logcnt does not match phy2log")
        R = max(log2phy.shape[2], self.log2phy.shape[2])
        if not np.array_equal(_pad_last(log2phy, R), _pad_last(self.log2phy, R)):
            raise ValueError("log2phy does not match phy2log (slots of each expert in ascending order)")
        return self

    def to_json(self) -> str:
        return json.dumps(
            {
                "gpus": self.gpus,
                "slots_per_gpu": self.slots_per_gpu,
                "num_experts": self.num_experts,
                "phy2log": self.phy2log.tolist(),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            d = json.loads(text)
            return cls.from_phy2log(d["phy2log"], d["num_experts"], d["gpus"], d["slots_per_gpu"]).validate()
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"text is not a Plan in JSON: {exc}") from exc

    def __eq__(self, other) -> bool:
        if not isinstance(other, Plan):
            return NotImplemented
        return (
            self.gpus == other.gpus
            and self.slots_per_gpu == other.slots_per_gpu
            and self.num_experts == other.num_experts
            and np.array_equal(self.phy2log, other.phy2log)
        )

    __hash__ = None


def _pad_last(a: np.ndarray, width: int) -> np.ndarray:
    if a.shape[-1] == width:
        return a
    pad = np.full(a.shape[:-1] + (width - a.shape[-1],), -1, dtype=a.dtype)
    return np.concatenate([a, pad], axis=-1)


def _derive_log2phy(p2l: np.ndarray, E: int) -> tuple[np.ndarray, np.ndarray]:
    """log2phy [L, E, R_max] (ascending slot order) and logcnt [L, E] from phy2log [L, P] (entries in [-1, E))."""
    L, P = p2l.shape
    p2l = np.ascontiguousarray(p2l, dtype=np.int64)
    logcnt = np.zeros((L, E), dtype=np.int64)
    _count_replicas(p2l, logcnt)
    R = max(1, int(logcnt.max(initial=0)))
    log2phy = np.full((L, E, R), -1, dtype=np.int64)
    _fill_log2phy(p2l, log2phy)
    return log2phy, logcnt


@njit
def _count_replicas(p2l, logcnt):
    for l in range(p2l.shape[0]):
        for s in range(p2l.shape[1]):
            if p2l[l, s] >= 0:
                logcnt[l, p2l[l, s]] += 1


@njit
def _fill_log2phy(p2l, log2phy):
    """Each expert's slots in ascending order (log2phy -1 on entry)."""
    L, P = p2l.shape
    fill = np.zeros(log2phy.shape[1], dtype=np.int64)
    for l in range(L):
        fill[:] = 0
        for s in range(P):
            e = p2l[l, s]
            if e >= 0:
                log2phy[l, e, fill[e]] = s
                fill[e] += 1


def align_slots(new: np.ndarray, current: np.ndarray, preference: np.ndarray | None = None) -> np.ndarray:
    """Renumber the slots inside each GPU of `new` [L, G, S] (experts, -1 = free) to fit `current` [L, G, S]
    (what the slots hold now): the k-th instance of expert e on a GPU in `new` takes the slot of the k-th
    instance of e there in `current`; the other instances of `new` take the remaining slots in ascending
    `preference` [L, G, S] order (lower = taken first, ties to the lower slot; default: empty slots of
    `current` first, then slot order). Only the slot order inside each GPU changes: the experts per GPU (hence
    any balance) do not. This is the one slot renumbering of the project (the planner's relabelling and the
    pool's alignment). Returns int64 [L, G, S]."""
    new = np.ascontiguousarray(new, dtype=np.int64)
    current = np.ascontiguousarray(current, dtype=np.int64)
    if preference is None:
        preference = np.where(current < 0, -1.0, 0.0)
    preference = np.ascontiguousarray(preference, dtype=np.float64)
    if new.ndim != 3 or current.shape != new.shape or preference.shape != new.shape:
        raise ValueError(f"new, current and preference must have one shape [L, G, S], got {new.shape}, "
                         f"{current.shape} and {preference.shape}")
    out = np.full(new.shape, -1, dtype=np.int64)
    _align_slots(new, current, preference, out)
    return out


@njit
def _align_slots(new, current, preference, out):
    """align_slots, one GPU at a time (S x S comparisons per GPU; out -1 on entry)."""
    L, G, S = new.shape
    occ_new = np.empty(S, dtype=np.int64)
    occ_cur = np.empty(S, dtype=np.int64)
    want = np.empty(S, dtype=np.int64)
    taken = np.empty(S, dtype=np.bool_)
    free = np.empty(S, dtype=np.int64)
    for l in range(L):
        for g in range(G):
            a = new[l, g]
            c = current[l, g]
            for s in range(S):  # how many earlier slots of the GPU hold the same expert
                occ_new[s] = 0
                occ_cur[s] = 0
                for t in range(s):
                    if a[t] == a[s]:
                        occ_new[s] += 1
                    if c[t] == c[s]:
                        occ_cur[s] += 1
                taken[s] = False
            for s in range(S):  # the k-th instance of e keeps the slot of the k-th one there now
                want[s] = -1
                if a[s] >= 0:
                    for t in range(S):
                        if c[t] == a[s] and occ_cur[t] == occ_new[s]:
                            want[s] = t
                            taken[t] = True
                            break
            nf = 0  # the untaken slots by preference (insertion sort: ties keep slot order; NaN last)
            for t in range(S):
                if taken[t]:
                    continue
                v = preference[l, g, t]
                j = nf
                while j > 0 and (preference[l, g, free[j - 1]] > v or (v == v and preference[l, g, free[j - 1]]
                                                                         != preference[l, g, free[j - 1]])):
                    free[j] = free[j - 1]
                    j -= 1
                free[j] = t
                nf += 1
            k = 0  # the unmatched instances take them in slot order, then the free entries
            for s in range(S):
                if want[s] >= 0:
                    out[l, g, want[s]] = a[s]
                elif a[s] >= 0:
                    out[l, g, free[k]] = a[s]
                    k += 1
