"""The reference numerics against independent definitions (not against themselves)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_fp8flow import fp8
from megatron_fp8flow.fp8 import reference as ref

from conftest import assert_bits_equal, codes, make_activations

GRID = ref.e4m3_grid()  # finite values, code order


def nearest_even_oracle(v: torch.Tensor) -> torch.Tensor:
    """E4M3 code of the nearest finite grid value, ties to the even code; by brute force in fp64."""
    vals = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fp8.FP8_DTYPE).double()
    finite = torch.isfinite(vals)
    cand_codes = torch.arange(256)[finite]
    cand = vals[finite]
    d = (v.double()[:, None] - cand[None, :]).abs()
    best = d.min(dim=1, keepdim=True).values
    is_best = d == best
    # Among the (at most two) nearest values, prefer the even mantissa (even code); for +-0 the
    # sign of v decides.
    even = (cand_codes % 2 == 0)[None, :]
    pick_even = is_best & even
    choice = torch.where(pick_even.any(1, keepdim=True), pick_even, is_best)
    sign_ok = (cand_codes[None, :] >= 128) == (torch.signbit(v)[:, None])
    zero = cand[None, :] == 0
    choice = choice & (~zero | sign_ok)
    return cand_codes[choice.float().argmax(1)].to(torch.uint8)


def test_cast_matches_round_to_nearest_even_oracle():
    g = torch.Generator().manual_seed(1)
    # Dense random values over the whole range, plus exact midpoints (ties) and the subnormal range.
    rand = (torch.rand(20000, generator=g) * 2 - 1) * torch.exp2(torch.randint(-12, 9, (20000,), generator=g).float())
    mids = (GRID[:-1] + GRID[1:]) / 2
    mids = mids[(GRID[:-1] >= 0) & (GRID[1:] > GRID[:-1])]
    tiny = torch.linspace(-2.0**-6, 2.0**-6, 4097)
    v = torch.cat([rand, mids, -mids, tiny, torch.tensor([0.0, -0.0, 448.0, -448.0])]).clamp(-448, 448)
    got = codes(ref.cast_to_e4m3(v))
    assert_bits_equal(got, nearest_even_oracle(v), "RNE cast")
    # The ties really are ties, and some land on odd neighbours' even side.
    assert mids.numel() > 100


def test_cast_nonfinite_is_nan_code():
    v = torch.tensor([float("nan"), -float("nan"), float("inf"), -float("inf")])
    assert codes(ref.cast_to_e4m3(v)).tolist() == [fp8.NAN_CODE] * 4


@settings(max_examples=300, deadline=None)
@given(st.floats(min_value=2.0**-149, max_value=3.4028234663852886e38, allow_nan=False, allow_infinity=False, width=32))
def test_pow2_scale_is_smallest_power_of_two_that_fits(amax):
    e = int(ref.pow2_scale_exponent(torch.tensor([amax], dtype=torch.float32))[0])
    exact = float(torch.tensor(amax, dtype=torch.float32))
    assert exact <= 448.0 * math.ldexp(1.0, e)
    assert exact > 448.0 * math.ldexp(1.0, e - 1)


def test_scale_semantics_zero_clamp_fp32():
    amax = torch.tensor([0.0, 448.0, 449.0, 1.0, 1e-45, 3.0e38])
    s = ref.scale_inv_from_amax(amax, pow2_scales=True)
    assert s.tolist() == [1.0, 1.0, 2.0, 2.0**-8, 2.0**-126, 2.0**120]
    s32 = ref.scale_inv_from_amax(amax, pow2_scales=False)
    assert s32[0] == 1.0 and s32[4] == 2.0**-126
    assert s32[2] == torch.tensor(449.0) / 448.0


@pytest.mark.parametrize("pow2", [True, False])
@pytest.mark.parametrize("kind", ["gaussian", "heavy", "outlier"])
def test_rowwise_error_bound(kind, pow2):
    """|x - dq(q(x))| <= max(2^-4 |x|, 2^-10 s): half an E4M3 ulp (normal) or half the subnormal step."""
    x = make_activations(130, 300, kind, seed=3)
    q = fp8.quantize(x, pow2_scales=pow2, backend="reference")
    s = q.scale_inv.repeat_interleave(128, 1)[:, :300]
    err = (q.dequantize() - x).abs()
    bound = torch.maximum(x.abs() * 2.0**-4, s * 2.0**-10)
    assert (err <= bound * (1 + 1e-6)).all()
    # Every block uses its range: max |code value| in (224, 448] with pow2 scales.
    qv = q.data.float().abs().view(130, -1)
    if pow2:
        assert (qv.amax(1) >= 224).all() and (qv.amax(1) <= 448).all()


def test_nan_inf_policy_keeps_rest_of_block():
    x = torch.randn(2, 256)
    ref_q = fp8.quantize(x, backend="reference")
    x2 = x.clone()
    x2[0, 3] = float("nan")
    x2[1, 200] = float("inf")
    x2[1, 201] = -float("inf")
    q = fp8.quantize(x2, backend="reference")
    c, c0 = codes(q.data), codes(ref_q.data)
    assert c[0, 3] == fp8.NAN_CODE and c[1, 200] == fp8.NAN_CODE and c[1, 201] == fp8.NAN_CODE
    mask = torch.ones_like(c, dtype=torch.bool)
    mask[0, 3] = mask[1, 200] = mask[1, 201] = False
    # Other codes are unchanged unless the removed element was the block's amax.
    same_scale = q.scale_inv == ref_q.scale_inv
    rows_blocks = same_scale.repeat_interleave(128, 1)
    assert torch.equal(c[mask & rows_blocks], c0[mask & rows_blocks])
    d = q.dequantize()
    assert d[0, 3].isnan() and d[1, 200].isnan() and d[1, 201].isnan()
    assert torch.isfinite(q.scale_inv).all()


def test_all_nonfinite_block_and_zero_block():
    x = torch.zeros(3, 128)
    x[1] = float("nan")
    x[2] = float("inf")
    q = fp8.quantize(x, backend="reference")
    assert q.scale_inv.flatten().tolist() == [1.0, 1.0, 1.0]
    assert (codes(q.data[0]) == 0).all() and (codes(q.data[1:]) == fp8.NAN_CODE).all()


def test_colwise_is_rowwise_of_transpose_per_group():
    x = make_activations(300, 256, "heavy", seed=5)
    splits = [0, 129, 0, 171]
    c = fp8.quantize(x, "colwise", m_splits=splits, backend="reference")
    assert c.data.shape == (256, 300) and c.scale_inv.shape == (2 + 2, 256)
    start, srow = 0, 0
    for m in splits:
        if m:
            r = fp8.quantize(x[start : start + m].t().contiguous(), backend="reference")
            assert_bits_equal(c.data[:, start : start + m], r.data)
            nb = -(-m // 128)
            assert_bits_equal(c.scale_inv[srow : srow + nb], r.scale_inv.t())
            srow += nb
        start += m


def test_weight_blocks_and_exact_transpose():
    w = make_activations(200, 330, "outlier", seed=7)
    q = fp8.quantize_weight(w, backend="reference")
    assert q.data.shape == (200, 330) and q.scale_inv.shape == (2, 3)
    qt = q.t()
    assert qt.shape == (330, 200)
    assert_bits_equal(qt.data, q.data.t().contiguous())
    assert torch.equal(qt.dequantize(), q.dequantize().t())
    # The same block through quantize_weight of the transposed weight gives the same codes.
    assert_bits_equal(fp8.quantize_weight(w.t().contiguous(), backend="reference").data, qt.data)


@pytest.mark.parametrize("kind", ["gaussian", "heavy", "wide"])
def test_requantization_adds_no_error_with_pow2_scales(kind):
    """DQ(Q(DQ(Q(x)))) == DQ(Q(x)): with pow2 scales the second rounding is exact.

    The codes may still differ: a block whose max rounds down to 224 gets half the scale the
    second time (same values, other encoding); everywhere else codes are identical.
    """
    x = make_activations(64, 512, kind, seed=11)
    q = fp8.quantize(x, backend="reference")
    q2 = fp8.quantize(q.dequantize(), backend="reference")
    assert torch.equal(q2.dequantize(), q.dequantize())
    same = (q2.scale_inv == q.scale_inv).repeat_interleave(128, 1)
    assert_bits_equal(codes(q2.data)[same], codes(q.data)[same])
    halved = q2.scale_inv < q.scale_inv
    assert torch.equal(q2.scale_inv[halved] * 2, q.scale_inv[halved])


def test_sat_tile_reference_definition():
    """sat_tile on a single tile by hand: shift by log2(s_row / max s_row), round subnormals RNE."""
    x = make_activations(128, 128, "wide", seed=2)
    q = fp8.quantize(x, backend="reference")
    data_t, scale_t = ref.sat_tile(q.data, q.scale_inv, [128])
    smax = q.scale_inv.max()
    assert (scale_t == smax).all()
    expected = (q.data.float() * (q.scale_inv / smax)).to(fp8.FP8_DTYPE)
    assert_bits_equal(data_t, expected.t().contiguous())


def test_cast_audit_counts_plugin_casts_and_foreign_conversions():
    """The audit counts the API's casts by kind, and any other FP8 conversion as 'other'; a
    GEMM-like product of FP8-derived values or an FP8 -> FP8 transpose is not a cast."""
    from megatron_fp8flow.fp8.audit import cast_audit

    x = torch.randn(64, 256).bfloat16()
    q = fp8.quantize(x)
    with cast_audit() as audit:
        q2 = fp8.quantize(x)
        fp8.scaling_aware_transpose(q2, [32, 32])
        q2.dequantize(torch.bfloat16)
        fp8.quantize_row_and_col(x, [64])
        x.to(torch.float8_e4m3fn)  # someone else's cast
        q.data.float() * 2.0  # also a conversion (e4m3 -> fp32)
    assert audit.counts["quantize"] == 3 and audit.counts["dequantize"] == 1
    assert audit.counts["transpose"] == 1 and audit.counts["other"] == 2
    assert audit.explicit == 6
    with pytest.raises(RuntimeError, match="do not nest"):
        with cast_audit(), cast_audit():
            pass


def test_tensor_dequantize_runs_the_api_and_the_format_fallback_is_exact():
    """``BlockwiseFP8Tensor.dequantize`` is the API's dequantize (a kernel where one runs, counted
    as a cast), installed by the API since the format does not import it; the format's own
    fallback, the reference, gives the same bits in every layout and storage."""
    from megatron_fp8flow.fp8 import audit
    from megatron_fp8flow.fp8 import format as fmt

    assert fmt._dequantizer is fp8.dequantize
    x = make_activations(300, 256, kind="outlier", seed=3)
    tensors = [fp8.quantize(x, backend="reference"), fp8.quantize_weight(x, backend="reference")]
    tensors += [fp8.quantize(x, "colwise", m_splits=[100, 0, 200], col_storage=storage, backend="reference")
                for storage in ("side_by_side", "per_group")]
    for t in tensors:
        for dtype in (torch.float32, torch.bfloat16):
            assert_bits_equal(t.dequantize(dtype), fmt._reference_dequantize(t, dtype), t.layout.value)
    with audit.cast_audit() as counts:
        tensors[0].dequantize(torch.bfloat16)
    assert counts.as_dict() == {"dequantize": 1}
