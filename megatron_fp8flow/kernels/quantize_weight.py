"""128x128 weight quantization into the row-major layout or straight into the transposed one
(the operand cuBLAS's dgrad takes).

Reference: ``fp8.reference.quantize_weight``. 128x128 blocks are symmetric under
transposition, so the transposed copy holds the same codes and the transposed scales.

One layout per call. A single pass that wrote both layouts gave wrong bytes for fp32 weights
on the H200 (Triton 3.6; bf16 weights were right), while each layout written alone is right for
both dtypes.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
import triton
import triton.language as tl

from ..fp8.format import BLOCK, FP8_DTYPE, cdiv
from .fp8_common import divide_by_scale, encode_e4m3, fp8_view, is_finite, needs_emulated_cast, scale_inv_from_amax


@triton.jit
def _quantize_weight_kernel(
    w_ptr, table_ptr, q_ptr, s_ptr, N, K, stride_wg, stride_wn, stride_wk, num_nb, num_kb,
    TRANSPOSED: tl.constexpr, POW2: tl.constexpr, EMULATE: tl.constexpr, FROM_TABLE: tl.constexpr,
    ALIGNED: tl.constexpr, SUB: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    # Weight g of a stack: its source at w_ptr + g * stride_wg (elements; negative when the
    # buffer holds the weights in reverse order) or, FROM_TABLE, at w_ptr + table_ptr[g]
    # (weights in allocations of their own: their element offsets from the first weight); its
    # codes and scales the g-th [N, K] block.
    pid_g = tl.program_id(2).to(tl.int64)
    if FROM_TABLE:
        offset = tl.load(table_ptr + pid_g)
        if ALIGNED:  # offsets in multiples of 16 elements: the compiler may then use wide loads
            offset = tl.multiple_of(offset, 16)
        w_ptr += offset
    else:
        w_ptr += pid_g * stride_wg
    q_ptr += pid_g * N * K
    s_ptr += pid_g * num_nb * num_kb
    # The 128x128 block in strips of SUB rows (SUB columns when TRANSPOSED, so that each strip's
    # transposed store writes whole 128-byte rows): a first pass takes the block's amax, a second
    # reads the strips again (from L2) to encode them. Strips keep the registers per thread low,
    # so more blocks are in flight than with the whole block held at once.
    if TRANSPOSED:
        rows = pid_n * 128 + tl.arange(0, 128)
        cols0 = pid_k * 128 + tl.arange(0, SUB)
    else:
        rows0 = pid_n * 128 + tl.arange(0, SUB)
        cols = pid_k * 128 + tl.arange(0, 128)
    amax = 0.0
    for i in tl.static_range(128 // SUB):
        if TRANSPOSED:
            cols = cols0 + i * SUB
        else:
            rows = rows0 + i * SUB
        mask = (rows < N)[:, None] & (cols < K)[None, :]
        w = tl.load(w_ptr + rows.to(tl.int64)[:, None] * stride_wn + cols.to(tl.int64)[None, :] * stride_wk,
                    mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.max(tl.where(is_finite(w), tl.abs(w), 0.0), axis=1), axis=0))
    s = scale_inv_from_amax(amax, POW2)
    for i in tl.static_range(128 // SUB):
        if TRANSPOSED:
            cols = cols0 + i * SUB
        else:
            rows = rows0 + i * SUB
        row_ok = rows < N
        col_ok = cols < K
        mask = row_ok[:, None] & col_ok[None, :]
        w = tl.load(w_ptr + rows.to(tl.int64)[:, None] * stride_wn + cols.to(tl.int64)[None, :] * stride_wk,
                    mask=mask, other=0.0).to(tl.float32)
        v = tl.where(is_finite(w), divide_by_scale(w, s, POW2), float("nan"))
        if TRANSPOSED:
            # Transpose the fp32 values, then encode (the cast is elementwise, so the codes are
            # the same): tl.trans of an 8-bit tile can corrupt it on Hopper (Triton 3.x).
            tl.store(q_ptr + cols.to(tl.int64)[:, None] * N + rows[None, :], encode_e4m3(tl.trans(v), EMULATE),
                     mask=col_ok[:, None] & row_ok[None, :])
        else:
            tl.store(q_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], encode_e4m3(v, EMULATE), mask=mask)
    if TRANSPOSED:
        tl.store(s_ptr + pid_k * num_nb + pid_n, s)
    else:
        tl.store(s_ptr + pid_n * num_kb + pid_k, s)


# Strip height and warps per block, per direction (docs/results/quantize_weight/ has the sweep).
TUNING = {False: (64, 8), True: (128, 8)}


def _launch(w: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, pow2_scales: bool, transposed: bool,
            groups: int = 1, stride_g: int = 0, table: Optional[tuple] = None,
            tuning: Optional[tuple] = None) -> None:
    n, k = w.shape
    if n and k and groups:
        emulate = needs_emulated_cast(w.device)
        sub, warps = tuning or TUNING[transposed]
        _quantize_weight_kernel[(cdiv(n, BLOCK), cdiv(k, BLOCK), groups)](
            w, table[0] if table is not None else scale, fp8_view(data, emulate), scale, n, k, stride_g, w.stride(0),
            w.stride(1), cdiv(n, BLOCK), cdiv(k, BLOCK), TRANSPOSED=transposed, POW2=pow2_scales, EMULATE=emulate,
            FROM_TABLE=table is not None, ALIGNED=table is not None and table[1], SUB=sub, num_warps=warps,
        )


_plans: "OrderedDict[tuple, tuple]" = OrderedDict()


def _offset_table(ws, ptrs) -> tuple:
    """(int64 tensor on the weights' device of their element offsets from the first weight,
    whether every offset is a multiple of 16 elements), copied from pinned memory without a sync."""
    size = ws[0].element_size()
    gaps = [p - ptrs[0] for p in ptrs]
    if any(g % size for g in gaps):
        raise ValueError("weights of one dtype must lie at whole elements from each other")
    offsets = [g // size for g in gaps]
    table = torch.tensor(offsets, dtype=torch.int64, pin_memory=ws[0].is_cuda).to(ws[0].device, non_blocking=True)
    return table, ptrs[0] % 16 == 0 and all(o % 16 == 0 for o in offsets)


def launch_plan(ws) -> tuple:
    """How one call reads the weights: ("stride", elements) when they lie at one distance in
    one storage, ("table", offset table) when they share dtype and strides, else ("each", None).
    Cached by the weights' addresses and strides (the same parameters come back every step)."""
    ptrs = tuple(w.data_ptr() for w in ws)
    key = (ws[0].device, ws[0].dtype, tuple(ws[0].shape), ptrs, tuple(w.stride() for w in ws))
    plan = _plans.get(key)
    if plan is None:
        stride = uniform_stride(ws)
        if stride is not None:
            plan = ("stride", stride)
        elif all(w.stride() == ws[0].stride() and w.dtype == ws[0].dtype for w in ws):
            plan = ("table", _offset_table(ws, ptrs))
        else:
            plan = ("each", None)
        _plans[key] = plan
        if len(_plans) > 256:
            _plans.popitem(last=False)
    else:
        _plans.move_to_end(key)
    return plan


def uniform_stride(ws) -> Optional[int]:
    """The element distance between consecutive weights when they lie at one fixed distance
    (which may be negative) in one storage, all of one shape, dtype and strides; else None."""
    first = ws[0]
    storage, size = first.untyped_storage().data_ptr(), first.element_size()
    if len(ws) == 1:
        return 0
    step = ws[1].data_ptr() - first.data_ptr()
    if step % size:
        return None
    for i, w in enumerate(ws):
        if (w.data_ptr() != first.data_ptr() + i * step or w.shape != first.shape or w.stride() != first.stride()
                or w.dtype != first.dtype or w.untyped_storage().data_ptr() != storage):
            return None
    return step // size


def quantize_weights(ws, data: torch.Tensor, scale: torch.Tensor, pow2_scales: bool = True,
                     transposed: bool = False, tuning: Optional[tuple] = None) -> None:
    """Weights ``ws`` (G of one shape [N, K]) into ``data`` [G, N, K] and ``scale`` [G, nN, nK]
    (``transposed``: [G, K, N] and [G, nK, nN]), in one launch: reading the weights at one
    stride when they lie so in one storage (a stacked buffer, Megatron DDP's parameter buffer),
    else through a table of their offsets (weights of one dtype and strides)."""
    if not ws:
        return
    kind, how = launch_plan(ws)
    if kind == "stride":
        _launch(ws[0], data, scale, pow2_scales, transposed, groups=len(ws), stride_g=how, tuning=tuning)
    elif kind == "table":
        _launch(ws[0], data, scale, pow2_scales, transposed, groups=len(ws), table=how, tuning=tuning)
    else:
        for i, w in enumerate(ws):
            _launch(w, data[i], scale[i], pow2_scales, transposed, tuning=tuning)


def quantize_weight(w: torch.Tensor, pow2_scales: bool = True, out=None, out_t=None, transpose_only: bool = False):
    """Returns (data [N, K], scale_inv [nN, nK], None, None), or with ``transpose_only``
    (None, None, data_t [K, N], scale_inv_t [nK, nN]): the transposed copy alone.

    ``w``: bf16, fp16 or fp32, any strides. ``out=(data, scale_inv)`` and
    ``out_t=(data_t, scale_inv_t)``: contiguous buffers to write into (e.g. one expert's slice of
    a stacked weight buffer) instead of fresh ones.
    """
    if w.dim() != 2:
        raise ValueError(f"weight quantization expects a 2-D [N, K] tensor, got shape {tuple(w.shape)}")
    if w.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"weight quantization expects bf16, fp16 or fp32 input, got {w.dtype}")
    n, k = w.shape
    num_nb, num_kb = cdiv(n, BLOCK), cdiv(k, BLOCK)
    dev = w.device
    data = scale = data_t = scale_t = None
    if not transpose_only:
        data, scale = out if out is not None else (torch.empty(n, k, dtype=FP8_DTYPE, device=dev),
                                                   torch.empty(num_nb, num_kb, dtype=torch.float32, device=dev))
        _launch(w, data, scale, pow2_scales, transposed=False)
    else:
        data_t, scale_t = out_t if out_t is not None else (
            torch.empty(k, n, dtype=FP8_DTYPE, device=dev), torch.empty(num_kb, num_nb, dtype=torch.float32, device=dev))
        _launch(w, data_t, scale_t, pow2_scales, transposed=True)
    return data, scale, data_t, scale_t
