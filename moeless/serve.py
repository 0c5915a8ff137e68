"""Real expert-parallel serving with serverless experts on torch.distributed (NCCL on GPUs, gloo on CPU).

Started by torchrun (or any launcher that sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT), one process per
GPU. Non-expert modules (embedding, attention, norms, routers, shared experts, head) are data-parallel: every
rank holds them whole and runs its own share of the requests. The routed experts of every MoE block are replaced
by `ExpertParallelExperts`, which, per MoE layer and iteration, does

    the model's own router (unchanged)  ->  all-gather of per-expert counts [G, E] (+ the predicted counts of
    layer l+d and rank 0's clock)  ->  serve-time split of the true counts over the plan's replicas
    (`Engine.split`), cut rank by rank in rank order  ->  replica_dispatch: physical slot per (token, k) pair
    ->  all-to-all of the pairs' hidden states (uneven splits; every rank derives the splits from the gathered
    counts, so no separate all-to-all of counts is needed)  ->  fused_moe over the rank's own slot buffer
    ->  all-to-all back  ->  routed weight  ->  combine (fp32 sum over K)

and, while the tokens are in flight (an async all-to-all), the engine plans layer l+d (keeping its plan while
it still balances the predicted loads); its function pool reports which instances cold-start, and each rank
copies those of its own slots from the host copy of the experts (on a side CUDA stream on GPUs; layer l+d waits
on it). Each rank keeps S weight buffers per layer ([S, 2I, H] and [S, H, I]); a plan slot reads the buffer that
holds its expert (the kernels' slot_to_weight), so an expert moved between slots of one rank is not copied
again. All experts stay in host memory once per process. Batches too small for the engine's hysteresis ever to
re-plan skip the prediction and the exact split (every pair goes to its expert's first replica).

Peer copies (a cold start fetched from a rank that holds the expert) are left out on purpose: on this data
plane every process holds the host copy of all experts, so a cold start is a local host-to-device (on CPU, a
memcpy) copy that needs no other rank; a peer copy would add a send/recv pair that both ranks must reach, on the
critical path of the rank that serves, to save host-link bandwidth that the tiny model does not use up.

Routing is never changed: a replica computes the same expert, so the outputs equal the single-process model's
(up to the summation order of a different GEMM grouping). Every layer's time is measured (CUDA events on GPUs,
perf_counter on CPU) from its entry to its output less the counts all-gather (which also absorbs the wait for
ranks still in attention; both policies send the same message), with the rank's CPU time in that span, a
profile of its parts, pairs per rank, cold starts, replicas and the pool's memory x time bill.

A rank that dies or stalls makes the others raise `ServeError` (naming the collective and the layer) within the
process group's timeout instead of hanging. This is the only module of moeless that imports torch.distributed;
it must never change routing or a plan, and never drops a pair.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from moeless.engine import Engine, GateReplicaLoads, default_slots_per_gpu
from moeless_kernels.combine import combine
from moeless_kernels.dispatch import replica_dispatch
from moeless_kernels.fused_moe import fused_moe

__all__ = [
    "DistContext",
    "ExpertParallelExperts",
    "ExpertParallelServer",
    "Request",
    "Result",
    "ServeError",
    "find_moe_blocks",
    "init_distributed",
    "load_model",
    "shutdown",
]


class ServeError(RuntimeError):
    """A distributed serving failure: a peer rank died or stalled, or the ranks disagree."""


# ---------------------------------------------------------------------------------------------------------------
# process group


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    device: torch.device
    backend: str
    timeout_s: float

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(*, backend: str | None = None, timeout_s: float = 120.0, rank: int | None = None,
                     world_size: int | None = None, init_method: str | None = None) -> DistContext:
    """Join (or create) the default process group: NCCL when CUDA is present, gloo otherwise.

    rank / world_size / init_method default to torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT);
    a single process without them gets a world of one on a free local port. `timeout_s` bounds every
    collective, so a dead or stalled peer becomes an error instead of a hang."""
    if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"timeout_s must be a finite number > 0, got {timeout_s!r}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    if rank is None:
        rank = int(os.environ.get("RANK", 0))
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", 1))
    if init_method is None and "MASTER_ADDR" not in os.environ:
        init_method = f"tcp://127.0.0.1:{_free_port()}" if world_size == 1 else None
        if init_method is None:
            raise ValueError("init_method: no MASTER_ADDR in the environment; start with torchrun or pass one")
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count())))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s), **kwargs)
    return DistContext(dist.get_rank(), dist.get_world_size(), device, backend, float(timeout_s))


def shutdown() -> None:
    """Destroy the default process group if there is one (call it in a `finally`)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------------------
# models


def find_moe_blocks(model) -> list[tuple[str, torch.nn.Module]]:
    """(name, block) of every MoE block of a Hugging Face model, in layer order: a module with a router
    (`gate` or `router`) and routed `experts` holding 3-D `gate_up_proj` / `down_proj` (transformers 5 layout;
    Mixtral's `block_sparse_moe`, Qwen/OLMoE/DeepSeek/PhiMoE `mlp`; shared experts stay in the block)."""
    found = []
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        if experts is None or not (hasattr(module, "gate") or hasattr(module, "router")):
            continue
        if isinstance(experts, ExpertParallelExperts):
            found.append((name, module))
            continue
        gu, dn = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
        if isinstance(gu, torch.Tensor) and isinstance(dn, torch.Tensor) and gu.ndim == 3 and dn.ndim == 3:
            found.append((name, module))
    return found


def _experts_blockers(experts) -> tuple[str, ...]:
    from moeless.hf import fast_path_blockers

    if not hasattr(experts, "has_gate"):  # not decorated by transformers' @use_experts_implementation
        return (f"{type(experts).__name__} is not a transformers 5 experts module",)
    return fast_path_blockers(experts)


def load_model(path: str | Path | None = None, *, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A Hugging Face MoE causal LM from a local folder, or the embedded tiny model (path None).

    The tiny model's shipped weights are used when present (moeless/data/tiny_moe), else a seeded random one.
    ValueError (naming `model`) for a missing path, a folder that is not a model, or an architecture whose
    experts the serving loop cannot run (no MoE block, biases, a non-SwiGLU activation)."""
    from moeless import tiny_moe

    if path is None:
        if (tiny_moe.MODEL_DIR / "config.json").exists():
            model = tiny_moe.load(dtype=dtype)
        else:
            from transformers import MixtralForCausalLM

            torch.manual_seed(seed)
            model = MixtralForCausalLM(tiny_moe.build_config()).to(dtype).eval()
    else:
        p = Path(path)
        if not p.exists():
            raise ValueError(f"model: no such path {str(path)!r}")
        if not (p / "config.json").exists():
            raise ValueError(f"model: {str(path)!r} has no config.json (not a Hugging Face model folder)")
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype).eval()
        except (ValueError, KeyError, OSError) as err:
            raise ValueError(f"model: cannot load {str(path)!r} with transformers: {err}") from err
    check_supported(model)
    return model


def check_supported(model) -> None:
    """ValueError naming `model` unless every MoE block's experts can be served expert-parallel."""
    blocks = find_moe_blocks(model)
    arch = type(model).__name__
    if not blocks:
        raise ValueError(f"model: unsupported architecture {arch}: no MoE block (a module with a gate/router and "
                         f"experts holding 3-D gate_up_proj / down_proj)")
    for name, block in blocks:
        if isinstance(block.experts, ExpertParallelExperts):
            continue
        blockers = _experts_blockers(block.experts)
        if blockers:
            raise ValueError(f"model: unsupported architecture {arch}: {name}.experts has {', '.join(blockers)}")


# ---------------------------------------------------------------------------------------------------------------
# requests


@dataclass
class Request:
    """One generation request: prompt token ids, arrival time (s from the trace start), tokens to generate."""

    prompt: list
    max_new_tokens: int
    arrival_s: float = 0.0
    id: int | None = None


@dataclass
class Result:
    """tokens: generated ids (greedy); error: why the request was refused (then tokens is empty);
    logits: per generated token the logits it was chosen from (only with record_logits)."""

    id: int
    tokens: list = field(default_factory=list)
    error: str | None = None
    batch: int = -1
    logits: np.ndarray | None = None


def pair_balance(gpu_pairs) -> float:
    """Busiest rank's pairs over the mean rank's, summed over [iterations, layers, ranks] pairs (1.0 = even)."""
    pairs = np.asarray(gpu_pairs, dtype=np.float64)
    return float(pairs.max(-1).sum() / max(1e-9, pairs.mean(-1).sum()))


def check_request(req, max_context: int, vocab_size: int) -> str | None:
    """Why `req` cannot be served, or None."""
    if not isinstance(req, Request):
        return f"request must be a moeless.serve.Request, got {type(req).__name__}"
    prompt = req.prompt
    if not isinstance(prompt, (list, tuple)) or len(prompt) == 0:
        return "prompt: empty prompt"
    if not all(isinstance(t, (int, np.integer)) and 0 <= t < vocab_size for t in prompt):
        return f"prompt: token ids must be ints in [0, {vocab_size})"
    if isinstance(req.max_new_tokens, bool) or not isinstance(req.max_new_tokens, (int, np.integer)) \
            or req.max_new_tokens < 1:
        return f"max_new_tokens must be an int >= 1, got {req.max_new_tokens!r}"
    if len(prompt) + req.max_new_tokens > max_context:
        return (f"prompt: {len(prompt)} prompt tokens + {req.max_new_tokens} new tokens exceed the model's "
                f"context of {max_context}")
    if not math.isfinite(float(req.arrival_s)):
        return f"arrival_s must be finite, got {req.arrival_s!r}"
    return None


# ---------------------------------------------------------------------------------------------------------------
# the distributed experts


class ExpertParallelExperts(torch.nn.Module):
    """Drop-in for a transformers 5 experts module: forward(hidden [T, H], top_k_index [T, K], top_k_weights)
    -> [T, H], served expert-parallel by its server. Holds this rank's slot buffer of one MoE layer."""

    def __init__(self, server: "ExpertParallelServer", layer: int, experts: torch.nn.Module):
        super().__init__()
        self.layer = layer
        self.num_experts = int(experts.num_experts) if hasattr(experts, "num_experts") else experts.gate_up_proj.shape[0]
        gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
        if getattr(experts, "is_transposed", False):  # [E, H, 2I] / [E, I, H] -> the kernels' layout
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        self.interleaved = not getattr(experts, "is_concatenated", True)
        pin = server.device.type == "cuda"
        # the host copy of all experts: where every cold start copies from
        self.host_gate_up = gate_up.to("cpu").contiguous()
        self.host_down = down.to("cpu").contiguous()
        if pin:
            self.host_gate_up, self.host_down = self.host_gate_up.pin_memory(), self.host_down.pin_memory()
        S = server.slots_per_gpu
        # The rank's weight buffers: S expert copies per layer. A plan slot reads the buffer that holds its
        # expert (slot_buf, the kernels' slot_to_weight), so moving an expert between slots of one rank, or two
        # replicas of it on one rank, costs no copy. Plain attributes, not module buffers: model.to() must not
        # move or duplicate them.
        self.buf_gate_up = torch.zeros((S,) + tuple(self.host_gate_up.shape[1:]), dtype=gate_up.dtype,
                                       device=server.device)
        self.buf_down = torch.zeros((S,) + tuple(self.host_down.shape[1:]), dtype=down.dtype, device=server.device)
        self.buf_expert = np.full(S, -1, dtype=np.int64)  # what each buffer holds (-1 = nothing copied)
        self.slot_buf = np.full(S, -1, dtype=np.int64)  # local plan slot -> its (last) buffer (-1 = never)
        self.slot_want = np.full(S, -1, dtype=np.int64)  # the expert each local plan slot serves (-1 = free)
        self.ready = None  # CUDA event: the cold starts of this layer are in
        self.copies = 0  # cold starts copied in (the pool's bill for this rank)
        self.repairs = 0  # copies the pool did not bill: a warm instance whose buffer was reused (should be 0)
        self._server = [server]  # a list keeps the server out of the module tree

    @property
    def expert_bytes(self) -> int:
        return (self.host_gate_up[0].numel() * self.host_gate_up.element_size()
                + self.host_down[0].numel() * self.host_down.element_size())

    @property
    def slot_expert(self) -> np.ndarray:
        """[S] the expert each local plan slot serves (-1 = free)."""
        return np.where(self.slot_want >= 0, self.buf_expert[np.maximum(self.slot_buf, 0)], -1)

    @property
    def slot_gate_up(self) -> torch.Tensor:
        """[S, 2I, H] the weights each local plan slot serves (a copy; zeros for a free slot)."""
        return self._slot_view(self.buf_gate_up)

    @property
    def slot_down(self) -> torch.Tensor:
        return self._slot_view(self.buf_down)

    def _slot_view(self, buf):
        out = buf[torch.from_numpy(np.maximum(self.slot_buf, 0)).to(buf.device)]
        out[torch.from_numpy(self.slot_want < 0).to(buf.device)] = 0
        return out

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return self._server[0]._moe_layer(self, hidden_states, top_k_index, top_k_weights)

    def realise(self, want: np.ndarray, cold: np.ndarray, stream=None) -> int:
        """This rank's slots of a new plan: `want` [S] expert per local slot (-1 free), `cold` the local slots
        the pool cold-started. Warm slots read a buffer that already holds their expert (their own first); each
        cold slot gets a buffer no warm slot reads -- its own (the instance the pool evicted), else an empty
        one, else one no idle slot remembers -- and its expert is copied in from the host copy (on `stream`).
        Returns the number of copies."""
        S = want.size
        is_cold = np.zeros(S, dtype=bool)
        is_cold[np.asarray(cold, dtype=np.int64)] = True
        new_buf = self.slot_buf.copy()  # free slots remember their last buffer (an idle instance may come back)
        used = np.zeros(S, dtype=bool)

        def holders(e):
            return np.flatnonzero(self.buf_expert == e).tolist()

        pending = []
        for s in np.flatnonzero((want >= 0) & ~is_cold).tolist():  # warm: own buffer, else any holding it
            cands = holders(int(want[s]))
            if not cands:
                pending.append(s)
                continue
            new_buf[s] = int(self.slot_buf[s]) if self.slot_buf[s] in cands else cands[0]
            used[new_buf[s]] = True
        wanted = set(want[want >= 0].tolist())
        idle = set(self.slot_buf[(want < 0) & (self.slot_buf >= 0)].tolist())
        copies, repairs = [], 0
        for s in np.flatnonzero(is_cold & (want >= 0)).tolist() + pending:
            e = int(want[s])
            if not is_cold[s] and holders(e):  # a warm slot whose expert a cold slot of this plan copied in
                new_buf[s] = holders(e)[0]
                continue
            own = int(self.slot_buf[s])
            b = min(np.flatnonzero(~used).tolist(), key=lambda b: (
                b != own, self.buf_expert[b] >= 0, b in idle, int(self.buf_expert[b]) in wanted, b))
            used[b] = True
            new_buf[s] = b
            self.buf_expert[b] = e
            copies.append((b, e))
            repairs += int(not is_cold[s])
        self.slot_buf = new_buf
        self.slot_want = want.astype(np.int64).copy()
        if copies:
            ctx = torch.cuda.stream(stream) if stream is not None else _nullcontext()
            with ctx:
                for b, e in copies:
                    self.buf_gate_up[b].copy_(self.host_gate_up[e], non_blocking=stream is not None)
                    self.buf_down[b].copy_(self.host_down[e], non_blocking=stream is not None)
                if stream is not None:
                    self.ready = torch.cuda.Event()
                    self.ready.record(stream)
        self.copies += len(copies) - repairs
        self.repairs += repairs
        return len(copies)

    def buffers_of(self, local_slots: np.ndarray) -> np.ndarray:
        """Buffer index per local plan slot (ServeError if a slot's buffer does not hold its expert)."""
        buf = self.slot_buf[local_slots]
        if (buf < 0).any() or not np.array_equal(self.buf_expert[buf], self.slot_want[local_slots]) \
                or (self.slot_want[local_slots] < 0).any():
            raise ServeError(f"layer {self.layer}: the slot buffers do not hold the plan's experts")
        return buf


def _cache_of(out):
    """The KV cache of a model output, under transformers' new name (cache) or its old one."""
    for key in ("cache", "past_key_values"):
        if key in out.keys():
            return out[key]
    return None


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------------------------------------------------------
# the server


class ExpertParallelServer:
    """Serve `model` expert-parallel over the default process group with one control-plane policy.

    policy: "moeless" (predict -> scale -> place per layer and iteration, serverless instances) or "ep" (plain
    Megatron expert parallelism), or a callable for `Engine`. slots_per_gpu: expert slots per rank (default
    ceil(E / G) + 1 for moeless, E / G for ep). predictor: "gate-replica" (the paper's, copied from the model's
    gates), a fitted `moeless.predictors.GateReplicaPredictor`, or "previous" (layer l+d's true counts of the
    last iteration). keep_alive_s: the pool's keep-alive. kernel_backend: moeless_kernels' backend.
    record_logits: keep every generated token's logits in the results (tests). replan_slack / replan_min_pairs:
    the engine's hysteresis (keep a layer's plan while it still balances the new loads; None = re-plan always).

    Every rank must construct the server, call `generate` / `serve` with the same arguments, and `close` it.
    """

    def __init__(self, model, ctx: DistContext, *, policy="moeless", slots_per_gpu: int | None = None,
                 distance: int = 1, predictor="gate-replica", keep_alive_s: float = 60.0,
                 kernel_backend: str = "auto", record_logits: bool = False, planner_options: dict | None = None,
                 link_bandwidth: float = 25e9, replan_slack: float | None = None, replan_min_pairs: int = 0):
        check_supported(model)
        self.ctx, self.device = ctx, ctx.device
        self.rank, self.world = ctx.rank, ctx.world_size
        self.model = model
        self.kernel_backend = kernel_backend
        self.record_logits = bool(record_logits)
        blocks = find_moe_blocks(model)
        for name, block in blocks:
            if isinstance(block.experts, ExpertParallelExperts):
                raise ValueError(f"model: {name} is already served by another ExpertParallelServer; close it first")
        E = int(blocks[0][1].experts.gate_up_proj.shape[0])
        if any(int(b.experts.gate_up_proj.shape[0]) != E for _, b in blocks):
            raise ValueError("model: MoE layers differ in their number of experts")
        self.num_layers, self.num_experts = len(blocks), E
        if slots_per_gpu is None:
            slots_per_gpu = default_slots_per_gpu(E, self.world, 0 if policy == "ep" else 1)
        self.slots_per_gpu = int(slots_per_gpu)
        if isinstance(predictor, str) and predictor not in ("gate-replica", "previous"):
            raise ValueError(f"predictor must be 'gate-replica', 'previous' or a GateReplicaPredictor, got {predictor!r}")
        self._predictor = None
        if policy != "ep" and predictor != "previous":
            from moeless.predictors import GateReplicaPredictor

            if predictor == "gate-replica":
                if self.num_layers > distance:
                    predictor = GateReplicaPredictor.from_model(model, distance)
                else:
                    predictor = None
            if predictor is not None:
                self._predictor = GateReplicaLoads(predictor)
                if self._predictor.num_layers != self.num_layers or self._predictor.num_experts != E:
                    raise ValueError("predictor: fitted for another model (layers or experts differ)")
        # install the distributed experts; keep the originals to restore on close
        self._originals = []
        self.layers: list[ExpertParallelExperts] = []
        for i, (name, block) in enumerate(blocks):
            self._originals.append((block, block.experts))
            wrapped = ExpertParallelExperts(self, i, block.experts)
            block.experts = wrapped
            self.layers.append(wrapped)
        self._original_device = next(model.parameters()).device
        # the router logits feed only the training loss; asking for them would also run it on padded batches
        self._forward_kwargs = {"output_router_logits": False} if hasattr(model.config, "output_router_logits") else {}
        # transformers renamed past_key_values to cache (5.2x); pass whichever this version's forward takes
        import inspect

        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        model.to(self.device)
        expert_bytes = self.layers[0].expert_bytes
        self.engine = Engine(self.num_layers, E, self.world, self.slots_per_gpu, policy=policy, distance=distance,
                             expert_bytes=expert_bytes, keep_alive_s=keep_alive_s, link_bandwidth=link_bandwidth,
                             planner_options=planner_options, replan_slack=replan_slack,
                             replan_min_pairs=replan_min_pairs, align=True)
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._predict_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # per iteration: [L] seconds per MoE layer (this rank), tokens through the MoE layers (all ranks)
        self._layer_times: list[np.ndarray] = []
        self._pending_events: list = []
        self._iter_times = np.zeros(self.num_layers)
        self._layer_full: list[np.ndarray] = []  # the same, with the counts all-gather
        self._iter_full = np.zeros(self.num_layers)
        self._layer_expert: list[np.ndarray] = []  # this rank's expert compute (host time) per layer
        self._iter_expert = np.zeros(self.num_layers)
        self._layer_cpus: list[np.ndarray] = []  # this rank's CPU time per layer (its own work, no waiting)
        self._iter_cpu = np.zeros(self.num_layers)
        self.profile: dict[str, list] = {}  # span of the MoE layer -> [wall s, CPU s] on this rank
        self._mark_at, self._layer_cpu = (0.0, 0.0), 0.0
        self._gpu_pairs: list[np.ndarray] = []  # [L, G] pairs served by each rank, per iteration
        self._iter_gpu_pairs = np.zeros((self.num_layers, self.world), dtype=np.int64)
        self._iter_tokens: list[int] = []
        self._prefill_iterations: list[int] = []  # the iteration each generate() call's prefill ran in
        self._batch_tokens, self._batch_iter = [0], 0
        self._token_mask: torch.Tensor | None = None
        self.copy_seconds = 0.0
        self.control_seconds = 0.0  # host time of the control plane (plan + copies), per rank
        self._last_now = 0.0
        self.closed = False
        self._t0 = time.perf_counter()
        self._barrier("server start")
        start = self.engine.start(0.0)
        self._realise(range(self.num_layers), start.cold)

    # -- control plane <-> data plane ---------------------------------------------------------------------
    def _now(self) -> float:
        return time.perf_counter() - self._t0

    def _realise(self, layers, cold: np.ndarray) -> None:
        """Realise the new plans of `layers` on this rank's buffers; cold: the pool's cold-started
        (layer, slot) int [n, 2], of which this rank copies its own."""
        S = self.slots_per_gpu
        t = time.perf_counter()
        mine = cold[(cold[:, 1] // S) == self.rank] if cold.size else np.zeros((0, 2), dtype=np.int64)
        if self._copy_stream is not None and mine.size:
            # a wrapped-around target may still be read by this iteration's queued kernels
            self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        for layer in layers:
            want = self.engine.plan(int(layer)).phy2log[0, self.rank * S:(self.rank + 1) * S]
            rows = mine[mine[:, 0] == layer]
            self.layers[int(layer)].realise(want, rows[:, 1] % S, self._copy_stream)
        self.copy_seconds += time.perf_counter() - t

    def _collective(self, what: str, layer: int, fn):
        try:
            return fn()
        except Exception as err:  # gloo / NCCL raise RuntimeError subclasses (DistBackendError, ...)
            raise ServeError(
                f"rank {self.rank} of {self.world}: {what} of MoE layer {layer} failed (timeout "
                f"{self.ctx.timeout_s:g} s): a peer rank died or stalled: {err}") from err

    def _barrier(self, what: str) -> None:
        try:
            if self.ctx.backend == "gloo" and self.world > 1:
                dist.monitored_barrier(timeout=timedelta(seconds=self.ctx.timeout_s))
            elif self.world > 1:
                dist.barrier()
        except Exception as err:
            raise ServeError(f"rank {self.rank} of {self.world}: barrier at {what} failed (timeout "
                             f"{self.ctx.timeout_s:g} s): a peer rank died or stalled: {err}") from err

    # -- one MoE layer --------------------------------------------------------------------------------------
    def _moe_layer(self, mod: ExpertParallelExperts, hidden, top_k_index, top_k_weights):
        layer, E, G, S, K = mod.layer, self.num_experts, self.world, self.slots_per_gpu, top_k_index.shape[1]
        cuda = self.device.type == "cuda"
        t0 = time.perf_counter()
        self._mark(None)
        if cuda:
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
            ev[0].record()
        H = hidden.shape[-1]
        hidden = hidden.reshape(-1, H)
        if top_k_weights.shape[1] != K:  # dense router scores [T, E]
            top_k_weights = top_k_weights.gather(1, top_k_index.long())
        mask = self._token_mask
        if mask is not None and mask.shape[0] != hidden.shape[0]:
            raise ServeError(f"token mask of {mask.shape[0]} tokens for a layer input of {hidden.shape[0]}")
        if mask is not None:
            keep = torch.nonzero(mask).flatten()
            x, ids, w = hidden[keep], top_k_index[keep], top_k_weights[keep]
        else:
            keep, x, ids, w = None, hidden, top_k_index, top_k_weights
        T = x.shape[0]
        ids = ids.to(torch.int64)

        # predict layer l+d from this layer's gate input (side stream: overlaps the counting below)
        # a batch too small for the hysteresis ever to re-plan (even all its pairs on one rank stay within
        # replan_min_pairs of the mean) needs neither a prediction nor the planner: known alike on every rank
        quiet = self.engine.replan_slack is not None and \
            self._batch_tokens[min(self._batch_iter, len(self._batch_tokens) - 1)] * K * (G - 1) / G \
            <= self.engine.replan_min_pairs
        predicted = None
        if self._predictor is not None and not quiet:
            if cuda:
                self._predict_stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(self._predict_stream):
                    predicted = self._predictor.counts(layer, x)
                torch.cuda.current_stream().wait_stream(self._predict_stream)
            else:
                predicted = self._predictor.counts(layer, x)
        self._mark("predict")
        counts = torch.bincount(ids.reshape(-1), minlength=E)
        msg = torch.zeros(2 * E + 2, dtype=torch.int64, device=self.device)
        msg[:E] = counts
        if predicted is not None:
            msg[E:2 * E] = predicted
            msg[2 * E + 1] = 1
        msg[2 * E] = int(self._now() * 1e6)
        parts = [torch.empty_like(msg) for _ in range(G)]
        # the all-gather also waits for ranks still in the layers before (their attention): it is timed apart
        # and left out of the MoE-layer time (both policies send the same message)
        self._mark("count")
        tg0 = time.perf_counter()
        if cuda:
            ev[1].record()
        self._collective("all-gather of expert counts", layer, lambda: dist.all_gather(parts, msg))
        if cuda:
            ev[2].record()
        gathered = torch.stack(parts).cpu().numpy()
        gather_s = time.perf_counter() - tg0
        self._mark("all-gather of counts")
        by_rank = gathered[:, :E]  # [G, E] pairs per expert on each rank
        true = by_rank.sum(0)
        now = max(gathered[0, 2 * E] / 1e6, self._last_now)  # rank 0's clock: every rank's pool sees the same
        self._last_now = now
        pred = gathered[:, E:2 * E].sum(0) if gathered[0, 2 * E + 1] else None

        # the serve-time split of the true counts, cut rank by rank (rank-major order of the pairs)
        plan = self.engine.plan(layer)
        log2phy = plan.log2phy[0]  # [E, R]
        rt = self.engine.split(layer, true, exact=not quiet)  # [E, R]
        chunk_hi = np.cumsum(rt, axis=1)
        chunk_lo = chunk_hi - rt
        rank_hi = np.cumsum(by_rank, axis=0)
        rank_lo = rank_hi - by_rank
        local_rt = np.clip(np.minimum(rank_hi[:, :, None], chunk_hi[None]) -
                           np.maximum(rank_lo[:, :, None], chunk_lo[None]), 0, None)  # [G, E, R]
        valid = log2phy >= 0
        slot_counts = np.zeros((G, G * S), dtype=np.int64)  # pairs from rank g to physical slot p
        np.add.at(slot_counts, (slice(None), log2phy[valid]), local_rt[:, valid])
        self._iter_gpu_pairs[layer] = slot_counts.sum(0).reshape(G, S).sum(1)  # pairs each rank's experts serve
        send = slot_counts[self.rank].reshape(G, S).sum(1)
        recv_by_slot = slot_counts[:, self.rank * S:(self.rank + 1) * S]  # [G, S]
        recv = recv_by_slot.sum(1)

        self._mark("split")
        # pairs -> slots (routing unchanged), grouped by slot, hence by destination rank
        if T:
            dispatch = replica_dispatch(
                ids.to(torch.int32), torch.from_numpy(log2phy).to(self.device), torch.from_numpy(plan.logcnt[0]).to(self.device),
                torch.from_numpy(local_rt[self.rank]).to(self.device), num_slots=G * S, backend=self.kernel_backend)
            order = torch.sort(dispatch.slot_ids.reshape(-1).long(), stable=True).indices
            send_x = x[order // K]
        else:
            order = torch.zeros(0, dtype=torch.int64, device=self.device)
            send_x = x.new_zeros((0, H))
        recv_x = x.new_empty((int(recv.sum()), H))
        work = self._collective("all-to-all of tokens", layer, lambda: dist.all_to_all_single(
            recv_x, send_x.contiguous(), output_split_sizes=recv.tolist(), input_split_sizes=send.tolist(),
            async_op=True))
        self._mark("dispatch")
        # the control plane of layer l+d runs while the tokens are in flight (the rank would only wait); it
        # touches layer l+d's buffers only, so it must wait for this layer's end when l+d wraps onto l itself
        target = (layer + self.engine.distance) % self.num_layers
        if target != layer:
            self._control(layer, true, pred, now, not quiet)
        self._mark("control plane")
        self._collective("all-to-all of tokens", layer, work.wait)
        self._mark("all-to-all")

        # the rank's experts: received pairs arrive grouped by source rank, then by slot; a slot reads the
        # buffer holding its expert
        if recv_x.shape[0]:
            if mod.ready is not None:
                torch.cuda.current_stream().wait_event(mod.ready)
            local_slot = np.repeat(np.tile(np.arange(S), G), recv_by_slot.reshape(-1))
            used = np.unique(local_slot)
            if not np.array_equal(mod.slot_want[used], plan.phy2log[0, self.rank * S + used]):
                raise ServeError(f"rank {self.rank}: layer {layer}'s slots do not hold the plan's experts")
            buf_of = np.zeros(S, dtype=np.int64)
            buf_of[used] = mod.buffers_of(used)
            slot_ids = torch.from_numpy(buf_of[local_slot]).to(self.device, torch.int32)[:, None]
            te = time.perf_counter()
            y = fused_moe(recv_x, mod.buf_gate_up, mod.buf_down, topk_ids=slot_ids,
                          topk_weights=torch.ones(slot_ids.shape, dtype=torch.float32, device=self.device),
                          interleaved=mod.interleaved, backend=self.kernel_backend).out
            self._iter_expert[layer] = time.perf_counter() - te  # host time; on a GPU only the launches
        else:
            y = recv_x
            self._iter_expert[layer] = 0.0
        self._mark("experts")
        back = x.new_empty((send_x.shape[0], H))
        self._collective("all-to-all back", layer, lambda: dist.all_to_all_single(
            back, y.contiguous(), output_split_sizes=send.tolist(), input_split_sizes=recv.tolist()))

        self._mark("all-to-all back")
        # routed weight per pair, then the sum over K (fp32)
        pair_out = torch.zeros((T * K, H), dtype=torch.float32, device=self.device)
        if T:
            pair_out[order] = back.float() * w.reshape(-1)[order].float()[:, None]
        out_active = combine(pair_out, K, backend=self.kernel_backend).to(hidden.dtype)
        if keep is not None:
            out = torch.zeros_like(hidden)
            out[keep] = out_active
        else:
            out = out_active

        self._mark("combine")
        self._iter_cpu[layer] = self._layer_cpu
        if cuda:
            ev[3].record()
            self._pending_events.append((layer, ev))
        else:
            self._iter_full[layer] = time.perf_counter() - t0
            self._iter_times[layer] = self._iter_full[layer] - gather_s
        if target == layer:
            self._control(layer, true, pred, now, not quiet)
            self._mark("control plane")
        if layer == 0:
            self._iter_tokens.append(int(true.sum()) // K)
        if layer == self.num_layers - 1:
            self._end_iteration()
        return out

    def _mark(self, what: str | None) -> None:
        """Profile: charge the time since the last mark to `what` (wall and this thread's CPU); None starts a
        layer. The layer's CPU time leaves out the counts all-gather, like its wall time."""
        w, c = time.perf_counter(), time.thread_time()
        if what is None:
            self._layer_cpu = 0.0
        else:
            prof = self.profile.setdefault(what, [0.0, 0.0])
            prof[0] += w - self._mark_at[0]
            prof[1] += c - self._mark_at[1]
            if what != "all-gather of counts":
                self._layer_cpu += c - self._mark_at[1]
        self._mark_at = (w, c)

    def _control(self, layer: int, true, pred, now, replan: bool = True) -> None:
        """Plan layer l+d from layer l's counts and the prediction; copy this rank's cold starts."""
        tc = time.perf_counter()
        applied = self.engine.observe(layer, true, pred, now, replan=replan)
        if applied is not None:
            self._realise([applied[0]], applied[1].cold)
        self.control_seconds += time.perf_counter() - tc

    def _end_iteration(self) -> None:
        if self._pending_events:
            torch.cuda.synchronize(self.device)
            for layer, ev in self._pending_events:
                self._iter_full[layer] = ev[0].elapsed_time(ev[3]) / 1e3
                self._iter_times[layer] = self._iter_full[layer] - ev[1].elapsed_time(ev[2]) / 1e3
            self._pending_events = []
        self._batch_iter += 1
        self._layer_times.append(self._iter_times.copy())
        self._layer_full.append(self._iter_full.copy())
        self._layer_expert.append(self._iter_expert.copy())
        self._layer_cpus.append(self._iter_cpu.copy())
        self._gpu_pairs.append(self._iter_gpu_pairs.copy())

    # -- generation -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: list, max_new_tokens) -> list[Result]:
        """Greedy generation of one batch: every rank passes the same prompts (lists of ids) and lengths; rank r
        runs prompts r, r+G, ... (data parallel); one prefill iteration, then decode iterations until the
        longest request ends. Returns every request's Result on every rank, in input order."""
        n = len(prompts)
        if isinstance(max_new_tokens, (int, np.integer)):
            max_new_tokens = [int(max_new_tokens)] * n
        if len(max_new_tokens) != n or n == 0:
            raise ValueError(f"max_new_tokens must be an int or one per prompt ({n}); prompts must not be empty")
        steps = max(max_new_tokens)
        self._prefill_iterations.append(len(self._layer_times))
        # tokens of every iteration of this batch over all ranks (prefill, then the requests still decoding)
        self._batch_tokens = [sum(len(p) for p in prompts)] + [sum(m > j for m in max_new_tokens)
                                                                for j in range(1, steps)]
        self._batch_iter = 0
        mine = list(range(self.rank, n, self.world))
        local: dict[int, Result] = {i: Result(id=i) for i in mine}
        if not mine:  # no request here: still take part in every iteration's collectives
            dummy = torch.zeros((1, 1), dtype=torch.long, device=self.device)
            cache = None
            for step in range(steps):
                self._token_mask = torch.zeros(1, dtype=torch.bool, device=self.device)
                out = self.model(input_ids=dummy, use_cache=True, **{self._cache_kw: cache}, **self._forward_kwargs)
                cache = _cache_of(out)
        else:
            B = len(mine)
            lens = [len(prompts[i]) for i in mine]
            width = max(lens)
            pad = int(getattr(self.model.config, "pad_token_id", None) or 0)
            ids = torch.full((B, width), pad, dtype=torch.long)
            attn = torch.zeros((B, width), dtype=torch.long)
            for b, i in enumerate(mine):  # left padding: every row's last token is at the end
                ids[b, width - lens[b]:] = torch.tensor(prompts[i], dtype=torch.long)
                attn[b, width - lens[b]:] = 1
            ids, attn = ids.to(self.device), attn.to(self.device)
            pos = (attn.cumsum(-1) - 1).clamp(min=0)
            limit = torch.tensor([max_new_tokens[i] for i in mine], device=self.device)
            self._token_mask = attn.reshape(-1).bool()
            out = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1,
                             **self._forward_kwargs)
            cache = _cache_of(out)
            generated = []
            logits_seen = []
            for step in range(steps):
                logits = out.logits[:, -1].float()
                nxt = logits.argmax(-1)
                generated.append(nxt)
                if self.record_logits:
                    logits_seen.append(logits.cpu())
                if step == steps - 1:
                    break
                active = limit > step + 1
                self._token_mask = active
                attn = torch.cat([attn, torch.ones((B, 1), dtype=attn.dtype, device=self.device)], 1)
                pos = pos[:, -1:] + 1
                out = self.model(input_ids=nxt[:, None], attention_mask=attn, position_ids=pos,
                                 use_cache=True, **{self._cache_kw: cache}, **self._forward_kwargs)
                cache = _cache_of(out)
            toks = torch.stack(generated, 1).cpu()
            for b, i in enumerate(mine):
                m = max_new_tokens[i]
                local[i].tokens = toks[b, :m].tolist()
                if self.record_logits:
                    local[i].logits = torch.stack([lg[b] for lg in logits_seen[:m]]).numpy()
        self._token_mask = None
        return self._gather_results(local, n)

    def _gather_results(self, local: dict, n: int) -> list[Result]:
        gathered = [None] * self.world
        if self.world > 1:
            self._collective("all-gather of results", -1, lambda: dist.all_gather_object(gathered, local))
        else:
            gathered = [local]
        out = [None] * n
        for part in gathered:
            for i, r in part.items():
                out[i] = r
        return out

    def serve(self, requests: list, *, batch_window_s: float = 1.0) -> list[Result]:
        """Replay `requests` with the paper's batching (all requests arriving within each `batch_window_s` form
        one batch; prefill, then greedy decode). Bad requests get a Result with `error` and are left out of the
        batches; the others are served. Results in input order, on every rank."""
        if not (isinstance(batch_window_s, (int, float)) and batch_window_s > 0):
            raise ValueError(f"batch_window_s must be > 0, got {batch_window_s!r}")
        cfg = self.model.config
        max_ctx = int(getattr(cfg, "max_position_embeddings", 1 << 30))
        vocab = int(cfg.vocab_size)
        results = [Result(id=i if getattr(r, "id", None) is None else r.id) for i, r in enumerate(requests)]
        good = []
        for i, r in enumerate(requests):
            err = check_request(r, max_ctx, vocab)
            if err is None:
                good.append(i)
            else:
                results[i].error = err
        if not good:
            return results
        arrivals = np.array([float(requests[i].arrival_s) for i in good])
        order = np.argsort(arrivals, kind="stable")
        batch_of = np.floor(arrivals[order] / batch_window_s).astype(np.int64)
        for b, key in enumerate(np.unique(batch_of)):
            idx = [good[j] for j in order[batch_of == key]]
            outs = self.generate([list(requests[i].prompt) for i in idx], [int(requests[i].max_new_tokens) for i in idx])
            for i, o in zip(idx, outs):
                results[i].tokens, results[i].logits, results[i].batch = o.tokens, o.logits, b
        return results

    # -- report ---------------------------------------------------------------------------------------------
    def summary(self) -> dict:
        """Per-layer latencies (the slowest rank's, per iteration and layer), tokens, replicas, cold starts and
        the pool's bill, identical on every rank (gathers the ranks' layer times)."""
        mine = np.stack([np.array(x, dtype=np.float64).reshape(-1, self.num_layers)
                         for x in (self._layer_times, self._layer_full, self._layer_expert, self._layer_cpus)])
        all_times = [None] * self.world
        if self.world > 1:
            self._collective("all-gather of layer times", -1, lambda: dist.all_gather_object(all_times, mine))
        else:
            all_times = [mine]
        # [iterations, L]: a layer ends when its slowest rank ends
        times, full, expert, cpu = np.max(np.stack(all_times), axis=0)
        full_lat = full.reshape(-1)
        pairs = np.array(self._gpu_pairs, dtype=np.int64).reshape(-1, self.num_layers, self.world)
        pool, stats = self.engine.pool, self.engine.stats
        meter = pool.meter
        lat = times.reshape(-1)
        reps = np.array(stats.replicas, dtype=np.float64)
        return {
            "policy": self.engine.policy if isinstance(self.engine.policy, str) else "custom",
            "world_size": self.world,
            "slots_per_gpu": self.slots_per_gpu,
            "iterations": int(times.shape[0]),
            "tokens": int(sum(self._iter_tokens)),
            "moe_layer_ms": {
                "mean": float(lat.mean() * 1e3) if lat.size else float("nan"),
                "p50": float(np.percentile(lat, 50) * 1e3) if lat.size else float("nan"),
                "p90": float(np.percentile(lat, 90) * 1e3) if lat.size else float("nan"),
                "p99": float(np.percentile(lat, 99) * 1e3) if lat.size else float("nan"),
            },
            "moe_layer_with_gather_ms": float(full_lat.mean() * 1e3) if full_lat.size else float("nan"),
            "expert_ms": float(expert.mean() * 1e3) if expert.size else float("nan"),
            "expert_times_s": expert.tolist(),
            "moe_layer_cpu_ms": float(cpu.mean() * 1e3) if cpu.size else float("nan"),
            "layer_cpu_s": cpu.tolist(),
            "profile_this_rank_ms": {k: [v[0] * 1e3 / max(1, times.size), v[1] * 1e3 / max(1, times.size)]
                                     for k, v in self.profile.items()},
            "layer_times_s": times.tolist(),
            "gpu_pairs": pairs.tolist(),
            "pair_balance": pair_balance(pairs),
            "iteration_tokens": list(self._iter_tokens),
            "prefill_iterations": list(self._prefill_iterations),
            "replicas": [r.tolist() for r in stats.replicas],
            "replicas_mean": float(reps.mean()) if reps.size else float(self.num_experts),
            "plans_made": stats.plans_made,
            "plan_changes": stats.plan_changes,
            "plans_kept": stats.plans_kept,
            "cold_starts": int(meter.cold_starts),
            "warm_starts": int(meter.warm_starts),
            "releases": int(meter.releases),
            "gb_seconds": float(meter.gb_seconds),
            "gpu_seconds": float(meter.gpu_seconds),
            "copies_this_rank": int(sum(m.copies for m in self.layers)),
            "unbilled_copies_this_rank": int(sum(m.repairs for m in self.layers)),
            "copy_seconds_this_rank": float(self.copy_seconds),
            "control_ms_per_layer": float(self.control_seconds * 1e3 / max(1, times.size)),
            "expert_bytes": int(self.layers[0].expert_bytes),
        }

    def close(self) -> dict:
        """Charge the pool to now, restore the model's own experts modules, return the summary."""
        if self.closed:
            raise ValueError("server already closed")
        s = self.summary()
        meter = self.engine.close(self._last_now)  # rank 0's last time: the same bill on every rank
        s.update(gb_seconds=float(meter.gb_seconds), gpu_seconds=float(meter.gpu_seconds),
                 releases=int(meter.releases), clock_end_s=float(self._last_now))
        for block, experts in self._originals:
            block.experts = experts
        self.model.to(self._original_device)
        self.closed = True
        return s
