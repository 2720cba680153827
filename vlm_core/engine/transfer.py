"""Host-to-device copies of step inputs: one copy per array, from pinned memory and non-blocking on CUDA,
so queuing a step never waits for the device."""

from __future__ import annotations

import numpy as np
import torch


def host_tensor(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """`a` as a host tensor ready to copy to `device`: pinned when that is a CUDA device."""
    t = torch.from_numpy(a)
    return t.pin_memory() if device.type == "cuda" else t


def to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """One copy to `device` (non-blocking from pinned memory on CUDA; none on CPU)."""
    return host_tensor(a, device).to(device, non_blocking=True)
