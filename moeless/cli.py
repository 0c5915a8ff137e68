"""The `moeless` command (also `python -m moeless`): plan, predict fit|eval, simulate, demo.

The top floor: it parses and checks arguments (every size within `moeless.limits`), calls the library and prints
(a table for people, one JSON object on stdout with --json). It holds no algorithm of its own. Every error is one
line on stderr, `moeless <command>: error: ...`, naming the input, with exit status 2. Every file it writes is
staged beside its final path and renamed into place only when the run succeeds (`moeless.outputs`), so a failed
run leaves earlier outputs byte for byte, and no output may be one of the inputs. Heavy modules are imported
inside each subcommand so that `moeless --help` stays fast.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from moeless import limits, outputs

FORMATS_DOC = "docs/FORMATS.md"
ROUTING_KINDS = ("mixtral-popularity", "uniform", "zipf", "esft", "jsonl", "npz", "popularity")
_ROUTING_PATH_KINDS = ("esft", "jsonl", "npz", "popularity")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `moeless plan: error: argument --gpus: ...` (no usage block)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


# ---- arguments with bounds ----------------------------------------------------------------------------------
_METAVARS = {"--gpus": "G", "--slots-per-gpu": "S", "--top-k": "K", "--distance": "D", "--batch-tokens": "T",
             "--token-budget": "T", "--seed": "SEED"}


def _int_arg(p, flag, lo, hi, help, **kw):
    """An integer flag in [lo, hi] (hi None: unbounded); the range is stated in the help and checked by
    `_check_bounds`, so 0 and negative values get the same error everywhere."""
    span = f"{lo}..{hi}" if hi is not None else f">= {lo}"
    kw.setdefault("metavar", _METAVARS.get(flag, "N"))
    action = p.add_argument(flag, type=int, help=f"{help} [{span}]", **kw)
    action.bounds = ("int", lo, hi, False)
    return action


def _float_arg(p, flag, lo, help, *, lo_open=False, hi=None, **kw):
    """A finite real flag >= lo (> lo with lo_open; at most hi); checked by `_check_bounds`."""
    span = f"{'>' if lo_open else '>='} {lo:g}" + (f", <= {hi:g}" if hi is not None else "")
    kw.setdefault("metavar", "X")
    action = p.add_argument(flag, type=float, help=f"{help} [{span}]", **kw)
    action.bounds = ("float", lo, hi, lo_open)
    return action


def _check_bounds(parser: argparse.ArgumentParser, args) -> None:
    for action in parser._actions:
        bounds = getattr(action, "bounds", None)
        value = getattr(args, action.dest, None)
        if bounds is None or value is None:
            continue
        kind, lo, hi, lo_open = bounds
        name = action.option_strings[-1]
        if kind == "int":
            limits.check_int(name, value, lo, hi)
        else:
            limits.check_number(name, value, lo, hi, lo_open=lo_open)


def _print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=None, separators=(",", ":"))
    sys.stdout.write("\n")


# ---- plan ---------------------------------------------------------------------------------------------------
def _load_loads(path: str):
    """A loads file for `moeless plan` (docs/FORMATS.md): .json or .npy of shape [L, E] or [E], or an SGLang
    expert-distribution dump .pt (its mean per-pass load), returned as float64 [L, E] after
    `limits.check_loads` (an .npy's shape is checked from its header, before its values)."""
    import numpy as np

    if not os.path.isfile(path):
        raise ValueError(f"--loads: no such file {path!r}")
    if path.endswith(".npy"):
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise ValueError(f"--loads: {path!r} is not a readable .npy file ({exc})") from None
    elif path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError) as exc:
            raise ValueError(f"--loads: {path!r} is not readable JSON ({exc})") from None
        if isinstance(data, dict):
            if "loads" not in data:
                raise ValueError(f"--loads: the JSON object in {path!r} has no 'loads' key")
            data = data["loads"]
        try:
            arr = np.asarray(data)
        except ValueError as exc:  # ragged rows
            raise ValueError(f"--loads: {path!r} does not hold a [L, E] or [E] array ({exc})") from None
    elif path.endswith(".pt"):  # an SGLang expert-distribution dump (moeless.integrations)
        from moeless.traces import read_sglang_logical_count

        arr = read_sglang_logical_count(path).mean(axis=0)
    else:
        raise ValueError(f"--loads: expected a .json, .npy or SGLang .pt file, got {path!r}")
    return limits.check_loads(arr, "--loads")


def _load_previous(path: str):
    from moeless import planner

    if not os.path.isfile(path):
        raise ValueError(f"--previous: no such file {path!r}")
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        return planner.Plan.from_json(text)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--previous: {path!r} is not a plan written by `moeless plan --out` ({exc})") from None


def cmd_plan(args) -> int:
    import numpy as np

    from moeless import baselines, planner

    if args.policy != "moeless":
        given = [f for f, v in (("--rule", args.rule), ("--cv-threshold", args.cv_threshold),
                                ("--previous", args.previous)) if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to --policy moeless only")
    rule = args.rule or "ideal"
    if args.cv_threshold is not None and rule != "literal":
        raise ValueError("--cv-threshold applies to --rule literal only (the ideal rule has no threshold)")
    loads = _load_loads(args.loads)
    L, E = loads.shape
    limits.check_plan_size(L, E, args.gpus, args.slots_per_gpu)
    if args.out:
        outputs.check_output(args.out, "--out", [args.loads, args.previous])
    previous = _load_previous(args.previous) if args.previous else None
    if args.policy == "moeless":
        cv = 0.2 if args.cv_threshold is None else args.cv_threshold
        plan = planner.plan_layers(loads, args.gpus, args.slots_per_gpu, previous=previous, rule=rule,
                                   cv_threshold=cv)
    elif args.policy == "eplb":
        plan = baselines.rebalance_experts(loads, args.gpus * args.slots_per_gpu, args.gpus)
    else:
        plan = baselines.static_plan(L, E, args.gpus, args.slots_per_gpu)
    counts = np.rint(loads).astype(np.int64)
    bal_even = planner.balance(planner.gpu_loads(plan, planner.even_split(plan, counts)))
    bal_split = planner.balance(planner.gpu_loads(plan, planner.serve_time_split(plan, counts)))
    out = json.loads(plan.to_json())
    out["logcnt"] = plan.logcnt.tolist()
    out["log2phy"] = plan.log2phy.tolist()
    out["policy"] = args.policy
    if args.policy == "moeless":
        out["rule"] = rule
    out["balance"] = {
        "even_split": {"per_layer": [round(float(x), 6) for x in bal_even], "mean": float(np.mean(bal_even))},
        "serve_time_split": {"per_layer": [round(float(x), 6) for x in bal_split],
                             "mean": float(np.mean(bal_split))},
    }
    if args.out:
        outputs.write_text(args.out, _plan_file_text(plan, args.format))
    if args.json:
        _print_json(out)
    else:
        print(f"policy {args.policy}: {L} layer(s), {E} experts on {args.gpus} GPUs x {args.slots_per_gpu} slots")
        print(f"replicas per layer: {plan.logcnt.sum(axis=1).tolist()}")
        print(f"balance (max/mean GPU load), mean over layers: even split {np.mean(bal_even):.4f}, "
              f"serve-time split {np.mean(bal_split):.4f}")
        if args.out:
            print(f"plan written to {args.out}")
    return 0


def _plan_file_text(plan, fmt: str) -> str:
    """--out: moeless's plan JSON, or (--format sglang) the file SGLang's --init-expert-location reads."""
    if fmt == "sglang":
        from moeless.integrations.sglang import init_expert_location

        return json.dumps(init_expert_location(plan))
    return plan.to_json()


# ---- predict ------------------------------------------------------------------------------------------------
def _read_routing(args):
    from moeless import prediction_eval

    paths = args.routing if isinstance(args.routing, list) else [args.routing]
    return prediction_eval.read_traces(paths, args.format, top_k=args.top_k, drop_incomplete=args.drop_incomplete)


def _trace_summary(trace) -> dict:
    return {"layers": trace.num_layers, "tokens": trace.num_tokens, "top_k": trace.top_k,
            "experts": trace.num_experts, "dropped_tokens": trace.dropped_tokens}


def _say_trace(trace) -> None:
    line = (f"routing: {trace.num_layers} MoE layers, {trace.num_tokens} tokens, top-{trace.top_k} of "
            f"{trace.num_experts} experts")
    if trace.dropped_tokens:
        line += f"; dropped {trace.dropped_tokens} token(s) that lacked a row for some layer (--drop-incomplete)"
    print(line)


def cmd_predict_fit(args) -> int:
    from moeless import prediction_eval

    out = outputs.check_output(prediction_eval.predictor_file(args.out), "--out", args.routing)
    trace = _read_routing(args)
    path = prediction_eval.fit_predictors(trace, None, args.distance, out)
    if args.json:
        _print_json({"model": str(path), "trace": _trace_summary(trace)})
    else:
        _say_trace(trace)
        print(f"predictors written to {path}")
    return 0


def cmd_predict_eval(args) -> int:
    from moeless import prediction_eval

    model = args.model if os.path.exists(args.model) else prediction_eval.predictor_file(args.model)
    if not os.path.isfile(model):
        raise ValueError(f"--model: no such file {args.model!r}" + (f" (nor {model!r})" if model != args.model else ""))
    trace = _read_routing(args)
    slots = args.slots_per_gpu if args.slots_per_gpu is not None else -(-trace.num_experts // args.gpus) + 1
    limits.check_plan_size(trace.num_layers, trace.num_experts, args.gpus, slots)
    result = prediction_eval.evaluate_saved(
        model, trace, None, batch_tokens=args.batch_tokens, gpus=args.gpus, slots_per_gpu=slots,
        online=args.online, progress=not (args.no_progress or args.json))
    if args.json:
        _print_json({**result, "trace": _trace_summary(trace)})
    else:
        _say_trace(trace)
        print(prediction_eval.format_table(result))
    return 0


# ---- simulate -----------------------------------------------------------------------------------------------
_SIM_FIELDS = ("model", "hardware", "gpus", "slots_per_gpu", "trace", "window_s", "window_start_s", "rate_scale",
               "batching", "batch_window_s", "token_budget", "routing", "predictor", "distance",
               "eplb_interval_s", "eplb_window_iterations", "eplb_step_iterations", "history_s", "keep_alive_s",
               "prepare_every", "steady", "cost_model", "alpha", "beta", "t_misc", "iteration_budget", "seed")


def _add_simulate_arguments(si: argparse.ArgumentParser) -> None:
    """Options of `moeless simulate`; every default is SimConfig's (the paper's setup)."""
    from moeless.predictors import PREDICTORS
    from moeless.sim.engine import SimConfig
    from moeless.sim.policies import POLICY_NAMES
    from moeless.specs import HARDWARE

    d = SimConfig()
    si.add_argument("--model", default=d.model, help="bundled name (mixtral-8x7b, phi-3.5-moe, qwen3-30b-a3b, "
                    "deepseek-v2-lite, olmoe-1b-7b, llama-4-scout, deepseek-v3, ...) or a Hugging Face config.json "
                    f"path (default: {d.model})")
    si.add_argument("--hardware", default=d.hardware, choices=sorted(HARDWARE), help="GPU profile (default: %(default)s)")
    _int_arg(si, "--gpus", 1, limits.MAX_GPUS, f"GPUs of the expert-parallel group (default: {d.gpus})",
             default=d.gpus)
    _int_arg(si, "--slots-per-gpu", 1, limits.MAX_SLOTS_PER_GPU, "expert slots per GPU per MoE layer (default: "
             "what the memory left after the KV reserve holds, at most twice E/G)", default=d.slots_per_gpu)
    si.add_argument("--trace", default=d.trace, help="request trace: azure-conv | azure-code (bundled) or a .csv "
                    f"or Mooncake .jsonl path ({FORMATS_DOC}; default: %(default)s)")
    _float_arg(si, "--window-s", 0, "seconds of the trace to replay (default: 600)", lo_open=True,
               default=d.window_s)
    _float_arg(si, "--window-start-s", 0, "start of the window in the trace, s (default: the busiest window)",
               default=d.window_start_s)
    _float_arg(si, "--rate-scale", 0, "arrivals this many times faster than the trace (default: 1)", lo_open=True,
               hi=1e6, default=d.rate_scale)
    si.add_argument("--batching", choices=["paper", "continuous"], default=d.batching,
                    help="paper: requests of each --batch-window-s form one batch (prefill, then decode steps); "
                         "continuous: requests join and leave between iterations under --token-budget "
                         "(default: %(default)s)")
    _float_arg(si, "--batch-window-s", 0, "paper batching: seconds of arrivals per batch (default: 1)",
               lo_open=True, default=d.batch_window_s)
    _int_arg(si, "--token-budget", 1, limits.MAX_BATCH_TOKENS,
             f"continuous batching: tokens per iteration (default: {d.token_budget})", default=d.token_budget)
    si.add_argument("--routing", default=d.routing,
                    help="which experts the tokens pick: mixtral-popularity (measured Mixtral-8x7B shares; the "
                         "default) | uniform | zipf:S (synthetic Zipf shares, S >= 0) | esft:PATH | jsonl:PATH | "
                         "npz:PATH (a routing trace of the same model) | popularity:PATH (shares fitted to a trace). "
                         "Must match --model's layers, experts and top-k")
    si.add_argument("--policies", default=",".join(d.policies),
                    help=f"comma-separated: {', '.join(POLICY_NAMES)}, moeless:PREDICTOR (default: %(default)s)")
    si.add_argument("--predictor", default=d.predictor, choices=sorted(PREDICTORS),
                    help="load predictor of the moeless policies (default: history with popularity routing, "
                         "affinity with a routing trace)")
    _int_arg(si, "--distance", 1, limits.MAX_LAYERS - 1,
             f"predict the load this many MoE layers ahead (default: {d.distance})", default=d.distance)
    _int_arg(si, "--prepare-every", 1, limits.MAX_ITERATIONS, "moeless: decide each layer's plan for the next "
             "iteration only every this many iterations (less CPU, a little less balance; default: "
             f"{d.prepare_every})", default=d.prepare_every)
    si.add_argument("--no-steady", dest="steady", action="store_false", default=d.steady,
                    help="moeless: ask every decision even when its inputs (loads within their sampling noise, "
                         "live instances, copies, look-ahead, warm lives) have not moved since the layer's last one "
                         "(Engine(steady=False): more CPU, to measure what skipping costs)")
    _float_arg(si, "--eplb-interval-s", 0, "policy eplb: seconds between rebuilds, each from the loads since the "
               "last one (the paper's cadence; default: 600)", lo_open=True, default=d.eplb_interval_s)
    _int_arg(si, "--eplb-window-iterations", 1, limits.MAX_ITERATIONS, "policy eplb-vllm: iterations of load "
             f"statistics per rebuild (vLLM's window_size; default: {d.eplb_window_iterations})",
             default=d.eplb_window_iterations)
    _int_arg(si, "--eplb-step-iterations", 1, limits.MAX_ITERATIONS, "policy eplb-vllm: iterations between "
             f"rebuilds (vLLM's step_interval; default: {d.eplb_step_iterations})", default=d.eplb_step_iterations)
    _float_arg(si, "--history-s", 0, "seconds of the trace before the window that warm EPLB's statistics and the "
               "predictors, as in a running deployment (default: max(--eplb-interval-s, 600))", default=d.history_s)
    _float_arg(si, "--keep-alive-s", 0, "seconds an idle moeless instance stays warm (default: 60)",
               default=d.keep_alive_s)
    si.add_argument("--cost-model", choices=["roofline", "paper-linear"], default=d.cost_model,
                    help="roofline of the --hardware profile, or the paper's linear Equations 1-3 "
                         "(default: %(default)s)")
    _float_arg(si, "--alpha", 0, "paper-linear: s per pair of one replica", default=d.alpha)
    _float_arg(si, "--beta", 0, "paper-linear: s per pair in one all-to-all", default=d.beta)
    _float_arg(si, "--t-misc", 0, "paper-linear: non-MoE s per layer", default=d.t_misc)
    _int_arg(si, "--iteration-budget", 1, limits.MAX_ITERATIONS, "about this many simulated iterations (decode "
             f"steps are thinned and weighted; default: {d.iteration_budget})", default=d.iteration_budget)
    _int_arg(si, "--seed", 0, 2**32 - 1, f"random seed of the routing draws (default: {d.seed})", default=d.seed)
    si.add_argument("--out", default="reports/simulate",
                    help="folder for report.md, result.json, latency_cdf.png and replicas.png (created; files in "
                         "it are replaced only when the run succeeds; default: %(default)s)")
    si.add_argument("--no-report", action="store_true", help="do not write the report folder")
    si.add_argument("--no-progress", action="store_true", help="no progress bar")
    si.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def _check_routing(spec: str) -> None:
    kind, sep, arg = spec.partition(":")
    if kind not in ROUTING_KINDS:
        raise ValueError(f"--routing: unknown kind {kind!r} in {spec!r}; use mixtral-popularity, uniform, zipf:S, "
                         "esft:PATH, jsonl:PATH, npz:PATH or popularity:PATH")
    if kind == "zipf":
        try:
            limits.check_number("--routing zipf:S exponent S", float(arg) if arg else 1.0, 0)
        except ValueError as exc:
            raise ValueError(f"{exc} (zipf:0 is uniform)" if arg else str(exc)) from None
    elif kind in _ROUTING_PATH_KINDS:
        if not arg:
            raise ValueError(f"--routing: {kind!r} needs a path, e.g. {kind}:/path/to/trace")
        if not os.path.exists(arg):
            raise ValueError(f"--routing: no such file or folder {arg!r}")


def simulate_config(args):
    """The SimConfig of parsed `moeless simulate` arguments, checked: the routing spec, and the model's and
    the GPUs' sizes within `moeless.limits` (before the simulator allocates anything)."""
    from moeless.sim import SimConfig
    from moeless.specs import model_spec

    _check_routing(args.routing)
    m = model_spec(args.model)
    # without --slots-per-gpu the simulator takes at most twice E / G (moeless.sim.engine.default_slots)
    slots = args.slots_per_gpu or 2 * -(-m.num_experts // args.gpus)
    limits.check_plan_size(m.num_moe_layers, m.num_experts, args.gpus, slots)
    limits.check_int("the model's top-k", m.top_k, 1, min(limits.MAX_TOP_K, m.num_experts))
    fields = {k: getattr(args, k) for k in _SIM_FIELDS}
    fields["policies"] = tuple(p.strip() for p in args.policies.split(",") if p.strip())
    fields["progress"] = not args.no_progress and not args.json
    return SimConfig(**fields).validate()


def cmd_simulate(args) -> int:
    from moeless.sim import run_simulation, write_report
    from moeless.sim.report import drain_note, markdown

    config = simulate_config(args)
    if not args.no_report and os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out: {args.out!r} is a file; name a folder for the report")
    result = run_simulation(config)
    paths = {} if args.no_report else write_report(result, args.out)
    if args.json:
        sys.stdout.write(result.to_json() + "\n")
    else:
        print(markdown(result))
        if paths:
            print("report: " + ", ".join(str(p) for p in paths.values()))
    note = drain_note(result)
    if note and not args.json:
        print(f"note: {note}", file=sys.stderr)
    return 0


# ---- demo ---------------------------------------------------------------------------------------------------
def cmd_demo(args) -> int:
    if args.kernels:
        from moeless import demo_kernels

        return demo_kernels.main() or 0
    from moeless import demo

    return demo.run_from_args(args)


# ---- the parser ---------------------------------------------------------------------------------------------
def _add_trace_arguments(p: argparse.ArgumentParser, many: bool) -> None:
    from moeless.traces import TRACE_FORMATS

    p.add_argument("--routing", nargs="+" if many else None, required=True, metavar="PATH",
                   help=f"routing trace{'s (concatenated)' if many else ''}: an ESFT folder, a .jsonl[.gz] or an "
                        f".npz file ({FORMATS_DOC})")
    p.add_argument("--format", choices=TRACE_FORMATS, default=None,
                   help="the trace format (default: from the path: a folder is esft, .npz npz, .jsonl jsonl)")
    _int_arg(p, "--top-k", 1, limits.MAX_TOP_K, "experts per token; ESFT files do not say it: without this flag it "
             "is detected from the data (an error asks for it when the data cannot tell); jsonl and npz traces are "
             "checked against it", default=None)
    p.add_argument("--drop-incomplete", action="store_true",
                   help="drop the tokens that lack a row for some layer (e.g. routing logged while generation "
                        "stopped) and say how many, instead of rejecting the trace")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="moeless", description="Serverless experts for MoE serving.",
                epilog=f"{limits.describe()} File formats: {FORMATS_DOC}. Every error is one line naming the "
                       "input; a failed run leaves earlier outputs untouched.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pl = sub.add_parser("plan", help="plan replicas and placement for per-expert loads",
                        description="Scale and place replicas of each MoE layer's experts for the given loads, and "
                                    "report the balance (max / mean GPU load) of the paper's even split and of "
                                    "moeless's serve-time split.")
    pl.add_argument("--loads", required=True, metavar="PATH",
                    help=f"per-expert token counts: .json ([E], [[...], ...] of [L, E], or {{\"loads\": ...}}) or "
                         f".npy of shape [L, E] or [E] ({FORMATS_DOC})")
    _int_arg(pl, "--gpus", 1, limits.MAX_GPUS, "GPUs of the expert-parallel group", required=True)
    _int_arg(pl, "--slots-per-gpu", 1, limits.MAX_SLOTS_PER_GPU,
             "expert slots per GPU per layer (gpus x slots must hold every expert once)", required=True)
    pl.add_argument("--policy", choices=["moeless", "eplb", "static"], default="moeless",
                    help="moeless (predict-scale-place), eplb (DeepSeek's EPLB with every spare slot) or static "
                         "(expert parallelism, no replicas) (default: %(default)s)")
    pl.add_argument("--rule", choices=["ideal", "literal"], default=None,
                    help="moeless scaling: ideal (min-max replicas for the GPU budget; the default) or literal (the "
                         "paper's Algorithm 1, stopping at --cv-threshold)")
    _float_arg(pl, "--cv-threshold", 0, "with --rule literal: stop adding replicas once the coefficient of variation "
               "of the replicas' loads is at most this (default: 0.2)", default=None)
    pl.add_argument("--previous", metavar="PLAN",
                    help="a previous plan (JSON written by --out) whose warm instances moeless reuses")
    pl.add_argument("--out", metavar="PLAN", help=f"write the plan as JSON here ({FORMATS_DOC})")
    pl.add_argument("--format", choices=["moeless", "sglang"], default="moeless",
                    help="the --out file: moeless's plan JSON, or sglang: {\"physical_to_logical_map\": ...} for "
                         "SGLang's --init-expert-location (default: %(default)s)")
    pl.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    pl.set_defaults(func=cmd_plan, parser=pl)

    pr = sub.add_parser("predict", help="fit and evaluate layer-aware load predictors")
    prsub = pr.add_subparsers(dest="predict_command", required=True, metavar="{fit,eval}")
    fit = prsub.add_parser("fit", help="fit the history, affinity and regression predictors on routing traces")
    _add_trace_arguments(fit, many=True)
    _int_arg(fit, "--distance", 1, limits.MAX_LAYERS - 1,
             "predict layer l + DISTANCE from layer l (default: 1)", default=1)
    fit.add_argument("--out", required=True, metavar="PATH",
                     help="write the fitted predictors here (.npz is appended when missing)")
    fit.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    fit.set_defaults(func=cmd_predict_fit, parser=fit)
    ev = prsub.add_parser("eval", help="evaluate fitted predictors on a routing trace",
                          description="Replay the trace in batches; per batch and layer, score each predictor "
                                      "(pearson: correlation of predicted and true per-expert loads, 1 is best; "
                                      "rel_l1: sum |predicted - true| / sum true, 0 is best; recall: share of the "
                                      "true (token, expert) choices the per-token prediction names, where the "
                                      "predictor makes one) and the balance (max / mean GPU load, 1 is best) the "
                                      "planner reaches with its prediction.")
    ev.add_argument("--model", required=True, metavar="PATH",
                    help="the predictors written by `predict fit --out` (PATH or PATH.npz)")
    _add_trace_arguments(ev, many=False)
    _int_arg(ev, "--batch-tokens", 1, limits.MAX_BATCH_TOKENS, "tokens per replayed batch", required=True)
    _int_arg(ev, "--gpus", 1, limits.MAX_GPUS, "GPUs to plan for (default: 8)", default=8)
    _int_arg(ev, "--slots-per-gpu", 1, limits.MAX_SLOTS_PER_GPU,
             "expert slots per GPU per layer (default: ceil(E / G) + 1)", default=None)
    ev.add_argument("--online", action="store_true", help="update the predictors as real routing arrives")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ev.set_defaults(func=cmd_predict_eval, parser=ev)

    si = sub.add_parser("simulate", help="trace-driven simulation of serving policies at scale",
                        description="Replay a request trace through every policy on a simulated clock and report "
                                    "MoE-layer latency, cost, replicas and cold starts.")
    _add_simulate_arguments(si)
    si.set_defaults(func=cmd_simulate, parser=si)

    from moeless import demo

    de = sub.add_parser("demo", help="the demonstration `make demo` runs: the tiny model served by 4 processes")
    demo.add_arguments(de)
    de.add_argument("--kernels", action="store_true", help="run the kernel demonstration instead")
    de.set_defaults(func=cmd_demo, parser=de)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"moeless {args.command}" + (f" {args.predict_command}" if args.command == "predict" else "")
    try:
        _check_bounds(args.parser, args)
        return int(args.func(args) or 0)
    except ValueError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a file that cannot be written or read after the checks (disk full, permissions)
        name = f"{err.filename}: " if err.filename else ""
        print(f"{prog}: error: {name}{err.strerror or err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
