"""A simulation's report: a Markdown summary and two PNG plots (MoE-layer latency, replicas over time).

`write_report(result, out_dir)` writes report.md, latency_cdf.png, replicas.png (and result.json) and returns
their paths. Everything is rendered in memory first and then renamed into place (moeless.outputs), so a
failure leaves earlier reports byte for byte. matplotlib is imported lazily with the Agg backend (no display);
without it the Markdown and JSON are still written. The report states how long the system takes to drain the
window's arrivals (`drain_note`). This module never simulates.
"""
from __future__ import annotations

import io
import os

import numpy as np

from moeless.outputs import OutputFiles
from moeless.sim.results import SimResult, weighted_quantiles

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


def _change(ours: float, theirs: float) -> str:
    """Relative change in percent, or n/a where the reference is 0 (nothing to compare with)."""
    return f"{100 * (ours / theirs - 1):+.1f}%" if theirs else "n/a"


def arrival_span_s(setup: dict) -> float | None:
    """Seconds over which the requests arrive: the window, compressed by the rate scale (None: whole trace)."""
    if setup.get("window_s") is None:
        return None
    return float(setup["window_s"]) / float(setup.get("rate_scale") or 1.0)


def drain_note(result: SimResult, *, always: bool = False, slack: float = 2.0) -> str | None:
    """A sentence on how long the policies take to serve the window's arrivals: the last iteration's end on each
    policy's clock against the arrival span. None when every policy ends within `slack` x the span (unless
    `always`)."""
    d = result.to_dict()
    span = arrival_span_s(d["setup"])
    ends = {name: p["makespan_s"] for name, p in d["policies"].items()}
    if not ends:
        return None
    slowest = max(ends, key=ends.get)
    end = ends[slowest]
    per = ", ".join(f"{name} {t:.1f} s" for name, t in ends.items())
    if span is None or span <= 0:
        return f"the last iteration ends at {per} (the whole trace is replayed)." if always else None
    ratio = end / span
    if ratio <= slack and not always:
        return None
    if end <= span * 1.05:
        return (f"arrivals span {span:.1f} s and every policy keeps up: the last iteration ends at {per}.")
    return (f"arrivals span {span:.1f} s, but the last iteration ends at {end:.1f} s ({slowest}; {ratio:.1f}x the "
            f"arrival span): requests arrive faster than they are served and the queue takes {end - span:.1f} s "
            f"more to drain (per policy: {per}). Latency here is per MoE-layer forward; queueing delay is not in it.")


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
                dl = _change(ref["latency_ms"]["mean"], o["latency_ms"]["mean"])
                dc = _change(ref["cost_gb_s"], o["cost_gb_s"])
                de = _change(ref["eq2_cost_gb_s"], o["eq2_cost_gb_s"])
                pl, pc = PAPER_DELTAS.get(other, ("", ""))
                lines.append(f"| {other} | {dl} | {pl} | {dc} | {de} | {pc} |")
        lines.append("")
    drain = drain_note(result, always=True)
    if drain:
        lines.append(f"Drain: {drain}")
        lines.append("")
    lines.append(PAPER_HEADLINES)
    lines.append("")
    lines.append("Reading the numbers (where moeless wins and why): under the roofline a layer with few pairs per "
                 "expert (decode) is bound by reading its experts' weights, so balancing pairs cannot make it "
                 "faster and an extra replica that receives pairs costs one more weight read: moeless's split "
                 "keeps such experts whole on one instance (it is never slower than plain EP there, and EPLB's "
                 "even split over two copies reads twice); compute-bound layers (prefill, large continuous "
                 "batches) gain from replicas, which moeless creates where the time they save over their warm "
                 "life pays for their copy, and hedges in free slots so that the split absorbs a batch's noise. "
                 "The paper's gains come from its linear model (no weight reads) and its cost (Equation 2) charges "
                 "memory only while a layer computes; the pool bill charges every live instance for its whole "
                 "life, keep-alive included, and serverful policies for the whole run.")
    lines.append("")
    lines.append("Accounting: " + setup["accounting"] + ".")
    for name, p in pols.items():
        lines.append(f"- {name}: {p['accounting']}")
    lines.append("")
    lines.append(f"Simulated in {setup['wall_s']:.1f} s (seed {setup['seed']}).")
    return "\n".join(lines) + "\n"


_STYLES = ("-", "--", "-.", ":")


def _styles(names) -> dict:
    """A distinct colour, dash and width per policy; earlier policies are drawn wider, so that a later one
    drawn over the same curve still shows inside it."""
    n = len(names)
    return {name: dict(color=f"C{i % 10}", ls=_STYLES[i % len(_STYLES)], lw=1.2 + 1.6 * (n - 1 - i) / max(n - 1, 1),
                       zorder=2 + i) for i, name in enumerate(names)}


def _same_as(result: SimResult) -> dict:
    """{policy: earlier policy with exactly the same latency samples} (their curves coincide)."""
    out, seen = {}, []
    for name, pr in result.policies.items():
        lat, w = pr.latencies
        for other, (olat, ow) in seen:
            if lat.shape == olat.shape and np.array_equal(lat, olat) and np.array_equal(w, ow):
                out[name] = other
                break
        seen.append((name, (lat, w)))
    return out


def _latency_figure(result: SimResult, plt):
    """CDF panels per phase (prefill, decode) when the result carries the phases, else one over all
    iterations, each zoomed on its own 0.5-99.5% range; then the tail (1 - CDF, log-log) of all iterations."""
    names = list(result.policies)
    styles, same = _styles(names), _same_as(result)
    data = {name: pr.latencies for name, pr in result.policies.items()}
    phases = {name: pr.phases for name, pr in result.policies.items()}
    panels = [("all iterations", None)]
    if all(p is not None for p in phases.values()):
        panels = [("prefill iterations", True), ("decode iterations", False)]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(5.2 * (len(panels) + 1), 4.2))
    for ax, (title, phase) in zip(axes, panels):
        lo, hi, drawn = np.inf, -np.inf, 0
        for name in names:
            lat, w = data[name]
            if phase is not None:
                keep = phases[name] == phase
                lat, w = lat[keep], w[keep]
            if lat.size == 0 or w.sum() <= 0:
                continue
            q = weighted_quantiles(lat, w, (0.005, 0.995)) * 1e3
            lo, hi = min(lo, q[0]), max(hi, q[1])
            order = np.argsort(lat, kind="stable")
            x, cw = lat[order] * 1e3, np.cumsum(w[order])
            label = name + (f" (same as {same[name]})" if name in same else "")
            ax.plot(x, cw / cw[-1], label=label, drawstyle="steps-post", **styles[name])
            drawn += 1
        if drawn:
            pad = 0.05 * (hi - lo) if hi > lo else 0.05 * max(abs(hi), 1e-6)
            ax.set_xlim(lo - pad, hi + pad)
        else:
            ax.text(0.5, 0.5, "no iteration", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"CDF, {title}", fontsize=10)
        ax.set_xlabel("MoE-layer latency (ms)")
        ax.set_ylabel("fraction of layer forwards at or below")
    tail = axes[-1]
    for name in names:
        lat, w = data[name]
        if lat.size == 0 or w.sum() <= 0:
            continue
        order = np.argsort(lat, kind="stable")
        x, cw = lat[order] * 1e3, np.cumsum(w[order])
        rest = 1 - cw / cw[-1]
        keep = rest > 0
        if keep.any():
            tail.plot(x[keep], rest[keep], label=name, drawstyle="steps-post", **styles[name])
    tail.set_xscale("log")
    tail.set_yscale("log")
    tail.set_title("tail, all iterations (1 - CDF)", fontsize=10)
    tail.set_xlabel("MoE-layer latency (ms)")
    tail.set_ylabel("fraction of layer forwards slower")
    for a in axes:
        a.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.suptitle("MoE-layer latency, all layers (thinned decode steps weighted)", fontsize=10)
    fig.tight_layout()
    return fig


def _replicas_figure(result: SimResult, plt):
    names = list(result.policies)
    styles = _styles(names)
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(8, 7.5), sharex=True)
    for name, pr in result.policies.items():
        t, w = pr.series("clock_s"), pr.series("weights")
        live = pr.series("live") if pr.live else pr.series("replicas")
        style = dict(styles[name], label=name)
        ax1.plot(*_binned(t, pr.series("replicas"), w), **style)
        ax2.plot(*_binned(t, live, w), **style)
        ax3.plot(t, np.cumsum(pr.series("cold_starts")), **style)
    span = arrival_span_s(result.to_dict()["setup"])
    if span is not None:
        for a in (ax1, ax2, ax3):
            a.axvline(span, color="0.3", ls=(0, (4, 3)), lw=1.0, zorder=1)
            a.axvspan(0, span, color="0.85", alpha=0.35, zorder=0, lw=0)
        ax1.text(span, 1.0, " last arrival: end of the window; later = draining the queue", fontsize=7,
                 va="top", ha="left", transform=ax1.get_xaxis_transform())
    ax1.set_ylabel("replicas serving\n(all layers)")
    ax2.set_ylabel("live instances billed\n(idle included)")
    ax3.set_ylabel("on-demand cold\nstarts (cumulative)")
    ax3.set_xlabel("simulated time (s), each policy on its own clock; shaded: arrivals")
    ax1.set_title("Replicas over time (mean per time bin, weighted by iterations)", fontsize=10)
    for a in (ax1, ax2, ax3):
        a.grid(alpha=0.3)
    fig.legend(*ax1.get_legend_handles_labels(), loc="lower center", ncol=min(len(names), 6), fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def _png(fig, plt) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def write_report(result: SimResult, out_dir: str) -> dict:
    """Write report.md, result.json, latency_cdf.png and replicas.png under out_dir (created); returns
    {kind: path}. All are rendered before any is written, and each replaces its old version only once every
    one is ready: a failure leaves the folder as it was."""
    files = {"json": ("result.json", result.to_json(indent=2).encode("utf-8"))}
    text = markdown(result)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional
        plt = None
    if plt is not None:
        files["latency_cdf"] = ("latency_cdf.png", _png(_latency_figure(result, plt), plt))
        files["replicas"] = ("replicas.png", _png(_replicas_figure(result, plt), plt))
        text += "\n![MoE-layer latency CDF](latency_cdf.png)\n\n![Replicas and cold starts](replicas.png)\n"
    files["markdown"] = ("report.md", text.encode("utf-8"))
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    with OutputFiles() as out:
        for kind, (name, data) in files.items():
            paths[kind] = os.path.join(out_dir, name)
            with open(out.path(paths[kind]), "wb") as fh:
                fh.write(data)
    return {k: paths[k] for k in ("markdown", "json", "latency_cdf", "replicas") if k in paths}
