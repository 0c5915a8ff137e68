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


PAPER_DELTAS = {"megatron": ("-43.19%", "-92.68%"), "eplb": ("-21.89%", "-95.11%"), "oracle": ("", "-84.06%")}


def _binned(t: np.ndarray, v: np.ndarray, w: np.ndarray, bins: int = 120):
    """Weighted means of v over `bins` equal spans of time t (empty spans dropped): a readable series when
    prefill and decode iterations alternate."""
    if t.size == 0:
        return t, v
    edges = np.linspace(t.min(), t.max() + 1e-9, bins + 1)
    k = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, bins - 1)
    sw = np.bincount(k, weights=w, minlength=bins)
    sv = np.bincount(k, weights=w * v, minlength=bins)
    ok = sw > 0
    return ((edges[:-1] + edges[1:]) / 2)[ok], sv[ok] / sw[ok]


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
        lines.append("moeless against the others (negative = moeless lower), beside the paper's headline numbers:")
        lines.append("")
        lines.append("| vs | mean latency | paper | cost (pool bill / resident) | cost (Eq. 2) | paper (cost) |")
        lines.append("|---|---|---|---|---|---|")
        for other in ("megatron", "eplb", "oracle"):
            if other in pols:
                o = pols[other]
                dl = 100 * (ref["latency_ms"]["mean"] / o["latency_ms"]["mean"] - 1)
                dc = 100 * (ref["cost_gb_s"] / o["cost_gb_s"] - 1) if o["cost_gb_s"] else float("nan")
                de = 100 * (ref["eq2_cost_gb_s"] / o["eq2_cost_gb_s"] - 1) if o["eq2_cost_gb_s"] else float("nan")
                pl, pc = PAPER_DELTAS.get(other, ("", ""))
                lines.append(f"| {other} | {dl:+.1f}% | {pl} | {dc:+.1f}% | {de:+.1f}% | {pc} |")
        lines.append("")
    lines.append(PAPER_HEADLINES)
    lines.append("")
    lines.append("Reading the numbers: under the roofline a layer with few pairs per expert (decode) is bound by reading "
                 "its experts' weights, so balancing pairs cannot make it faster and an extra replica that receives "
                 "pairs costs one more weight read; only compute-bound layers (prefill) gain from replicas. The "
                 "paper's cost (Equation 2) charges memory only while a layer computes; the pool bill charges every "
                 "live instance for its whole life, keep-alive included, and serverful policies for the whole run.")
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
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for name, pr in result.policies.items():
            lat, w = pr.latencies
            order = np.argsort(lat, kind="stable")
            x, cw = lat[order] * 1e3, np.cumsum(w[order])
            ax.plot(x, cw / cw[-1], label=name, drawstyle="steps-post")
            tail = 1 - cw / cw[-1]
            keep = tail > 0
            ax2.plot(x[keep], tail[keep], label=name, drawstyle="steps-post")
        ax.set_xlabel("MoE-layer latency (ms)")
        ax.set_ylabel("fraction of layer forwards at or below")
        ax.set_xscale("log")
        ax.set_title("CDF")
        ax2.set_xlabel("MoE-layer latency (ms)")
        ax2.set_ylabel("fraction of layer forwards slower")
        ax2.set_xscale("log")
        ax2.set_yscale("log")
        ax2.set_title("tail (1 - CDF)")
        for a in (ax, ax2):
            a.grid(alpha=0.3, which="both")
        ax.legend()
        fig.suptitle("MoE-layer latency, all layers and iterations (thinned decode steps weighted)", fontsize=10)
        fig.tight_layout()
        paths["latency_cdf"] = os.path.join(out_dir, "latency_cdf.png")
        fig.savefig(paths["latency_cdf"], dpi=120)
        plt.close(fig)

        fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(8, 7.5), sharex=True)
        for name, pr in result.policies.items():
            t, w = pr.series("clock_s"), pr.series("weights")
            live = pr.series("live") if pr.live else pr.series("replicas")
            style = dict(label=name, lw=1.0, ls="--" if name in ("oracle",) else "-")
            ax1.plot(*_binned(t, pr.series("replicas"), w), **style)
            ax2.plot(*_binned(t, live, w), **style)
            ax3.plot(t, np.cumsum(pr.series("cold_starts")), **style)
        ax1.set_ylabel("replicas serving\n(all layers)")
        ax2.set_ylabel("live instances billed\n(idle included)")
        ax3.set_ylabel("on-demand cold\nstarts (cumulative)")
        ax3.set_xlabel("simulated time (s), each policy on its own clock")
        ax1.set_title("Replicas over time (mean per time bin, weighted by iterations)", fontsize=10)
        for a in (ax1, ax2, ax3):
            a.grid(alpha=0.3)
        ax1.legend(fontsize=8, ncol=4)
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
