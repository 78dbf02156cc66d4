"""Tensors crossing between a CUDA device and the CPU, differentiably, through page-locked
staging buffers (asynchronous DMA rather than pageable copies)."""
from __future__ import annotations

import torch


class _ViaPinnedMemory(torch.autograd.Function):
    """Moves a tensor between a CUDA device and the CPU through page-locked staging buffers
    (asynchronous DMA rather than a pageable copy); the gradient goes back the same way."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        ctx.source = t.device
        return _copy_via_pinned(t, device)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _copy_via_pinned(grad, ctx.source), None


def _copy_via_pinned(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    staged = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    if device.type == "cpu":
        staged.copy_(t, non_blocking=True)
        torch.cuda.current_stream(t.device).synchronize()  # the CPU reads it next
        return staged
    staged.copy_(t)
    # The caching host allocator keeps the staging buffer until the copy has run.
    return staged.to(device, non_blocking=True)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` (itself when it is there already); between a CUDA device and the CPU
    through pinned buffers, the gradient going back the same way."""
    if t.device == device:
        return t
    if "cuda" in (t.device.type, device.type):
        return _ViaPinnedMemory.apply(t, device)
    return t.to(device)
