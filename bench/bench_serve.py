"""The serving loop's overhead: one forward of the tiny model through ExpertParallelServer (world of one, the
full per-layer path: counts gather, split, dispatch, all-to-all, fused MoE, combine, control plane) against the
plain single-process forward. Records shapes, device and versions; asserts only that outputs agree (the
benchmark itself never asserts a time). With CI's --benchmark-disable each runs once, quickly."""
import torch

from moeless import serve

PROMPT = torch.tensor([[256] + list(b"The quick brown fox jumps over the lazy dog.")])


def _model():
    return serve.load_model(None)


def _info(benchmark, model):
    benchmark.extra_info.update(tokens=int(PROMPT.numel()), device=str(next(model.parameters()).device),
                                torch=torch.__version__)


def test_single_process_forward(benchmark):
    model = _model()
    _info(benchmark, model)
    with torch.no_grad():
        benchmark(lambda: model(input_ids=PROMPT, output_router_logits=False).logits)


def test_serving_loop_forward(benchmark):
    model = _model()
    _info(benchmark, model)
    with torch.no_grad():
        ref = model(input_ids=PROMPT, output_router_logits=False).logits
    ctx = serve.init_distributed(world_size=1, rank=0)
    try:
        srv = serve.ExpertParallelServer(model, ctx, policy="moeless")
        with torch.no_grad():
            got = benchmark(lambda: model(input_ids=PROMPT.to(srv.device), output_router_logits=False).logits)
        srv.close()
    finally:
        serve.shutdown()
    torch.testing.assert_close(got.cpu(), ref, atol=1e-4, rtol=1e-4)
