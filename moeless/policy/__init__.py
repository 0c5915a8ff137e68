"""One control-plane policy, called alike by the real serving loop, the simulator and the engine plug-ins.

A policy decides, per MoE layer, which expert instances the layer runs with and how its tokens are split over
them (see `moeless.policy.base.Policy` for the interface). The engine (moeless.engine) drives it: it gives the
policy the predicted loads of layer l+d, the live placement (the function pool's instances), the copy links'
state and the look-ahead, realises the plan the policy returns in the pool, and asks the policy for the split
of the true counts when the layer runs. "Policy" means one thing everywhere in moeless:

- `MoelessPolicy` ("moeless"): time-aware serverless replicas over resident home instances (serverless.py);
- `StaticEPPolicy` ("megatron"): Megatron-LM expert parallelism;
- `EPLBPolicy` ("eplb"): DeepSeek's EPLB at a deployment's cadence (serverful.py).

    from moeless.policy import make_policy
    policy = make_policy("moeless", num_layers=32, num_experts=8, gpus=8, slots_per_gpu=2, cost=cost)

This package never reads a clock, copies weights or changes routing.
"""
from __future__ import annotations

from moeless.policy.base import DenseLayout, LayerContext, Policy, home_plan
from moeless.policy.serverful import EPLBPolicy, StaticEPPolicy
from moeless.policy.serverless import MoelessPolicy

__all__ = ["DenseLayout", "EPLBPolicy", "LayerContext", "MoelessPolicy", "POLICIES", "Policy", "StaticEPPolicy",
           "home_plan", "make_policy"]

POLICIES = ("moeless", "megatron", "eplb")


def make_policy(name: str, *, num_layers: int, num_experts: int, gpus: int, slots_per_gpu: int, cost=None,
                **options) -> Policy:
    """A policy by name ("moeless", "megatron" or "ep", "eplb"); `options` go to its class."""
    if name == "moeless":
        if cost is None:
            raise ValueError("policy 'moeless' needs a cost model (cost=): it decides by predicted time")
        return MoelessPolicy(num_layers, num_experts, gpus, slots_per_gpu, cost, **options)
    if name in ("megatron", "ep"):
        return StaticEPPolicy(num_layers, num_experts, gpus, slots_per_gpu, cost, **options)
    if name == "eplb":
        return EPLBPolicy(num_layers, num_experts, gpus, slots_per_gpu, cost, **options)
    raise ValueError(f"policy must be one of {', '.join(POLICIES)} (or 'ep'), got {name!r}")
