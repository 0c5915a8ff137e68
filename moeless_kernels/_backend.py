"""Which implementation runs: Triton on CUDA tensors (or on CPU under TRITON_INTERPRET=1), else the torch reference.

Never touches triton.runtime.driver at import time (it raises on machines without a GPU).
"""
from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch")


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_usable(device: torch.device) -> bool:
    """Triton can run on tensors on this device: CUDA, or anything under the interpreter."""
    return device.type == "cuda" or interpreter_enabled()


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map a user's backend choice to "triton" or "torch"; raise a clear ValueError when it cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and not triton_usable(device):
        raise ValueError(
            f"backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before import for CPU tensors; "
            f"got tensors on {device}"
        )
    return backend
