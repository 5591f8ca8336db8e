"""128x128 weight quantization, optionally writing the transposed copy (for dgrad) in the same pass.

Reference: ``fp8.reference.quantize_weight``. 128x128 blocks are symmetric under
transposition, so the transposed copy holds the same codes and the transposed scales.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..fp8.format import BLOCK, FP8_DTYPE, cdiv
from .fp8_common import divide_by_scale, encode_e4m3, fp8_view, is_finite, needs_emulated_cast, scale_inv_from_amax


@triton.jit
def _quantize_weight_kernel(
    w_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, N, K, stride_wn, stride_wk, num_nb, num_kb,
    WRITE_ROWS: tl.constexpr, WRITE_T: tl.constexpr, POW2: tl.constexpr, EMULATE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * 128 + tl.arange(0, 128)
    cols = pid_k * 128 + tl.arange(0, 128)
    row_ok = rows < N
    col_ok = cols < K
    mask = row_ok[:, None] & col_ok[None, :]
    w = tl.load(w_ptr + rows.to(tl.int64)[:, None] * stride_wn + cols.to(tl.int64)[None, :] * stride_wk,
                mask=mask, other=0.0)
    w = w.to(tl.float32)
    finite = is_finite(w)
    amax = tl.max(tl.max(tl.where(finite, tl.abs(w), 0.0), axis=1), axis=0)
    s = scale_inv_from_amax(amax, POW2)
    v = tl.where(finite, divide_by_scale(w, s, POW2), float("nan"))
    if WRITE_ROWS:
        tl.store(q_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], encode_e4m3(v, EMULATE), mask=mask)
        tl.store(s_ptr + pid_n * num_kb + pid_k, s)
    if WRITE_T:
        # Transpose the fp32 values, then encode (the cast is elementwise, so the codes are the
        # same): tl.trans of an 8-bit tile can corrupt it on Hopper (Triton 3.x).
        tl.store(qt_ptr + cols.to(tl.int64)[:, None] * N + rows[None, :], encode_e4m3(tl.trans(v), EMULATE),
                 mask=col_ok[:, None] & row_ok[None, :])
        tl.store(st_ptr + pid_k * num_nb + pid_n, s)


def quantize_weight(w: torch.Tensor, pow2_scales: bool = True, with_transpose: bool = False, out=None,
                    out_t=None, transpose_only: bool = False, transposed_by: str = "kernel"):
    """Returns (data [N, K], scale_inv [nN, nK], data_t [K, N] or None, scale_inv_t [nK, nN] or None).

    ``out=(data, scale_inv)`` and ``out_t=(data_t, scale_inv_t)``: contiguous buffers to write
    into (e.g. one expert's slice of a stacked weight buffer) instead of fresh ones.
    ``transpose_only``: write only the transposed copy (data and scale_inv are None).
    ``transposed_by`` (with ``transpose_only``): ``"kernel"`` transposes the tile in registers,
    ``"strided_load"`` quantizes the transposed view ``w.t()`` row-wise (any input strides).
    """
    with_transpose = with_transpose or transpose_only
    if w.dim() != 2:
        raise ValueError(f"weight quantization expects a 2-D [N, K] tensor, got shape {tuple(w.shape)}")
    if w.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"weight quantization expects bf16, fp16 or fp32 input, got {w.dtype}")
    if transpose_only and transposed_by == "strided_load":
        data_t, scale_t, _, _ = quantize_weight(w.t(), pow2_scales, out=out_t)
        return None, None, data_t, scale_t
    n, k = w.shape
    num_nb, num_kb = cdiv(n, BLOCK), cdiv(k, BLOCK)
    dev = w.device
    if transpose_only:
        data = scale = None
    elif out is None:
        data = torch.empty(n, k, dtype=FP8_DTYPE, device=dev)
        scale = torch.empty(num_nb, num_kb, dtype=torch.float32, device=dev)
    else:
        data, scale = out  # checked by fp8.quantize_weight
    data_t = scale_t = None
    if with_transpose and out_t is not None:
        data_t, scale_t = out_t  # checked by fp8.quantize_weight_with_transpose
    elif with_transpose:
        data_t = torch.empty(k, n, dtype=FP8_DTYPE, device=dev)
        scale_t = torch.empty(num_kb, num_nb, dtype=torch.float32, device=dev)
    if n and k:
        emulate = needs_emulated_cast(dev)
        rows_q, rows_s = (data, scale) if data is not None else (data_t, scale_t)  # unused when not written
        t_q, t_s = (data_t, scale_t) if with_transpose else (data, scale)
        _quantize_weight_kernel[(num_nb, num_kb)](
            w, fp8_view(rows_q, emulate), rows_s, fp8_view(t_q, emulate), t_s,
            n, k, w.stride(0), w.stride(1), num_nb, num_kb,
            WRITE_ROWS=not transpose_only, WRITE_T=with_transpose, POW2=pow2_scales, EMULATE=emulate, num_warps=8,
        )
    return data, scale, data_t, scale_t
