"""Weighted SwiGLU with FP8 output (forward) and FP8 input gradient (backward).

The probabilities of the router are applied here, inside the activation, so the unpermute
that follows the expert GEMMs is a plain sum and its backward a plain gather of FP8 rows.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..fp8.format import BlockwiseFP8Tensor, Layout


def _rowwise(data, scale_inv) -> BlockwiseFP8Tensor:
    return BlockwiseFP8Tensor(data, scale_inv, Layout.ROWWISE, tuple(data.shape), True)


def weighted_swiglu_quant(x: torch.Tensor, w: torch.Tensor, y_dtype: Optional[torch.dtype] = None):
    """y = silu(gate) * up * w (fp32) quantized 1x128 with power-of-two scales.

    Args:
        x: [M, 2F] bf16, gate in the first half; F % 128 == 0.
        w: [M] probabilities (fp32 or bf16).
        y_dtype: also return y in this dtype (for baselines and tests).
    Returns (row-wise FP8 [M, F], y or None). Saves nothing: the backward takes x and w.
    """
    from ..kernels.swiglu_quant import swiglu_quant_forward

    data, scale_inv, y = swiglu_quant_forward(x, w, y_dtype)
    return _rowwise(data, scale_inv), y


def weighted_swiglu_quant_backward(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor):
    """Returns ([d_gate | d_up] as row-wise FP8 [M, 2F], dw [M] fp32, deterministic)."""
    from ..kernels.swiglu_quant import swiglu_quant_backward

    data, scale_inv, dw = swiglu_quant_backward(grad, x, w)
    return _rowwise(data, scale_inv), dw
