"""Expert-parallel serving with serverless experts: moeless against plain EP on the same requests, in one run.

    torchrun --nproc_per_node=8 examples/serve_ep.py --model /path/to/Mixtral-8x7B-Instruct
    torchrun --nproc_per_node=4 examples/serve_ep.py                 # the embedded tiny model, gloo on CPU

The backend is chosen automatically (NCCL with GPUs, gloo without). Every rank serves its share of each batch
(non-expert modules data-parallel, experts expert-parallel); rank 0 prints tokens/s, MoE-layer latency
percentiles, replicas, cold starts and the memory x time cost for both policies (--json: one JSON object).
"""
import argparse
import json
import sys

from moeless import demo, serve


def main() -> int:
    parser = demo.add_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    args = parser.parse_args()
    try:
        return run(args)
    except (ValueError, serve.ServeError) as err:  # one line per rank, no traceback
        print(f"serve_ep.py: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ValueError) else 1


def run(args) -> int:
    ctx = serve.init_distributed(timeout_s=args.timeout)
    ok = False
    try:
        model = serve.load_model(args.model)
        if args.model is None:
            from moeless import tiny_moe

            encode = tiny_moe.encode
        else:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(args.model)
            encode = lambda text: tok(text)["input_ids"]  # noqa: E731
        requests = demo.build_requests(encode, args.trace, args.requests, args.max_prompt_tokens,
                                       args.max_new_tokens, args.time_scale)
        res = demo.run_comparison(ctx, model, requests, keep_alive_s=args.keep_alive,
                                  extra_slots=args.extra_slots, batch_window_s=args.batch_window,
                                  predictor=demo.predictor_for(args.model, args.predictor),
                                  repeats=args.repeats)
        if ctx.is_main:
            if args.json:
                print(json.dumps({p: {k: v for k, v in res[p]["summary"].items()
                                      if k not in ("layer_times_s", "gpu_pairs", "replicas", "expert_times_s",
                                                   "layer_cpu_s")}
                                  | {"tokens_per_s": res[p]["tokens_per_s"]} for p in ("ep", "moeless")}))
            else:
                print(demo.format_table(res))
        ok = True
        return 0
    finally:
        serve.shutdown(sync=ok)  # every rank waits for the others before tearing the group down


if __name__ == "__main__":
    sys.exit(main())
