"""vLLM plug-in: `MoelessEplbPolicy`, moeless's decisions behind vLLM's EPLB (verified on vllm 0.33.0).

vLLM's EPLB (`--enable-eplb --eplb-config '{...}'`) sums the last `window_size` passes' per-expert loads,
all-reduces them and, every `step_interval` passes, calls its policy's classmethod

    rebalance_experts(weight [L, E], num_replicas, num_groups, num_nodes, num_ranks,
                      old_global_expert_indices [L, P] | None) -> phy2log [L, P] (CPU tensor)

on every rank (`distributed/eplb/policy/abstract.py`; the caller passes the live placement as the last
argument). `MoelessEplbPolicy` answers with moeless's policy: the planner on the window's load (vLLM hands
over only the window sum, so the history predictor has a single pass to go on), every logical expert on
>= 1 slot, every slot filled, instances kept in their slots where the balance allows (GPUs renumbered to the
old placement, then slots inside a GPU), int64 on the CPU, deterministic (a pure function of its arguments:
every rank computes the same map). moeless treats all ranks as one pool (num_groups, num_nodes unused).

Installing it: vLLM 0.33 selects the policy by `EPLBConfig.policy`, typed `Literal["default"]` in a pydantic
dataclass that forbids other values, and `distributed/eplb/policy/__init__.py` asserts that the keys of
`EPLB_POLICIES` equal that Literal. No new name can be passed, so the `vllm.general_plugins` entry point
`register()` (run by vLLM in every process, workers included, before the model runner exists) *replaces the
"default" entry* of `EPLB_POLICIES` with `MoelessEplbPolicy`, and only when the user opts in with
MOELESS_VLLM_EPLB=1 (otherwise it does nothing). `--eplb-config` then keeps `"policy": "default"`; async
EPLB (vLLM's default, which it allows only for "default") runs moeless too.

vLLM's per-token replica choice is an even hash split (`model_executor/layers/fused_moe/router/
base_router.py`: replica = ((token_idx * 2654435769) & 0xFFFFFFFF) % replica_count); moeless's quota split
would need a change there, so this plug-in changes only the placement.

What it must never do: import vLLM at module level (the class is built on first use), act without the opt-in,
or keep state between calls.
"""
from __future__ import annotations

import logging
import os

import numpy as np

from moeless.integrations import _policy

__all__ = ["ENV", "MoelessEplbPolicy", "register", "rebalance_phy2log"]

ENV = "MOELESS_VLLM_EPLB"  # "1" installs MoelessEplbPolicy as vLLM's EPLB policy
_TRUE = ("1", "true", "yes", "on")
logger = logging.getLogger(__name__)


def rebalance_phy2log(weight, num_replicas: int, num_ranks: int, old_global_expert_indices=None):
    """moeless's phy2log int64 [L, num_replicas] (a CPU torch tensor) for the window load `weight` [L, E]."""
    import torch

    w = weight.detach().float().cpu().numpy() if hasattr(weight, "detach") else np.asarray(weight, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"weight must have shape [L, E] (layers, logical experts), got {tuple(w.shape)}")
    plan = _policy.rebalance(w[None], num_replicas, num_ranks, previous_phy2log=old_global_expert_indices)
    return torch.from_numpy(plan.phy2log.copy())


_CLASS = None


def _policy_class():
    """Build MoelessEplbPolicy on vLLM's AbstractEplbPolicy (imported here, not at module load)."""
    global _CLASS
    if _CLASS is None:
        from vllm.distributed.eplb.policy.abstract import AbstractEplbPolicy

        class MoelessEplbPolicy(AbstractEplbPolicy):
            """moeless's EPLB policy for vLLM (see moeless.integrations.vllm)."""

            @classmethod
            def rebalance_experts(cls, weight, num_replicas: int, num_groups: int, num_nodes: int, num_ranks: int,
                                  old_global_expert_indices=None):
                return rebalance_phy2log(weight, num_replicas, num_ranks, old_global_expert_indices)

        MoelessEplbPolicy.__module__ = __name__
        MoelessEplbPolicy.__qualname__ = "MoelessEplbPolicy"
        _CLASS = MoelessEplbPolicy
    return _CLASS


def __getattr__(name):  # PEP 562: `from moeless.integrations.vllm import MoelessEplbPolicy` imports vLLM then
    if name == "MoelessEplbPolicy":
        return _policy_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register() -> None:
    """The `vllm.general_plugins` entry point: with MOELESS_VLLM_EPLB=1, vLLM's "default" EPLB policy becomes
    MoelessEplbPolicy (vLLM 0.33 accepts no other policy name); without it, nothing happens."""
    if os.environ.get(ENV, "").strip().lower() not in _TRUE:
        return
    from vllm.distributed.eplb import policy as eplb_policy

    cls = _policy_class()
    if eplb_policy.EPLB_POLICIES.get("default") is not cls:
        eplb_policy.EPLB_POLICIES["default"] = cls
        logger.warning("moeless: %s=1, vLLM's EPLB policy \"default\" now runs moeless's MoelessEplbPolicy "
                       "(vLLM %s accepts no other policy name)", ENV, _vllm_version())


def _vllm_version() -> str:
    try:
        from importlib.metadata import version

        return version("vllm")
    except Exception:  # noqa: BLE001
        return "?"
