"""Weighted SwiGLU with FP8 output (forward) and FP8 input gradient (backward).

The probabilities of the router are applied here, inside the activation, so the unpermute
that follows the expert GEMMs is a plain sum and its backward a plain gather of FP8 rows.

Each call runs the Triton kernels of :mod:`megatron_fp8flow.kernels.swiglu_quant` where they run
(CUDA, or CPU under ``TRITON_INTERPRET=1``), and on CPU tensors otherwise the plain-PyTorch form
below (the formulas of :mod:`.reference`): within the fp32 rounding of exp, division and the
order of the dw sum of the kernels, the FP8 encoding of those fp32 values the same. Tests
compare the two.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..fp8 import reference as fp8_ref
from ..fp8.format import with_row_scale_layout
from . import reference


def _mn_major(scale_layout: str) -> bool:
    if scale_layout not in ("row_major", "mn_major"):
        raise ValueError(f"scale_layout must be 'row_major' or 'mn_major', got {scale_layout!r}")
    return scale_layout == "mn_major"


def swiglu_quant_forward(x: torch.Tensor, w: torch.Tensor, y_dtype: Optional[torch.dtype] = None,
                         quantize: bool = True, scale_layout: str = "row_major"):
    """y = silu(gate) * up * w in fp32, quantized 1x128 with power-of-two scales.

    Args:
        x: [M, 2F] bf16, gate in the first half; F % 128 == 0.
        w: [M] probabilities (fp32 or bf16).
        y_dtype: also return y in this dtype (for baselines and tests).
        quantize: False (with ``y_dtype``) is the plain fused SwiGLU of the BF16 baseline.
        scale_layout: ``"row_major"`` or ``"mn_major"`` scales (what the next GEMM reads).
    Returns (data [M, F] e4m3, scale_inv [M, F/128] fp32, y [M, F] in ``y_dtype`` or None); data
    and scale_inv are None when not quantizing. Saves nothing: the backward takes x and w.
    """
    from ..kernels import swiglu_quant as kernels
    from ..kernels.fp8_common import use_cpu_path

    mn_major = _mn_major(scale_layout)
    if not use_cpu_path(x, w):
        return kernels.swiglu_quant_forward(x, w, y_dtype, quantize, mn_major_scales=mn_major)
    kernels.check_forward(x, w, y_dtype, quantize)
    y = reference.weighted_swiglu(x, w, torch.float32)
    data, scale_inv = fp8_ref.quantize_rowwise(y) if quantize else (None, None)
    if quantize:
        scale_inv = with_row_scale_layout(scale_inv, mn_major)
    return data, scale_inv, None if y_dtype is None else y.to(y_dtype)


def swiglu_quant_backward(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                          dx_dtype: Optional[torch.dtype] = None, scale_layout: str = "row_major"):
    """Returns (data [M, 2F] e4m3 = [d_gate | d_up] quantized 1x128, scale_inv [M, 2F/128],
    dw [M] fp32, deterministic). With ``dx_dtype`` (the baseline) the gradient comes unquantized
    in that dtype instead: (dx [M, 2F], None, dw)."""
    from ..kernels import swiglu_quant as kernels
    from ..kernels.fp8_common import use_cpu_path

    mn_major = _mn_major(scale_layout)
    if not use_cpu_path(grad, x, w):
        return kernels.swiglu_quant_backward(grad, x, w, dx_dtype, mn_major_scales=mn_major)
    kernels.check_backward(grad, x, w)
    d_gate, d_up, dw = reference.weighted_swiglu_backward(grad, x, w, torch.float32)
    dx = torch.cat([d_gate, d_up], dim=1)
    if dx_dtype is None:
        data, scale_inv = fp8_ref.quantize_rowwise(dx)
        return data, with_row_scale_layout(scale_inv, mn_major), dw
    return dx.to(dx_dtype), None, dw
