"""The serverless side of the simulated moeless policy: per iteration, decide which plan changes are worth
their cold starts, realise the plan in moeless.pool.FunctionPool on the policy's simulated clock, and turn
the copies that are not hidden into stalls on the critical path.

One iteration, at time t (when its batch is ready and the previous iteration has finished):
1. the pool releases the idle instances whose keep-alive ran out (it bills live instances, idle included);
2. the policy predicts every layer's loads and the planner proposes a plan that reuses the pool's live
   instances (warm or idle); the pool aligns its slots inside each GPU (warm identity: (layer, GPU, expert));
   both the proposal and the live instances as they are keep only the instances their predicted split gives
   pairs (and one instance of every expert): the others leave the plan, idle and still warm until their
   keep-alive runs out, so an instance is billed for its use plus keep-alive only;
3. cost-aware scaling and placement, layer by layer in forward order: the proposal replaces the live layout
   only if H x (predicted MoE-layer time of the live layout - that of the proposal) exceeds the stall its
   copies would cause. H is the expected warm lifetime of a new instance, measured online: the mean number of
   iterations of the same phase (prefill or decode) that the instances this policy cold-started stayed in the
   plan (1 before any was made). Predicted times come from the same cost model and time-aware split as the
   served ones, on the rounded predicted loads;
4. stalls: the copies of layer l are issued when layer l is predicted, d layers ahead (when layer l-d starts;
   at the iteration's start for l < d), and queue on the receiving GPU's host link (PCIe, from host memory) or
   peer link (from a GPU of its link group that holds the expert), at the hardware's bandwidths; layer l
   waits for its copies on its slowest GPU, so a stall is only the part of a copy the earlier layers did not
   hide. The all-to-all's use of the same links is not modelled;
5. the true loads are split (time-aware, lossless) over the chosen plan and priced.

Thinned decode steps: a simulated iteration of weight w stands for w real ones. Its plan change and stall
happen once: the first of the w is charged the stall and the cold starts, the other w - 1 run the same
plan warm (they are emitted as two weighted samples).

The paper-linear cost model has no copy term, so copies take no time there (an infinitely fast link).
Initial instances: the Megatron-LM layout is loaded at t = 0 (before the first batch is ready), as the
serverful baselines' weights are; those loads are billed from t = 0 but not counted as on-demand cold starts.

This module never plans (the planner does) and never reads the wall clock.
"""
from __future__ import annotations

import numpy as np

from moeless import planner as _planner
from moeless.pool import FunctionPool, SimulatedClock
from moeless.costmodel import equation2_cost
from moeless.sim.policies import slot_rank, split_slots


def link_timeline(host, peer, moe, misc, copy_s, distance: int, horizon=None):
    """Walk one iteration's layers in order with per-GPU host and peer link queues.

    host, peer int [C, L, G]: copies each candidate layout of each layer needs per GPU and link; moe [C, L]:
    each candidate's MoE-layer time; misc [L]: non-MoE time per layer; copy_s (host, peer) seconds per copy.
    With `horizon` None, C must be 1 and the layer times are taken as they are. With `horizon` H, layer by
    layer the candidate with the least H * moe + stall is chosen (ties: the lowest index, so candidate 0
    should be the one without copies). Returns (chosen int [L], stall float [L]) in seconds."""
    host, peer = np.asarray(host), np.asarray(peer)
    C, L, G = host.shape
    h_s, p_s = copy_s
    chosen = np.zeros(L, dtype=np.int64)
    stall = np.zeros(L)
    if not (host.any() or peer.any()) or (h_s == 0 and p_s == 0):
        if horizon is not None:
            chosen = np.asarray(moe).argmin(0)
        return chosen, stall
    start = np.zeros(L)
    h_free = np.zeros(G)  # relative to the iteration's start
    p_free = np.zeros(G)
    t = 0.0
    has = (host.reshape(C, L, G) > 0) | (peer > 0)
    any_copy = has.any(axis=(0, 2))
    for layer in range(L):
        start[layer] = t
        c = 0
        if any_copy[layer]:
            issue = start[layer - distance] if layer >= distance else 0.0
            hq = np.maximum(h_free, issue) + host[:, layer] * h_s  # [C, G]
            pq = np.maximum(p_free, issue) + peer[:, layer] * p_s
            done = np.maximum(np.where(host[:, layer] > 0, hq, -np.inf), np.where(peer[:, layer] > 0, pq, -np.inf))
            wait = np.maximum(done.max(1) - t, 0.0)  # [C]
            if horizon is not None:
                c = int(np.argmin(horizon * moe[:, layer] + wait))
            stall[layer] = wait[c]
            h_free = np.where(host[c, layer] > 0, hq[c], h_free)
            p_free = np.where(peer[c, layer] > 0, pq[c], p_free)
        elif horizon is not None:
            c = int(np.argmin(moe[:, layer]))
        chosen[layer] = c
        t += stall[layer] + moe[c, layer] + misc[layer]
    return chosen, stall


def one_per_expert(live_p2l: np.ndarray, num_experts: int, gpus: int, slots_per_gpu: int) -> np.ndarray:
    """phy2log [L, G*S] with exactly one instance of every expert and at most ceil(E / G) experts per GPU,
    reusing the live instances `live_p2l [L, G*S]` as far as a greedy matching allows (experts with the
    fewest live GPUs first, each to its live GPU with the fewest experts so far, else to the GPU with the
    fewest). The expert-parallel layout that reads each expert's weights once, on the fewest GPUs' links:
    what a memory-bound (decode) layer wants, and what a pair-balancing planner does not aim for."""
    L, P = live_p2l.shape
    E, G, S = num_experts, gpus, slots_per_gpu
    cap = -(-E // G)
    has = np.zeros((L, E + 1, G), dtype=bool)
    li, pi = np.nonzero(live_p2l >= 0)
    has[li, live_p2l[li, pi], pi // S] = True
    has = has[:, :E]
    order = np.argsort(has.sum(2), axis=1, kind="stable")
    rows = np.arange(L)
    # one argmin per expert over score = count, + MID off the expert's live GPUs, + BIG on full GPUs: the
    # least loaded live GPU with room if there is one, else the least loaded GPU with room (lowest index on
    # ties, as two masked argmins give)
    MID = E + 1
    BIG = 4 * MID
    off = np.where(has[rows[:, None], order].transpose(1, 0, 2), 0, MID)  # [E, L, G] in processing order
    expert = np.ascontiguousarray(order.T)
    # a GPU's experts so far, + BIG once it is full; the chosen GPU always has room (E <= G * cap), so its
    # score is its count
    score = np.zeros(L * G, dtype=np.int64)
    out = np.full(L * G * S, -1, dtype=np.int64)
    base = rows * G
    for k in range(E):
        idx = base + (score.reshape(L, G) + off[k]).argmin(1)
        c = score[idx]
        out[idx * S + c] = expert[k]
        c += 1
        score[idx] = c + BIG * (c >= cap)
    return out.reshape(L, G * S)


class ServerlessRunner:
    """One serverless policy's function pool, clock and lifetime statistics over the whole run."""

    def __init__(self, setup, policy):
        m, cfg, hw = setup.model, setup.config, setup.hardware
        self.setup, self.policy, self.model, self.cost = setup, policy, m, setup.cost
        self.G, self.S, self.L, self.E = cfg.gpus, setup.slots_per_gpu, m.num_moe_layers, m.num_experts
        self.distance = cfg.distance
        host_s = setup.cost.cold_start_s(from_peer=False)
        peer_s = setup.cost.cold_start_s(from_peer=True)
        # the paper-linear model has no cold-start term: an infinitely fast link keeps the pool's bill
        host_bw = m.expert_bytes / host_s if host_s > 0 else float("inf")
        peer_bw = m.expert_bytes / peer_s if peer_s > 0 else float("inf")
        self.clock = SimulatedClock()
        self.pool = FunctionPool(self.L, self.G, self.S, expert_bytes=m.expert_bytes, link_bandwidth=host_bw,
                                 keep_alive_s=float(cfg.keep_alive_s), clock=self.clock,
                                 peer_bandwidth=peer_bw, link_group=int(getattr(hw, "link_group", 1)))
        self.copy_s = (self.pool.cold_start_s if host_s > 0 else 0.0, self.pool.peer_cold_start_s if peer_s > 0 else 0.0)
        self.m_misc = m.dense_params_per_layer * m.bytes_per_param * self.G
        from moeless import baselines as _baselines

        first = _baselines.static_plan(self.L, self.E, self.G, self.S)
        self.pool.apply(first, 0.0)  # loaded before the first batch is ready, like the baselines' weights
        self.initial_loads = int(self.pool.meter.cold_starts)
        self.made = np.full((self.L, self.G * self.S), -1, dtype=np.int64)  # expert cold-started on demand here
        self.uses = {True: 0.0, False: 0.0}  # prefill / decode iterations such instances spent in the plan
        self.made_count = 0
        self.copies = [0, 0]  # on-demand cold starts from the host, from a peer
        self.live_series: list = []

    def horizon(self, prefill: bool) -> float:
        """Expected warm lifetime, in iterations of this phase, of an instance cold-started now."""
        if self.made_count == 0:
            return 1.0
        return max(1.0, self.uses[bool(prefill)] / self.made_count)

    def _copies(self, p2l: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Host and peer copies [L, G] that realising phy2log rows `p2l [L, G*S]` would start."""
        src = self.pool.copy_sources(np.arange(self.L), p2l).reshape(self.L, self.G, self.S)
        return (src == 1).sum(-1), (src == 2).sum(-1)

    def _trim(self, plan: _planner.Plan, st: np.ndarray, rank: np.ndarray) -> np.ndarray:
        """phy2log of `plan` keeping only the instances its split `st [L, G*S]` (per slot) gives pairs, and
        each expert's first instance (`rank` 0, see policies.slot_rank) when it gets none (every expert keeps
        one resident instance: a cold expert would stall the layer). The others leave the plan: idle, still
        warm until their keep-alive runs out."""
        p2l = plan.phy2log
        L, E = len(p2l), plan.num_experts
        occupied = p2l >= 0
        key = (np.arange(L)[:, None] * E + p2l)[occupied]
        total = np.bincount(key, weights=st[occupied], minlength=L * E).reshape(L, E)
        idle = total[np.arange(L)[:, None], np.maximum(p2l, 0)] == 0
        keep = occupied & ((st > 0) | ((rank == 0) & idle))
        return np.where(keep, p2l, -1)

    def _step(self, loads, topk, tokens, prefill, t):
        pol, L, G, E, S = self.policy, self.L, self.G, self.E, self.S
        pred = pol.predict(loads, topk)
        if pol.warm:
            # candidate 0: every live instance (warm or idle: no copy); 1: the planner's proposal; 2: one
            # instance per expert on as few GPUs' worth of copies as possible (memory-bound layers)
            live = _planner.Plan.from_phy2log(self.pool.live_phy2log(), E, G, S)
            cands = [live, self.pool.align(pol.candidate(pred, live))]
            if S * G >= E:
                p2l1 = one_per_expert(live.phy2log, E, G, S)
                cands.append(self.pool.align(_planner.Plan.from_phy2log(p2l1, E, G, S)))
            C = len(cands)
            rows = [np.arange(L)] + [np.flatnonzero((c.phy2log != live.phy2log).any(1)) for c in cands[1:]]
            both = _planner.Plan.from_phy2log(np.concatenate([c.phy2log[r] for c, r in zip(cands, rows)]), E, G, S)
            # every expert with a positive predicted share is expected to get a pair: ceil, not round
            rounded = np.ceil(np.concatenate([pred[r] for r in rows]) - 1e-9).astype(np.int64)
            rank = slot_rank(both.phy2log, E)
            st_pred, pt = split_slots(both, rounded, self.cost, float(tokens), split=pol.split, rank=rank)
            trimmed = self._trim(both, st_pred, rank)
            p2ls = np.repeat(trimmed[None, :L], C, axis=0)
            moe = np.repeat(pt.moe_latency[None, :L], C, axis=0)
            host = np.zeros((C, L, G), dtype=np.int64)
            peer = np.zeros((C, L, G), dtype=np.int64)
            at = L
            for c in range(1, C):
                r = rows[c]
                p2ls[c, r] = trimmed[at:at + r.size]
                moe[c, r] = pt.moe_latency[at:at + r.size]
                at += r.size
                host[c], peer[c] = self._copies(p2ls[c])
            misc = np.full(L, float(pt.misc[0]))  # non-MoE time depends on the tokens only
            chosen, _ = link_timeline(host, peer, moe, misc, self.copy_s, self.distance,
                                      horizon=self.horizon(prefill))
            plan = _planner.Plan.from_phy2log(p2ls[chosen, np.arange(L)], E, G, S)
        else:
            plan = pol.candidate(pred, None)
        res = self.pool.apply(plan, t)
        _, times = split_slots(plan, loads, self.cost, float(tokens), split=pol.split)
        moe, misc = times.moe_latency, times.misc
        host, peer = self._copies_of(res)
        self.copies[0] += int(host.sum())
        self.copies[1] += int(peer.sum())
        _, stall = link_timeline(host[None], peer[None], moe[None], misc, self.copy_s, self.distance)
        # Equation 2 counts the layer's replicas: its occupied slots ([L, G*S, 1] reads as [L, E, R] there)
        eq2 = equation2_cost(times, plan.phy2log[..., None], self.model.expert_bytes, self.m_misc).sum()
        return plan, res, moe, misc, stall, eq2

    def _copies_of(self, res) -> tuple[np.ndarray, np.ndarray]:
        host = np.zeros((self.L, self.G), dtype=np.int64)
        peer = np.zeros((self.L, self.G), dtype=np.int64)
        if len(res.cold):
            gpu = res.cold[:, 1] // self.S
            np.add.at(host, (res.cold[~res.from_peer, 0], gpu[~res.from_peer]), 1)
            np.add.at(peer, (res.cold[res.from_peer, 0], gpu[res.from_peer]), 1)
        return host, peer

    def run_chunk(self, chunk, meter) -> dict:
        """Walk a chunk's iterations on this policy's clock; returns the rows to record (a stalled iteration of
        weight w > 1 becomes two rows: weight 1 with the stall, weight w - 1 without)."""
        rows = {k: [] for k in ("lat", "it", "w", "replicas", "cold", "begin", "live")}
        eq2_total = 0.0
        for i in range(len(chunk.tokens)):
            w = float(chunk.weight[i])
            t = max(float(chunk.ready_s[i]), meter.clock)
            self.pool.advance_to(t)
            topk = None if chunk.topk_ids is None else chunk.topk_ids[i]
            plan, res, moe, misc, stall, eq2 = self._step(chunk.loads[i], topk, int(chunk.tokens[i]),
                                                          bool(chunk.prefill[i]), t)
            n_cold = len(res.cold)
            # lifetime statistics: instances cold-started on demand, while they stay in the plan
            if n_cold:
                self.made[res.cold[:, 0], res.cold[:, 1]] = plan.phy2log[res.cold[:, 0], res.cold[:, 1]]
                self.made_count += n_cold
            mine = (self.made >= 0) & (self.made == self.pool.expert) & self.pool.in_plan
            self.uses[bool(chunk.prefill[i])] += w * float(mine.sum())
            reps = float(plan.logcnt.sum())
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
            eq2_total += eq2 * w
            meter.clock = t + float((moe + misc).sum()) * w + float(stall.sum())
        out = {k: np.asarray(v) for k, v in rows.items()}
        out["eq2"] = eq2_total
        return out

    def finish(self, meter) -> None:
        bill = self.pool.close(meter.clock)
        pr, m = meter.result, self.model
        pr.cost_gb_s = bill.gb_seconds
        pr.gpu_seconds = bill.gpu_seconds
        pr.extra["evictions"] = bill.evictions
        pr.extra["warm_starts"] = bill.warm_starts
        pr.extra["initial_loads"] = self.initial_loads
        pr.extra["peer_copies"] = self.copies[1]
        pr.extra["expected_lifetime_iterations"] = {"prefill": round(self.horizon(True), 2),
                                                    "decode": round(self.horizon(False), 2)}
        pr.accounting = (f"serverless (moeless.pool): live instances (warm, loading or idle) x "
                         f"{m.expert_bytes / 1e9:.3f} GB from load to release ({self.pool.keep_alive_s:g} s "
                         f"keep-alive after last use; the {self.initial_loads} initial instances from t = 0); "
                         f"GPU-seconds while a GPU hosts a live instance")
