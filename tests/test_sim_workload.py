"""moeless.sim.workload: trace readers, windows and batching against brute force on tiny traces."""
import gzip
import io

import numpy as np
import pytest

from moeless.sim.workload import (RequestTrace, busiest_window, continuous_batches, load_trace, paper_batches,
                                  read_mooncake_jsonl, read_request_csv, scale_rate, select_window)


def csv(text):
    return io.StringIO(text)


def test_azure_seven_fractional_digits():
    tr = read_request_csv(csv("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                              "2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:50.9951690,396,109\n"))
    assert np.allclose(tr.arrival_s, [0.0, 4.314579])
    assert tr.input_tokens.tolist() == [374, 396] and tr.output_tokens.tolist() == [44, 109]


def test_generic_csv_and_mooncake(tmp_path):
    tr = read_request_csv(csv("time,input_tokens,output_tokens\n1.5,10,2\n2.0,20,3\n"))
    assert tr.arrival_s.tolist() == [0.0, 0.5]
    p = tmp_path / "t.jsonl"
    p.write_text('{"timestamp": 0, "input_length": 5, "output_length": 2, "hash_ids": [0]}\n'
                 '{"timestamp": 1500, "input_length": 7, "output_length": 1, "hash_ids": [1]}\n')
    mc = read_mooncake_jsonl(str(p))
    assert mc.arrival_s.tolist() == [0.0, 1.5] and mc.input_tokens.tolist() == [5, 7]


@pytest.mark.parametrize("text, match", [
    ("TIMESTAMP,ContextTokens\n0,1\n", "output tokens"),
    ("time,input_tokens,output_tokens\n0,-1,2\n", "negative input"),
    ("time,input_tokens,output_tokens\n2,1,2\n1,1,2\n", "not sorted"),
    ("time,input_tokens,output_tokens\n0,x,2\n", "line 2"),
    ("", "empty"),
])
def test_malformed_csv(text, match):
    with pytest.raises(ValueError, match=match):
        read_request_csv(csv(text))


def test_empty_window_and_bad_rate():
    tr = RequestTrace([0.0, 100.0], [1, 1], [1, 1])
    with pytest.raises(ValueError, match="holds no request"):
        select_window(tr, 10.0, 5.0)
    with pytest.raises(ValueError, match="rate scale"):
        scale_rate(tr, 0)
    assert scale_rate(tr, 2.0).arrival_s.tolist() == [0.0, 50.0]


def test_busiest_window_brute_force():
    rng = np.random.default_rng(1)
    t = np.sort(rng.uniform(0, 100, 60))
    i, o = rng.integers(1, 50, 60), rng.integers(1, 20, 60)
    tr = RequestTrace(t, i, o)
    start, win = busiest_window(tr, 10.0)
    best = max(((i + o)[(t >= s) & (t < s + 10)].sum(), -s) for s in t)
    assert (i + o)[(t >= start) & (t < start + 10)].sum() == best[0] and start == -best[1]
    assert len(win) == ((t >= start) & (t < start + 10)).sum()


def test_paper_batches_brute_force():
    tr = RequestTrace([0.1, 0.5, 0.9, 2.3, 2.4], [10, 20, 30, 5, 6], [3, 1, 2, 4, 0])
    s = paper_batches(tr, 1.0)
    # batch 0: prefill 60, decode steps 1..2 hold requests with more than j outputs: [2, 1]
    # batch 1 (window [2, 3)): prefill 11, decode steps 1..3: [1, 1, 1]
    assert s.tokens.tolist() == [60, 2, 1, 11, 1, 1, 1]
    assert s.prefill.tolist() == [True, False, False, True, False, False, False]
    assert s.ready_s.tolist() == [1.0] * 3 + [3.0] * 4
    # every generated token after the first is one decode pair
    assert s.tokens[~s.prefill].sum() == np.maximum(tr.output_tokens - 1, 0).sum()
    th = s.thin(2)
    assert th.weight.sum() == len(s) and th.prefill.sum() == 2
    assert th.tokens.tolist() == [60, 2, 11, 1, 1]


def test_continuous_batches_conserve_tokens():
    rng = np.random.default_rng(0)
    n = 40
    tr = RequestTrace(np.sort(rng.uniform(0, 2, n)), rng.integers(1, 300, n), rng.integers(1, 30, n))
    s = continuous_batches(tr, 0.01, token_budget=256)
    assert s.tokens.max() <= 256
    # every prompt token once, every output token after the first once
    assert s.tokens.sum() == tr.input_tokens.sum() + (tr.output_tokens - 1).sum()
    assert np.all(np.diff(s.ready_s) >= 0)


def test_bundled_traces():
    conv = load_trace("azure-conv")
    code = load_trace("azure-code")
    assert (len(conv), len(code)) == (19366, 8819)
    with pytest.raises(ValueError, match="trace"):
        load_trace("nope")
    raw = gzip.compress(b"TIMESTAMP,ContextTokens,GeneratedTokens\n")
    assert raw  # gzip round trip of a header-only CSV gives an empty trace, which batching refuses
    with pytest.raises(ValueError, match="empty"):
        paper_batches(read_request_csv(io.TextIOWrapper(io.BytesIO(gzip.decompress(raw)))))
