"""The contract every GEMM backend implements, and the helpers they share.

A backend is one module holding one :class:`GemmBackend` subclass. It declares the operand
layouts it reads (:class:`OperandLayouts`), so that the code producing the operands (the
permutation, the SAT, the weight quantization) makes them in that layout once instead of
converting on every call, and implements the three products of the expert MLP over expert
groups:

* ``fprop``: ``out[rows of g] = DQ(a[rows of g]) @ DQ(w[g])^T``, ``a`` row-wise 1x128 [M, K],
  ``w[g]`` 128x128 [N, K];
* ``dgrad``: the same product for the output gradient, with the weights as the backend's
  ``dgrad_weights`` says: the forward weights read transposed in place, or their exact
  transposed copies;
* ``wgrad``: ``dW[g] = DQ(dy[g])^T @ DQ(x[g])`` with both operands column-wise (1x128 blocks
  along tokens, per group), accumulated into fp32 buffers (the parameters' ``main_grad``) or
  written once in the parameter dtype.

The public functions in :mod:`megatron_fp8flow.gemm` validate the arguments, pick the backend and
call these methods; a backend checks only what is its own (alignment, device, library limits).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from ..fp8.audit import audit_active, cast_point
from ..fp8.format import BLOCK, BlockwiseFP8Tensor, ColStorage, GroupSplits


@dataclass(frozen=True)
class OperandLayouts:
    """What a backend reads, so producers can make it directly.

    * ``group_alignment``: every group's row count must be a multiple of this (the permutation
      pads to it); 1 means any size.
    * ``dgrad_weights``: ``"forward"`` (reads the forward weights transposed in place) or
      ``"transposed"`` (needs the exact transposed copies, ``w.t()``, K-major).
    * ``colwise_storage``: the storage of column-wise (wgrad) operands it reads natively.
    * ``row_scales``: ``"row_major"`` ([M, K/128] contiguous) or ``"mn_major"`` ([M, K/128]
      with strides (1, M rounded up to 4), TMA-aligned) for row-wise activation scales; the
      other layout is accepted and converted once per operand.
    """

    group_alignment: int = 1
    dgrad_weights: str = "transposed"
    colwise_storage: ColStorage = ColStorage.SIDE_BY_SIDE
    row_scales: str = "row_major"


class GemmBackend:
    """Base class of the backends: ``name``, ``layouts()``, ``check_device`` and the products."""

    name = "?"

    def layouts(self, device: torch.device) -> OperandLayouts:
        return OperandLayouts()

    def check_device(self, device: torch.device) -> None:
        """Raise a clear error when this backend cannot run on ``device``."""

    def fprop(self, a: BlockwiseFP8Tensor, weights: Sequence[BlockwiseFP8Tensor], groups: GroupSplits,
              out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dgrad(self, grad: BlockwiseFP8Tensor, weights: Sequence[BlockwiseFP8Tensor], groups: GroupSplits,
              out: torch.Tensor) -> torch.Tensor:
        """``weights`` are what ``layouts().dgrad_weights`` says. The default: transposed copies,
        the same product as fprop."""
        return self.fprop(grad, weights, groups, out)

    def wgrad(self, grad_col: BlockwiseFP8Tensor, x_col: BlockwiseFP8Tensor, groups: GroupSplits,
              accumulate_into: Optional[List[torch.Tensor]], out_dtype: torch.dtype) -> List[torch.Tensor]:
        raise NotImplementedError


def inside_gemm():
    """Conversions inside a GEMM (FP8 operands, bf16 result; the emulation dequantizes its
    operands) are not casts for the cast audit."""
    return cast_point("gemm", count=0) if audit_active() else contextlib.nullcontext()


def check_multiple(name: str, value: int) -> None:
    if value % BLOCK:
        raise ValueError(f"FP8 GEMMs need {name} % 128 == 0 (whole 128-wide scale blocks), got {name} = {value}")


def check_group_alignment(sizes: Sequence[int], alignment: int, backend: str) -> None:
    for i, rows in enumerate(sizes):
        if rows % alignment:
            raise ValueError(
                f"the {backend!r} GEMM backend needs every group's row count to be a multiple of {alignment} "
                f"(permute with that alignment); group {i} has {rows} rows. backend='emulated' takes any size."
            )


def group_bounds(groups: GroupSplits) -> List[tuple]:
    """(first row, rows, first scale row, scale rows) of every group."""
    sizes = groups.host_sizes()
    bounds, start, srow = [], 0, 0
    for m in sizes:
        nb = -(-m // BLOCK)
        bounds.append((start, m, srow, nb))
        start += m
        srow += nb
    return bounds


def stacked_view_or_copy(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """[G, ...] over equal-shape tensors: a view when they already lie back to back in one buffer
    (weights quantized into a stacked buffer), a copy otherwise."""
    stacked = stacked_view(tensors)
    return stacked if stacked is not None else torch.stack(list(tensors))


def stacked_view(tensors: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """The [G, ...] view over tensors lying back to back in one buffer, or None. (Addresses are
    compared for every tensor, storages for the first and last: on the hot path, per call.)"""
    first, last = tensors[0], tensors[-1]
    step = first.numel()
    nbytes, base, shape, dtype = step * first.element_size(), first.data_ptr(), first.shape, first.dtype
    for i, t in enumerate(tensors):
        if t.data_ptr() != base + i * nbytes or t.shape != shape or t.dtype != dtype or not t.is_contiguous():
            return None
    if last.untyped_storage().data_ptr() != first.untyped_storage().data_ptr():
        return None
    return first.as_strided((len(tensors), *shape), (step, *first.stride()))


class WeightStack(list):
    """A list of 128x128 FP8 weights quantized into one stacked buffer, which it keeps
    (``data`` [G, N, K], ``scale_inv`` [G, N/128, K/128]): GEMMs read the stack without looking
    at the G tensors again."""

    def __init__(self, weights: Sequence[BlockwiseFP8Tensor], data: torch.Tensor, scale_inv: torch.Tensor):
        super().__init__(weights)
        self.data, self.scale_inv = data, scale_inv


def stacked_weights(weights: Sequence[BlockwiseFP8Tensor]):
    """([G, N, K] codes, [G, N/128, K/128] scales) over the weights, views where possible."""
    if isinstance(weights, WeightStack):
        return weights.data, weights.scale_inv
    return stacked_view_or_copy([w.data for w in weights]), stacked_view_or_copy([w.scale_inv for w in weights])


def store_product(buffer, prod, accumulate: bool, shape, out_dtype, device):
    """Add ``prod`` into ``buffer`` (accumulating) or return it as the result; an empty group
    (``prod`` None) leaves the buffer as it was, or gives zeros."""
    if accumulate:
        if prod is not None:
            buffer += prod
        return buffer
    if prod is None:
        return torch.zeros(shape, dtype=out_dtype, device=device)
    return prod.to(out_dtype)
