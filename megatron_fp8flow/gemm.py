"""Blockwise FP8 grouped GEMMs for the expert MLP: one product per expert group.

* ``grouped_rowwise_gemm``: ``out[g] = DQ(a[g]) @ DQ(w[g])^T`` with ``a`` row-wise 1x128 [M, K]
  and ``w[g]`` a 128x128 weight [N, K]. fprop uses the weights, dgrad their exact transposed
  copies (``w.t()``).
* ``grouped_wgrad``: ``dW[g] = DQ(dy[g])^T @ DQ(x[g])`` with both operands column-wise (1x128
  blocks along tokens, per group), fp32, optionally accumulated into existing fp32 buffers
  (the parameters' main gradients).

Backends: ``"cublas"`` calls ``torch._scaled_mm`` with blockwise scales once per non-empty
group (Hopper, sm_90); ``"triton"`` runs all groups in one launch
(:mod:`megatron_fp8flow.kernels.grouped_gemm`; any group sizes; no per-group host cost, but on
the H200 2.4x (fprop) to 7x (dgrad) slower than cuBLAS, see BENCHMARKS.md); ``"emulated"``
dequantizes exactly and multiplies in fp32, the same function on any device (CPU CI).
``"auto"`` picks cuBLAS on sm_90 (faster at every expert count measured, 8 to 32), Triton on
other GPUs with FP8 tensor cores (sm_89, sm_100+), emulation on CPU, and refuses older GPUs
with a clear error.
Group sizes are the padded sizes from the permutation; empty groups cost nothing.

cuBLAS limits (measured on the H200 with PyTorch 2.11): every group's row count must be a
multiple of 16 (the permutation's alignment guarantees it); a reduction dimension K with
K/128 not a multiple of 4 is refused with a clear error on PyTorch versions whose check wants
unpadded 128x128 scales (given them, cuBLAS returns wrong results). Partial 1x128 blocks
along tokens in the weight gradient (groups of 16 or 48 rows) are fine.
"""

from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence

import torch

from .fp8 import reference as ref
from .fp8.audit import audit_active, cast_point
from .fp8.format import BLOCK, BlockwiseFP8Tensor, GroupSplits, Layout, SplitsLike

BACKENDS = ("auto", "cublas", "triton", "emulated")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that ``backend`` means on ``device`` (``auto`` resolved), or a clear error."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown GEMM backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        if device.type != "cuda":
            return "emulated"
        cap = torch.cuda.get_device_capability(device)
        if cap[0] == 9:
            return "cublas"
        if cap >= (8, 9):  # Ada, Blackwell: FP8 tensor cores, no blockwise cuBLAS through PyTorch
            return "triton"
        raise RuntimeError(
            f"FP8 expert GEMMs need a GPU with FP8 tensor cores (sm_89 or newer); this GPU is "
            f"sm_{cap[0]}{cap[1]}. Use the 'bf16' precision mode, or backend='emulated' (slow, for testing)."
        )
    if backend == "triton":
        from .kernels.fp8_common import check_launchable_device

        check_launchable_device(device)
    if backend == "cublas":
        if device.type != "cuda":
            raise RuntimeError("the cuBLAS FP8 GEMM backend needs CUDA tensors; use backend='emulated' on CPU")
        cap = torch.cuda.get_device_capability(device)
        if cap[0] != 9:
            raise RuntimeError(
                f"blockwise FP8 GEMMs through cuBLAS need a Hopper GPU (sm_90); this GPU is sm_{cap[0]}{cap[1]}. "
                f"Use backend='emulated' (slow) or the bf16 mode."
            )
    return backend


def inside_gemm():
    """Conversions inside a GEMM (FP8 operands, bf16 result; the emulation dequantizes its
    operands) are not casts for the cast audit."""
    return cast_point("gemm", count=0) if audit_active() else contextlib.nullcontext()


def _check_multiple(name: str, value: int) -> None:
    if value % BLOCK:
        raise ValueError(f"FP8 GEMMs need {name} % 128 == 0 (whole 128-wide scale blocks), got {name} = {value}")


def _check_cublas_groups(bounds: List[tuple]) -> None:
    # cuBLAS FP8 GEMMs need 16-element-aligned leading dimensions; padded group sizes are.
    for i, (_, rows, _, _) in enumerate(bounds):
        if rows % 16:
            raise ValueError(
                f"cuBLAS FP8 GEMMs need every group's row count to be a multiple of 16 (permute with "
                f"alignment 16, 32 or 128); group {i} has {rows} rows. backend='emulated' takes any size."
            )


def _cublas_weight_operands(weights: Sequence[BlockwiseFP8Tensor]):
    """cuBLAS's view of every weight: ``w.data.t()`` and its 128x128 scales [K/128, N/128], column
    stride K/128 rounded up to 4 floats (16 bytes), as PyTorch's check asks since it started
    padding (older PyTorch asks for the unpadded stride, see ``_scaled_mm_blockwise``). Built
    for all experts at once over the stacked weights: a few calls whatever the expert count."""
    data = stacked_view_or_copy([w.data for w in weights]).transpose(1, 2)
    scale = stacked_view_or_copy([w.scale_inv for w in weights])
    g, nb, kb = scale.shape
    ld = -(-kb // 4) * 4
    if ld != kb or not scale.is_contiguous():
        padded = scale.new_zeros(g, nb, ld)
        padded[:, :, :kb] = scale
        scale = padded[:, :, :kb]
    return data.unbind(0), scale.transpose(1, 2).unbind(0)


def outer_major_group_scales(scale: torch.Tensor, groups: GroupSplits) -> List[torch.Tensor]:
    """Each group's rows of 1x128 scales [rows_g, K/128] with strides (1, rows_g): the layout
    cuBLAS takes for a blockwise operand (outer dimension major, the group's own row count as its
    stride). One scatter for all groups into one buffer (group offsets read on the device, no
    sync); the groups are views of it."""
    m, kb = scale.shape
    sizes = groups.host_sizes()
    buf = torch.empty(m * kb, dtype=scale.dtype, device=scale.device)
    if m:
        dev = scale.device
        sizes_t = groups.sizes_device.long()
        grp = torch.repeat_interleave(torch.arange(len(sizes), device=dev), sizes_t, output_size=m)
        row_start, rows = groups.row_offsets[:-1].long()[grp], sizes_t[grp]
        # element (r, j) of group g goes to g's block [kb, rows_g] at start_g * kb: j * rows_g + (r - start_g)
        dst = (row_start * (kb - 1) + torch.arange(m, device=dev))[:, None] + torch.arange(kb, device=dev) * rows[:, None]
        buf[dst.reshape(-1)] = scale.reshape(-1)
    views, start = [], 0
    for r in sizes:
        views.append(buf.as_strided((r, kb), (1, r), start * kb))
        start += r
    return views


def _scaled_mm_blockwise(a_data, b_data, scale_a, scale_b, out_dtype, out=None):
    try:
        return torch._scaled_mm(a_data, b_data, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype, out=out)
    except RuntimeError as err:
        # PyTorch 2.11 refuses the padded stride above and, given the unpadded one with K/128 not a
        # multiple of 4, returns wrong results (measured on the H200): refuse that case ourselves.
        if "Invalid scaling configuration" in str(err) and scale_b.shape[0] % 4 and scale_b.stride(0) == 1:
            raise ValueError(
                f"cuBLAS blockwise FP8 GEMMs in PyTorch {torch.__version__} need K % 512 == 0 (K/128 scale "
                f"blocks a multiple of 4); got K = {a_data.shape[1]}. Use backend='emulated', or a PyTorch "
                f"that pads blockwise scales."
            ) from err
        raise


def _group_bounds(groups: GroupSplits) -> List[tuple]:
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
    first = tensors[0]
    step = first.numel()
    if all(t.is_contiguous() and t.shape == first.shape and t.dtype == first.dtype
           and t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
           and t.storage_offset() == first.storage_offset() + i * step for i, t in enumerate(tensors)):
        return first.as_strided((len(tensors), *first.shape), (step, *first.stride()))
    return torch.stack(list(tensors))


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
    weights): the same as passing ``[w.t() for w in weights]``, but the Triton backend reads the
    transposed blocks in place instead of copying them.
    """
    if a.layout != Layout.ROWWISE:
        raise ValueError(f"grouped_rowwise_gemm needs a 'rowwise' activation, got {a.layout.value!r}")
    m, k = a.shape
    _check_multiple("K", k)
    groups = GroupSplits.build(m_splits, m, a.device)
    if len(weights) != groups.num_groups:
        raise ValueError(f"{len(weights)} weights for {groups.num_groups} groups")
    n = weights[0].shape[1 if transpose_weights else 0] if weights else 0
    want = (k, n) if transpose_weights else (n, k)
    for i, w in enumerate(weights):
        if w.layout != Layout.WEIGHT or tuple(w.shape) != want:
            raise ValueError(f"weight {i} must be a 128x128 'weight' tensor of shape {want}, got {w!r}")
    _check_multiple("N", n)
    backend = resolve_backend(backend, a.device)
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if backend == "triton":
        from .kernels import grouped_gemm

        if not weights:
            return out
        # One launch for all groups over [G, N, K] views of the weights (no copy when they were
        # quantized into one stacked buffer); transposed weights are the same view, strides swapped.
        w_data = stacked_view_or_copy([w.data for w in weights])
        w_scale = stacked_view_or_copy([w.scale_inv for w in weights])
        if transpose_weights:
            w_data, w_scale = w_data.transpose(1, 2), w_scale.transpose(1, 2)
        return grouped_gemm.grouped_rowwise_gemm(a.data, a.scale_inv, w_data, w_scale, groups, out)
    if transpose_weights:
        weights = [w.t() for w in weights]  # cuBLAS and the emulation take the exact transposed copies
    if backend == "emulated":
        with inside_gemm():  # the emulation's exact dequantization is the GEMM's arithmetic, not a cast
            x = ref.dequantize_rowwise(a.data, a.scale_inv)
            for (start, rows, _, _), w in zip(_group_bounds(groups), weights):
                if rows:
                    wd = ref.dequantize_weight(w.data, w.scale_inv)
                    out[start : start + rows] = (x[start : start + rows] @ wd.t()).to(out_dtype)
        return out
    bounds = _group_bounds(groups)
    _check_cublas_groups(bounds)
    # Every per-group operand is prepared by a few calls for all groups (the loop below only
    # issues the GEMMs): at 32 experts the host, not the GPU, would otherwise set the pace.
    sizes = [rows for _, rows, _, _ in bounds]
    with inside_gemm():
        _cublas_rowwise_groups(a, out, groups, sizes, weights, out_dtype)
    return out


def _cublas_rowwise_groups(a, out, groups, sizes, weights, out_dtype):
    w_data, w_scales = _cublas_weight_operands(weights) if weights else ((), ())
    for rows, a_part, a_scale, out_part, wd, ws in zip(
        sizes, torch.split(a.data, sizes), outer_major_group_scales(a.scale_inv, groups),
        torch.split(out, sizes), w_data, w_scales,
    ):
        if rows:
            _scaled_mm_blockwise(a_part, wd, a_scale, ws, out_dtype, out=out_part)
    return out


def grouped_wgrad(
    grad_col: BlockwiseFP8Tensor,
    x_col: BlockwiseFP8Tensor,
    accumulate_into: Optional[Sequence[torch.Tensor]] = None,
    backend: str = "auto",
    out_dtype: torch.dtype = torch.float32,
) -> List[torch.Tensor]:
    """``dW[g] = DQ(grad[g])^T @ DQ(x[g])`` in fp32 for every group, [N, K] each.

    Both operands are column-wise tensors over the same groups (``grad_col`` logical [M, N],
    ``x_col`` logical [M, K]). With ``accumulate_into`` the products are added to those fp32
    buffers (returned); empty groups leave them untouched (or give zeros). Without it each
    product is written once, in ``out_dtype`` (fp32 or bf16), with no separate zero-fill or add.
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
    _check_multiple("N", n)
    _check_multiple("K", k)
    backend = resolve_backend(backend, grad_col.device)
    dev = grad_col.device
    if out_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"grouped_wgrad writes fp32 or bf16, got {out_dtype}")
    accumulate = accumulate_into is not None
    outs = list(accumulate_into) if accumulate else [None] * len(sizes)
    if len(outs) != len(sizes):
        raise ValueError(f"{len(outs)} gradient buffers for {len(sizes)} groups")
    bounds = _group_bounds(grad_col.groups)
    if backend == "triton":
        from .kernels import grouped_gemm

        stacked = torch.empty(len(sizes), n, k, dtype=torch.float32 if accumulate else out_dtype, device=dev)
        grouped_gemm.grouped_wgrad(grad_col.data, grad_col.scale_inv, x_col.data, x_col.scale_inv,
                                   grad_col.groups, stacked, accumulate=False)
        for i, (_, rows, _, _) in enumerate(bounds):
            outs[i] = _store_product(outs[i], stacked[i] if rows else None, accumulate, (n, k), out_dtype, dev)
        return outs
    if backend == "emulated":
        with inside_gemm():
            g = ref.dequantize_colwise(grad_col.data, grad_col.scale_inv, sizes)
            x = ref.dequantize_colwise(x_col.data, x_col.scale_inv, sizes)
        for i, (start, rows, _, _) in enumerate(bounds):
            prod = g[start : start + rows].t() @ x[start : start + rows] if rows else None
            outs[i] = _store_product(outs[i], prod, accumulate, (n, k), out_dtype, dev)
        return outs
    _check_cublas_groups(bounds)
    sizes = [rows for _, rows, _, _ in bounds]
    scale_rows = [nb for _, _, _, nb in bounds]
    spare = grad_col.scale_inv.shape[0] - sum(scale_rows)  # column scales may be allocated with spare rows
    parts = zip(torch.split(grad_col.data, sizes, dim=1), torch.split(x_col.data, sizes, dim=1),
                torch.split(grad_col.scale_inv, scale_rows + [spare]), torch.split(x_col.scale_inv, scale_rows + [spare]))
    with inside_gemm():
        for i, (rows, (g_part, x_part, g_scale, x_scale)) in enumerate(zip(sizes, parts)):
            prod = None
            if rows:
                prod = torch._scaled_mm(g_part, x_part.t(), scale_a=g_scale.t(), scale_b=x_scale,
                                        out_dtype=torch.float32 if accumulate else out_dtype)
            outs[i] = _store_product(outs[i], prod, accumulate, (n, k), out_dtype, dev)
    return outs


def _store_product(buffer, prod, accumulate: bool, shape, out_dtype, device):
    """Add ``prod`` into ``buffer`` (accumulating) or return it as the result; an empty group
    (``prod`` None) leaves the buffer as it was, or gives zeros."""
    if accumulate:
        if prod is not None:
            buffer += prod
        return buffer
    if prod is None:
        return torch.zeros(shape, dtype=out_dtype, device=device)
    return prod.to(out_dtype)
