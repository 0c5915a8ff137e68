"""Expert placement: which physical slot holds each replica (Algorithm 2 with capacity, anti-affinity, warm
reuse, bridging and hedging), for every layer at once.

`place_replicas(loads, logcnt, G, S, previous=...)` and `plan_layers` (scale, then place) return a `Plan`. One
placement (`_place_arrays`) runs as named stages over one `_PlacementState` (flat [L*P] / [L*G] arrays, so every
update is a 1-D gather or scatter):

1. `_reuse_warm`: keep the previous slot of each replica, largest loads first, up to the GPU's limit;
2. `_chain_ring` (hedge, cold): the replicated experts form a chain around the ring of GPUs;
3. `_lpt`: longest processing time first onto the least-loaded GPU with room that lacks the expert;
4. `_bridge`: heavy GPUs' excess settled against light GPUs' deficit with extra replicas in free slots;
5. `_hedge_ring` (hedge): the slots still free hold replicas of neighbouring GPUs' heaviest experts.

`_place` chooses between the warm and a cold placement per layer; a cold one is renumbered (`_relabel_to`: GPUs
matched to the previous plan's, then `align_slots` inside each GPU) to keep as many instances in place as it can.
See the package docstring (moeless.planner) for why each stage exists and what it measured. It never splits
pairs (moeless.planner.split does), never prices time (moeless.policy does) and never imports torch.
"""
from __future__ import annotations

import numpy as np

from moeless.planner.plan import (Plan, _check_budget, _check_loads, _derive_log2phy, _positive_int, _starts,
                                  _take_rows, align_slots)
from moeless.planner.scaling import _replica_cap, replicate_minmax, scale_ideal, scale_literal
from moeless.planner import split as _split

# Bridging rounds that pair GPUs one to one before the transport on a line takes over (see _bridge).
_LINE_ROUNDS = 4

# Proposal rounds of the GPU matching in _relabel_to (each round matches most of the rest; what is left is
# matched in order). More rounds keep a few more instances in place, never change the balance.
_RELABEL_ROUNDS = 4


def _slack(reuse_slack) -> float:
    if not (isinstance(reuse_slack, (int, float, np.floating)) and reuse_slack >= 0):
        raise ValueError(f"reuse_slack must be a number >= 0 (inf allowed), got {reuse_slack!r}")
    return float(reuse_slack)


def _check_previous(previous, L: int, E: int, G: int, S: int) -> None:
    if previous is None:
        return
    if not isinstance(previous, Plan):
        raise ValueError(f"previous must be a Plan or None, got {type(previous).__name__}")
    if (previous.num_layers, previous.num_experts, previous.gpus, previous.slots_per_gpu) != (L, E, G, S):
        raise ValueError(
            f"previous has (layers, experts, gpus, slots_per_gpu) = ({previous.num_layers}, "
            f"{previous.num_experts}, {previous.gpus}, {previous.slots_per_gpu}), expected ({L}, {E}, {G}, {S})"
        )


def place_replicas(
    loads,
    logcnt,
    gpus: int,
    slots_per_gpu: int,
    *,
    previous: Plan | None = None,
    tolerance: float = 0.01,
    bridge: bool = True,
    max_replicas=None,
    reuse_slack: float = 0.05,
    hedge: bool = False,
) -> Plan:
    """Place logcnt[l, e] replicas of each expert (each carrying loads[l, e] / logcnt[l, e]) on G x S slots:
    warm reuse from `previous`, (if `hedge`, cold) the replicated experts chained around the ring of GPUs,
    then longest-load-first onto the least-loaded GPU with a free slot that does not hold the expert yet, then
    (if `bridge`) bridging replicas in the remaining free slots, (if `hedge`) ring replicas in what is left.
    See the module docstring. Deterministic."""
    W = _check_loads(loads)
    L, E = W.shape
    G = _positive_int("gpus", gpus)
    S = _positive_int("slots_per_gpu", slots_per_gpu)
    _check_budget(E, G, S)
    R = np.array(logcnt, dtype=np.int64)
    if R.shape != (L, E):
        raise ValueError(f"logcnt must have shape [{L}, {E}], got {R.shape}")
    if (R < 1).any():
        raise ValueError("logcnt must be >= 1 for every expert")
    if (R.sum(1) > G * S).any():
        raise ValueError(f"logcnt asks for more replicas than the {G * S} slots of a layer")
    _check_previous(previous, L, E, G, S)
    cap = _replica_cap(max_replicas, G * S)
    return _place(W, R, G, S, previous, float(tolerance), bool(bridge), cap, _slack(reuse_slack), bool(hedge))


class _Items:
    """The replicas of every layer as items, sorted by per-replica load descending (ties: lower expert id,
    then lower rank), padded to P = G*S per layer: e (-1 pad), r, w [L, P]; n [L] items per layer."""

    __slots__ = ("e", "r", "w", "n")

    def __init__(self, W: np.ndarray, R: np.ndarray, P: int):
        L, E = W.shape
        per = W / R
        order = np.argsort(-per, axis=1, kind="stable")
        flat = (order + np.arange(L)[:, None] * E).ravel()  # flat (layer, expert) ids in item order
        Rf = R.ravel()[flat]
        src = np.repeat(flat, Rf)  # item -> flat (layer, expert)
        k = np.arange(src.size)
        n = R.sum(1)
        at = src // E * P + k - np.repeat(np.cumsum(n) - n, n)  # flat (layer, position) of each item
        self.e = np.full(L * P, -1, dtype=np.int64)
        self.r = np.zeros(L * P, dtype=np.int64)
        self.w = np.zeros(L * P)
        self.e[at] = src % E
        self.r[at] = k - np.repeat(np.cumsum(Rf) - Rf, Rf)
        self.w[at] = per.ravel()[src]
        self.e, self.r, self.w = self.e.reshape(L, P), self.r.reshape(L, P), self.w.reshape(L, P)
        self.n = n

    def take(self, rows: np.ndarray) -> "_Items":
        out = object.__new__(_Items)
        out.e, out.r, out.w, out.n = self.e[rows], self.r[rows], self.w[rows], self.n[rows]
        return out


def _group_rank(key: np.ndarray) -> np.ndarray:
    """Rank of each entry among the entries with the same key, in array order (0 for the first)."""
    o = np.argsort(key, kind="stable")
    ks = key[o]
    start = _starts(ks)
    first = np.maximum.accumulate(np.where(start, np.arange(ks.size), 0))
    rank = np.empty_like(o)
    rank[o] = np.arange(ks.size) - first
    return rank



class _PlacementState:
    """Everything the placement stages read and update, flat: slot arrays [L*P], (layer, GPU) arrays [L*G]
    (`room2`, `gl2` are their [L, G] views), (layer, GPU, expert) flags [L*G*E], the replicas per (layer,
    expert) [L*E], and the queue of replicas still to place (item order)."""

    def __init__(self, W, R, G, S, tolerance, cap, items):
        L, E = W.shape
        P = G * S
        self.W, self.R, self.G, self.S, self.L, self.E, self.P, self.cap = W, R, G, S, L, E, P, cap
        self.rows = np.arange(L)
        self.ideal = W.sum(1) / G  # [L]
        self.limit = self.ideal * (1.0 + tolerance) + 1e-9 * np.maximum(self.ideal, 1.0)
        self.it = items
        self.valid = items.e >= 0
        self.e_safe = np.maximum(items.e, 0)
        self.p2lf = np.full(L * P, -1, dtype=np.int64)  # expert of each slot
        self.slf = np.zeros(L * P)  # planned load of each slot
        self.hasf = np.zeros(L * G * E, dtype=bool)  # hasf[(l*G + g)*E + e]: GPU g of layer l holds a replica of e
        self.q_e, self.q_w, self.n_todo = items.e.ravel(), items.w.ravel(), items.n
        self.fo = None  # per GPU, its free slots first, ascending (None: every slot free, the next is g*S + nxt)
        self.set_gpus(np.full(L * G, S, dtype=np.int64), np.zeros(L * G))
        self.nxt = np.zeros(L * G, dtype=np.int64)  # slots taken so far on (layer, GPU) after stage 1
        self.cntf = R.ravel().copy()  # replicas per (layer, expert), bridges and hedges included

    def set_gpus(self, room, gl):
        """Free slots and planned load per (layer, GPU), flat, with their [L, G] views."""
        self.room, self.gl = room, gl
        self.room2, self.gl2 = room.reshape(self.L, self.G), gl.reshape(self.L, self.G)

    def requeue(self, todo):
        """The queue becomes the items of `todo [L, P]`, still in item order."""
        qo = np.argsort(~todo, axis=1, kind="stable")
        self.q_e = _take_rows(self.it.e, qo).ravel()
        self.q_w = _take_rows(self.it.w, qo).ravel()
        self.n_todo = todo.sum(1)

    def next_slot(self, lg):
        """Flat slot ids of the next free slot of the flat (layer, GPU) ids `lg` (tg * S = l*P + g*S)."""
        return lg * self.S + (self.nxt[lg] if self.fo is None else self.fo[lg * self.S + self.nxt[lg]])


def _place_arrays(W, R, G, S, previous, tolerance, bridge, cap, items=None, hedge=False):
    """phy2log [L, P] and planned GPU loads [L, G] of one placement (warm from `previous` if given)."""
    st = _PlacementState(W, R, G, S, tolerance, cap, _Items(W, R, G * S) if items is None else items)
    if previous is not None:
        _reuse_warm(st, previous)
    elif hedge and G > 1:
        _chain_ring(st)
    _lpt(st)
    if bridge:
        _bridge(st)
    if hedge and G > 1:
        _hedge_ring(st)
    return st.p2lf.reshape(st.L, st.P), st.gl2


def _reuse_warm(st, previous):
    """Stage 1: keep the previous slot of (e, r), largest loads first, up to the GPU's limit."""
    L, E, G, S, P, R, rows, limit = st.L, st.E, st.G, st.S, st.P, st.R, st.rows, st.limit
    it, it_e, it_w, valid, e_safe = st.it, st.it.e, st.it.w, st.valid, st.e_safe
    p2lf, slf, hasf = st.p2lf, st.slf, st.hasf

    le = rows[:, None] * E + e_safe  # flat (layer, expert) ids: 1-D gathers instead of 2-D/3-D fancy indexing
    in_prev = valid & (it.r < previous.logcnt.reshape(-1)[le])
    Rp = previous.max_replicas
    prev_slot = np.where(in_prev, previous.log2phy.reshape(-1)[le * Rp + np.minimum(it.r, Rp - 1)], -1)
    prev_gpu = np.where(prev_slot >= 0, prev_slot // S, G)  # G: not a candidate
    # previous duplicates of an expert on one GPU (unavoidable then) are not kept twice: an expert's items
    # are adjacent in item order, so comparing with the few items before suffices
    # log2phy lists slots in ascending order, so an expert's previous GPUs are non-decreasing in rank and
    # a duplicate follows its twin directly: one comparison (k = 1) then finds them all; a hand-made
    # previous plan out of order gets the general loop
    same_e = it_e[:, 1:] == it_e[:, :-1]
    k_max = 2 if not (same_e & (prev_gpu[:, 1:] < prev_gpu[:, :-1])).any() else int(R.max()) if R.size else 1
    for k in range(1, k_max):
        dup = (prev_gpu[:, k:] < G) & (prev_gpu[:, k:] == prev_gpu[:, :-k]) & (it_e[:, k:] == it_e[:, :-k])
        prev_gpu[:, k:][dup] = G
    # per (layer, GPU), in item order (load descending): the prefix whose cumulated load stays within the
    # limit is kept. Largest first: what then moves is small, which LPT packs well (keeping the smallest
    # first keeps ~1% more instances but leaves the big ones nowhere to go: balance 1.11 vs 1.00 on ESFT,
    # 64-token batches).
    seg = (rows[:, None] * (G + 1) + prev_gpu).ravel()
    order = np.argsort(seg.astype(np.int16 if L * (G + 1) < 1 << 15 else np.int64), kind="stable")  # radix sort
    segk = seg[order]
    wk = it_w.ravel()[order]
    csum = np.cumsum(wk)
    seg_start = _starts(segk)
    base = np.maximum.accumulate(np.where(seg_start, csum - wk, -np.inf))
    keep_sorted = (prev_gpu.ravel()[order] < G) & (csum - base <= limit[segk // (G + 1)])
    kept = order[keep_sorted]  # flat (layer, item) ids
    kl = kept // P
    ks = kl * P + prev_slot.ravel()[kept]
    ke = it_e.ravel()[kept]
    p2lf[ks] = ke
    slf[ks] = it_w.ravel()[kept]
    hasf[(ks // S) * E + ke] = True  # ks // S = l*G + g
    placed = np.zeros(L * P, dtype=bool)
    placed[kept] = True
    todo = valid & ~placed.reshape(L, P)
    st.requeue(todo)
    free = (p2lf < 0).reshape(L * G, S)
    st.fo = np.argsort(~free, axis=1, kind="stable").ravel()  # per GPU: free slots first, ascending
    st.set_gpus(free.sum(1), np.bincount(np.repeat(np.arange(L * G), S), weights=slf, minlength=L * G))


def _chain_ring(st):
    """Stage 1b (hedge, cold): the replicated experts form a chain around the ring of GPUs.

    The k-th replicated expert (item order) takes GPUs s_k, s_k + 1, .., s_k + R_k - 1 (mod G) with
    s_k = sum_{i<k} (R_i - 1): consecutive experts share a GPU, so the replicas connect GPU g to g + 1 all
    around the ring instead of pairing GPUs off (LPT puts the two replicas of each hot expert on the two
    lightest GPUs: disjoint pairs, ~2 components of 8 GPUs on ESFT). The serve-time split moves up to an
    expert's whole true load across each link, so a prediction error on one GPU spreads over all of them.
    Layers where the chain would overfill a GPU (or wrap onto itself) keep plain LPT."""
    L, E, G, S, R, rows = st.L, st.E, st.G, st.S, st.R, st.rows
    it, it_e, it_w, valid, e_safe = st.it, st.it.e, st.it.w, st.valid, st.e_safe
    Ri = np.where(valid, R[rows[:, None], e_safe], 1)
    rep = Ri >= 2
    if not rep.any():
        return
    q = np.cumsum(rep, 1) - 1
    k = np.cumsum(rep & (it.r == 0), 1) - 1
    cg = (q - k) % G
    li, ii = np.nonzero(rep)
    cnt = np.bincount(li * G + cg[li, ii], minlength=L * G).reshape(L, G)
    use = (cnt.max(1) <= S) & (Ri.max(1, where=rep, initial=1) <= G)
    sel = use[li]
    li, ii = li[sel], ii[sel]
    if not li.size:
        return
    tg = li * G + cg[li, ii]
    ts = tg * S + _group_rank(tg)
    te = it_e[li, ii]
    tw = it_w[li, ii]
    st.p2lf[ts] = te
    st.slf[ts] = tw
    st.hasf[tg * E + te] = True
    n = np.bincount(tg, minlength=L * G)
    st.nxt += n
    st.room -= n
    st.gl += np.bincount(tg, weights=tw, minlength=L * G)
    todo = valid.copy()
    todo[li, ii] = False
    st.requeue(todo)


def _lpt(st):
    """Stage 2: longest processing time first onto the least-loaded GPU with room.

    LPT in rounds: the next items go one each to the GPUs in ascending load order, as far as exact LPT would do
    the same (item j's GPU is still the lightest when j comes: its load <= every earlier GPU of the round plus
    the item it took). Ties go to the GPU not yet used in the round, so zero-load experts are dealt
    round-robin. A round is ~25 numpy calls for up to G items instead of ~20 per item. Each round works on the
    layers that still have items only (they finish at different rounds)."""
    L, E, G, S, P, rows = st.L, st.E, st.G, st.S, st.P, st.rows
    valid, it_w, q_e, q_w, n_todo = st.valid, st.it.w, st.q_e, st.q_w, st.n_todo
    p2lf, slf, hasf, room, gl, room2, gl2, nxt = st.p2lf, st.slf, st.hasf, st.room, st.gl, st.room2, st.gl2, st.nxt
    cols = np.arange(G)
    ptr = np.zeros(L, dtype=np.int64)
    any_zero = bool((valid & (it_w == 0)).any())
    al = rows
    while True:
        al = al[ptr[al] < n_todo[al]]
        if al.size == 0:
            break
        pa = ptr[al]
        room_a = room2[al]
        gl_a = gl2[al]
        key = np.where(room_a > 0, gl_a, np.inf)
        qa = (al * P)[:, None]
        if any_zero:
            # once only zero-load items are left they go to the heaviest GPUs with room: they cost nothing
            # there, and the light GPUs keep their free slots for bridging
            zero = q_w[al * P + np.minimum(pa, P - 1)] == 0
            og = np.argsort(np.where(zero[:, None], np.where(room_a > 0, -gl_a, np.inf), key), axis=1,
                            kind="stable")
        else:
            og = np.argsort(key, axis=1, kind="stable")
        ls = _take_rows(key, og)
        gid = (al * G)[:, None] + og  # flat (layer, GPU) ids, lightest first
        j = pa[:, None] + cols
        inq = j < n_todo[al, None]
        qi = qa + np.minimum(j, P - 1)
        e = q_e[qi]
        w = q_w[qi]
        reach = np.minimum.accumulate(ls + w, axis=1)
        ok = inq & (ls < np.inf) & ~hasf[gid * E + e]
        if any_zero:
            ok[:, 1:] &= (ls[:, 1:] <= reach[:, :-1]) | zero[:, None]
        else:
            ok[:, 1:] &= ls[:, 1:] <= reach[:, :-1]
        m = np.cumprod(ok, axis=1).sum(1)
        stuck = np.flatnonzero(m == 0)
        if stuck.size:  # the lightest GPU already holds the next item's expert: one item, slow path
            ks = key[stuck]
            has_e = hasf[(al[stuck, None] * G + cols) * E + e[stuck, :1]]
            kb = np.where(has_e, np.inf, ks)
            g0 = kb.argmin(1)
            dup = kb[np.arange(stuck.size), g0] == np.inf
            g0[dup] = ks[dup].argmin(1)  # every GPU with room holds e: a duplicate is unavoidable
            gid[stuck, 0] = al[stuck] * G + g0
            m[stuck] = 1
        k = np.flatnonzero(cols < m[:, None])
        tg = gid.ravel()[k]
        te = e.ravel()[k]
        tw = w.ravel()[k]
        ts = st.next_slot(tg)
        nxt[tg] += 1
        room[tg] -= 1
        p2lf[ts] = te
        slf[ts] = tw
        gl[tg] += tw
        hasf[tg * E + te] = True
        ptr[al] = pa + m


def _bridge(st):
    """Stage 3: settle heavy GPUs' excess against light GPUs' deficit with extra replicas.

    In rounds: the k-th heaviest GPU above the limit pairs with the k-th lightest GPU below the mean that has a
    free slot; each pair adds one replica of an expert of the heavy GPU on the light one and moves
    min(excess, deficit) of its load there, so each bridge settles at least one side of its pair. The replica
    moved is the smallest one that carries the whole amount, else the largest. Pairing big with big spends few
    slots, which matters when they are scarce; but one heavy GPU facing many slightly light ones settles one of
    them per round. So after _LINE_ROUNDS rounds the pairing becomes a transport on a line (McNaughton's
    wrap-around): the heavy GPUs' excesses laid end to end against the light GPUs' deficits, each overlap a
    bridge, so one heavy GPU bridges to several light ones in one round."""
    L, E, G, S, cap, ideal, limit = st.L, st.E, st.G, st.S, st.cap, st.ideal, st.limit
    p2lf, slf, hasf, room, gl, room2, gl2, nxt, cntf = (st.p2lf, st.slf, st.hasf, st.room, st.gl, st.room2, st.gl2,
                                                         st.nxt, st.cntf)
    fo = st.fo
    cols = np.arange(G)
    sidx = np.arange(S)
    tiny = 1e-9 * np.maximum(ideal, 1.0)
    active = (room2 > 0).any(1) & (gl2.max(1) > limit)
    for rnd in range(4 * G + 4):  # each round settles at least one side of a bridge; a safety bound
        al = np.flatnonzero(active)
        if al.size == 0:
            break
        g_al = gl2[al]
        exc = g_al - ideal[al, None]
        heavy = g_al > limit[al, None]
        light = (room2[al] > 0) & (exc < -tiny[al, None])
        line = rnd >= _LINE_ROUNDS
        if not line:
            oh = np.argsort(np.where(heavy, -exc, np.inf), axis=1, kind="stable")
            ol = np.argsort(np.where(light, exc, np.inf), axis=1, kind="stable")
            npair = np.minimum(heavy.sum(1), light.sum(1))
            ai, hk = np.nonzero(cols < npair[:, None])
            lk = hk
            excf = exc.ravel()
            move = np.minimum(excf[ai * G + oh[ai, hk]], -excf[ai * G + ol[ai, lk]])
        else:
            xs = np.where(heavy, exc, 0.0)
            ds = np.where(light, -exc, 0.0)
            oh = np.argsort(-xs, axis=1, kind="stable")
            ol = np.argsort(-ds, axis=1, kind="stable")
            ch = np.cumsum(_take_rows(xs, oh), 1)
            cd = np.cumsum(_take_rows(ds, ol), 1)
            total = np.minimum(ch[:, -1], cd[:, -1])
            o = np.argsort(np.concatenate([ch, cd], 1), axis=1, kind="stable")  # at ties heavy ends first
            ends = np.minimum(_take_rows(np.concatenate([ch, cd], 1), o), total[:, None])
            is_h = o < G
            hk_all = np.cumsum(is_h, 1) - is_h  # rank of the heavy GPU of the segment that ends here
            lk_all = np.cumsum(~is_h, 1) - ~is_h
            seg = np.diff(ends, axis=1, prepend=0.0)
            ai, si = np.nonzero((seg > tiny[al, None]) & (hk_all < G) & (lk_all < G))
            hk, lk, move = hk_all[ai, si], lk_all[ai, si], seg[ai, si]
        if ai.size == 0:
            break
        pi = al[ai]
        hid = pi * G + oh[ai, hk]  # flat (layer, GPU) ids of the heavy and light GPU of each bridge
        lid = pi * G + ol[ai, lk]
        cs = hid[:, None] * S + sidx  # [n, S] flat slot ids of the heavy GPU
        ce = p2lf[cs]
        cl = slf[cs]
        ces = np.maximum(ce, 0)
        elig = (ce >= 0) & (cl > 0) & ~hasf[lid[:, None] * E + ces] & (cntf[pi[:, None] * E + ces] < cap)
        fit = elig & (cl >= move[:, None])
        pick = np.where(fit.any(1), np.where(fit, cl, np.inf).argmin(1), np.where(elig, cl, -np.inf).argmax(1))
        ar = np.arange(pi.size)
        go = elig[ar, pick]
        src = cs[ar, pick]
        e = ce[ar, pick]
        # the bridges left out get unique negative keys, so that they do not count in the ranks below
        if not line:  # one new replica per expert and layer per round keeps max_replicas exact
            go &= _group_rank(np.where(go, pi * E + e, -1 - ar)) == 0
        else:  # one replica of an expert per light GPU, within its room and the expert's max_replicas
            go &= _group_rank(np.where(go, lid * E + e, -1 - ar)) == 0
            go &= _group_rank(np.where(go, lid, -1 - ar)) < room[lid]
            go &= _group_rank(np.where(go, pi * E + e, -1 - ar)) < cap - cntf[pi * E + e]
        go = np.flatnonzero(go)
        if go.size == 0:
            break
        src, e, lo, hi, pl, move = src[go], e[go], lid[go], hid[go], pi[go], move[go]
        if not line:
            amount = np.minimum(move, slf[src])
            rank = 0
        else:  # bridges from one replica share its planned load, in order
            order = np.argsort(src, kind="stable")
            mv = move[order]
            before = np.cumsum(mv) - mv
            start = _starts(src[order])
            before -= np.maximum.accumulate(np.where(start, before, 0.0))
            amount = np.empty_like(move)
            amount[order] = np.clip(slf[src[order]] - before, 0.0, mv)
            keep = amount > tiny[pl]
            src, e, lo, hi, pl, amount = src[keep], e[keep], lo[keep], hi[keep], pl[keep], amount[keep]
            rank = _group_rank(lo)
        dst = lo * S + (nxt[lo] + rank if fo is None else fo[lo * S + nxt[lo] + rank])
        np.add.at(nxt, lo, 1)
        np.subtract.at(room, lo, 1)
        p2lf[dst] = e
        np.subtract.at(slf, src, amount)
        slf[dst] = amount
        np.subtract.at(gl, hi, amount)
        np.add.at(gl, lo, amount)
        hasf[lo * E + e] = True
        np.add.at(cntf, pl * E + e, 1)
        progressed = np.zeros(L, dtype=bool)
        progressed[pl] = True
        active &= progressed & (room2 > 0).any(1) & (gl2.max(1) > limit)


def _hedge_ring(st):
    """Stage 4: the slots still free hold replicas that let the serve-time split absorb prediction error.

    Round j gives each GPU g with room one replica of the heaviest expert (predicted load) of GPU g - 1 - j
    (mod G) that g does not hold yet: a ring at distance 1, then 2, ... (an expander over GPUs). Hedge replicas
    carry no planned load; when the true counts differ from the prediction, the split moves the excess of a GPU
    along these bridges (Hall's condition over GPU sets then has slack everywhere)."""
    L, E, G, S, cap = st.L, st.E, st.G, st.S, st.cap
    p2lf, hasf, room, nxt, cntf = st.p2lf, st.hasf, st.room, st.nxt, st.cntf
    sidx = np.arange(S)
    We = st.W.ravel()
    for j in range(min(S, G - 1) if S > 1 else 1):
        gid = np.flatnonzero(room > 0)
        if gid.size == 0:
            break
        pl = gid // G
        srcg = pl * G + (gid % G - 1 - j) % G
        cs = srcg[:, None] * S + sidx
        ce = p2lf[cs]
        ces = np.maximum(ce, 0)
        elig = (ce >= 0) & ~hasf[gid[:, None] * E + ces] & (cntf[pl[:, None] * E + ces] < cap)
        score = np.where(elig, We[pl[:, None] * E + ces], -1.0)
        pick = score.argmax(1)
        ar = np.arange(gid.size)
        go = elig[ar, pick]
        e = ce[ar, pick]
        go &= _group_rank(np.where(go, pl * E + e, -1 - ar)) < cap - cntf[pl * E + e]
        go = np.flatnonzero(go)
        if go.size == 0:
            continue
        g_, e = gid[go], e[go]
        dst = st.next_slot(g_)
        nxt[g_] += 1
        room[g_] -= 1
        p2lf[dst] = e
        hasf[g_ * E + e] = True
        np.add.at(cntf, pl[go] * E + e, 1)


def _place(W, R, G, S, previous, tolerance, bridge, cap, reuse_slack=0.05, hedge=False, whole=False) -> Plan:
    """Warm placement (pins from `previous`) where its planned max GPU load is within (1 + reuse_slack) of the cold
    placement's, else the cold placement with its GPUs renumbered to overlap `previous` most. Pins can block
    a needed swap (two hot experts pinned on one full GPU); renumbering GPUs never changes the balance.
    With `hedge` and `whole`, a layer whose previous plan still admits a split of the new loads that reaches
    the mean keeps it whole (G <= EXACT_SPLIT_MAX_GPUS, where that optimum is exact)."""
    E = W.shape[1]
    if previous is not None and hedge and whole and G <= _split.EXACT_SPLIT_MAX_GPUS:
        ideal = W.sum(1) / G
        same = _split.split_optimum(previous, W) <= ideal + 1e-9 * np.maximum(ideal, 1.0)
        same &= (previous.logcnt <= cap).all(1)
        if same.all():
            return previous
        if same.any():
            rest = np.flatnonzero(~same)
            sub = Plan(previous.phy2log[rest], previous.log2phy[rest], previous.logcnt[rest], G, S)
            out = previous.phy2log.copy()
            out[rest] = _place(W[rest], R[rest], G, S, sub, tolerance, bridge, cap, reuse_slack, True, False).phy2log
            return Plan._derived(out, E, G, S)
    items = _Items(W, R, G * S)
    if previous is None:
        return Plan._derived(_place_arrays(W, R, G, S, None, tolerance, bridge, cap, items, hedge)[0], E, G, S)
    warm, warm_load = _place_arrays(W, R, G, S, previous, tolerance, bridge, cap, items, hedge)
    # a cold placement's max GPU load is at least the mean, so a layer whose warm plan is within
    # (1 + reuse_slack) of the mean keeps it whatever the cold plan would be: only the others are planned cold
    doubt = np.flatnonzero(warm_load.max(1) > W.sum(1) / G * (1.0 + reuse_slack))
    if doubt.size:
        cold, cold_load = _place_arrays(W[doubt], R[doubt], G, S, None, tolerance, bridge, cap, items.take(doubt),
                                         hedge)
        worse = warm_load[doubt].max(1) > cold_load.max(1) * (1.0 + reuse_slack) + 1e-9
        if worse.any():
            sub = doubt[worse]
            warm = warm.copy()
            warm[sub] = _relabel_to(cold[worse], previous.phy2log[sub], G, S, previous.log2phy[sub],
                                    previous.logcnt[sub])
    return Plan._derived(warm, E, G, S)



def _relabel_to(p2l: np.ndarray, prev: np.ndarray, G: int, S: int, prev_log2phy=None, prev_cnt=None) -> np.ndarray:
    """Renumber the GPUs of p2l [L, G*S] (greedy maximum overlap of expert sets with prev's GPUs), then put
    each instance in the slot where its expert lived on that GPU before, if any; balance is unchanged."""
    L = p2l.shape[0]
    rows = np.arange(L)
    a = p2l.reshape(L, G, S)
    b = prev.reshape(L, G, S)
    # overlap[l, g, h]: experts on new GPU g that lived on old GPU h, counted from the pairs (instance, old
    # replica of its expert) only: sparse, instead of a dense [L, G, G, S, S] comparison
    if prev_log2phy is None:
        prev_log2phy, prev_cnt = _derive_log2phy(prev, int(max(prev.max(initial=-1), p2l.max(initial=-1))) + 1)
    elif prev_cnt is None:
        prev_cnt = (prev_log2phy >= 0).sum(2)
    Rp = prev_log2phy.shape[2]
    inst = np.flatnonzero(p2l >= 0)
    il = inst // (G * S)
    ie = p2l.ravel()[inst]
    n_old = prev_cnt[il, ie]
    src = np.repeat(np.arange(inst.size), n_old)
    r = np.arange(src.size) - np.repeat(np.cumsum(n_old) - n_old, n_old)
    old = prev_log2phy.reshape(-1)[(il[src] * prev_log2phy.shape[1] + ie[src]) * Rp + r] // S
    idx = (inst[src] // S) * G + old  # inst // S = l*G + g
    overlap = np.bincount(idx, minlength=L * G * G).reshape(L, G, G)
    # greedy maximum matching in parallel rounds: each unmatched new GPU proposes to its best unmatched old
    # GPU; each old GPU takes its best proposer (ties: lower id); a few rounds instead of G sequential steps
    perm = np.full((L, G), -1, dtype=np.int64)  # new GPU g -> old GPU perm[g]
    taken = np.zeros((L, G), dtype=bool)
    cols = np.arange(G)
    score = overlap  # matched new GPUs' rows and old GPUs' columns are set to -1 as they go
    for _ in range(_RELABEL_ROUNDS):
        best_h = score.argmax(2)  # [L, G]
        best_v = np.take_along_axis(score, best_h[:, :, None], 2)[:, :, 0]
        live = best_v > 0
        if not live.any():
            break
        # layers that are done propose nothing (no live overlap left); not compacting `score` saves its copy
        # old GPU h accepts the proposer with the largest overlap (ties: lower id): sort the live proposals by
        # (layer, old GPU, overlap descending, new GPU) and take the first of each (layer, old GPU)
        ai, gi = np.nonzero(live)
        hi = best_h[ai, gi]
        o = np.lexsort((gi, -best_v[ai, gi], ai * G + hi))
        grp = (ai * G + hi)[o]
        first = o[_starts(grp)]
        ai, gi, hi = ai[first], gi[first], hi[first]
        perm[ai, gi] = hi
        taken[ai, hi] = True
        score[ai, gi, :] = -1
        score[ai, :, hi] = -1
    # new GPUs without overlap take the remaining old GPUs in order
    rest_new = np.argsort(perm >= 0, axis=1, kind="stable")
    rest_old = np.argsort(taken, axis=1, kind="stable")
    n_left = (perm < 0).sum(1)
    li, k = np.nonzero(cols < n_left[:, None])
    perm[li, rest_new[li, k]] = rest_old[li, k]
    a_on = np.empty_like(a)
    a_on[rows[:, None], perm] = a  # GPU-renumbered
    return align_slots(a_on, b).reshape(L, G * S)


def plan_layers(
    loads,
    gpus: int,
    slots_per_gpu: int,
    *,
    previous: Plan | None = None,
    cv_threshold: float = 0.2,
    max_replicas=None,
    rule: str = "ideal",
    tolerance: float = 0.01,
    bridge: bool | None = None,
    reuse_slack: float = 0.05,
    hedge: bool = True,
    reuse_whole: bool = False,
) -> Plan:
    """Scale and place every layer of one iteration: loads float [L, E] -> Plan.

    `rule` is "ideal" (default) or "literal" (Algorithm 1 with `cv_threshold`); the memory budget is
    gpus * slots_per_gpu slots per layer; `max_replicas` caps the replicas of one expert; `previous` is the
    last plan, whose instances are reused where the balance allows; `bridge` (default: on for "ideal", off for
    "literal") spends free slots on bridging replicas while a GPU is above (1 + tolerance) x the mean;
    `reuse_slack`: a layer keeps `previous`'s instances in place (warm) when that plan's max GPU load is within
    (1 + reuse_slack) of a fresh placement's, else it takes the fresh one with GPUs renumbered to match
    `previous` as far as possible (0 = balance first, inf = always warm); `hedge` (rule "ideal" only) spends
    every slot on min-max replicas and links the GPUs in a ring by them, so that the serve-time split can
    absorb prediction error (module docstring, Hedging); hedge=False gives the fewest replicas; `reuse_whole`
    (with hedge, G <= EXACT_SPLIT_MAX_GPUS): a layer whose previous plan can still split the predicted loads
    to the mean keeps it whole (about twice the instances kept and a much faster warm plan, but less robust
    to prediction error: see the module docstring).
    """
    W = _check_loads(loads)
    G = _positive_int("gpus", gpus)
    S = _positive_int("slots_per_gpu", slots_per_gpu)
    L, E = W.shape
    _check_budget(E, G, S)
    _check_previous(previous, L, E, G, S)
    if not np.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    cap = _replica_cap(max_replicas, G * S)
    if rule == "ideal" and hedge:
        # every slot holds a replica: each spare one goes to the expert with the largest predicted load per
        # replica, the largest absolute error of a prediction (see the module docstring, "Hedging")
        R = replicate_minmax(W, G * S, max_replicas=cap)
    elif rule == "ideal":
        R = scale_ideal(W, G, G * S, tolerance=tolerance, max_replicas=cap)
    elif rule == "literal":
        R = scale_literal(W, G * S, cv_threshold=cv_threshold, max_replicas=cap)
    else:
        raise ValueError(f"rule must be 'ideal' or 'literal', got {rule!r}")
    if bridge is None:
        bridge = rule == "ideal"
    hedge = bool(hedge) and rule == "ideal"
    return _place(W, R, G, S, previous, float(tolerance), bool(bridge), cap, _slack(reuse_slack), hedge,
                  bool(reuse_whole))

