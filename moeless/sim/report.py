"""A simulation's report: a Markdown summary and two PNG plots (MoE-layer latency CDF, replicas over time).

`write_report(result, out_dir)` writes report.md, latency_cdf.png, replicas.png (and result.json) and returns
their paths. matplotlib is imported lazily with the Agg backend (no display); without it the Markdown and
JSON are still written. This module never simulates.
"""
from __future__ import annotations

import os

import numpy as np

from moeless.sim.results import SimResult

PAPER_HEADLINES = (
    "Paper (8x RTX A6000, Mixtral-8x7B / Phi-3.5-MoE / Llama-4-Scout, linear cost model): mean MoE-layer "
    "latency -43.19% vs Megatron-LM and -21.89% vs EPLB; cost -92.68% vs Megatron-LM, -84.06% vs Oracle, "
    "-95.11% vs EPLB."
)


def markdown(result: SimResult) -> str:
    d = result.to_dict()
    setup, pols = d["setup"], d["policies"]
    lines = ["# moeless simulation", ""]
    lines.append(f"{setup['model']} ({setup['moe_layers']} MoE layers, {setup['experts']} experts, top-"
                 f"{setup['top_k']}, {setup['expert_gb']} GB per expert) on {setup['gpus']}x {setup['hardware']}, "
                 f"{setup['slots_per_gpu']} expert slots per GPU per layer.")
    lines.append(f"Trace {setup['trace']}: {setup['requests']} requests, {setup['batching']} batching, "
                 f"{setup['iterations']} iterations ({setup['simulated_iterations']} simulated, decode stride "
                 f"{setup['decode_stride']}). Routing: {setup['routing']}.")
    lines.append(f"Cost model: {setup['cost_model']}.")
    lines.append("")
    lines.append("| policy | mean ms | p50 ms | p90 ms | p99 ms | iteration ms | cost GB-s | Eq. 2 GB-s | "
                 "GPU-s | cold starts | mean replicas |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, p in pols.items():
        lat = p["latency_ms"]
        tag = " (lossy)" if p.get("lossy") else ""
        lines.append(f"| {name}{tag} | {lat['mean']:.3f} | {lat['p50']:.3f} | {lat['p90']:.3f} | {lat['p99']:.3f} | "
                     f"{p['iteration_ms']['mean']:.2f} | {p['cost_gb_s']:.4g} | {p['eq2_cost_gb_s']:.4g} | "
                     f"{p['gpu_seconds']:.4g} | {p['cold_starts']} | {p['mean_replicas']:.1f} |")
    lines.append("")
    if "moeless" in pols:
        ref = pols["moeless"]
        rel = []
        for other in ("megatron", "eplb", "oracle"):
            if other in pols:
                o = pols[other]
                dl = 100 * (ref["latency_ms"]["mean"] / o["latency_ms"]["mean"] - 1)
                dc = 100 * (ref["cost_gb_s"] / o["cost_gb_s"] - 1) if o["cost_gb_s"] else float("nan")
                rel.append(f"{dl:+.1f}% latency, {dc:+.1f}% cost vs {other}")
        if rel:
            lines.append("moeless: " + "; ".join(rel) + ".")
            lines.append("")
    lines.append(PAPER_HEADLINES)
    lines.append("")
    lines.append("Accounting: " + setup["accounting"] + ".")
    for name, p in pols.items():
        lines.append(f"- {name}: {p['accounting']}")
    lines.append("")
    lines.append(f"Simulated in {setup['wall_s']:.1f} s (seed {setup['seed']}).")
    return "\n".join(lines) + "\n"


def write_report(result: SimResult, out_dir: str) -> dict:
    """Write report.md, result.json, latency_cdf.png and replicas.png under out_dir; returns {kind: path}."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"markdown": os.path.join(out_dir, "report.md"), "json": os.path.join(out_dir, "result.json")}
    with open(paths["json"], "w", encoding="utf-8") as fh:
        fh.write(result.to_json(indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional
        plt = None
    if plt is not None:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, pr in result.policies.items():
            lat, w = pr.latencies
            order = np.argsort(lat)
            cw = np.cumsum(w[order])
            ax.plot(lat[order] * 1e3, cw / cw[-1], label=name)
        ax.set_xlabel("MoE-layer latency (ms)")
        ax.set_ylabel("CDF")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        paths["latency_cdf"] = os.path.join(out_dir, "latency_cdf.png")
        fig.savefig(paths["latency_cdf"], dpi=120)
        plt.close(fig)

        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
        for name, pr in result.policies.items():
            t = pr.series("clock_s")
            ax1.plot(t, pr.series("replicas"), label=name, lw=0.8)
            ax2.plot(t, np.cumsum(pr.series("cold_starts")), label=name, lw=0.8)
        ax1.set_ylabel("live instances")
        ax2.set_ylabel("cold starts (cumulative)")
        ax2.set_xlabel("simulated time (s)")
        ax1.legend(fontsize=8)
        fig.tight_layout()
        paths["replicas"] = os.path.join(out_dir, "replicas.png")
        fig.savefig(paths["replicas"], dpi=120)
        plt.close(fig)
    with open(paths["markdown"], "w", encoding="utf-8") as fh:
        text = markdown(result)
        if plt is not None:
            text += "\n![MoE-layer latency CDF](latency_cdf.png)\n\n![Replicas and cold starts](replicas.png)\n"
        fh.write(text)
    return paths
