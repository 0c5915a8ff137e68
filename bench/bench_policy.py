"""Planning speed of the final policy (moeless.policy.MoelessPolicy through moeless.engine.Engine), on one core.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest bench/bench_policy.py --benchmark-only   # pytest-benchmark
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_policy.py                           # table, process CPU time
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_policy.py --out bench/results/planning.md   # and a report

Timed, after warming the engine on a few iterations of the same skewed popularity (Dirichlet(0.3) expert shares
per layer, multinomial batches), so that its pool holds replicas:
- one iteration's control plane over all layers: every layer's serve-time split (`Engine.split`), its decision
  d = 1 layers ahead (`Engine.observe`) and its decision for the next iteration (`Engine.prepare`: every 4th
  iteration per layer, with the robust alternatives), realised in the pool on a clock that moves at every layer
  (as the serving loop's: each decision advances the pool's meter): Mixtral-8x7B (32 layers, 8 experts,
  8 GPUs x 2 slots, A6000 roofline) and DeepSeek-V3 (58 layers, 256 experts, 64 GPUs x 8 slots, H200
  roofline), prefill-sized (4,096 / 8,192 tokens) and decode-sized (64 tokens) batches. The table splits it
  into the planning (the decisions, `observe` + `prepare` + `end_iteration`: the issue's per-iteration
  target) and the serve-time splits (the data plane's, timed by their own target below): the process CPU time
  of the whole iteration, minus the splits' time measured inside it (perf_counter around each split; on an
  otherwise idle core wall and CPU time agree); beside it the decisions per iteration (`observe`'s and
  `prepare`'s that reached the engine: plans kept plus plans changed plus decisions skipped because their inputs
  had not moved, Engine's steady; of them changed, and skipped) and the planning time per
  decision (planning per iteration / decisions: what one more or one fewer decision per layer costs);
- the serve-time split of one layer (`Engine.split`: the policy's time-aware split), 64 experts on 8 GPUs x 9
  slots, 512 tokens top-6;
- where a decision's time goes (`_floors`, with Engine(steady=False): every decision asked): of the planning,
  the compiled decisions (`_kernels.decide_live` and `_kernels.robust_pick`, timed around each call inside the
  iteration; the rest is Python around them), and the floor of deciding by time (one split per layer of the
  iteration's loads on its live plan, by one local search: the first step of every decision).
The table is repeated for Engine(prepare_every=1, the default, and 4; and steady=False: every decision asked)
and after 6 and 30 warm-up iterations (the first iterations create most replicas; by 30 the engines mostly
keep their plans: the steady state).
Targets (issue 8): planning 0.5 ms and 5 ms per iteration, 50 us per split. Benchmarks measure; they never
assert a time.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from moeless._jit import HAVE_NUMBA  # noqa: E402
from moeless.costmodel import RooflineCost  # noqa: E402
from moeless.engine import Engine  # noqa: E402
from moeless.policy import MoelessPolicy  # noqa: E402
from moeless.specs import hardware_spec, model_spec  # noqa: E402

CASES = {  # name: (model, hardware, layers, experts, top_k, gpus, slots_per_gpu)
    "mixtral": ("mixtral-8x7b", "a6000", 32, 8, 2, 8, 2),
    "deepseek_v3": ("deepseek-v3", "h200", 58, 256, 8, 64, 8),
}
TOKENS = {"mixtral": {"prefill": 4096, "decode": 64}, "deepseek_v3": {"prefill": 8192, "decode": 64}}
TARGETS = {"mixtral": "0.5 ms", "deepseek_v3": "5 ms"}  # planning per iteration (issue 8)


class Driver:
    """An engine over the case's policy, fed batches of one skewed popularity, one iteration per call; its clock
    moves on at every layer (ITERATION_S per iteration), as the serving loop's does, so that the pool's meter
    and releases (FunctionPool.advance_to, at every decision) are timed as serving pays them."""

    ITERATION_S = 0.05

    def __init__(self, case: str, phase: str, seed: int = 0, prepare_every: int = 1, steady: bool = True):
        name, hw, L, E, K, G, S = CASES[case]
        cost = RooflineCost(model_spec(name), hardware_spec(hw))
        self.L, self.E, self.K = L, E, K
        self.tokens = TOKENS[case][phase]
        self.engine = Engine(MoelessPolicy(L, E, G, S, cost), keep_alive_s=60.0, prepare_every=prepare_every,
                             steady=steady)
        self.engine.start(0.0)
        rng = np.random.default_rng(seed)
        pop = rng.dirichlet(np.full(E, 0.3), size=L)
        self.batches = [np.stack([rng.multinomial(self.tokens * K, p) for p in pop]) for _ in range(8)]
        self.i, self.t = 0, 0.0
        self.split_s = 0.0  # wall seconds spent in Engine.split so far

    def iteration(self) -> None:
        """One iteration's control plane: every layer's split, decision d ahead and next-iteration decision."""
        eng, loads = self.engine, self.batches[self.i % len(self.batches)]
        nxt = self.batches[(self.i + 1) % len(self.batches)]
        eng.begin_iteration(self.tokens)
        clock = time.perf_counter
        for layer in range(self.L):
            t0 = clock()
            eng.split(layer, loads[layer])
            self.split_s += clock() - t0
            now = self.t + self.ITERATION_S * layer / self.L  # (a clock that moves per layer, as moeless.serve's)
            eng.observe(layer, loads[layer], nxt[layer + 1] if layer + 1 < self.L else None, now)
            eng.prepare(layer, now)
        eng.end_iteration(now)
        self.i += 1
        self.t += self.ITERATION_S


def _info(benchmark, **kw):
    benchmark.extra_info.update(kw, numpy=np.__version__, python=platform.python_version(), numba=HAVE_NUMBA,
                                threads=os.environ.get("OMP_NUM_THREADS", "unset"))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_decisions_per_iteration(benchmark, case, phase):
    d = Driver(case, phase)
    for _ in range(6):
        d.iteration()  # warm: replicas live, numba compiled
    _info(benchmark, case=case, phase=phase, layers=d.L)
    benchmark.pedantic(d.iteration, rounds=8, iterations=1)


def test_split_one_layer(benchmark):
    split_driver = _split_setup()
    _info(benchmark, experts=64, gpus=8, slots=9)
    benchmark(split_driver)


@pytest.mark.parametrize("steady", [False, True])
def test_iteration_parts_counts_every_decision(steady):
    """The table's decision count against the protocol's: per iteration the decision d = 1 layers ahead of every
    layer whose target is in this iteration (L - 1 of them) and, with prepare_every=1, one next-iteration decision
    per layer (L): every one reaches the engine, as every layer of the driver's batches has pairs; asked of the
    policy or, with steady, skipped."""
    d = Driver("mixtral", "decode", steady=steady)
    d.iteration()
    whole, splits, decisions, changed, skipped = _iteration_parts(d, 2)
    assert decisions == (d.L - 1) + d.L
    assert 0 <= changed <= decisions - skipped
    assert skipped == 0 if not steady else 0 <= skipped <= decisions
    assert whole > 0 and splits > 0


def test_floors_time_every_decision():
    """The breakdown's compiled-decision column intercepts every decision the engine makes (a changed call path
    would leave it silently at zero), and restores the kernels after."""
    from moeless.policy import _kernels

    before = _kernels.decide_live
    d = Driver("mixtral", "decode", steady=False)  # (every decision asked: the table's setting)
    d.iteration()
    kernels, floor, plan, decisions, calls = _floors(d, 2)
    assert _kernels.decide_live is before
    assert calls == round(decisions * 4) == 4 * ((d.L - 1) + d.L)  # (n + 2 iterations, see _floors)
    assert kernels > 0 and floor > 0 and plan > 0


def _split_setup():
    cost = RooflineCost(model_spec("deepseek-v2-lite"), hardware_spec("h100"))
    eng = Engine(MoelessPolicy(1, 64, 8, 9, cost), keep_alive_s=60.0)
    eng.start(0.0)
    rng = np.random.default_rng(1)
    pop = rng.dirichlet(np.full(64, 0.3))
    loads = [rng.multinomial(512 * 6, pop) for _ in range(8)]
    for i in range(8):  # replicas created for this popularity
        eng.begin_iteration(512)
        eng.split(0, loads[i])
        eng.observe(0, loads[i], None, float(i))
        eng.prepare(0, float(i))
        eng.end_iteration(float(i))
    state = {"i": 0}

    def one():
        eng.split(0, loads[state["i"] % 8])
        state["i"] += 1

    return one


def _cpu_per_call(fn, n: int) -> float:
    fn()
    c = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - c) / n


def _iteration_parts(d: Driver, n: int) -> tuple[float, float, float, float, float]:
    """(whole iteration, its splits) seconds per iteration over n iterations (see the module docstring), and the
    decisions per iteration (asked of the policy or skipped by Engine's steady), of which changed a plan, and
    of which were skipped."""
    d.iteration()
    st = d.engine.stats
    made, kept, skipped = st.plans_made, st.plans_kept, st.plans_skipped
    before = d.split_s
    s = _cpu_per_call(d.iteration, n)
    changed = (st.plans_made - made) / (n + 1)
    skipped = (st.plans_skipped - skipped) / (n + 1)
    return (s, (d.split_s - before) / (n + 1), changed + (st.plans_kept - kept) / (n + 1) + skipped, changed,
            skipped)


def _warm_drivers(warmup: int, prepare_every: int = 1, steady: bool = True):
    """(case, phase, Driver) of every case and batch, each run `warmup` iterations first."""
    for case in CASES:
        for phase in ("prefill", "decode"):
            d = Driver(case, phase, prepare_every=prepare_every, steady=steady)
            for _ in range(warmup):
                d.iteration()
            yield case, phase, d


def _table(prepare_every: int, rounds: int, warmup: int = 6, steady: bool = True) -> list[str]:
    rows = ["| case | batch | planning per iteration (all layers) | per layer | target | decisions per iteration "
            "(changed a plan; skipped) | per decision | + serve-time splits | whole control plane |",
            "|---|---|---|---|---|---|---|---|---|"]
    for case, phase, d in _warm_drivers(warmup, prepare_every, steady):
        whole, splits, decisions, changed, skipped = _iteration_parts(d, rounds)
        plan = whole - splits
        target = TARGETS[case]
        per = f"{plan / decisions * 1e6:.0f} us" if decisions else "-"
        rows.append(f"| {case} | {phase} ({d.tokens} tokens) | {plan * 1e3:.2f} ms | {plan / d.L * 1e6:.0f} us "
                    f"| {target} | {decisions:.1f} ({changed:.1f}; {skipped:.1f}) | {per} "
                    f"| {splits * 1e3:.2f} ms ({splits / d.L * 1e6:.0f} us per layer) | {whole * 1e3:.2f} ms |")
    return rows


def _floors(d: Driver, n: int) -> tuple[float, float, float, float, int]:
    """Where the planning time goes, per iteration over n iterations: (the compiled decisions alone: the
    policy's decision kernels `_kernels.decide_live` and `_kernels.robust_pick`, timed around each call; the floor
    of deciding by time: one split per layer, by one local search (the decision's first step, `_split_lists` with
    one_search), of the iteration's loads on the layer's live plan; the whole planning, as in the table; the
    decisions per iteration (as _iteration_parts); the calls of `_kernels.decide_live` timed, in all)."""
    from moeless.policy import _kernels

    pol, eng = d.engine.policy, d.engine
    spent = [0.0, 0]
    saved = {name: getattr(_kernels, name) for name in ("decide_live", "robust_pick")}

    def timed(fn):
        def call(*a):
            t0 = time.perf_counter()
            try:
                return fn(*a)
            finally:
                spent[0] += time.perf_counter() - t0
                spent[1] += fn is saved["decide_live"]
        return call

    for name, fn in saved.items():
        setattr(_kernels, name, timed(fn))
    try:
        whole, splits, decisions, _, _ = _iteration_parts(d, n)
        kernels = spent[0] / (n + 2)  # (_iteration_parts runs n + 2 iterations, the last n + 1 timed)
    finally:
        for name, fn in saved.items():
            setattr(_kernels, name, fn)
    loads = d.batches[d.i % len(d.batches)]
    out = np.empty((d.E, pol.G))
    est = np.zeros(1, dtype=np.bool_)
    layouts = [pol.dense(eng.plan(layer)) for layer in range(d.L)]
    W = [loads[layer].astype(np.float64) for layer in range(d.L)]
    for lay in layouts:
        lay.lists  # (built once per plan, outside the timing)

    def floor_once():
        for layer, lay in enumerate(layouts):
            _kernels._split_lists(W[layer], lay.has, *lay.lists, lay.primary, pol.profile, pol.max_moves, out, True,
                                  est)

    floor = _cpu_per_call(floor_once, n)
    return kernels, floor, whole - splits, decisions, spent[1]


def _floor_table(rounds: int, warmup: int) -> list[str]:
    rows = ["| case | batch | planning per iteration | of it, the compiled decisions | floor: one one-search split per "
            "layer | target |", "|---|---|---|---|---|---|"]
    for case, phase, d in _warm_drivers(warmup, steady=False):
        kernels, floor, plan, _, _ = _floors(d, rounds)
        target = TARGETS[case]
        rows.append(f"| {case} | {phase} ({d.tokens} tokens) | {plan * 1e3:.2f} ms | {kernels * 1e3:.2f} ms "
                    f"({kernels / plan * 100:.0f}%) | {floor * 1e3:.2f} ms ({floor / d.L * 1e6:.0f} us per layer) "
                    f"| {target} |")
    return rows


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prepare-every", type=int, nargs="+", default=[1, 4],
                    help="Engine(prepare_every=...) values to measure, one table each (default: 1 4)")
    ap.add_argument("--rounds", type=int, default=16, help="iterations timed per case (default: %(default)s)")
    ap.add_argument("--warmup", type=int, nargs="+", default=[6, 30],
                    help="iterations run before the timed ones, one table each (default: 6 30; the first iterations "
                         "create most replicas, later ones mostly keep their plans: the steady state)")
    ap.add_argument("--out", help="also write the tables to this Markdown file")
    args = ap.parse_args(argv)
    if any(k < 1 for k in args.prepare_every + args.warmup) or args.rounds < 1:
        ap.error("--prepare-every, --rounds and --warmup take integers >= 1")
    import numba

    head = (f"numba {numba.__version__ if HAVE_NUMBA else '(not installed: plain Python)'}, numpy {np.__version__}, "
            f"Python {platform.python_version()}; {_cpu_name()}, one core (OMP_NUM_THREADS="
            f"{os.environ.get('OMP_NUM_THREADS', 'unset')}); {datetime.date.today().isoformat()}")
    lines = [head, ""]
    print(head)
    configs = [(k, True) for k in args.prepare_every] + [(1, False)]
    for w in args.warmup:
        for k, steady in configs:
            title = (f"Engine(prepare_every={k}" + (")" if steady else ", steady=False)")
                     + (" (the default)" if k == 1 and steady else "")
                     + f", after {w} warm-up iterations: process CPU time per iteration, mean of {args.rounds}")
            rows = _table(k, args.rounds, w, steady)
            print("\n" + title + "\n" + "\n".join(rows))
            lines += [f"### {title}", ""] + rows + [""]
    title = (f"Where a decision's time goes, Engine(steady=False) (every decision asked), after {max(args.warmup)} "
             f"warm-up iterations (the compiled decisions timed inside the iteration; the floor timed apart, mean "
             f"of {args.rounds})")
    rows = _floor_table(args.rounds, max(args.warmup))
    print("\n" + title + "\n" + "\n".join(rows))
    lines += [f"### {title}", ""] + rows + [""]
    s = _cpu_per_call(_split_setup(), 200)
    split = f"Serve-time split, one layer, 64 experts on 8 GPUs x 9 slots: {s * 1e6:.1f} us (target 50 us)."
    print("\n" + split)
    lines.append(split)
    if args.out:
        from moeless.outputs import write_text

        write_text(args.out, "# Planning speed (bench/bench_policy.py)\n\n" + "\n".join(lines) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
