"""Blockwise FP8 tensor formats: constants, layouts and the tensor container.

Everything in this package speaks FP8 E4M3 (``torch.float8_e4m3fn``, max finite 448, no
infinity, NaN code 0x7F) with one fp32 *dequantization* scale (``scale_inv``) per block:

* ``Layout.ROWWISE``: 1x128 blocks along the last dim. ``data`` [M, K], ``scale_inv`` [M, ceil(K/128)].
  The operand of fprop/dgrad GEMMs (reduction over K).
* ``Layout.COLWISE``: 1x128 blocks along the rows (tokens), blocks restart at every group
  (expert) boundary. ``data`` is stored transposed, in one of two storages
  (:class:`ColStorage`): ``side_by_side``, one [K, M] tensor with the groups' columns side by
  side, or ``per_group``, one contiguous [K, m_g] block per group, back to back (a flat
  [K * M] tensor; what a K-grouped GEMM reads). ``scale_inv`` is [sum_g ceil(m_g/128), K] in
  both. The operand of wgrad GEMMs (reduction over tokens).
* ``Layout.WEIGHT``: 128x128 blocks. ``data`` [N, K], ``scale_inv`` [ceil(N/128), ceil(K/128)].

The layout is carried explicitly by the container; nothing is ever inferred from shapes.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch

FP8_DTYPE = torch.float8_e4m3fn
E4M3_MAX = 448.0
BLOCK = 128
# Scales are clamped to the smallest normal fp32 so that no scale is ever an fp32 subnormal
# (GPUs may flush those to zero) and 1/scale never overflows.
MIN_SCALE_EXP = -126
MIN_SCALE = 2.0**MIN_SCALE_EXP
# Dequantization scale used for blocks with no finite non-zero value.
ZERO_BLOCK_SCALE = 1.0
# The single NaN code produced for any non-finite input (E4M3FN has no infinity).
NAN_CODE = 0x7F

SplitsLike = Union[Sequence[int], torch.Tensor, "GroupSplits"]


def _parse_choice(cls, value, what: str):
    """A member of the string enum ``cls`` from itself or its value, or an error naming the valid ones."""
    if isinstance(value, cls):
        return value
    try:
        return cls(value)
    except ValueError:
        valid = ", ".join(repr(v.value) for v in cls)
        raise ValueError(f"unknown {what} {value!r}; expected one of {valid}") from None


class ColStorage(str, enum.Enum):
    """How the transposed data of a column-wise tensor is stored (see the module docstring)."""

    SIDE_BY_SIDE = "side_by_side"
    PER_GROUP = "per_group"

    @classmethod
    def parse(cls, value: Union[str, "ColStorage"]) -> "ColStorage":
        return _parse_choice(cls, value, "column-wise storage")


class Layout(str, enum.Enum):
    """Block layout of a :class:`BlockwiseFP8Tensor`."""

    ROWWISE = "rowwise"
    COLWISE = "colwise"
    WEIGHT = "weight"

    @classmethod
    def parse(cls, value: Union[str, "Layout"]) -> "Layout":
        return _parse_choice(cls, value, "FP8 layout")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class GroupSplits:
    """Row counts of the groups (experts) of a column-wise tensor, on the host or the device.

    ``sizes`` is a Python list when the caller gave one (exact output shapes, validated sum).
    When the caller gave a device tensor, ``sizes`` is None and no host sync happens: the
    column-wise scale tensor is then allocated with ``scale_rows_capacity`` rows (an upper bound)
    and ``scale_row_offsets[g]`` (on the device) says where group g's scale rows start.
    """

    num_rows: int
    num_groups: int
    sizes: Optional[list]
    sizes_device: torch.Tensor  # int32 [G]
    row_offsets: torch.Tensor  # int32 [G + 1], cumulative rows
    scale_row_offsets: torch.Tensor  # int32 [G + 1], cumulative 128-row blocks
    scale_rows_capacity: int
    # A number every group size is known to be a multiple of (lets kernels use wider accesses).
    row_alignment: int = 1
    _row_group: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)

    def row_group_index(self) -> torch.Tensor:
        """int32 [M]: the group of every row, built once on the device (no host sync) and kept:
        the per-row layout M-grouped GEMMs read. Padding rows belong to their group (they are
        zero, so they contribute zeros)."""
        if self._row_group is None:
            dev = self.sizes_device.device
            self._row_group = torch.repeat_interleave(
                torch.arange(self.num_groups, device=dev, dtype=torch.int32), self.sizes_device.long(),
                output_size=self.num_rows)
        return self._row_group

    @property
    def exact(self) -> bool:
        return self.sizes is not None

    def host_sizes(self) -> list:
        """Group sizes on the host (synchronizes when they live only on the device)."""
        if self.sizes is not None:
            return list(self.sizes)
        return [int(v) for v in self.sizes_device.tolist()]

    @classmethod
    def build(
        cls, m_splits: SplitsLike, num_rows: int, device: torch.device, row_alignment: int = 1
    ) -> "GroupSplits":
        """Group metadata; ``row_alignment`` declares that device-side sizes are multiples of it."""
        if isinstance(m_splits, GroupSplits):
            if m_splits.num_rows != num_rows:
                raise ValueError(f"GroupSplits covers {m_splits.num_rows} rows but the tensor has {num_rows}")
            return m_splits
        if isinstance(m_splits, torch.Tensor):
            if m_splits.dim() != 1 or m_splits.dtype.is_floating_point or m_splits.dtype == torch.bool:
                raise ValueError(
                    f"m_splits tensor must be 1-D with an integer dtype, got shape "
                    f"{tuple(m_splits.shape)} and dtype {m_splits.dtype}"
                )
            if m_splits.device.type == "cpu":
                # A host tensor costs no sync to read: treat it like a list.
                return cls.build(m_splits.tolist(), num_rows, device)
            sizes_dev = m_splits.to(device=device, dtype=torch.int32)
            g = sizes_dev.numel()
            zero = torch.zeros(1, dtype=torch.int32, device=device)
            row_offsets = torch.cat([zero, torch.cumsum(sizes_dev, 0, dtype=torch.int32)])
            blocks = torch.div(sizes_dev + (BLOCK - 1), BLOCK, rounding_mode="floor")
            scale_offsets = torch.cat([zero, torch.cumsum(blocks, 0, dtype=torch.int32)])
            # sum_g ceil(m_g/128) <= floor((M + 127 G) / 128)
            capacity = (num_rows + (BLOCK - 1) * g) // BLOCK
            return cls(num_rows, g, None, sizes_dev, row_offsets, scale_offsets, capacity, row_alignment)

        sizes = [int(v) for v in m_splits]
        if any(v < 0 for v in sizes):
            raise ValueError(f"m_splits must be non-negative, got {sizes}")
        if sum(sizes) != num_rows:
            raise ValueError(
                f"m_splits must sum to the number of rows: sum({len(sizes)} splits) = "
                f"{sum(sizes)} but the tensor has {num_rows} rows"
            )
        rows, blocks = [0], [0]
        for v in sizes:
            rows.append(rows[-1] + v)
            blocks.append(blocks[-1] + cdiv(v, BLOCK))
        sizes_dev, rows_dev, blocks_dev = host_ints_to_device([sizes, rows, blocks], device)
        alignment = math.gcd(*sizes, BLOCK) if sizes else BLOCK
        return cls(num_rows, len(sizes), sizes, sizes_dev, rows_dev, blocks_dev, blocks[-1], alignment)


def empty_row_scales(m: int, kb: int, device, mn_major: bool = False) -> torch.Tensor:
    """[M, KB] fp32 row-wise scales: row-major, or MN-major (strides (1, M rounded up to 4):
    the TMA-aligned layout DeepGEMM reads), so kernels write the layout their consumer reads."""
    if not mn_major:
        return torch.empty(m, kb, dtype=torch.float32, device=device)
    ld = cdiv(m, 4) * 4
    return torch.empty(kb, ld, dtype=torch.float32, device=device)[:, :m].t()


def with_row_scale_layout(scale: torch.Tensor, mn_major: bool) -> torch.Tensor:
    """``scale`` in the asked layout: itself when it already is, else one copy."""
    m, kb = scale.shape
    if mn_major:
        if scale.stride(0) == 1 and scale.stride(1) == cdiv(m, 4) * 4:
            return scale
    elif scale.is_contiguous():
        return scale
    out = empty_row_scales(m, kb, scale.device, mn_major)
    out.copy_(scale)
    return out


def host_ints_to_device(lists, device) -> list:
    """int32 device copies of host lists in one copy that does not wait for the GPU: a plain
    ``torch.tensor(..., device="cuda")`` synchronizes the stream, which would stall the host
    (and its run-ahead of the GPU) once per MoE layer. Pinned memory makes the copy asynchronous."""
    device = torch.device(device)
    flat = [v for vals in lists for v in vals]
    pin = device.type == "cuda"
    host = torch.tensor(flat, dtype=torch.int32, pin_memory=pin)
    dev = host.to(device, non_blocking=pin)
    return list(torch.split(dev, [len(vals) for vals in lists]))


@dataclass
class BlockwiseFP8Tensor:
    """FP8 E4M3 data plus fp32 dequantization scales in an explicit block layout.

    Attributes:
        data: ``torch.float8_e4m3fn`` codes, laid out as the layout says (``COLWISE`` is stored
            transposed, [K, M]).
        scale_inv: fp32 dequantization multipliers, one per block (see :mod:`.format`).
        layout: the block layout.
        shape: the logical (untransposed) shape [M, K] (weights: [N, K]).
        pow2_scales: whether every scale is an exact power of two (required by the
            scaling-aware transpose).
        groups: row groups of a ``COLWISE`` tensor, else None.
        col_storage: how a ``COLWISE`` tensor's data is stored (:class:`ColStorage`).
    """

    data: torch.Tensor
    scale_inv: torch.Tensor
    layout: Layout
    shape: tuple
    pow2_scales: bool = True
    groups: Optional[GroupSplits] = field(default=None, repr=False)
    col_storage: ColStorage = ColStorage.SIDE_BY_SIDE

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def m_splits(self) -> Optional[list]:
        return None if self.groups is None else self.groups.sizes

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Return ``data * scale_inv`` in the logical [M, K] orientation.

        Exact in fp32 (an E4M3 value times a power of two is representable); for ``COLWISE`` the
        result is transposed back to [M, K]. Runs ``fp8.dequantize`` (a kernel where one runs,
        counted by the cast audit), which :mod:`.api` installs here (see :func:`set_dequantizer`).
        """
        return _dequantizer(self, dtype)

    def t(self) -> "BlockwiseFP8Tensor":
        """Exact transposed copy of a ``WEIGHT`` tensor: bytes and scales transposed.

        128x128 blocks map to 128x128 blocks under transposition, so no value changes.
        """
        if self.layout != Layout.WEIGHT:
            raise ValueError(
                f".t() is defined for the 128x128 'weight' layout only, this tensor is "
                f"{self.layout.value!r}; use fp8.scaling_aware_transpose for activations"
            )
        n, k = self.shape
        return BlockwiseFP8Tensor(
            data=self.data.t().contiguous(),
            scale_inv=self.scale_inv.t().contiguous(),
            layout=Layout.WEIGHT,
            shape=(k, n),
            pow2_scales=self.pow2_scales,
        )

    def __repr__(self) -> str:
        return (
            f"BlockwiseFP8Tensor(layout={self.layout.value}, shape={tuple(self.shape)}, "
            f"data={tuple(self.data.shape)}, scale_inv={tuple(self.scale_inv.shape)}, "
            f"pow2_scales={self.pow2_scales}, device={self.device})"
        )


def _reference_dequantize(t: BlockwiseFP8Tensor, dtype: torch.dtype) -> torch.Tensor:
    from .reference import dequantize_tensor  # imported here: the reference imports this module

    return dequantize_tensor(t, dtype)


# What BlockwiseFP8Tensor.dequantize runs. The format does not import the API above it: the API
# installs its dequantize when it is imported (the package ``megatron_fp8flow.fp8`` imports it
# before any of its modules is used); until then the reference, which gives the same bits.
_dequantizer: Callable[[BlockwiseFP8Tensor, torch.dtype], torch.Tensor] = _reference_dequantize


def set_dequantizer(fn: Callable[[BlockwiseFP8Tensor, torch.dtype], torch.Tensor]) -> None:
    """Make :meth:`BlockwiseFP8Tensor.dequantize` run ``fn(tensor, dtype)``."""
    global _dequantizer
    _dequantizer = fn


def group_column_blocks(t: BlockwiseFP8Tensor) -> list:
    """Each group's transposed data [K, m_g] of a column-wise tensor, as views, in either
    storage (host group sizes: may synchronize when they live only on the device)."""
    if t.layout != Layout.COLWISE:
        raise ValueError(f"group_column_blocks needs a 'colwise' tensor, got {t.layout.value!r}")
    m, k = t.shape
    sizes = t.groups.host_sizes()
    views, start = [], 0
    for rows in sizes:
        if t.col_storage == ColStorage.PER_GROUP:
            views.append(t.data[k * start: k * (start + rows)].view(k, rows))
        else:
            views.append(t.data[:, start: start + rows])
        start += rows
    return views


def per_group_from_side_by_side(data_t: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Reference re-layout: [K, M] side-by-side column-wise data -> flat per-group storage."""
    k = data_t.shape[0]
    parts, start = [], 0
    for rows in sizes:
        parts.append(data_t[:, start: start + rows].reshape(-1))
        start += int(rows)
    if not parts:
        return data_t.new_empty(0)
    out = torch.cat([p.view(torch.uint8) for p in parts]).view(data_t.dtype)
    assert out.numel() == k * start
    return out


def side_by_side_from_per_group(flat: torch.Tensor, k: int, sizes: Sequence[int]) -> torch.Tensor:
    """Reference re-layout: flat per-group column-wise data -> [K, M] side by side."""
    parts, start = [], 0
    for rows in sizes:
        parts.append(flat[k * start: k * (start + int(rows))].view(torch.uint8).view(k, int(rows)))
        start += int(rows)
    if not parts:
        return flat.new_empty(k, 0)
    return torch.cat(parts, dim=1).view(flat.dtype)
