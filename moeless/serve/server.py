"""The expert-parallel server: one control-plane policy driving the real data plane over a process group.

Non-expert modules are data-parallel (every rank holds them whole and runs its share of a batch's requests);
the routed experts of every MoE block are replaced by `ExpertParallelExperts`, whose forward runs `_moe_layer`:

    the model's own router (unchanged)  ->  Engine.wants_plan: is this iteration big enough to re-plan?
    -> the gate-replica prediction of layer l+d (side stream)  ->  prepare (counts all-gather, serve-time
    split, dispatch, all-to-all in flight)  ->  the control plane of layer l+d while the tokens fly (the engine
    plans, the pool says what cold-starts, this rank copies its own cold starts in on a side stream)
    ->  the experts (fused_moe over this rank's slots through a ReplicaPlan)  ->  finalize (all-to-all back,
    routed weights, combine)

Requests: `generate` runs one batch (prefill, then greedy decode until its longest request ends); `serve`
replays requests in the paper's batching windows, as fast as possible or in real time (a window's batch
starts once the window has passed), and returns a Result per request: all its tokens, or why it has none. A
rank that dies or stalls makes the others raise one `ServeError` line within the process group's timeout;
`serve` then reports every request (served, failed with the reason, or not served) in the error's `results`.

This module never changes routing or a plan (the engine's) and never drops a pair.
"""
from __future__ import annotations

import inspect
import time

import numpy as np
import torch

from moeless.engine import Engine, GateReplicaLoads, default_slots_per_gpu
from moeless.serve.dist import Collectives, DistContext, ServeError
from moeless.serve.experts import ExpertParallelExperts
from moeless.serve.metrics import LayerTimer, pair_balance, percentiles
from moeless.serve.models import cache_of, check_supported, find_moe_blocks
from moeless.serve.prepare_finalize import AllToAllPrepareFinalize, Counts
from moeless.serve.request import Result, check_request
from moeless.serve.transfer import upload

__all__ = ["ExpertParallelServer"]


class ExpertParallelServer:
    """Serve `model` expert-parallel over the default process group with one control-plane policy.

    policy: "moeless" (time-aware serverless replicas over resident homes), "ep" (plain Megatron expert
    parallelism), "eplb", or a `moeless.policy.Policy` built for this model and world (then slots_per_gpu and
    cost are the policy's). slots_per_gpu: expert slots per rank (default ceil(E / G) + 1, E / G for ep).
    cost: the cost model the policy prices with (default: a roofline of the model's config on this device's
    hardware profile, `moeless.specs.hardware_for_device`). predictor: "gate-replica" (the paper's, copied from
    the model's gates), a fitted `moeless.predictors.GateReplicaPredictor`, or "previous" (layer l+d's true
    counts of the last iteration). keep_alive_s: the pool's keep-alive (its copy links are the cost model's).
    kernel_backend: moeless_kernels' backend. record_logits: keep every
    generated token's logits in the results (tests). engine_options: more `moeless.engine.Engine` options.

    Every rank must construct the server, call `generate` / `serve` with the same arguments, and `close` it.
    """

    def __init__(self, model, ctx: DistContext, *, policy="moeless", slots_per_gpu: int | None = None,
                 distance: int = 1, predictor="gate-replica", keep_alive_s: float = 60.0,
                 kernel_backend: str = "auto", record_logits: bool = False, cost=None,
                 engine_options: dict | None = None):
        check_supported(model)
        self.ctx, self.device = ctx, ctx.device
        self.rank, self.world = ctx.rank, ctx.world_size
        self.model = model
        self.kernel_backend = kernel_backend
        self.record_logits = bool(record_logits)
        self.policy_name = policy if isinstance(policy, str) else getattr(policy, "name", "custom")
        blocks = find_moe_blocks(model)
        for name, block in blocks:
            if isinstance(block.experts, ExpertParallelExperts):
                raise ValueError(f"model: {name} is already served by another ExpertParallelServer; close it first")
        E = int(blocks[0][1].experts.gate_up_proj.shape[0])
        if any(int(b.experts.gate_up_proj.shape[0]) != E for _, b in blocks):
            raise ValueError("model: MoE layers differ in their number of experts")
        self.num_layers, self.num_experts = len(blocks), E
        policy = self._make_policy(policy, slots_per_gpu, cost)
        self.slots_per_gpu = policy.S
        self._predictor = self._make_predictor(predictor, policy, distance)
        self.layers = [ExpertParallelExperts(block.experts, i, slots_per_gpu=self.slots_per_gpu, device=self.device,
                                             rank=self.rank) for i, (_, block) in enumerate(blocks)]
        # the pool's copy links follow the policy's cost model (moeless.engine.cost_pool), as in the simulator
        # the bill counts the served weights' real bytes
        self.engine = Engine(policy, distance=distance, keep_alive_s=keep_alive_s,
                             expert_bytes=self.layers[0].expert_bytes, **(engine_options or {}))
        # the router logits feed only the training loss; asking for them would also run it on padded batches
        self._forward_kwargs = {"output_router_logits": False} if hasattr(model.config, "output_router_logits") else {}
        # transformers renamed past_key_values to cache (5.2x); pass whichever this version's forward takes
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        cuda = self.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self._predict_stream = torch.cuda.Stream(self.device) if cuda else None
        self.collectives = Collectives(ctx)
        self.timer = LayerTimer(self.num_layers, self.world, self.device)
        self.pf = AllToAllPrepareFinalize(self.collectives, num_experts=E, slots_per_gpu=self.slots_per_gpu,
                                          device=self.device, timer=self.timer, backend=kernel_backend)
        self._iter_tokens: list[int] = []  # tokens through the MoE layers per iteration (all ranks)
        self._prefill_iterations: list[int] = []  # the iteration each generate() call's prefill ran in
        self._batch_tokens, self._batch_iter = [0], 0
        self._active: torch.Tensor | None = None  # rows of this iteration's tokens that take part (None: all)
        self._active_of = -1  # ... out of this many rows
        self.copy_seconds = 0.0
        self.control_seconds = 0.0  # host time of the control plane (plan + copies), per rank
        self._last_now = 0.0
        self.closed = False
        self.failed: ServeError | None = None  # the collective failure that broke this server, if any
        # install the distributed experts; keep the originals to restore on close
        self._originals = [(block, block.experts) for _, block in blocks]
        for (_, block), wrapped in zip(blocks, self.layers):
            wrapped.serve_layer = self._moe_layer
            block.experts = wrapped
        self._original_device = next(model.parameters()).device
        self._t0 = time.perf_counter()
        try:
            model.to(self.device)
            self.collectives.barrier("server start")
            start = self.engine.start(0.0)
            self._realise(range(self.num_layers), start.cold)
        except BaseException:
            self._restore()  # the model is left as it was given
            raise

    def _make_policy(self, policy, slots_per_gpu, cost):
        """The moeless.policy object every rank runs alike (see the class docstring)."""
        from moeless.policy import Policy, make_policy

        L, E, G = self.num_layers, self.num_experts, self.world
        if isinstance(policy, Policy):
            if (policy.L, policy.E, policy.G) != (L, E, G):
                raise ValueError(f"policy: built for (layers, experts, GPUs) = ({policy.L}, {policy.E}, {policy.G}), "
                                 f"the model and world are ({L}, {E}, {G})")
            return policy
        if not isinstance(policy, str) or policy not in ("moeless", "ep", "megatron", "eplb"):
            raise ValueError(f"policy must be 'moeless', 'ep', 'eplb' or a moeless.policy.Policy, got {policy!r}")
        if slots_per_gpu is None:
            slots_per_gpu = default_slots_per_gpu(E, G, 0 if policy in ("ep", "megatron") else 1)
        if cost is None:
            cost = self._default_cost()
        return make_policy(policy, num_layers=L, num_experts=E, gpus=G, slots_per_gpu=int(slots_per_gpu), cost=cost)

    def _default_cost(self):
        """A roofline of the served model (its config) on this device's hardware profile."""
        from moeless.costmodel import RooflineCost
        from moeless.specs import ModelSpec, hardware_for_device

        dtype = next(self.model.parameters()).dtype
        spec = ModelSpec.from_hf_config(self.model.config.to_dict(), bytes_per_param=float(dtype.itemsize))
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return RooflineCost(spec, hardware_for_device(name))

    def _make_predictor(self, predictor, policy, distance):
        if isinstance(predictor, str) and predictor not in ("gate-replica", "previous"):
            raise ValueError(f"predictor must be 'gate-replica', 'previous' or a GateReplicaPredictor, got {predictor!r}")
        if not policy.serverless or predictor == "previous":
            return None
        from moeless.predictors import GateReplicaPredictor

        if predictor == "gate-replica":
            if self.num_layers <= distance:
                return None
            predictor = GateReplicaPredictor.from_model(self.model, distance)
        loads = GateReplicaLoads(predictor)
        if loads.num_layers != self.num_layers or loads.num_experts != self.num_experts:
            raise ValueError("predictor: fitted for another model (layers or experts differ)")
        return loads

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

    def _control(self, layer: int, counts: Counts, replan: bool) -> None:
        """Decide layer l+d from layer l's counts and the prediction; copy this rank's cold starts."""
        tc = time.perf_counter()
        now = max(counts.now, self._last_now)  # rank 0's clock: every rank's pool sees the same
        self._last_now = now
        applied = self.engine.observe(layer, counts.true, counts.predicted, now, replan=replan)
        if applied is not None:
            self._realise([applied[0]], applied[1].cold)
        self.control_seconds += time.perf_counter() - tc
        self.timer.mark("control plane")

    def _after_layer(self, layer: int) -> None:
        """Once the layer's experts are done with its buffers: its plan for the next iteration (copies have an
        iteration to arrive), and after the last layer the policy's end-of-iteration plan (EPLB's rebuild)."""
        tc = time.perf_counter()
        applied = self.engine.prepare(layer, self._last_now)
        if applied is not None:
            self._realise([applied[0]], applied[1].cold)
        if layer == self.num_layers - 1:
            rebuilt = self.engine.end_iteration(self._last_now)
            if rebuilt is not None:
                self._realise(range(self.num_layers), rebuilt.cold)
        self.control_seconds += time.perf_counter() - tc

    def _predict(self, layer: int, x: torch.Tensor):
        if self._predictor is None:
            return None
        if self._predict_stream is None:
            return self._predictor.counts(layer, x)
        current = torch.cuda.current_stream(self.device)
        self._predict_stream.wait_stream(current)
        with torch.cuda.stream(self._predict_stream):
            predicted = self._predictor.counts(layer, x)
        current.wait_stream(self._predict_stream)
        return predicted

    # -- one MoE layer --------------------------------------------------------------------------------------
    def _moe_layer(self, mod: ExpertParallelExperts, hidden, top_k_index, top_k_weights):
        layer, K = mod.layer, int(top_k_index.shape[1])
        self.timer.begin(layer)
        H = hidden.shape[-1]
        hidden = hidden.reshape(-1, H)
        if top_k_weights.shape[1] != K:  # dense router scores [T, E]
            top_k_weights = top_k_weights.gather(1, top_k_index.long())
        keep = self._active
        if keep is not None and self._active_of != hidden.shape[0]:
            raise ServeError(f"token mask of {self._active_of} tokens for a layer input of {hidden.shape[0]}")
        if keep is not None:
            x, ids, w = hidden.index_select(0, keep), top_k_index.index_select(0, keep), top_k_weights.index_select(0, keep)
        else:
            x, ids, w = hidden, top_k_index, top_k_weights
        batch_tokens = self._batch_tokens[min(self._batch_iter, len(self._batch_tokens) - 1)]
        if layer == 0:
            self.engine.begin_iteration(batch_tokens, prefill=self._batch_iter == 0)
        wants = self.engine.wants_plan(batch_tokens, K)
        predicted = self._predict(layer, x) if wants else None
        self.timer.mark("predict")

        plan = self.engine.plan(layer)
        device_plan = mod.device_plan(plan)  # uploaded once per plan
        prep = self.pf.prepare(layer, x, ids, predicted, self._now(), plan, device_plan,
                               lambda true: self.engine.split(layer, true))
        # the control plane of layer l+d runs while the tokens are in flight (the rank would only wait); it
        # touches layer l+d's buffers only, so it waits for this layer's end when l+d wraps onto l itself
        target = (layer + self.engine.distance) % self.num_layers
        if target != layer:
            self._control(layer, prep.counts, wants)
        recv_x = self.pf.receive(prep)
        with self.timer.expert(layer):
            y = mod.run(recv_x, prep.expert_ids, prep.replica_tokens, device_plan, self.kernel_backend) \
                if recv_x.shape[0] else recv_x
        self.timer.mark("experts")
        out = self.pf.finalize(prep, y, w, hidden.dtype)
        if keep is not None:
            out = torch.zeros_like(hidden).index_copy_(0, keep, out)
        self.timer.end(layer)
        if target == layer:
            self._control(layer, prep.counts, wants)
        self._after_layer(layer)
        if layer == 0:
            self._iter_tokens.append(int(prep.counts.true.sum()) // K)
        if layer == self.num_layers - 1:
            self.timer.end_iteration()
            self._batch_iter += 1
        return out

    # -- generation -----------------------------------------------------------------------------------------
    def _set_active(self, rows: np.ndarray, total: int) -> None:
        """The rows (of the flattened [batch x sequence] tokens) that take part in this iteration's MoE layers:
        real prompt tokens, requests still decoding. Known on the host; uploaded once per iteration."""
        self._active = None if rows.size == total else upload(rows.astype(np.int64), self.device)
        self._active_of = total

    @torch.no_grad()
    def generate(self, prompts: list, max_new_tokens) -> list[Result]:
        """Greedy generation of one batch: every rank passes the same prompts (lists of ids) and lengths; rank r
        runs prompts r, r+G, ... (data parallel); one prefill iteration, then decode iterations until the
        longest request ends. Returns every request's Result on every rank, in input order. ServeError (and the
        server is unusable) if a peer rank dies or stalls."""
        return self._generate(prompts, max_new_tokens, self._t0)

    def _generate(self, prompts: list, max_new_tokens, clock0: float) -> list[Result]:
        if self.failed is not None:
            raise ServeError(f"server unusable after an earlier failure: {self.failed}")
        n = len(prompts)
        if isinstance(max_new_tokens, (int, np.integer)):
            max_new_tokens = [int(max_new_tokens)] * n
        if len(max_new_tokens) != n or n == 0:
            raise ValueError(f"max_new_tokens must be an integer or one per prompt ({n}); prompts must not be empty")
        try:
            with torch.no_grad():
                local = self._run_batch(prompts, max_new_tokens, clock0)
            return self._gather_results(local, n)
        except ServeError as err:
            self.failed = err
            raise
        finally:
            self._active, self._active_of = None, -1

    def _run_batch(self, prompts, max_new_tokens, clock0) -> dict[int, Result]:
        steps = max(max_new_tokens)
        self._prefill_iterations.append(self.timer.iterations)
        # tokens of every iteration of this batch over all ranks (prefill, then the requests still decoding)
        self._batch_tokens = [sum(len(p) for p in prompts)] + [sum(m > j for m in max_new_tokens)
                                                                for j in range(1, steps)]
        self._batch_iter = 0
        mine = list(range(self.rank, len(prompts), self.world))
        local: dict[int, Result] = {i: Result(id=i) for i in mine}
        if not mine:  # no request here: still take part in every iteration's collectives, with no token
            dummy = torch.zeros((1, 1), dtype=torch.long, device=self.device)
            cache = None
            for _ in range(steps):
                self._set_active(np.zeros(0, dtype=np.int64), 1)
                out = self.model(input_ids=dummy, use_cache=True, **{self._cache_kw: cache}, **self._forward_kwargs)
                cache = cache_of(out)
            return local
        B = len(mine)
        lens = np.array([len(prompts[i]) for i in mine])
        limit = np.array([max_new_tokens[i] for i in mine])
        width = int(lens.max())
        pad = int(getattr(self.model.config, "pad_token_id", None) or 0)
        ids = torch.full((B, width), pad, dtype=torch.long)
        attn = torch.zeros((B, width), dtype=torch.long)
        for b, i in enumerate(mine):  # left padding: every row's last token is at the end
            ids[b, width - lens[b]:] = torch.tensor(prompts[i], dtype=torch.long)
            attn[b, width - lens[b]:] = 1
        ids, attn = ids.to(self.device), attn.to(self.device)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        self._set_active(np.flatnonzero(np.arange(width)[None, :] >= (width - lens)[:, None]), B * width)
        out = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1,
                         **self._forward_kwargs)
        first_token_s = time.perf_counter() - clock0  # on CUDA: when the host had queued the prefill
        cache = cache_of(out)
        generated, logits_seen = [], []
        for step in range(steps):
            logits = out.logits[:, -1].float()
            nxt = logits.argmax(-1)
            generated.append(nxt)
            if self.record_logits:
                logits_seen.append(logits.cpu())
            if step == steps - 1:
                break
            self._set_active(np.flatnonzero(limit > step + 1), B)
            attn = torch.cat([attn, torch.ones((B, 1), dtype=attn.dtype, device=self.device)], 1)
            pos = pos[:, -1:] + 1
            out = self.model(input_ids=nxt[:, None], attention_mask=attn, position_ids=pos,
                             use_cache=True, **{self._cache_kw: cache}, **self._forward_kwargs)
            cache = cache_of(out)
        toks = torch.stack(generated, 1).cpu()  # one host sync per batch
        done_s = time.perf_counter() - clock0
        for b, i in enumerate(mine):
            m = max_new_tokens[i]
            r = local[i]
            r.tokens, r.first_token_s, r.done_s = toks[b, :m].tolist(), first_token_s, done_s
            if self.record_logits:
                r.logits = torch.stack([lg[b] for lg in logits_seen[:m]]).numpy()
        return local

    def _gather_results(self, local: dict, n: int) -> list[Result]:
        out = [None] * n
        for part in self.collectives.all_gather_object("all-gather of results", local):
            for i, r in part.items():
                out[i] = r
        return out

    def serve(self, requests: list, *, batch_window_s: float = 1.0, realtime: bool = False) -> list[Result]:
        """Serve `requests` with the paper's batching: the requests arriving within each `batch_window_s` form one
        batch (prefill, then greedy decode). realtime=False replays the batches back to back, as fast as they
        can be served; realtime=True starts a window's batch no earlier than the window's end on the serving
        clock (0 when `serve` starts): requests arriving faster than they are served queue up, and
        done_s - arrival_s is each request's latency. Bad requests get a Result with `error` and are left out;
        the others are served. Results in input order, on every rank.

        A peer rank that dies or stalls raises ServeError whose `results` hold every request: the batches
        served before (all their tokens), and the others with error "serving: ..." and no tokens."""
        if isinstance(batch_window_s, bool) or not (isinstance(batch_window_s, (int, float))
                                                     and np.isfinite(batch_window_s) and batch_window_s > 0):
            raise ValueError(f"batch_window_s must be a finite number > 0, got {batch_window_s!r}")
        cfg = self.model.config
        max_ctx = int(getattr(cfg, "max_position_embeddings", 1 << 30))
        vocab = int(cfg.vocab_size)
        results = [Result(id=i if getattr(r, "id", None) is None else r.id) for i, r in enumerate(requests)]
        good = []
        for i, r in enumerate(requests):
            err = check_request(r, max_ctx, vocab)
            if err is None:
                good.append(i)
                results[i].arrival_s = float(r.arrival_s)
            else:
                results[i].error = err
        if not good:
            return results
        arrivals = np.array([float(requests[i].arrival_s) for i in good])
        order = np.argsort(arrivals, kind="stable")
        window = np.floor(arrivals[order] / batch_window_s).astype(np.int64)
        batches = [(int(key), [good[j] for j in order[window == key]]) for key in np.unique(window)]
        try:
            self.collectives.barrier("serve start")
        except ServeError as err:
            for i in good:
                results[i].error = f"serving: not served: {err}"
            raise ServeError(str(err), results=results) from err
        clock0 = time.perf_counter()
        for b, (key, idx) in enumerate(batches):
            if realtime:
                time.sleep(max(0.0, (key + 1) * batch_window_s - (time.perf_counter() - clock0)))
            try:
                outs = self._generate([list(requests[i].prompt) for i in idx],
                                      [int(requests[i].max_new_tokens) for i in idx], clock0)
            except ServeError as err:
                for later, (_, rest) in enumerate(batches[b:]):
                    why = f"batch {b} failed" if later == 0 else f"not served: batch {b} failed before it"
                    for i in rest:
                        results[i].error = f"serving: {why}: {err}"
                raise ServeError(str(err), results=results) from err
            for i, o in zip(idx, outs):
                r = results[i]
                r.tokens, r.logits, r.batch, r.first_token_s, r.done_s = o.tokens, o.logits, b, o.first_token_s, o.done_s
        return results

    # -- report ---------------------------------------------------------------------------------------------
    def summary(self) -> dict:
        """Per-layer latencies (the slowest rank's, per iteration and layer), tokens, replicas, cold starts and
        the pool's bill, identical on every rank (gathers the ranks' layer times; this rank's alone after a
        failure)."""
        table = self.timer.table()
        mine = np.stack([table[f] for f in ("moe", "with_gather", "expert", "cpu")])
        parts = [mine] if self.failed is not None else \
            self.collectives.all_gather_object("all-gather of layer times", mine)
        # [iterations, L]: a layer ends when its slowest rank ends
        times, full, expert, cpu = np.max(np.stack(parts), axis=0)
        pairs = table["pairs"]
        stats, meter = self.engine.stats, self.engine.pool.meter
        reps = np.array(stats.replicas, dtype=np.float64)
        n = max(1, times.size)
        return {
            "policy": self.policy_name,
            "world_size": self.world,
            "slots_per_gpu": self.slots_per_gpu,
            "iterations": int(times.shape[0]),
            "tokens": int(sum(self._iter_tokens)),
            "moe_layer_ms": percentiles(times, 1e3),
            "moe_layer_with_gather_ms": percentiles(full, 1e3)["mean"],
            "expert_ms": percentiles(expert, 1e3)["mean"],
            "expert_times_s": expert.tolist(),
            "moe_layer_cpu_ms": percentiles(cpu, 1e3)["mean"],
            "layer_cpu_s": cpu.tolist(),
            "profile_this_rank_ms": {k: [v[0] * 1e3 / n, v[1] * 1e3 / n] for k, v in self.timer.profile.items()},
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
            "plans_skipped": stats.plans_skipped,
            "cold_starts": int(meter.cold_starts),
            "warm_starts": int(meter.warm_starts),
            "releases": int(meter.releases),
            "gb_seconds": float(meter.gb_seconds),
            "gpu_seconds": float(meter.gpu_seconds),
            "copies_this_rank": int(sum(m.copies for m in self.layers)),
            "unbilled_copies_this_rank": int(sum(m.repairs for m in self.layers)),
            "copy_seconds_this_rank": float(self.copy_seconds),
            "control_ms_per_layer": float(self.control_seconds * 1e3 / n),
            "expert_bytes": int(self.layers[0].expert_bytes),
            "failed": None if self.failed is None else str(self.failed),
        }

    def close(self) -> dict:
        """Charge the pool to now, restore the model's own experts modules, return the summary (after a failure:
        this rank's, without any collective)."""
        if self.closed:
            raise ValueError("server already closed")
        try:
            s = self.summary()
            meter = self.engine.close(self._last_now)  # rank 0's last time: the same bill on every rank
            s.update(gb_seconds=float(meter.gb_seconds), gpu_seconds=float(meter.gpu_seconds),
                     releases=int(meter.releases), clock_end_s=float(self._last_now))
        finally:
            self._restore()
        return s

    def _restore(self) -> None:
        for block, experts in self._originals:
            block.experts = experts
        for m in self.layers:
            m.serve_layer = None
        self.model.to(self._original_device)
        self.closed = True
