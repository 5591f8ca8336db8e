"""Blockwise FP8 grouped GEMMs: the emulated backend against fp64 products of the exactly
dequantized operands (fp32-accumulation bound), and cuBLAS against emulation on Hopper."""

import pytest
import torch

from megatron_fp8flow import fp8, gemm
from megatron_fp8flow.gemm.cublas import weight_operands as cublas_weight_operands
from megatron_fp8flow.fp8.format import GroupSplits
from megatron_fp8flow.moe import ExpertPrecision

from conftest import HAS_CUDA, make_activations

HOPPER = HAS_CUDA and torch.cuda.get_device_capability()[0] == 9
SPLITS = [0, 130, 16, 200, 0]
K, N = 256, 384


def _weights(n, k, count, seed):
    return [fp8.quantize_weight(make_activations(n, k, "outlier", seed=seed + i)) for i in range(count)]


def _fp32_bound(a64, b64):
    """Worst-case fp32 accumulation error of a @ b^T over the reduction dim r: r * 2^-23 * |a||b|^T."""
    return a64.shape[1] * 2.0**-23 * (a64.abs() @ b64.abs().t()) + 1e-30


def _kernel_bound(a64, b64, device):
    """Error bound of a Triton FP8 GEMM. Interpreted (CPU): exact products, fp32 sums. On a GPU,
    FP8 tensor cores keep only ~14 bits of the running sum inside each 128-deep block before it is
    promoted to the fp32 accumulator (DeepSeek-V3, sec. 3.3.2; measured on the H200): add
    128 * 2^-13 * |a||b|^T, the same worst-case form with the tensor core's unit roundoff."""
    bound = _fp32_bound(a64, b64)
    if torch.device(device).type == "cuda":
        bound = bound + min(a64.shape[1], 128) * 2.0**-13 * (a64.abs() @ b64.abs().t())
    return bound


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


def test_triton_grouped_gemms_match_fp64(device):
    """The single-launch Triton kernels (one launch for all groups; any group sizes, empty ones
    included) against fp64 products of the exactly dequantized operands, within the fp32
    accumulation bound; fprop, dgrad (w.t()), and wgrad fresh, in bf16, and accumulated."""
    a = fp8.quantize(make_activations(sum(SPLITS), K, "heavy", seed=21).to(device))
    ws = [fp8.quantize_weight(w.to(device)) for w in
          (make_activations(N, K, "outlier", seed=30 + i) for i in range(len(SPLITS)))]
    ad = a.dequantize().cpu().double()
    out = gemm.grouped_rowwise_gemm(a, ws, SPLITS, out_dtype=torch.float32, backend="triton").cpu()
    out16 = gemm.grouped_rowwise_gemm(a, ws, SPLITS, out_dtype=torch.bfloat16, backend="triton").cpu()
    dy = fp8.quantize(make_activations(sum(SPLITS), N, "gaussian", seed=22).to(device))
    dx = gemm.grouped_rowwise_gemm(dy, [w.t() for w in ws], SPLITS, out_dtype=torch.float32, backend="triton").cpu()
    dyd = dy.dequantize().cpu().double()
    start = 0
    for m, w in zip(SPLITS, ws):
        if m:
            wd = w.dequantize().cpu().double()
            rows = slice(start, start + m)
            assert ((out[rows].double() - ad[rows] @ wd.t()).abs() <= _kernel_bound(ad[rows], wd, device)).all()
            assert ((out16[rows].double() - out[rows].double()).abs() <= 2.0**-8 * out[rows].abs().double()
                    + 2 * _kernel_bound(ad[rows], wd, device)).all()
            assert ((dx[rows].double() - dyd[rows] @ wd) .abs() <= _kernel_bound(dyd[rows], wd.t(), device)).all()
        start += m
    # dgrad straight from the forward weights: the transposed blocks are read in place.
    dx_in_place = gemm.grouped_rowwise_gemm(dy, ws, SPLITS, out_dtype=torch.float32, backend="triton",
                                            transpose_weights=True).cpu()
    start = 0
    for m, w in zip(SPLITS, ws):  # same bound as dx (the GPU may order the products differently)
        if m:
            wd, rows = w.dequantize().cpu().double(), slice(start, start + m)
            assert ((dx_in_place[rows].double() - dyd[rows] @ wd).abs() <= _kernel_bound(dyd[rows], wd.t(), device)).all()
        start += m
    g_col = fp8.scaling_aware_transpose(dy, SPLITS)
    x_col = fp8.scaling_aware_transpose(a, SPLITS)
    gd, xd = g_col.dequantize().cpu().double(), x_col.dequantize().cpu().double()
    fresh = gemm.grouped_wgrad(g_col, x_col, backend="triton")
    main = [torch.full((N, K), 0.25, device=device) for _ in SPLITS]
    accumulated = gemm.grouped_wgrad(g_col, x_col, accumulate_into=main, backend="triton")
    start = 0
    for m, f, acc in zip(SPLITS, fresh, accumulated):
        f, acc = f.cpu().double(), acc.cpu().double()
        if m:
            ga, xa = gd[start : start + m].t(), xd[start : start + m].t()
            bound = _kernel_bound(ga, xa, device)
            assert (f - ga @ xa.t()).abs().le(bound).all()
            assert (acc - 0.25 - ga @ xa.t()).abs().le(bound + 2.0**-22).all()
        else:
            assert torch.count_nonzero(f) == 0 and (acc == 0.25).all()
        start += m
    # The kernel's in-place accumulation into a stacked fp32 buffer.
    from megatron_fp8flow.kernels import grouped_gemm

    stacked = torch.full((len(SPLITS), N, K), 0.25, device=device)
    grouped_gemm.grouped_wgrad(g_col.data, g_col.scale_inv, x_col.data, x_col.scale_inv, g_col.groups, stacked, True)
    for i, acc in enumerate(accumulated):
        assert (stacked[i].cpu().double() - acc.cpu().double()).abs().le(2.0**-20 * acc.abs().cpu().double()).all()


@pytest.mark.parametrize("block_n, num_warps", [(64, 4), (256, 8)])
def test_triton_rowwise_tile_widths(device, block_n, num_warps):
    """Other tile widths of the row-wise kernel: 256 columns span two weight scale blocks, and
    N = 384 leaves the last tile half masked. Same fp32 bound as the default tiles."""
    from megatron_fp8flow.fp8.format import GroupSplits
    from megatron_fp8flow.kernels import grouped_gemm

    a = fp8.quantize(make_activations(sum(SPLITS), K, "heavy", seed=41).to(device))
    ws = [fp8.quantize_weight(w.to(device)) for w in
          (make_activations(N, K, "outlier", seed=50 + i) for i in range(len(SPLITS)))]
    out = torch.empty(sum(SPLITS), N, dtype=torch.float32, device=device)
    grouped_gemm.grouped_rowwise_gemm(a.data, a.scale_inv, torch.stack([w.data for w in ws]),
                                      torch.stack([w.scale_inv for w in ws]),
                                      GroupSplits.build(SPLITS, sum(SPLITS), device), out,
                                      block_n=block_n, num_warps=num_warps)
    ad, start = a.dequantize().cpu().double(), 0
    for m, w in zip(SPLITS, ws):
        if m:
            wd, rows = w.dequantize().cpu().double(), slice(start, start + m)
            assert ((out[rows].cpu().double() - ad[rows] @ wd.t()).abs() <= _kernel_bound(ad[rows], wd, device)).all()
        start += m


def test_outer_major_group_scales_layout():
    """The per-group scale views handed to cuBLAS: each group's [rows, K/128] scales, stride
    (1, rows), packed group after group; equal to the per-group transposed copies."""
    g = torch.Generator().manual_seed(3)
    sizes = [0, 48, 16, 0, 80, 32]
    scale = torch.rand(sum(sizes), 5, generator=g)
    views = gemm.outer_major_group_scales(scale, GroupSplits.build(sizes, sum(sizes), 'cpu'))
    start = 0
    for rows, v in zip(sizes, views):
        ref = scale[start : start + rows].t().contiguous().t()
        assert v.shape == ref.shape and torch.equal(v, ref)
        if rows:
            assert v.stride() == (1, rows)
        start += rows
    assert gemm.outer_major_group_scales(scale[:0], GroupSplits.build([0, 0], 0, 'cpu'))[1].shape == (0, 5)
    # Weights, all experts at once: w.data.t() and the scales' transpose with a 16-byte column
    # stride (K/128 = 3 is padded to 4, K/128 = 4 is not).
    for k in (384, 512):
        ws = _weights(256, k, 3, seed=70)
        data, scales = cublas_weight_operands(ws)
        for w, d, sc in zip(ws, data, scales):
            assert torch.equal(d.view(torch.uint8), w.data.t().view(torch.uint8))
            assert torch.equal(sc, w.scale_inv.t()) and sc.stride() == (1, 4)


def test_weights_stacked_in_place_and_transposed_flag():
    """Weights quantized into one stacked buffer are used as a view (no copy); separate ones are
    stacked by a copy; transpose_weights equals passing the exact transposed copies."""
    ws = _weights(N, K, 3, seed=40)
    data = torch.empty(3, N, K, dtype=fp8.FP8_DTYPE)
    scale = torch.empty(3, N // 128, K // 128)
    into = [fp8.quantize_weight(w.dequantize(), out=(data[i], scale[i]), backend="reference")
            for i, w in enumerate(ws)]
    view = gemm.stacked_view_or_copy([w.data for w in into])
    assert view.data_ptr() == data.data_ptr() and torch.equal(view.view(torch.uint8), data.view(torch.uint8))
    copied = gemm.stacked_view_or_copy([w.data for w in ws])
    assert copied.data_ptr() != ws[0].data.data_ptr() and torch.equal(copied.view(torch.uint8), view.view(torch.uint8))
    a = fp8.quantize(make_activations(64, N, seed=41), backend="reference")
    flag = gemm.grouped_rowwise_gemm(a, into, [16, 0, 48], out_dtype=torch.float32, backend="emulated",
                                     transpose_weights=True)
    explicit = gemm.grouped_rowwise_gemm(a, [w.t() for w in into], [16, 0, 48], out_dtype=torch.float32,
                                         backend="emulated")
    assert torch.equal(flag, explicit)
    with pytest.raises(ValueError, match=r"shape \(384, 384\)"):
        gemm.grouped_rowwise_gemm(a, ws, [16, 0, 48], backend="emulated", transpose_weights=False)
    with pytest.raises(ValueError, match="out must be contiguous"):
        fp8.quantize_weight(ws[0].dequantize(), out=(data[0], scale[0].t()), backend="reference")


def test_gemm_errors():
    a = fp8.quantize(torch.randn(32, 200), backend="reference")
    with pytest.raises(ValueError, match="K % 128 == 0"):
        gemm.grouped_rowwise_gemm(a, [], [32], backend="emulated")
    a = fp8.quantize(torch.randn(32, 256), backend="reference")
    with pytest.raises(ValueError, match="2 weights for 1 groups"):
        gemm.grouped_rowwise_gemm(a, _weights(128, 256, 2, 0), [32], backend="emulated")
    with pytest.raises(ValueError, match="unknown GEMM backend"):
        gemm.grouped_rowwise_gemm(a, _weights(128, 256, 1, 0), [32], backend="tensorcore")
    with pytest.raises(ValueError, match="unknown gemm_backend"):
        ExpertPrecision(gemm_backend="cutlass")
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


def test_gemm_benchmark_render():
    """The GEMM benchmark's table (the timing itself needs a GPU: `fp8flow bench gemm`)."""
    from dataclasses import asdict

    from megatron_fp8flow.benchmarks import grouped_gemm as bg

    row = bg.GemmRow("fc1 fprop", 8, 32768, 4096, 7168, "triton", 2.0, 960.0, 1.5, 0.25)
    wg = bg.GemmRow("fc1 wgrad", 8, 32768, 4096, 7168, "deepgemm k_grouped", 2.0, 960.0, 1.5, 0.02, "main_grad")
    text = bg.render({"gpu": "x", "torch": "y", "rows": [asdict(row), asdict(wg)]})
    assert "| fc1 fprop | 8 | 32768 x 4096 x 7168 | triton | - | 2.000 | 960 | 0.25 | 1.500 |" in text
    assert "| deepgemm k_grouped | main_grad | 2.000 | 960 | 0.02 | 1.500 |" in text


def test_auto_backend_by_device(monkeypatch):
    """auto: emulation on CPU, DeepGEMM on sm_90 when it imports (else cuBLAS), Triton on other FP8
    GPUs, a clear error before sm_89."""
    from megatron_fp8flow.gemm import deepgemm

    assert gemm.resolve_backend("auto", torch.device("cpu")) == "emulated"
    monkeypatch.setattr(deepgemm, "available", lambda: False)
    for cap, expected in (((9, 0), "cublas"), ((8, 9), "triton"), ((10, 0), "triton")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, cap=cap: cap)
        assert gemm.resolve_backend("auto", torch.device("cuda")) == expected
    monkeypatch.setattr(deepgemm, "available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert gemm.resolve_backend("auto", torch.device("cuda")) == "deepgemm"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(RuntimeError, match=r"sm_89 or newer.*sm_80.*'bf16'"):
        gemm.resolve_backend("auto", torch.device("cuda"))
