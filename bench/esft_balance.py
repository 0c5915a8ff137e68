"""GPU balance on real routing (ESFT) with real load predictors: static EP, EPLB and moeless, held out.

    OMP_NUM_THREADS=1 .venv/bin/python bench/esft_balance.py            # writes bench/results/esft_balance.md
    OMP_NUM_THREADS=1 .venv/bin/python bench/esft_balance.py --quick    # a few batches, to check it runs

Data: ESFT-vanilla-lite routing (26 MoE layers, 64 experts, top-6), read by path from
../shared/data/esft_routing/expert_scores beside the repository (or $MOELESS_ESFT); evaluation only, never copied into the
repository. Without it the script says so and exits 0 (and `esft_balance_table` returns None).

Protocol (moeless.prediction_eval.evaluate, online, distance d = 1, 8 GPUs): predictors are fitted on one part
and evaluated on the other (`held_out_splits`: in-distribution = first 70% of each task's sequences / the
rest; task shift = intent + law / summary). Batches of 64 and 512 consecutive tokens. Per batch and target
layer: balance = max / mean GPU load of the TRUE counts, with the paper's even split and with the serve-time
split; the mean over batches and layers is reported. Rows: static EP (8 experts per GPU), EPLB (all spare
slots as redundant experts, rebuilt every 10 batches from the last 10), moeless planned from each
predictor's prediction (warm reuse of its previous plan), with and without `hedge` (and with hedge and
reuse_whole=True).

What it must never do: fit on the evaluation part, or write anything but its report.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from moeless.traces import default_esft_path  # noqa: E402

ESFT = default_esft_path()
PREDICTORS = ("history", "affinity", "regression", "oracle")
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "esft_balance.md")


def esft_balance_table(root: str = ESFT, *, slots_per_gpu: int = 9, gpus: int = 8, batch_tokens=(64, 512),
                       hedge_options=(False, True), predictors=PREDICTORS, max_tokens=None, progress=False):
    """{(protocol, tokens, row): (even-split balance, serve-time-split balance)}; None without the data.

    rows: "static EP", "EPLB", "moeless <predictor>, hedge=<False|True>" (defaults otherwise) and, for the
    regression and oracle predictors, "moeless <predictor>, hedge=True, reuse_whole=True".
    `max_tokens` keeps only the first tokens of each evaluation part (a quick check). `progress` shows a bar
    per evaluation on stderr."""
    if not os.path.isdir(root):
        return None
    from moeless.prediction_eval import evaluate, held_out_splits
    from moeless.predictors import make_predictor
    from moeless.traces import read_esft

    trace = read_esft(root)
    out = {}
    for protocol, (fit, ev) in held_out_splits(trace).items():
        if max_tokens is not None:
            ev = ev.select_tokens(slice(0, max_tokens))
        for tokens in batch_tokens:
            for hedge, whole in [(h, False) for h in hedge_options] + [(True, True)] * (True in hedge_options):
                names = predictors if not whole else [n for n in predictors if n in ("regression", "oracle")]
                preds = {name: make_predictor(name, 1).fit(fit) for name in names}
                label = f"{protocol}, {tokens} tok, hedge={hedge}" + (", whole" if whole else "")
                res = evaluate(preds, ev, tokens, gpus, slots_per_gpu, online=True,
                               plan_kwargs={"hedge": hedge, "reuse_whole": whole}, baselines=not hedge,
                               eplb_kwargs={"window": 10, "interval": 10}, progress=label if progress else False)
                if not hedge:
                    for name, key in (("static", "static EP"), ("eplb", "EPLB")):
                        out[(protocol, tokens, key)] = (res[name]["balance_even"], res[name]["balance"])
                for name, m in res["predictors"].items():
                    row = f"moeless {name}, hedge={hedge}" + (", reuse_whole=True" if whole else "")
                    out[(protocol, tokens, row)] = (m["balance_even"], m["balance"])
    return out


def format_markdown(table: dict, slots_per_gpu: int, gpus: int = 8) -> str:
    protocols = sorted({k[0] for k in table})
    tokens = sorted({k[1] for k in table})
    rows = list(dict.fromkeys(k[2] for k in table))
    head = "| policy | " + " | ".join(f"{p} {t} tok even | {p} {t} tok split" for p in protocols for t in tokens) + " |"
    lines = [f"ESFT routing, {gpus} GPUs x {slots_per_gpu} slots (64 experts), d = 1, online predictors; "
             "mean max/mean GPU load of the true counts (even = the paper's even split, split = serve-time split); "
             f"EPLB has the {gpus * slots_per_gpu - 64} spare slots as redundant experts, rebuilt every 10 batches "
             "from the last 10; moeless plans from each predictor's prediction (online, warm reuse), hedge=True is "
             "the default",
             "", head, "|" + "---|" * (1 + 2 * len(protocols) * len(tokens))]
    for r in rows:
        cells = []
        for p in protocols:
            for t in tokens:
                ev, sp = table.get((p, t, r), (None, None))
                cells += [f"{ev:.4f}" if ev is not None else "-", f"{sp:.4f}" if sp is not None else "-"]
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=ESFT)
    ap.add_argument("--slots", type=int, nargs="+", default=[9, 10])
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--quick", action="store_true", help="2048 tokens per evaluation part; prints, writes nothing")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.root):
        print(f"no ESFT routing at {args.root}: skipped")
        return 0
    parts = []
    for s in args.slots:
        t0 = time.perf_counter()
        print(f"8 GPUs x {s} slots: reading {args.root} and evaluating "
              "(a progress bar per protocol, batch size and hedge setting)", file=sys.stderr, flush=True)
        table = esft_balance_table(args.root, slots_per_gpu=s, max_tokens=2048 if args.quick else None,
                                   progress=not args.no_progress)
        text = format_markdown(table, s)
        print(text, f"\n({time.perf_counter() - t0:.0f} s)\n", flush=True)
        parts.append(text)
    if not args.quick:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            f.write("# ESFT balance (bench/esft_balance.py)\n\n" + "\n\n".join(parts) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    np.seterr(all="ignore")
    sys.exit(main())
