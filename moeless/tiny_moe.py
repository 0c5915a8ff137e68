"""The embedded default model: a tiny byte-level Mixtral-style MoE language model, trained on real English text.

The text is Python's own documentation topics (`pydoc_data.topics`, PSF license), which ships with every
CPython, so training needs no download. The model is a Hugging Face `MixtralForCausalLM` built from a small
config (4 layers, 8 experts, top-2), so everything that works on a Hugging Face MoE model (the capture hook, the
gate-replica predictor, `experts_implementation="moeless"`, the serving loop) works on it, and its routing is
learned rather than made up.

Train (reproduces the shipped weights; about 10 minutes on 2 CPU cores):

    python -m moeless.tiny_moe --out moeless/data/tiny_moe

This module never downloads anything and never touches a GPU unless asked to.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

# Byte-level vocabulary: ids 0..255 are bytes; 256 is BOS/EOS.
VOCAB_SIZE = 257
BOS_ID = 256

MODEL_DIR = Path(__file__).resolve().parent / "data" / "tiny_moe"

CONFIG = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
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
    # A small auxiliary loss keeps every expert in use without flattening the skew we want to serve.
    router_aux_loss_coef=0.001,
    output_router_logits=True,
)


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


def build_config():
    from transformers import MixtralConfig

    return MixtralConfig(**CONFIG)


def load(path: str | Path | None = None, dtype: torch.dtype = torch.float32, experts_implementation: str = "eager"):
    """Load the shipped tiny model (or one trained to `path`) in eval mode."""
    from transformers import MixtralForCausalLM

    path = Path(path) if path is not None else MODEL_DIR
    if not (path / "config.json").exists():
        raise ValueError(f"no tiny MoE model at {path}: train one with `python -m moeless.tiny_moe --out {path}`")
    model = MixtralForCausalLM.from_pretrained(path, dtype=dtype, experts_implementation=experts_implementation)
    return model.eval()


def train(out: Path, steps: int = 1000, seq_len: int = 128, batch_size: int = 32, lr: float = 3e-3,
          seed: int = 0, log_every: int = 100) -> dict:
    """Train from scratch; save config + safetensors weights (fp16) to `out`. Returns final losses."""
    from transformers import MixtralForCausalLM

    torch.manual_seed(seed)
    data = corpus()
    n_val = len(data) // 20  # hold out the last 5% for a validation loss
    train_data, val_data = data[:-n_val], data[-n_val:]
    model = MixtralForCausalLM(build_config())
    # grouped_mm trains the same function as eager (tests/test_hf_parity.py checks the forward), 2x faster on CPU.
    model.set_experts_implementation("grouped_mm")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)

    def lr_at(step):
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    def batch(src, gen):
        starts = torch.randint(0, len(src) - seq_len - 1, (batch_size,), generator=gen)
        x = torch.stack([src[s:s + seq_len] for s in starts.tolist()])
        return x

    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x = batch(train_data, gen)
        outp = model(input_ids=x, labels=x)
        opt.zero_grad(set_to_none=True)
        outp.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {outp.loss.item():.3f}  {time.perf_counter() - t0:6.0f}s", flush=True)
    model.eval()
    vgen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        val_losses = [model(input_ids=(v := batch(val_data, vgen)), labels=v).loss.item() for _ in range(8)]
    val_loss = sum(val_losses) / len(val_losses)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    model.to(torch.float16).save_pretrained(out)
    summary = {"steps": steps, "val_loss_nats_per_byte": val_loss, "seconds": time.perf_counter() - t0}
    print(f"saved to {out}: validation loss {val_loss:.3f} nats/byte ({val_loss / math.log(2):.3f} bits/byte)")
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Train the tiny MoE demo model on pydoc_data.topics (CPU).")
    ap.add_argument("--out", default=str(MODEL_DIR))
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    train(Path(args.out), steps=args.steps, seed=args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
