"""Test-wide set-up: the Triton interpreter on machines without CUDA.

TRITON_INTERPRET must be set before any Triton kernel module is imported, so it is set here, at the top of the
top-level conftest, which pytest imports before any test module.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0
