"""The `moeless` command: plan, predict fit|eval, simulate, demo.

The top floor: it parses arguments, calls the library and prints (a table for people, one JSON object on stdout
with --json). It holds no algorithm of its own. Heavy modules are imported inside each subcommand so that
`moeless --help` stays fast.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _load_loads(path: str):
    """A loads file for `moeless plan`: .json or .npy of shape [L, E] or [E] (returned as [L, E] float64)."""
    import numpy as np

    p = Path(path)
    if not p.exists():
        raise ValueError(f"--loads: no such file {path!r}")
    if p.suffix == ".npy":
        arr = np.load(p, allow_pickle=False)
    elif p.suffix == ".pt":  # an SGLang expert-distribution dump: the mean per-pass load (moeless.integrations)
        from moeless.traces import read_sglang_logical_count

        arr = read_sglang_logical_count(p).mean(axis=0)
    elif p.suffix == ".json":
        data = json.loads(p.read_text())
        if isinstance(data, dict):
            if "loads" not in data:
                raise ValueError(f"--loads: JSON object in {path!r} has no 'loads' key")
            data = data["loads"]
        arr = np.asarray(data, dtype=np.float64)
    else:
        raise ValueError(f"--loads: expected a .json, .npy or SGLang .pt file, got {path!r}")
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError(f"--loads: expected shape [L, E] or [E], got {tuple(arr.shape)}")
    return arr


def _print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=None, separators=(",", ":"))
    sys.stdout.write("\n")


def cmd_plan(args) -> int:
    import numpy as np

    from moeless import baselines, planner

    loads = _load_loads(args.loads)
    L, E = loads.shape
    previous = None
    if args.previous:
        previous = planner.Plan.from_json(Path(args.previous).read_text())
    if args.policy == "moeless":
        plan = planner.plan_layers(loads, args.gpus, args.slots_per_gpu, previous=previous,
                                   cv_threshold=args.cv_threshold)
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
    out["balance"] = {
        "even_split": {"per_layer": [round(float(x), 6) for x in bal_even], "mean": float(np.mean(bal_even))},
        "serve_time_split": {"per_layer": [round(float(x), 6) for x in bal_split],
                             "mean": float(np.mean(bal_split))},
    }
    if args.out:
        Path(args.out).write_text(_plan_file_text(plan, args.format))
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


def cmd_predict_fit(args) -> int:
    from moeless import prediction_eval

    path = prediction_eval.fit_predictors(args.routing, args.format, args.distance, args.out)
    if args.json:
        _print_json({"model": str(path)})
    else:
        print(f"predictors written to {path}")
    return 0


def cmd_predict_eval(args) -> int:
    from moeless import prediction_eval

    result = prediction_eval.evaluate_saved(
        args.model, args.routing, args.format, batch_tokens=args.batch_tokens, gpus=args.gpus,
        slots_per_gpu=args.slots_per_gpu, online=args.online)
    if args.json:
        _print_json(result)
    else:
        print(prediction_eval.format_table(result))
    return 0


_SIM_FIELDS = ("model", "hardware", "gpus", "slots_per_gpu", "trace", "window_s", "window_start_s", "rate_scale",
               "batching", "batch_window_s", "token_budget", "routing", "predictor", "distance", "rule",
               "cv_threshold", "eplb_interval_s", "keep_alive_s", "cost_model", "alpha", "beta", "t_misc",
               "iteration_budget", "seed")


def _add_simulate_arguments(si: argparse.ArgumentParser) -> None:
    """Options of `moeless simulate`; every default is SimConfig's (the paper's setup)."""
    from moeless.sim.engine import SimConfig

    d = SimConfig()
    si.add_argument("--model", default=d.model, help="bundled name (mixtral-8x7b, phi-3.5-moe, qwen3-30b-a3b, "
                    "deepseek-v2-lite, olmoe-1b-7b, llama-4-scout, deepseek-v3, ...) or a config.json path")
    si.add_argument("--hardware", default=d.hardware, help="a6000 | h100 | h200")
    si.add_argument("--gpus", type=int, default=d.gpus)
    si.add_argument("--slots-per-gpu", type=int, default=d.slots_per_gpu,
                    help="expert slots per GPU per layer (default: from the memory left after the KV reserve)")
    si.add_argument("--trace", default=d.trace, help="azure-conv | azure-code | a .csv or Mooncake .jsonl path")
    si.add_argument("--window-s", type=float, default=d.window_s, help="window length in s (default: 600)")
    si.add_argument("--window-start-s", type=float, default=d.window_start_s, help="default: the busiest window")
    si.add_argument("--rate-scale", type=float, default=d.rate_scale)
    si.add_argument("--batching", choices=["paper", "continuous"], default=d.batching)
    si.add_argument("--batch-window-s", type=float, default=d.batch_window_s)
    si.add_argument("--token-budget", type=int, default=d.token_budget, help="continuous batching: tokens/iteration")
    si.add_argument("--routing", default=d.routing,
                    help="mixtral-popularity | uniform | zipf:S | esft:PATH | jsonl:PATH | npz:PATH | popularity:PATH")
    si.add_argument("--policies", default=",".join(d.policies),
                    help="comma-separated: megatron, eplb, oracle, moeless, moeless-history, moeless-noscale, "
                         "moeless-nowarm, moeless-evensplit, moeless:PREDICTOR")
    si.add_argument("--predictor", default=d.predictor)
    si.add_argument("--distance", type=int, default=d.distance)
    si.add_argument("--rule", choices=["ideal", "literal"], default=d.rule)
    si.add_argument("--cv-threshold", type=float, default=d.cv_threshold)
    si.add_argument("--eplb-interval-s", type=float, default=d.eplb_interval_s)
    si.add_argument("--keep-alive-s", type=float, default=d.keep_alive_s)
    si.add_argument("--cost-model", choices=["roofline", "paper-linear"], default=d.cost_model)
    si.add_argument("--alpha", type=float, default=d.alpha, help="paper-linear: s per pair of one replica")
    si.add_argument("--beta", type=float, default=d.beta, help="paper-linear: s per pair in one all-to-all")
    si.add_argument("--t-misc", type=float, default=d.t_misc)
    si.add_argument("--iteration-budget", type=int, default=d.iteration_budget,
                    help="about this many simulated iterations (decode steps are thinned, weighted)")
    si.add_argument("--seed", type=int, default=d.seed)
    si.add_argument("--out", default="reports/simulate", help="folder for report.md, result.json and plots")
    si.add_argument("--no-report", action="store_true", help="do not write the report folder")
    si.add_argument("--no-progress", action="store_true")
    si.add_argument("--json", action="store_true", help="one JSON object on stdout")


def cmd_simulate(args) -> int:
    from moeless.sim import SimConfig, run_simulation, write_report
    from moeless.sim.report import markdown

    fields = {k: getattr(args, k) for k in _SIM_FIELDS}
    fields["policies"] = tuple(p.strip() for p in args.policies.split(",") if p.strip())
    fields["progress"] = not args.no_progress and not args.json
    config = SimConfig(**fields)
    result = run_simulation(config)
    paths = {} if args.no_report else write_report(result, args.out)
    if args.json:
        sys.stdout.write(result.to_json() + "\n")
    else:
        print(markdown(result))
        if paths:
            print("report: " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_demo(args) -> int:
    if args.kernels:
        from moeless import demo_kernels

        return demo_kernels.main() or 0
    from moeless import demo

    return demo.run_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moeless", description="Serverless experts for MoE serving.")
    sub = p.add_subparsers(dest="command", required=True)

    pl = sub.add_parser("plan", help="plan replicas and placement for per-expert loads")
    pl.add_argument("--loads", required=True, help=".json or .npy of shape [L, E] or [E], or an SGLang dump .pt")
    pl.add_argument("--gpus", type=int, required=True)
    pl.add_argument("--slots-per-gpu", type=int, required=True)
    pl.add_argument("--policy", choices=["moeless", "eplb", "static"], default="moeless")
    pl.add_argument("--previous", help="a previous plan (JSON written by --out) to reuse warm instances from")
    pl.add_argument("--cv-threshold", type=float, default=0.2)
    pl.add_argument("--out", help="write the plan as JSON here")
    pl.add_argument("--format", choices=["moeless", "sglang"], default="moeless",
                    help="--out file: moeless's plan, or sglang: {physical_to_logical_map} for --init-expert-location")
    pl.add_argument("--json", action="store_true", help="one JSON object on stdout")
    pl.set_defaults(func=cmd_plan)

    pr = sub.add_parser("predict", help="fit and evaluate layer-aware load predictors")
    prsub = pr.add_subparsers(dest="predict_command", required=True)
    fit = prsub.add_parser("fit", help="fit predictors on routing traces")
    fit.add_argument("--routing", nargs="+", required=True)
    fit.add_argument("--format", choices=["esft", "jsonl", "npz", "sglang"], required=True)
    fit.add_argument("--distance", type=int, default=1)
    fit.add_argument("--out", required=True)
    fit.add_argument("--json", action="store_true")
    fit.set_defaults(func=cmd_predict_fit)
    ev = prsub.add_parser("eval", help="evaluate fitted predictors on a routing trace")
    ev.add_argument("--model", required=True)
    ev.add_argument("--routing", required=True)
    ev.add_argument("--format", choices=["esft", "jsonl", "npz", "sglang"], required=True)
    ev.add_argument("--batch-tokens", type=int, required=True)
    ev.add_argument("--gpus", type=int, default=8)
    ev.add_argument("--slots-per-gpu", type=int, default=None,
                    help="default: E/G plus one extra slot per GPU")
    ev.add_argument("--online", action="store_true", help="update the predictors as real routing arrives")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=cmd_predict_eval)

    si = sub.add_parser("simulate", help="trace-driven simulation of serving policies at scale")
    _add_simulate_arguments(si)
    si.set_defaults(func=cmd_simulate)

    from moeless import demo

    de = sub.add_parser("demo", help="the demonstration `make demo` runs: the tiny model served by 4 processes")
    demo.add_arguments(de)
    de.add_argument("--kernels", action="store_true", help="run the kernel demonstration instead")
    de.set_defaults(func=cmd_demo)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as err:
        print(f"moeless {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
