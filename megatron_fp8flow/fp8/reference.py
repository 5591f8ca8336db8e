"""Exact plain-PyTorch reference numerics for blockwise FP8.

These functions define the numerics; the Triton kernels must reproduce them bit for bit.
They run on any device and are written for clarity, not speed.

Semantics (every quantizer here):

* Block amax is the max of ``|x|`` over the *finite* elements of the block.
* Power-of-two scales (default): ``scale_inv = 2^e`` with ``e`` the smallest integer such that
  ``amax <= 448 * 2^e``, i.e. ``2^ceil(log2(amax/448))`` evaluated exactly (``amax/448`` is
  never rounded). ``e`` is clamped to ``>= -126`` so scales stay normal fp32 numbers.
* fp32 scales (``pow2_scales=False``): ``scale_inv = max(fl(amax / 448), 2^-126)``.
* A block with no finite non-zero element (all zeros, or only NaN/Inf) gets ``scale_inv = 1``.
* Codes: ``q = RNE_e4m3(fl(x / scale_inv))``: round to nearest, ties to even, E4M3 subnormals
  (multiples of 2^-9) kept, -0 kept. ``|x / scale_inv| <= 448`` by construction, so nothing
  saturates.
* NaN and +-Inf inputs become the NaN code 0x7F (E4M3FN has no infinity; an Inf is never
  turned into the finite value 448). They do not take part in the block's amax, so the other
  elements of the block keep their precision; dequantization yields NaN at those positions.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .format import (
    BLOCK,
    E4M3_MAX,
    FP8_DTYPE,
    MIN_SCALE,
    MIN_SCALE_EXP,
    NAN_CODE,
    ZERO_BLOCK_SCALE,
    BlockwiseFP8Tensor,
    ColStorage,
    Layout,
    cdiv,
    side_by_side_from_per_group,
)

__all__ = [
    "pow2_scale_exponent",
    "scale_inv_from_amax",
    "cast_to_e4m3",
    "e4m3_grid",
    "quantize_blocks",
    "quantize_rowwise",
    "quantize_colwise",
    "quantize_weight",
    "dequantize_rowwise",
    "dequantize_colwise",
    "dequantize_weight",
    "dequantize_tensor",
    "sat_tile",
]


def pow2_scale_exponent(amax: torch.Tensor) -> torch.Tensor:
    """Smallest integer ``e`` with ``amax <= 448 * 2^e`` (exact), for finite ``amax > 0``.

    Written with ``frexp`` (``amax = m * 2^k``, ``m`` in [0.5, 1)); since 448 = 0.875 * 2^9,
    ``amax <= 448 * 2^e`` iff ``e >= k - 9 + [m > 0.875]``. No clamping here.
    """
    mantissa, exponent = torch.frexp(amax.float())
    return exponent.to(torch.int32) - 9 + (mantissa > 0.875).to(torch.int32)


def _pow2(e: torch.Tensor) -> torch.Tensor:
    """2^e as fp32 for integer e in [-126, 127], built exactly from the exponent bits."""
    return ((e.to(torch.int32) + 127) << 23).view(torch.float32)


def scale_inv_from_amax(amax: torch.Tensor, pow2_scales: bool = True) -> torch.Tensor:
    """Dequantization scale for blocks with the given finite amax (see module docstring)."""
    amax = amax.float()
    if pow2_scales:
        e = pow2_scale_exponent(amax).clamp(min=MIN_SCALE_EXP)
        scale = _pow2(e)
    else:
        scale = torch.clamp(amax / E4M3_MAX, min=MIN_SCALE)
    return torch.where(amax > 0, scale, torch.full_like(scale, ZERO_BLOCK_SCALE))


def cast_to_e4m3(v: torch.Tensor) -> torch.Tensor:
    """RNE cast of fp32 values with ``|v| <= 448`` (or non-finite) to E4M3 codes.

    Non-finite values become the NaN code 0x7F (torch's own cast would saturate Inf to 448
    and keep the sign of NaN).
    """
    codes = v.float().to(FP8_DTYPE)
    nan = torch.full_like(codes.view(torch.uint8), NAN_CODE).view(FP8_DTYPE)
    return torch.where(torch.isfinite(v), codes, nan)


def e4m3_grid() -> torch.Tensor:
    """The 254 finite E4M3 values (+-0 included), as fp32, in code order (for tests)."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    vals = codes.view(FP8_DTYPE).float()
    return vals[torch.isfinite(vals)]


def _finite_abs(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x.abs(), torch.zeros_like(x))


def quantize_blocks(x: torch.Tensor, dim: int, pow2_scales: bool = True):
    """Quantize fp32 ``x`` whose ``dim`` indexes the elements of one block.

    Returns (codes shaped like x, scale_inv with ``dim`` reduced to size 1).
    """
    x = x.float()
    amax = _finite_abs(x).amax(dim=dim, keepdim=True)
    scale_inv = scale_inv_from_amax(amax, pow2_scales)
    return cast_to_e4m3(x / scale_inv), scale_inv


def _check_2d(x: torch.Tensor, what: str) -> None:
    if x.dim() != 2:
        raise ValueError(f"{what} expects a 2-D tensor, got shape {tuple(x.shape)}")


def quantize_rowwise(x: torch.Tensor, pow2_scales: bool = True):
    """1x128 blocks along the last dim: (data [M, K] e4m3, scale_inv [M, ceil(K/128)] fp32)."""
    _check_2d(x, "quantize_rowwise")
    m, k = x.shape
    nb = cdiv(k, BLOCK)
    xp = torch.zeros(m, nb * BLOCK, dtype=torch.float32, device=x.device)
    xp[:, :k] = x.float()
    q, s = quantize_blocks(xp.view(m, nb, BLOCK), dim=2, pow2_scales=pow2_scales)
    return q.view(m, nb * BLOCK)[:, :k].contiguous(), s.view(m, nb).contiguous()


def quantize_colwise(x: torch.Tensor, m_splits: Sequence[int], pow2_scales: bool = True):
    """1x128 blocks along the rows, restarting at each group of ``m_splits`` rows.

    Returns (data [K, M] e4m3 stored transposed, scale_inv [sum_g ceil(m_g/128), K] fp32).
    """
    _check_2d(x, "quantize_colwise")
    m, k = x.shape
    m_splits = [int(v) for v in m_splits]
    assert sum(m_splits) == m, "m_splits must sum to the number of rows"
    data_t = torch.empty(k, m, dtype=FP8_DTYPE, device=x.device)
    scales = []
    start = 0
    for mg in m_splits:
        nb = cdiv(mg, BLOCK)
        if nb:
            xp = torch.zeros(nb * BLOCK, k, dtype=torch.float32, device=x.device)
            xp[:mg] = x[start : start + mg].float()
            q, s = quantize_blocks(xp.view(nb, BLOCK, k), dim=1, pow2_scales=pow2_scales)
            data_t[:, start : start + mg] = q.view(nb * BLOCK, k)[:mg].t()
            scales.append(s.view(nb, k))
        start += mg
    if scales:
        scale_inv = torch.cat(scales, 0).contiguous()
    else:
        scale_inv = torch.empty(0, k, dtype=torch.float32, device=x.device)
    return data_t, scale_inv


def quantize_weight(w: torch.Tensor, pow2_scales: bool = True):
    """128x128 blocks: (data [N, K] e4m3, scale_inv [ceil(N/128), ceil(K/128)] fp32)."""
    _check_2d(w, "quantize_weight")
    n, k = w.shape
    nbn, nbk = cdiv(n, BLOCK), cdiv(k, BLOCK)
    wp = torch.zeros(nbn * BLOCK, nbk * BLOCK, dtype=torch.float32, device=w.device)
    wp[:n, :k] = w.float()
    tiles = wp.view(nbn, BLOCK, nbk, BLOCK)
    amax = _finite_abs(tiles).amax(dim=(1, 3), keepdim=True)
    scale_inv = scale_inv_from_amax(amax, pow2_scales)
    q = cast_to_e4m3(tiles / scale_inv)
    data = q.view(nbn * BLOCK, nbk * BLOCK)[:n, :k].contiguous()
    return data, scale_inv.view(nbn, nbk).contiguous()


def dequantize_rowwise(data: torch.Tensor, scale_inv: torch.Tensor, dtype=torch.float32):
    k = data.shape[1]
    s = scale_inv.float().repeat_interleave(BLOCK, dim=1)[:, :k]
    return (data.float() * s).to(dtype)


def dequantize_colwise(
    data_t: torch.Tensor, scale_inv: torch.Tensor, m_splits: Sequence[int], dtype=torch.float32
):
    k, m = data_t.shape
    out = torch.empty(m, k, dtype=dtype, device=data_t.device)
    start, srow = 0, 0
    for mg in m_splits:
        nb = cdiv(mg, BLOCK)
        if nb:
            s = scale_inv[srow : srow + nb].float().repeat_interleave(BLOCK, dim=0)[:mg]
            out[start : start + mg] = (data_t[:, start : start + mg].t().float() * s).to(dtype)
        start += mg
        srow += nb
    return out


def dequantize_weight(data: torch.Tensor, scale_inv: torch.Tensor, dtype=torch.float32):
    n, k = data.shape
    s = scale_inv.float().repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:n, :k]
    return (data.float() * s).to(dtype)


def dequantize_tensor(t: BlockwiseFP8Tensor, dtype=torch.float32) -> torch.Tensor:
    """``data * scale_inv`` of a tensor in any layout, in its logical orientation ([M, K];
    weights [N, K]); a column-wise tensor in either storage."""
    if t.layout == Layout.ROWWISE:
        return dequantize_rowwise(t.data, t.scale_inv, dtype)
    if t.layout == Layout.COLWISE:
        sizes = t.groups.host_sizes()
        data = t.data
        if t.col_storage == ColStorage.PER_GROUP:
            data = side_by_side_from_per_group(data, t.shape[1], sizes)
        return dequantize_colwise(data, t.scale_inv, sizes, dtype)
    return dequantize_weight(t.data, t.scale_inv, dtype)


def _holds_finite_nonzero(data: torch.Tensor, nbk: int) -> torch.Tensor:
    """[r, K] E4M3 codes -> [r, nbk]: whether each 1x128 block holds a finite non-zero code."""
    mag = data.view(torch.uint8) & 0x7F  # sign dropped: NaN is NAN_CODE either way
    hit = (mag != 0) & (mag != NAN_CODE)
    r, k = hit.shape
    padded = torch.zeros(r, nbk * BLOCK, dtype=torch.bool, device=data.device)
    padded[:, :k] = hit
    return padded.view(r, nbk, BLOCK).any(dim=2)


def sat_tile(data: torch.Tensor, scale_inv: torch.Tensor, m_splits: Sequence[int]):
    """Scaling-aware transpose with the tile-max scale (the paper's reference behaviour).

    For each 128-row block of a group and each 128-column block, ``S`` is the largest of the
    block's row scales that is finite and positive and whose 1x128 block holds a finite non-zero
    code (1 when there is none: an all-zero block's placeholder scale, 1, must not set the tile's
    scale, or a zero row, a padding row among them, would flush every other row), and every element
    is re-encoded as ``RNE_e4m3(q * (s_row / S))`` (an exact power-of-two factor, so only
    values that fall into the subnormal range round). Elements whose row scale is not finite,
    and NaN codes, become NaN. ``S`` is repeated over the 128 columns of its tile in the
    output scale tensor, which has the column-wise shape [sum_g ceil(m_g/128), K].
    """
    m, k = data.shape
    data_t = torch.empty(k, m, dtype=FP8_DTYPE, device=data.device)
    out_scales = []
    start = 0
    for mg in m_splits:
        for b0 in range(0, mg, BLOCK):
            rows = slice(start + b0, start + min(b0 + BLOCK, mg))
            s = scale_inv[rows].float()  # [r, nbk]
            usable = torch.isfinite(s) & (s > 0) & _holds_finite_nonzero(data[rows], s.shape[1])
            smax = torch.where(usable, s, torch.zeros_like(s)).amax(dim=0)
            smax = torch.where(smax > 0, smax, torch.full_like(smax, ZERO_BLOCK_SCALE))
            ratio = (s / smax).repeat_interleave(BLOCK, dim=1)[:, :k]
            v = data[rows].float() * ratio
            data_t[:, rows] = cast_to_e4m3(v).t()
            out_scales.append(smax.repeat_interleave(BLOCK)[:k].view(1, k))
        start += mg
    if out_scales:
        scales = torch.cat(out_scales, 0)
    else:
        scales = torch.empty(0, k, dtype=torch.float32, device=data.device)
    return data_t, scales.contiguous()
