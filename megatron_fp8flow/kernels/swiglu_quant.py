"""Weighted SwiGLU fused with 1x128 power-of-two FP8 quantization, forward and backward.

Forward: x = [gate | up] [M, 2F] bf16, w [M] -> y = silu(gate) * up * w in fp32 -> FP8 [M, F]
+ scales (optionally y itself, for the baseline). Backward: g [M, F], saved x and w ->
[d_gate | d_up] quantized as one row-wise FP8 [M, 2F] tensor, and dw [M] summed in a fixed
order by one program per row block (deterministic, no atomics). F % 128 == 0.

References: ``ops.reference.weighted_swiglu_quant`` / ``weighted_swiglu_quant_backward``. The
FP8 encoding is bit-exact given the kernel's fp32 values; those differ from the reference's by
the fp32 rounding of exp and division (a few ulp), see the tests' bounds. The operator that
chooses between these kernels and a plain-PyTorch form is :mod:`megatron_fp8flow.ops.swiglu`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..fp8.format import FP8_DTYPE, empty_row_scales
from .fp8_common import fp8_view, interpreter_active, needs_emulated_cast, quantize_tile, to_output_dtype


@triton.jit
def _quantize_block_rows(v, q_ptrs, s_ptrs, mask, row_ok, EMULATE: tl.constexpr):
    """1x128 pow2 quantization of a [BLOCK_M, 128] fp32 tile (one scale per row) and stores."""
    q, s = quantize_tile(v, 1, True, EMULATE)
    tl.store(q_ptrs, q, mask=mask)
    tl.store(s_ptrs, s, mask=row_ok)


@triton.jit
def _sigmoid(a):
    # Approximate division (2 ulp) instead of div.rn: on the H200 these kernels are as much bound
    # by instructions as by bytes (measured 4-8% faster), and the tests' bounds allow a few ulp.
    return tl.math.fdiv(tl.zeros_like(a) + 1.0, 1.0 + tl.exp(-a), ieee_rounding=False)


@triton.jit
def _swiglu_fwd_kernel(
    x_ptr, w_ptr, q_ptr, s_ptr, y_ptr, M, F, stride_x, stride_sm, stride_sk,
    BLOCK_M: tl.constexpr, QUANTIZE: tl.constexpr, WRITE_Y: tl.constexpr, EMULATE: tl.constexpr,
    EXACT_BF16: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_f = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_f * 128 + tl.arange(0, 128)
    row_ok = rows < M
    mask = row_ok[:, None]
    r64 = rows.to(tl.int64)[:, None]
    a = tl.load(x_ptr + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + r64 * stride_x + F + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    y = (a * _sigmoid(a)) * b * w[:, None]
    if QUANTIZE:
        _quantize_block_rows(y, q_ptr + r64 * F + cols[None, :], s_ptr + rows.to(tl.int64) * stride_sm + pid_f * stride_sk,
                             mask, row_ok, EMULATE)
    if WRITE_Y:
        tl.store(y_ptr + r64 * F + cols[None, :], to_output_dtype(y, y_ptr.dtype.element_ty, EXACT_BF16), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    g_ptr, x_ptr, w_ptr, q_ptr, s_ptr, dx_ptr, dw_ptr, M, F, stride_g, stride_x, stride_sm, stride_sk,
    NUM_FB: tl.constexpr, BLOCK_M: tl.constexpr, QUANTIZE: tl.constexpr, EMULATE: tl.constexpr,
    EXACT_BF16: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    pid_m = tl.program_id(0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    mask = row_ok[:, None]
    r64 = rows.to(tl.int64)[:, None]
    w = tl.load(w_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_M], dtype=tl.float32)
    two_f = 2 * F
    # Fixed-order loop over the 128-column blocks (NUM_FB = F / 128): dw is the same bits run to run.
    for fb in tl.range(0, NUM_FB, num_stages=NUM_STAGES):
        cols = fb * 128 + tl.arange(0, 128)
        a = tl.load(x_ptr + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        b = tl.load(x_ptr + r64 * stride_x + F + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + r64 * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        sig = _sigmoid(a)
        silu = a * sig
        gw = g * w[:, None]
        d_gate = gw * b * (sig * (1.0 + a * (1.0 - sig)))
        d_up = gw * silu
        dw += tl.sum(g * silu * b, axis=1)
        if QUANTIZE:
            s_row = s_ptr + rows.to(tl.int64) * stride_sm
            _quantize_block_rows(d_gate, q_ptr + r64 * two_f + cols[None, :], s_row + fb * stride_sk,
                                 mask, row_ok, EMULATE)
            _quantize_block_rows(d_up, q_ptr + r64 * two_f + F + cols[None, :],
                                 s_row + (NUM_FB + fb) * stride_sk, mask, row_ok, EMULATE)
        else:
            out_t = dx_ptr.dtype.element_ty
            tl.store(dx_ptr + r64 * two_f + cols[None, :], to_output_dtype(d_gate, out_t, EXACT_BF16), mask=mask)
            tl.store(dx_ptr + r64 * two_f + F + cols[None, :], to_output_dtype(d_up, out_t, EXACT_BF16), mask=mask)
    tl.store(dw_ptr + rows, dw, mask=row_ok)


def check_forward(x: torch.Tensor, w: torch.Tensor, y_dtype=None, quantize: bool = True) -> int:
    """Validate the forward's arguments; returns F."""
    f = _check(x, w)
    if not quantize and y_dtype is None:
        raise ValueError("quantize=False needs y_dtype: the kernel would produce nothing")
    return f


def check_backward(g: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> int:
    """Validate the backward's arguments; returns F."""
    f = _check(x, w)
    m = x.shape[0]
    if g.shape != (m, f) or g.stride(1) != 1:
        raise ValueError(f"grad must be [M, F] = [{m}, {f}] with unit last stride, got {tuple(g.shape)}")
    return f


def _check(x: torch.Tensor, w: torch.Tensor):
    if x.dim() != 2 or x.shape[1] % 2:
        raise ValueError(f"x must be [M, 2F] (gate | up), got {tuple(x.shape)}")
    f = x.shape[1] // 2
    if f % 128:
        raise ValueError(f"weighted SwiGLU + FP8 quantize needs F % 128 == 0 (whole 1x128 blocks), got F = {f}")
    if w.shape != (x.shape[0],):
        raise ValueError(f"w must be [M] = [{x.shape[0]}], got {tuple(w.shape)}")
    if x.stride(1) != 1:
        raise ValueError("x must have unit stride along its last dimension")
    return f


def swiglu_quant_forward(
    x: torch.Tensor, w: torch.Tensor, y_dtype=None, quantize: bool = True, block_m: int = 16, num_warps: int = 4,
    mn_major_scales: bool = False,
):
    """Returns (data [M, F] e4m3, scale_inv [M, F/128] fp32 (row-major, or MN-major: see
    ``fp8.format.empty_row_scales``), y [M, F] in ``y_dtype`` or None).

    ``quantize=False`` (with ``y_dtype``) is the plain fused SwiGLU of the baseline: data and
    scale_inv are then None.
    """
    f = check_forward(x, w, y_dtype, quantize)
    m = x.shape[0]
    dev = x.device
    data = torch.empty(m, f, dtype=FP8_DTYPE, device=dev) if quantize else None
    scale_inv = empty_row_scales(m, f // 128, dev, mn_major_scales) if quantize else None
    y = None if y_dtype is None else torch.empty(m, f, dtype=y_dtype, device=dev)
    if m:
        emulate = needs_emulated_cast(dev)
        dummy = y if y is not None else scale_inv
        _swiglu_fwd_kernel[(triton.cdiv(m, block_m), f // 128)](
            x, w.contiguous(), fp8_view(data, emulate) if quantize else dummy,
            scale_inv if quantize else dummy, y if y is not None else dummy,
            m, f, x.stride(0), *(scale_inv.stride() if quantize else (0, 0)),
            BLOCK_M=block_m, QUANTIZE=quantize, WRITE_Y=y is not None, EMULATE=emulate,
            EXACT_BF16=interpreter_active(), num_warps=num_warps,
        )
    return data, scale_inv, y


def swiglu_quant_backward(
    g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, dx_dtype=None, block_m: int = 8, num_warps: int = 4,
    num_stages: int = 3, mn_major_scales: bool = False,
):
    """Returns (data [M, 2F] e4m3 = [d_gate | d_up], scale_inv [M, 2F/128], dw [M] fp32).

    With ``dx_dtype`` (the baseline) the gradient is written unquantized in that dtype instead:
    returns (dx [M, 2F], None, dw).
    """
    f = check_backward(g, x, w)
    m = x.shape[0]
    dev = x.device
    quantize = dx_dtype is None
    if quantize:
        data = torch.empty(m, 2 * f, dtype=FP8_DTYPE, device=dev)
        scale_inv = empty_row_scales(m, 2 * f // 128, dev, mn_major_scales)
    else:
        data, scale_inv = torch.empty(m, 2 * f, dtype=dx_dtype, device=dev), None
    dw = torch.empty(m, dtype=torch.float32, device=dev)
    if m:
        emulate = needs_emulated_cast(dev)
        _swiglu_bwd_kernel[(triton.cdiv(m, block_m),)](
            g, x, w.contiguous(), fp8_view(data, emulate) if quantize else dw,
            scale_inv if quantize else dw, dw if quantize else data, dw,
            m, f, g.stride(0), x.stride(0), *(scale_inv.stride() if quantize else (0, 0)),
            NUM_FB=f // 128, BLOCK_M=block_m, QUANTIZE=quantize, EMULATE=emulate,
            EXACT_BF16=interpreter_active(), NUM_STAGES=num_stages, num_warps=num_warps,
        )
    return data, scale_inv, dw
