"""moeless.serve: the distributed loop against the single-process model, the pool's bill on a real run, faults.

Ranks run in forkserver workers talking gloo on 127.0.0.1 (tests/serve_harness.py). World sizes 2 and 4; tiny
batches. Load, killed ranks and mixed bad requests: tests/test_serve_load.py; host syncs: test_serve_syncs.py.
"""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from moeless import serve
from moeless.planner import Plan, serve_time_split
from moeless.policy import Policy
from serve_harness import reference, run_ranks

PROMPTS = [[256, 72, 101, 108, 108, 111], [256, 65], [256, 1, 2, 3, 4, 5, 6, 7, 8], [256, 33, 34]]
NEW_TOKENS = [4, 2, 3, 4]


class _RandomPolicy(Policy):
    """Random one-layer plans, the same sequence on every rank: replicas on several ranks, free slots, and every
    fourth plan all experts on rank 0 (the other ranks hold no expert); pairs split by the planner's exact
    serve-time split. A policy object like any other: the server must realise whatever it decides."""

    serverless = True
    name = "random"

    def __init__(self, L, E, G, S, seed):
        super().__init__(L, E, G, S)
        self.rng = np.random.default_rng(seed)
        self.calls = 0

    def decide(self, ctx):
        E, G, S = self.E, self.G, self.S
        self.calls += 1
        p2l = np.full(G * S, -1, dtype=np.int64)
        if self.calls % 4 == 0:
            p2l[self.rng.permutation(S)[:E]] = self.rng.permutation(E)  # only rank 0's slots
        else:
            slots = self.rng.permutation(G * S)
            p2l[slots[:E]] = self.rng.permutation(E)
            extra = slots[E:E + self.rng.integers(0, G * S - E + 1)]
            p2l[extra] = self.rng.integers(0, E, size=extra.size)
        return Plan.from_phy2log(p2l[None], E, G, S)

    def split(self, layer, plan, counts):
        return serve_time_split(plan, np.asarray(counts)[None])[0], 0.0


def _parity(rank, world, ctx):
    model = serve.load_model(None)
    E = serve.find_moe_blocks(model)[0][1].experts.gate_up_proj.shape[0]
    result = {}
    runs = {
        # plans drawn at random, changing at every layer of every iteration (mid-generation)
        "random": dict(policy=_RandomPolicy(len(serve.find_moe_blocks(model)), E, world, E, 7), predictor="previous",
                       keep_alive_s=0.0),
        # the real policy with the gate-replica predictor; keep-alive 0: idle instances go at once
        "moeless": dict(policy="moeless", keep_alive_s=0.0),
        "ep": dict(policy="ep"),
    }
    for name, kw in runs.items():
        srv = serve.ExpertParallelServer(model, ctx, record_logits=True, **kw)
        outs = srv.generate(PROMPTS, NEW_TOKENS)
        layers = [(m.slot_expert.copy(), m.slot_gate_up.clone(), m.slot_down.clone(), m.host_gate_up,
                   m.host_down) for m in srv.layers]
        plans = [srv.engine.plan(l).phy2log[0].copy() for l in range(srv.num_layers)]
        applied = list(srv.engine.applied)
        summary = srv.close()
        result[name] = dict(tokens=[o.tokens for o in outs], logits=[o.logits for o in outs],
                            summary=summary, layers=layers, plans=plans, applied=applied,
                            slots_per_gpu=srv.slots_per_gpu, num_experts=E, num_layers=srv.num_layers)
    # serve(): bad requests next to good ones, two 1 s batches
    srv = serve.ExpertParallelServer(model, ctx, policy="moeless")
    too_long = [256] * (model.config.max_position_embeddings + 1)
    reqs = [serve.Request(PROMPTS[0], 3, 0.1), serve.Request([], 3, 0.2),
            serve.Request(too_long, 3, 0.3), serve.Request(PROMPTS[1], 2, 1.5)]
    res = srv.serve(reqs)
    srv.close()
    result["serve"] = [(r.tokens, r.error, r.batch) for r in res]
    return result


def _peer_leaves(rank, world, ctx, how):
    """Rank 1 leaves once the server is up (exits, or stalls past the collective timeout); the others must fail
    cleanly with one ServeError line."""
    model = serve.load_model(None)
    srv = serve.ExpertParallelServer(model, ctx, policy="moeless")
    if rank == 1:
        if how == "dies":
            os._exit(3)
        time.sleep(ctx.timeout_s + 3)
        os._exit(0)
    t = time.monotonic()
    try:
        srv.generate(PROMPTS, NEW_TOKENS)
        error = None
    except serve.ServeError as err:
        error = str(err)
    return {"error": error, "seconds": time.monotonic() - t}


def _live_intervals(applied, end):
    """Brute force of the pool's bill with keep-alive 0: (cold starts, instance-seconds). An instance lives from
    the apply that puts its expert in its slot until the apply that takes it out (or `end`)."""
    holding, since = {}, {}
    cold, seconds = 0, 0.0
    for now, layer, p2l in applied:
        for slot, e in enumerate(p2l.tolist()):
            key = (layer, slot)
            if holding.get(key, -1) == e:
                continue
            if holding.get(key, -1) >= 0:
                seconds += now - since[key]
            holding[key] = e
            if e >= 0:
                cold += 1
                since[key] = now
    seconds += sum(end - since[k] for k, e in holding.items() if e >= 0)
    return cold, seconds


@pytest.mark.parametrize("world", [2, 4])
def test_distributed_matches_single_process(world, tmp_path):
    outcomes = run_ranks(world, _parity, tmp_path)
    for r, o in enumerate(outcomes):
        assert not o.hung, f"rank {r} hung"
        assert o.result is not None and "exception" not in o.result, f"rank {r}: {o.result}"
    ranks = [o.result for o in outcomes]
    ref_toks, ref_logits = reference(serve.load_model(None), PROMPTS, NEW_TOKENS)
    main = ranks[0]
    for name in ("random", "moeless", "ep"):
        got = main[name]
        assert got["tokens"] == ref_toks, name  # greedy tokens identical
        for a, b in zip(got["logits"], ref_logits):
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4, err_msg=name)
        # every rank returns every request's result
        for res in ranks[1:]:
            assert res[name]["tokens"] == got["tokens"]
    # the random policy did change plans between decode steps, including layouts that leave ranks empty
    s = main["random"]["summary"]
    assert s["plan_changes"] >= s["iterations"]
    # the slot buffers hold exactly the host weights of the experts the final plan puts on each rank
    for name in ("random", "moeless", "ep"):
        S = main[name]["slots_per_gpu"]
        for r, res in enumerate(ranks):
            for layer, (slot_expert, gu, dn, host_gu, host_dn) in enumerate(res[name]["layers"]):
                want = main[name]["plans"][layer][r * S:(r + 1) * S]
                for s_local, e in enumerate(want.tolist()):
                    if e < 0:
                        continue
                    assert slot_expert[s_local] == e
                    assert torch.equal(gu[s_local], host_gu[e]) and torch.equal(dn[s_local], host_dn[e])
    # the pool's bill on the real run: cold starts = the copies the ranks really made = brute force
    for name in ("random", "moeless"):
        s = main[name]["summary"]
        copies = sum(res[name]["summary"]["copies_this_rank"] for res in ranks)
        cold, inst_seconds = _live_intervals(main[name]["applied"], s["clock_end_s"])
        assert s["cold_starts"] == copies == cold, name
        assert s["gb_seconds"] == pytest.approx(inst_seconds * s["expert_bytes"] / 1e9, rel=1e-9, abs=1e-15)
    assert main["moeless"]["summary"]["releases"] > 0  # keep-alive 0 released idle instances
    ep = main["ep"]["summary"]
    E, L = main["ep"]["num_experts"], main["ep"]["num_layers"]
    assert ep["cold_starts"] == E * L and ep["plan_changes"] == 0  # every expert once, never re-planned
    # serve(): bad requests get a clear error; the others are served as if alone
    served = main["serve"]
    assert served[0][0] == ref_toks[0][:3] and served[0][1] is None and served[0][2] == 0
    assert "empty prompt" in served[1][1] and served[1][0] == []
    assert "context" in served[2][1] and served[2][0] == []
    assert served[3][0] == ref_toks[1][:2] and served[3][2] == 1


@pytest.mark.parametrize("fault", ["dies", "stalls"])
def test_peer_failure_is_a_clear_error(fault, tmp_path):
    outcomes = run_ranks(2, _peer_leaves, tmp_path, args=(fault,), timeout=90.0, collective_timeout=4.0)
    res = outcomes[0].result
    assert res is not None and "exception" not in res, res
    assert res["error"] is not None and "peer rank died or stalled" in res["error"]
    assert "\n" not in res["error"] and res["error"].startswith("rank 0 of 2: ")
    assert res["seconds"] < 4.0 + 10.0  # the collective timeout, plus the time to get there
    assert not outcomes[0].hung


def test_bad_models_and_requests(tmp_path):
    with pytest.raises(ValueError, match="model: no such path"):
        serve.load_model(tmp_path / "missing")
    with pytest.raises(ValueError, match="no config.json"):
        serve.load_model(tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    dense.save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="unsupported architecture LlamaForCausalLM"):
        serve.load_model(tmp_path / "dense")
    assert "empty" in serve.check_request(serve.Request([], 4), 512, 257)
    assert "context" in serve.check_request(serve.Request([1] * 510, 4), 512, 257)
    assert "token ids" in serve.check_request(serve.Request([1, 300], 4), 512, 257)
    assert "max_new_tokens" in serve.check_request(serve.Request([1], 0), 512, 257)
    assert serve.check_request(serve.Request([1, 2], 4), 512, 257) is None


def test_moe_blocks_found_in_layer_order():
    model = serve.load_model(None)
    blocks = serve.find_moe_blocks(model)
    assert [n for n, _ in blocks] == [f"model.layers.{i}.mlp" for i in range(4)] or \
        [n for n, _ in blocks] == [f"model.layers.{i}.block_sparse_moe" for i in range(4)]


def test_slot_buffers_follow_experts_between_slots():
    """realise(): an expert moved between slots of one rank is read from its buffer (no copy); cold slots are
    copied into buffers no warm slot reads; the slot views always hold the plan's experts' host weights."""

    E, H, I = 6, 3, 2
    gen = torch.Generator().manual_seed(0)

    class _Experts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj = torch.nn.Parameter(torch.randn(E, 2 * I, H, generator=gen))
            self.down_proj = torch.nn.Parameter(torch.randn(E, H, I, generator=gen))
            self.num_experts = E

    experts = _Experts()
    mod = serve.ExpertParallelExperts(experts, 0, slots_per_gpu=4, device=torch.device("cpu"))

    def check(want):
        for s, e in enumerate(want):
            if e >= 0:
                assert mod.slot_expert[s] == e
                assert torch.equal(mod.slot_gate_up[s], experts.gate_up_proj[e].detach())
                assert torch.equal(mod.slot_down[s], experts.down_proj[e].detach())
            else:
                assert mod.slot_expert[s] == -1

    want = np.array([0, 1, 2, -1])
    assert mod.realise(want, np.array([0, 1, 2])) == 3
    check(want)
    want = np.array([2, 0, 1, -1])  # a rotation inside the rank: all warm under (layer, GPU, expert)
    assert mod.realise(want, np.zeros(0, dtype=np.int64)) == 0
    check(want)
    want = np.array([2, 4, 1, 5])  # two new experts: one into the free buffer, one over the expert that left
    assert mod.realise(want, np.array([1, 3])) == 2
    check(want)
    want = np.array([2, 2, 5, -1])  # two replicas of one expert on the rank share its buffer
    assert mod.realise(want, np.zeros(0, dtype=np.int64)) == 0
    check(want)
    assert mod.copies == 5 and mod.repairs == 0
    want = np.array([3, 2, 5, -1])  # "warm" but no buffer holds expert 3: copied, counted as unbilled
    assert mod.realise(want, np.zeros(0, dtype=np.int64)) == 1
    check(want)
    assert mod.copies == 5 and mod.repairs == 1
    with pytest.raises(serve.ServeError, match="do not hold"):
        mod.buffers_of(np.array([3]))  # a free slot


def test_a_server_that_cannot_start_leaves_the_model_as_it_was():
    model = serve.load_model(None)
    before = [block.experts for _, block in serve.find_moe_blocks(model)]
    ctx = serve.DistContext(rank=0, world_size=1, device=torch.device("cpu"), backend="gloo", timeout_s=5.0)
    with pytest.raises(ValueError, match="cannot hold"):
        serve.ExpertParallelServer(model, ctx, slots_per_gpu=1)  # fewer slots than experts
    assert [block.experts for _, block in serve.find_moe_blocks(model)] == before
    assert not any(isinstance(e, serve.ExpertParallelExperts) for e in before)
