"""The embedded default model: a tiny byte-level Mixtral-style MoE language model, trained on real English text.

The text is Python's own documentation topics (`pydoc_data.topics`, PSF license), which ships with every
CPython, so training needs no download. The model is a Hugging Face `MixtralForCausalLM` built from a small
config (`CONFIG`: 4 layers, 8 experts, top-2, byte vocabulary), so everything that works on a Hugging Face MoE
model (the capture hook, the gate-replica predictor, `experts_implementation="moeless"`, the serving loop) works
on it, and its routing is learned rather than made up.

The corpus is every topic in sorted key order joined by blank lines; the last 5% of its bytes (`split`) are held
out: never trained on, and the text on which `bits_per_byte` and `expert_load` are reported (the demo's
predictor fit holds out the same tail).

Train (reproduces the shipped weights; see `TRAINING` for the settings, the wall time and the cores it took):

    python -m moeless.tiny_moe --out moeless/data/tiny_moe

`python -m moeless.tiny_moe --evaluate` only measures the shipped (or `--out`) model: held-out bits per byte,
per-layer expert load skew, load time and a few generations.

This module never downloads anything and never touches a GPU unless asked to.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

__all__ = ["BOS_ID", "CONFIG", "HELD_OUT_FRACTION", "MODEL_DIR", "TRAINING", "VOCAB_SIZE", "bits_per_byte",
           "build_config", "corpus", "decode", "encode", "evaluate", "expert_load", "generate", "load", "main",
           "split", "train", "with_bos"]

# Byte-level vocabulary: ids 0..255 are bytes; 256 is BOS/EOS.
VOCAB_SIZE = 257
BOS_ID = 256

MODEL_DIR = Path(__file__).resolve().parent / "data" / "tiny_moe"

CONFIG = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=512,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    bos_token_id=BOS_ID,
    eos_token_id=BOS_ID,
    pad_token_id=BOS_ID,
    # Mixtral's default router, with a small auxiliary loss: it keeps every expert in use without flattening the
    # skew the serving loop is there to balance.
    router_aux_loss_coef=0.001,
    output_router_logits=True,
)

# The settings that made the shipped weights (the defaults of `train` and of the command line).
TRAINING = dict(steps=6000, seq_len=512, batch_size=8, lr=3e-3, min_lr_ratio=0.05, warmup_steps=100,
                weight_decay=0.3, dropout=0.25, clip_norm=1.0, seed=0, threads=1)

HELD_OUT_FRACTION = 0.05


def encode(text: str) -> list[int]:
    """UTF-8 bytes, preceded by BOS."""
    return [BOS_ID] + list(text.encode("utf-8"))


def decode(ids) -> str:
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


def corpus() -> torch.Tensor:
    """The training text, byte ids [N] (int64): every pydoc topic in sorted key order."""
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.int64)


def split(data: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out): the corpus' first 95% and its last 5% (whole topics near the end of the key order, plus
    the tail of the one the cut falls in)."""
    data = corpus() if data is None else data
    cut = len(data) * 19 // 20  # 1 - HELD_OUT_FRACTION; demo.fit_predictor holds out the same tail
    return data[:cut], data[cut:]


def build_config(**overrides):
    from transformers import MixtralConfig

    return MixtralConfig(**{**CONFIG, **overrides})


def load(path: str | Path | None = None, dtype: torch.dtype = torch.float32, experts_implementation: str = "eager"):
    """Load the shipped tiny model (or one trained to `path`) in eval mode."""
    from transformers import MixtralForCausalLM

    path = Path(path) if path is not None else MODEL_DIR
    if not (path / "config.json").exists():
        raise ValueError(f"no tiny MoE model at {path}: train one with `python -m moeless.tiny_moe --out {path}`")
    model = MixtralForCausalLM.from_pretrained(path, dtype=dtype, experts_implementation=experts_implementation)
    return model.eval()


def _windows(n: int, width: int) -> list[tuple[int, int]]:
    """(start, first scored offset) of windows of `width` bytes over a text of `n` bytes, `width` // 2 apart
    (the last one moved back to end at the text's end), that score every byte exactly once, each with at least
    `width` // 2 bytes of the text before it in its window (the first window's bytes: what precedes them)."""
    if n < 1 or width < 1:
        raise ValueError(f"need a text of n >= 1 bytes and width >= 1, got n={n}, width={width}")
    width = min(width, n)
    out, scored_to, start = [], 0, 0
    while scored_to < n:
        start = min(start, n - width)
        out.append((start, scored_to - start))
        scored_to = start + width
        start += max(1, width // 2)
    return out


def with_bos(rows: torch.Tensor) -> torch.Tensor:
    """[B, S] byte ids -> [B, 1 + S]: BOS first, as `encode` puts it before every prompt."""
    return torch.cat([torch.full((rows.shape[0], 1), BOS_ID, dtype=rows.dtype), rows], dim=1)


@torch.no_grad()
def bits_per_byte(model, data: torch.Tensor, *, seq_len: int = 512, batch_size: int | None = None) -> float:
    """Mean next-byte cross-entropy of `model` over `data` [N] in bits per byte. Every byte is scored once, in a
    sequence of `seq_len` tokens: BOS, then a window of seq_len - 1 bytes of `data` that gives it at least half a
    window of context (the bytes of the first window: what precedes them). Sequences go `batch_size` to a
    forward (default: 4096 tokens' worth)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    batch_size = max(1, 4096 // seq_len) if batch_size is None else batch_size
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    if len(data) < 1:
        raise ValueError("data must hold at least 1 byte, got 0")
    was_training = model.training
    model.eval()
    wins = _windows(len(data), seq_len - 1)
    W = min(seq_len - 1, len(data))
    total = 0.0
    for b in range(0, len(wins), batch_size):
        chunk = wins[b:b + batch_size]
        rows = torch.stack([data[s:s + W] for s, _ in chunk])
        logits = model(input_ids=with_bos(rows), output_router_logits=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), rows, reduction="none")  # [B, W]
        for row, (_, first) in enumerate(chunk):
            total += float(nll[row, first:].sum())
    model.train(was_training)
    return total / len(data) / math.log(2)


def expert_load(model, data: torch.Tensor, *, seq_len: int = 512) -> np.ndarray:
    """Per MoE layer, the busiest expert's (token, expert) pairs over the mean expert's, over `data` [N] cut into
    sequences of `seq_len` tokens (BOS, then seq_len - 1 bytes; a shorter tail is left out): 1.0 is perfectly
    uniform routing, E / top_k one expert chosen by every token."""
    from moeless.traces import capture_routing

    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    n = len(data) // (seq_len - 1)
    if n < 1:
        raise ValueError(f"data must hold at least seq_len - 1 = {seq_len - 1} bytes, got {len(data)}")
    seqs = with_bos(data[:n * (seq_len - 1)].reshape(n, seq_len - 1))
    trace = capture_routing(model, list(seqs.split(max(1, 4096 // seq_len))), gate_inputs=False)
    loads = trace.loads().astype(np.float64)  # [L, E]
    return loads.max(axis=1) / loads.mean(axis=1)


@torch.no_grad()
def generate(model, prompt: str, max_new_tokens: int = 40) -> str:
    """Greedy continuation of `prompt` (bytes; decoded with replacement characters where a byte is cut)."""
    ids = torch.tensor([encode(prompt)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=BOS_ID)
    return decode(out[0, ids.shape[1]:])


SAMPLE_PROMPTS = ("The return value of a function is", "A list is a mutable sequence of ",
                  "If the exception is not handled, ")


def evaluate(path: str | Path | None = None) -> dict:
    """The shipped (or `path`'s) model measured: load time (transformers already imported), held-out bits/byte,
    per-layer expert load skew on the held-out text, size, and greedy continuations of `SAMPLE_PROMPTS`."""
    from transformers import MixtralForCausalLM  # noqa: F401  (importing the library is not loading the model)

    t = time.perf_counter()
    model = load(path)
    load_s = time.perf_counter() - t
    _, held = split()
    folder = Path(path) if path is not None else MODEL_DIR
    return {
        "load_seconds": load_s,
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights_bytes": (folder / "model.safetensors").stat().st_size,
        "held_out_bytes": len(held),
        "held_out_bits_per_byte": bits_per_byte(model, held),
        "expert_load_max_over_mean": [round(float(v), 3) for v in expert_load(model, held)],
        "samples": {p: generate(model, p) for p in SAMPLE_PROMPTS},
    }


def _lr_factor(progress: float, warmup: float, min_ratio: float) -> float:
    """Linear warmup over the first `warmup` of training, then cosine down to `min_ratio` (progress in [0, 1])."""
    if progress < warmup:
        return progress / warmup
    p = min(1.0, (progress - warmup) / max(1e-12, 1.0 - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


def _residual_dropout(model, p: float) -> list:
    """Forward hooks that drop out (training mode only) the token embeddings and each attention and MoE block's
    output, i.e. every branch that joins the residual stream. Returns the hook handles."""
    if p == 0.0:
        return []
    drop = torch.nn.functional.dropout

    def tensor_out(module, args, out):
        return drop(out, p, module.training)

    def attn_out(module, args, out):  # (attn_output, attn_weights)
        return (drop(out[0], p, module.training), *out[1:])

    handles = [model.get_input_embeddings().register_forward_hook(tensor_out)]
    for layer in model.model.layers:
        handles.append(layer.self_attn.register_forward_hook(attn_out))
        handles.append(layer.mlp.register_forward_hook(tensor_out))
    return handles


def train(out: str | Path, *, steps: int = TRAINING["steps"], time_budget: float | None = None,
          seq_len: int = TRAINING["seq_len"], batch_size: int = TRAINING["batch_size"], lr: float = TRAINING["lr"],
          min_lr_ratio: float = TRAINING["min_lr_ratio"], warmup_steps: int = TRAINING["warmup_steps"],
          weight_decay: float = TRAINING["weight_decay"], dropout: float = TRAINING["dropout"],
          clip_norm: float = TRAINING["clip_norm"],
          seed: int = TRAINING["seed"], threads: int | None = TRAINING["threads"], eval_every: int = 500,
          config: dict | None = None) -> dict:
    """Train from scratch on the corpus' first 95%; save config + fp16 safetensors weights to `out`.

    Each step is `batch_size` sequences of `seq_len` tokens: BOS (as `encode` puts it before every prompt), then
    seq_len - 1 bytes from a random offset of the training text (a seeded generator: the same seed gives the same
    batches); AdamW (weight decay on matrices only), gradient norm clipped
    to `clip_norm`, learning rate warmed up linearly over `warmup_steps` then cosine-annealed to
    `lr * min_lr_ratio`. `dropout` is applied, in training only, to the embeddings and to every attention and MoE
    block's output before it joins the residual stream (forward hooks, removed before saving: the saved model is a
    plain Mixtral). `time_budget` (seconds), when given, ends training early: the schedule then follows the
    larger of the step and the time fractions, so a cut-short run still anneals. Every `eval_every` steps the
    held-out bits/byte is printed (monitoring only: the saved weights are the last step's). Returns a summary."""
    from tqdm.auto import tqdm
    from transformers import MixtralForCausalLM

    for name, v in (("steps", steps), ("seq_len", seq_len), ("batch_size", batch_size), ("eval_every", eval_every)):
        if int(v) < 1:
            raise ValueError(f"{name} must be a positive integer, got {v}")
    if time_budget is not None and not time_budget > 0:
        raise ValueError(f"time_budget must be a positive number of seconds, got {time_budget}")
    if not 0 <= warmup_steps < steps:
        raise ValueError(f"warmup_steps must lie in [0, steps={steps}), got {warmup_steps}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
    if threads is not None:
        torch.set_num_threads(int(threads))
    torch.manual_seed(seed)
    train_data, held = split()
    cfg = build_config(**(config or {}))
    if seq_len > cfg.max_position_embeddings:
        raise ValueError(f"seq_len must be at most max_position_embeddings={cfg.max_position_embeddings}, "
                         f"got {seq_len}")
    model = MixtralForCausalLM(cfg)
    # grouped_mm trains the same function as eager (tests/test_hf_parity.py checks the forward), 2x faster on CPU.
    model.set_experts_implementation("grouped_mm")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    hooks = _residual_dropout(model, dropout)
    gen = torch.Generator().manual_seed(seed)
    warmup = warmup_steps / steps
    history = []
    t0, cpu0 = time.perf_counter(), time.process_time()
    model.train()
    bar = tqdm(range(steps), desc="training tiny MoE", unit="step", mininterval=30.0)
    step = 0
    for step in bar:
        elapsed = time.perf_counter() - t0
        progress = max(step / steps, elapsed / time_budget if time_budget else 0.0)
        if progress >= 1.0:
            break
        for g in opt.param_groups:
            g["lr"] = lr * _lr_factor(progress, warmup, min_lr_ratio)
        starts = torch.randint(0, len(train_data) - seq_len + 2, (batch_size,), generator=gen)
        x = with_bos(torch.stack([train_data[s:s + seq_len - 1] for s in starts.tolist()]))
        loss = model(input_ids=x, labels=x).loss  # includes the router's auxiliary loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{opt.param_groups[0]['lr']:.2e}", refresh=False)
        if (step + 1) % eval_every == 0:
            bpb = bits_per_byte(model, held, seq_len=seq_len)
            history.append({"step": step + 1, "seconds": round(time.perf_counter() - t0, 1),
                            "held_out_bits_per_byte": round(bpb, 4)})
            bar.write(f"step {step + 1}: train loss {loss.item():.3f} nats, held-out {bpb:.3f} bits/byte, "
                      f"{time.perf_counter() - t0:.0f} s")
    else:
        step = steps
    bar.close()
    for h in hooks:
        h.remove()
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    model.eval()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    model = model.to(torch.float16)
    model.save_pretrained(out)
    bpb = bits_per_byte(load(out), held, seq_len=seq_len)  # what is shipped: the fp16 weights
    summary = {"steps": step, "seconds": round(seconds, 1), "cpu_seconds": round(cpu_seconds, 1),
               "threads": torch.get_num_threads(),
               "settings": {"seq_len": seq_len, "batch_size": batch_size, "lr": lr, "min_lr_ratio": min_lr_ratio,
                            "warmup_steps": warmup_steps, "weight_decay": weight_decay, "dropout": dropout,
                            "clip_norm": clip_norm,
                            "seed": seed, "time_budget": time_budget, "config": config or {}},
               "held_out_bits_per_byte": round(bpb, 4), "history": history}
    (out / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"saved to {out}: {step} steps in {seconds:.0f} s ({cpu_seconds:.0f} CPU s) on {torch.get_num_threads()} "
          f"threads; held-out {bpb:.3f} bits/byte")
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moeless.tiny_moe",
                                 description="Train the tiny MoE demo model on pydoc_data.topics (CPU), or measure it.")
    ap.add_argument("--out", default=str(MODEL_DIR), help="model folder (default: the shipped one)")
    ap.add_argument("--evaluate", action="store_true",
                    help="do not train: print the model's held-out bits/byte, expert load skew, load time, samples")
    ap.add_argument("--steps", type=int, default=TRAINING["steps"], help="optimizer steps (sets the LR schedule)")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds; stop early when reached (the LR schedule follows the time fraction then)")
    ap.add_argument("--seed", type=int, default=TRAINING["seed"], help="seed of the init and of the batches")
    ap.add_argument("--threads", type=int, default=TRAINING["threads"],
                    help="torch CPU threads (default 1, as the shipped weights were made: another count sums in "
                         "another order, so the weights differ in their last bits)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.evaluate:
        try:
            result = evaluate(out)
        except (ValueError, OSError) as err:  # no model there, or unreadable weights: one line, no traceback
            ap.exit(2, f"{ap.prog}: error: --out: {err}\n")
        print(json.dumps(result, indent=2))
        return 0
    if out.exists() and not out.is_dir():
        ap.error(f"--out must be a folder (or not exist yet), got the file {str(out)!r}")
    for name in ("steps", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.time_budget is not None and not args.time_budget > 0:
        ap.error(f"--time-budget must be a positive number of seconds, got {args.time_budget}")
    summary = train(out, steps=args.steps, time_budget=args.time_budget, seed=args.seed, threads=args.threads)
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}))
    if out.resolve() == MODEL_DIR.resolve():
        print("the shipped predictor was fitted to the old gates: refit it with "
              "`python -m moeless.demo --fit-predictor`")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
