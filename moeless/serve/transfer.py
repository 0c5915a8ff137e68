"""The serving loop's host <-> device boundary: every copy between the control plane's numpy and the device.

One MoE layer makes one `download` (the all-gathered counts: the host needs them for the uneven all-to-all's
split sizes and the serve-time split) and one `upload` (the split quotas of the layer); a new plan makes one
more upload. Nothing else in the loop reads a device value or copies host data up, so the host never waits
for the device except in that one download (see tests/test_serve_syncs.py).

On CUDA an upload stages the array in pinned memory and copies it with non_blocking=True: the host queues the
copy and goes on. The caching host allocator records the copy on the stream and keeps the pinned block until
the copy is done, so the staging memory is never overwritten early. On CPU the "device" is the host: an upload
is a copy of the array, a download a view.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["download", "upload"]


def upload(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A device tensor holding `array` (copied: later changes to `array` do not reach it), without a host wait."""
    host = torch.from_numpy(np.array(array, copy=True, order="C"))
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def download(tensor: torch.Tensor) -> np.ndarray:
    """`tensor` on the host as numpy: waits for the device to produce it (the one host sync of a layer)."""
    return tensor.detach().cpu().numpy()
