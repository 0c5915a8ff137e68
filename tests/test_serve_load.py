"""Serving under load and faults (gloo, worlds 2 and 4, bounded in requests and seconds).

Requests of mixed lengths arrive as a Poisson process faster than the ranks serve them (`serve(realtime=True)`:
a window's batch starts once its window has passed, so requests queue); one request too long for the model's
context sits in a busy window; in the fault runs one rank is killed (SIGKILL) in the middle of a batch.
Every request must either hold exactly the tokens of the single-process model or say why it holds none;
every surviving rank must end within the collective timeout with one clear error line.
"""
from __future__ import annotations

import functools
import os
import signal
import time

import pytest

from moeless import demo, serve, tiny_moe
from serve_harness import reference, run_ranks

WINDOW_S = 0.1  # the batching window
TIMEOUT_S = 10.0  # the process group's collective timeout in these runs
# (requests, arrivals per second, seed): the load run offers 300 requests in under a second, several windows
# of them, far more than the ranks serve in that time (a batch of the tiny model takes far over a window)
LOAD = (300, 400.0, 0)
FAULT = (64, 100.0, 1)  # a slower stream: the kill comes in the third of several batches


@functools.lru_cache(maxsize=None)
def _requests(n: int, rate: float, seed: int):
    model_ctx = serve.load_model(None).config.max_position_embeddings
    reqs = demo.mixed_requests(tiny_moe.encode, n, rate_per_s=rate, max_prompt=64, max_new=5, seed=seed)
    bad = reqs[n // 3]  # too long for the context, in the middle of a busy window
    reqs[n // 3] = serve.Request(tiny_moe.encode("x" * model_ctx)[:model_ctx - 1], 4, bad.arrival_s, id=bad.id)
    return reqs


@functools.lru_cache(maxsize=None)
def _reference(n: int, rate: float, seed: int):
    reqs = _requests(n, rate, seed)
    return reference(serve.load_model(None), [q.prompt for q in reqs], [q.max_new_tokens for q in reqs])[0]


def _serve(rank, world, ctx, reqs, kill, outdir):
    """Serve `reqs` in real time with the demo's moeless settings; kill = (rank, batch): that rank SIGKILLs
    itself in that batch's first decode iteration, half way through the MoE layers."""
    model = serve.load_model(None)
    srv = serve.ExpertParallelServer(model, ctx, policy="moeless")
    if kill is not None and rank == kill[0]:
        original = serve.ExpertParallelExperts.forward

        def forward(mod, *args, **kwargs):
            batch = len(srv._prefill_iterations) - 1
            in_batch = srv.timer.iterations - srv._prefill_iterations[-1]
            if batch >= kill[1] and in_batch >= 1 and mod.layer == srv.num_layers // 2:
                with open(os.path.join(outdir, "killed_at"), "w") as f:
                    f.write(repr(time.time()))
                os.kill(os.getpid(), signal.SIGKILL)
            return original(mod, *args, **kwargs)

        serve.ExpertParallelExperts.forward = forward
    t = time.perf_counter()
    error = error_at = None
    try:
        results = srv.serve(reqs, batch_window_s=WINDOW_S, realtime=True)
    except serve.ServeError as err:
        results, error, error_at = err.results, str(err), time.time()
    seconds = time.perf_counter() - t
    srv.close()
    return {"results": [(r.id, r.tokens, r.error, r.batch, r.arrival_s, r.first_token_s, r.done_s) for r in results],
            "error": error, "error_at": error_at, "seconds": seconds}


def _check_requests(reqs, results, ref):
    """Each request: all its reference tokens and no error, or no token and an error saying why."""
    for req, (rid, tokens, error, batch, *_), want in zip(reqs, results, ref):
        assert rid == req.id
        if error is None:
            assert tokens == want, f"request {rid}: tokens differ from the single-process model"
            assert len(tokens) == req.max_new_tokens and batch >= 0
        else:
            assert tokens == [], f"request {rid} failed ({error}) but reports {len(tokens)} tokens"
            assert "\n" not in error and error.split(":", 1)[0] in ("context", "serving"), error


@pytest.mark.parametrize("world", [2, 4])
def test_load_every_request_served_or_refused(world, tmp_path):
    reqs = _requests(*LOAD)
    outcomes = run_ranks(world, _serve, tmp_path, args=(reqs, None, str(tmp_path)), timeout=240.0,
                         collective_timeout=TIMEOUT_S)
    for r, o in enumerate(outcomes):
        assert not o.hung and o.result is not None and "exception" not in o.result, f"rank {r}: {o.result}"
        assert o.result["error"] is None, o.result["error"]
        assert o.result["results"] == outcomes[0].result["results"]  # every rank reports every request alike
    results = outcomes[0].result["results"]
    _check_requests(reqs, results, _reference(*LOAD))
    errors = [res[2] for res in results]
    assert errors[len(reqs) // 3].startswith("context: ") and errors.count(None) == len(reqs) - 1
    # arrivals outpaced the service: the run outlasted the arrivals, and requests queued behind earlier batches
    seconds = outcomes[0].result["seconds"]
    assert seconds > reqs[-1].arrival_s + WINDOW_S
    waits = sorted(res[5] - res[4] for res in results if res[2] is None)  # arrival -> first token
    assert waits[len(waits) // 2] > 2 * WINDOW_S
    report = serve.load_report([serve.Result(id=i, tokens=t, error=e, batch=b, arrival_s=a, first_token_s=f, done_s=d)
                                for i, t, e, b, a, f, d in results], seconds)
    print(f"world {world}: {report}")


@pytest.mark.parametrize("world", [2, 4])
def test_rank_killed_mid_batch(world, tmp_path):
    reqs = _requests(*FAULT)
    victim = world - 1
    outcomes = run_ranks(world, _serve, tmp_path, args=(reqs, (victim, 2), str(tmp_path)), timeout=120.0,
                         collective_timeout=TIMEOUT_S)
    assert outcomes[victim].exitcode == -signal.SIGKILL and outcomes[victim].result is None
    killed_at = float((tmp_path / "killed_at").read_text())
    survivors = [o for r, o in enumerate(outcomes) if r != victim]
    ref = _reference(*FAULT)
    for o in survivors:
        assert not o.hung and o.result is not None and "exception" not in o.result, o.result
        err = o.result["error"]
        assert err is not None and "\n" not in err and "peer rank died or stalled" in err, err
        print("error after kill", o.result["error_at"] - killed_at)
        assert o.result["error_at"] - killed_at < TIMEOUT_S + 5.0  # within the timeout, not a hang
        results = o.result["results"]
        _check_requests(reqs, results, ref)
        served = [res for res in results if res[2] is None]
        failed = [res for res in results if res[2] is not None and res[2].startswith("serving: ")]
        assert served and failed and len(served) + len(failed) == len(reqs) - 1  # one refused: too long
        # the kill came in batch b >= 2: batches 0 .. b-1 are complete, batch b failed, later ones never ran
        b = min(int(res[2].split("batch ", 1)[1].split()[0]) for res in failed)
        assert b >= 2 and {res[3] for res in served} == set(range(b))
        assert any(res[2].startswith(f"serving: batch {b} failed: rank ") for res in failed)
        assert all(res[2].startswith((f"serving: batch {b} failed: rank ", f"serving: not served: batch {b} failed "))
                   for res in failed)
