"""The two casts of the FP8 flow, as autograd operations.

* :class:`QuantizeRows`: bf16 tokens -> FP8 rows (1x128, power-of-two scales), once, before the
  dispatch all-to-all. Its backward passes the bf16 gradient through (quantization is treated
  as the identity, the straight-through rule every FP8 recipe uses).
* :class:`QuantizeGradient`: the identity in the forward (placed where the combine ends); its
  backward quantizes the incoming bf16 gradient once, so that the gradient travels back through
  the combine all-to-all and the unpermutation as FP8.
"""

from __future__ import annotations

import torch

from .. import fp8
from ..fp8.activation import FP8Activation, fp8_payload


class QuantizeRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor):
        ctx.dtype = x.dtype
        return FP8Activation(fp8.quantize(x.contiguous()), x.dtype)

    @staticmethod
    def backward(ctx, grad):
        payload = fp8_payload(grad)
        return payload.dequantize(ctx.dtype) if payload is not None else grad


class QuantizeGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if fp8_payload(grad) is not None:
            return grad
        return FP8Activation(fp8.quantize(grad.contiguous()), grad.dtype)


class DequantizeRows(torch.autograd.Function):
    """FP8 rows -> bf16 (the BF16-centric baseline after its FP8 all-to-all); the backward
    passes the bf16 gradient through."""

    @staticmethod
    def forward(ctx, x):
        payload = fp8_payload(x)
        return payload.dequantize(x.dtype) if payload is not None else x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class DequantizeGradient(torch.autograd.Function):
    """The identity in the forward; the backward turns an FP8 gradient into bf16 (the baseline's
    dequantize after the combine's FP8 all-to-all)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        payload = fp8_payload(grad)
        return payload.dequantize(grad.dtype) if payload is not None else grad
