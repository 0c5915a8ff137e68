"""The control plane's planner: expert scaling (Algorithm 1), placement (Algorithm 2), the serve-time split.

Per MoE layer and iteration, given per-expert loads (predicted token counts, [L, E]) and a memory budget of
G GPUs x S slots, the planner decides how many replicas each expert gets (`logcnt`), which physical slot holds
each replica (`phy2log` / `log2phy`), and -- once the true counts are known -- how many of each expert's
(token, k) pairs each replica serves (`replica_tokens`). Everything is numpy on small arrays, vectorised across
layers; loops run over replicas or GPUs, never over layers.

What it must never do: change routing (a split only decides which replica of the chosen expert serves a pair),
exceed a GPU's slots, import torch at module level or any kernel (the torch split imports torch lazily), or
read the clock (the pool owns time).

Index arrays (DeepSeek EPLB's and vLLM's names):

    loads          float [L, E]      predicted (or true) (token, k) pairs per logical expert
    phy2log        int64 [L, G*S]    logical expert held by physical slot p (-1 = free); slot p is on GPU p // S
    log2phy        int64 [L, E, R]   physical slots of expert e's replicas, ascending slot order (-1 = pad)
    logcnt         int64 [L, E]      replicas per expert (>= 1)
    replica_tokens int64 [L, E, R]   pairs served by replica r of expert e (0 on pads); sums to the counts

Scaling rules (`rule=`):

- ``"literal"``: the paper's Algorithm 1. Add one replica to the expert with the largest per-replica load
  while the coefficient of variation (std / mean over all replicas' loads) exceeds `cv_threshold` and the
  budget (G*S - E extra slots) lasts. On fine-grained MoE this spends the whole budget: with 64 experts and
  a 64-token batch most experts carry 0..3 pairs, and those replicas alone keep the CV above 0.2 whatever is
  replicated (ESFT, 8 GPUs x 9 slots: the literal rule fills all 72 slots in every layer; see
  bench/bench_planner.py).
- ``"ideal"`` (default): what matters is the GPU load, not the replica CV. With C = total / G the ideal GPU
  load, an expert needs R_e = ceil(W_e / ((1 + tolerance) C)) replicas, because no split can put more than
  C on each of R_e distinct GPUs otherwise; that is the fewest replicas that allow balance max/mean <= 1 +
  tolerance. If that exceeds the budget, the budget is spent by EPLB's min-max greedy instead (one replica at
  a time to the expert with the largest per-replica load, which minimises the largest replica load).
  The slots it leaves free are used by the placement's *bridging* step below, only where they help.
  With ``hedge=True`` (the default of `plan_layers`) the rule spends every slot instead: see Hedging.

Hedging (``hedge=True``, default). A prediction is wrong by a few tokens per expert, and those errors add up
per GPU (ESFT, 64-token batches, 8 GPUs: a GPU's load is off by ~15% of C from sampling alone). The serve-time
split can move a GPU's excess only through experts that also have a replica elsewhere, so the planner buys
flexibility with the spare slots: (a) every slot holds a replica, the spare ones going by EPLB's min-max
greedy to the experts with the largest predicted load per replica (the largest absolute errors); (b) in a cold
placement the replicated experts form a chain around the ring of GPUs: the k-th replicated expert (largest
per-replica load first) takes GPUs s_k .. s_k + R_k - 1 (mod G), with s_k = sum over earlier ones of (R_i -
1), so consecutive experts share a GPU and every GPU is linked to its neighbours (LPT alone puts the two
replicas of each hot expert on the two lightest GPUs: disjoint pairs, ~2 components of 8 GPUs per ESFT layer;
the chain gives 1). Across a link the split can move up to the whole true load of the linking expert, so an
error on one GPU spreads over all of them. Layers where the chain would overfill a GPU or wrap an expert onto
itself keep plain LPT. (c) Warm, optional (`reuse_whole=True`): a layer whose previous plan still admits a
split of the new predicted loads that reaches the mean (max over GPU sets X of W(X) / |X| = C, exact for G <=
EXACT_SPLIT_MAX_GPUS) keeps it whole: every instance stays and there is no placement work, but the links stay
on the experts that were hottest before, so errors are absorbed less well. Measured with real predictors on
held-out ESFT routing (bench/esft_balance.py, bench/results/esft_balance.md; 8 GPUs x 9 slots, online,
serve-time split, 64 / 512-token batches, in-distribution): the regression predictor reaches 1.019 / 1.002
(1.025 / 1.004 with reuse_whole=True) instead of 1.197 / 1.091 without hedging, the oracle 1.0001 instead of
1.013. The price: every slot holds an instance (G*S per layer instead of ~E + G), and fewer instances stay in
place in warm serving (ESFT oracle loads, one task, 64 / 512-token batches: 31% / 46%, vs 62% / 89% without
hedging and 54% / 99.6% with reuse_whole=True).

Serve-time split: given the plan and the true counts of a layer, choose integer replica_tokens that minimise
the maximum GPU load. The optimum is M* = max over GPU sets X of ceil(W(X) / |X|), W(X) = pairs of the experts
whose replicas all lie in X (Hall's condition for the transportation problem; integral by max-flow
integrality), i.e. within one token of the LP optimum. For G <= EXACT_SPLIT_MAX_GPUS it is computed exactly
by a subset-sum (zeta) transform over the 2^G GPU sets and realised one replica at a time, keeping every Hall
constraint satisfied (so the last replica of each expert always fits). For more GPUs a greedy water-filling
(two Gauss-Seidel sweeps) is used, and the even split replaces it in a layer where it would be worse.

Modules: `plan` (the Plan type, argument checks, `align_slots`), `scaling` (Algorithm 1, the ideal rule,
`replicate_minmax`), `placement` (placement stages, `plan_layers`), `split` (even and serve-time splits, balance).
Pairs are the planner's objective; `moeless.policy` decides with time (the cost model) and uses these pieces.
"""

from moeless.planner.placement import place_replicas, plan_layers
from moeless.planner.plan import Plan, _check_loads, _positive_int, align_slots
from moeless.planner.scaling import replicate_minmax, scale_ideal, scale_literal
from moeless.planner.split import (EXACT_SPLIT_MAX_GPUS, MAX_LAYER_PAIRS, balance, even_split, gpu_loads,
                                   serve_time_split, split_optimum)

__all__ = [
    "EXACT_SPLIT_MAX_GPUS",
    "MAX_LAYER_PAIRS",
    "Plan",
    "align_slots",
    "balance",
    "even_split",
    "gpu_loads",
    "place_replicas",
    "plan_layers",
    "replicate_minmax",
    "scale_ideal",
    "scale_literal",
    "serve_time_split",
    "split_optimum",
]
