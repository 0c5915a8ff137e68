"""Run a kernel op with its Triton inputs on the device Triton runs on here: CUDA where there is a GPU, else the CPU
(under the interpreter, set by tests/conftest.py). Results come back on the CPU, so one test body checks the
interpreter on a CPU machine and the compiled kernels on a GPU machine against the same CPU references."""
import torch

from moeless_kernels.dispatch import DispatchResult

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def to_device(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, DispatchResult):
        return DispatchResult(x.slot_ids.to(device), x.slot_counts.to(device), x.dropped_count,
                              x.dropped_indices.to(device))
    return x


def on_triton_device(op, *args, **kwargs):
    """op(*args, **kwargs), with tensors moved to TRITON_DEVICE when backend="triton"; results on the CPU."""
    if kwargs.get("backend") == "triton":
        args, kwargs = to_device(args, TRITON_DEVICE), to_device(kwargs, TRITON_DEVICE)
    return to_device(op(*args, **kwargs), "cpu")
