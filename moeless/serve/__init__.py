"""Real expert-parallel serving with serverless experts on torch.distributed (NCCL on GPUs, gloo on CPU).

Started by torchrun (or any launcher that sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT), one process per
GPU. Non-expert modules are data-parallel; the routed experts of every MoE block are served expert-parallel
over the replica plan the control plane (`moeless.engine`) made for the layer. The package, along its seams
(after vLLM's modular kernel):

    dist               the process group and its collectives; a failure is one ServeError line
    models             load a Hugging Face MoE model, find its MoE blocks, say what cannot be served
    request            Request, Result, why a request is refused
    experts            ExpertParallelExperts: one layer's slot buffers on this rank, their cold starts, the plan
                       on the device (cached per plan) and the expert compute (fused_moe through a ReplicaPlan)
    prepare_finalize   prepare (counts all-gather, serve-time split, dispatch, all-to-all) and finalize
                       (all-to-all back, routed weights, combine) of a layer
    transfer           the host <-> device boundary: one download and one pinned upload per layer
    metrics            LayerTimer (per-layer times, CPU, pairs per rank) and the report statistics
    server             ExpertParallelServer: the layer loop, generation, batching, summary

One MoE layer waits for its device once (the gathered counts: the uneven all-to-all's split sizes); the
control plane of layer l+d runs while the layer's tokens are in flight. Routing is never changed: a replica
computes the same expert, so the outputs equal the single-process model's (up to the summation order of a
different GEMM grouping). A rank that dies or stalls makes the others raise `ServeError` (naming the
collective and the layer) within the process group's timeout instead of hanging. This package is the only
part of moeless that imports torch.distributed; it must never change routing or a plan, and never drops a pair.
"""
from moeless.serve.dist import Collectives, DistContext, ServeError, free_port, init_distributed, shutdown
from moeless.serve.experts import DevicePlan, ExpertParallelExperts
from moeless.serve.metrics import LayerTimer, load_report, pair_balance, percentiles
from moeless.serve.models import cache_of, check_model_path, check_supported, find_moe_blocks, load_model
from moeless.serve.prepare_finalize import AllToAllPrepareFinalize, Counts, Prepared
from moeless.serve.request import Request, Result, check_request, error_kinds
from moeless.serve.server import ExpertParallelServer

__all__ = [
    "AllToAllPrepareFinalize", "Collectives", "Counts", "DevicePlan", "DistContext", "ExpertParallelExperts",
    "ExpertParallelServer", "LayerTimer", "Prepared", "load_report", "Request", "Result", "ServeError", "cache_of",
    "check_model_path", "check_request", "check_supported", "error_kinds", "find_moe_blocks", "free_port",
    "init_distributed", "load_model", "pair_balance", "percentiles", "shutdown",
]
