"""Blockwise FP8 grouped GEMMs: the emulated backend against fp64 products of the exactly
dequantized operands (fp32-accumulation bound), and cuBLAS against emulation on Hopper."""

import pytest
import torch

from megatron_fp8flow import fp8, gemm

from conftest import HAS_CUDA, make_activations

HOPPER = HAS_CUDA and torch.cuda.get_device_capability()[0] == 9
SPLITS = [0, 130, 16, 200, 0]
K, N = 256, 384


def _weights(n, k, count, seed):
    return [fp8.quantize_weight(make_activations(n, k, "outlier", seed=seed + i)) for i in range(count)]


def _fp32_bound(a64, b64):
    """Worst-case fp32 accumulation error of a @ b^T over the reduction dim r: r * 2^-23 * |a||b|^T."""
    return a64.shape[1] * 2.0**-23 * (a64.abs() @ b64.abs().t()) + 1e-30


def test_rowwise_gemm_emulated_matches_fp64():
    a = fp8.quantize(make_activations(sum(SPLITS), K, "heavy", seed=1), backend="reference")
    ws = _weights(N, K, len(SPLITS), seed=10)
    out = gemm.grouped_rowwise_gemm(a, ws, SPLITS, out_dtype=torch.float32, backend="emulated")
    x = a.dequantize().double()
    start = 0
    for m, w in zip(SPLITS, ws):
        if m:
            wd = w.dequantize().double()
            exp = x[start : start + m] @ wd.t()
            assert ((out[start : start + m].double() - exp).abs() <= _fp32_bound(x[start : start + m], wd)).all()
        start += m
    # dgrad uses the exact transposed weights: same function with w.t().
    g = fp8.quantize(make_activations(sum(SPLITS), N, "gaussian", seed=2), backend="reference")
    dx = gemm.grouped_rowwise_gemm(g, [w.t() for w in ws], SPLITS, out_dtype=torch.float32, backend="emulated")
    assert dx.shape == (sum(SPLITS), K)


def test_wgrad_emulated_matches_fp64_and_accumulates():
    m = sum(SPLITS)
    g_row = fp8.quantize(make_activations(m, N, "heavy", seed=3), backend="reference")
    x_row = fp8.quantize(make_activations(m, K, "gaussian", seed=4), backend="reference")
    g_col = fp8.scaling_aware_transpose(g_row, SPLITS, backend="reference")
    x_col = fp8.scaling_aware_transpose(x_row, SPLITS, backend="reference")
    main = [torch.full((N, K), 0.5) for _ in SPLITS]
    outs = gemm.grouped_wgrad(g_col, x_col, accumulate_into=main, backend="emulated")
    assert outs[0] is main[0] and torch.equal(outs[0], torch.full((N, K), 0.5))  # empty group
    gd, xd = g_col.dequantize().double(), x_col.dequantize().double()
    start = 0
    for m_g, o in zip(SPLITS, outs):
        if m_g:
            a, b = gd[start : start + m_g].t(), xd[start : start + m_g].t()
            exp = a @ b.t() + 0.5
            assert ((o.double() - exp).abs() <= _fp32_bound(a, b) + 2.0**-24).all()
        start += m_g
    # Without buffers: fresh products (zeros for the empty group), fp32 or rounded once to bf16.
    fresh = gemm.grouped_wgrad(g_col, x_col, backend="emulated")
    half = gemm.grouped_wgrad(g_col, x_col, backend="emulated", out_dtype=torch.bfloat16)
    for m_g, o, f, h in zip(SPLITS, outs, fresh, half):
        assert f.dtype == torch.float32 and h.dtype == torch.bfloat16 and f.shape == (N, K)
        assert torch.equal(h, f.bfloat16())
        if m_g:
            assert torch.equal(f + 0.5, o)
        else:
            assert torch.count_nonzero(f) == 0
    with pytest.raises(ValueError, match="fp32 or bf16"):
        gemm.grouped_wgrad(g_col, x_col, backend="emulated", out_dtype=torch.float16)


def test_gemm_errors():
    a = fp8.quantize(torch.randn(32, 200), backend="reference")
    with pytest.raises(ValueError, match="K % 128 == 0"):
        gemm.grouped_rowwise_gemm(a, [], [32], backend="emulated")
    a = fp8.quantize(torch.randn(32, 256), backend="reference")
    with pytest.raises(ValueError, match="2 weights for 1 groups"):
        gemm.grouped_rowwise_gemm(a, _weights(128, 256, 2, 0), [32], backend="emulated")
    with pytest.raises(ValueError, match="unknown GEMM backend"):
        gemm.grouped_rowwise_gemm(a, _weights(128, 256, 1, 0), [32], backend="tensorcore")
    if not HAS_CUDA:
        with pytest.raises(RuntimeError, match="needs CUDA tensors"):
            gemm.grouped_rowwise_gemm(a, _weights(128, 256, 1, 0), [32], backend="cublas")


def _cublas_or_refused(product, k):
    """PyTorch without padded blockwise scales cannot take K % 512 != 0: then a clear refusal
    (None here), never a wrong result."""
    if (k // 128) % 4 == 0:
        return product()
    try:
        return product()
    except ValueError as err:
        assert "K % 512 == 0" in str(err)
        return None


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="cuBLAS blockwise FP8 GEMMs need a Hopper GPU")
@pytest.mark.parametrize("k, n", [(512, 384), (128, 256), (384, 128)])  # K/128 not a multiple of 4 too
def test_cublas_matches_emulation_on_hopper(k, n):
    splits = [0, 256, 16, 48, 128, 512]  # 16 and 48: partial 1x128 blocks along tokens in wgrad
    dev = torch.device("cuda")
    a = fp8.quantize(make_activations(sum(splits), k, "heavy", seed=5).to(dev))
    ws = [fp8.quantize_weight(make_activations(n, k, "outlier", seed=20 + i).to(dev)) for i in range(len(splits))]
    g_col = fp8.scaling_aware_transpose(fp8.quantize(make_activations(sum(splits), n, seed=6).to(dev)), splits)
    x_col = fp8.scaling_aware_transpose(a, splits)
    f = gemm.grouped_wgrad(g_col, x_col, backend="cublas")
    s = gemm.grouped_wgrad(g_col, x_col, backend="emulated")
    for a_, b_ in zip(f, s):
        assert torch.linalg.norm(a_ - b_) <= 1e-3 * torch.linalg.norm(b_) + 1e-30
    odd = [0, 256, 8, 56, 128, 512]
    with pytest.raises(ValueError, match="multiple of 16.*group 2 has 8 rows"):
        gemm.grouped_rowwise_gemm(a, ws, odd, backend="cublas")
    with pytest.raises(ValueError, match="multiple of 16"):
        gemm.grouped_wgrad(fp8.scaling_aware_transpose(a, odd), fp8.scaling_aware_transpose(a, odd), backend="cublas")
    fast = _cublas_or_refused(lambda: gemm.grouped_rowwise_gemm(a, ws, splits, out_dtype=torch.float32, backend="cublas"), k)
    if fast is None:
        return
    slow = gemm.grouped_rowwise_gemm(a, ws, splits, out_dtype=torch.float32, backend="emulated")
    assert torch.linalg.norm(fast - slow) <= 1e-3 * torch.linalg.norm(slow)
    dy = fp8.quantize(make_activations(sum(splits), n, seed=7).to(dev))
    dgrad = _cublas_or_refused(
        lambda: gemm.grouped_rowwise_gemm(dy, [w.t() for w in ws], splits, out_dtype=torch.float32, backend="cublas"), n)
    if dgrad is None:
        return
    dgrad_ref = gemm.grouped_rowwise_gemm(dy, [w.t() for w in ws], splits, out_dtype=torch.float32, backend="emulated")
    assert torch.linalg.norm(dgrad - dgrad_ref) <= 1e-3 * torch.linalg.norm(dgrad_ref)
