"""Evaluation of load predictors: accuracy, and the GPU balance the planner reaches with each prediction.

`evaluate(predictors, trace, batch_tokens, gpus, slots_per_gpu, online=False)` replays a routing trace in
batches of consecutive tokens. Per batch and MoE layer l, each predictor sees layer l's real routing (and gate
input) and predicts layer l+d's load; the planner places replicas from the predicted loads of all target
layers, then the TRUE loads are served with the serve-time split (`balance`) and with the paper's even split
(`balance_even`). Accuracy: Pearson r and relative L1 of the load vectors, top-k recall of per-token
predictions where a predictor makes them. Everything is averaged over batches and target layers.

Metrics, per batch and target layer, then averaged: `pearson` is the correlation of the predicted and the
true per-expert loads (1 is best; undefined, and skipped, when either is constant), `rel_l1` is
sum |predicted - true| / sum true (0 is best, 2 is all load on the wrong experts), `recall` is the share of the
true (token, expert) choices that the predictor's per-token top-k names (None for load-only predictors).

`held_out_splits(trace)` gives the honest protocols (fit on one part, evaluate on another): in-distribution
(first 70% of each task's sequences / the rest) and a task shift (all tasks but the last / the last).
`read_traces(paths, fmt)`, `fit_predictors(paths, fmt, distance)` and `evaluate_saved(model_path, paths, fmt,
...)` are the helpers behind `moeless predict fit|eval`; the saved predictors file is written atomically.

This module is floor 3 (it drives floor-2 predictors and planner); it never changes routing and never
imports the kernels.
"""
from __future__ import annotations

import numpy as np

from moeless import limits
from moeless import planner as _planner
from moeless.outputs import OutputFiles
from moeless.predictors import (
    LoadPredictor,
    load_predictors,
    make_predictor,
    pearson,
    relative_l1,
    save_predictors,
    topk_recall,
)
from moeless.traces import RoutingTrace, load_trace

__all__ = ["evaluate", "held_out_splits", "read_traces", "fit_predictors", "predictor_file", "evaluate_saved",
           "format_table", "DEFAULT_PREDICTORS"]

DEFAULT_PREDICTORS = ("history", "affinity", "regression", "oracle")


def evaluate(predictors, trace: RoutingTrace, batch_tokens: int, gpus: int, slots_per_gpu: int,
             online: bool = False, *, plan_kwargs: dict | None = None, baselines: bool = True,
             eplb_kwargs: dict | None = None, progress: bool | str = False) -> dict:
    """Replay `trace` in batches of `batch_tokens` and score each fitted predictor (dict {name: predictor}).

    Returns {"predictors": {name: {"pearson", "rel_l1", "balance", "balance_even", "recall" (None when the
    predictor makes no per-token prediction)}}, "static": {"balance", "balance_even"}, "eplb": {"balance",
    "balance_even"} (None with baselines=False), "batches": n, "layers": [first, last] target layer}.
    `online=True` calls `update` with each layer's real routing as it arrives (before that layer's
    prediction; never the future). The planner gets `plan_kwargs` and each predictor's previous plan (warm
    reuse, as in serving); EPLB gets `eplb_kwargs` (window, interval in batches). `progress` shows a progress
    bar over the batches on stderr (a str is its label).
    """
    if isinstance(predictors, LoadPredictor):
        predictors = {predictors.name: predictors}
    if not isinstance(predictors, dict) or not predictors:
        raise ValueError("predictors must be a non-empty dict {name: LoadPredictor}")
    if not isinstance(trace, RoutingTrace):
        raise ValueError(f"trace must be a RoutingTrace, got {type(trace).__name__}")
    batch_tokens = limits.check_int("batch_tokens", batch_tokens, 1, limits.MAX_BATCH_TOKENS)
    limits.check_plan_size(trace.num_layers, trace.num_experts, gpus, slots_per_gpu)
    gpus, slots_per_gpu = int(gpus), int(slots_per_gpu)
    distances = {p.distance for p in predictors.values()}
    if len(distances) != 1:
        raise ValueError(f"predictors must share one distance, got {sorted(distances)}")
    d = distances.pop()
    for name, p in predictors.items():
        if not isinstance(p, LoadPredictor):
            raise ValueError(f"predictors[{name!r}] must be a LoadPredictor, got {type(p).__name__}")
        if p.num_layers is None:
            raise ValueError(f"predictors[{name!r}] is not fitted")
        if (p.num_layers, p.num_experts, p.top_k) != (trace.num_layers, trace.num_experts, trace.top_k):
            raise ValueError(f"predictors[{name!r}] was fitted for L, E, K = {p.num_layers}, {p.num_experts}, "
                             f"{p.top_k}; the trace has {trace.num_layers}, {trace.num_experts}, {trace.top_k}")
        if p.needs_gate_inputs and trace.gate_inputs is None:
            raise ValueError(f"predictors[{name!r}] needs gate inputs; the trace has none")
    plan_kwargs = dict(plan_kwargs or {})
    L = trace.num_layers
    targets = slice(d, L)
    acc = {name: {"pearson": [], "rel_l1": [], "recall": [], "balance": [], "balance_even": []} for name in predictors}
    previous = {name: None for name in predictors}
    base = _baselines(trace, d, gpus, slots_per_gpu, eplb_kwargs) if baselines else {}
    base = dict(zip(("static", "eplb"), base)) if base else {}
    base_acc = {name: ([], []) for name in base}
    drop_last = trace.num_tokens >= batch_tokens
    n_batches = 0
    total = trace.num_tokens // batch_tokens if drop_last else 1
    for batch in _progress(trace.batches(batch_tokens, drop_last=drop_last), total, progress):
        n_batches += 1
        true = batch.loads[targets]
        for name, p in predictors.items():
            p.begin_batch(batch)
            pred = np.zeros(true.shape)
            for l in range(L):
                gi = None if batch.gate_inputs is None else batch.gate_inputs[l]
                if online:
                    p.update(l, batch.topk_ids[l], gi)
                if l >= L - d:
                    continue
                pred[l] = p.predict(l, batch.topk_ids[l], gi)
                topk = p.predict_topk(l, batch.topk_ids[l], gi)
                if topk is not None:
                    acc[name]["recall"].append(topk_recall(topk, batch.topk_ids[l + d]))
            a = acc[name]
            a["pearson"].extend(pearson(x, y) for x, y in zip(pred, true))
            a["rel_l1"].extend(relative_l1(x, y) for x, y in zip(pred, true))
            plan = _planner.plan_layers(pred, gpus, slots_per_gpu, previous=previous[name], **plan_kwargs)
            previous[name] = plan
            a["balance"].extend(_planner.balance(_planner.gpu_loads(plan, _planner.serve_time_split(plan, true))))
            a["balance_even"].extend(_planner.balance(_planner.gpu_loads(plan, _planner.even_split(plan, true))))
        for name, fn in base.items():
            split, even = fn(true)
            base_acc[name][0].extend(split)
            base_acc[name][1].extend(even)
    if n_batches == 0:
        raise ValueError("trace has no tokens")

    def mean(values):
        v = np.asarray(values, dtype=np.float64)
        return None if v.size == 0 or np.isnan(v).all() else float(np.nanmean(v))

    return {
        "predictors": {name: {k: mean(v) for k, v in a.items()} for name, a in acc.items()},
        **{name: ({"balance": mean(base_acc[name][0]), "balance_even": mean(base_acc[name][1])}
                  if name in base else None) for name in ("static", "eplb")},
        "batches": n_batches,
        "layers": [d, L - 1],
    }


def _progress(batches, total: int, progress):
    if not progress:
        return batches
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional
        return batches
    label = progress if isinstance(progress, str) else "evaluating"
    return tqdm(batches, total=total, unit="batch", desc=label, leave=False)


def _baselines(trace, d, gpus, slots_per_gpu, eplb_kwargs=None):
    """Balance functions of the serverful baselines on the target layers, each true loads [L-d, E] ->
    (serve-time split balance [L-d], even split balance [L-d]): static EP (E / G experts per GPU, no replicas;
    both splits coincide) and EPLB (all G*S slots, rebuilt from past true loads every `interval` batches)."""
    from moeless import baselines as _b

    def balances(plan, true):
        return (_planner.balance(_planner.gpu_loads(plan, _planner.serve_time_split(plan, true))),
                _planner.balance(_planner.gpu_loads(plan, _planner.even_split(plan, true))))

    from moeless.policy import EPLBPolicy

    static_plan = _b.static_plan(trace.num_layers - d, trace.num_experts, gpus, slots_per_gpu)
    kw = {"window": 10, "interval": 10, **(eplb_kwargs or {})}
    policy = EPLBPolicy(trace.num_layers - d, trace.num_experts, gpus, slots_per_gpu, unit="iterations", **kw)

    def static(true):
        return balances(static_plan, true)

    def eplb(true):
        out = balances(policy.plan, true)
        policy.end_iteration(true, 0.0)  # EPLB learns only from iterations already served
        return out

    return static, eplb


def held_out_splits(trace: RoutingTrace, fraction: float = 0.7) -> dict[str, tuple[RoutingTrace, RoutingTrace]]:
    """{"in-distribution": (fit, eval), "task-shift": (fit, eval)} -- fit and eval never share a sequence.

    In-distribution: the first `fraction` of each task's sequences / the rest. Task shift (only with two or
    more tasks): every task but the last / the last task.
    """
    if not isinstance(trace, RoutingTrace):
        raise ValueError(f"trace must be a RoutingTrace, got {type(trace).__name__}")
    tasks = trace.tasks
    if not tasks:
        return {"in-distribution": trace.split_sequences(fraction)}
    parts = [trace.select_tasks([t]).split_sequences(fraction) for t in tasks]
    out = {"in-distribution": (RoutingTrace.concat([p[0] for p in parts]),
                               RoutingTrace.concat([p[1] for p in parts]))}
    if len(tasks) >= 2:
        out["task-shift"] = (trace.select_tasks(tasks[:-1]), trace.select_tasks(tasks[-1:]))
    return out


def fit_predictors(paths, fmt: str | None, distance: int = 1, out: str = "predictors.npz", *,
                   names=("history", "affinity", "regression"), model=None, **kwargs) -> str:
    """Fit the named predictors on the traces at `paths` (concatenated; or a RoutingTrace) and save them to one
    file, `out` (".npz" appended when missing), written atomically.

    With a Hugging Face `model`, "gate-replica" may be named too (the trace must then hold gate inputs, as
    captured by `capture_routing`). Returns the file written.
    """
    trace = paths if isinstance(paths, RoutingTrace) else read_traces(paths, fmt)
    preds = {}
    for name in names:
        if name == "gate-replica":
            if model is None:
                raise ValueError("model: the gate-replica predictor needs the Hugging Face model's gates")
            from moeless.predictors import GateReplicaPredictor

            preds[name] = GateReplicaPredictor.from_model(model, distance, **kwargs.get(name, {}))
        else:
            preds[name] = make_predictor(name, distance, **kwargs.get(name, {}))
        preds[name].fit(trace)
    out = predictor_file(out)
    with OutputFiles() as files:
        save_predictors(preds, files.path(out))
    return out


def predictor_file(path) -> str:
    """The file a predictors path names: PATH itself when it ends in .npz, else PATH.npz (numpy's rule, which
    `save_predictors` follows), so that `predict fit --out model` and `predict eval --model model` agree."""
    path = str(path)
    return path if path.endswith(".npz") else f"{path}.npz"


def evaluate_saved(model_path: str, paths, fmt: str | None, batch_tokens: int, gpus: int,
                   slots_per_gpu: int | None = None, online: bool = False, *, oracle: bool = True, **kwargs) -> dict:
    """Load the predictors saved by `fit_predictors` (no refitting) and `evaluate` them on the traces at
    `paths` (or a RoutingTrace), with an oracle added. `slots_per_gpu=None` gives each GPU ceil(E / G) + 1
    slots (one spare)."""
    preds = load_predictors(model_path)
    trace = paths if isinstance(paths, RoutingTrace) else read_traces(paths, fmt)
    if slots_per_gpu is None:
        slots_per_gpu = -(-trace.num_experts // limits.check_int("gpus", gpus, 1, limits.MAX_GPUS)) + 1
    if oracle and "oracle" not in preds:
        preds["oracle"] = make_predictor("oracle", next(iter(preds.values())).distance).fit(trace)
    return evaluate(preds, trace, batch_tokens, gpus, slots_per_gpu, online, **kwargs)


def format_table(result: dict) -> str:
    """A plain-text table of an `evaluate` result: one row per predictor, then the baselines."""
    cols = ("pearson", "rel_l1", "recall", "balance", "balance_even")

    def cell(v):
        return f" {v:>12.3f}" if isinstance(v, (int, float)) else f" {'-':>12}"

    lines = [f"{'predictor':<14}" + "".join(f" {c:>12}" for c in cols)]
    for name, m in result["predictors"].items():
        lines.append(f"{name:<14}" + "".join(cell(m.get(c)) for c in cols))
    for name in ("static", "eplb"):
        if result.get(name):
            lines.append(f"{name:<14}" + "".join(cell(result[name].get(c)) for c in cols))
    lines.append(f"({result['batches']} batches, target layers {result['layers'][0]}..{result['layers'][1]}; "
                 "balance = max/mean GPU load with the serve-time split, balance_even with the even split)")
    return "\n".join(lines)


def read_traces(paths, fmt: str | None, **options) -> RoutingTrace:
    """The traces at `paths` (one path or several, concatenated) in format `fmt` (None: guessed from each path);
    `options` go to the reader (top_k, num_experts, drop_incomplete: see moeless.traces)."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    if not paths:
        raise ValueError("paths must name at least one trace")
    traces = [load_trace(p, fmt, **options) for p in paths]
    if len(traces) == 1:
        return traces[0]
    try:
        return RoutingTrace.concat(traces)
    except ValueError as exc:
        raise ValueError(f"the traces {paths} do not fit together: {exc}") from None
