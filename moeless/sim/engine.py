"""The simulated data plane: replay a request trace through every policy on a simulated clock.

`run_simulation(SimConfig()) -> SimResult` builds the setup (model and hardware specs, the iteration schedule,
the routing source, the cost model), warms the policies on the trace before the window (EPLB's statistics and
plan, the predictors: a running deployment), then walks the iterations in chunks: the routing of a chunk is
drawn once and handed to every policy, each policy (the moeless.policy objects the serving loop runs, through
moeless.sim.policies and moeless.sim.serverless) lays out and splits the pairs, and one cost model prices every
layout. Defaults are the paper's setup: Mixtral-8x7B on 8x RTX A6000 with pairwise NVLink, the busiest 10
minutes of the Azure conv trace, 1 s batches; Megatron-LM, EPLB at the paper's and at vLLM's cadence, the lossy
oracle and moeless.

Accounting (one for all, stated in every result): every policy's instances live in a moeless.pool function
pool that bills each instance from load to release (GB-s); serverful policies never release theirs (resident
for the whole run); moeless's homes are resident and its replicas are billed while live, keep-alive included.
Copies (cold starts, EPLB's rebuilds) are counted and reported in GB. Equation 2 of the paper is reported too.

This module never launches a kernel and never reads the wall clock for simulated time.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import numpy as np

from moeless.sim import workload as _workload
from moeless.costmodel import PaperLinearCost, RooflineCost
from moeless.sim.policies import POLICY_NAMES, LoadPrediction, ServerfulRunner, synthetic_topk
from moeless.sim.results import GB, PolicyResult, SimResult
from moeless.sim.routing import (PopularityProfile, PopularityRouting, TraceRouting, mixtral_popularity,
                                 profile_from_trace)
from moeless.specs import ModelSpec, hardware_spec, model_spec


@dataclass
class SimConfig:
    """One simulation. Defaults reproduce the paper's setup (see the module docstring)."""

    model: str = "mixtral-8x7b"
    hardware: str = "a6000"
    gpus: int = 8
    slots_per_gpu: int | None = None  # expert slots per GPU per layer; None: from the memory left over
    kv_reserve: float = 0.25  # share of GPU memory kept for the KV cache and activations
    trace: str = "azure-conv"
    window_s: float | None = 600.0  # None: the whole trace
    window_start_s: float | None = None  # None: the busiest window
    rate_scale: float = 1.0
    batching: str = "paper"  # "paper" or "continuous"
    batch_window_s: float = 1.0
    token_budget: int = 8192
    routing: str = "mixtral-popularity"  # or "uniform", "zipf:S", "esft:PATH", "jsonl:PATH", "npz:PATH",
    #                                      "popularity:PATH" (a popularity profile fitted to a routing trace)
    policies: tuple = ("megatron", "eplb", "eplb-vllm", "oracle", "moeless")
    predictor: str | None = None  # None: "history" with popularity routing, "affinity" with a routing trace
    distance: int = 1
    eplb_interval_s: float = 600.0  # "eplb": rebuilt every interval from the loads since the last rebuild
    eplb_window_iterations: int = 1000  # "eplb-vllm": statistics over this many iterations (vLLM's default) ...
    eplb_step_iterations: int = 3000  # ... a rebuild every this many iterations (vLLM's default)
    history_s: float | None = None  # trace seconds before the window that warm EPLB and the predictors
    #                                 (a running deployment); None: max(eplb_interval_s, 600)
    keep_alive_s: float = 60.0
    prepare_every: int = 1  # moeless: its decision for the next iteration every this many iterations per layer
    steady: bool = True  # moeless: Engine(steady=...): a decision whose inputs did not move is not asked again
    cost_model: str = "roofline"  # or "paper-linear"
    alpha: float = 1e-6  # paper-linear: seconds per pair of one replica
    beta: float = 1e-7  # paper-linear: seconds per pair a GPU receives in one all-to-all
    t_misc: float = 0.0  # paper-linear: non-MoE seconds per layer
    decode_stride: int | str = "auto"
    iteration_budget: int = 2000  # with decode_stride="auto": about this many simulated iterations
    chunk_iterations: int = 512
    seed: int = 0
    progress: bool = False

    def validate(self) -> "SimConfig":
        if not isinstance(self.gpus, int) or self.gpus < 1:
            raise ValueError(f"gpus must be an integer >= 1, got {self.gpus!r}")
        if self.batching not in ("paper", "continuous"):
            raise ValueError(f"batching must be 'paper' or 'continuous', got {self.batching!r}")
        if self.cost_model not in ("roofline", "paper-linear"):
            raise ValueError(f"cost_model must be 'roofline' or 'paper-linear', got {self.cost_model!r}")
        unknown = [p for p in self.policies if p not in POLICY_NAMES and not p.startswith("moeless:")]
        if unknown or not self.policies:
            raise ValueError(f"policies: unknown {unknown}; known: {', '.join(POLICY_NAMES)}, moeless:PREDICTOR")
        if not 0 <= self.kv_reserve < 1:
            raise ValueError(f"kv_reserve must be in [0, 1), got {self.kv_reserve}")
        if self.decode_stride != "auto" and (not isinstance(self.decode_stride, int) or self.decode_stride < 1):
            raise ValueError(f"decode_stride must be 'auto' or an int >= 1, got {self.decode_stride!r}")
        if self.eplb_interval_s <= 0 or self.keep_alive_s < 0:
            raise ValueError("eplb_interval_s must be > 0 and keep_alive_s >= 0")
        for name in ("eplb_window_iterations", "eplb_step_iterations", "prepare_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.history_s is not None and not (math.isfinite(self.history_s) and self.history_s >= 0):
            raise ValueError(f"history_s must be None or a finite number >= 0, got {self.history_s!r}")
        return self


@dataclass
class Chunk:
    """A slice of the schedule with its routing: loads int64 [n, L, E], topk_ids [n] of [L, T, K] or None."""

    index: slice
    tokens: np.ndarray
    prefill: np.ndarray
    weight: np.ndarray
    ready_s: np.ndarray
    loads: np.ndarray
    topk_ids: list | None


@dataclass
class Setup:
    config: SimConfig
    model: ModelSpec
    hardware: object
    slots_per_gpu: int
    schedule: _workload.IterationSchedule
    full_iterations: int
    routing: object
    cost: object
    window_start_s: float
    trace_name: str
    requests: int
    extra: dict = field(default_factory=dict)


# --- setup ---------------------------------------------------------------------------------------------------
def default_slots(model: ModelSpec, hardware, gpus: int, kv_reserve: float) -> int:
    """Expert slots per GPU per layer: what fits in the memory left after the data-parallel non-expert
    weights and the KV reserve, capped at twice the E / G that expert parallelism needs (room for one
    extra copy of every expert; more only makes every plan slower to compute)."""
    dense = model.dense_params_per_layer * model.num_moe_layers * model.bytes_per_param
    free = hardware.memory_bytes * (1 - kv_reserve) - dense
    fit = int(free // (model.expert_bytes * model.num_moe_layers))
    need = math.ceil(model.num_experts / gpus)
    if fit < need:
        raise ValueError(f"slots_per_gpu: {gpus} x {hardware.name} cannot hold {model.name}'s experts once "
                         f"({need} slots per GPU per layer needed, {max(fit, 0)} fit); add GPUs")
    return min(fit, 2 * need)


def synthetic_profile(model: ModelSpec, s: float, seed: int) -> PopularityProfile:
    """Zipf(s) expert shares per layer, a random expert order per layer; kappa = 200 (the order of the
    concentrations fitted to Mixtral's measured popularity)."""
    rng = np.random.default_rng(seed)
    L, E = model.num_moe_layers, model.num_experts
    base = 1.0 / np.arange(1, E + 1) ** s
    p = np.stack([rng.permutation(base) for _ in range(L)])
    p /= p.sum(1, keepdims=True)
    # no share may exceed 1/K (a token picks K distinct experts): flatten the head where it would
    cap = 1.0 / model.top_k
    for _ in range(50):
        over = p > cap
        if not over.any():
            break
        excess = (p - cap).clip(min=0).sum(1, keepdims=True)
        p = np.where(over, cap, p)
        room = np.where(over, 0, p)
        p = p + room / room.sum(1, keepdims=True) * excess
    return PopularityProfile(p=p, kappa=np.full(L, 200.0), top_k=model.top_k, source=f"synthetic Zipf({s})")


def build_routing(spec: str, model: ModelSpec, seed: int):
    from moeless import traces as _traces

    kind, _, arg = spec.partition(":")
    if kind == "mixtral-popularity":
        src = PopularityRouting(mixtral_popularity(arg or "mixtral_8x7b_original"))
    elif kind == "uniform":
        L, E = model.num_moe_layers, model.num_experts
        src = PopularityRouting(PopularityProfile(np.full((L, E), 1.0 / E), np.full(L, np.inf), model.top_k,
                                                  "uniform"))
    elif kind == "zipf":
        src = PopularityRouting(synthetic_profile(model, float(arg or 1.0), seed))
    elif kind in ("esft", "jsonl", "npz", "popularity"):
        if not arg:
            raise ValueError(f"routing: {kind!r} needs a path, e.g. {kind}:/path/to/trace")
        fmt = None if kind == "popularity" else kind
        trace = _traces.load_trace(arg, fmt)
        if kind == "popularity":
            src = PopularityRouting(profile_from_trace(trace))
        else:
            src = TraceRouting(trace, description=f"{kind} routing trace {os.path.basename(arg.rstrip('/'))}")
    else:
        raise ValueError(f"routing: unknown {spec!r}; use mixtral-popularity, uniform, zipf:S, esft:PATH, "
                         f"jsonl:PATH, npz:PATH or popularity:PATH")
    got = (src.num_layers, src.num_experts, src.top_k)
    want = (model.num_moe_layers, model.num_experts, model.top_k)
    if got != want:
        raise ValueError(f"routing: {spec!r} has (layers, experts, top-k) = {got}, but the model {model.name} "
                         f"has {want}; pick a routing source of the same model: "
                         "--routing esft:PATH | jsonl:PATH | npz:PATH (a trace of this model, e.g. captured with "
                         "moeless.traces.capture_routing), popularity:PATH, or a synthetic zipf:S | uniform")
    return src


def build_setup(config: SimConfig) -> Setup:
    config.validate()
    model = model_spec(config.model)
    hw = hardware_spec(config.hardware)
    slots = config.slots_per_gpu or default_slots(model, hw, config.gpus, config.kv_reserve)
    if slots * config.gpus < model.num_experts:
        raise ValueError(f"slots_per_gpu={slots} x gpus={config.gpus} cannot hold {model.num_experts} experts")
    if config.cost_model == "roofline":
        cost = RooflineCost(model, hw)
    else:
        cost = PaperLinearCost(model, config.alpha, config.beta, config.t_misc)
    trace = _workload.load_trace(config.trace)
    if config.window_s is None:
        start, window = 0.0, trace
    elif config.window_start_s is None:
        start, window = _workload.busiest_window(trace, config.window_s)
    else:
        start, window = config.window_start_s, _workload.select_window(trace, config.window_start_s, config.window_s)
    window = _workload.scale_rate(window, config.rate_scale)
    schedule = _schedule(window, config, model, hw)
    full = len(schedule)
    stride = config.decode_stride
    if stride == "auto":
        if config.batching == "paper":
            decodes = int((~schedule.prefill).sum())
            room = max(config.iteration_budget - int(schedule.prefill.sum()), 1)
        else:
            decodes, room = full, max(config.iteration_budget, 1)
        stride = max(1, math.ceil(decodes / room))
    schedule = schedule.thin(int(stride))
    # the trace before the window: the history a running deployment has (EPLB's statistics, warm predictors)
    history, history_note = None, "none (the window starts the trace)"
    hist_s = config.history_s if config.history_s is not None else max(config.eplb_interval_s, 600.0)
    if hist_s > 0 and start > 0:
        lo = max(0.0, start - hist_s)
        try:
            seg = _workload.scale_rate(_workload.select_window(trace, lo, start - lo), config.rate_scale)
            history = _schedule(seg, config, model, hw).thin(int(stride))
            history_note = f"{start - lo:.0f} s of the trace before the window ({len(seg)} requests)"
        except ValueError:
            history = None
    routing = build_routing(config.routing, model, config.seed)
    return Setup(config=config, model=model, hardware=hw, slots_per_gpu=int(slots), schedule=schedule,
                 full_iterations=full, routing=routing, cost=cost, window_start_s=float(start),
                 trace_name=window.name, requests=len(window),
                 extra={"decode_stride": int(stride), "history": history, "history_note": history_note})


def _schedule(window, config: SimConfig, model: ModelSpec, hw) -> _workload.IterationSchedule:
    """The iterations of a request window under the configured batching (continuous batching admits work on
    a nominal, policy-independent clock: perfectly balanced iterations)."""
    if config.batching == "paper":
        return _workload.paper_batches(window, config.batch_window_s)
    balanced = RooflineCost(model, hw)
    gpu_of = (np.arange(model.num_experts) * config.gpus // model.num_experts)[:, None]

    def nominal_many(tokens: np.ndarray) -> np.ndarray:
        tok = np.asarray(tokens, dtype=np.float64)
        per = np.broadcast_to((tok * model.top_k / model.num_experts)[:, None, None], (len(tok), model.num_experts, 1))
        t = balanced.layer_times(per, np.broadcast_to(gpu_of, per.shape), config.gpus, tok)
        return (t.moe_latency + t.misc) * model.num_moe_layers

    # the schedule asks for one iteration at a time: tabulate every count up to the token budget once
    table = nominal_many(np.arange(config.token_budget + 1))

    def nominal(tokens: int) -> float:
        tokens = int(tokens)
        return float(table[tokens]) if tokens < len(table) else float(nominal_many(np.array([tokens]))[0])

    return _workload.continuous_batches(window, nominal, config.token_budget)


# --- policies ------------------------------------------------------------------------------------------------
def make_predictor(setup: Setup, name: str):
    from moeless import predictors as _predictors
    from moeless import traces as _traces

    pred = _predictors.make_predictor(name, setup.config.distance)
    src = setup.routing
    if isinstance(src, TraceRouting):
        pred.fit(src.trace)  # offline fit on the trace the routing replays (the predictors' own protocol)
    else:
        # load-level predictors fit on a synthetic trace holding the profile's mean shares
        m = setup.model
        tokens = 256
        loads = np.round(src.profile.p * tokens * m.top_k).astype(np.int64)
        fix = tokens * m.top_k - loads.sum(1)
        loads[np.arange(m.num_moe_layers), loads.argmax(1)] += fix
        ids = np.stack([synthetic_topk(loads[l], m.top_k) for l in range(m.num_moe_layers)])
        pred.fit(_traces.RoutingTrace(ids, m.num_experts))
    return pred


def build_runners(setup: Setup) -> list:
    """One runner per policy name, each around the moeless.policy object serving would run (see
    moeless.sim.policies): megatron, eplb (the paper's cadence), eplb-vllm (vLLM's), oracle (lossy), moeless
    (or moeless:PREDICTOR), moeless-bound (true loads, free copies)."""
    from moeless.policy import EPLBPolicy, MoelessPolicy, StaticEPPolicy
    from moeless.sim.serverless import ServerlessRunner

    cfg, m = setup.config, setup.model
    shape = (m.num_moe_layers, m.num_experts, cfg.gpus, setup.slots_per_gpu)
    token_level = isinstance(setup.routing, TraceRouting)
    default_pred = cfg.predictor or ("affinity" if token_level else "history")
    out = []
    for name in cfg.policies:
        if name == "megatron":
            out.append(ServerfulRunner(name, StaticEPPolicy(*shape, setup.cost), setup))
        elif name == "oracle":
            out.append(ServerfulRunner(name, StaticEPPolicy(*shape, setup.cost), setup, oracle=True))
        elif name == "eplb":
            out.append(ServerfulRunner(name, EPLBPolicy(*shape, setup.cost, window=cfg.eplb_interval_s,
                                                        interval=cfg.eplb_interval_s, unit="seconds", name=name),
                                       setup))
        elif name == "eplb-vllm":
            out.append(ServerfulRunner(name, EPLBPolicy(*shape, setup.cost, window=cfg.eplb_window_iterations,
                                                        interval=cfg.eplb_step_iterations, unit="iterations",
                                                        name=name), setup))
        else:
            bound = name == "moeless-bound"
            pred = name.split(":", 1)[1] if name.startswith("moeless:") else default_pred
            prediction = LoadPrediction(make_predictor(setup, pred), token_level)
            policy = MoelessPolicy(*shape, setup.cost, free_moves=bound, name=name)
            runner = ServerlessRunner(name, policy, prediction, setup, bound=bound)
            runner.predictor_name = "true loads (oracle)" if bound else pred
            out.append(runner)
    return out


# --- the run -------------------------------------------------------------------------------------------------
def _route(sched, sl: slice, src, rng: np.random.Generator):
    """(loads int [n, L, E], topk_ids [n] of [L, T, K] or None) of the schedule's iterations `sl`: token-level
    routing follows each request's decode step (0 = the prefill) inside its batch."""
    idx = np.arange(len(sched))
    new_batch = np.r_[True, sched.batch[1:] != sched.batch[:-1]]
    step = idx - np.maximum.accumulate(np.where(new_batch, idx, 0))
    tokens = sched.tokens[sl]
    if src.token_level:
        routed = [src.route(int(t), int(b), int(s), rng) for t, b, s in zip(tokens, sched.batch[sl], step[sl])]
        return np.stack([r.loads for r in routed]), [r.topk_ids for r in routed]
    return src.route_many(tokens, sched.batch[sl], step[sl], rng), None


def _chunks(setup: Setup, rng: np.random.Generator):
    sched, m = setup.schedule, setup.model
    # bound a chunk's [n, L, E, R] arrays to a few million entries (DeepSeek-V3 on 64 GPUs: a few iterations)
    size = max(1, min(setup.config.chunk_iterations, 2_000_000 // (m.num_moe_layers * m.num_experts * 4)))
    for sl in _workload.iter_chunks(len(sched), size):
        loads, topk = _route(sched, sl, setup.routing, rng)
        yield Chunk(sl, sched.tokens[sl], sched.prefill[sl], sched.weight[sl], sched.ready_s[sl], loads, topk)


def _clock_scan(ready: np.ndarray, duration: np.ndarray, start: float) -> tuple[np.ndarray, float]:
    """Start times of back-to-back iterations that may not start before `ready`: end_i = max(ready_i,
    end_{i-1}) + d_i, in closed form end_i = C_i + max(start, max_{j<=i} (ready_j - C_{j-1}))."""
    c = np.cumsum(duration)
    c_prev = c - duration
    lead = np.maximum(np.maximum.accumulate(ready - c_prev), start)
    begin = lead + c_prev
    return begin, float(begin[-1] + duration[-1])


class _Meter:
    """Per-policy accumulators the runners fill chunk by chunk: the result and the policy's clock."""

    def __init__(self, runner):
        self.result = PolicyResult(name=runner.name, serverless=runner.serverless)
        self.clock = 0.0


def _history(setup: Setup, rng: np.random.Generator):
    """(loads [n, L, E], topk_ids or None, weights [n], ready times [n] up to 0) of the iterations before the
    window, routed like the window's, or None."""
    sched = setup.extra.get("history")
    if sched is None or len(sched) == 0:
        return None
    loads, topk = _route(sched, slice(0, len(sched)), setup.routing, rng)
    return loads, topk, sched.weight, sched.ready_s - sched.ready_s[-1]


def run_simulation(config: SimConfig | None = None, *, progress: bool | None = None) -> SimResult:
    """Run every policy of `config` over the same iterations and routing; see the module docstring."""
    t0 = time.perf_counter()
    config = config or SimConfig()
    setup = build_setup(config)
    runners = build_runners(setup)
    meters = [_Meter(r) for r in runners]
    rng = np.random.default_rng(config.seed)
    history = _history(setup, np.random.default_rng(config.seed + 1))
    if history is not None:
        for r in runners:
            r.warm(*history)
    show = config.progress if progress is None else progress
    bar = None
    if show:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(setup.schedule), unit="it", desc="simulating", leave=False)
        except ImportError:  # tqdm is optional
            bar = None
    for chunk in _chunks(setup, rng):
        for runner, meter in zip(runners, meters):
            runner.run_chunk(chunk, meter)
        if bar is not None:
            bar.update(len(chunk.tokens))
    if bar is not None:
        bar.close()
    results = {}
    for runner, meter in zip(runners, meters):
        pr = meter.result
        pr.makespan_s = meter.clock
        runner.finish(meter)
        if runner.lossy:
            pr.extra["lossy"] = True
            pr.extra["rerouted_pairs"] = runner.rerouted_pairs
        if hasattr(runner, "predictor_name"):
            pr.extra["predictor"] = runner.predictor_name
        results[runner.name] = pr
    return SimResult(policies=results, setup=_setup_dict(setup), wall_s=time.perf_counter() - t0)


def _setup_dict(setup: Setup) -> dict:
    cfg, m, hw = setup.config, setup.model, setup.hardware
    return {
        "model": m.name, "model_source": m.source, "moe_layers": m.num_moe_layers, "experts": m.num_experts,
        "top_k": m.top_k, "expert_gb": round(m.expert_bytes / GB, 4),
        "hardware": hw.name, "hardware_source": hw.source, "gpus": cfg.gpus, "slots_per_gpu": setup.slots_per_gpu,
        "trace": setup.trace_name, "requests": setup.requests, "window_start_s": round(setup.window_start_s, 3),
        "window_s": cfg.window_s, "rate_scale": cfg.rate_scale, "batching": cfg.batching,
        "batch_window_s": cfg.batch_window_s if cfg.batching == "paper" else None,
        "token_budget": cfg.token_budget if cfg.batching == "continuous" else None,
        "iterations": setup.full_iterations, "simulated_iterations": len(setup.schedule),
        "decode_stride": setup.extra["decode_stride"], "routing": setup.routing.description or cfg.routing,
        "cost_model": setup.cost.describe(), "keep_alive_s": cfg.keep_alive_s, "eplb_interval_s": cfg.eplb_interval_s,
        "distance": cfg.distance, "prepare_every": cfg.prepare_every, "steady": cfg.steady, "seed": cfg.seed, "history": setup.extra.get("history_note", ""),
        "eplb_cadences": {"eplb": f"every {cfg.eplb_interval_s:g} s from the loads since the last rebuild",
                          "eplb-vllm": f"every {cfg.eplb_step_iterations} iterations from the last "
                                       f"{cfg.eplb_window_iterations}"},
        "accounting": "one function pool per policy bills every live instance from load to release (memory x "
                      "time, GB-s): serverful policies' instances are resident for the whole run, moeless's homes "
                      "too and its replicas while live (keep-alive included); copies are counted in GB; latency "
                      "is the MoE layer's forward (experts + dispatch + combine + cold-start stalls), pooled over "
                      "layers and iterations",
    }
