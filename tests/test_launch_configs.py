"""Launch configurations of the grouped GEMM: the BLOCK_M rule, the heuristic tiles, the tuned-table lookup.

What a config does to the numbers is covered by the kernels' own tests (any tile gives the same result); here:
which config is picked, that tuned tables are read as vLLM's are (nearest batch), and that a missing or broken
table behaves (heuristic with one log line; a ValueError naming the file).
"""
import json
import logging

import pytest

from moeless_kernels import launch_configs as lc


def test_block_m_follows_pairs_per_slot():
    # triton_kernels' rule: the typical slot's pairs fit one block, so its weights are read once
    for pairs, slots, want in [(8, 8, 16), (64 * 2, 8, 32), (16 * 8, 128, 16), (40 * 8, 8, 64), (2048, 8, 128),
                               (4096 * 8, 256, 128), (0, 8, 16)]:
        assert lc.heuristic_block_m(pairs, slots) == want, (pairs, slots)
    # a decode batch whose slots hold up to twice the mean fits one block of every BLOCK_M below 128
    for per_slot in range(1, 64):
        block_m = lc.heuristic_block_m(per_slot * 8, 8)
        assert block_m >= min(2 * per_slot, 64) and block_m in lc.BLOCK_M_VALUES
    sizes = [lc.heuristic_block_m(n, 8) for n in range(0, 4096, 7)]
    assert sizes == sorted(sizes)


def test_heuristic_tiles_prefill_decode_and_group_size():
    prefill = lc.heuristic_moe_config(128, "bfloat16", 90)
    assert (prefill.gate_up.BLOCK_N, prefill.gate_up.BLOCK_K, prefill.gate_up.num_warps,
            prefill.gate_up.num_stages) == (128, 64, 8, 4)
    assert (prefill.down.BLOCK_N, prefill.down.BLOCK_K, prefill.down.num_warps, prefill.down.num_stages) == \
        (128, 64, 8, 4)
    assert 8 <= prefill.down.GROUP_SIZE_M <= 16
    for arch in (80, 90, 86):
        for dtype in lc.DTYPE_NAMES:
            for aligned in (True, False):
                for config in lc.all_moe_configs(dtype, arch, aligned):
                    # GROUP_SIZE_M = 1 would re-read a weight tile for every block of an expert
                    assert config.gate_up.GROUP_SIZE_M >= 8 and config.down.GROUP_SIZE_M >= 8
                    for gemm, gate_up in ((config.gate_up, True), (config.down, False)):
                        assert gemm.shared_memory(config.block_m, dtype, gate_up) <= lc.SHARED_MEMORY_LIMIT[arch]
    with pytest.raises(ValueError, match="block_m"):
        lc.heuristic_moe_config(256, "bfloat16", 90)
    with pytest.raises(ValueError, match="dtype"):
        lc.heuristic_moe_config(16, "int8", 90)
    assert lc.rows_aligned("bfloat16", 4096, 14336) and not lc.rows_aligned("bfloat16", 4096, 1002)


def test_gemm_config_rejects_bad_values():
    with pytest.raises(ValueError, match="BLOCK_N"):
        lc.GemmConfig(48, 64, 8, 4, 3)
    with pytest.raises(ValueError, match="num_stages"):
        lc.GemmConfig(64, 64, 8, 4, 0)


def _write_table(directory, entries, name=None, **shape):
    shape = {**dict(num_weights=8, inter=14336, hidden=4096, top_k=2, device_name="NVIDIA H200",
                    dtype="bfloat16"), **shape}
    path = directory / (name or lc.table_name(**shape))
    path.write_text(json.dumps(entries))
    lc.load_table.cache_clear()
    return path


def _entry(block_m, bn):
    gemm = dict(BLOCK_N=bn, BLOCK_K=64, GROUP_SIZE_M=8, num_warps=4, num_stages=3)
    return {"BLOCK_M": block_m, "gate_up": gemm, "down": gemm}


def test_tuned_table_nearest_batch_and_block_m(tmp_path, monkeypatch):
    monkeypatch.setenv(lc.CONFIG_DIR_ENV, str(tmp_path))
    _write_table(tmp_path, {"meta": {"capability": 90}, "1": _entry(16, 32), "64": _entry(32, 64),
                            "4096": _entry(128, 128)})
    assert lc.table_name(8, 14336, 4096, 2, "NVIDIA H200", "bfloat16") == \
        "E=8,N=14336,H=4096,topk=2,device_name=NVIDIA_H200,dtype=bfloat16.json"
    args = dict(top_k=2, num_slots=8, num_weights=8, inter=14336, hidden=4096, dtype="bfloat16",
                device_name="NVIDIA H200", capability=90)
    for tokens, want_bn in [(1, 32), (30, 32), (40, 64), (100, 64), (3000, 128), (10**6, 128)]:
        config = lc.select_moe_config(tokens, **args)
        assert config.gate_up.BLOCK_N == want_bn and config.source.endswith(".json"), tokens
    # a requested BLOCK_M the table does not hold: the heuristic for that BLOCK_M
    assert lc.select_moe_config(64, **args, block_m=64).source == "heuristic"
    # another device or shape: no table
    assert lc.select_moe_config(64, **{**args, "device_name": "NVIDIA A100"}).source == "heuristic"


def test_missing_table_falls_back_with_one_log_line(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(lc.CONFIG_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(lc, "_FALLBACK_LOGGED", set())
    args = dict(num_tokens=64, top_k=8, num_slots=128, num_weights=128, inter=768, hidden=2048, dtype="bfloat16",
                device_name="Test GPU", capability=90)
    with caplog.at_level(logging.WARNING, logger="moeless_kernels"):
        first = lc.select_moe_config(**args)
        lc.select_moe_config(**args)
    assert first == lc.heuristic_moe_config(lc.heuristic_block_m(64 * 8, 128), "bfloat16", 90)
    assert len([r for r in caplog.records if "no tuned grouped-GEMM table" in r.getMessage()]) == 1


@pytest.mark.parametrize("content, match", [
    ("{not json", "not valid JSON"),
    (json.dumps({}), "non-empty"),
    (json.dumps({"many": _entry(16, 64)}), "token counts"),
    (json.dumps({"8": {"BLOCK_M": 16}}), "gate_up"),
    (json.dumps({"8": {**_entry(16, 64), "BLOCK_M": 24}}), "BLOCK_M"),
    (json.dumps({"8": {**_entry(16, 64), "down": {**_entry(16, 64)["down"], "BLOCK_N": 48}}}), "BLOCK_N"),
])
def test_malformed_table_is_an_error_naming_the_file(tmp_path, monkeypatch, content, match):
    monkeypatch.setenv(lc.CONFIG_DIR_ENV, str(tmp_path))
    path = _write_table(tmp_path, {})
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as err:
        lc.select_moe_config(8, 2, 8, 8, 14336, 4096, "bfloat16", "NVIDIA H200", 90)
    assert path.name in str(err.value)


def test_shipped_tables_are_readable():
    # every table shipped as package data parses and names its target
    import os

    for name in sorted(os.listdir(lc.CONFIG_DIR)):
        if name.endswith(".json"):
            path = os.path.join(lc.CONFIG_DIR, name)
            assert lc.load_table(path), name
            assert lc.table_capability(path) in lc.SHARED_MEMORY_LIMIT, name


def _tuner():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "tune_moe.py"
    spec = importlib.util.spec_from_file_location("tune_moe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tuner_picks_the_fastest_block_m_and_tiles(capsys):
    tuner = _tuner()
    space = tuner.search_space(quick=True)
    assert len(space) == 16 and all(c.GROUP_SIZE_M >= 8 for c in tuner.search_space(quick=False))
    a, b = space[0], space[1]
    # BLOCK_M 16: best gate/up 1.0 + best down 1.0; BLOCK_M 32: 0.5 + 1.2 = 1.7 wins; 64 ran nothing
    timings = {16: ({a: 1.0, b: 2.0}, {a: 1.5, b: 1.0}), 32: ({a: 0.7, b: 0.5}, {a: 1.2}), 64: ({}, {})}
    best = tuner.choose(timings)
    assert (best.block_m, best.gate_up, best.down) == (32, b, a)
    with pytest.raises(RuntimeError):
        tuner.choose({16: ({}, {})})
    assert tuner.main(["--shape", "8,14336,4096,2", "--dry-run", "--quick", "--tokens", "64"]) == 0
    assert "E=8,N=14336,H=4096,topk=2" in capsys.readouterr().out
