"""Dropout with masks that are cheap to draw on a CPU.

PyTorch's dropout on a CPU draws every mask element with `bernoulli_` (one random number per element, ~3 ns
each on the 2-core dev machine) and keeps a float mask (4 bytes per element) for the backward pass. In a
MiniLM-L6 training step that was 13% of the time (20 masks a step). Here one 64-bit random word gives four
16-bit numbers, each compared with a threshold, and the mask kept for backward is a bool (1 byte per element).
Same semantics: each element is zeroed with probability p and the rest scaled by 1 / (1 - p), drawn from
the global torch generator, so `seed_everything` makes it repeatable. p is rounded to a multiple of 1/65536
(0.1 -> 0.100006). On other devices (CUDA has its own fused dropout kernel) `nn.Dropout` runs unchanged.
"""

from __future__ import annotations

import math
from typing import Union

import torch
from torch import nn

_LEVELS = 1 << 16  # a 16-bit number takes 65536 values


def keep_mask(shape: torch.Size, p: float, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """A bool tensor of `shape`, True with probability 1 - round(p * 65536) / 65536, elements independent."""
    n = math.prod(shape)
    # random_(-2**63, None) fills all 64 bits of each word (random_() alone leaves the sign bit at 0).
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)
    numbers = words.view(torch.int16)[:n].view(shape)  # uniform over -32768..32767
    return numbers >= round(p * _LEVELS) - _LEVELS // 2


class _DropoutFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        keep = keep_mask(x.shape, p, x.device)
        ctx.scale = _LEVELS / (_LEVELS - round(p * _LEVELS))  # 1 / (1 - p) for the rounded p: unbiased
        ctx.save_for_backward(keep)
        # native_dropout_backward(t, mask, scale) is t * mask * scale in one pass: forward and backward alike.
        return torch.ops.aten.native_dropout_backward(x, keep, ctx.scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (keep,) = ctx.saved_tensors
        return torch.ops.aten.native_dropout_backward(grad, keep, ctx.scale), None


class Dropout(nn.Dropout):
    """`nn.Dropout` that draws its masks with `keep_mask` when training on a CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # p that rounds to 0 or 1 in 1/65536 steps (1 would divide by zero) goes to nn.Dropout as it is.
        if self.training and 0 < round(self.p * _LEVELS) < _LEVELS and x.device.type == "cpu" and not self.inplace:
            return _DropoutFunction.apply(x, self.p)
        return super().forward(x)


def use_cpu_dropout(module: nn.Module) -> int:
    """Replace every `nn.Dropout` inside `module` (itself excluded) with `Dropout`, same p; returns how many.

    Only modules of exactly that class: subclasses may do more than drop. Dropout applied as a function
    (e.g. inside PyTorch's attention kernel) is not a module and stays as it is.
    """
    swaps = [(parent, name, child) for parent in module.modules() for name, child in parent.named_children() if type(child) is nn.Dropout]
    for parent, name, child in swaps:
        setattr(parent, name, Dropout(child.p, child.inplace))
    return len(swaps)
