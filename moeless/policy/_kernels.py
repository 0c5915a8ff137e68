"""The time-aware policy's hot loops, compiled by numba where it is installed (moeless._jit), plain Python otherwise.

One MoE layer:

    W      float64 [E]     pairs per expert (true counts, or rounded predictions)
    has    bool    [E, G]  an instance of expert e on GPU g (replicas of e on one GPU share one weight copy)
    ig     int64   [E, G]  the GPUs of expert e's instances, the first cnt[e] entries (the sparse view of has)
    n      float64 [E, G]  pairs expert e serves on GPU g (integers; 0 where has is False)
    p      float64 [7]     the cost profile (moeless.costmodel.CostProfile.as_array): flop_s, read_s, act_s,
                           launch_s, a2a_s, a2a_floor, per_gpu_sum

Layer time F = expert time + 2 * all-to-all, with expert time = max over GPUs of the sum of its instances'
times (roofline; or the max over instances, the paper's model) and all-to-all = a2a_s * max over GPUs of the
pairs received (at least total / G with a2a_floor). An instance with n > 0 pairs takes max(n * flop_s, read_s
+ n * act_s) + launch_s: in decode that is one weight read whatever n, so a second replica that gets a pair
costs a read instead of saving work.

`improve` is a local search over integer moves of x pairs of one expert from the busiest GPU to another GPU
holding (or, with a copy cost, given) an instance of it; x balances the two GPUs (bisection: one side's time
only falls and the other's only rises with x). A free move is taken when it lowers the busiest GPU without
raising the layer time (so ties between busiest GPUs resolve one by one: the sorted GPU times fall
lexicographically, hence it terminates); a move onto a new instance only when the layer time falls by more than
the copy's per-iteration cost (its stall not hidden by the look-ahead, over the instance's expected warm life).
Loops run over instances (the sparse lists), not over E x G. Deterministic: ties go to the lower expert, then
the earlier instance.
"""
from __future__ import annotations

import numpy as np

from moeless._jit import njit

# indices into the cost profile array
_FLOP, _READ, _ACT, _LAUNCH, _A2A, _FLOOR, _SUM = 0, 1, 2, 3, 4, 5, 6

# new-instance targets tried per expert and move: the least-busy GPUs with room (a new instance's best GPU is
# a light one; trying all G GPUs would cost G bisections per expert and move at DeepSeek-V3 scale)
_NEW_TARGETS = 4


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
def _gpu_time(n, g, p):
    """Expert time of GPU g alone (the max-over-replicas model recomputes a GPU after a move)."""
    c = 0.0
    for e in range(n.shape[0]):
        v = n[e, g]
        if v > 0.0:
            t = inst_time(v, p)
            if p[_SUM] > 0.0:
                c += t
            elif t > c:
                c = t
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
def _top3(v, out, at):
    """out[at:at+3]: indices of the three largest entries of v (-1 where fewer), ties to the lower index."""
    a = -1
    b = -1
    c = -1
    for i in range(v.shape[0]):
        x = v[i]
        if a < 0 or x > v[a]:
            c = b
            b = a
            a = i
        elif b < 0 or x > v[b]:
            c = b
            b = i
        elif c < 0 or x > v[c]:
            c = i
    out[at] = a
    out[at + 1] = b
    out[at + 2] = c


@njit
def _max_except(v, tops, at, i, j):
    """max of v over the indices other than i and j, from its top three (0 if none)."""
    for k in range(at, at + 3):
        t = tops[k]
        if t >= 0 and t != i and t != j:
            return v[t]
    return 0.0


@njit
def _pair_times(n, e, ga, gb, x, ca, cb, p):
    """Expert times of GPUs ga and gb after moving x pairs of expert e from ga to gb."""
    n1 = n[e, ga]
    n2 = n[e, gb]
    if p[_SUM] > 0.0:
        a = ca - inst_time(n1, p) + inst_time(n1 - x, p)
        b = cb - inst_time(n2, p) + inst_time(n2 + x, p)
        return a, b
    n[e, ga] = n1 - x
    n[e, gb] = n2 + x
    a = _gpu_time(n, ga, p)
    b = _gpu_time(n, gb, p)
    n[e, ga] = n1
    n[e, gb] = n2
    return a, b


@njit
def _best_x(n, e, ga, gb, ca, cb, p):
    """The integer x in [1, n[e, ga]] minimising max(time of ga, time of gb) after the move: the smallest x
    where ga's time no longer exceeds gb's, or the one before it."""
    lo = 1.0
    hi = np.floor(n[e, ga])
    if hi < 1.0:
        return 0.0, ca, cb
    while lo < hi:
        mid = np.floor((lo + hi) / 2.0)
        a, b = _pair_times(n, e, ga, gb, mid, ca, cb, p)
        if a <= b:
            hi = mid
        else:
            lo = mid + 1.0
    a, b = _pair_times(n, e, ga, gb, lo, ca, cb, p)
    best_x, best_a, best_b = lo, a, b
    if lo > 1.0:
        a2, b2 = _pair_times(n, e, ga, gb, lo - 1.0, ca, cb, p)
        if max(a2, b2) <= max(a, b):
            best_x, best_a, best_b = lo - 1.0, a2, b2
    return best_x, best_a, best_b


@njit
def _eval_move(n, e, gs, gb, new, comp, pairs, tops, F, cs, pfloor, tol, p, copy_src, link_wait, lookahead,
               horizon, stall):
    """Score of moving pairs of e from gs to gb (<= 0: not worth it), with x and the two GPUs' new times."""
    x, a, b = _best_x(n, e, gs, gb, cs, comp[gb], p)
    if x <= 0.0:
        return -1.0, 0.0, 0.0, 0.0
    local = a if a > b else b
    if local >= cs - tol:
        return -1.0, 0.0, 0.0, 0.0  # the busiest GPU would not get lighter
    cmax = max(_max_except(comp, tops, 0, gs, gb), local)
    pr = _max_except(pairs, tops, 3, gs, gb)
    pmax = max(pr, max(pairs[gs] - x, pairs[gb] + x), pfloor)
    newF = cmax + 2.0 * p[_A2A] * pmax
    if new:
        # the copy's per-iteration cost: the stall it adds (beyond what the look-ahead hides and the layer
        # already waits), spread over the instance's expected warm life
        s_g = link_wait[gb] + copy_src[e, gb] - lookahead
        extra = s_g - stall[0] if s_g > stall[0] else 0.0
        score = F - newF - extra / horizon
        if F - newF <= tol or score <= tol:
            return -1.0, 0.0, 0.0, 0.0
        return score, x, a, b
    if newF > F + tol:
        return -1.0, 0.0, 0.0, 0.0
    # free moves: rank by how much the busiest GPU falls (the layer time may tie)
    return (F - newF) + 1e-3 * (cs - local), x, a, b


@njit
def _chain_move(n, ig, cnt, home, room, comp, pairs, F, cs, gs, pfloor, tol, p):
    """Apply the best chain gs -> gb -> gc of whole pair counts (see improve) that lowers the busiest GPU without
    raising the layer time; comp and pairs are updated. Returns whether one was applied. (A GPU's time is a sum
    of its instances' in the roofline only; the paper's max over replicas has no such trap.)"""
    E, G = n.shape
    if p[_SUM] <= 0.0:
        return False
    best = 0.0
    be, bf, bgb, bgc = -1, -1, -1, -1
    nb_a, nb_b, nb_c = 0.0, 0.0, 0.0
    for e in range(E):
        x = n[e, gs]
        if x < 1.0:
            continue
        for k in range(cnt[e]):
            gb = ig[e, k]
            if gb == gs or (n[e, gb] < 1.0 and not home[e, gb] and room[gb] <= 0):
                continue
            a, b0 = _pair_times(n, e, gs, gb, x, comp[gs], comp[gb], p)
            if a >= cs - tol:
                continue
            for f in range(E):
                y = n[f, gb]
                if f == e or y < 1.0:
                    continue
                for j in range(cnt[f]):
                    gc = ig[f, j]
                    if gc == gb or gc == gs or (n[f, gc] < 1.0 and not home[f, gc] and room[gc] <= 0):
                        continue
                    # gb loses f's pairs after gaining e's: price f's instance there with e's added
                    b = b0 - inst_time(y, p)
                    c = comp[gc] - inst_time(n[f, gc], p) + inst_time(n[f, gc] + y, p)
                    local = max(a, max(b, c))
                    if local >= cs - tol:
                        continue
                    rest = 0.0
                    for g in range(G):
                        if g != gs and g != gb and g != gc and comp[g] > rest:
                            rest = comp[g]
                    pm = max(pairs[gs] - x, pairs[gb] + x - y, pairs[gc] + y, pfloor)
                    for g in range(G):
                        if g != gs and g != gb and g != gc and pairs[g] > pm:
                            pm = pairs[g]
                    newF = max(rest, local) + 2.0 * p[_A2A] * pm
                    if newF > F + tol:
                        continue
                    gain = (F - newF) + 1e-3 * (cs - local)
                    if gain > best + tol:
                        best = gain
                        be, bf, bgb, bgc = e, f, gb, gc
                        nb_a, nb_b, nb_c = a, b, c
    if be < 0:
        return False
    x = n[be, gs]
    y = n[bf, bgb]
    for gg, ee, delta in ((gs, be, -x), (bgb, be, x), (bgb, bf, -y), (bgc, bf, y)):
        before = n[ee, gg]
        after = before + delta
        if before < 1.0 and after >= 1.0 and not home[ee, gg]:
            room[gg] -= 1
        if before >= 1.0 and after < 1.0 and not home[ee, gg]:
            room[gg] += 1
        n[ee, gg] = after
        pairs[gg] += delta
    comp[gs], comp[bgb], comp[bgc] = nb_a, nb_b, nb_c
    return True


@njit
def improve(n, has, ig, cnt, home, p, total, max_moves, new_ok, room, copy_src, link_wait, lookahead, horizon,
            stall, made):
    """Local search on n [E, G] in place (see the module docstring). Returns the number of moves.

    home [E, G]: the instances that always stay in the plan; any other instance takes one of its GPU's room [G]
    slots while it carries pairs (a move onto an empty one needs room, a move that empties one gives it back).
    new_ok: whether moves may create instances (on the _NEW_TARGETS least-busy GPUs with room; has, ig and cnt
    are updated). Then copy_src [E, G] (seconds of the copy a new instance of e on g needs: peer or host),
    link_wait [G] (seconds each GPU's links are already busy, this layer's copies included: updated),
    lookahead (seconds the look-ahead hides), horizon (iterations a new instance is expected to serve),
    stall [1] (the layer's stall so far: updated) and made [E, G] (marks the instances created: updated)."""
    E, G = n.shape
    comp = np.zeros(G)
    pairs = np.zeros(G)
    gpu_times(n, ig, cnt, p, comp, pairs)
    tops = np.zeros(6, dtype=np.int64)
    pfloor = total / G if p[_FLOOR] > 0.0 else 0.0
    order = np.zeros(G, dtype=np.int64)
    moves = 0
    while moves < max_moves:
        F = layer_time(comp, pairs, total, p)
        _top3(comp, tops, 0)
        _top3(pairs, tops, 3)
        gs = tops[0]
        cs = comp[gs]
        tol = 1e-12 * (F if F > 1e-300 else 1.0)
        if new_ok:
            order = np.argsort(comp, kind="mergesort")
        best_score = 0.0
        best_e = -1
        best_g = -1
        best_x = 0.0
        best_new = False
        best_a = 0.0
        best_b = 0.0
        for e in range(E):
            if n[e, gs] < 1.0:
                continue
            for k in range(cnt[e]):  # the expert's other instances: free moves
                gb = ig[e, k]
                if gb == gs:
                    continue
                if n[e, gb] < 1.0 and not home[e, gb] and room[gb] <= 0:
                    continue
                s, x, a, b = _eval_move(n, e, gs, gb, False, comp, pairs, tops, F, cs, pfloor, tol, p, copy_src,
                                        link_wait, lookahead, horizon, stall)
                if s > best_score + tol:
                    best_score, best_e, best_g, best_x, best_new, best_a, best_b = s, e, gb, x, False, a, b
            if not new_ok:
                continue
            tried = 0
            for k in range(G):  # new instances on the least-busy GPUs with room
                gb = order[k]
                if gb == gs or has[e, gb] or room[gb] <= 0:
                    continue
                s, x, a, b = _eval_move(n, e, gs, gb, True, comp, pairs, tops, F, cs, pfloor, tol, p, copy_src,
                                        link_wait, lookahead, horizon, stall)
                if s > best_score + tol:
                    best_score, best_e, best_g, best_x, best_new, best_a, best_b = s, e, gb, x, True, a, b
                tried += 1
                if tried >= _NEW_TARGETS:
                    break
        if best_e < 0:
            # no single move helps: try a chain, all of e's pairs on the busiest GPU to its instance on gb while
            # all of f's pairs on gb go to f's instance on gc (gb would otherwise become the busiest: the
            # local search's trap in memory-bound layers, where a GPU's time counts its active experts)
            if _chain_move(n, ig, cnt, home, room, comp, pairs, F, cs, gs, pfloor, tol, p):
                moves += 1
                continue
            break
        if n[best_e, best_g] < 1.0 and not home[best_e, best_g]:
            room[best_g] -= 1
        n[best_e, gs] -= best_x
        n[best_e, best_g] += best_x
        if n[best_e, gs] < 1.0 and not home[best_e, gs]:
            room[gs] += 1
        comp[gs] = best_a
        comp[best_g] = best_b
        pairs[gs] -= best_x
        pairs[best_g] += best_x
        if best_new:
            has[best_e, best_g] = True
            ig[best_e, cnt[best_e]] = best_g
            cnt[best_e] += 1
            made[best_e, best_g] = True
            link_wait[best_g] += copy_src[best_e, best_g]
            s_g = link_wait[best_g] - lookahead
            if s_g > stall[0]:
                stall[0] = s_g
        moves += 1
    return moves


@njit
def lpt_seed(W, ig, cnt, p, n):
    """n [E, G] (zeroed here): each expert whole on one of its instances, largest first, onto the GPU that
    then finishes earliest (ties: the earlier instance)."""
    E, G = n.shape
    n[:, :] = 0.0
    comp = np.zeros(G)
    order = np.argsort(-W, kind="mergesort")
    for k in range(E):
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
        n[e, best] = w
        comp[best] = best_t


@njit
def primary_seed(W, primary, n):
    """n [E, G] (zeroed here): each expert whole on its primary GPU."""
    n[:, :] = 0.0
    for e in range(W.shape[0]):
        n[e, primary[e]] = W[e]


@njit
def waterfill_seed(W, ig, cnt, n):
    """n [E, G] (zeroed here): pairs balanced over GPUs, ignoring weight reads: experts, largest first, poured
    onto their GPUs' lowest pair levels (integers; the remainder one pair each to the lowest); a second
    sweep pours each expert again given all the others."""
    E, G = n.shape
    n[:, :] = 0.0
    level = np.zeros(G)
    order = np.argsort(-W, kind="mergesort")
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
    """n [E, G] (zeroed here): each expert's pairs evenly over its instances (the engines' split; integers, the
    first instances take the remainder)."""
    n[:, :] = 0.0
    for e in range(W.shape[0]):
        m = cnt[e]
        if m == 0:
            continue
        base = np.floor(W[e] / m)
        extra = W[e] - base * m
        for k in range(m):
            n[e, ig[e, k]] = base + (1.0 if k < extra else 0.0)


@njit
def _split_lists(W, has, ig, cnt, primary, p, max_moves, n_out):
    """time_split on prepared instance lists (see time_split)."""
    E, G = has.shape
    total = 0.0
    single = True
    for e in range(E):
        total += W[e]
        if cnt[e] > 1:
            single = False
    comp = np.zeros(G)
    pairs = np.zeros(G)
    primary_seed(W, primary, n_out)
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
    cand = np.zeros((E, G))
    room = np.full(G, E + 1, dtype=np.int64)  # a fixed plan: its instances hold their slots already
    src = np.zeros((1, 1))
    wait = np.zeros(G)
    stall = np.zeros(1)
    made = np.zeros((1, 1), dtype=np.bool_)
    # the engines' even split, as it is: the result is never slower than it (nor than the primary seed)
    even_seed(W, ig, cnt, cand)
    gpu_times(cand, ig, cnt, p, comp, pairs)
    f_even = layer_time(comp, pairs, total, p)
    if run1:
        lpt_seed(W, ig, cnt, p, cand)
        gpu_times(cand, ig, cnt, p, comp, pairs)
        if layer_time(comp, pairs, total, p) < best * (1.0 - 1e-12):
            n_out[:, :] = cand
        improve(n_out, has, ig, cnt, has, p, total, max_moves, False, room, src, wait, 0.0, 1.0, stall, made)
        gpu_times(n_out, ig, cnt, p, comp, pairs)
        best = layer_time(comp, pairs, total, p)
    if not run2:
        if f_even < best * (1.0 - 1e-12):
            even_seed(W, ig, cnt, n_out)
            best = f_even
        return best
    waterfill_seed(W, ig, cnt, cand)
    gpu_times(cand, ig, cnt, p, comp, pairs)
    f_wf = layer_time(comp, pairs, total, p)
    alt = np.zeros((E, G))
    even_seed(W, ig, cnt, alt)
    gpu_times(alt, ig, cnt, p, comp, pairs)
    if layer_time(comp, pairs, total, p) < f_wf * (1.0 - 1e-12):
        cand[:, :] = alt
    improve(cand, has, ig, cnt, has, p, total, max_moves, False, room, src, wait, 0.0, 1.0, stall, made)
    gpu_times(cand, ig, cnt, p, comp, pairs)
    f = layer_time(comp, pairs, total, p)
    if f < best * (1.0 - 1e-12) or not run1:
        best = f
        n_out[:, :] = cand
    return best


@njit
def time_split(W, has, primary, p, max_moves, n_out):
    """The time-aware split of W over the instances `has` into n_out; returns its layer time. Forced when every
    expert has one instance; else two local searches (in _split_lists) and the faster result."""
    E, G = has.shape
    ig = np.zeros((E, G), dtype=np.int64)
    cnt = np.zeros(E, dtype=np.int64)
    build_lists(has, ig, cnt)
    return _split_lists(W, has, ig, cnt, primary, p, max_moves, n_out)


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
def decide_layer(W, live, loaded, pinned, S, cur_has, home, home_gpu, p, max_moves, copy_host, copy_peer,
                 link_group, link_wait, lookahead, horizon, has_out):
    """moeless's decision for one layer (moeless.policy.serverless): has_out [E, G] gets the chosen instances.

    live / loaded / pinned [G*S]: each slot's live instance (expert, -1 free), whether its weights are in, and
    whether the plan keeps it whatever its predicted pairs (used within its keep-alive: a hedge the split can
    use for free); link_wait [G]: seconds until each GPU's copy links are free (read only). Returns 0 (the new
    plan), 1 (keep the current plan) or 2 (the homes alone)."""
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
    ig = np.zeros((E, G), dtype=np.int64)
    cnt = np.zeros(E, dtype=np.int64)
    build_lists(has, ig, cnt)
    n = np.zeros((E, G))
    _split_lists(W, has, ig, cnt, home_gpu, p, max_moves, n)
    room = np.full(G, S, dtype=np.int64)
    for e in range(E):
        for k in range(cnt[e]):
            g = ig[e, k]
            if keep[e, g] or n[e, g] >= 1.0:
                room[g] -= 1
    src = np.full((E, G), copy_host)
    if link_group > 1 and copy_peer < copy_host:
        ngrp = (G + link_group - 1) // link_group
        holder = np.zeros((E, ngrp), dtype=np.bool_)
        for s in range(live.shape[0]):
            if live[s] >= 0 and loaded[s]:
                holder[live[s], (s // S) // link_group] = True
        for e in range(E):
            for g in range(G):
                if holder[e, g // link_group]:
                    src[e, g] = copy_peer
    made = np.zeros((E, G), dtype=np.bool_)
    stall = np.zeros(1)
    wait = link_wait.copy()
    improve(n, has, ig, cnt, keep, p, total, max_moves, True, room, src, wait, lookahead, horizon, stall, made)
    same = True
    for e in range(E):
        for g in range(G):
            v = keep[e, g] or n[e, g] >= 1.0
            has_out[e, g] = v
            if v != cur_has[e, g]:
                same = False
    if same:
        return 1
    # do no harm: the predicted time under the split the data plane will run, against the current plan and the
    # homes alone (ties keep the current plan, then the homes)
    prim = np.zeros(E, dtype=np.int64)
    scratch = np.zeros((E, G))
    primary_of(has_out, home_gpu, prim)
    t_new = time_split(W, has_out, prim, p, max_moves, scratch)
    primary_of(cur_has, home_gpu, prim)
    t_cur = time_split(W, cur_has, prim, p, max_moves, scratch)
    t_home = t_cur
    for e in range(E):
        for g in range(G):
            if cur_has[e, g] != home[e, g]:
                t_home = time_split(W, home, home_gpu, p, max_moves, scratch)
                break
        else:
            continue
        break
    tol = 1e-9 * max(t_cur, t_home, 1e-12)
    if t_new > min(t_cur, t_home) + tol:
        return 1 if t_cur <= t_home + tol else 2
    return 0


@njit
def hedge_fill(keep, room, W, S, has_out):
    """has_out [E, G] = keep plus hedge replicas in every free slot (room [G], consumed): round j gives each GPU g
    with room one replica of an expert kept on GPU g - 1 - j (mod G) that g does not hold yet, the one with the
    largest load per instance (W / instances so far, EPLB's rule): a ring at distance 1, then 2, ... (an
    expander over GPUs, so that the split can move a GPU's excess along it when the true loads differ from the
    prediction). Returns the replicas added."""
    E, G = keep.shape
    has_out[:, :] = keep
    count = np.zeros(E)
    for e in range(E):
        for g in range(G):
            if keep[e, g]:
                count[e] += 1.0
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
            for e in range(E):
                if keep[e, src] and not has_out[e, g] and W[e] > 0.0:
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
def mean_time(scen, has, primary, p, max_moves):
    """Mean layer time of the instances `has` over the load scenarios scen [K, E] (each split on its own)."""
    K, E = scen.shape
    G = has.shape[1]
    ig = np.zeros((E, G), dtype=np.int64)
    cnt = np.zeros(E, dtype=np.int64)
    build_lists(has, ig, cnt)
    n = np.zeros((E, G))
    tot = 0.0
    for k in range(K):
        tot += _split_lists(scen[k], has, ig, cnt, primary, p, max_moves, n)
    return tot / K
