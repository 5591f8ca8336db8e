"""Public FP8 API: quantize, dequantize, scaling-aware transpose, weight quantization.

Each call runs the Triton kernel when the tensor is on a CUDA device (or on CPU with
``TRITON_INTERPRET=1``) and the plain-PyTorch reference otherwise; ``backend=`` forces one.
Both compute the same bits (see :mod:`.reference` for the exact semantics).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch

from . import reference as ref
from .audit import cast_point, counted
from .format import (BLOCK, FP8_DTYPE, BlockwiseFP8Tensor, ColStorage, GroupSplits, Layout, SplitsLike, cdiv,
                     per_group_from_side_by_side, set_dequantizer, with_row_scale_layout)

Backend = Literal["auto", "triton", "reference"]
_BACKENDS = ("auto", "triton", "reference")


def _triton_available(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    from ..kernels.fp8_common import interpreter_active

    return interpreter_active()


def _use_triton(device: torch.device, backend: str) -> bool:
    if backend not in _BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {_BACKENDS}")
    if backend == "reference":
        return False
    available = _triton_available(device)
    if backend == "triton" and not available:
        raise RuntimeError(
            f"the Triton backend needs a CUDA tensor or TRITON_INTERPRET=1 for CPU tensors; "
            f"got a tensor on {device}"
        )
    return available


def _check_activation(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"FP8 quantization expects a 2-D [M, K] tensor, got shape {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"FP8 quantization expects bf16, fp16 or fp32 input, got {x.dtype}")


@counted("quantize")
def quantize(
    x: torch.Tensor,
    layout: str = "rowwise",
    m_splits: Optional[SplitsLike] = None,
    pow2_scales: bool = True,
    backend: Backend = "auto",
    col_storage: str = "side_by_side",
    scale_layout: str = "row_major",
) -> BlockwiseFP8Tensor:
    """Quantize a 2-D activation/gradient tensor to blockwise FP8 E4M3.

    Args:
        x: [M, K] bf16/fp16/fp32.
        layout: ``"rowwise"`` (1x128 blocks along K; K need not be a multiple of 128, the last
            block is partial) or ``"colwise"`` (1x128 blocks along M, restarting at every group
            of ``m_splits``; data stored transposed [K, M]).
        m_splits: group (expert) row counts for ``colwise``; zeros allowed. A list gives exact
            output shapes; a device tensor avoids any host sync (see :class:`GroupSplits`); a
            :class:`GroupSplits` (e.g. ``Permutation.group_splits()``) is used as is.
        pow2_scales: power-of-two scales ``2^ceil(log2(amax/448))`` (exact, default) or fp32
            scales ``amax/448``.
        col_storage: ``colwise`` data storage, ``"side_by_side"`` ([K, M]) or ``"per_group"``
            (one contiguous [K, m_g] block per group; see :class:`~.format.ColStorage`).
        scale_layout: ``rowwise`` scale layout, ``"row_major"`` or ``"mn_major"`` (strides
            (1, M rounded up to 4): what DeepGEMM reads; see ``format.empty_row_scales``).

    Semantics (both backends, bit-identical): scales from the amax of the finite elements of
    each block, clamped to >= 2^-126; ``scale_inv = 1`` for blocks without a finite non-zero
    element; codes ``RNE_e4m3(x / scale_inv)`` with subnormals kept; NaN and +-Inf become the
    NaN code 0x7F (never a finite value).
    """
    _check_activation(x)
    lay = Layout.parse(layout)
    if lay == Layout.ROWWISE:
        if m_splits is not None:
            raise ValueError("m_splits applies to the 'colwise' layout only")
        mn_major = _mn_major(scale_layout)
        if _use_triton(x.device, backend):
            from ..kernels.quantize import quantize_rowwise

            data, scale_inv = quantize_rowwise(x, pow2_scales, mn_major_scales=mn_major)
        else:
            data, scale_inv = ref.quantize_rowwise(x, pow2_scales)
            scale_inv = with_row_scale_layout(scale_inv, mn_major)
        return BlockwiseFP8Tensor(data, scale_inv, Layout.ROWWISE, tuple(x.shape), pow2_scales)
    if lay == Layout.COLWISE:
        groups = _groups(m_splits, x.shape[0], x.device)
        storage = ColStorage.parse(col_storage)
        _, _, data_t, scale_t = _quantize_grouped(x, groups, pow2_scales, False, backend, storage)
        return BlockwiseFP8Tensor(data_t, scale_t, Layout.COLWISE, tuple(x.shape), pow2_scales, groups, storage)
    raise ValueError("use fp8.quantize_weight for the 128x128 'weight' layout")


@counted("quantize", count=2)
def quantize_row_and_col(
    x: torch.Tensor,
    m_splits: SplitsLike,
    pow2_scales: bool = True,
    backend: Backend = "auto",
    col_storage: str = "side_by_side",
    scale_layout: str = "row_major",
):
    """Row-wise and grouped column-wise quantization of ``x`` (one call, fastest kernels).

    Returns ``(rowwise, colwise)``, each identical to what :func:`quantize` gives for that
    layout (the independent, TE-style quantization of both GEMM operands).
    """
    _check_activation(x)
    groups = _groups(m_splits, x.shape[0], x.device)
    storage = ColStorage.parse(col_storage)
    data, scale, data_t, scale_t = _quantize_grouped(x, groups, pow2_scales, True, backend, storage,
                                                     _mn_major(scale_layout))
    shape = tuple(x.shape)
    return (
        BlockwiseFP8Tensor(data, scale, Layout.ROWWISE, shape, pow2_scales),
        BlockwiseFP8Tensor(data_t, scale_t, Layout.COLWISE, shape, pow2_scales, groups, storage),
    )


def _groups(m_splits: Optional[SplitsLike], num_rows: int, device: torch.device) -> GroupSplits:
    if m_splits is None:
        raise ValueError("the 'colwise' layout needs m_splits (rows per group; [M] for one group)")
    return GroupSplits.build(m_splits, num_rows, device)


def _mn_major(scale_layout: str) -> bool:
    if scale_layout not in ("row_major", "mn_major"):
        raise ValueError(f"scale_layout must be 'row_major' or 'mn_major', got {scale_layout!r}")
    return scale_layout == "mn_major"


def _quantize_grouped(x, groups: GroupSplits, pow2_scales, write_rowwise, backend, storage=ColStorage.SIDE_BY_SIDE,
                      mn_major=False):
    per_group = storage == ColStorage.PER_GROUP
    if _use_triton(x.device, backend):
        from ..kernels.quantize import quantize_grouped

        return quantize_grouped(x, groups, pow2_scales, write_rowwise, per_group=per_group, mn_major_scales=mn_major)
    sizes = groups.host_sizes()
    data_t, scale_t = ref.quantize_colwise(x, sizes, pow2_scales)
    if per_group:
        data_t = per_group_from_side_by_side(data_t, sizes)
    scale_t = _pad_scale_rows(scale_t, groups)
    data = scale = None
    if write_rowwise:
        data, scale = ref.quantize_rowwise(x, pow2_scales)
        scale = with_row_scale_layout(scale, mn_major)
    return data, scale, data_t, scale_t


def _pad_scale_rows(scale_t: torch.Tensor, groups: GroupSplits) -> torch.Tensor:
    """Give reference outputs the same (capacity) shape as the kernels' for device splits."""
    extra = groups.scale_rows_capacity - scale_t.shape[0]
    if extra <= 0:
        return scale_t
    return torch.cat([scale_t, scale_t.new_zeros(extra, scale_t.shape[1])], 0)


@counted("weight_quantize")
def quantize_weight(
    w: torch.Tensor, pow2_scales: bool = True, backend: Backend = "auto", out=None
) -> BlockwiseFP8Tensor:
    """Quantize a weight [N, K] with 128x128 blocks: data [N, K], scale_inv [ceil(N/128), ceil(K/128)].

    Same element semantics as :func:`quantize`. ``.t()`` of the result is the exact
    transposed copy used by dgrad GEMMs. ``out=(data, scale_inv)`` writes into given contiguous
    buffers (one expert's slice of stacked weights) instead of fresh ones.
    """
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"quantize_weight expects a 2-D [N, K] tensor, got {getattr(w, 'shape', w)!r}")
    if w.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"quantize_weight expects bf16, fp16 or fp32 input, got {w.dtype}")
    _check_weight_out(out, w.shape, "out")
    if _use_triton(w.device, backend):
        from ..kernels.quantize_weight import quantize_weight as kernel

        data, scale, _, _ = kernel(w, pow2_scales, out=out)
    else:
        data, scale = ref.quantize_weight(w, pow2_scales)
        if out is not None:
            data, scale = out[0].copy_(data), out[1].copy_(scale)
    return BlockwiseFP8Tensor(data, scale, Layout.WEIGHT, tuple(w.shape), pow2_scales)


@counted("weight_quantize")
def quantize_weight_transposed(w: torch.Tensor, pow2_scales: bool = True, backend: Backend = "auto",
                               out=None) -> BlockwiseFP8Tensor:
    """``quantize_weight(w).t()`` alone, in one pass over ``w`` that writes only the transposed
    codes and scales (the same bytes: a 128x128 block keeps its scale under transposition): the
    operand cuBLAS's dgrad takes. ``out=(data_t, scale_inv_t)``: buffers [K, N] and
    [K/128, N/128] to write into, as in :func:`quantize_weight`."""
    if w.dim() != 2:
        raise ValueError(f"quantize_weight_transposed expects a 2-D [N, K] tensor, got shape {tuple(w.shape)}")
    n, k = w.shape
    _check_weight_out(out, (k, n), "out")
    if _use_triton(w.device, backend):
        from ..kernels.quantize_weight import quantize_weight as kernel

        _, _, data_t, scale_t = kernel(w, pow2_scales, out_t=out, transpose_only=True)
        return BlockwiseFP8Tensor(data_t, scale_t, Layout.WEIGHT, (k, n), pow2_scales)
    qt = quantize_weight.__wrapped__(w, pow2_scales, backend).t()  # one counted cast, not two
    if out is None:
        return qt
    return BlockwiseFP8Tensor(out[0].copy_(qt.data), out[1].copy_(qt.scale_inv), Layout.WEIGHT, (k, n), pow2_scales)


def quantize_weights(ws, pow2_scales: bool = True, transposed: bool = False, backend: Backend = "auto",
                     out=None):
    """:func:`quantize_weight` (``transposed``: :func:`quantize_weight_transposed`) of G weights
    of one shape into one stacked buffer: returns ``(weights, data, scale_inv)``, the G FP8
    tensors being views of ``data`` [G, N, K] ([G, K, N] transposed) and ``scale_inv``. The
    same bytes as G single calls; one kernel launch when the weights lie at one stride in one
    storage (a stacked buffer, Megatron DDP's parameter buffer). ``out=(data, scale_inv)``:
    the stacked buffers to write into."""
    ws = list(ws)
    if not ws:
        raise ValueError("quantize_weights needs at least one weight")
    first = ws[0]
    if first.dim() != 2 or any(w.shape != first.shape or w.dtype != first.dtype for w in ws):
        raise ValueError(f"quantize_weights expects 2-D weights of one shape and dtype, got "
                         f"{sorted({(tuple(w.shape), str(w.dtype)) for w in ws})}")
    if first.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"quantize_weights expects bf16, fp16 or fp32 input, got {first.dtype}")
    n, k = first.shape
    rows, cols = (k, n) if transposed else (n, k)
    g, dev = len(ws), first.device
    if out is None:
        out = (torch.empty(g, rows, cols, dtype=FP8_DTYPE, device=dev),
               torch.empty(g, cdiv(rows, BLOCK), cdiv(cols, BLOCK), dtype=torch.float32, device=dev))
    data, scale = out
    if (data.shape != (g, rows, cols) or data.dtype != FP8_DTYPE or not data.is_contiguous()
            or scale.shape != (g, cdiv(rows, BLOCK), cdiv(cols, BLOCK)) or not scale.is_contiguous()):
        raise ValueError(f"out must be contiguous (e4m3 {[g, rows, cols]}, float32 "
                         f"{[g, cdiv(rows, BLOCK), cdiv(cols, BLOCK)]}), got "
                         f"{[(t.dtype, tuple(t.shape)) for t in out]}")
    with cast_point("weight_quantize", g):
        if _use_triton(dev, backend):
            from ..kernels.quantize_weight import quantize_weights as kernel

            kernel(ws, data, scale, pow2_scales, transposed)
        else:
            for i, w in enumerate(ws):
                q = ref.quantize_weight(w, pow2_scales)
                data[i].copy_(q[0].t() if transposed else q[0])
                scale[i].copy_(q[1].t() if transposed else q[1])
    tensors = [BlockwiseFP8Tensor(data[i], scale[i], Layout.WEIGHT, (rows, cols), pow2_scales) for i in range(g)]
    return tensors, data, scale


def _check_weight_out(out, shape, name: str) -> None:
    """``out`` buffers of a 128x128 weight quantization: contiguous e4m3 data and fp32 scales."""
    if out is None:
        return
    n, k = shape
    want = ((n, k), FP8_DTYPE), ((cdiv(n, BLOCK), cdiv(k, BLOCK)), torch.float32)
    if any(t.shape != s or t.dtype != dt or not t.is_contiguous() for t, (s, dt) in zip(out, want)):
        raise ValueError(
            f"{name} must be contiguous (e4m3 {list(want[0][0])}, float32 {list(want[1][0])}), got "
            f"{[(t.dtype, tuple(t.shape)) for t in out]}"
        )


@counted("transpose")
def scaling_aware_transpose(
    q: BlockwiseFP8Tensor,
    m_splits: SplitsLike,
    variant: str = "column",
    backend: Backend = "auto",
    storage: str = "side_by_side",
) -> BlockwiseFP8Tensor:
    """Row-wise FP8 -> grouped column-wise FP8 directly on the FP8 bytes (no BF16 round trip).

    Args:
        q: a ``rowwise`` tensor with power-of-two scales. K need not be a multiple of 128.
        m_splits: rows per group (expert), zeros allowed; list or device tensor.
        variant: ``"column"``: each output block gets the power-of-two scale of its exact
            column amax; the result is bit-identical to
            ``quantize(q.dequantize(), "colwise", m_splits)`` (codes and scales), subnormal
            results rounded to nearest even. ``"tile"``: each 128x128 tile uses the largest
            of its row scales (the paper's choice; see ``reference.sat_tile``).
        storage: the output's data storage, ``"side_by_side"`` or ``"per_group"`` (what a
            K-grouped wgrad GEMM reads; see :class:`~.format.ColStorage`). Same codes either way.
    """
    if not isinstance(q, BlockwiseFP8Tensor) or q.layout != Layout.ROWWISE:
        got = q.layout.value if isinstance(q, BlockwiseFP8Tensor) else type(q).__name__
        raise ValueError(f"scaling_aware_transpose needs a 'rowwise' BlockwiseFP8Tensor, got {got}")
    if not q.pow2_scales:
        raise ValueError(
            "scaling_aware_transpose needs power-of-two scales (quantize(..., pow2_scales=True)): "
            "with fp32 scales the re-encoding is not an exponent shift and would round twice; "
            "use quantize(q.dequantize(), layout='colwise', ...) explicitly instead"
        )
    if variant not in ("column", "tile"):
        raise ValueError(f"unknown SAT variant {variant!r}; expected 'column' or 'tile'")
    m, k = q.shape
    storage = ColStorage.parse(storage)
    groups = GroupSplits.build(m_splits, m, q.device)
    if _use_triton(q.device, backend):
        from ..kernels.scaling_aware_transpose import scaling_aware_transpose as kernel

        data_t, scale_t = kernel(q.data, q.scale_inv, groups, tile_scale=(variant == "tile"),
                                 per_group=storage == ColStorage.PER_GROUP)
    else:
        sizes = groups.host_sizes()
        if variant == "tile":
            data_t, scale_t = ref.sat_tile(q.data, q.scale_inv, sizes)
        else:
            x = ref.dequantize_rowwise(q.data, q.scale_inv)
            data_t, scale_t = ref.quantize_colwise(x, sizes, True)
        if storage == ColStorage.PER_GROUP:
            data_t = per_group_from_side_by_side(data_t, sizes)
        scale_t = _pad_scale_rows(scale_t, groups)
    return BlockwiseFP8Tensor(data_t, scale_t, Layout.COLWISE, (m, k), True, groups, storage)


@counted(lambda t, *a, **k: "weight_dequantize" if t.layout == Layout.WEIGHT else "dequantize")
def dequantize(
    t: BlockwiseFP8Tensor, dtype: torch.dtype = torch.float32, backend: Backend = "auto"
) -> torch.Tensor:
    """``data * scale_inv`` in the logical orientation ([M, K]; weights [N, K]). Row-wise tensors
    take the kernel where it runs; the other layouts, and the reference, are exact plain PyTorch."""
    if t.layout == Layout.ROWWISE and _use_triton(t.device, backend):
        from ..kernels.dequantize import dequantize_rowwise

        return dequantize_rowwise(t.data, t.scale_inv, dtype)
    return ref.dequantize_tensor(t, dtype)


set_dequantizer(dequantize)  # what BlockwiseFP8Tensor.dequantize runs (the format cannot import the API)


def num_scale_blocks(m_splits) -> int:
    """Rows of a column-wise scale tensor for host-side splits: sum_g ceil(m_g / 128)."""
    return sum(cdiv(int(v), BLOCK) for v in m_splits)
