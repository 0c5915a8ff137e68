"""What each engine integration buys: GPU balance on real routing (ESFT) under each engine's own replica choice.

    .venv/bin/python bench/engines_balance.py            # writes bench/results/engines.md (about 7 min on one core)
    .venv/bin/python bench/engines_balance.py --quick    # 1,500 passes of one scenario; prints, writes nothing

Needs the engines' released code (`make setup` installs sglang 0.5.23 and vllm 0.33.0 without their GPU
dependencies): each engine's default EPLB algorithm is the engine's own function, and moeless's is the function
its plug-in calls. Data: ESFT-vanilla-lite routing (26 MoE layers, 64 experts, top-6), read by path from
../shared/data/esft_routing/expert_scores beside the repository (or $MOELESS_ESFT), never copied; without it the script says so
and exits 0.

Workload: the routing is served as forward passes of `--tokens` tokens (default 512: 64 per rank on 8 GPUs),
--passes of them (default 4,000). The ESFT trace holds 25k tokens, far fewer than 4,000 passes of an engine's
life, so whole sequences are replayed in a seeded random order: "mixed" draws sequences of all three tasks
(intent, law, summary: a stationary mix), "shift" serves one task at a time and switches every 1,500 passes
(a drifting mix that no rebalancing interval lines up with). Every pass's routing is real; only the order of
sequences is drawn.

Engines, with their default schedules (8 GPUs x 9 slots: 8 redundant experts):
- vLLM 0.33: EPLB window 1,000 / step 3,000 passes (first rearrangement after 750, its initial 3/4 progress),
  the window's sum to the policy; per-token choice = its hash split on each rank's own batch (64 tokens, data
  parallel attention). Policies: DefaultEplbPolicy, MoelessEplbPolicy (the plug-in's class).
- SGLang 0.5.23: rebalance every 1,000 passes from the recorder's last 1,000 per-pass counts. Default algorithm
  `auto` (deepseek, here hierarchical with one group on one node) vs `moeless` (the plug-in's
  `rebalance_experts`). Per-token choice: `static` (per source rank table; each rank's 64 tokens), `dynamic`
  (no a2a backend: token row mod replicas over the whole pass), `lp` (SGLang's LP on the pass's counts,
  modelled as its 5-iteration interior point, then one sampled replica per pair) and, for moeless, `lp` with
  moeless's split as the probabilities (the plug-in's LP hook).
- References: no EPLB (E/G experts per GPU, no redundancy); moeless's own serving (its placement with the
  exact serve-time split, no sampling: what `moeless.serve` runs); and an oracle bound for even splits:
  SGLang's default algorithm given the very passes of the interval it will serve, with the dynamic pick.
Balance = max / mean GPU pairs of a pass and layer, averaged over the passes after the first 1,000 (every
engine has rebalanced by then) and all layers. "moved" = slots whose expert changes per rebalance (layers x
slots; what the engine transfers), over the rebalances after the first (which leaves the engines' start-up
placement, the same for every policy).

What it must never do: give a policy the future (a rebalance sees only passes before it; only the row labelled
oracle sees its own interval), or write anything but its report.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from moeless.traces import default_esft_path  # noqa: E402

ESFT = default_esft_path()
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "engines.md")
GPUS, SLOTS = 8, 9
WARMUP = 1000  # passes before the measured part: both engines have rebalanced by then
SGLANG_INTERVAL = 1000
VLLM_WINDOW, VLLM_STEP = 1000, 3000
SHIFT_EVERY = 1500


# ---- workload ---------------------------------------------------------------------------------------------------
def pass_tokens(trace, scenario: str, n_passes: int, tokens: int, seed: int = 0):
    """Token indices [n_passes, tokens] of the trace served in each pass (whole sequences, seeded order)."""
    rng = np.random.default_rng(seed)
    starts = np.flatnonzero(np.r_[True, np.diff(trace.sequence_ids) != 0] | np.r_[True, trace.task[1:] != trace.task[:-1]])
    bounds = np.r_[starts, trace.num_tokens]
    seqs = [np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    task_of = np.array([trace.task[s[0]] for s in seqs])
    tasks = trace.tasks

    def stream(pool):
        while True:
            for i in rng.permutation(pool):
                yield seqs[i]

    out = np.empty((n_passes, tokens), dtype=np.int64)
    if scenario == "mixed":
        gens = {None: stream(np.arange(len(seqs)))}
    elif scenario == "shift":
        gens = {t: stream(np.flatnonzero(task_of == t)) for t in tasks}
    else:
        raise ValueError(f"scenario must be 'mixed' or 'shift', got {scenario!r}")
    buf = {k: np.empty(0, dtype=np.int64) for k in gens}
    for p in range(n_passes):
        key = None if scenario == "mixed" else tasks[(p // SHIFT_EVERY) % len(tasks)]
        while buf[key].size < tokens:
            buf[key] = np.concatenate([buf[key], next(gens[key])])
        out[p], buf[key] = buf[key][:tokens], buf[key][tokens:]
    return out


# ---- placements -------------------------------------------------------------------------------------------------
class Placement:
    """One engine's live placement: phy2log [L, P] and the log2phy [L, E, X] / logcnt [L, E] it dispatches with
    (in the engine's column order), plus SGLang's static tables when asked for."""

    def __init__(self, phy2log, log2phy, logcnt, static: bool = False):
        self.phy2log = np.asarray(phy2log, dtype=np.int64)
        self.log2phy = np.asarray(log2phy, dtype=np.int64)
        self.logcnt = np.asarray(logcnt, dtype=np.int64)
        self.static = None
        if static:
            from moeless.integrations.replica_choice import sglang_static_table

            self.static = sglang_static_table(self.log2phy, GPUS, self.phy2log.shape[1])


def ascending_maps(phy2log, E):
    from moeless.planner import Plan

    plan = Plan.from_phy2log(phy2log, E, GPUS, phy2log.shape[1] // GPUS)
    return plan.log2phy, plan.logcnt


class Engines:
    """The engines' own EPLB functions and moeless's plug-in functions."""

    def __init__(self):
        from sglang.srt.eplb import eplb_algorithms

        from moeless.integrations import sglang as moeless_sglang
        from moeless.integrations.vllm import MoelessEplbPolicy
        from vllm.distributed.eplb.policy import DefaultEplbPolicy

        self.sglang_alg = eplb_algorithms
        self.moeless_sglang = moeless_sglang
        self.vllm = {"default": DefaultEplbPolicy, "moeless": MoelessEplbPolicy}

    def sglang(self, policy, history, live: Placement) -> Placement:
        import torch

        P = live.phy2log.shape[1]
        counts = torch.from_numpy(history.astype(np.int64))
        if policy == "default":
            alg = self.sglang_alg.compute_algorithm(raw_algorithm="auto", num_groups=1, num_nodes=1)
            p2l, l2p, cnt = self.sglang_alg.rebalance_experts(counts, P, P // GPUS, 1, 1, alg)
        else:
            p2l, l2p, cnt = self.moeless_sglang.rebalance_experts(counts, P, P // GPUS, previous_phy2log=live.phy2log)
        return Placement(p2l.numpy(), l2p.numpy(), cnt.numpy(), static=True)

    def vllm_policy(self, policy, window, live: Placement) -> Placement:
        import torch

        P = live.phy2log.shape[1]
        p2l = self.vllm[policy].rebalance_experts(torch.from_numpy(window.astype(np.int64)), P, 1, 1, GPUS,
                                                  torch.from_numpy(live.phy2log)).numpy()
        return Placement(p2l, *ascending_maps(p2l, window.shape[1]))


# ---- per-pass GPU loads under each replica choice -----------------------------------------------------------------
def _flat(ids, pl: Placement):
    """ids [L, N, K] -> [N, L*K] indices into the flattened [L*E] expert axis (the choice depends on the row)."""
    L, N, K = ids.shape
    E = pl.logcnt.shape[1]
    flat = (ids + (np.arange(L) * E)[:, None, None]).transpose(1, 0, 2).reshape(N, L * K)
    X = pl.log2phy.shape[2]
    return flat, pl.log2phy.reshape(L * E, X), pl.logcnt.reshape(L * E)


def _gpu_loads(slots_flat, L, K, S):
    """slots [N, L*K] -> pairs per GPU [L, G]."""
    N = slots_flat.shape[0]
    layer = np.broadcast_to(np.repeat(np.arange(L), K)[None, :], (N, L * K))
    return np.bincount((layer * GPUS + slots_flat // S).ravel(), minlength=L * GPUS).reshape(L, GPUS)


def loads_vllm_hash(ids, pl: Placement):
    """vLLM: each of the G ranks hashes its own rows (data-parallel attention, N / G tokens each)."""
    from moeless.integrations.replica_choice import vllm_hash_choice

    L, N, K = ids.shape
    flat, l2p, cnt = _flat(ids, pl)
    slots = np.concatenate([vllm_hash_choice(chunk, l2p, cnt) for chunk in np.array_split(flat, GPUS)])
    return _gpu_loads(slots, L, K, pl.phy2log.shape[1] // GPUS)


def loads_sglang_dynamic(ids, pl: Placement):
    from moeless.integrations.replica_choice import sglang_dynamic_choice

    L, N, K = ids.shape
    flat, l2p, cnt = _flat(ids, pl)
    return _gpu_loads(sglang_dynamic_choice(flat, l2p, cnt), L, K, pl.phy2log.shape[1] // GPUS)


def loads_sglang_static(ids, pl: Placement):
    """SGLang static: rank r's tokens (the r-th of G equal chunks of the pass) go to rank r's table's slot."""
    L, N, K = ids.shape
    src = np.repeat(np.arange(GPUS), [len(c) for c in np.array_split(np.arange(N), GPUS)])
    slots = pl.static[src[None, :, None], np.arange(L)[:, None, None], ids]  # [L, N, K]
    S = pl.phy2log.shape[1] // GPUS
    return np.stack([np.bincount(slots[l].ravel() // S, minlength=GPUS) for l in range(L)])


def loads_sampled(ids, pl: Placement, prob, rng):
    """lp: one replica per pair sampled from prob [L, E, X] (SGLang's dispatch_probability)."""
    from moeless.integrations.replica_choice import sample_replicas

    L, N, K = ids.shape
    flat, l2p, _ = _flat(ids, pl)
    X = pl.log2phy.shape[2]
    slots = sample_replicas(flat, prob.reshape(-1, X), l2p, rng.random(flat.size, dtype=np.float32))
    return _gpu_loads(slots, L, K, pl.phy2log.shape[1] // GPUS)


def sglang_lp_prob(counts, pl: Placement):
    """SGLang's LP probabilities [T, L, E, X] for the per-pass counts [T, L, E] (one batched solve per layer)."""
    from moeless.integrations.replica_choice import sglang_lp_probabilities

    return np.stack([sglang_lp_probabilities(counts[:, l], pl.phy2log[l], pl.log2phy[l], GPUS)
                     for l in range(counts.shape[1])], axis=1)


def moeless_split(counts, pl: Placement):
    """moeless's serve-time split replica_tokens [L, E, R] of one pass's counts [L, E] on the placement."""
    from moeless.integrations import _policy
    from moeless.planner import Plan

    plan = Plan(pl.phy2log, pl.log2phy, pl.logcnt, GPUS, pl.phy2log.shape[1] // GPUS)
    return _policy.split_quotas(plan, counts)


def _split_once(cache: dict, counts, pl: Placement):
    """The pass's split on `pl`, computed once for the rows that use it."""
    if "rt" not in cache:
        cache["rt"] = moeless_split(counts, pl)
    return cache["rt"]


def split_gpu_loads(rt, pl: Placement):
    from moeless.planner import Plan, gpu_loads

    return gpu_loads(Plan(pl.phy2log, pl.log2phy, pl.logcnt, GPUS, pl.phy2log.shape[1] // GPUS), rt)


def balance(loads_lg):
    mean = loads_lg.mean(1)
    return np.where(mean > 0, loads_lg.max(1) / np.where(mean > 0, mean, 1), 1.0)


# ---- one scenario -----------------------------------------------------------------------------------------------
ROWS = [
    ("reference", "no EPLB (8 experts per GPU)", None),
    ("vLLM", "default EPLB + hash split", ("vllm", "default", "hash")),
    ("vLLM", "moeless policy + hash split", ("vllm", "moeless", "hash")),
    ("SGLang", "auto (deepseek) + static", ("sglang", "default", "static")),
    ("SGLang", "moeless + static", ("sglang", "moeless", "static")),
    ("SGLang", "auto (deepseek) + dynamic", ("sglang", "default", "dynamic")),
    ("SGLang", "moeless + dynamic", ("sglang", "moeless", "dynamic")),
    ("SGLang", "auto (deepseek) + lp (SGLang's LP)", ("sglang", "default", "lp")),
    ("SGLang", "moeless + lp (SGLang's LP)", ("sglang", "moeless", "lp")),
    ("SGLang", "moeless + lp (moeless's split)", ("sglang", "moeless", "lp-moeless")),
    ("reference", "moeless placement + exact serve-time split (moeless.serve)", ("sglang", "moeless", "split")),
    ("reference", "oracle: auto (deepseek) on the interval's own passes + dynamic", ("sglang", "oracle", "dynamic")),
]


def run_scenario(trace, engines, scenario, n_passes, tokens, seed=0, progress=True):
    """{row label: (balance, moved slots per rebalance)} for one scenario."""
    L, E, K = trace.num_layers, trace.num_experts, trace.top_k
    P = GPUS * SLOTS
    idx = pass_tokens(trace, scenario, n_passes, tokens, seed)
    ids_all = trace.topk_ids  # [L, N, K]
    trivial = np.tile(np.arange(P) % E, (L, 1))
    init_sg = Placement(trivial, *ascending_maps(trivial, E), static=True)
    vinit = np.tile(np.r_[np.arange(E), np.arange(P - E) % E], (L, 1))
    live = {("sglang", "default"): init_sg, ("sglang", "moeless"): init_sg, ("sglang", "oracle"): init_sg,
            ("vllm", "default"): Placement(vinit, *ascending_maps(vinit, E)),
            ("vllm", "moeless"): Placement(vinit, *ascending_maps(vinit, E))}
    moved = {k: [] for k in live}
    sums = {label: 0.0 for _, label, _ in ROWS}
    history = np.zeros((n_passes, L, E), dtype=np.int64)
    per_expert = E // GPUS
    rng = np.random.default_rng(seed + 1)
    vllm_step = VLLM_STEP - VLLM_STEP // 4
    lp_cache: dict = {}
    split_cache: dict = {}
    bar = _bar(n_passes, f"{scenario} {tokens} tok", progress)
    measured = 0
    for p in range(n_passes):
        # rebalances first: they see passes < p only
        if p and p % SGLANG_INTERVAL == 0:
            for pol in ("default", "moeless"):
                new = engines.sglang(pol, history[p - SGLANG_INTERVAL:p], live[("sglang", pol)])
                moved[("sglang", pol)].append(int((new.phy2log != live[("sglang", pol)].phy2log).sum()))
                live[("sglang", pol)] = new
            # the oracle row (a bound, not a policy): SGLang's default algorithm on the passes it will serve
            future = np.stack([np.stack([np.bincount(ids_all[l, idx[q]].ravel(), minlength=E) for l in range(L)])
                               for q in range(p, min(p + SGLANG_INTERVAL, n_passes))])
            new = engines.sglang("default", future, live[("sglang", "oracle")])
            moved[("sglang", "oracle")].append(int((new.phy2log != live[("sglang", "oracle")].phy2log).sum()))
            live[("sglang", "oracle")] = new
            lp_cache.clear()
        if vllm_step >= VLLM_STEP:
            window = history[max(0, p - VLLM_WINDOW):p].sum(0)
            for pol in ("default", "moeless"):
                new = engines.vllm_policy(pol, window, live[("vllm", pol)])
                moved[("vllm", pol)].append(int((new.phy2log != live[("vllm", pol)].phy2log).sum()))
                live[("vllm", pol)] = new
            vllm_step = 0
        vllm_step += 1
        ids = ids_all[:, idx[p]].astype(np.int64)  # [L, N, K]
        counts = np.stack([np.bincount(ids[l].ravel(), minlength=E) for l in range(L)])
        history[p] = counts
        split_cache.clear()
        if p >= WARMUP:
            measured += 1
            static_ep = np.stack([np.bincount(ids[l].ravel() // per_expert, minlength=GPUS) for l in range(L)])
            sums["no EPLB (8 experts per GPU)"] += balance(static_ep).mean()
            for _, label, key in ROWS[1:]:
                engine, pol, mode = key
                pl = live[(engine, pol)]
                if mode == "hash":
                    g = loads_vllm_hash(ids, pl)
                elif mode == "static":
                    g = loads_sglang_static(ids, pl)
                elif mode == "dynamic":
                    g = loads_sglang_dynamic(ids, pl)
                elif mode == "lp":
                    blk = (pol, p // SGLANG_INTERVAL)
                    if blk not in lp_cache:  # the LP of every pass of this interval, one batched solve per layer
                        lo = (p // SGLANG_INTERVAL) * SGLANG_INTERVAL
                        block = np.stack([np.stack([np.bincount(ids_all[l, idx[q]].ravel(), minlength=E)
                                                    for l in range(L)]) for q in range(lo, min(lo + SGLANG_INTERVAL, n_passes))])
                        lp_cache[blk] = (lo, sglang_lp_prob(block, pl))
                    lo, prob = lp_cache[blk]
                    g = loads_sampled(ids, pl, prob[p - lo], rng)
                elif mode == "lp-moeless":  # the plug-in's LP hook: moeless's split as the probabilities
                    rt = _split_once(split_cache, counts, pl)
                    g = loads_sampled(ids, pl, rt / max(int(counts[0].sum()), 1), rng)
                else:  # the exact split, no sampling
                    g = split_gpu_loads(_split_once(split_cache, counts, pl), pl)
                sums[label] += balance(g).mean()
        bar.update(1)
    bar.close()
    out = {}
    for _, label, key in ROWS:
        # the first rebalance leaves the engine's start-up placement (the same for both policies): not counted
        mv = None if key is None else moved[(key[0], key[1])][1:]
        out[label] = (sums[label] / max(measured, 1), float(np.mean(mv)) if mv else None, len(mv) if mv else 0)
    return out


def _bar(total, desc, on):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="pass", disable=not on, leave=False)
    except ImportError:  # pragma: no cover
        class _Null:
            def update(self, n):
                pass

            def close(self):
                pass

        return _Null()


def format_markdown(results: dict, tokens: int, n_passes: int) -> str:
    scen = list(results)
    lines = [f"ESFT routing served as {n_passes} passes of {tokens} tokens (8 GPUs x 9 slots, 64 experts, top-6); "
             f"balance = max / mean GPU pairs per pass and layer, mean over passes {WARMUP}..{n_passes - 1}; "
             "moved = slots whose expert changed per rebalance (of 26 x 72; the rebalances after the first)", "",
             "| engine | policy + per-token choice | " + " | ".join(f"{s}: balance | {s}: moved" for s in scen) + " |",
             "|---|---|" + "---|---|" * len(scen)]
    for engine, label, _ in ROWS:
        cells = []
        for s in scen:
            b, mv, _n = results[s][label]
            cells += [f"{b:.3f}", "-" if mv is None else f"{mv:.0f}"]
        lines.append(f"| {engine} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=ESFT)
    ap.add_argument("--passes", type=int, default=4000)
    ap.add_argument("--tokens", type=int, nargs="+", default=[512])
    ap.add_argument("--scenarios", nargs="+", default=["mixed", "shift"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--quick", action="store_true", help="1,500 passes of 'mixed'; prints, writes nothing")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.root):
        print(f"no ESFT routing at {args.root}: skipped")
        return 0
    try:
        engines = Engines()
    except ImportError as exc:
        print(f"the engines' code is not installed ({exc}); run `make setup` first: skipped")
        return 0
    from moeless.traces import read_esft

    trace = read_esft(args.root)
    if args.quick:
        args.passes, args.scenarios = 1500, ["mixed"]
    tables = [_table_for(trace, engines, args, tokens) for tokens in args.tokens]
    if args.quick:
        return 0
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("# What each engine integration buys (bench/engines_balance.py)\n\n" + "\n\n".join(tables) + "\n")
    print(f"wrote {args.out}")
    return 0


def _table_for(trace, engines, args, tokens: int) -> str:
    """Every scenario at one pass size, printed as it is done; returns its markdown."""
    t0 = time.perf_counter()
    text = format_markdown({s: run_scenario(trace, engines, s, args.passes, tokens, args.seed)
                            for s in args.scenarios}, tokens, args.passes)
    print(text, f"\n({time.perf_counter() - t0:.0f} s)\n", flush=True)
    return text


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    np.seterr(all="ignore")
    sys.exit(main())
