"""The serverless side of the simulator: moeless driven through `moeless.engine.Engine` exactly as the serving loop
drives it, on a simulated clock, with the copies that are not hidden turned into stalls on the critical path.

One iteration, at time t (when its batch is ready and the previous iteration has finished):
1. the pool releases the idle instances whose keep-alive ran out (it bills live instances, idle included);
2. the predictor predicts every layer's loads from the routing of the layer d before (LoadPrediction);
3. for each layer l in order: the engine gives the plan layer l runs with, splits its true counts by the
   policy's time-aware split (`Engine.split`), then, with layer l's true counts and the prediction of layer
   l+d, asks the policy to decide layer l+d (`Engine.observe`) and realises the decision in the pool;
4. every layer is priced by the cost model (the same one the policy predicts with); the copies a decision
   started for layer l were issued when layer l-d started (at the iteration's start for l < d, whose decisions
   were made at the end of the previous iteration), queue on the receiving GPU's host link (PCIe, from host
   memory) or peer link (from a GPU of its link group holding the expert), and layer l waits for its copies
   on its slowest GPU: a stall is only the part of a copy the earlier layers did not hide.

Thinned decode steps: a simulated iteration of weight w stands for w real ones; its decisions and stall happen
once (the first of the w is charged the stall and the cold starts, the other w - 1 run the same plan warm).
`moeless-bound` is the lossless family's bound: the true loads as predictions and free copies (no stall).

This module never plans (the policy does) and never reads the wall clock.
"""
from __future__ import annotations

import numpy as np

from moeless.costmodel import equation2_cost
from moeless.engine import Engine
from moeless.sim.policies import resident_pool


class LinkState:
    """What the copy links carry from one iteration into the next, in seconds relative to the next iteration's
    start: each GPU's host and peer link free times [G], and when the copies prepared for each layer of the
    next iteration are in [L] (-inf: none)."""

    def __init__(self, num_layers: int, gpus: int):
        self.h_free = np.full(gpus, -np.inf)
        self.p_free = np.full(gpus, -np.inf)
        self.ready = np.full(num_layers, -np.inf)


def link_timeline(host, peer, moe, misc, copy_s, distance: int, prep_host=None, prep_peer=None,
                  state: LinkState | None = None) -> np.ndarray:
    """Stalls [L] (seconds) of one iteration's layers walked in order with per-GPU host and peer link queues.

    host, peer int [L, G]: copies decided for layer l d layers ahead, issued when layer l - d starts (at the
    iteration's start for l < d); prep_host, prep_peer int [L, G]: copies of the next iteration's layer l,
    issued when layer l of this one ends (`Engine.prepare`); moe [L]: MoE-layer times; misc [L]: non-MoE time
    per layer; copy_s (host, peer) seconds per copy; state: the links and prepared copies carried between
    iterations (updated). A layer starts when its copies are in: its stall is what is left of them then."""
    host, peer = np.asarray(host), np.asarray(peer)
    L, G = host.shape
    h_s, p_s = copy_s
    st = state if state is not None else LinkState(L, G)
    stall = np.zeros(L)
    prep = prep_host is not None and (np.any(prep_host) or np.any(prep_peer))
    if (h_s == 0 and p_s == 0) or not (host.any() or peer.any() or prep or np.isfinite(st.ready).any()):
        if state is not None:
            span = float(np.sum(moe) + np.sum(misc))
            st.h_free -= span
            st.p_free -= span
            st.ready = np.full(L, -np.inf)
        return stall
    start = np.zeros(L)
    h_free, p_free = st.h_free.copy(), st.p_free.copy()
    ready_next = np.full(L, -np.inf)
    t = 0.0

    def queue(free, n, secs, at):
        q = np.maximum(free, at) + n * secs
        return np.where(n > 0, q, free), (q[n > 0].max() if (n > 0).any() else -np.inf)

    for layer in range(L):
        start[layer] = t
        wait = max(st.ready[layer] - t, 0.0)
        if host[layer].any() or peer[layer].any():
            issue = start[layer - distance] if layer >= distance else 0.0
            h_free, hd = queue(h_free, host[layer], h_s, issue)
            p_free, pd = queue(p_free, peer[layer], p_s, issue)
            wait = max(wait, hd - t, pd - t)
        stall[layer] = wait
        t += wait + moe[layer] + misc[layer]
        if prep and (prep_host[layer].any() or prep_peer[layer].any()):
            h_free, hd = queue(h_free, prep_host[layer], h_s, t)
            p_free, pd = queue(p_free, prep_peer[layer], p_s, t)
            ready_next[layer] = max(hd, pd)
    if state is not None:
        st.h_free, st.p_free, st.ready = h_free - t, p_free - t, ready_next - t
    return stall


class ServerlessRunner:
    """moeless's engine, pool and predictor over the whole run (module docstring)."""

    serverless = True
    lossy = False

    def __init__(self, name: str, policy, prediction, setup, *, bound: bool = False):
        m, cfg = setup.model, setup.config
        self.name, self.policy, self.prediction, self.setup, self.bound = name, policy, prediction, setup, bound
        self.cost, self.model = setup.cost, m
        self.G, self.S, self.L, self.E = cfg.gpus, setup.slots_per_gpu, m.num_moe_layers, m.num_experts
        self.distance = cfg.distance
        self.pool = resident_pool(setup, keep_alive_s=float(cfg.keep_alive_s))
        self.engine = Engine(policy, distance=self.distance, pool=self.pool, prepare_every=cfg.prepare_every,
                             steady=cfg.steady)
        self.engine.start(0.0)  # the homes, loaded before the first batch is ready, like the baselines' weights
        self.initial_loads = int(self.pool.meter.cold_starts)
        self.copy_s = (0.0, 0.0) if bound else (self.pool.cold_start_s, self.pool.peer_cold_start_s)
        self.m_misc = m.dense_params_per_layer * m.bytes_per_param * self.G
        self.copies = [0, 0]  # on-demand cold starts from the host, from a peer
        # prewarm off: copies decided for the next iteration's first d layers (at the end of this one) [d, G]
        self._pending = (np.zeros((self.distance, self.G), dtype=np.int64),
                         np.zeros((self.distance, self.G), dtype=np.int64))
        self.links = LinkState(self.L, self.G)

    def warm(self, loads: np.ndarray, topk, weights: np.ndarray, times: np.ndarray) -> None:
        """History before the window: the predictor sees it, with its token-level routing where the source has
        one (a running deployment's predictor is warm)."""
        top_k = self.model.top_k
        for i in range(len(loads)):
            self.prediction.predict(loads[i], None if topk is None else topk[i], top_k)

    def _copies(self, res, G: int, S: int):
        """Host and peer copies [G] of one decision's cold starts (and the run's tallies)."""
        gpu = res.cold[:, 1] // S
        h = np.bincount(gpu[~res.from_peer], minlength=G)
        pp = np.bincount(gpu[res.from_peer], minlength=G)
        self.copies[0] += int(h.sum())
        self.copies[1] += int(pp.sum())
        return h, pp

    def _step(self, loads, topk, tokens, prefill, t, weight):
        eng, L, G, S, d = self.engine, self.L, self.G, self.S, self.distance
        pred = loads.astype(np.float64) if self.bound else self.prediction.predict(loads, topk, self.model.top_k)
        eng.begin_iteration(tokens, prefill, weight)
        p2l = np.empty((L, G * S), dtype=np.int64)
        st = np.zeros((L, G * S))
        host = np.zeros((L, G), dtype=np.int64)
        peer = np.zeros((L, G), dtype=np.int64)
        prep_host = np.zeros((L, G), dtype=np.int64)
        prep_peer = np.zeros((L, G), dtype=np.int64)
        host[:d], peer[:d] = self._pending  # decided at the end of the previous iteration (prewarm off)
        self._pending = (np.zeros((d, G), dtype=np.int64), np.zeros((d, G), dtype=np.int64))
        n_cold = 0
        if self.bound:  # the bound decides the first d layers from their true loads too (free copies)
            for layer in range(d):
                res = eng.decide(layer, loads[layer], t)
                if res is not None and len(res[1].cold):
                    self._copies(res[1], G, S)  # free copies: counted, no stall
                    n_cold += len(res[1].cold)
        for layer in range(L):
            plan = eng.plan(layer)
            rt = eng.split(layer, loads[layer])
            p2l[layer] = plan.phy2log[0]
            l2p = plan.log2phy[0]
            ok = l2p >= 0
            st[layer, l2p[ok]] = rt[ok]
            res = eng.observe(layer, loads[layer], pred[layer + d] if layer + d < L else None, t)
            if res is not None and len(res[1].cold):
                target, ar = res
                h, pp = self._copies(ar, G, S)
                n_cold += len(ar.cold)
                if target > layer:
                    host[target] += h
                    peer[target] += pp
                else:  # prewarm off: the next iteration's layer, decided at the end of this one
                    self._pending[0][target] += h
                    self._pending[1][target] += pp
            res = eng.prepare(layer, t)
            if res is not None and len(res[1].cold):
                h, pp = self._copies(res[1], G, S)
                n_cold += len(res[1].cold)
                prep_host[layer] += h
                prep_peer[layer] += pp
        eng.end_iteration(t, weight)
        times = self.cost.slot_layer_times(st, p2l, G, float(tokens))
        moe, misc = times.moe_latency, times.misc
        stall = link_timeline(host, peer, moe, misc, self.copy_s, d, prep_host, prep_peer, self.links)
        # Equation 2 counts the layer's replicas: its occupied slots ([L, G*S, 1] reads as [L, E, R] there)
        eq2 = equation2_cost(times, p2l[..., None], self.model.expert_bytes, self.m_misc).sum()
        reps = float((p2l >= 0).sum())
        return moe, misc, stall, eq2, reps, n_cold

    def run_chunk(self, chunk, meter) -> None:
        """Walk a chunk's iterations on this policy's clock (a stalled iteration of weight w > 1 becomes two rows:
        weight 1 with the stall, weight w - 1 without)."""
        rows = {k: [] for k in ("lat", "it", "w", "replicas", "cold", "begin", "live", "prefill")}
        for i in range(len(chunk.tokens)):
            w = float(chunk.weight[i])
            t = max(float(chunk.ready_s[i]), meter.clock)
            self.pool.advance_to(t)
            topk = None if chunk.topk_ids is None else chunk.topk_ids[i]
            moe, misc, stall, eq2, reps, n_cold = self._step(chunk.loads[i], topk, int(chunk.tokens[i]),
                                                             bool(chunk.prefill[i]), t, w)
            live = float(self.pool.live_instances())
            stalled = stall.sum() > 0
            parts = [(moe + stall, 1.0 if (stalled and w > 1) else w, n_cold)]
            if stalled and w > 1:
                parts.append((moe, w - 1.0, 0))
            for lat, wt, c in parts:
                rows["lat"].append(lat)
                rows["it"].append(float((lat + misc).sum()))
                rows["w"].append(wt)
                rows["replicas"].append(reps)
                rows["cold"].append(c)
                rows["begin"].append(t)
                rows["live"].append(live)
                rows["prefill"].append(bool(chunk.prefill[i]))
            meter.result.eq2_byte_s += eq2 * w
            meter.clock = t + float((moe + misc).sum()) * w + float(stall.sum())
        if rows["lat"]:
            meter.result.add(rows["lat"], rows["it"], rows["w"], rows["replicas"], rows["cold"], rows["begin"],
                             prefill=rows["prefill"])
            meter.result.live.append(np.asarray(rows["live"]))

    def finish(self, meter) -> None:
        bill = self.pool.close(meter.clock)
        pr, m, eng = meter.result, self.model, self.engine
        pr.cost_gb_s = bill.gb_seconds
        pr.gpu_seconds = bill.gpu_seconds
        pr.extra["gb_copied"] = (bill.bytes_copied - self.initial_loads * m.expert_bytes) / 1e9
        pr.extra["copies"] = int(bill.cold_starts - self.initial_loads)
        pr.extra["evictions"] = bill.evictions
        pr.extra["warm_starts"] = bill.warm_starts
        pr.extra["initial_loads"] = self.initial_loads
        pr.extra["peer_copies"] = self.copies[1]
        pr.extra["decisions_changed"] = eng.stats.plans_made
        pr.extra["decisions_kept"] = eng.stats.plans_kept
        pr.extra["decisions_skipped"] = eng.stats.plans_skipped
        pr.extra["expected_lifetime_iterations"] = round(eng.horizon(), 2)
        pr.extra["expected_hedge_lifetime_iterations"] = round(eng.horizon(hedges=True), 2)
        pr.accounting = (f"serverless (moeless.pool): {self.initial_loads // self.L} resident home instances per layer "
                         f"plus live replicas (warm, loading or idle) x {m.expert_bytes / 1e9:.3f} GB from load to "
                         f"release ({self.pool.keep_alive_s:g} s keep-alive after last use); GPU-seconds while a "
                         f"GPU hosts a live instance")
