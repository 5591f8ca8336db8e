"""DeepGEMM backend (Hopper): every grouped product in one launch, DeepSeek's own FP8 kernels.

DeepGEMM (the ``deep_gemm`` module, deepseek-ai/DeepGEMM) implements exactly this recipe: 1x128
activation blocks, 128x128 weight blocks, fp32 promotion every 128 along K. It is optional:
``pip install --no-build-isolation deepinfer-gemm`` (builds against the installed torch; needs
nvcc >= 12.9 and a C++20 compiler), or upstream's ``install.sh``. Its kernels are compiled on
first use of each shape (a few seconds each, cached on disk).

* fprop / dgrad: ``m_grouped_fp8_gemm_nt_contiguous`` over the groups' cumulative row ends
  (the library's "psum" layout, ``GroupSplits.row_offsets[1:]``), groups padded to the library's
  contiguous-layout alignment (128 on SM90); B must be K-major, so dgrad takes the exact
  transposed weight copies. The kernel configuration is tuned for
  :func:`expected_rows_per_group`, not for the exact row count (see there).
  Activation scales are read MN-major and TMA-aligned; row-major ones are converted once per
  operand.
* wgrad: per-group contiguous column-wise operands (``ColStorage.PER_GROUP``, written so by
  the SAT). ``wgrad_method`` chooses among the candidates (BENCHMARKS.md has the measurements
  behind the rule in :meth:`DeepGemmBackend.choose_wgrad`):
  ``k_grouped`` (``k_grouped_fp8_gemm_nt_contiguous``, one launch, accumulating in place into
  one [G, N, K] fp32 buffer), ``dense`` (one ``fp8_gemm_nt`` per group with the 1D1D recipe,
  accumulating in place into each group's own fp32 buffer), ``cublas`` (one ``torch._scaled_mm``
  per group, written once in the output dtype).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from typing import List, Optional

import torch

from ..fp8.format import ColStorage, group_column_blocks, with_row_scale_layout
from . import cublas
from .contract import (GemmBackend, OperandLayouts, check_group_alignment, group_bounds, inside_gemm, stacked_view,
                       stacked_weights)

logger = logging.getLogger(__name__)

INSTALL_HINT = ("install DeepGEMM on a Hopper machine with `pip install --no-build-isolation deepinfer-gemm` "
                "(needs nvcc >= 12.9 and a C++20 compiler) or with upstream's install.sh "
                "(github.com/deepseek-ai/DeepGEMM)")
WGRAD_METHODS = ("auto", "k_grouped", "dense", "cublas")


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether the ``deep_gemm`` module can be imported (without importing it; asked once)."""
    return importlib.util.find_spec("deep_gemm") is not None


@functools.lru_cache(maxsize=None)
def library():
    try:
        import deep_gemm
    except ImportError as err:
        raise RuntimeError(f"gemm_backend='deepgemm' needs the deep_gemm module, which did not import ({err}); "
                           f"{INSTALL_HINT}; or use gemm_backend='auto'") from err
    logger.info("FP8 expert GEMMs run on DeepGEMM %s; its kernels compile on first use of each shape "
                "(a few seconds each, cached)", getattr(deep_gemm, "__version__", "?"))
    return deep_gemm


@functools.lru_cache(maxsize=None)
def alignment() -> int:
    """Rows every group must be padded to for the contiguous layouts (ask the library)."""
    return int(library().get_mk_alignment_for_contiguous_layout())


def mn_major_scales(scale: torch.Tensor) -> torch.Tensor:
    """[M, K/128] row-wise scales in DeepGEMM's TMA-aligned MN-major layout (strides (1, M
    rounded up to 4)): as they are when the producer wrote that layout, else one copy."""
    return with_row_scale_layout(scale, mn_major=True)


def expected_rows_per_group(total_rows: int, num_groups: int) -> int:
    """The rows per group DeepGEMM tunes an M-grouped kernel for: the mean, rounded up onto a
    ladder of four steps per octave in multiples of 128.

    DeepGEMM picks block sizes and clusters from the row count and JIT-builds a kernel for each
    pick (seconds). The exact count moves with the routing every step, so tuning for it costs a
    build whenever a new count lands on a new pick, well into a run; on the ladder a run settles
    on one or two picks per GEMM shape. The tuned-for count only steers the choice: every row is
    computed either way."""
    mean = -(-max(total_rows, 1) // max(num_groups, 1))
    if mean <= 128:
        return 128
    step = max(128, (1 << (mean.bit_length() - 1)) // 4)
    return -(-mean // step) * step


def grouped_rows_call_args(groups) -> dict:
    """The layout arguments of DeepGEMM's M-grouped contiguous GEMMs: cumulative row ends of
    the groups (already on the device, no per-row index to build) and the tuned-for row count."""
    return dict(grouped_layout=groups.row_offsets[1:], use_psum_layout=True,
                expected_m_for_psum_layout=expected_rows_per_group(groups.num_rows, groups.num_groups))


class DeepGemmBackend(GemmBackend):
    name = "deepgemm"

    def __init__(self, wgrad_method: str = "auto"):
        if wgrad_method not in WGRAD_METHODS:
            raise ValueError(f"unknown DeepGEMM wgrad method {wgrad_method!r}; expected one of {WGRAD_METHODS}")
        self.wgrad_method = wgrad_method

    def layouts(self, device):
        return OperandLayouts(group_alignment=alignment(), dgrad_weights="transposed",
                              colwise_storage=ColStorage.PER_GROUP, row_scales="mn_major")

    def check_device(self, device):
        library()
        if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
            where = device.type if device.type != "cuda" else "sm_%d%d" % torch.cuda.get_device_capability(device)
            raise RuntimeError(f"gemm_backend='deepgemm' runs on Hopper GPUs (sm_90), not on {where}; "
                               f"use gemm_backend='auto'")

    # -- fprop / dgrad ---------------------------------------------------------------------
    def fprop(self, a, weights, groups, out):
        sizes = groups.host_sizes()
        check_group_alignment(sizes, alignment(), self.name)
        if a.shape[0] == 0 or not weights:
            return out
        b, b_sf = stacked_weights(weights)
        d = out if out.dtype == torch.bfloat16 else torch.empty(out.shape, dtype=torch.bfloat16, device=out.device)
        with inside_gemm():
            library().m_grouped_fp8_gemm_nt_contiguous(
                (a.data, mn_major_scales(a.scale_inv)), (b, b_sf), d,
                **grouped_rows_call_args(groups))
        if d is not out:
            out.copy_(d)
        return out

    # -- wgrad -----------------------------------------------------------------------------
    def choose_wgrad(self, accumulate_into: Optional[List[torch.Tensor]], out_dtype) -> str:
        """The measured rule (BENCHMARKS.md, 'Weight-gradient candidates'): accumulating into
        fp32 buffers, the k-grouped kernel when the buffers form one [G, N, K] tensor, else the
        dense loop; writing once in the parameter dtype, per-group cuBLAS (the DeepGEMM kernels
        write fp32 only, and a second pass to convert costs more than they save)."""
        if self.wgrad_method != "auto":
            return self.wgrad_method
        if accumulate_into is None:
            return "cublas"
        return "k_grouped" if stacked_view(list(accumulate_into)) is not None else "dense"

    def wgrad(self, grad_col, x_col, groups, accumulate_into, out_dtype):
        method = self.choose_wgrad(accumulate_into, out_dtype)
        if method == "cublas":
            return cublas.CublasBackend().wgrad(grad_col, x_col, groups, accumulate_into, out_dtype)
        for t in (grad_col, x_col):
            if t.col_storage != ColStorage.PER_GROUP:
                raise ValueError("DeepGEMM's wgrad reads per-group column-wise operands "
                                 "(make them with storage='per_group')")
        bounds = group_bounds(groups)
        check_group_alignment([rows for _, rows, _, _ in bounds], alignment(), self.name)
        n, k = grad_col.shape[1], x_col.shape[1]
        dev = grad_col.device
        accumulate = accumulate_into is not None
        if accumulate:
            bufs = list(accumulate_into)
        else:  # the kernels accumulate only: start from zeros
            bufs = list(torch.zeros(len(bounds), n, k, dtype=torch.float32, device=dev).unbind(0))
        with inside_gemm():
            if method == "k_grouped":
                self._k_grouped(grad_col, x_col, bounds, bufs, n, k)
            else:
                self._dense(grad_col, x_col, bounds, bufs)
        if accumulate:
            return bufs
        return [b.to(out_dtype) for b in bufs]

    def _k_grouped(self, grad_col, x_col, bounds, bufs, n, k):
        """One launch over every group, in place (c is d). Empty groups go in too: the kernel
        skips a group of no rows and leaves its buffer as it was. The group count is compiled
        into the kernel, so launching over runs of non-empty groups instead would build a new
        kernel for every run length the routing produces."""
        if not any(rows for _, rows, _, _ in bounds):
            return
        d = stacked_view(bufs)
        if d is None:
            raise ValueError("the k-grouped wgrad accumulates into one [G, N, K] buffer; these are separate "
                             "(use wgrad_method='dense')")
        total_blocks = sum(nb for _, _, _, nb in bounds)
        ks = [rows for _, rows, _, _ in bounds]
        library().k_grouped_fp8_gemm_nt_contiguous(
            (grad_col.data[: n * sum(ks)], grad_col.scale_inv[:total_blocks].t()),
            (x_col.data[: k * sum(ks)], x_col.scale_inv[:total_blocks].t()),
            d, ks, x_col.groups.sizes_device, c=d)

    def _dense(self, grad_col, x_col, bounds, bufs):
        """One 1D1D GEMM per group, in place. The reduction length is the group's row count,
        which changes with the routing: ``compiled_dims="mn"`` keeps it a run-time argument
        (DeepGEMM's default compiles K in, one JIT build per distinct group size)."""
        lib = library()
        for (_, rows, srow, nb), g_part, x_part, buf in zip(
                bounds, group_column_blocks(grad_col), group_column_blocks(x_col), bufs):
            if rows:
                lib.fp8_gemm_nt((g_part, grad_col.scale_inv[srow: srow + nb].t()),
                                (x_part, x_col.scale_inv[srow: srow + nb].t()), buf, c=buf, recipe=(1, 1, 128),
                                compiled_dims="mn")
