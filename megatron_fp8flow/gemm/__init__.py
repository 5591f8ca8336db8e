"""Blockwise FP8 grouped GEMMs for the expert MLP: one contract, one module per backend.

* :func:`grouped_rowwise_gemm`: ``out[g] = DQ(a[g]) @ DQ(w[g])^T`` (fprop; dgrad with the
  backend's dgrad weights, see :func:`dgrad_weights`);
* :func:`grouped_wgrad`: ``dW[g] = DQ(dy[g])^T @ DQ(x[g])``, accumulated into fp32 buffers (the
  parameters' ``main_grad``) or written once in the parameter dtype.

Backends (:mod:`.contract` says what each implements and declares):
``deepgemm`` (:mod:`.deepgemm`, Hopper, optional ``deep_gemm`` module: one launch per product),
``cublas`` (:mod:`.cublas`, Hopper: one ``torch._scaled_mm`` per group), ``triton``
(:mod:`.triton`, one launch per product, any FP8 GPU and the CPU interpreter), ``emulated``
(:mod:`.emulated`, exact dequantization + fp32 products, any device). The ``auto`` rule lives in
:func:`resolve_backend` alone.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence

import torch

from ..fp8.format import BlockwiseFP8Tensor, GroupSplits, Layout, SplitsLike
from . import deepgemm as _deepgemm
from .contract import (GemmBackend, OperandLayouts, WeightStack, check_multiple, inside_gemm, stacked_view,
                       stacked_view_or_copy)
from .cublas import CublasBackend, outer_major_group_scales
from .deepgemm import DeepGemmBackend
from .emulated import EmulatedBackend
from .triton import TritonBackend

__all__ = [
    "BACKENDS", "GemmBackend", "OperandLayouts", "WeightStack", "backend_for_groups", "dgrad_weights",
    "get_backend", "grouped_dgrad", "grouped_rowwise_gemm", "grouped_wgrad", "inside_gemm", "layouts",
    "outer_major_group_scales", "resolve_backend", "stacked_view", "stacked_view_or_copy",
]

logger = logging.getLogger(__name__)

_REGISTRY: Dict[str, GemmBackend] = {
    b.name: b for b in (DeepGemmBackend(), CublasBackend(), TritonBackend(), EmulatedBackend())
}
BACKENDS = ("auto",) + tuple(_REGISTRY)


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that ``backend`` means on ``device``, or a clear error.

    ``auto``: on Hopper (sm_90) DeepGEMM when ``deep_gemm`` imports, else cuBLAS; Triton on other
    GPUs with FP8 tensor cores (sm_89, sm_100+); the emulation on CPU; older GPUs are refused.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown GEMM backend {backend!r}; expected one of {BACKENDS}")
    device = torch.device(device)
    if backend == "auto":
        if device.type != "cuda":
            return "emulated"
        cap = torch.cuda.get_device_capability(device)
        if cap[0] == 9:
            return "deepgemm" if _deepgemm.available() else "cublas"
        if cap >= (8, 9):  # Ada, Blackwell: FP8 tensor cores, no blockwise vendor GEMM here
            return "triton"
        raise RuntimeError(
            f"FP8 expert GEMMs need a GPU with FP8 tensor cores (sm_89 or newer); this GPU is "
            f"sm_{cap[0]}{cap[1]}. Use the 'bf16' precision mode, or backend='emulated' (slow, for testing)."
        )
    _REGISTRY[backend].check_device(device)
    return backend


def get_backend(backend: str, device: torch.device) -> GemmBackend:
    """The backend object ``backend`` resolves to on ``device``."""
    return _REGISTRY[resolve_backend(backend, device)]


def layouts(backend: str, device: torch.device) -> OperandLayouts:
    """The operand layouts the resolved backend reads (what producers should make)."""
    return get_backend(backend, device).layouts(torch.device(device))


def backend_for_groups(backend: str, device, sizes: Sequence[int]) -> GemmBackend:
    """The backend for these groups: ``auto`` falls back from DeepGEMM to cuBLAS (once, with a
    log line) when the groups are not padded to DeepGEMM's alignment."""
    chosen = get_backend(backend, device)
    if backend == "auto" and chosen.name == "deepgemm":
        align = chosen.layouts(device).group_alignment
        if any(s % align for s in sizes):
            if not getattr(backend_for_groups, "_warned", False):
                logger.warning("expert groups are not padded to %d rows (DeepGEMM's contiguous layout): the "
                               "FP8 GEMMs fall back to cuBLAS; permute with alignment %d", align, align)
                backend_for_groups._warned = True
            return _REGISTRY["cublas"]
    return chosen


def dgrad_weights(backend: str, device) -> str:
    """``"forward"`` or ``"transposed"``: which weights :func:`grouped_rowwise_gemm` takes for dgrad."""
    return layouts(backend, device).dgrad_weights


def grouped_rowwise_gemm(
    a: BlockwiseFP8Tensor,
    weights: Sequence[BlockwiseFP8Tensor],
    m_splits: SplitsLike,
    out_dtype: torch.dtype = torch.bfloat16,
    backend: str = "auto",
    transpose_weights: bool = False,
) -> torch.Tensor:
    """``out[rows of g] = DQ(a[rows of g]) @ DQ(weights[g])^T``; returns [M, N] in ``out_dtype``.

    ``transpose_weights=True`` multiplies by ``DQ(weights[g])`` instead (dgrad from the forward
    weights): backends that read them transposed in place do so, the others get the exact
    transposed copies made here (pass copies yourself, made once, on a hot path).
    """
    if a.layout != Layout.ROWWISE:
        raise ValueError(f"grouped_rowwise_gemm needs a 'rowwise' activation, got {a.layout.value!r}")
    m, k = a.shape
    check_multiple("K", k)
    groups = GroupSplits.build(m_splits, m, a.device)
    if len(weights) != groups.num_groups:
        raise ValueError(f"{len(weights)} weights for {groups.num_groups} groups")
    n = weights[0].shape[1 if transpose_weights else 0] if weights else 0
    want = (k, n) if transpose_weights else (n, k)
    for i, w in enumerate(weights):
        if w.layout != Layout.WEIGHT or tuple(w.shape) != want:
            raise ValueError(f"weight {i} must be a 128x128 'weight' tensor of shape {want}, got {w!r}")
    check_multiple("N", n)
    impl = backend_for_groups(backend, a.device, groups.host_sizes())
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if not transpose_weights:
        return impl.fprop(a, weights, groups, out)
    if impl.layouts(a.device).dgrad_weights == "forward":
        return impl.dgrad(a, weights, groups, out)
    return impl.dgrad(a, [w.t() for w in weights], groups, out)


def grouped_dgrad(
    grad: BlockwiseFP8Tensor,
    weights: Sequence[BlockwiseFP8Tensor],
    m_splits: SplitsLike,
    backend: str = "auto",
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """``grad @ DQ(W_g)`` per group, ``weights`` being what :func:`dgrad_weights` says for this
    backend (the forward weights, or their exact transposed copies)."""
    if grad.layout != Layout.ROWWISE:
        raise ValueError(f"grouped_dgrad needs a 'rowwise' gradient, got {grad.layout.value!r}")
    m, k = grad.shape
    check_multiple("K", k)
    groups = GroupSplits.build(m_splits, m, grad.device)
    impl = backend_for_groups(backend, grad.device, groups.host_sizes())
    forward = impl.layouts(grad.device).dgrad_weights == "forward"
    n = weights[0].shape[1 if forward else 0] if weights else 0
    out = torch.empty(m, n, dtype=out_dtype, device=grad.device)
    return impl.dgrad(grad, weights, groups, out)


def grouped_wgrad(
    grad_col: BlockwiseFP8Tensor,
    x_col: BlockwiseFP8Tensor,
    accumulate_into: Optional[Sequence[torch.Tensor]] = None,
    backend: str = "auto",
    out_dtype: torch.dtype = torch.float32,
) -> List[torch.Tensor]:
    """``dW[g] = DQ(grad[g])^T @ DQ(x[g])`` in fp32 for every group, [N, K] each.

    Both operands are column-wise tensors over the same groups (``grad_col`` logical [M, N],
    ``x_col`` logical [M, K]), in one storage. With ``accumulate_into`` the products are added
    to those fp32 buffers (returned); empty groups leave them untouched (or give zeros).
    Without it each product is written once, in ``out_dtype`` (fp32 or bf16).
    """
    for name, t in (("grad", grad_col), ("x", x_col)):
        if t.layout != Layout.COLWISE:
            raise ValueError(f"grouped_wgrad needs column-wise operands; {name} is {t.layout.value!r}")
    m, n = grad_col.shape
    m2, k = x_col.shape
    if m != m2:
        raise ValueError(f"grad has {m} rows but x has {m2}")
    sizes = grad_col.groups.host_sizes()
    if sizes != x_col.groups.host_sizes():
        raise ValueError("grad and x must be split into the same groups")
    if grad_col.col_storage != x_col.col_storage:
        raise ValueError(f"grad and x must share one column-wise storage, got {grad_col.col_storage.value!r} "
                         f"and {x_col.col_storage.value!r}")
    check_multiple("N", n)
    check_multiple("K", k)
    if out_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"grouped_wgrad writes fp32 or bf16, got {out_dtype}")
    if accumulate_into is not None:
        accumulate_into = list(accumulate_into)
        if len(accumulate_into) != len(sizes):
            raise ValueError(f"{len(accumulate_into)} gradient buffers for {len(sizes)} groups")
        for i, buf in enumerate(accumulate_into):
            if buf.dtype != torch.float32 or tuple(buf.shape) != (n, k):
                raise ValueError(f"gradient buffer {i} must be fp32 [{n}, {k}], got {buf.dtype} {tuple(buf.shape)}")
    impl = backend_for_groups(backend, grad_col.device, sizes)
    return impl.wgrad(grad_col, x_col, grad_col.groups, accumulate_into, out_dtype)
