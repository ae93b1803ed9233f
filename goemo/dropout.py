"""Dropout with masks that are cheap to draw on a CPU.

PyTorch's dropout on a CPU draws every mask element with `bernoulli_` (one random number per element, ~3 ns
each on the 2-core dev machine) and keeps a float mask (4 bytes per element) for the backward pass. In a
MiniLM-L6 training step that was 13% of the time (20 masks a step). Here one 64-bit random word gives four
16-bit numbers, each compared with a threshold, and the mask kept for backward is a bool (1 byte per element).
Same semantics: each element is zeroed with probability p and the rest scaled by 1 / (1 - p), drawn from
the global torch generator, so `seed_everything` makes it repeatable. p is rounded to a multiple of 1/65536
(0.1 -> 0.100006). On other devices (CUDA has its own fused dropout kernel) `nn.Dropout` runs unchanged.

The dropout on attention probabilities is no module: it happens inside PyTorch's attention kernel, which on a
CPU then leaves its fused path for an unfused one (a float mask of bernoulli draws, several (B, heads, T, T)
tensors kept for backward). `goemo_sdpa`, registered with transformers' attention interface, is
transformers' SDPA attention except when training in fp32 on a CPU with dropout on: there it is softmax(q k^T
* scale + mask) with a mask from `keep_mask`, and a backward pass written out that keeps the probabilities
and the bool mask only.
"""

from __future__ import annotations

import math
from typing import Union

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

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
        if self.training and 0.0 < self.p < 1.0 and x.device.type == "cpu" and not self.inplace:
            return _DropoutFunction.apply(x, self.p)
        return super().forward(x)


def use_cpu_dropout(module: nn.Module) -> int:
    """Replace every `nn.Dropout` inside `module` (itself excluded) with `Dropout`, same p; returns how many.

    Only modules of exactly that class: subclasses may do more than drop. Dropout applied as a function
    (inside PyTorch's attention kernel) is not a module: `use_cpu_attention_dropout` covers that one.
    """
    swaps = [(parent, name, child) for parent in module.modules() for name, child in parent.named_children() if type(child) is nn.Dropout]
    for parent, name, child in swaps:
        setattr(parent, name, Dropout(child.p, child.inplace))
    return len(swaps)


class _AttentionFunction(torch.autograd.Function):
    """softmax(q k^T * scale + mask), dropped out, times v. q (B, h, T, d), k and v (B, h, S, d) -> (B, h, T, d)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, p: float, scale: float) -> torch.Tensor:
        scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)  # (B, h, T, S)
        if mask is not None and mask.dtype == torch.bool:  # (B, 1, T, S), True where a query may attend
            scores.masked_fill_(mask.logical_not(), torch.finfo(scores.dtype).min)
        elif mask is not None:  # additive (0 or very negative)
            scores.add_(mask)
        probs = torch.softmax(scores, dim=-1)
        keep = keep_mask(probs.shape, p, probs.device)
        ctx.drop_scale = _LEVELS / (_LEVELS - round(p * _LEVELS))
        ctx.scale = scale
        ctx.save_for_backward(q, k, v, probs, keep)
        return torch.matmul(torch.ops.aten.native_dropout_backward(probs, keep, ctx.drop_scale), v)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # grad (B, h, T, d)
        q, k, v, probs, keep = ctx.saved_tensors
        dropped = torch.ops.aten.native_dropout_backward(probs, keep, ctx.drop_scale)  # recomputed, not kept
        grad_v = torch.matmul(dropped.transpose(-1, -2), grad)
        grad_probs = torch.ops.aten.native_dropout_backward(torch.matmul(grad, v.transpose(-1, -2)), keep, ctx.drop_scale)
        grad_scores = torch.ops.aten._softmax_backward_data(grad_probs, probs, -1, probs.dtype).mul_(ctx.scale)
        return torch.matmul(grad_scores, k), torch.matmul(grad_scores.transpose(-1, -2), q), grad_v, None, None, None


def sdpa_with_cpu_dropout(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' `sdpa` attention function, except in fp32 training on a CPU with dropout: `_AttentionFunction`."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)  # sdpa's rule
    ours = (
        dropout > 0.0 and query.device.type == "cpu" and query.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu") and not causal
        and getattr(module, "num_key_value_groups", 1) == 1  # no grouped-query heads to repeat
        and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
    )  # fmt: skip
    if not ours:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = _AttentionFunction.apply(query, key, value, attention_mask, dropout, scale)
    return out.transpose(1, 2).contiguous(), None  # (B, T, h, d), no attention weights: as sdpa


ATTENTION = "goemo_sdpa"
AttentionInterface.register(ATTENTION, sdpa_with_cpu_dropout)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # the masks sdpa gets: bool (B, 1, T, S) or None


def use_cpu_attention_dropout(module: nn.Module) -> int:
    """Switch every transformers model inside `module` that runs `sdpa` attention to `goemo_sdpa`; returns how many.

    Models whose attention layers do not go through transformers' attention interface, or that run another
    implementation (eager, flash), are left as they are.
    """
    models = [m for m in module.modules() if isinstance(m, PreTrainedModel) and getattr(m, "_supports_attention_backend", False)]
    switched = 0
    for m in models:
        if m.config._attn_implementation == "sdpa":
            m.set_attn_implementation(ATTENTION)
            switched += m.config._attn_implementation == ATTENTION
    return switched
