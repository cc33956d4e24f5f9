"""Host <-> device copies of the GPU step that do not make the host wait for the device, but once.

`upload`: a host tensor to the device from page-locked memory with `non_blocking=True` (CUDA copies
pageable memory only after a stream sync). `download`: many device tensors to the host in one
device -> host copy (each `.cpu()` would be a sync of its own).
"""
from __future__ import annotations

from typing import Sequence

import torch


def upload(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`host` on `device` without a host wait: pinned first (when CUDA is present and it is not) and
    copied with `non_blocking=True`; on the CPU the tensor itself."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available() and not host.is_pinned():
        host = host.pin_memory()  # PyTorch's pinned pool keeps it alive until the copy is done
    return host.to(device, non_blocking=True)


def download(tensors: Sequence[torch.Tensor | None], device: torch.device) -> list[torch.Tensor | None]:
    """Tensors on `device` (None allowed) -> host tensors of the same dtypes and shapes, each its own
    storage. On the CPU `.cpu()` of each (the tensor itself); elsewhere one copy: the tensors' bytes
    packed into one uint8 buffer (largest element size first, so every piece stays aligned), copied
    to the host and cut there."""
    if device.type == "cpu":
        return [None if t is None else t.cpu() for t in tensors]
    present = sorted((i for i, t in enumerate(tensors) if t is not None),
                     key=lambda i: -tensors[i].element_size())
    if not present:
        return list(tensors)
    parts = [tensors[i].contiguous().reshape(-1).view(torch.uint8) for i in present]
    buffer = torch.cat(parts).cpu()  # the one device -> host copy
    out: list[torch.Tensor | None] = [None] * len(tensors)
    offset = 0
    for i, part in zip(present, parts):
        t = tensors[i]
        out[i] = buffer[offset:offset + part.numel()].view(t.dtype).reshape(t.shape).clone()
        offset += part.numel()
    return out
