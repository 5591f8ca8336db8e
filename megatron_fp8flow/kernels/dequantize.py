"""Row-wise 1x128 FP8 dequantization to bf16/fp16/fp32. Reference: ``fp8.reference.dequantize_rowwise``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..fp8.format import BLOCK, cdiv
from .fp8_common import decode_e4m3, fp8_view, needs_emulated_cast, to_output_dtype


@triton.jit
def _dequantize_rowwise_kernel(
    q_ptr, s_ptr, out_ptr, M, K, stride_sm, stride_sk, BLOCK_M: tl.constexpr, EMULATE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * 128 + tl.arange(0, 128)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols[None, :] < K)
    offs = rows.to(tl.int64)[:, None] * K + cols[None, :]
    q = decode_e4m3(tl.load(q_ptr + offs, mask=mask), EMULATE)
    s = tl.load(s_ptr + rows.to(tl.int64) * stride_sm + pid_k * stride_sk, mask=row_ok, other=0.0)
    tl.store(out_ptr + offs, to_output_dtype(q * s[:, None], out_ptr.dtype.element_ty, EMULATE), mask=mask)


def dequantize_rowwise(
    data: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
    block_m: int = 32, num_warps: int = 4,
):
    m, k = data.shape
    num_kb = cdiv(k, BLOCK)
    out = torch.empty(m, k, dtype=dtype, device=data.device)
    if m and k:
        emulate = needs_emulated_cast(data.device)
        _dequantize_rowwise_kernel[(cdiv(m, block_m), num_kb)](
            fp8_view(data, emulate), scale_inv, out, m, k, *scale_inv.stride(),
            BLOCK_M=block_m, EMULATE=emulate, num_warps=num_warps,
        )
    return out
