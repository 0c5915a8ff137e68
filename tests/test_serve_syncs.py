"""Host syncs of the serving loop: at most one per MoE layer (the gathered counts), none elsewhere in the layer.

On CPU (gloo, world 2) tests/serve_sync_zones.py counts the calls that would make a CUDA host wait, per MoE layer of
a real run, and charges them to zones: the serving loop's own code ("caller"), its host <-> device boundary
(moeless.serve.transfer: "download" / "upload"), the kernels (moeless_kernels: their own checks, not this
loop's) and the engine's load predictor. On a GPU the same limit is checked with CUDA's sync debug mode, and
the device work after a layer's one sync is captured in a CUDA graph.
"""
from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch

from moeless import serve
from moeless.engine import GateReplicaLoads
from serve_harness import run_ranks
from serve_sync_zones import SyncCounter

PROMPTS = [[256, 72, 101, 108, 108, 111], [256, 65], [256, 1, 2, 3, 4, 5, 6, 7, 8], [256, 33, 34]]
NEW_TOKENS = [4, 2, 3, 4]
CONFIGS = {
    # predicts and re-plans every layer: a new plan goes up to the device almost every layer
    "moeless": dict(policy="moeless", keep_alive_s=0.0),
    # the demo's settings: replicas kept warm for 5 s
    "moeless, keep-alive": dict(policy="moeless", keep_alive_s=5.0),
    "ep": dict(policy="ep"),
}


def _zones(counter: SyncCounter) -> None:
    for name, module in list(sys.modules.items()):
        if not name.startswith("moeless.serve."):
            continue
        for attr, zone in (("fused_moe", "kernels"), ("replica_dispatch", "kernels"), ("combine", "kernels"),
                           ("ReplicaPlan", "kernels"),  # its checks run where it is built (on CPU only)
                           ("download", "download"), ("upload", "upload")):
            if hasattr(module, attr) and not name.endswith((".transfer",)):
                counter.zone_of(module, attr, zone)
    counter.zone_of(GateReplicaLoads, "counts", "predictor")


def _count(rank, world, ctx):
    model = serve.load_model(None)
    out = {}
    for name, kw in CONFIGS.items():
        srv = serve.ExpertParallelServer(model, ctx, **kw)
        counter = SyncCounter()
        with counter:
            counter.enabled = False
            _zones(counter)
            layers = counter.per_call(serve.ExpertParallelExperts, "forward")
            srv.generate(PROMPTS, NEW_TOKENS)
        srv.close()
        out[name] = {"layers": layers, "num_layers": srv.num_layers}
    return out


def test_one_host_sync_per_moe_layer(tmp_path):
    outcomes = run_ranks(2, _count, tmp_path)
    for r, o in enumerate(outcomes):
        assert not o.hung and o.result is not None and "exception" not in o.result, f"rank {r}: {o.result}"
    for r, o in enumerate(outcomes):
        for name, res in o.result.items():
            L = res["num_layers"]
            layers = res["layers"]
            assert len(layers) == L * max(NEW_TOKENS), name  # prefill + decode iterations, every layer
            for i, rec in enumerate(layers):
                where = f"rank {r}, {name}, iteration {i // L}, layer {i % L}"
                own = [s for s in rec["sites"] if s[0] == "caller"]
                assert not own, f"{where}: the serving loop reads the device outside its one download: {own}"
                assert rec["calls"].get("download", 0) == 1, where
                # the layer's quotas, and the plan when it changed since the layer last ran
                assert 1 <= rec["calls"].get("upload", 0) <= 2, where
            if name == "ep":  # a plan that never changes goes up once
                assert all(rec["calls"]["upload"] == 1 for rec in layers[L:]), name


def _decode_layers(srv, prompts, steps, body):
    """Run `body(records)` around generate(prompts, steps) with each decode MoE layer's warnings recorded."""
    records, it = [], [0]
    orig = serve.ExpertParallelExperts.forward

    def forward(mod, *args, **kwargs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = orig(mod, *args, **kwargs)
        if it[0] >= srv.num_layers:  # decode iterations only
            records.append([(w.filename, w.lineno, str(w.message)[:80]) for w in caught])
        it[0] += 1
        return out

    serve.ExpertParallelExperts.forward = forward
    try:
        body(lambda: srv.generate(prompts, steps))
    finally:
        serve.ExpertParallelExperts.forward = orig
    return records


@pytest.mark.gpu
def test_one_host_sync_per_moe_layer_on_cuda():
    """CUDA's sync debug mode warns at every call that waits for the device; per decode layer, at most one of
    them may come from the serving loop (its download of the counts). The kernels' own are printed."""
    ctx = serve.init_distributed(world_size=1, rank=0)
    try:
        srv = serve.ExpertParallelServer(serve.load_model(None), ctx, policy="moeless", keep_alive_s=0.0)
        srv.generate(PROMPTS, 2)  # first calls: autotuning, allocations

        def body(run):
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run()
            finally:
                torch.cuda.set_sync_debug_mode("default")

        records = _decode_layers(srv, PROMPTS, 3, body)
        srv.close()
    finally:
        serve.shutdown()
    assert records
    for i, rec in enumerate(records):
        ours = [w for w in rec if "/moeless/serve/" in w[0].replace("\\", "/")]
        print(f"decode layer {i}: {len(rec)} syncs, {len(ours)} in moeless.serve, others at "
              f"{sorted({f'{f}:{n}' for f, n, _ in rec if (f, n, _) not in ours})}")
        assert len(ours) <= 1, ours


@pytest.mark.gpu
def test_decode_layer_device_work_captures_in_a_cuda_graph():
    """After a decode layer's one host sync (the gathered counts) its device work -- dispatch, all-to-all,
    experts, all-to-all back, combine -- has fixed sizes: it is captured in a CUDA graph and replayed, with the
    output of the eager run and of the model's own (Hugging Face) experts module. Needs replica_dispatch and
    fused_moe without host syncs on CUDA (issue 10 item 2, moeless_kernels); the quotas' pinned staging copy
    is captured by address, so a serving loop that replays graphs keeps one staging buffer per layer alive."""
    ctx = serve.init_distributed(world_size=1, rank=0)
    try:
        model = serve.load_model(None)
        srv = serve.ExpertParallelServer(model, ctx, policy="ep")
        srv.generate(PROMPTS, 2)
        mod, hf_experts = srv.layers[1], srv._originals[1][1]  # ours, and the model's own experts module
        gen = torch.Generator(device=srv.device).manual_seed(0)
        T, E, K = 3 * len(PROMPTS), srv.num_experts, model.config.num_experts_per_tok
        x = torch.randn((T, model.config.hidden_size), device=srv.device, generator=gen)
        weights, ids = torch.topk(torch.rand((T, E), device=srv.device, generator=gen), K, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        with torch.no_grad():  # the Hugging Face eager loop (its module stayed on the host)
            want = hf_experts(x.cpu(), ids.cpu(), weights.cpu())
        plan = srv.engine.plan(1)
        device_plan = mod.device_plan(plan)
        counts = srv.pf.gather_counts(1, ids, None, 0.0)  # the one sync, outside the graph
        rt = srv.engine.split(1, counts.true)

        def device_work():
            prep = srv.pf.dispatch(1, x, ids, counts, plan, device_plan, rt)
            recv = srv.pf.receive(prep)
            y = mod.run(recv, prep.expert_ids, prep.replica_tokens, device_plan)
            return srv.pf.finalize(prep, y, weights, x.dtype)

        eager = device_work()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            device_work()  # warm-up on a side stream, as CUDA graph capture asks
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = device_work()
        graph.replay()
        torch.cuda.synchronize()
        srv.close()
    finally:
        serve.shutdown()
    np.testing.assert_allclose(captured.float().cpu().numpy(), eager.float().cpu().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(captured.float().cpu().numpy(), want.float().cpu().numpy(), rtol=1e-4, atol=1e-4)
