"""Triton building blocks shared by the FP8 kernels: scales, E4M3 encode/decode, group lookup.

Every helper computes exactly what :mod:`megatron_fp8flow.fp8.reference` defines.

E4M3 casts have two implementations selected by the ``EMULATE`` constexpr:

* native (GPU, sm_89+): ``tl.float8e4nv`` conversion, i.e. ``cvt.rn.satfinite`` (RNE with
  subnormals; we never feed it anything outside [-448, 448] except NaN);
* emulated: integer arithmetic on the fp32 bits producing ``uint8`` codes. Used under
  ``TRITON_INTERPRET=1``, whose FP8 conversion rounds wrongly when rounding carries into the
  next binade (125.1 -> 64) and turns NaN into a finite code, and on GPUs without FP8
  conversion instructions. Kernels then read and write FP8 tensors through ``uint8`` views.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Smallest allowed scale exponent (scales stay normal fp32 numbers); see fp8.format.
MIN_SCALE_EXP = tl.constexpr(-126)
MIN_SCALE = tl.constexpr(2.0**-126)
E4M3_MAX = tl.constexpr(448.0)
NAN_CODE = tl.constexpr(0x7F)


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_cpu_path(*tensors: torch.Tensor) -> bool:
    """True for CPU tensors without the Triton interpreter: the data-movement and SwiGLU ops then
    run their plain-PyTorch forms (data movement bit-identical to the kernels, SwiGLU within the
    fp32 rounding of exp, division and the order of the dw sum), fast enough for CPU runs,
    which interpretation is not. Tests compare them with the kernels."""
    return not interpreter_active() and all(t is None or t.device.type == "cpu" for t in tensors)


def check_launchable(*tensors: torch.Tensor) -> None:
    """Triton runs on CUDA tensors, or on CPU tensors only under the interpreter: say so plainly."""
    for t in tensors:
        if t is not None:
            check_launchable_device(t.device)


def check_launchable_device(device: torch.device) -> None:
    if device.type != "cuda" and not interpreter_active():
        raise ValueError(
            f"the Triton kernels need CUDA tensors, got one on {device}; move the inputs to the GPU, "
            f"set TRITON_INTERPRET=1 to run the kernels on CPU (slow), or use backend='reference'"
        )


def needs_emulated_cast(device: torch.device) -> bool:
    """Whether kernels on ``device`` must use the integer E4M3 cast (see module docstring).
    Every FP8 kernel launcher asks this first, so it also refuses tensors Triton cannot reach."""
    check_launchable_device(device)
    if os.environ.get("FP8FLOW_EMULATE_FP8_CAST", "0") not in ("", "0"):
        return True
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) < (8, 9)


def fp8_view(t: torch.Tensor, emulate: bool) -> torch.Tensor:
    """The tensor a kernel should read/write FP8 codes through."""
    return t.view(torch.uint8) if emulate else t


@triton.jit
def pow2_exponent(a):
    """Smallest int e with a <= 448 * 2^e for finite normal fp32 a > 0 (448 = 1.75 * 2^8)."""
    bits = a.to(tl.int32, bitcast=True)
    return ((bits >> 23) & 0xFF) - 135 + ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)


@triton.jit
def exp2_int(e):
    """2^e as fp32 for int32 e in [-126, 127], exact."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def scale_exponent_from_amax(amax):
    """Exponent of the power-of-two scale of a block with finite amax (0 for an empty block)."""
    e = tl.maximum(pow2_exponent(amax), MIN_SCALE_EXP)
    return tl.where(amax > 0, e, 0)


@triton.jit
def scale_inv_from_amax(amax, POW2: tl.constexpr):
    if POW2:
        s = exp2_int(scale_exponent_from_amax(amax))
    else:
        s = tl.where(amax > 0, tl.maximum(tl.math.div_rn(amax, E4M3_MAX), MIN_SCALE), 1.0)
    return s


@triton.jit
def reciprocal_pow2(s):
    """1 / s exactly, for a power of two s = 2^e with e in [-126, 127)."""
    return ((254 << 23) - s.to(tl.int32, bitcast=True)).to(tl.float32, bitcast=True)


@triton.jit
def divide_by_scale(x, s, POW2: tl.constexpr):
    """fl(x / s); for power-of-two s a multiply by the exact reciprocal 2^-e."""
    if POW2:
        return x * reciprocal_pow2(s)
    else:
        return tl.math.div_rn(x, s)


@triton.jit
def encode_e4m3(v, EMULATE: tl.constexpr):
    """RNE cast of fp32 ``v`` (|v| <= 448, or NaN) to E4M3; NaN -> code 0x7F.

    Returns ``tl.float8e4nv`` values (native) or ``uint8`` codes (EMULATE).
    """
    if EMULATE:
        isnan = v != v
        bits = v.to(tl.int32, bitcast=True)
        sign = (bits >> 24) & 0x80
        a = tl.where(isnan, 0.0, tl.abs(v))
        # Subnormal range (|v| < 2^-6): the grid is 2^-9; adding 2^14 makes fp32 itself round
        # to that grid with ties to even (ulp(2^14) = 2^-9 in fp32).
        sub_code = (((a + 16384.0) - 16384.0) * 512.0).to(tl.int32)
        # Normal range: RNE of the 23-bit mantissa to 3 bits; a carry moves into the exponent.
        abits = a.to(tl.int32, bitcast=True)
        rn = abits + 0x7FFFF + ((abits >> 20) & 1)
        norm_code = ((rn >> 23) - 120) * 8 + ((rn >> 20) & 7)
        code = tl.where(a < 0.015625, sub_code, norm_code) | sign
        code = tl.where(isnan, NAN_CODE, code)
        return code.to(tl.uint8)
    else:
        # cvt.rn.satfinite gives a NaN code for NaN; normalize its sign to 0x7F.
        return tl.where(v != v, float("nan"), v).to(tl.float8e4nv)


@triton.jit
def decode_e4m3(q, EMULATE: tl.constexpr):
    """E4M3 codes (fp8 or uint8 when EMULATE) to exact fp32 values; NaN codes -> NaN."""
    if EMULATE:
        c = q.to(tl.int32)
        e = (c >> 3) & 0xF
        m = c & 7
        normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
        mag = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)
        mag = tl.where((c & 0x7F) == 0x7F, float("nan"), mag)
        # Sign through the bits: Triton negates as 0 - x, which would turn -0 into +0.
        return (mag.to(tl.int32, bitcast=True) | ((c & 0x80) << 24)).to(tl.float32, bitcast=True)
    else:
        return q.to(tl.float32)


@triton.jit
def is_finite(x):
    return tl.abs(x) < float("inf")


@triton.jit
def locate_block(bid, scale_row_offsets_ptr, row_offsets_ptr, num_groups, GROUPS_P2: tl.constexpr):
    """Map a global 128-row block index to (first row, rows in block) inside its group.

    ``scale_row_offsets`` holds the cumulative block counts per group and ``row_offsets`` the
    cumulative rows (G + 1 entries each; empty groups repeat a value). Both are read as one
    vector each (no chain of dependent loads); the group is the last g with
    scale_row_offsets[g] <= bid. Blocks past the end get 0 rows, so a launch sized by an
    upper bound needs no host sync.
    """
    _, row_start, rows = locate_block_group(bid, scale_row_offsets_ptr, row_offsets_ptr, num_groups, GROUPS_P2)
    return row_start, rows


@triton.jit
def locate_block_group(bid, scale_row_offsets_ptr, row_offsets_ptr, num_groups, GROUPS_P2: tl.constexpr):
    """:func:`locate_block` that also returns the group: (group, first row, rows in block)."""
    idx = tl.arange(0, GROUPS_P2)
    in_range = idx <= num_groups
    blk_offs = tl.load(scale_row_offsets_ptr + idx, mask=in_range, other=0x7FFFFFFF)
    row_offs = tl.load(row_offsets_ptr + idx, mask=in_range, other=0)
    total_blocks = tl.max(tl.where(in_range, blk_offs, 0), axis=0)
    g = tl.minimum(tl.sum((blk_offs <= bid).to(tl.int32), axis=0) - 1, num_groups - 1)
    first_block = tl.sum(tl.where(idx == g, blk_offs, 0), axis=0)
    row_start = tl.sum(tl.where(idx == g, row_offs, 0), axis=0) + (bid - first_block) * 128
    row_end = tl.sum(tl.where(idx == g + 1, row_offs, 0), axis=0)
    rows = tl.minimum(row_end - row_start, 128)
    rows = tl.where(bid < total_blocks, rows, 0)
    return g, row_start, rows


@triton.jit
def colwise_frame(g, row_offsets_ptr, M, K, PER_GROUP: tl.constexpr):
    """Where column-wise output element (k, row) goes: ``base + k * ld + row``.

    Side by side ([K, M]): base 0, ld M. Per group (group g's [K, m_g] block at K * start_g):
    base start_g * (K - 1), ld m_g.
    """
    if PER_GROUP:
        start = tl.load(row_offsets_ptr + g)
        end = tl.load(row_offsets_ptr + g + 1)
        return start.to(tl.int64) * (K - 1), end - start
    else:
        return (M * 0).to(tl.int64), M


def groups_p2(num_groups: int) -> int:
    """Vector width :func:`locate_block` needs for ``num_groups`` groups (G + 1 offsets)."""
    return triton.next_power_of_2(num_groups + 1)


@triton.jit
def encode_e4m3_x4(v0, v1, v2, v3, EMULATE: tl.constexpr):
    """RNE E4M3 codes of four fp32 tensors packed into one int32 (v0 in the low byte).

    Natively two ``cvt.rn.satfinite.e4m3x2.f32`` and a 32-bit move: the packed word comes
    straight from the conversion, with no 8-bit register shuffling.
    """
    if EMULATE:
        return (
            encode_e4m3(v0, EMULATE).to(tl.int32)
            | (encode_e4m3(v1, EMULATE).to(tl.int32) << 8)
            | (encode_e4m3(v2, EMULATE).to(tl.int32) << 16)
            | (encode_e4m3(v3, EMULATE).to(tl.int32) << 24)
        )
    else:
        # NaN of either sign -> +NaN, so the code is 0x7F.
        v0 = tl.where(v0 != v0, float("nan"), v0)
        v1 = tl.where(v1 != v1, float("nan"), v1)
        v2 = tl.where(v2 != v2, float("nan"), v2)
        v3 = tl.where(v3 != v3, float("nan"), v3)
        return tl.inline_asm_elementwise(
            """
            {
            .reg .b16 lo, hi;
            cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1;
            cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3;
            mov.b32 $0, {lo, hi};
            }
            """,
            "=r,f,f,f,f",
            [v0, v1, v2, v3],
            dtype=tl.int32,
            is_pure=True,
            pack=1,
        )


@triton.jit
def to_output_dtype(x, dtype: tl.constexpr, EMULATE: tl.constexpr):
    """fp32 -> ``dtype`` with round-to-nearest-even.

    The Triton interpreter truncates fp32 -> bf16; with EMULATE the rounding to the bf16 grid is
    done on the bits first, so the conversion itself is exact. On the GPU the conversion is RNE.
    """
    if EMULATE:
        if dtype == tl.bfloat16:
            bits = x.to(tl.int32, bitcast=True)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
            x = tl.where(x != x, x, rounded)
    return x.to(dtype)


@triton.jit
def quantize_tile(x, AXIS: tl.constexpr, POW2: tl.constexpr, EMULATE: tl.constexpr):
    """Block quantization of an fp32 tile: one scale per row (AXIS=1) or per column (AXIS=0).

    Returns (codes, scale_inv) with the semantics of ``fp8.reference.quantize_blocks``: amax over
    finite elements, non-finite inputs -> NaN code.
    """
    finite = is_finite(x)
    s = scale_inv_from_amax(tl.max(tl.where(finite, tl.abs(x), 0.0), axis=AXIS), POW2)
    if AXIS == 1:
        v = divide_by_scale(x, s[:, None], POW2)
    else:
        v = divide_by_scale(x, s[None, :], POW2)
    return encode_e4m3(tl.where(finite, v, float("nan")), EMULATE), s
