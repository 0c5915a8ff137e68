"""The plug-ins against the engines' released code (sglang 0.5.23, vllm 0.33.0, installed by `make setup`).

Registration goes through the real entry points and the engines' own loaders; outputs are checked with the
engines' own code (SGLang's map derivation, dispatch functions, LP solver and sampler references; vLLM's
abstract policy, config, default policy, map derivation and its router kernel run by the Triton interpreter),
and the numpy models of moeless.integrations.replica_choice are checked pick for pick against that code.
Skipped (not failed) where an engine package is absent. GPU-only parts (end-to-end serving, SGLang's CUDA LP
kernels) are not exercised here.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import sys
from importlib.metadata import entry_points
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from moeless.integrations import _policy
from moeless.integrations import sglang as msg
from moeless.integrations import vllm as mvl
from moeless.integrations.replica_choice import (
    sample_replicas,
    sglang_dynamic_choice,
    sglang_lp_probabilities,
    sglang_static_table,
    vllm_hash_choice,
)


def _engine(name):
    try:
        return importlib.import_module(name)
    except ImportError as exc:  # the engine extra is not installed: skip, do not fail
        pytest.skip(f"{name} is not importable here ({exc}); `make setup` installs it")


def _history(T=10, L=3, E=16, seed=0):
    rng = np.random.default_rng(seed)
    base = np.minimum(rng.zipf(1.3, size=(L, E)), 50)
    return rng.poisson(base[None] * 4, size=(T, L, E)).astype(np.int64)


def _engine_functions(package: str, relpath: str, names, tmp_path, header: str = ""):
    """Functions of an engine file whose module cannot be imported here (its imports need GPU-only or heavy
    packages), taken verbatim from the installed file into a module of their own (Triton needs real source)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{package} is not installed")
    path = f"{spec.submodule_search_locations[0]}/{relpath}"
    src = open(path, encoding="utf-8").read()
    found = {n.name: n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.FunctionDef) and n.name in names}
    missing = set(names) - set(found)
    assert not missing, f"{path} no longer defines {sorted(missing)}"
    lines = src.splitlines()
    parts = []
    for name in names:
        node = found[name]
        start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
        block = lines[start:node.end_lineno]
        indent = len(block[0]) - len(block[0].lstrip())
        parts.append("\n".join(line[indent:] for line in block))
    mod_path = tmp_path / f"_engine_{package}_{abs(hash(relpath))}.py"
    mod_path.write_text(header + "\n\n" + "\n\n\n".join(parts) + "\n")
    spec2 = importlib.util.spec_from_file_location(mod_path.stem, mod_path)
    mod = importlib.util.module_from_spec(spec2)
    sys.modules[mod_path.stem] = mod
    spec2.loader.exec_module(mod)
    return mod


# ---- SGLang ----------------------------------------------------------------------------------------------------
@pytest.fixture
def sglang_loaded(monkeypatch):
    """SGLang's own load_plugins() with only the moeless plug-in allowed; the patched functions are restored
    afterwards so other tests see SGLang's originals."""
    _engine("sglang.srt.plugins")
    import sglang.srt.plugins as plugins
    from sglang.srt.eplb import eplb_algorithms, lplb_solver
    from sglang.srt.plugins.hook_registry import HookRegistry

    saved = (eplb_algorithms.compute_algorithm, eplb_algorithms.rebalance_experts,
             lplb_solver.LPLBSolver.__dict__["_solve"])
    monkeypatch.setenv("SGLANG_PLUGINS", "moeless")
    HookRegistry.reset()
    plugins._plugins_loaded = False
    plugins.load_plugins()
    yield eplb_algorithms, lplb_solver
    eplb_algorithms.compute_algorithm, eplb_algorithms.rebalance_experts = saved[0], saved[1]
    lplb_solver.LPLBSolver._solve = saved[2]
    HookRegistry.reset()
    plugins._plugins_loaded = False


def test_sglang_entry_point_is_registered():
    eps = {ep.name: ep.value for ep in entry_points(group="sglang.srt.plugins")}
    assert eps.get("moeless") == "moeless.integrations.sglang:register"


def test_sglang_load_plugins_routes_moeless_and_passes_the_rest_through(sglang_loaded):
    alg, _ = sglang_loaded
    h = torch.from_numpy(_history()).to(torch.int32)
    moeless_alg = alg.compute_algorithm(raw_algorithm="moeless", num_groups=None, num_nodes=1)
    assert moeless_alg is msg.MOELESS
    got = alg.rebalance_experts(tokens_per_expert=h, num_physical_experts=24, num_local_physical_experts=6,
                                num_groups=None, num_nodes=1, algorithm=moeless_alg)
    want = msg.rebalance_experts(h, 24, 6)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    # SGLang's own algorithms are untouched
    auto = alg.compute_algorithm(raw_algorithm="auto", num_groups=None, num_nodes=1)
    assert auto is alg.EplbAlgorithm.deepseek
    orig = alg.rebalance_experts.__wrapped__
    a = alg.rebalance_experts(h, 24, 6, None, 1, auto)
    b = orig(h, 24, 6, None, 1, auto)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(KeyError):
        alg.compute_algorithm(raw_algorithm="no-such-algorithm", num_groups=None, num_nodes=1)


def test_sglang_outputs_match_deepseeks_conventions_and_sglangs_maps(monkeypatch):
    _engine("sglang.srt.eplb.eplb_algorithms")
    from sglang.srt.eplb import eplb_algorithms
    from sglang.srt.eplb import expert_location as el

    h = torch.from_numpy(_history(E=16)).to(torch.int32)
    ours = msg.rebalance_experts(h, 24, 6)
    ref = eplb_algorithms.rebalance_experts(h, 24, 6, None, 1, eplb_algorithms.EplbAlgorithm.deepseek)
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype and a.device == b.device and a.dim() == b.dim()
    phy2log, log2phy, logcnt = ours
    assert log2phy.shape[-1] == int(logcnt.max())  # deepseek's width: the largest replica count
    # SGLang's own derivation of the logical -> physical lists (no rank collapse) gives the same map
    theirs = el._compute_logical_to_all_physical_map(phy2log, num_logical_experts=16, ep_size=4, moe_ep_rank=None)
    assert torch.equal(theirs, log2phy)
    assert torch.equal(torch.count_nonzero(theirs != -1, dim=-1), logcnt)
    # SGLang builds its metadata from them as init_by_eplb does (_init_raw pads, counts, checks the shapes)
    monkeypatch.setattr(el, "get_exec", lambda: SimpleNamespace(moe=SimpleNamespace(ep_dispatch_algorithm="dynamic")))
    md = el.ExpertLocationMetadata._init_raw(ep_size=4, physical_to_logical_map=phy2log,
                                             logical_to_all_physical_map=log2phy)
    assert torch.equal(md.logical_to_all_physical_map_num_valid, logcnt)
    assert md.num_physical_experts == 24 and md.num_local_physical_experts == 6 and md.num_logical_experts == 16


def test_sglang_init_expert_location_file_is_read_by_sglang(tmp_path, monkeypatch):
    _engine("sglang.srt.eplb.expert_location")
    from sglang.srt.eplb import expert_location as el

    plan = _policy.rebalance(_history(E=16), 24, 4)
    f = tmp_path / "init.json"
    f.write_text(__import__("json").dumps(msg.init_expert_location(plan)))
    seen = {}

    def fake_init_by_mapping(model_config, physical_to_logical_map, moe_ep_rank=None):
        seen["map"] = physical_to_logical_map
        return "metadata"

    monkeypatch.setattr(el, "get_exec", lambda: SimpleNamespace(moe=SimpleNamespace(init_expert_location=str(f))))
    monkeypatch.setattr(el.ExpertLocationMetadata, "init_by_mapping", staticmethod(fake_init_by_mapping))
    assert el.compute_initial_expert_location_metadata(model_config=None, moe_ep_rank=0) == "metadata"
    assert np.array_equal(np.array(seen["map"]), plan.phy2log)


def _sglang_runtime(monkeypatch, el, ep_size, nnodes=1):
    monkeypatch.setattr(el, "get_exec", lambda: SimpleNamespace(
        moe=SimpleNamespace(ep_join_mode="none", moe_a2a_backend="deepep", ep_dispatch_algorithm="static")))
    monkeypatch.setattr(el, "get_parallel", lambda: SimpleNamespace(ep_size=ep_size, nnodes=nnodes))
    monkeypatch.setattr(el, "_prefer_same_node_experts", lambda: True)


@pytest.mark.parametrize("G,S,E,nnodes", [(4, 6, 16, 1), (8, 3, 16, 2), (2, 10, 16, 1)])
def test_static_dispatch_model_equals_sglangs_tables(monkeypatch, G, S, E, nnodes):
    _engine("sglang.srt.eplb.expert_location")
    from sglang.srt.eplb import expert_location as el
    from sglang.srt.eplb import expert_location_dispatch as eld

    _sglang_runtime(monkeypatch, el, G, nnodes)
    _, log2phy, logcnt = msg.rebalance_experts(torch.from_numpy(_history(E=E)), G * S, S)
    ours = sglang_static_table(log2phy.numpy(), G, G * S, nnodes=nnodes)
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, E, size=(50, 3)))
    for rank in range(G):
        theirs = el.compute_logical_to_rank_dispatch_physical_map(log2phy, ep_size=G, num_physical_experts=G * S,
                                                                  ep_rank=rank)
        assert np.array_equal(theirs.numpy(), ours[rank])
        info = SimpleNamespace(partial_logical_to_rank_dispatch_physical_map=theirs[0])
        picked = eld._topk_ids_logical_to_physical_static(ids, info)
        assert np.array_equal(picked.numpy(), ours[rank, 0][ids.numpy()])


def test_dynamic_dispatch_model_equals_sglangs_rank_invariant_pick():
    _engine("sglang.srt.eplb.expert_location_dispatch")
    from sglang.srt.eplb import expert_location_dispatch as eld

    _, log2phy, logcnt = msg.rebalance_experts(torch.from_numpy(_history(E=16)), 24, 6)
    padded = torch.nn.functional.pad(log2phy[1], (0, 24 - log2phy.shape[-1]), value=-1)  # as SGLang stores it
    info = SimpleNamespace(partial_logical_to_all_physical_map=padded,
                           partial_logical_to_all_physical_map_num_valid=logcnt[1], rank_invariant=True)
    ids = torch.from_numpy(np.random.default_rng(1).integers(0, 16, size=(97, 4))).to(torch.int32)
    theirs = eld._topk_ids_logical_to_physical_dynamic(ids, info)
    assert np.array_equal(theirs.numpy(), sglang_dynamic_choice(ids.numpy(), log2phy[1].numpy(), logcnt[1].numpy()))


def _lp_solver(monkeypatch, phy2log, log2phy, G):
    _engine("sglang.srt.eplb.lplb_solver")
    import sglang.kernels.ops.lplb.torch_solver as ts
    from sglang.srt.eplb.lplb_solver import LPLBSolver

    monkeypatch.setattr(ts, "warmup", lambda *a, **k: None)  # its CUDA kernel warm-up; the matrices are CPU code
    return LPLBSolver(phy2log, log2phy, G)


def _sglang_lp_reference(solver, counts):
    """LPLBSolver._solve through SGLang's documented torch equivalents of its prep and post kernels and its
    torch reference of the interior point (sglang/test/kernels/lplb.py)."""
    from sglang.test.kernels.lplb import solve_ipm_torch_reference

    total = counts.sum().clamp(min=1.0)
    norm = counts / total
    t1 = norm[solver.log_single]
    b = torch.cat([norm[solver.log_replicated], -(solver.B1 @ t1).flatten()])
    A = torch.cat([solver.A_base, (b - solver.A_base.sum(1))[:, None]], dim=1)
    x = solve_ipm_torch_reference(A, b, solver.c_vec)
    phy_prob = torch.zeros(solver.num_phy + 1)
    phy_prob[solver.phy_replicated] = x[: solver.num_red_phy].clamp(min=0)
    phy_prob[solver.phy_single] = t1
    return phy_prob[torch.where(solver.log2phy >= 0, solver.log2phy, solver.num_phy)]


def test_lp_model_matches_sglangs_solver_and_sampler(monkeypatch):
    _engine("sglang.test.kernels.lplb")
    from sglang.test.kernels.lplb import dispatch_probability_torch_reference

    G, S, E = 4, 5, 16
    h = _history(T=40, L=2, E=E, seed=3)
    phy2log, log2phy, _ = msg.rebalance_experts(torch.from_numpy(h), G * S, S)
    compared = 0
    for layer in range(2):
        solver = _lp_solver(monkeypatch, phy2log[layer], log2phy[layer], G)
        counts = h[:, layer].astype(np.float32)
        ours = sglang_lp_probabilities(counts, phy2log[layer].numpy(), log2phy[layer].numpy(), G)
        for t in range(len(counts)):
            try:
                ref = _sglang_lp_reference(solver, torch.from_numpy(counts[t]))
            except RuntimeError:  # the LU reference can meet an exactly singular system; the kernel clamps
                continue
            assert np.allclose(ours[t], ref.numpy(), atol=2e-3), t
            compared += 1
    assert compared >= 60
    # sampling: the same uniforms give the same replicas as SGLang's reference of its kernel
    prob = torch.from_numpy(ours[0])
    ids = torch.from_numpy(np.random.default_rng(2).integers(0, E, size=(64, 6)))
    u = torch.rand(ids.numel(), generator=torch.Generator().manual_seed(0))
    theirs = dispatch_probability_torch_reference(ids, prob, log2phy[1], u)
    assert np.array_equal(theirs.numpy(), sample_replicas(ids.numpy(), ours[0], log2phy[1].numpy(), u.numpy()))


def test_sglang_lp_hook_gives_moeless_split_only_when_chosen(monkeypatch, sglang_loaded):
    _, lplb = sglang_loaded
    G, S, E = 4, 5, 16
    h = _history(E=E)
    phy2log, log2phy, _ = msg.rebalance_experts(torch.from_numpy(h), G * S, S)
    solver = _lp_solver(monkeypatch, phy2log[0], log2phy[0], G)
    counts = torch.from_numpy(h[-1, 0]).float()
    monkeypatch.setattr(msg, "_moeless_lp_enabled", lambda: True)
    got = solver._solve(counts)
    assert torch.allclose(got, msg.lp_probabilities(counts, log2phy[0], G * S, G))
    plan = _policy.rebalance(h, G * S, G)
    rt = _policy.split_quotas(plan, h[-1])[0]
    assert np.allclose(got.numpy()[log2phy[0].numpy() >= 0] * counts.sum().item(), rt[plan.log2phy[0] >= 0])
    # not chosen: SGLang's own _solve runs; its CUDA kernels are replaced by a recorder to see the call
    import sglang.kernels.ops.lplb as lplb_ops

    calls = []

    class _Kernels:
        @staticmethod
        def prep_lp_inputs(*args):
            calls.append(args[3])
            raise _Stop

    class _Stop(Exception):
        pass

    monkeypatch.setitem(sys.modules, "sglang.kernels.ops.lplb.cuda_solver", _Kernels)
    monkeypatch.setattr(lplb_ops, "cuda_solver", _Kernels, raising=False)
    monkeypatch.setattr(msg, "_moeless_lp_enabled", lambda: False)
    with pytest.raises(_Stop):
        solver._solve(counts)
    assert len(calls) == 1 and torch.equal(calls[0], counts)


def test_sglang_lp_choice(monkeypatch):
    _engine("sglang.srt.runtime_context")
    import sglang.srt.runtime_context as rc

    monkeypatch.setattr(rc, "get_exec", lambda: SimpleNamespace(moe=SimpleNamespace(eplb_algorithm="moeless")))
    monkeypatch.delenv(msg.ENV_LP, raising=False)
    assert msg._moeless_lp_enabled() is True
    monkeypatch.setenv(msg.ENV_LP, "sglang")
    assert msg._moeless_lp_enabled() is False
    monkeypatch.delenv(msg.ENV_LP)
    monkeypatch.setattr(rc, "get_exec", lambda: SimpleNamespace(moe=SimpleNamespace(eplb_algorithm="auto")))
    assert msg._moeless_lp_enabled() is False


def test_sglang_dumps_from_sglangs_own_count_conversion(tmp_path):
    """Counts derived with the recorder's own conversion functions agree with what the readers return."""
    mod = _engine_functions("sglang", "srt/eplb/expert_distribution.py",
                            ["_convert_per_token_to_global_physical_count",
                             "_convert_global_physical_count_to_logical_count"], tmp_path, header="import torch")
    rng = np.random.default_rng(0)
    L, E, P, N = 3, 8, 10, 7
    p2l = torch.from_numpy(np.stack([np.r_[np.arange(E), rng.integers(0, E, P - E)] for _ in range(L)]))
    phys = torch.full((L, N + 2, 8), -1, dtype=torch.int32)
    phys[1:, :N, :2] = torch.from_numpy(rng.integers(0, P, size=(L - 1, N, 2))).to(torch.int32)
    g = mod._convert_per_token_to_global_physical_count(N + 2, L, P, phys)
    rec = {"forward_pass_id": 0, "rank": 0, "input_ids": list(range(N + 2)), "topk_ids_of_layer": phys,
           "global_physical_count": g}
    torch.save({"records": [rec], "last_physical_to_logical_map": p2l}, tmp_path / "expert_distribution_recorder_1_0.pt")
    logical = mod._convert_global_physical_count_to_logical_count(g[None], L, E, p2l)
    from moeless.traces import read_sglang_dump, read_sglang_logical_count

    assert np.array_equal(read_sglang_logical_count(tmp_path), logical.numpy())
    tr = read_sglang_dump(tmp_path)
    assert np.array_equal(tr.loads(), logical[0, 1:].numpy())


# ---- vLLM ------------------------------------------------------------------------------------------------------
def test_vllm_entry_point_is_registered():
    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("moeless_eplb") == "moeless.integrations.vllm:register"


@pytest.fixture
def vllm_plugins(monkeypatch):
    _engine("vllm.plugins")
    _engine("vllm.distributed.eplb.policy")
    import vllm.plugins as plugins
    from vllm.distributed.eplb import policy

    saved = dict(policy.EPLB_POLICIES)
    monkeypatch.setenv("VLLM_PLUGINS", "moeless_eplb")

    def load():
        plugins.plugins_loaded = False
        plugins.load_general_plugins()
        return policy.EPLB_POLICIES

    yield load
    policy.EPLB_POLICIES.clear()
    policy.EPLB_POLICIES.update(saved)
    plugins.plugins_loaded = False


def test_vllm_plugin_installs_the_policy_only_when_opted_in(vllm_plugins, monkeypatch):
    from vllm.distributed.eplb.policy import DefaultEplbPolicy

    monkeypatch.delenv(mvl.ENV, raising=False)
    assert vllm_plugins()["default"] is DefaultEplbPolicy
    monkeypatch.setenv(mvl.ENV, "1")
    pol = vllm_plugins()
    assert pol["default"] is mvl.MoelessEplbPolicy and set(pol) == {"default"}


def test_vllm_config_accepts_only_default(vllm_plugins):
    from vllm.config.parallel import EPLBConfig

    assert EPLBConfig().policy == "default" and EPLBConfig().use_async
    with pytest.raises(Exception):
        EPLBConfig(policy="moeless")  # Literal["default"]: why the plug-in replaces the default entry


def test_vllm_policy_is_an_abstract_eplb_policy_with_its_signature():
    _engine("vllm.distributed.eplb.policy")
    from vllm.distributed.eplb.policy import AbstractEplbPolicy, DefaultEplbPolicy

    cls = mvl.MoelessEplbPolicy
    assert issubclass(cls, AbstractEplbPolicy) and not inspect.isabstract(cls)
    assert isinstance(inspect.getattr_static(cls, "rebalance_experts"), classmethod)
    ours = list(inspect.signature(cls.rebalance_experts).parameters)
    assert ours == list(inspect.signature(DefaultEplbPolicy.rebalance_experts).parameters)


@pytest.mark.parametrize("L,E,P,G", [(3, 16, 16, 4), (3, 16, 24, 4), (2, 16, 20, 1), (4, 64, 72, 8), (1, 6, 12, 2)])
def test_vllm_policy_outputs(tmp_path, L, E, P, G):
    _engine("vllm.distributed.eplb.policy")
    from vllm.distributed.eplb.policy import DefaultEplbPolicy

    maps = _engine_functions("vllm", "distributed/eplb/eplb_state.py", ["compute_logical_maps"], tmp_path,
                             header="import torch")
    w = torch.from_numpy(_history(L=L, E=E).sum(0))
    out = mvl.MoelessEplbPolicy.rebalance_experts(w, P, 1, 1, G)
    ref = DefaultEplbPolicy.rebalance_experts(w, P, 1, 1, G)
    assert out.dtype == ref.dtype == torch.int64 and out.shape == ref.shape == (L, P) and out.device.type == "cpu"
    l2p, cnt = maps.compute_logical_maps(out, E)  # vLLM's own derivation
    assert (cnt >= 1).all() and int(cnt.sum()) == L * P
    assert torch.equal(out, mvl.MoelessEplbPolicy.rebalance_experts(w.clone(), P, 1, 1, G))  # deterministic
    again = mvl.MoelessEplbPolicy.rebalance_experts(w, P, 1, 1, G, out)
    assert torch.equal(again, out)  # the same load with the live placement: no expert moves
    zero = mvl.MoelessEplbPolicy.rebalance_experts(torch.zeros(L, E, dtype=torch.int64), P, 1, 1, G)
    assert all(set(r.tolist()) == set(range(E)) for r in zero)


def test_vllm_policy_keeps_slots_of_the_live_placement(tmp_path):
    _engine("vllm.distributed.eplb.policy")
    w1 = torch.from_numpy(_history(E=32, seed=1).sum(0))
    w2 = w1 + torch.from_numpy(np.random.default_rng(5).poisson(3, size=w1.shape))
    old = mvl.MoelessEplbPolicy.rebalance_experts(w1, 40, 1, 1, 4)
    warm = mvl.MoelessEplbPolicy.rebalance_experts(w2, 40, 1, 1, 4, old)
    cold = mvl.MoelessEplbPolicy.rebalance_experts(w2, 40, 1, 1, 4)
    assert (warm == old).sum() >= (cold == old).sum()
    scaled = mvl.MoelessEplbPolicy.rebalance_experts(w2, 40, 1, 1, 4, torch.full((3, 48), -1))
    assert torch.equal(scaled, cold)  # a placement of another size (elastic EP) is not reused


def _interpreter_bool_atomic_masks(monkeypatch):
    """Triton's interpreter (3.9) hands an atomic a mask built from a loaded scalar as int32 and then rejects
    it; compiled Triton does not. Cast such masks to bool (the interpreter only: the kernel is unchanged)."""
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_atomic_rmw

    def create_atomic_rmw(self, rmw_op, ptr, val, mask, sem, scope):
        mask = interpreter.TensorHandle(np.ascontiguousarray(mask.data != 0), mask.dtype)
        return original(self, rmw_op, ptr, val, mask, sem, scope)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_atomic_rmw", create_atomic_rmw)


def test_vllm_hash_model_equals_vllms_router_kernel(tmp_path, monkeypatch):
    triton = pytest.importorskip("triton")
    kernel = _engine_functions(
        "vllm", "model_executor/layers/fused_moe/router/base_router.py",
        ["_eplb_map_and_record_i32_kernel", "_eplb_map_and_record_triton"], tmp_path,
        header="import torch\nimport triton\nimport triton.language as tl")
    del triton
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        if not __import__("os").environ.get("TRITON_INTERPRET"):
            pytest.skip("needs CUDA or the Triton interpreter")
        _interpreter_bool_atomic_masks(monkeypatch)
    _, log2phy, logcnt = msg.rebalance_experts(torch.from_numpy(_history(E=16)), 24, 6)
    l2p, cnt = log2phy[2].contiguous().to(device), logcnt[2].contiguous().to(device)
    ids = torch.from_numpy(np.random.default_rng(4).integers(0, 16, size=(300, 6))).to(torch.int32).to(device)
    load = torch.zeros(24, dtype=torch.int32, device=device)
    for unpadded in (None, torch.tensor(ids.shape[0], dtype=torch.int32, device=device)):
        load.zero_()
        out = kernel._eplb_map_and_record_triton(ids, l2p, cnt, load, torch.tensor(True, device=device), unpadded)
        ours = vllm_hash_choice(ids.cpu().numpy(), l2p.cpu().numpy(), cnt.cpu().numpy())
        assert np.array_equal(out.cpu().numpy(), ours)
        assert np.array_equal(load.cpu().numpy(), np.bincount(ours.ravel(), minlength=24))  # what vLLM records


def test_policies_agree_across_the_two_engines_for_the_same_load():
    """One decision behind both plug-ins: vLLM's window sum as one pass is SGLang's one-pass history."""
    w = _history(E=16).sum(0)
    v = mvl.rebalance_phy2log(torch.from_numpy(w), 24, 4)
    s = msg.rebalance_experts(torch.from_numpy(w), 24, 6)[0]
    assert torch.equal(v, s)


def test_sglang_and_vllm_reject_bad_input():
    with pytest.raises(ValueError, match="cannot hold"):
        mvl.rebalance_phy2log(torch.ones(2, 16), 8, 4)
    with pytest.raises(ValueError, match="multiple of gpus"):
        mvl.rebalance_phy2log(torch.ones(2, 16), 18, 4)
    for bad in (torch.ones(16), torch.ones(2, 2, 2, 16)):
        with pytest.raises(ValueError):
            msg.rebalance_experts(bad, 16, 4)


# ---- the README's engine sections --------------------------------------------------------------------------------
def _readme_block(heading: str) -> str:
    import os
    import re

    text = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    section = text.split(heading, 1)[1]
    return re.search(r"```\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")


def test_readme_sglang_command_parses_with_sglangs_parser():
    _engine("sglang.srt.server_args")
    import shlex

    from sglang.srt.server_args import prepare_server_args

    argv = shlex.split(_readme_block("### SGLang"))
    assert argv[:3] == ["python", "-m", "sglang.launch_server"]
    args = prepare_server_args(argv[3:])
    assert args.enable_eplb and args.eplb_algorithm == msg.ALGORITHM and args.ep_dispatch_algorithm == "lp"
    assert args.ep_num_redundant_experts == 8 and args.ep_size == 8


def test_readme_vllm_command_opts_in_with_a_valid_eplb_config():
    _engine("vllm.config.parallel")
    import json
    import shlex

    from vllm.config.parallel import EPLBConfig

    argv = shlex.split(_readme_block("### vLLM"))
    assert argv[0] == f"{mvl.ENV}=1" and argv[1:3] == ["vllm", "serve"]
    assert {"--enable-expert-parallel", "--enable-eplb"} <= set(argv)
    config = EPLBConfig(**json.loads(argv[argv.index("--eplb-config") + 1]))
    assert config.policy == "default" and config.num_redundant_experts == 8
