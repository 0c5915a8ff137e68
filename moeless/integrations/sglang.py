"""SGLang plug-in: moeless's policy behind `--enable-eplb --eplb-algorithm moeless` (verified on sglang 0.5.23).

Installed as the `moeless` entry point of the `sglang.srt.plugins` group (setup.py), so SGLang's
`load_plugins()` calls `register()` in every scheduler process before the model runs. `register()` hooks
three functions through SGLang's own `HookRegistry` (AROUND hooks: anything that is not moeless's goes to
SGLang's code unchanged):

- `sglang.srt.eplb.eplb_algorithms.compute_algorithm`: the name "moeless" (not one of SGLang's `EplbAlgorithm`
  members, which would raise a KeyError) maps to the marker `MOELESS`.
- `sglang.srt.eplb.eplb_algorithms.rebalance_experts(tokens_per_expert [T, L, E], num_physical_experts,
  num_local_physical_experts, num_groups, num_nodes, algorithm)`: for `MOELESS`, moeless's policy on the
  recorder's per-pass series (`rebalance_experts` below) instead of a window sum.
- `sglang.srt.eplb.lplb_solver.LPLBSolver._solve(global_counts [E])` (only with `--ep-dispatch-algorithm lp`
  and `--eplb-algorithm moeless`, unless MOELESS_SGLANG_LP=sglang): per-replica probabilities from moeless's
  serve-time split of the batch's all-reduced counts over the layer's replicas, instead of SGLang's LP. SGLang's
  kernel then samples one replica per (token, k) with them. The split runs on the host (one device-to-host copy
  of E counts per layer and batch), so it cannot run inside a CUDA graph: launch with --disable-cuda-graph
  (it raises a clear error otherwise).

Outputs follow SGLang's own `deepseek` algorithm exactly: int64 CPU tensors phy2log [L, P], log2phy
[L, E, X] (X = the largest replica count, -1 padded, a replica's slots in ascending order) and logcnt
[L, E]; every slot holds an expert and every expert has >= 1 slot. Rank invariance: every rank calls the
rebalance on the same all-reduced counts and the same live placement, and moeless's policy is a pure
function of them, so every rank gets the same plan; the LP hook's split is computed from the all-reduced
counts too. moeless treats all GPUs as one pool (num_groups and num_nodes are not used: no hierarchical
node packing).

Offline helpers: `init_expert_location(plan)` -> the `{"physical_to_logical_map": ...}` object that
`--init-expert-location FILE.json` reads; the recorder's dumps are read by `moeless.traces`
(`read_sglang_dump`, `read_sglang_logical_count`, re-exported here).

What it must never do: import SGLang at module level (only `register()` and the hooks do), hold state
between rebalances (ranks must agree), or change routing.
"""
from __future__ import annotations

import os

import numpy as np

from moeless.integrations import _policy
from moeless.planner import Plan
from moeless.traces import read_sglang_dump, read_sglang_logical_count

__all__ = [
    "ALGORITHM",
    "ENV_LP",
    "MOELESS",
    "init_expert_location",
    "lp_probabilities",
    "read_sglang_dump",
    "read_sglang_logical_count",
    "rebalance_experts",
    "register",
]

ALGORITHM = "moeless"  # the value of --eplb-algorithm
ENV_LP = "MOELESS_SGLANG_LP"  # "moeless" (default): moeless's split under --ep-dispatch-algorithm lp; "sglang": SGLang's LP

_TARGETS = {
    "compute_algorithm": "sglang.srt.eplb.eplb_algorithms.compute_algorithm",
    "rebalance_experts": "sglang.srt.eplb.eplb_algorithms.rebalance_experts",
    "lp_solve": "sglang.srt.eplb.lplb_solver.LPLBSolver._solve",
}


class _MoelessAlgorithm:
    """What `compute_algorithm("moeless", ...)` returns: SGLang's `EplbAlgorithm` is a closed Enum."""

    name = ALGORITHM

    def __repr__(self) -> str:
        return "EplbAlgorithm.moeless (moeless plug-in)"


MOELESS = _MoelessAlgorithm()


# ---- the pure functions (no SGLang needed) ---------------------------------------------------------------------
def rebalance_experts(tokens_per_expert, num_physical_experts: int, num_local_physical_experts: int, *,
                      previous_phy2log=None, oldest_index: int = 0):
    """moeless's answer to SGLang's `rebalance_experts`: (phy2log int64 [L, P], log2phy int64 [L, E, X],
    logcnt int64 [L, E]) CPU torch tensors, as SGLang's `deepseek` algorithm returns them.

    `tokens_per_expert` [T, L, E] (or [L, E], one pass): the recorder's per-pass logical counts;
    `oldest_index`: the row of the oldest pass (SGLang's recorder is a ring buffer: the row it writes next);
    `previous_phy2log` [L, P]: the live placement, whose instances stay in place where the balance allows."""
    import torch

    h = tokens_per_expert.detach().cpu().numpy() if hasattr(tokens_per_expert, "detach") else np.asarray(tokens_per_expert)
    if h.ndim == 2:  # SGLang's init_by_eplb accepts one [L, E] matrix as one pass
        h = h[None]
    if h.ndim != 3:
        raise ValueError(f"tokens_per_expert must have shape [T, L, E] or [L, E], got {tuple(h.shape)}")
    if not isinstance(num_local_physical_experts, (int, np.integer)) or num_local_physical_experts < 1:
        raise ValueError(f"num_local_physical_experts must be a positive integer, got {num_local_physical_experts!r}")
    if not isinstance(num_physical_experts, (int, np.integer)) or num_physical_experts % num_local_physical_experts:
        raise ValueError(f"num_physical_experts={num_physical_experts!r} must be a multiple of "
                         f"num_local_physical_experts={num_local_physical_experts}")
    if not 0 <= int(oldest_index) < h.shape[0]:
        raise ValueError(f"oldest_index must lie in [0, {h.shape[0]}), got {oldest_index!r}")
    h = np.roll(h, -int(oldest_index), axis=0)
    plan = _policy.rebalance(h, int(num_physical_experts), int(num_physical_experts // num_local_physical_experts),
                             previous_phy2log=previous_phy2log)
    return (torch.from_numpy(plan.phy2log.copy()), torch.from_numpy(plan.log2phy.copy()),
            torch.from_numpy(plan.logcnt.copy()))


class _LayerSplit:
    """moeless's split for one layer of SGLang's LP path, built once per solver (SGLang rebuilds its solvers
    after every rebalance): the layer's plan from its logical_to_all_physical_map [E, X] (-1 pad; slots no
    expert lists, as in a rank-local map that keeps only the nearest replica, are free) and where each of the
    plan's replicas sits among SGLang's columns."""

    def __init__(self, log2phy, num_physical: int, gpus: int):
        l2p = log2phy.detach().cpu().numpy() if hasattr(log2phy, "detach") else np.asarray(log2phy)
        if l2p.ndim != 2:
            raise ValueError(f"log2phy must have shape [E, X], got {tuple(l2p.shape)}")
        E = l2p.shape[0]
        p2l = np.full(int(num_physical), -1, dtype=np.int64)
        e, j = np.nonzero(l2p >= 0)
        p2l[l2p[e, j]] = e
        self.plan = Plan.from_phy2log(p2l[None], E, int(gpus), int(num_physical) // int(gpus))
        self.valid = l2p >= 0
        # column j of SGLang's row e holds slot l2p[e, j]; the plan lists an expert's slots in ascending order
        order = np.argsort(np.where(self.valid, l2p, np.iinfo(np.int64).max), axis=1, kind="stable")
        self.rank = np.argsort(order, axis=1, kind="stable")
        self.rows = np.nonzero(self.valid)[0]

    def __call__(self, global_counts):
        import torch

        counts = torch.as_tensor(global_counts)
        c = np.rint(counts.detach().float().cpu().numpy()).astype(np.int64)
        if c.shape != (self.valid.shape[0],):
            raise ValueError(f"global_counts must have shape [E] = [{self.valid.shape[0]}], got {tuple(c.shape)}")
        rt = _policy.split_quotas(self.plan, c[None])[0]  # [E, R] in the plan's (ascending slot) order
        share = np.zeros(self.valid.shape, dtype=np.float64)
        share[self.valid] = rt[self.rows, self.rank[self.valid]]
        return torch.as_tensor(share / max(int(c.sum()), 1), dtype=torch.float32, device=counts.device)


def lp_probabilities(global_counts, log2phy, num_physical: int, gpus: int):
    """moeless's replacement of `LPLBSolver._solve`: float32 [E, X] on the counts' device, the share of the
    batch's pairs that each replica (the columns of SGLang's log2phy [E, X]) should serve, from moeless's exact
    serve-time split of the integer counts `global_counts` [E] over the replicas' GPUs. A row is zero when the
    expert has no pair (SGLang's sampler then falls back to uniform over the valid replicas)."""
    return _LayerSplit(log2phy, num_physical, gpus)(global_counts)


def init_expert_location(plan: Plan, *, num_layers: int | None = None, num_experts: int | None = None) -> dict:
    """{"physical_to_logical_map": phy2log [L, P] as lists}: the file that `--init-expert-location FILE.json`
    reads (SGLang passes the object's keys to `ExpertLocationMetadata.init_by_mapping`, so it holds no other
    key). SGLang needs every slot filled, P = E + --ep-num-redundant-experts (a multiple of the EP size), and L
    = the model's number of layers as SGLang counts them (dense layers included); `num_layers` /
    `num_experts`, when given, are checked."""
    if not isinstance(plan, Plan):
        raise ValueError(f"plan must be a moeless Plan, got {type(plan).__name__}")
    if (plan.phy2log < 0).any():
        raise ValueError(f"plan has {int((plan.phy2log < 0).sum())} empty slot(s); SGLang needs every slot to hold "
                         "an expert (moeless's default planning fills them all)")
    if num_layers is not None and plan.num_layers != num_layers:
        raise ValueError(f"plan has {plan.num_layers} layers, the model {num_layers}")
    if num_experts is not None and plan.num_experts != num_experts:
        raise ValueError(f"plan has {plan.num_experts} experts, the model {num_experts}")
    return {"physical_to_logical_map": plan.phy2log.tolist()}


# ---- the hooks ---------------------------------------------------------------------------------------------
def _bind(args, kwargs, names):
    out = dict(zip(names, args))
    out.update(kwargs)
    return out


def _compute_algorithm(original, *args, **kwargs):
    raw = _bind(args, kwargs, ("raw_algorithm", "num_groups", "num_nodes")).get("raw_algorithm")
    return MOELESS if raw == ALGORITHM else original(*args, **kwargs)


def _recorder_oldest_index(num_passes: int) -> int:
    """Row of the oldest pass in SGLang's recorder ring buffer (the row it writes next); 0 when the buffer is
    not a ring of `num_passes` rows (an infinite buffer, or counts read from a file at start-up)."""
    try:
        from sglang.srt.eplb.expert_distribution import get_global_expert_distribution_recorder

        buf = get_global_expert_distribution_recorder()._accumulator._global_physical_count_of_buffered_step
        index = int(buf._curr_index)
        return index if len(buf._buffer) == num_passes and 0 <= index < num_passes else 0
    except Exception:  # noqa: BLE001 - no recorder (start-up, tests) or another SGLang layout: time order as given
        return 0


def _live_phy2log():
    """The placement serving now (identical on every rank), or None before there is one."""
    try:
        from sglang.srt.eplb.expert_location import get_global_expert_location_metadata

        metadata = get_global_expert_location_metadata()
        return None if metadata is None else metadata.physical_to_logical_map_cpu
    except Exception:  # noqa: BLE001 - no runtime context yet
        return None


def _rebalance_experts(original, *args, **kwargs):
    a = _bind(args, kwargs, ("tokens_per_expert", "num_physical_experts", "num_local_physical_experts",
                             "num_groups", "num_nodes", "algorithm"))
    if a.get("algorithm") is not MOELESS:
        return original(*args, **kwargs)
    counts = a["tokens_per_expert"]
    passes = counts.shape[0] if counts.dim() == 3 else 1
    return rebalance_experts(counts, a["num_physical_experts"], a["num_local_physical_experts"],
                             previous_phy2log=_live_phy2log(), oldest_index=_recorder_oldest_index(passes))


def _moeless_lp_enabled() -> bool:
    if os.environ.get(ENV_LP, ALGORITHM).strip().lower() == "sglang":
        return False
    try:
        from sglang.srt.runtime_context import get_exec

        return get_exec().moe.eplb_algorithm == ALGORITHM
    except Exception:  # noqa: BLE001 - no runtime context: SGLang's own LP
        return False


def _lp_solve(original, solver, global_counts):
    if not _moeless_lp_enabled():
        return original(solver, global_counts)
    import torch

    if global_counts.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("moeless's lp split runs on the host and cannot be captured in a CUDA graph: launch "
                           f"SGLang with --disable-cuda-graph, or set {ENV_LP}=sglang to keep SGLang's LP")
    split = solver.__dict__.get("_moeless_split")
    if split is None:  # once per solver: SGLang builds new solvers after each rebalance
        split = solver._moeless_split = _LayerSplit(solver.log2phy, solver.num_phy, solver.num_gpus)
    return split(global_counts)


def register() -> None:
    """The `sglang.srt.plugins` entry point: hook SGLang's EPLB so that --eplb-algorithm moeless runs
    moeless (idempotent: SGLang applies each target's hooks once)."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    for key, hook in (("compute_algorithm", _compute_algorithm), ("rebalance_experts", _rebalance_experts),
                      ("lp_solve", _lp_solve)):
        target = _TARGETS[key]
        if not any(h is hook for _, h, _ in getattr(HookRegistry, "_hooks", {}).get(target, ())):
            HookRegistry.register(target, hook, HookType.AROUND)
