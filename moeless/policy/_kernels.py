"""The time-aware policy's hot loops, compiled by numba where it is installed (moeless._jit), plain Python otherwise.

One MoE layer:

    W      float64 [E]     pairs per expert (true counts, or rounded predictions)
    has    bool    [E, G]  an instance of expert e on GPU g (replicas of e on one GPU share one weight copy)
    ig     int64   [E, G]  the GPUs of expert e's instances, the first cnt[e] entries (the sparse view of has)
    gl     int64   [G, E]  the experts with an instance on GPU g, the first gcnt[g] entries, ascending
    n      float64 [E, G]  pairs expert e serves on GPU g (integers; 0 where has is False)
    p      float64 [7]     the cost profile (moeless.costmodel.CostProfile.as_array): flop_s, read_s, act_s,
                           launch_s, a2a_s, a2a_floor, per_gpu_sum

Layer time F = expert time + 2 * all-to-all, with expert time = max over GPUs of the sum of its instances'
times (roofline; or the max over instances, the paper's model) and all-to-all = a2a_s * max over GPUs of the
pairs received (at least total / G with a2a_floor). An instance with n > 0 pairs takes max(n * flop_s, read_s
+ n * act_s) + launch_s: in decode that is one weight read whatever n, so a second replica that gets a pair
costs a read instead of saving work.

`improve` is a local search over integer moves of x pairs of one expert from the busiest GPU to another GPU
holding (or, with a copy cost, given) an instance of it; x balances the two GPUs (one side's time only falls
and the other's only rises with x: an interpolation search on their difference, `_best_x`). A free move is
taken when it lowers the busiest GPU without raising the layer time (so ties between busiest GPUs resolve one by
one: the sorted GPU times fall lexicographically, hence it terminates); a move onto a new instance only when
the layer time falls by more than the copy's per-iteration cost (its stall not hidden by the look-ahead, over
the instance's expected warm life).
Where no single move helps, two compound moves are tried: a chain of two whole moves (`_chain_move`) and an
augmenting path (`_path_move`: x pairs of e1 from the busiest GPU to g1, x of e2 from g1 to g2, ..., breadth-first
over the GPUs), which reaches the linear program's optimum on compute-bound layers where single moves stall.
Under the paper's model (a GPU's expert time the max over its instances) GPUs tie at the largest instance, so a
third compound move comes first: pairs of one expert off the GPU receiving the most pairs (`_a2a_move`, the
all-to-all), never past the largest instance's time.
Loops run over instances (the sparse lists), not over E x G: only the instances' entries of a working n are
ever zeroed, copied or read (an array of E x G entries is touched whole at most once per call; at DeepSeek-V3's
256 experts x 64 GPUs a whole pass costs more than a search step). A GPU whose time is already at the busiest
one's is never tried as a target (its time only rises with x).
The innermost helpers (`_pair_times`, `_best_x`, `_eval_move`, `_max_except`) take scalars only: a compiled
call that passes arrays, and is not inlined, pays an atomic reference-count increment and decrement per array,
about ten times their arithmetic (measured: 47 ns against 3 ns per move size evaluated); the caller reads the
arrays once per candidate.
Deterministic: ties go to the lower expert, then the earlier instance.
"""
from __future__ import annotations

import numpy as np

from moeless._jit import njit

# indices into the cost profile array
_FLOP, _READ, _ACT, _LAUNCH, _A2A, _FLOOR, _SUM = 0, 1, 2, 3, 4, 5, 6

# new-instance targets tried per expert and move: the least-busy GPUs with room (a new instance's best GPU is
# a light one; trying all G GPUs would cost G searches for x per expert and move at DeepSeek-V3 scale)
_NEW_TARGETS = 4
# GPUs tried as the end of an augmenting path (_path_move) per attempt: the least busy ones the search reaches
_PATH_SINKS = 4


@njit
def inst_time(n, p):
    """Seconds of one instance serving n pairs (0 for none)."""
    if n <= 0.0:
        return 0.0
    a = n * p[_FLOP]
    b = p[_READ] + n * p[_ACT]
    return (a if a > b else b) + p[_LAUNCH]


@njit
def build_lists(has, ig, cnt):
    """ig / cnt: the GPUs of each expert's instances, ascending."""
    E, G = has.shape
    for e in range(E):
        c = 0
        for g in range(G):
            if has[e, g]:
                ig[e, c] = g
                c += 1
        cnt[e] = c


@njit
def gpu_lists(ig, cnt, gl, gcnt):
    """gl / gcnt: the experts with an instance on each GPU, ascending (the per-GPU view of ig / cnt)."""
    gcnt[:] = 0
    for e in range(ig.shape[0]):
        for k in range(cnt[e]):
            g = ig[e, k]
            gl[g, gcnt[g]] = e
            gcnt[g] += 1


@njit
def instance_lists(has):
    """(ig, cnt, gl, gcnt) of the instances `has` [E, G] (for time_split_on)."""
    E, G = has.shape
    ig = np.empty((E, G), dtype=np.int64)
    cnt = np.zeros(E, dtype=np.int64)
    build_lists(has, ig, cnt)
    gl = np.empty((G, E), dtype=np.int64)
    gcnt = np.zeros(G, dtype=np.int64)
    gpu_lists(ig, cnt, gl, gcnt)
    return ig, cnt, gl, gcnt


@njit
def replica_tokens(n, rg, first, out):
    """out [E, R] = n[e, rg[e, r]] where first[e, r] (the first replica of e on its GPU), else 0 (integers)."""
    for e in range(rg.shape[0]):
        for r in range(rg.shape[1]):
            out[e, r] = np.int64(n[e, rg[e, r]]) if first[e, r] else 0


@njit
def _slot_lists(home_gpu, live, S, G):
    """(ig, cnt, gl, gcnt) of the homes (one per expert, on home_gpu) plus the live slots' instances, built from
    the G*S slots and E homes instead of a scan of E x G (the same lists: GPUs ascending per expert, experts
    ascending per GPU)."""
    E = home_gpu.shape[0]
    hcnt = np.zeros(G, dtype=np.int64)
    for e in range(E):
        hcnt[home_gpu[e]] += 1
    hstart = np.zeros(G + 1, dtype=np.int64)
    for g in range(G):
        hstart[g + 1] = hstart[g] + hcnt[g]
    hl = np.empty(E, dtype=np.int64)
    fill = hstart[:G].copy()
    for e in range(E):  # (experts ascending within each GPU)
        g = home_gpu[e]
        hl[fill[g]] = e
        fill[g] += 1
    ig = np.empty((E, G), dtype=np.int64)
    cnt = np.zeros(E, dtype=np.int64)
    gl = np.empty((G, E), dtype=np.int64)
    gcnt = np.zeros(G, dtype=np.int64)
    for g in range(G):
        c = 0
        for j in range(hstart[g], hstart[g + 1]):
            gl[g, c] = hl[j]
            c += 1
        for s in range(g * S, (g + 1) * S):
            e = live[s]
            if e < 0:
                continue
            dup = False
            for j in range(c):
                if gl[g, j] == e:
                    dup = True
                    break
            if dup:
                continue
            j = c  # insertion: ascending experts
            while j > 0 and gl[g, j - 1] > e:
                gl[g, j] = gl[g, j - 1]
                j -= 1
            gl[g, j] = e
            c += 1
        gcnt[g] = c
        for j in range(c):
            e = gl[g, j]
            ig[e, cnt[e]] = g
            cnt[e] += 1
    return ig, cnt, gl, gcnt


@njit
def _sub_lists(ig, cnt, mask, ig2, cnt2):
    """ig2 / cnt2: the instances of (ig, cnt) where mask [E, G] holds, each expert's GPUs ascending (the order a
    scan of the mask gives). Returns how many."""
    tot = 0
    for e in range(ig.shape[0]):
        c = 0
        for k in range(cnt[e]):
            g = ig[e, k]
            if mask[e, g]:
                j = c
                while j > 0 and ig2[e, j - 1] > g:  # insertion: lists are short and nearly sorted
                    ig2[e, j] = ig2[e, j - 1]
                    j -= 1
                ig2[e, j] = g
                c += 1
        cnt2[e] = c
        tot += c
    return tot


@njit
def _zero(n, ig, cnt):
    """n = 0 on the instances."""
    for e in range(ig.shape[0]):
        for k in range(cnt[e]):
            n[e, ig[e, k]] = 0.0


@njit
def _copy(dst, src, ig, cnt):
    """dst = src on the instances."""
    for e in range(ig.shape[0]):
        for k in range(cnt[e]):
            g = ig[e, k]
            dst[e, g] = src[e, g]


@njit
def gpu_times(n, ig, cnt, p, comp, pairs):
    """Fill comp [G] (expert time per GPU) and pairs [G] (pairs per GPU) from n over the instances."""
    comp[:] = 0.0
    pairs[:] = 0.0
    sum_mode = p[_SUM] > 0.0
    for e in range(ig.shape[0]):
        for k in range(cnt[e]):
            g = ig[e, k]
            v = n[e, g]
            if v > 0.0:
                t = inst_time(v, p)
                if sum_mode:
                    comp[g] += t
                elif t > comp[g]:
                    comp[g] = t
                pairs[g] += v


@njit
def _add_time(c, v, p):
    """A GPU's expert time c with one more instance of v pairs (sum, or max in the paper's model)."""
    if v <= 0.0:
        return c
    t = inst_time(v, p)
    if p[_SUM] > 0.0:
        return c + t
    return t if t > c else c


@njit
def _gpu_time_without(n, gl, gcnt, g, e_out, p):
    """Expert time of GPU g without expert e_out's instance (the max-over-replicas model recomputes a GPU after
    a move): its other listed instances."""
    c = 0.0
    for j in range(gcnt[g]):
        e = gl[g, j]
        if e != e_out:
            c = _add_time(c, n[e, g], p)
    return c


@njit
def layer_time(comp, pairs, total, p):
    """F = max expert time + 2 * all-to-all."""
    G = comp.shape[0]
    cmax = 0.0
    pmax = 0.0
    for g in range(G):
        if comp[g] > cmax:
            cmax = comp[g]
        if pairs[g] > pmax:
            pmax = pairs[g]
    if p[_FLOOR] > 0.0 and total / G > pmax:
        pmax = total / G
    return cmax + 2.0 * p[_A2A] * pmax


@njit
def _topk(v, out, at, k):
    """out[at:at+k]: indices of the k largest entries of v, largest first (-1 where fewer), ties to the lower
    index."""
    for j in range(k):
        out[at + j] = -1
    for i in range(v.shape[0]):
        x = v[i]
        j = k
        while j > 0 and (out[at + j - 1] < 0 or x > v[out[at + j - 1]]):
            j -= 1
        if j < k:
            for m in range(k - 1, j, -1):
                out[at + m] = out[at + m - 1]
            out[at + j] = i


@njit
def _push3(i, x, a, va, b, vb, c, vc):
    """A top three (indices a, b, c, largest first, -1 where empty; values va, vb, vc) after offering entry i of
    value x (ties keep the earlier entry). On scalars (see _pair_times)."""
    if a < 0 or x > va:
        return i, x, a, va, b, vb
    if b < 0 or x > vb:
        return a, va, i, x, b, vb
    if c < 0 or x > vc:
        return a, va, b, vb, i, x
    return a, va, b, vb, c, vc


@njit
def _top3(v, w, out):
    """out[0:3] and out[3:6]: indices of the three largest entries of v and of w (-1 where fewer), ties to the
    lower index; one pass over both."""
    a, va, b, vb, c, vc = -1, 0.0, -1, 0.0, -1, 0.0
    d, vd, f, vf, h, vh = -1, 0.0, -1, 0.0, -1, 0.0
    for i in range(v.shape[0]):
        a, va, b, vb, c, vc = _push3(i, v[i], a, va, b, vb, c, vc)
        d, vd, f, vf, h, vh = _push3(i, w[i], d, vd, f, vf, h, vh)
    out[0] = a
    out[1] = b
    out[2] = c
    out[3] = d
    out[4] = f
    out[5] = h


@njit
def _max_except(i0, v0, i1, v1, i2, v2, i, j):
    """The largest of a vector's entries other than i and j, from its top three (indices i0, i1, i2, largest
    first, -1 where fewer; values v0, v1, v2); 0 if none. (On scalars: see _pair_times.)"""
    if i0 >= 0 and i0 != i and i0 != j:
        return v0
    if i1 >= 0 and i1 != i and i1 != j:
        return v1
    if i2 >= 0 and i2 != i and i2 != j:
        return v2
    return 0.0


@njit
def _max_except3(i0, v0, i1, v1, i2, v2, i3, v3, i, j, m):
    """The largest of a vector's entries other than i, j and m, from its top four (as _max_except); 0 if none."""
    if i0 >= 0 and i0 != i and i0 != j and i0 != m:
        return v0
    if i1 >= 0 and i1 != i and i1 != j and i1 != m:
        return v1
    if i2 >= 0 and i2 != i and i2 != j and i2 != m:
        return v2
    if i3 >= 0 and i3 != i and i3 != j and i3 != m:
        return v3
    return 0.0


@njit
def _base_times(n, gl, gcnt, e, ga, gb, ca, cb, p):
    """The expert times of GPUs ga and gb (ca, cb) without expert e's instances on them: what _pair_times adds
    e's new pairs to."""
    if p[_SUM] > 0.0:
        return ca - inst_time(n[e, ga], p), cb - inst_time(n[e, gb], p)
    return _gpu_time_without(n, gl, gcnt, ga, e, p), _gpu_time_without(n, gl, gcnt, gb, e, p)


@njit
def _pair_times(n1, n2, x, base_a, base_b, p):
    """Expert times of GPUs ga and gb after moving x pairs of an expert with n1 pairs on ga and n2 on gb from ga
    to gb, given their times without that expert (_base_times). On scalars only: the searches call it millions
    of times, and a compiled call that passes arrays pays two atomic reference-count updates per array, about
    ten times this arithmetic."""
    ta = inst_time(n1 - x, p)
    tb = inst_time(n2 + x, p)
    if p[_SUM] > 0.0:
        return base_a + ta, base_b + tb
    return (ta if ta > base_a else base_a), (tb if tb > base_b else base_b)


@njit
def _best_x(n1, n2, base_a, base_b, p):
    """The integer x in [1, n1] minimising max(time of ga, time of gb) after moving x of an expert's n1 pairs on
    ga to gb (n2 there; base_a / base_b: the two GPUs' times without it, _base_times): the smallest x
    where ga's time no longer exceeds gb's (ga's falls and gb's rises with x), or the one before it.

    The smallest such x is bracketed and found by interpolation on d(x) = time of ga - time of gb, which is
    piecewise linear with at most a few kinks (the roofline's ridge on either side, an instance emptied or
    created), so that two or three evaluations usually suffice; bisection takes over if they do not (the same
    x as a plain bisection, in fewer evaluations)."""
    top = np.floor(n1)
    if top < 1.0:
        return 0.0, base_a, base_b  # (no move)
    lo = 1.0
    a_lo, b_lo = _pair_times(n1, n2, lo, base_a, base_b, p)
    if a_lo <= b_lo:
        return lo, a_lo, b_lo
    hi = top
    a_hi, b_hi = _pair_times(n1, n2, hi, base_a, base_b, p)
    if a_hi > b_hi:  # ga stays the slower one: all pairs move, unless one fewer is at least as good
        if hi > 1.0:
            a2, b2 = _pair_times(n1, n2, hi - 1.0, base_a, base_b, p)
            if max(a2, b2) <= max(a_hi, b_hi):
                return hi - 1.0, a2, b2
        return hi, a_hi, b_hi
    if hi - 1.0 > lo:
        # ga's instance empties at x = top (its time drops by a whole instance there): a kink that would make
        # the interpolation creep from lo one or two pairs at a time; bracket below it
        a2, b2 = _pair_times(n1, n2, hi - 1.0, base_a, base_b, p)
        if a2 <= b2:
            hi, a_hi, b_hi = hi - 1.0, a2, b2
        else:
            lo, a_lo, b_lo = hi - 1.0, a2, b2
    # invariant: d(lo) > 0 >= d(hi)
    rounds = 0
    while hi - lo > 1.0:
        d_lo = a_lo - b_lo
        d_hi = a_hi - b_hi
        if rounds < 6 and d_lo - d_hi > 0.0:
            m = np.ceil(lo + (hi - lo) * (d_lo / (d_lo - d_hi)))
            if m <= lo:
                m = lo + 1.0
            if m >= hi:
                m = hi - 1.0
        else:
            m = np.floor((lo + hi) / 2.0)
        rounds += 1
        a, b = _pair_times(n1, n2, m, base_a, base_b, p)
        if a <= b:
            hi, a_hi, b_hi = m, a, b
            if m - 1.0 > lo and rounds < 6:  # the crossing is usually just below: test it at once
                a, b = _pair_times(n1, n2, m - 1.0, base_a, base_b, p)
                if a <= b:
                    hi, a_hi, b_hi = m - 1.0, a, b
                else:
                    lo, a_lo, b_lo = m - 1.0, a, b
        else:
            lo, a_lo, b_lo = m, a, b
            if m + 1.0 < hi and rounds < 6:
                a, b = _pair_times(n1, n2, m + 1.0, base_a, base_b, p)
                if a <= b:
                    hi, a_hi, b_hi = m + 1.0, a, b
                else:
                    lo, a_lo, b_lo = m + 1.0, a, b
    # hi is the smallest x with d(x) <= 0 and lo = hi - 1 (>= 1) has d(lo) > 0
    if max(a_lo, b_lo) <= max(a_hi, b_hi):
        return lo, a_lo, b_lo
    return hi, a_hi, b_hi


@njit
def _eval_move(n1, n2, base_a, base_b, new, F, cs, rest_c, rest_p, pairs_s, pairs_b, pfloor, tol, p, extra,
               horizon):
    """Score of moving pairs of an expert from the busiest GPU gs (n1 of its pairs there, n2 on gb) to gb (<= 0:
    not worth it), with x, the two GPUs' new times and the score's part that does not depend on the horizon (for a
    new instance the layer time's fall F - newF, 0 where not reached; for a free move the score); on scalars (see
    _pair_times): base_a / base_b (_base_times), rest_c / rest_p the largest expert time and pairs of the other
    GPUs, pairs_s / pairs_b the two GPUs' pairs; for a new instance, `extra` seconds of stall its copy adds (beyond
    what the look-ahead hides and the layer already waits), spread over its expected warm life `horizon`."""
    x, a, b = _best_x(n1, n2, base_a, base_b, p)
    if x <= 0.0:
        return -1.0, 0.0, 0.0, 0.0, 0.0
    local = a if a > b else b
    if local >= cs - tol:
        return -1.0, 0.0, 0.0, 0.0, 0.0  # the busiest GPU would not get lighter
    cmax = max(rest_c, local)
    pmax = max(rest_p, max(pairs_s - x, pairs_b + x), pfloor)
    newF = cmax + 2.0 * p[_A2A] * pmax
    if new:
        d = F - newF
        if d <= tol:
            return -1.0, 0.0, 0.0, 0.0, d
        score = d - extra / horizon
        if score <= tol:
            return -1.0, 0.0, 0.0, 0.0, d
        return score, x, a, b, d
    if newF > F + tol:
        return -1.0, 0.0, 0.0, 0.0, 0.0
    # free moves: rank by how much the busiest GPU falls (the layer time may tie)
    score = (F - newF) + 1e-3 * (cs - local)
    return score, x, a, b, score


@njit
def _narrow(rng, i, a, b, z0):
    """Narrow the interval (rng[i], rng[i + 1]) of an inverse warm life z (1 / horizon), which holds z0, to where
    a comparison whose value is a + b z keeps the sign it has at z0, by a margin of 1e-9 of its terms (so that
    the decision's float arithmetic, dividing by the horizon, cannot flip it inside). A value within that margin
    of 0 at z0 leaves only z0 itself."""
    if b == 0.0:
        return
    v = a + b * z0
    m = 1e-9 * (abs(a) + abs(b * z0))
    s = 1.0 if v > 0.0 else -1.0
    if s * v <= m:
        rng[i] = z0
        rng[i + 1] = z0
        return
    zc = (s * m - a) / b  # where s (a + b z) falls to the margin
    if zc > z0:
        if zc < rng[i + 1]:
            rng[i + 1] = zc
    elif zc > rng[i]:
        rng[i] = zc


@njit
def _narrow2(rng, a, bx, by, x0, y0):
    """_narrow for a comparison a + bx x + by y on both inverse warm lives (x in rng[0:2], y in rng[2:4]): a
    box around (x0, y0) on which its sign holds, each life given half of the margin at (x0, y0)."""
    if bx == 0.0 or by == 0.0:
        if bx != 0.0:
            _narrow(rng, 0, a + by * y0, bx, x0)
        elif by != 0.0:
            _narrow(rng, 2, a + bx * x0, by, y0)
        return
    v = a + bx * x0 + by * y0
    room = abs(v) - 1e-9 * (abs(a) + abs(bx * x0) + abs(by * y0))
    if room <= 0.0:
        rng[0] = rng[1] = x0
        rng[2] = rng[3] = y0
        return
    dx = 0.5 * room / abs(bx)
    dy = 0.5 * room / abs(by)
    rng[0] = max(rng[0], x0 - dx)
    rng[1] = min(rng[1], x0 + dx)
    rng[2] = max(rng[2], y0 - dy)
    rng[3] = min(rng[3], y0 + dy)


@njit
def _shift(n, room, home, e, g, delta):
    """n[e, g] += delta, keeping room [G] (the free slots of each GPU) in step: an instance that is not a home
    takes a slot while it carries a pair and gives it back when emptied."""
    before = n[e, g]
    after = before + delta
    if before < 1.0 and after >= 1.0 and not home[e, g]:
        room[g] -= 1
    if before >= 1.0 and after < 1.0 and not home[e, g]:
        room[g] += 1
    n[e, g] = after


@njit
def _no_slot(n, home, room, e, g):
    """Whether GPU g cannot take pairs of expert e: e has no instance there carrying a pair (n[e, g] < 1), none
    that is its home, and the GPU has no free slot for a new one (room [G], kept by _shift)."""
    return n[e, g] < 1.0 and not home[e, g] and room[g] <= 0


@njit
def _apply_move(n, home, room, comp, pairs, e, ga, gb, x, ta, tb):
    """Move x pairs of expert e from GPU ga to gb (slots kept in step, _shift), whose expert times become ta and
    tb."""
    _shift(n, room, home, e, gb, x)
    _shift(n, room, home, e, ga, -x)
    comp[ga] = ta
    comp[gb] = tb
    pairs[ga] -= x
    pairs[gb] += x


@njit
def _compound_gain(F, newF, cs, local, tol):
    """The score of a compound move (chain or path) that takes the layer time F to newF and leaves the GPUs it
    raises at `local` at most (below the busiest time cs): the layer time saved, then the margin below cs; -1
    (never taken) when it raises the layer time."""
    if newF > F + tol:
        return -1.0
    return (F - newF) + 1e-3 * (cs - local)


@njit
def _cap_pairs(cap, p):
    """The most pairs one instance can serve within `cap` seconds (inst_time is non-decreasing in its pairs);
    -1 if not even one pair fits."""
    m = np.inf
    if p[_FLOP] > 0.0:
        m = (cap - p[_LAUNCH]) / p[_FLOP]
    if p[_ACT] > 0.0:
        m = min(m, (cap - p[_LAUNCH] - p[_READ]) / p[_ACT])
    elif cap < p[_LAUNCH] + p[_READ]:
        return -1.0
    return np.floor(m * (1.0 + 1e-12)) if m < np.inf else np.inf


@njit
def _a2a_move(n, ig, cnt, gl, gcnt, home, room, comp, pairs, F, cs, q0, q1, qv1, q2, qv2, c0, cv0, c1, cv1, c2,
              cv2, pfloor, tol, p):
    """The paper's max model only: the best move of x pairs of one expert from the GPU that receives the most
    pairs (q0) to another of its instances, x at most half the two GPUs' difference and at most what keeps the
    receiving instance within the busiest expert time cs (so the expert time never rises); taken when it does
    not raise the layer time F (the sorted pairs per GPU fall lexicographically). In that model a GPU's expert
    time is its largest instance and ties at the layer's largest instance are common, so the moves off the
    busiest GPU by expert time stall while the all-to-all (the pairs term) can still fall. Applies it (n, room,
    comp, pairs updated) and returns whether one was found."""
    best_s = -1.0
    best_e = -1
    best_g = -1
    best_x = 0.0
    best_a = 0.0
    best_b = 0.0
    pq = pairs[q0]
    for i in range(gcnt[q0]):
        e = gl[q0, i]
        n1 = n[e, q0]
        if n1 < 1.0:
            continue
        for k in range(cnt[e]):
            gb = ig[e, k]
            if gb == q0:
                continue
            n2 = n[e, gb]
            if _no_slot(n, home, room, e, gb):
                continue
            x = min(np.floor((pq - pairs[gb]) / 2.0), n1)
            if x < 1.0:
                continue
            base_b = _gpu_time_without(n, gl, gcnt, gb, e, p)
            if base_b > cs + tol:
                continue
            x = min(x, _cap_pairs(cs + tol, p) - n2)
            if x < 1.0:
                continue
            base_a = _gpu_time_without(n, gl, gcnt, q0, e, p)
            a, b = _pair_times(n1, n2, x, base_a, base_b, p)
            cmax = max(_max_except(c0, cv0, c1, cv1, c2, cv2, q0, gb), a, b)
            pmax = max(_max_except(q0, pq, q1, qv1, q2, qv2, q0, gb), pq - x, pairs[gb] + x, pfloor)
            newF = cmax + 2.0 * p[_A2A] * pmax
            if newF > F + tol:
                continue
            s = (F - newF) + 1e-3 * 2.0 * p[_A2A] * x
            if s > best_s + tol:
                best_s, best_e, best_g, best_x, best_a, best_b = s, e, gb, x, a, b
    if best_e < 0:
        return False
    _apply_move(n, home, room, comp, pairs, best_e, q0, best_g, best_x, best_a, best_b)
    return True


@njit
def _chain_move(n, ig, cnt, gl, gcnt, home, room, comp, pairs, F, cs, gs, pfloor, tol, p):
    """Apply the best chain gs -> gb -> gc of whole pair counts (see improve) that lowers the busiest GPU without
    raising the layer time; comp and pairs are updated. Returns whether one was applied. (A GPU's time is a sum
    of its instances' in the roofline only; the paper's max over replicas has no such trap.)"""
    if p[_SUM] <= 0.0:
        return False
    tops = np.empty(8, dtype=np.int64)
    _topk(comp, tops, 0, 4)
    _topk(pairs, tops, 4, 4)
    tv = np.zeros(8)  # their values (0 where fewer), read as scalars in the loops (see _pair_times)
    for k in range(8):
        if tops[k] >= 0:
            tv[k] = comp[tops[k]] if k < 4 else pairs[tops[k]]
    c0, c1, c2, c3, q0, q1, q2, q3 = tops[0], tops[1], tops[2], tops[3], tops[4], tops[5], tops[6], tops[7]
    cv0, cv1, cv2, cv3, qv0, qv1, qv2, qv3 = tv[0], tv[1], tv[2], tv[3], tv[4], tv[5], tv[6], tv[7]
    best = 0.0
    be, bf, bgb, bgc = -1, -1, -1, -1
    nb_a, nb_b, nb_c = 0.0, 0.0, 0.0
    for i in range(gcnt[gs]):
        e = gl[gs, i]
        x = n[e, gs]
        if x < 1.0:
            continue
        for k in range(cnt[e]):
            gb = ig[e, k]
            if gb == gs or _no_slot(n, home, room, e, gb):
                continue
            a, b0 = _pair_times(x, n[e, gb], x, comp[gs] - inst_time(x, p), comp[gb] - inst_time(n[e, gb], p), p)
            if a >= cs - tol:
                continue
            for jf in range(gcnt[gb]):
                f = gl[gb, jf]
                y = n[f, gb]
                if f == e or y < 1.0:
                    continue
                for j in range(cnt[f]):
                    gc = ig[f, j]
                    if gc == gb or gc == gs or _no_slot(n, home, room, f, gc):
                        continue
                    # gb loses f's pairs after gaining e's: price f's instance there with e's added
                    b = b0 - inst_time(y, p)
                    c = comp[gc] - inst_time(n[f, gc], p) + inst_time(n[f, gc] + y, p)
                    local = max(a, max(b, c))
                    if local >= cs - tol:
                        continue
                    rest = _max_except3(c0, cv0, c1, cv1, c2, cv2, c3, cv3, gs, gb, gc)
                    pm = max(pairs[gs] - x, pairs[gb] + x - y, pairs[gc] + y, pfloor)
                    pm = max(pm, _max_except3(q0, qv0, q1, qv1, q2, qv2, q3, qv3, gs, gb, gc))
                    gain = _compound_gain(F, max(rest, local) + 2.0 * p[_A2A] * pm, cs, local, tol)
                    if gain > best + tol:
                        best = gain
                        be, bf, bgb, bgc = e, f, gb, gc
                        nb_a, nb_b, nb_c = a, b, c
    if be < 0:
        return False
    x = n[be, gs]
    y = n[bf, bgb]
    for gg, ee, delta in ((gs, be, -x), (bgb, be, x), (bgb, bf, -y), (bgc, bf, y)):
        _shift(n, room, home, ee, gg, delta)
        pairs[gg] += delta
    comp[gs], comp[bgb], comp[bgc] = nb_a, nb_b, nb_c
    return True


@njit
def _path_hops(par, via, t, hops):
    """The BFS path gs -> ... -> t (par: each reached GPU's parent, -1 at the root; via: the expert whose pairs
    enter it) into hops [G, 3] as (from GPU, to GPU, expert), root first. Returns the number of hops."""
    k = 0
    g = t
    while par[g] >= 0:
        k += 1
        g = par[g]
    g = t
    for j in range(k - 1, -1, -1):
        hops[j, 0] = par[g]
        hops[j, 1] = g
        hops[j, 2] = via[g]
        g = par[g]
    return k


@njit
def _path_gpu(hops, k, j):
    """The j-th GPU (0: the root, k: the end) of a path of k hops (_path_hops)."""
    return hops[j, 0] if j < k else hops[k - 1, 1]


@njit
def _path_times(n, hops, k, comp, x, p, out):
    """The expert times of the k + 1 GPUs of a path (root first) once x pairs move along every hop, into out;
    returns their maximum. Each GPU swaps one instance's pairs: the root loses x of its hop's expert, the end
    gains x, and a GPU in between gains x of the expert entering it and loses x of the one leaving it."""
    m = 0.0
    for j in range(k + 1):
        g = _path_gpu(hops, k, j)
        c = comp[g]
        if j > 0:  # gains the pairs of the hop entering it
            e = hops[j - 1, 2]
            c += inst_time(n[e, g] + x, p) - inst_time(n[e, g], p)
        if j < k:  # loses those of the hop leaving it
            e = hops[j, 2]
            c += inst_time(n[e, g] - x, p) - inst_time(n[e, g], p)
        out[j] = c
        if c > m:
            m = c
    return m


@njit
def _path_move(n, ig, cnt, gl, gcnt, home, room, comp, pairs, F, cs, gs, pfloor, tol, p):
    """Apply the best augmenting path from the busiest GPU gs (see improve) that lowers it without raising the
    layer time: x pairs of expert e1 from gs to its instance on g1, x of e2 from g1 to its instance on g2, ...,
    to a GPU t below the busiest time. A GPU in between keeps its pairs; in compute-bound layers (every
    instance's time linear in its pairs) its time barely moves, so such a path balances GPUs that share no
    expert, where no single move or chain helps (the local search's trap in prefill layers: it stops up to
    several percent above the optimum on a ring of replicas). Paths are the shortest (breadth-first over the
    GPUs, along instances that carry pairs), to the _PATH_SINKS least busy GPUs reached; x balances gs and t
    (_best_x), or is the path's bottleneck (an instance emptied). comp and pairs are updated. Returns whether one was
    applied. (Sum-of-instances GPU times only, as _chain_move.)"""
    if p[_SUM] <= 0.0:
        return False
    E, G = n.shape
    par = np.full(G, -2, dtype=np.int64)  # -2: not reached, -1: the root
    via = np.zeros(G, dtype=np.int64)
    queue = np.empty(G, dtype=np.int64)
    par[gs] = -1
    queue[0] = gs
    head = 0
    tail = 1
    while head < tail:
        g = queue[head]
        head += 1
        for i in range(gcnt[g]):
            e = gl[g, i]
            if n[e, g] < 1.0:
                continue
            for k in range(cnt[e]):
                h = ig[e, k]
                if par[h] != -2 or _no_slot(n, home, room, e, h):
                    continue
                par[h] = g
                via[h] = e
                queue[tail] = h
                tail += 1
    if tail <= 1:
        return False
    on_path = np.zeros(G, dtype=np.bool_)
    hops = np.empty((G, 3), dtype=np.int64)
    new_c = np.empty(G + 1)
    best = 0.0
    best_t = -1
    best_x = 0.0
    tried = np.zeros(G, dtype=np.bool_)
    for _ in range(_PATH_SINKS):
        t = -1
        for j in range(1, tail):  # the least busy reached GPU not tried yet
            h = queue[j]
            if not tried[h] and comp[h] < cs - tol and (t < 0 or comp[h] < comp[t]):
                t = h
        if t < 0:
            break
        tried[t] = True
        k = _path_hops(par, via, t, hops)
        b = np.inf
        for j in range(k):
            v = np.floor(n[hops[j, 2], hops[j, 0]])
            if v < b:
                b = v
        if b < 1.0:
            continue
        # x: where the root's time meets the end's (the root's falls with x, the end's rises: _best_x on the first
        # hop's instance at the root and the last hop's at the end), at most the path's bottleneck b
        e1 = hops[0, 2]
        ek = hops[k - 1, 2]
        n1 = n[e1, gs]
        n2 = n[ek, t]
        x0, _, _ = _best_x(n1, n2, comp[gs] - inst_time(n1, p), comp[t] - inst_time(n2, p), p)
        x0 = min(max(x0, 1.0), b)
        for j in range(k + 1):
            on_path[_path_gpu(hops, k, j)] = True
        rest = 0.0
        qrest = pfloor
        for g in range(G):
            if not on_path[g] and comp[g] > rest:
                rest = comp[g]
            if g != gs and g != t and pairs[g] > qrest:
                qrest = pairs[g]
        for j in range(k + 1):
            on_path[_path_gpu(hops, k, j)] = False
        for c in range(2):  # the balancing x, and the bottleneck whole (an instance emptied)
            x = x0 if c == 0 else b
            if c == 1 and b == x0:
                continue
            top = _path_times(n, hops, k, comp, x, p, new_c)
            # the GPUs whose time this path raises (the root's falls): each must stay below the busiest time; a
            # GPU in between whose time does not rise (beyond rounding) may stay where it is, at the busiest
            # time too (ties: the root leaves them, so the busiest GPUs still become fewer)
            local = new_c[k]
            for j in range(1, k):
                if new_c[j] > comp[hops[j, 0]] + tol and new_c[j] > local:
                    local = new_c[j]
            if local >= cs - tol or new_c[0] >= cs - tol:
                continue
            pm = max(qrest, max(pairs[gs] - x, pairs[t] + x))
            gain = _compound_gain(F, max(rest, top) + 2.0 * p[_A2A] * pm, cs, local, tol)
            if gain > best + tol:
                best = gain
                best_t = t
                best_x = x
    if best_t < 0:
        return False
    k = _path_hops(par, via, best_t, hops)
    x = best_x
    _path_times(n, hops, k, comp, x, p, new_c)
    for j in range(k):
        e = hops[j, 2]
        _shift(n, room, home, e, hops[j, 0], -x)
        _shift(n, room, home, e, hops[j, 1], x)
    for j in range(k + 1):
        comp[_path_gpu(hops, k, j)] = new_c[j]
    pairs[gs] -= x
    pairs[best_t] += x
    return True


@njit
def _resort(order, comp):
    """order: the GPUs by (comp, index) ascending again after a few entries of comp changed (insertion sort:
    the same order a stable sort gives, in O(G) for few changes)."""
    for i in range(1, order.shape[0]):
        g = order[i]
        c = comp[g]
        j = i
        while j > 0 and (comp[order[j - 1]] > c or (comp[order[j - 1]] == c and order[j - 1] > g)):
            order[j] = order[j - 1]
            j -= 1
        order[j] = g


@njit
def _insert_sorted(gl, gcnt, g, e):
    """Add expert e to GPU g's ascending list."""
    j = gcnt[g]
    while j > 0 and gl[g, j - 1] > e:
        gl[g, j] = gl[g, j - 1]
        j -= 1
    gl[g, j] = e
    gcnt[g] += 1


@njit
def improve(n, has, ig, cnt, gl, gcnt, home, p, total, max_moves, new_ok, room, copy_host, copy_peer, holder,
            link_group, link_wait, lookahead, horizon, stall, rng):
    """Local search on n [E, G] in place (see the module docstring). Returns the number of moves.

    home [E, G]: the instances that always stay in the plan; any other instance takes one of its GPU's room [G]
    slots while it carries pairs (a move onto an empty one needs room, a move that empties one gives it back).
    new_ok: whether moves may create instances (on the _NEW_TARGETS least-busy GPUs with room; has, ig, cnt, gl
    and gcnt are updated). Then copy_host / copy_peer (seconds of a new instance's copy from the host, or from
    a peer GPU of its link group: where holder [E, groups] marks a loaded instance of e in g's group of
    link_group GPUs), link_wait [G] (seconds each GPU's links are already busy, this layer's copies included:
    updated), lookahead (seconds the look-ahead hides), horizon (iterations a new instance is expected to
    serve) and stall [1] (the layer's stall so far: updated). rng [2]: an interval of 1 / horizon holding the
    given one, narrowed (_narrow) to where every comparison the search made on a new instance's score keeps its
    outcome, so that the search takes the same moves for any horizon whose inverse lies strictly inside."""
    E, G = n.shape
    comp = np.zeros(G)
    pairs = np.zeros(G)
    gpu_times(n, ig, cnt, p, comp, pairs)
    tops = np.zeros(6, dtype=np.int64)
    pfloor = total / G if p[_FLOOR] > 0.0 else 0.0
    peer = link_group > 1 and copy_peer < copy_host
    sum_mode = p[_SUM] > 0.0
    x0 = 1.0 / horizon
    order = np.argsort(comp, kind="mergesort") if new_ok else np.zeros(1, dtype=np.int64)
    moves = 0
    while moves < max_moves:
        _top3(comp, pairs, tops)
        gs = tops[0]
        cs = comp[gs]
        # the layer time (layer_time) from the maxima
        pm = pairs[tops[3]] if pairs[tops[3]] > 0.0 else 0.0
        if pfloor > pm:
            pm = pfloor
        F = (cs if cs > 0.0 else 0.0) + 2.0 * p[_A2A] * pm
        tol = 1e-12 * (F if F > 1e-300 else 1.0)
        # the top three GPUs by expert time and by pairs, as scalars (the candidates below read them)
        c1, c2 = tops[1], tops[2]
        cv1 = comp[c1] if c1 >= 0 else 0.0
        cv2 = comp[c2] if c2 >= 0 else 0.0
        q0, q1, q2 = tops[3], tops[4], tops[5]
        qv0 = pairs[q0] if q0 >= 0 else 0.0
        qv1 = pairs[q1] if q1 >= 0 else 0.0
        qv2 = pairs[q2] if q2 >= 0 else 0.0
        best_score = 0.0
        best_d = 0.0  # best_score = best_d - best_c / horizon
        best_c = 0.0
        best_e = -1
        best_g = -1
        best_x = 0.0
        best_new = False
        best_a = 0.0
        best_b = 0.0
        for i in range(gcnt[gs]):
            e = gl[gs, i]
            if n[e, gs] < 1.0:
                continue
            for k in range(cnt[e]):  # the expert's other instances: free moves
                gb = ig[e, k]
                if gb == gs:
                    continue
                if _no_slot(n, home, room, e, gb):
                    continue
                if comp[gb] >= cs - tol:  # gb's time only rises with x: the busiest GPU could not get lighter
                    continue
                if sum_mode:
                    ba, bb = cs - inst_time(n[e, gs], p), comp[gb] - inst_time(n[e, gb], p)  # (_base_times)
                else:
                    ba, bb = _base_times(n, gl, gcnt, e, gs, gb, cs, comp[gb], p)
                s, x, a, b, d = _eval_move(n[e, gs], n[e, gb], ba, bb, False, F, cs,
                                           _max_except(gs, cs, c1, cv1, c2, cv2, gs, gb),
                                           _max_except(q0, qv0, q1, qv1, q2, qv2, gs, gb), pairs[gs], pairs[gb],
                                           pfloor, tol, p, 0.0, horizon)
                if s >= 0.0 and best_c != 0.0:  # (against a new instance's score)
                    _narrow(rng, 0, d - best_d - tol, best_c, x0)
                if s > best_score + tol:
                    best_score, best_e, best_g, best_x, best_new, best_a, best_b = s, e, gb, x, False, a, b
                    best_d, best_c = d, 0.0
            if not new_ok:
                continue
            tried = 0
            for k in range(G):  # new instances on the least-busy GPUs with room
                gb = order[k]
                if gb == gs or has[e, gb] or room[gb] <= 0:
                    continue
                if comp[gb] >= cs - tol:  # (as above; the GPUs come least busy first, so no later one helps)
                    break
                cs_e = copy_peer if peer and holder[e, gb // link_group] else copy_host
                n[e, gb] = 0.0  # (not an instance of e yet: its entry may hold anything)
                if sum_mode:
                    ba, bb = cs - inst_time(n[e, gs], p), comp[gb]  # (_base_times: no instance of e on gb yet)
                else:
                    ba, bb = _base_times(n, gl, gcnt, e, gs, gb, cs, comp[gb], p)
                # the copy's per-iteration cost: the stall it adds (beyond what the look-ahead hides and the layer
                # already waits), spread over the instance's expected warm life
                s_g = link_wait[gb] + cs_e - lookahead
                extra = s_g - stall[0] if s_g > stall[0] else 0.0
                s, x, a, b, d = _eval_move(n[e, gs], 0.0, ba, bb, True, F, cs,
                                           _max_except(gs, cs, c1, cv1, c2, cv2, gs, gb),
                                           _max_except(q0, qv0, q1, qv1, q2, qv2, gs, gb), pairs[gs], pairs[gb],
                                           pfloor, tol, p, extra, horizon)
                if d > tol and extra > 0.0:  # (the score against tol: d - extra / horizon)
                    _narrow(rng, 0, d - tol, -extra, x0)
                if s >= 0.0 and best_c != extra:  # (against the best so far)
                    _narrow(rng, 0, d - best_d - tol, best_c - extra, x0)
                if s > best_score + tol:
                    best_score, best_e, best_g, best_x, best_new, best_a, best_b = s, e, gb, x, True, a, b
                    best_d, best_c = d, extra
                tried += 1
                if tried >= _NEW_TARGETS:
                    break
        if best_e < 0:
            # no single move helps: try a chain, all of e's pairs on the busiest GPU to its instance on gb while
            # all of f's pairs on gb go to f's instance on gc (gb would otherwise become the busiest: the
            # local search's trap in memory-bound layers, where a GPU's time counts its active experts); then an
            # augmenting path, x pairs passed along GPUs to one that shares no expert with the busiest (the trap
            # in compute-bound layers: prefill on rings of replicas)
            if (not sum_mode and p[_A2A] > 0.0 and q0 >= 0
                    and _a2a_move(n, ig, cnt, gl, gcnt, home, room, comp, pairs, F, cs, q0, q1, qv1, q2, qv2, gs,
                                  cs, c1, cv1, c2, cv2, pfloor, tol, p)) or \
                    _chain_move(n, ig, cnt, gl, gcnt, home, room, comp, pairs, F, cs, gs, pfloor, tol, p) or \
                    _path_move(n, ig, cnt, gl, gcnt, home, room, comp, pairs, F, cs, gs, pfloor, tol, p):
                moves += 1
                if new_ok:
                    _resort(order, comp)
                continue
            break
        _apply_move(n, home, room, comp, pairs, best_e, gs, best_g, best_x, best_a, best_b)
        if best_new:
            has[best_e, best_g] = True
            ig[best_e, cnt[best_e]] = best_g
            cnt[best_e] += 1
            _insert_sorted(gl, gcnt, best_g, best_e)
            cs_e = copy_peer if peer and holder[best_e, best_g // link_group] else copy_host
            link_wait[best_g] += cs_e
            s_g = link_wait[best_g] - lookahead
            if s_g > stall[0]:
                stall[0] = s_g
        if new_ok:
            _resort(order, comp)
        moves += 1
    return moves


@njit
def order_desc(W):
    """The indices of W [E] by value, largest first, ties to the lower index (np.argsort(-W, kind="stable")).
    Whole, non-negative counts of at most 4 E + 64 (decode's, and most prefill's): a counting sort, O(E + max),
    several times faster than numba's merge sort at DeepSeek-V3's 256 experts; else that merge sort."""
    E = W.shape[0]
    mx = 0.0
    for e in range(E):
        w = W[e]
        if not w >= 0.0 or w != np.floor(w) or w > 4.0 * E + 64.0:
            return np.argsort(-W, kind="mergesort")
        if w > mx:
            mx = w
    M = int(mx)
    start = np.zeros(M + 2, dtype=np.int64)  # start[M - w + 1] counts the experts of load w, then positions
    for e in range(E):
        start[M - int(W[e]) + 1] += 1
    for v in range(1, M + 2):
        start[v] += start[v - 1]
    out = np.empty(E, dtype=np.int64)
    for e in range(E):
        key = M - int(W[e])
        out[start[key]] = e
        start[key] += 1
    return out


@njit
def lpt_seed(W, order, ig, cnt, p, n):
    """n [E, G] (zeroed here on the instances): each expert whole on one of its instances, largest first, onto
    the GPU that then finishes earliest (ties: the earlier instance)."""
    E, G = n.shape
    _zero(n, ig, cnt)
    comp = np.zeros(G)
    for k in range(E):  # order: the experts by load, largest first (ties: the lower expert)
        e = order[k]
        w = W[e]
        if w <= 0.0:
            continue
        t = inst_time(w, p)
        best = -1
        best_t = 0.0
        for j in range(cnt[e]):
            g = ig[e, j]
            if p[_SUM] > 0.0:
                f = comp[g] + t
            else:
                f = comp[g] if comp[g] > t else t
            if best < 0 or f < best_t:
                best = g
                best_t = f
        if best >= 0:  # (an expert without an instance has nowhere to go: a lossy plan, priced without it)
            n[e, best] = w
            comp[best] = best_t


@njit
def primary_seed(W, primary, ig, cnt, n):
    """n [E, G] (zeroed here on the instances): each expert whole on its primary GPU (one of its instances)."""
    _zero(n, ig, cnt)
    for e in range(W.shape[0]):
        if cnt[e] > 0:
            n[e, primary[e]] = W[e]


@njit
def waterfill_seed(W, order, ig, cnt, n):
    """n [E, G] (zeroed here on the instances): pairs balanced over GPUs, ignoring weight reads: experts, largest
    first, poured onto their GPUs' lowest pair levels (integers; the remainder one pair each to the lowest); a
    second sweep pours each expert again given all the others."""
    E, G = n.shape
    _zero(n, ig, cnt)
    level = np.zeros(G)
    gs = np.zeros(G, dtype=np.int64)
    lv = np.zeros(G)
    for sweep in range(2):
        for k in range(E):
            e = order[k]
            w = W[e]
            if w <= 0.0:
                continue
            m = cnt[e]
            for i in range(m):
                g = ig[e, i]
                level[g] -= n[e, g]
                n[e, g] = 0.0
                gs[i] = g
            # the instances' GPUs by level (insertion sort: few per expert), ties to the lower GPU
            for i in range(m):
                lv[i] = level[gs[i]]
            for i in range(1, m):
                j = i
                while j > 0 and (lv[j] < lv[j - 1] or (lv[j] == lv[j - 1] and gs[j] < gs[j - 1])):
                    tl = lv[j]
                    lv[j] = lv[j - 1]
                    lv[j - 1] = tl
                    tg = gs[j]
                    gs[j] = gs[j - 1]
                    gs[j - 1] = tg
                    j -= 1
            # raise the lowest k columns to a common level
            csum = 0.0
            k_wet = 1
            for i in range(m):
                csum += lv[i]
                if (i + 1) * lv[i] - csum <= w:
                    k_wet = i + 1
                else:
                    break
            tot = w
            for i in range(k_wet):
                tot += lv[i]
            lev = np.floor(tot / k_wet)
            extra = tot - lev * k_wet
            for i in range(k_wet):
                x = lev - lv[i] + (1.0 if i < extra else 0.0)
                n[e, gs[i]] = x
                level[gs[i]] += x


@njit
def even_seed(W, ig, cnt, n):
    """n [E, G] (zeroed here on the instances): each expert's pairs evenly over its instances (the engines' split;
    integers, the first instances take the remainder)."""
    _zero(n, ig, cnt)
    for e in range(W.shape[0]):
        m = cnt[e]
        if m == 0:
            continue
        base = np.floor(W[e] / m)
        extra = W[e] - base * m
        for k in range(m):
            n[e, ig[e, k]] = base + (1.0 if k < extra else 0.0)


@njit
def _split_lists(W, has, ig, cnt, gl, gcnt, primary, p, max_moves, n_out, one_search=False, estimated=None):
    """time_split on prepared instance lists (see time_split); n_out is written on the instances only. one_search:
    where both searches would run, only the one from the faster seed does (an estimate at half the cost, never
    below the full split; estimated [1], if given, is set to whether it was one)."""
    E, G = has.shape
    total = 0.0
    single = True
    for e in range(E):
        total += W[e]
        if cnt[e] > 1:
            single = False
    comp = np.zeros(G)
    pairs = np.zeros(G)
    primary_seed(W, primary, ig, cnt, n_out)
    gpu_times(n_out, ig, cnt, p, comp, pairs)
    best = layer_time(comp, pairs, total, p)
    if single:
        return best
    # search 1: from the faster of the primary and LPT seeds (memory-bound layers: experts whole); search 2:
    # from the faster of the pair water-filling and even seeds (compute-bound layers); the faster result wins
    # (ties: search 1). Where every replicated expert is far on one side of the roofline's ridge (n* pairs,
    # where compute time = weight-read time), only that side's search runs.
    ridge = p[_READ] / (p[_FLOP] - p[_ACT]) if p[_FLOP] > p[_ACT] else np.inf
    lo_w = np.inf
    hi_w = 0.0
    for e in range(E):
        if cnt[e] > 1 and W[e] > 0.0:
            lo_w = min(lo_w, W[e] / cnt[e])
            hi_w = max(hi_w, W[e])
    run1 = not (lo_w >= 4.0 * ridge)  # some replicated expert is not far above the ridge once spread
    run2 = not (hi_w <= ridge)  # some replicated expert is above it whole
    # every seed once (only the instances' entries of these arrays are ever written or read)
    order = order_desc(W)  # the experts by load, largest first, for the LPT and pouring seeds
    even = np.empty((E, G))  # the engines' even split, as it is: the result is never slower than it
    even_seed(W, ig, cnt, even)
    gpu_times(even, ig, cnt, p, comp, pairs)
    f_even = layer_time(comp, pairs, total, p)
    cand = np.empty((E, G))
    wf = np.empty((E, G))
    f_lpt = np.inf
    f_wf = np.inf
    if run1:
        lpt_seed(W, order, ig, cnt, p, cand)
        gpu_times(cand, ig, cnt, p, comp, pairs)
        f_lpt = layer_time(comp, pairs, total, p)
    if run2:
        waterfill_seed(W, order, ig, cnt, wf)
        gpu_times(wf, ig, cnt, p, comp, pairs)
        f_wf = layer_time(comp, pairs, total, p)
    if one_search and run1 and run2:  # the faster seed's search only
        if min(f_lpt, best) <= min(f_wf, f_even):
            run2 = False
        else:
            run1 = False
        if estimated is not None:
            estimated[0] = True
    room = np.full(G, E + 1, dtype=np.int64)  # a fixed plan: its instances hold their slots already
    holder = np.zeros((1, 1), dtype=np.bool_)
    wait = np.zeros(G)
    stall = np.zeros(1)
    if run1:  # from the faster of the primary seed (in n_out) and LPT
        if f_lpt < best * (1.0 - 1e-12):
            _copy(n_out, cand, ig, cnt)
        # (no new instances: nothing depends on the horizon, and the interval (wait) is never narrowed)
        improve(n_out, has, ig, cnt, gl, gcnt, has, p, total, max_moves, False, room, 0.0, 0.0, holder, 1, wait,
                0.0, 1.0, stall, wait)
        gpu_times(n_out, ig, cnt, p, comp, pairs)
        best = layer_time(comp, pairs, total, p)
    if not run2:
        if f_even < best * (1.0 - 1e-12):
            _copy(n_out, even, ig, cnt)
            best = f_even
        return best
    if f_even < f_wf * (1.0 - 1e-12):  # from the faster of water-filling and the even split
        _copy(wf, even, ig, cnt)
    improve(wf, has, ig, cnt, gl, gcnt, has, p, total, max_moves, False, room, 0.0, 0.0, holder, 1, wait, 0.0,
            1.0, stall, wait)
    gpu_times(wf, ig, cnt, p, comp, pairs)
    f = layer_time(comp, pairs, total, p)
    if f < best * (1.0 - 1e-12) or not run1:
        best = f
        _copy(n_out, wf, ig, cnt)
    return best


@njit
def time_split_on(W, has, ig, cnt, gl, gcnt, primary, p, max_moves, n_out):
    """time_split on the instance lists of `has` (instance_lists): n_out is written, and meaningful, on the
    instances only."""
    return _split_lists(W, has, ig, cnt, gl, gcnt, primary, p, max_moves, n_out)


@njit
def time_split(W, has, primary, p, max_moves, n_out):
    """The time-aware split of W over the instances `has` into n_out; returns its layer time. Forced when every
    expert has one instance; else two local searches (in _split_lists) and the faster result."""
    n_out[:, :] = 0.0
    ig, cnt, gl, gcnt = instance_lists(has)
    return _split_lists(W, has, ig, cnt, gl, gcnt, primary, p, max_moves, n_out)


@njit
def dense_times(n, p, total):
    """Layer time of a dense split."""
    E, G = n.shape
    ig = np.zeros((E, G), dtype=np.int64)
    cnt = np.zeros(E, dtype=np.int64)
    build_lists(n > 0.0, ig, cnt)
    comp = np.zeros(G)
    pairs = np.zeros(G)
    gpu_times(n, ig, cnt, p, comp, pairs)
    return layer_time(comp, pairs, total, p)


@njit
def primary_of(has, home_gpu, out):
    """out [E]: each expert's home GPU where `has` holds it there, else its first instance's GPU."""
    E, G = has.shape
    for e in range(E):
        g0 = home_gpu[e]
        if not has[e, g0]:
            g0 = -1
            for g in range(G):
                if has[e, g]:
                    g0 = g
                    break
        out[e] = g0


@njit
def dense_layout(l2p, S, home_gpu, use_home, has, primary, rg, first, valid):
    """moeless.policy.base.DenseLayout's arrays from a layer's log2phy l2p [E, R] (slots ascending, -1 pads at
    the end): valid [E, R] (a slot), rg [E, R] (its GPU, 0 on pads), has [E, G] (all False on entry), first
    [E, R] (the first replica of its expert on its GPU) and primary [E] (the home GPU home_gpu[e] where has
    holds it and `use_home`, else the first replica's GPU)."""
    E, R = l2p.shape
    for e in range(E):
        for r in range(R):
            s = l2p[e, r]
            v = s >= 0
            g = s // S if v else 0
            valid[e, r] = v
            rg[e, r] = g
            first[e, r] = v and (r == 0 or g != rg[e, r - 1])
            if v:
                has[e, g] = True
        primary[e] = rg[e, 0] if R > 0 else 0
        if use_home and has[e, home_gpu[e]]:
            primary[e] = home_gpu[e]


@njit
def _split_of(W, mask, ig, cnt, primary, p, max_moves, total_mask):
    """time_split of W over the instances mask [E, G] (total_mask of them), taken from the lists (ig, cnt) when
    they hold them all, else from a scan of the mask."""
    E, G = mask.shape
    ig2 = np.empty((E, G), dtype=np.int64)
    cnt2 = np.zeros(E, dtype=np.int64)
    if _sub_lists(ig, cnt, mask, ig2, cnt2) != total_mask:
        build_lists(mask, ig2, cnt2)
    gl2 = np.empty((G, E), dtype=np.int64)
    gcnt2 = np.zeros(G, dtype=np.int64)
    gpu_lists(ig2, cnt2, gl2, gcnt2)
    scratch = np.empty((E, G))
    return _split_lists(W, mask, ig2, cnt2, gl2, gcnt2, primary, p, max_moves, scratch)


@njit
def fill_replicas(W, keep, live_has, S, p, copy_host, copy_peer, holder, link_group, horizon, out, rng):
    """The fill candidate of a compute-bound layer: out [E, G] (all False on entry) gets the instances `keep` [E, G]
    (the robust step passes the homes alone) plus replicas in every GPU's free slots (S minus its kept instances)
    for the experts whose pairs a split shortens: replicas go one at a time to the expert with the most pairs per
    instance, while that expert's pairs per instance with one more stay at or above the roofline's ridge (a replica
    below it adds a weight read instead of saving compute; at most one instance per GPU); then they are placed
    largest pairs per instance first (LPT), each on the GPU whose estimated expert time (its instances at their
    expert's even share) plus the copy's stall (the copies queued on its links so far, this one included) over the
    instance's expected warm life (`horizon`; none where live_has holds a live instance, peer copies as in
    `improve`) is least. The robust step's layout for a layer's spikes (MoelessPolicy._robust, on its heaviest
    scenario): the local search moves pairs off the busiest GPU one expert at a time and stops short of such layouts
    where every spare slot must change hands (few large experts, one spare slot per GPU). Returns the number of
    replicas placed. rng [4]: its entries 2 and 3, an interval of 1 / horizon holding the given one, are narrowed
    (_narrow) to where every choice of GPU stays the same."""
    E, G = keep.shape
    ridge = p[_READ] / (p[_FLOP] - p[_ACT]) if p[_FLOP] > p[_ACT] else np.inf
    cnt = np.zeros(E, dtype=np.int64)
    free = np.full(G, S, dtype=np.int64)
    for e in range(E):
        for g in range(G):
            if keep[e, g]:
                out[e, g] = True
                cnt[e] += 1
                free[g] -= 1
    slots = 0
    for g in range(G):
        if free[g] > 0:
            slots += free[g]
    extra = np.zeros(E, dtype=np.int64)
    # the candidates, ascending: an expert leaves for good once one more replica would put it below the ridge or
    # it has an instance on every GPU (its count only grows), so each round scans the ones still in
    cand = np.empty(E, dtype=np.int64)
    nc = 0
    for e in range(E):
        if 1 <= cnt[e] < G and W[e] / (cnt[e] + 1.0) >= ridge:
            cand[nc] = e
            nc += 1
    for _ in range(slots):
        best = -1
        bv = 0.0
        j = 0
        for i in range(nc):
            e = cand[i]
            c = cnt[e] + extra[e]
            v = W[e] / (c + 1.0)
            if c >= G or not v >= ridge:
                continue  # (dropped)
            cand[j] = e
            j += 1
            if v > bv:
                best = e
                bv = v
        nc = j
        if best < 0:
            break
        extra[best] += 1
    per = np.zeros(E)
    est = np.zeros(G)
    for e in range(E):
        if cnt[e] > 0:
            per[e] = W[e] / (cnt[e] + extra[e])
            for g in range(G):
                if keep[e, g]:
                    est[g] = _add_time(est[g], per[e], p)
    key = np.zeros(E)
    for e in range(E):
        key[e] = -per[e] if extra[e] > 0 else 0.0
    order = np.argsort(key, kind="mergesort")  # (ties: the lower expert first)
    peer = link_group > 1 and copy_peer < copy_host
    wait = np.zeros(G)  # (a decision well ahead: nothing queued before it, no look-ahead counted)
    y0 = 1.0 / horizon
    placed = 0
    for i in range(E):
        e = order[i]
        if extra[e] <= 0:
            break
        for r in range(extra[e]):
            bg = -1
            bv = np.inf
            bc = 0.0
            b_fixed = 0.0  # bv = b_fixed + b_stall / horizon
            b_stall = 0.0
            for g in range(G):
                if free[g] <= 0 or out[e, g]:
                    continue
                v = _add_time(est[g], per[e], p)
                fixed = v
                stall = 0.0
                cs = 0.0
                if not live_has[e, g]:
                    cs = copy_peer if peer and holder[e, g // link_group] else copy_host
                    stall = wait[g] + cs
                    v += stall / horizon
                if bg >= 0 and stall != b_stall:
                    _narrow(rng, 2, b_fixed - fixed, b_stall - stall, y0)
                if v < bv:
                    bg = g
                    bv = v
                    bc = cs
                    b_fixed = fixed
                    b_stall = stall
            if bg < 0:
                break
            out[e, bg] = True
            free[bg] -= 1
            est[bg] = _add_time(est[bg], per[e], p)
            wait[bg] += bc
            placed += 1
    return placed


@njit
def decide_layer(W, live, loaded, pinned, S, cur_has, n_cur, home, home_gpu, p, max_moves, copy_host, copy_peer,
                 link_group, link_wait, lookahead, horizon, has_out, rng):
    """moeless's decision for one layer (moeless.policy.serverless): has_out [E, G] (all False on entry) gets the
    chosen instances.

    live / loaded / pinned [G*S]: each slot's live instance (expert, -1 free), whether its weights are in, and
    whether the plan keeps it whatever its predicted pairs (used within its keep-alive: a hedge the split can
    use for free); home [E, G]: the homes, home_gpu [E] (home[e, g] holds exactly where g = home_gpu[e]);
    n_cur: the instances of cur_has (its True entries); link_wait [G]: seconds
    until each GPU's copy links are free (read only); rng [2]: an interval of 1 / horizon, narrowed to where the
    decision stays the same (improve's). Returns 0 (the new plan), 1 (keep the current plan) or 2
    (the homes alone)."""
    E, G = home.shape
    total = 0.0
    for e in range(E):
        total += W[e]
    has = home.copy()
    keep = home.copy()
    for s in range(live.shape[0]):
        if live[s] >= 0:
            has[live[s], s // S] = True
            if pinned[s]:
                keep[live[s], s // S] = True
    ig, cnt, gl, gcnt = _slot_lists(home_gpu, live, S, G)
    cnt0 = cnt.copy()  # (improve appends the instances it creates after these)
    n = np.empty((E, G))  # (written on the instances; improve zeroes a new instance's entry before pricing it)
    first_est = np.zeros(1, dtype=np.bool_)
    t_first = _split_lists(W, has, ig, cnt, gl, gcnt, home_gpu, p, max_moves, n, True, first_est)
    n_first = cnt0.sum()
    room = np.full(G, S, dtype=np.int64)
    for e in range(E):
        for k in range(cnt[e]):
            g = ig[e, k]
            if keep[e, g] or n[e, g] >= 1.0:
                room[g] -= 1
    peer = link_group > 1 and copy_peer < copy_host
    holder = np.zeros(((G + link_group - 1) // link_group if peer else 1, E), dtype=np.bool_).T
    if peer:
        mark_holders(live, loaded, S, link_group, holder)
    stall = np.zeros(1)
    wait = link_wait.copy()
    improve(n, has, ig, cnt, gl, gcnt, keep, p, total, max_moves, True, room, copy_host, copy_peer, holder,
            link_group, wait, lookahead, horizon, stall, rng)
    # the chosen instances (all among the lists), and whether they are the current plan's
    n_out = 0
    n_out_first = 0  # of them among the first split's instances
    n_cur_in = 0
    n_cur_first = 0
    same = True
    for e in range(E):
        for k in range(cnt[e]):
            g = ig[e, k]
            v = keep[e, g] or n[e, g] >= 1.0
            if v:
                has_out[e, g] = True
                n_out += 1
                if k < cnt0[e]:
                    n_out_first += 1
            if cur_has[e, g]:
                n_cur_in += 1
                if k < cnt0[e]:
                    n_cur_first += 1
            if v != cur_has[e, g]:
                same = False
    if same and n_cur == n_cur_in:
        return 1
    # do no harm: the predicted time under the split the data plane will run, against the current plan and the
    # homes alone (ties keep the current plan, then the homes)
    # (a plan holding exactly the first split's instances, homes among them, is priced by that split already:
    # the same loads, instance lists and primaries give the same search)
    prim = np.zeros(E, dtype=np.int64)
    if n_out == n_first and n_out_first == n_first and not first_est[0]:
        t_new = t_first
    else:
        primary_of(has_out, home_gpu, prim)
        t_new = _split_of(W, has_out, ig, cnt, prim, p, max_moves, n_out)
    if n_cur == n_first and n_cur_first == n_first and not first_est[0]:
        t_cur = t_first
    else:
        primary_of(cur_has, home_gpu, prim)
        t_cur = _split_of(W, cur_has, ig, cnt, prim, p, max_moves, n_cur)
    t_home = t_cur
    cur_is_home = n_cur == n_cur_in and n_cur == E  # the current plan holds no more than E instances ...
    if cur_is_home:
        for e in range(E):  # ... and they are the homes
            if not cur_has[e, home_gpu[e]]:
                cur_is_home = False
                break
    if not cur_is_home:
        t_home = _split_of(W, home, ig, cnt, home_gpu, p, max_moves, E)
    tol = 1e-9 * max(t_cur, t_home, 1e-12)
    if t_new > min(t_cur, t_home) + tol:
        return 1 if t_cur <= t_home + tol else 2
    return 0


@njit
def decide_live(loads, live, ready, model_t, link_free, last_use, since, pins, S, cur_has, n_cur, home, home_gpu, p,
                max_moves, copy_host, copy_peer, link_group, lookahead, horizon, W, loaded, link_wait, pinned, has_out,
                rng):
    """The engine's decision in one call (MoelessPolicy.decide_live): the context arrays from the engine's live
    state (context_arrays; pinned all False unless `pins`), the loads rounded into W (round_loads) and
    decide_layer (link_group at least 1, horizon at least 1e-9). loaded / link_wait / pinned / W / has_out are
    written (has_out is cleared first), rng narrowed (decide_layer's).
    Returns (code, largest rounded load): decide_layer's code, -1 when the rounded loads hold no pair, -2 when an
    array has another length than the layer's E experts, G*S slots and G GPUs or a live expert lies outside
    [-1, E) (nothing is read past the checks then)."""
    E, G = home.shape
    P = G * S
    if loads.shape[0] != E or ready.shape[0] != P or last_use.shape[0] != P or link_free.shape[0] != G \
            or W.shape[0] != E or home_gpu.shape[0] != E or cur_has.shape[0] != E or cur_has.shape[1] != G \
            or has_out.shape[0] != E or has_out.shape[1] != G \
            or not context_ok(live, loaded, pinned, link_wait, E, G, S):
        return -2, 0.0
    context_arrays(live, ready, model_t, link_free, last_use, since, loaded, link_wait, pinned)
    if not pins:
        pinned[:] = False
    tot, w_max = round_loads(loads, W)
    if not tot > 0:
        return -1, w_max
    has_out[:, :] = False
    return decide_layer(W, live, loaded, pinned, S, cur_has, n_cur, home, home_gpu, p, max_moves, copy_host,
                        copy_peer, max(1, link_group), link_wait, lookahead, max(horizon, 1e-9), has_out, rng), w_max


@njit
def context_arrays(live, ready, model_t, link_free, last_use, since, loaded, link_wait, pinned):
    """The engine's per-decision arrays in one pass: loaded [G*S] (a live slot's copy is in by model time
    model_t), link_wait [G] (seconds until each GPU's links are free) and pinned [G*S] (a live instance used
    since `since`)."""
    for s in range(live.shape[0]):
        loaded[s], pinned[s] = slot_flags(live[s], ready[s], last_use[s], model_t, since)
    for g in range(link_free.shape[0]):
        w = link_free[g] - model_t
        link_wait[g] = w if w > 0.0 else 0.0


@njit
def slot_flags(expert, ready, last_use, model_t, since):
    """(loaded, pinned) of one slot holding `expert` (-1: free): its copy is in by model time model_t, and it
    holds a live instance used since `since` (the keep-alive's start)."""
    return ready <= model_t, expert >= 0 and last_use >= since


@njit
def count_status(c, integral):
    """Whether the counts c [E] are usable: 0 (finite, non-negative and, if `integral`, whole), 1 (a negative or
    non-finite entry), 2 (a fractional entry where whole counts are required). One pass, for the checks of every
    call's counts (numpy's reductions cost ~0.6 us each on a few entries)."""
    status = 0
    for i in range(c.shape[0]):
        v = c[i]
        if not v >= 0 or v == np.inf:  # (NaN fails the first test)
            return 1
        if integral and v != np.floor(v):
            status = 2
    return status


@njit
def total(v):
    """Sum of v [n] (compiled: numpy's sum costs ~0.6 us on a few entries)."""
    t = 0.0
    for i in range(v.shape[0]):
        t += v[i]
    return t


@njit
def context_ok(live, loaded, pinned, link_wait, E, G, S):
    """Whether a decision's context arrays have the shapes the loops index ([G*S] slots, [G] links) and every
    live slot's expert lies in [-1, E)."""
    P = G * S
    if live.shape[0] != P or loaded.shape[0] != P or pinned.shape[0] != P or link_wait.shape[0] != G:
        return False
    for s in range(P):
        if live[s] < -1 or live[s] >= E:
            return False
    return True


@njit
def round_loads(loads, W):
    """W = loads rounded to whole pairs, negatives to 0; returns (sum, max) of W."""
    tot = 0.0
    mx = 0.0
    for e in range(loads.shape[0]):
        v = np.rint(loads[e]) if loads[e] > 0.0 else 0.0
        W[e] = v
        tot += v
        if v > mx:
            mx = v
    return tot, mx


@njit
def hedge_fill(keep, room, W, S, has_out):
    """has_out [E, G] = keep plus hedge replicas in every free slot (room [G], consumed): round j gives each GPU g
    with room one replica of an expert kept on GPU g - 1 - j (mod G) that g does not hold yet, the one with the
    largest load per instance (W / instances so far, EPLB's rule): a ring at distance 1, then 2, ... (an
    expander over GPUs, so that the split can move a GPU's excess along it when the true loads differ from the
    prediction). Returns the replicas added. (has_out must be another array than keep.)"""
    E, G = keep.shape
    has_out[:, :] = keep
    count = np.zeros(E)
    kl = np.empty((G, E), dtype=np.int64)  # the experts kept on each GPU, ascending, with load (the candidates)
    kcnt = np.zeros(G, dtype=np.int64)
    for e in range(E):
        for g in range(G):
            if keep[e, g]:
                count[e] += 1.0
                if W[e] > 0.0:
                    kl[g, kcnt[g]] = e
                    kcnt[g] += 1
    added = 0
    for j in range(G - 1):
        any_room = False
        for g in range(G):
            if room[g] <= 0:
                continue
            any_room = True
            src = (g - 1 - j) % G
            best = -1
            best_v = 0.0
            for i in range(kcnt[src]):
                e = kl[src, i]
                if not has_out[e, g]:
                    v = W[e] / count[e]
                    if best < 0 or v > best_v:
                        best = e
                        best_v = v
            if best >= 0:
                has_out[best, g] = True
                count[best] += 1.0
                room[g] -= 1
                added += 1
        if not any_room:
            break
    return added


@njit
def place_replicas(inst, home, S, p2l):
    """The replicas of the instance set inst [E, G] (those not in home) into the free slots (-1) of the slot row
    p2l [G*S] that holds the homes: per GPU, experts ascending into the free slots ascending. False (p2l
    partly written) if a GPU has more replicas than free slots."""
    E, G = inst.shape
    for g in range(G):
        j = g * S
        for e in range(E):
            if inst[e, g] and not home[e, g]:
                while j < (g + 1) * S and p2l[j] >= 0:
                    j += 1
                if j == (g + 1) * S:
                    return False
                p2l[j] = e
                j += 1
    return True


@njit
def hedged_candidates(live, pinned, S, home, W, out_pinned, out_free):
    """The robust step's two hedged candidates (moeless.policy.serverless), into out_pinned / out_free [E, G] (any
    content on entry): the homes plus the pinned live instances (live / pinned [G*S]), or the homes alone, each
    plus hedge replicas in every free slot (hedge_fill)."""
    E, G = home.shape
    keep = home.copy()
    for s in range(live.shape[0]):
        if live[s] >= 0 and pinned[s]:
            keep[live[s], s // S] = True
    for has, out in ((keep, out_pinned), (home, out_free)):
        room = np.full(G, S, dtype=np.int64)
        for e in range(E):
            for g in range(G):
                if has[e, g]:
                    room[g] -= 1
        hedge_fill(has, room, W, S, out)


@njit
def mark_holders(live, loaded, S, link_group, holder):
    """holder [E, groups] (all False on entry): whether each group of link_group GPUs holds a loaded instance
    (loaded [G*S]) of each expert among the slots' live ones live [G*S] (a peer copy source)."""
    for s in range(live.shape[0]):
        if live[s] >= 0 and loaded[s]:
            holder[live[s], (s // S) // link_group] = True


@njit
def live_instances(live, loaded, S, link_group, peer, live_has, holder):
    """live_has [E, G] (all False on entry): the live instances of the slots' experts live [G*S]; with `peer`,
    holder (mark_holders)."""
    for s in range(live.shape[0]):
        if live[s] >= 0:
            live_has[live[s], s // S] = True
    if peer:
        mark_holders(live, loaded, S, link_group, holder)


@njit
def copy_seconds(has, live_has, holder, link_group, peer, copy_host, copy_peer):
    """Seconds of the copies the instances `has` [E, G] need (those not live: live_has): each from a peer GPU of
    the link group where one holds a loaded instance (with `peer`: holder, see live_instances), else from the
    host (counted by source, then n_host * copy_host + n_peer * copy_peer)."""
    G = has.shape[1]
    h = has.ravel()  # (one flat scan: most entries are no copy)
    lh = live_has.ravel()
    n_host = 0
    n_peer = 0
    for k in range(h.shape[0]):
        if h[k] and not lh[k]:
            if peer and holder[k // G, (k % G) // link_group]:
                n_peer += 1
            else:
                n_host += 1
    return n_host * copy_host + n_peer * copy_peer


@njit
def mean_time(scen, has, primary, p, max_moves, bound=np.inf, one_search=False):
    """Mean layer time of the instances `has` over the load scenarios scen [K, E] (each split on its own, by
    time_split, or by the faster seed's search alone with one_search: an estimate, never below it); inf as soon
    as the sum so far exceeds `bound` (a candidate that can no longer win is not priced further)."""
    return time_sum(scen, has, primary, p, max_moves, bound, one_search) / scen.shape[0]


@njit
def time_sum(scen, has, primary, p, max_moves, bound, one_search):
    """mean_time's sum over the scenarios (inf once it exceeds `bound`: the sum so far only grows, so exactly
    where the whole sum would)."""
    K, E = scen.shape
    G = has.shape[1]
    ig, cnt, gl, gcnt = instance_lists(has)
    n = np.empty((E, G))
    tot = 0.0
    for k in range(K):
        tot += _split_lists(scen[k], has, ig, cnt, gl, gcnt, primary, p, max_moves, n, one_search)
        if tot > bound:
            return np.inf
    return tot


@njit
def same_instances(a, b):
    """Whether the instance sets a and b [E, G] are the same (a flat scan: numba's np.array_equal walks an nditer,
    several times slower)."""
    x = a.ravel()
    y = b.ravel()
    for k in range(x.shape[0]):
        if x[k] != y[k]:
            return False
    return True


@njit
def _robust_price(scen, has, prim, i, j, ref_cost, mean, raw, copies, p, max_moves, estimate, rng, x0, y0):
    """The robust step's price of candidate i (has, prim): its mean time over the scenarios (mean_time: by the
    estimate, or exact; into mean[i]) plus its copies' seconds per warm life copies[i]; inf once it cannot win
    against ref_cost, candidate j's price (inf: none; the slack keeps every possible winner priced whole).

    Both prices are linear in the inverse warm lives (x0 for candidates 0 to 2, y0 from 3 on: copies = raw /
    life), and so is the bound the sum is cut at. The sum is priced up to that bound's largest value on the
    box rng [4] (its corners): a candidate cut there is cut for every life in the box; one priced whole has
    its cut at (x0, y0) decided as the bound says, and rng narrowed to where that outcome holds (_narrow2)."""
    K = scen.shape[0]
    if not ref_cost < np.inf:
        mean[i] = time_sum(scen, has, prim, p, max_moves, np.inf, estimate) / K
        return mean[i] + copies[i]
    bound = (ref_cost * (1 - 1e-12) - copies[i]) * K * (1 + 1e-9)  # (as mean_time's callers wrote it)
    kf = K * (1 + 1e-9)
    # bound(x, y) = a + bx x + by y
    a = kf * (1 - 1e-12) * mean[j]
    bx, by = _on_life(j, kf * (1 - 1e-12) * raw[j], 0.0, 0.0)
    bx, by = _on_life(i, -kf * raw[i], bx, by)
    top = a
    if bx != 0.0:
        top += bx * (rng[1] if bx > 0.0 else rng[0])
    if by != 0.0:
        top += by * (rng[3] if by > 0.0 else rng[2])
    top += 1e-9 * abs(top)  # (float rounding: the cut priced past, never short of, where the bound may reach)
    if max(bound, top) < 0.0:
        return np.inf  # (its copies alone lose everywhere in the box)
    tot = time_sum(scen, has, prim, p, max_moves, max(bound, top), estimate)
    if not tot < np.inf:
        return np.inf
    _narrow2(rng, tot - a, -bx, -by, x0, y0)  # (the cut: tot > bound)
    if tot > bound:
        return np.inf
    mean[i] = tot / K
    return mean[i] + copies[i]


@njit
def _on_life(i, c, bx, by):
    """(bx, by) plus c on candidate i's inverse warm life (x for candidates 0 to 2, y from 3 on)."""
    if i < 3:
        return bx + c, by
    return bx, by + c


@njit
def _narrow_win(rng, i, j, mean, raw, x0, y0):
    """Narrow rng (_narrow2) to where candidate i's price (mean[i] + raw[i] x_i) against candidate j's in
    robust_pick's test (i < j (1 - 1e-12)) keeps its outcome."""
    bx, by = _on_life(j, (1 - 1e-12) * raw[j], 0.0, 0.0)
    bx, by = _on_life(i, -raw[i], bx, by)
    _narrow2(rng, (1 - 1e-12) * mean[j] - mean[i], bx, by, x0, y0)


@njit
def robust_pick(scen, cands, live_has, holder, link_group, peer, copy_host, copy_peer, horizon, hedge_horizon,
                home_gpu, p, max_moves, rng):
    """The index of the robust step's winner (moeless.policy.serverless) among the candidates cands [C, E, G]
    (0: the current plan, 1: the homes alone, then the others) over the load scenarios scen [K, E]: each
    candidate priced by its mean time over the scenarios plus the copies it needs (copy_seconds: its instances
    not in live_has, from a peer (holder) or the host), over the expected warm life of its kind of instance:
    `horizon` for candidates 0 to 2 (the current plan, the homes, the point decision), `hedge_horizon` from 3 on
    (hedged and fill layouts).

    Every candidate is priced by the estimate (mean_time's one_search) except one with the same instances as an
    earlier one; the cheapest wins, a later one only when strictly cheaper (relative 1e-12). A winner other
    than 0 is then priced exactly, with candidate 0 and candidate 1 (unless it has candidate 0's instances), and
    kept only if it is still strictly the cheapest of them, compared in index order.

    rng [4]: a box of inverse warm lives (1 / horizon in entries 0 and 1, 1 / hedge_horizon in 2 and 3) holding
    the given ones, finite (the cuts are priced over it), narrowed to where every comparison keeps its outcome:
    the same pick for any lives whose inverses lie strictly inside."""
    C, E, G = cands.shape
    x0 = 1.0 / horizon
    y0 = 1.0 / hedge_horizon
    prim = np.empty((C, E), dtype=np.int64)
    raw = np.zeros(C)
    copies = np.zeros(C)
    mean = np.zeros(C)
    best = 0
    best_cost = np.inf
    for i in range(C):
        dup = False
        for j in range(i):
            if same_instances(cands[i], cands[j]):
                dup = True  # (the earlier wins a tie anyway)
                break
        if dup:
            continue
        primary_of(cands[i], home_gpu, prim[i])
        raw[i] = copy_seconds(cands[i], live_has, holder, link_group, peer, copy_host, copy_peer)
        copies[i] = raw[i] / (horizon if i < 3 else hedge_horizon)
        cost = _robust_price(scen, cands[i], prim[i], i, best, best_cost, mean, raw, copies, p, max_moves, True,
                             rng, x0, y0)
        if cost < np.inf and best_cost < np.inf:
            _narrow_win(rng, i, best, mean, raw, x0, y0)
        if cost < best_cost * (1 - 1e-12):
            best = i
            best_cost = cost
    if best == 0:
        return 0
    # the winner, priced exactly against the current plan and the homes (each priced above: its copies and
    # primaries are known)
    exact = np.zeros(C)
    e0 = _robust_price(scen, cands[0], prim[0], 0, 0, np.inf, exact, raw, copies, p, max_moves, False, rng, x0, y0)
    same01 = same_instances(cands[1], cands[0])
    e1 = np.inf
    if not same01:
        e1 = _robust_price(scen, cands[1], prim[1], 1, 0, np.inf, exact, raw, copies, p, max_moves, False, rng, x0,
                           y0)
        _narrow_win(rng, 1, 0, exact, raw, x0, y0)
        _narrow2(rng, exact[1] - exact[0], raw[1] - raw[0], 0.0, x0, y0)  # (which is the least: e0 <= e1)
    pick = 0
    pick_cost = e0
    if not same01 and e1 < pick_cost * (1 - 1e-12):
        pick = 1
        pick_cost = e1
    if best != 1:
        low = 0 if e0 <= e1 else 1
        eb = _robust_price(scen, cands[best], prim[best], best, low, min(e0, e1), exact, raw, copies, p, max_moves,
                           False, rng, x0, y0)
        if eb < np.inf:
            _narrow_win(rng, best, pick, exact, raw, x0, y0)
        if eb < pick_cost * (1 - 1e-12):
            pick = best
    return pick
