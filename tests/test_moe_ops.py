"""Permute+pad, unpad+unpermute and weighted SwiGLU+quantize kernels vs their references.

Exact where the math is order-independent (codes, scales, permutations, slot-order sums);
derived bounds where fp32 transcendental functions or reductions differ.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_fp8flow import fp8, ops
from megatron_fp8flow.ops import reference as R

from conftest import assert_bits_equal, codes


def make_routing(n, e, topk, kind="random", seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        idx = torch.rand(n, e, generator=g).topk(topk, dim=1).indices
    elif kind == "skewed":  # every token picks expert 0 plus random others; last experts empty
        rest = torch.rand(n, e - 3, generator=g)[:, 1:].topk(topk - 1, dim=1).indices + 1
        idx = torch.cat([torch.zeros(n, 1, dtype=torch.long), rest], 1)
    elif kind == "one_expert":
        idx = torch.full((n, 1), e - 1)
    else:
        raise ValueError(kind)
    rm = torch.zeros(n, e, dtype=torch.bool)
    if n:
        rm.scatter_(1, idx, True)
    probs = torch.rand(n, e, generator=g)
    return rm, probs


CASES = [
    # (tokens, experts, hidden, topk, routing, align)
    (37, 6, 256, 3, "random", 16),
    (64, 8, 384, 2, "skewed", 32),
    (50, 4, 128, 1, "one_expert", 128),
    (0, 4, 256, 2, "random", 16),
    (129, 16, 200, 4, "random", 16),  # H not a multiple of 128: bf16 only
]


def _plan(rm, topk, align, device, **kw):
    return ops.plan_permutation(rm.to(device), topk, align, **kw)


@pytest.mark.parametrize("n, e, h, topk, kind, align", CASES)
def test_permute_pad_bf16_and_fp8(device, n, e, h, topk, kind, align):
    rm, probs = make_routing(n, e, topk, kind, seed=n + e)
    x = torch.randn(n, h).bfloat16()
    perm = _plan(rm, topk, align, device)
    out, p = ops.permute_pad(x.to(device), probs.to(device), perm)
    exp, _, exp_p, row_map, padded = R.permute_pad(x, probs, rm, align)
    assert perm.num_out_rows == sum(padded)
    assert perm.padded_sizes.cpu().tolist() == padded
    assert_bits_equal(perm.row_map.cpu().long(), row_map[:, :topk] if n else row_map[:, :0].new_empty(0, topk))
    assert_bits_equal(out.cpu(), exp, "rows")  # pad rows included: all zero
    assert_bits_equal(p.cpu(), exp_p, "probs")
    if h % 128 == 0:
        q = fp8.quantize(x.to(device))
        out8, p8 = ops.permute_pad(q, probs.to(device), perm)
        exp8, exp_s, _, _, _ = R.permute_pad(q.data.cpu(), probs, rm, align, scales=q.scale_inv.cpu())
        assert_bits_equal(out8.data.cpu(), exp8, "fp8 rows")
        assert_bits_equal(out8.scale_inv.cpu(), exp_s, "fp8 scales (pad rows 0)")
        assert_bits_equal(p8.cpu(), exp_p, "probs")


def test_permute_host_counts_and_upper_bound(device):
    rm, probs = make_routing(40, 5, 2, "random", seed=3)
    x = torch.randn(40, 128).bfloat16().to(device)
    exact = _plan(rm, 2, 16, device)
    host = _plan(rm, 2, 16, device, tokens_per_expert=rm.sum(0).tolist())
    assert host.num_out_rows == exact.num_out_rows and host.padded_sizes_host == exact.padded_sizes.cpu().tolist()
    bound = _plan(rm, 2, 16, device, num_out_rows=exact.num_out_rows + 64)
    a, _ = ops.permute_pad(x, probs.to(device), exact)
    b, _ = ops.permute_pad(x, probs.to(device), bound)
    assert_bits_equal(b[: exact.num_out_rows].cpu(), a.cpu())


def test_unpad_unpermute_forward_backward(device):
    n, e, h, topk = 45, 6, 256, 3
    rm, probs = make_routing(n, e, topk, "random", seed=5)
    perm = _plan(rm, topk, 16, device)
    _, _, _, row_map, _ = R.permute_pad(torch.zeros(n, h), probs, rm, 16)
    y = torch.randn(perm.num_out_rows, h).bfloat16()
    # Poison the padding rows: they must never be read.
    real = torch.zeros(perm.num_out_rows, dtype=torch.bool)
    real[row_map[row_map >= 0]] = True
    y[~real] = float("nan")
    out = ops.unpad_unpermute(y.to(device), perm)
    assert_bits_equal(out.cpu(), R.unpad_unpermute(y, row_map), "unpermute")
    assert torch.isfinite(out.float()).all()
    g = torch.randn(n, h).bfloat16()
    gp = ops.unpad_unpermute_backward(g.to(device), perm)
    assert_bits_equal(gp.cpu(), R.scatter_to_padded(g, row_map, perm.num_out_rows)[0], "bf16 grad")
    g8 = fp8.quantize(g.to(device))
    gp8 = ops.unpad_unpermute_backward(g8, perm)
    exp_d, exp_s = R.scatter_to_padded(g8.data.cpu(), row_map, perm.num_out_rows, g8.scale_inv.cpu())
    assert_bits_equal(gp8.data.cpu(), exp_d, "fp8 grad bytes")
    assert_bits_equal(gp8.scale_inv.cpu(), exp_s, "fp8 grad scales")


def test_permute_backward_and_autograd(device):
    n, e, h, topk = 33, 5, 128, 2
    rm, probs = make_routing(n, e, topk, "skewed", seed=9)
    perm = _plan(rm, topk, 16, device)
    x = torch.randn(n, h, dtype=torch.float32, device=device, requires_grad=True)
    pr = probs.clone().to(device).requires_grad_(True)
    rows, p = ops.PermutePad.apply(x, pr, perm)
    out = ops.UnpadUnpermute.apply(rows * p[:, None], perm)
    w = torch.randn(n, h, device=device)
    (out * w).sum().backward()
    # Autograd through a plain index-based formulation in fp64.
    x64 = x.detach().cpu().double().requires_grad_(True)
    p64 = probs.double().requires_grad_(True)
    tok, exp_idx = rm.nonzero(as_tuple=True)
    contrib = x64[tok] * p64[tok, exp_idx][:, None]
    out64 = torch.zeros(n, h, dtype=torch.float64).index_add(0, tok, contrib)
    (out64 * w.cpu().double()).sum().backward()
    torch.testing.assert_close(x.grad.cpu().double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pr.grad.cpu().double(), p64.grad, rtol=1e-4, atol=1e-4)


def test_permute_errors(device):
    rm, probs = make_routing(10, 4, 2, "random")
    with pytest.raises(ValueError, match="align must be one of"):
        ops.plan_permutation(rm, 2, 24)
    with pytest.raises(ValueError, match="bool"):
        ops.plan_permutation(rm.int(), 2)
    perm = _plan(rm, 2, 16, device)
    q = fp8.quantize(torch.randn(10, 200, device=device))
    with pytest.raises(ValueError, match="H % 128 == 0"):
        ops.permute_pad(q, probs.to(device), perm)


# ---------------------------------------------------------------- weighted SwiGLU + quantize

SWIGLU_SHAPES = [(50, 256), (17, 128), (0, 128), (130, 384)]


def _rows(data, scale_inv) -> fp8.BlockwiseFP8Tensor:
    return fp8.BlockwiseFP8Tensor(data, scale_inv, fp8.Layout.ROWWISE, tuple(data.shape))


def _swiglu_inputs(m, f, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, 2 * f, generator=g) * 2).bfloat16()
    w = torch.rand(m, generator=g)
    grad = torch.randn(m, f, generator=g).bfloat16()
    return x, w, grad


@pytest.mark.parametrize("m, f", SWIGLU_SHAPES)
def test_swiglu_quant_forward(device, cast_path, m, f):
    x, w, _ = _swiglu_inputs(m, f, seed=m + f)
    data, scale_inv, y = ops.swiglu_quant_forward(x.to(device), w.to(device), y_dtype=torch.float32)
    q = _rows(data, scale_inv)
    exp_d, exp_s, exp_y = R.weighted_swiglu_quant(x, w)
    y = y.cpu()
    # fp32 SwiGLU: exp and division differ from torch's by a few ulp at most.
    assert ((y - exp_y).abs() <= 2.0**-20 * exp_y.abs() + 1e-30).all()
    # The quantization itself is exact given the kernel's fp32 values.
    self_q = fp8.quantize(y, backend="reference")
    assert_bits_equal(q.data.cpu(), self_q.data, "codes")
    assert_bits_equal(q.scale_inv.cpu(), self_q.scale_inv, "scales")
    # And against the reference codes: equal but for rare rounding-boundary flips by one step.
    diff = codes(q.data.cpu()).int() - codes(exp_d).int()
    assert (diff.abs() <= 1).all() and int((diff != 0).sum()) <= diff.numel() // 1000
    if m:
        _, _, y16 = ops.swiglu_quant_forward(x.to(device), w.to(device), y_dtype=torch.bfloat16)
        assert_bits_equal(y16.cpu(), y.bfloat16(), "bf16 y")


@pytest.mark.parametrize("m, f", SWIGLU_SHAPES)
def test_swiglu_quant_backward_against_autograd(device, cast_path, m, f):
    x, w, grad = _swiglu_inputs(m, f, seed=7 * m + f)
    data, scale_inv, dw = ops.swiglu_quant_backward(grad.to(device), x.to(device), w.to(device))
    q = _rows(data, scale_inv)
    assert q.shape == (m, 2 * f) and q.scale_inv.shape == (m, 2 * f // 128)
    # Autograd through the fp64 reference forward.
    x64 = x.double().requires_grad_(True)
    w64 = w.double().requires_grad_(True)
    R.weighted_swiglu(x64, w64, torch.float64).backward(grad.double())
    dx = q.dequantize().cpu().double()
    s = q.scale_inv.cpu().double().repeat_interleave(128, 1)
    bound = torch.maximum(x64.grad.abs() * 2.0**-4, s * 2.0**-10) * (1 + 2.0**-8) + 1e-6 * x64.grad.abs()
    assert ((dx - x64.grad).abs() <= bound).all()
    # dw: an fp32 sum over F terms, each within a few ulp: |err| <= F * 2^-22 * sum |terms|.
    a, b = x64.detach()[:, :f], x64.detach()[:, f:]
    terms = (grad.double() * a * torch.sigmoid(a) * b).abs().sum(1)
    assert ((dw.cpu().double() - w64.grad).abs() <= f * 2.0**-22 * terms + 1e-30).all()
    # Deterministic: same bits run to run.
    data2, _, dw2 = ops.swiglu_quant_backward(grad.to(device), x.to(device), w.to(device))
    assert_bits_equal(dw2.cpu(), dw.cpu(), "dw rerun")
    assert_bits_equal(data2.cpu(), q.data.cpu(), "codes rerun")
    # Exact against the fp32 reference except for rare rounding flips.
    exp_d, exp_s, exp_dw = R.weighted_swiglu_quant_backward(grad, x, w)
    diff = codes(q.data.cpu()).int() - codes(exp_d).int()
    assert (diff.abs() <= 1).all() and int((diff != 0).sum()) <= diff.numel() // 1000


def test_swiglu_nan_and_errors(device):
    x, w, grad = _swiglu_inputs(4, 128, seed=1)
    x[1, 3] = float("nan")
    data, _, _ = ops.swiglu_quant_forward(x.to(device), w.to(device))
    assert codes(data.cpu())[1, 3] == fp8.NAN_CODE
    ddata, _, dw = ops.swiglu_quant_backward(grad.to(device), x.to(device), w.to(device))
    assert dw[1].isnan() and codes(ddata.cpu())[1, 3] == fp8.NAN_CODE
    with pytest.raises(ValueError, match="F % 128 == 0"):
        ops.swiglu_quant_forward(torch.randn(4, 200, device=device).bfloat16(), w.to(device))
    with pytest.raises(ValueError, match=r"w must be \[M\]"):
        ops.swiglu_quant_forward(x.to(device), torch.rand(3, device=device))


def test_swiglu_unquantized_baseline_kernels(device):
    """The baseline's plain fused SwiGLU (bf16 out) and its backward (bf16 dx)."""
    from megatron_fp8flow.kernels.swiglu_quant import swiglu_quant_backward, swiglu_quant_forward

    x, w, grad = _swiglu_inputs(40, 256, seed=4)
    d, s, y = swiglu_quant_forward(x.to(device), w.to(device), y_dtype=torch.float32, quantize=False)
    assert d is None and s is None
    exp_y = R.weighted_swiglu(x, w)
    assert ((y.cpu() - exp_y).abs() <= 2.0**-20 * exp_y.abs() + 1e-30).all()
    dx, none, dw = swiglu_quant_backward(grad.to(device), x.to(device), w.to(device), dx_dtype=torch.float32)
    assert none is None
    d_gate, d_up, exp_dw = R.weighted_swiglu_backward(grad, x, w)
    exp_dx = torch.cat([d_gate, d_up], 1)
    # silu'(a) = sig (1 + a (1 - sig)) cancels near a = -1.28, so the bound is relative to the
    # size of its terms, not of the result; the GPU's exp and division are a few ulp off.
    f = x.shape[1] // 2
    a, b = x[:, :f].float(), x[:, f:].float()
    sig = torch.sigmoid(a)
    gw = (grad.float() * w[:, None]).abs()
    size = torch.cat([gw * b.abs() * sig * (1 + (a * (1 - sig)).abs()), gw * (a * sig).abs()], 1)
    assert ((dx.cpu() - exp_dx).abs() <= 2.0**-19 * size + 1e-30).all()
    # The two modes are separate compilations, free to contract multiply-adds differently: dw
    # agrees within the fp32 error of an F-term sum, both against each other and the reference.
    _, _, q_dw = ops.swiglu_quant_backward(grad.to(device), x.to(device), w.to(device))
    terms = (grad.float() * a * sig * b).abs().sum(1)
    assert ((dw.cpu() - q_dw.cpu()).abs() <= 2 * f * 2.0**-22 * terms + 1e-30).all()
    assert ((dw.cpu() - exp_dw).abs() <= 2 * f * 2.0**-22 * terms + 1e-30).all()
    dx16, _, _ = swiglu_quant_backward(grad.to(device), x.to(device), w.to(device), dx_dtype=torch.bfloat16)
    assert_bits_equal(dx16.cpu(), dx.cpu().bfloat16(), "bf16 dx = RNE of fp32 dx")


def test_moe_benchmark_pipelines_run_and_agree(device, monkeypatch):
    """The benchmark's fused and unfused pipelines (timing stubbed) on small shapes.

    Its built-in check raises if fused and baseline data movement differ in any bit.
    """
    from megatron_fp8flow.benchmarks import moe_ops

    monkeypatch.setattr(moe_ops, "TOKENS", 48)
    monkeypatch.setattr(moe_ops.common, "bench_ms", lambda fn: (fn(), 1.0)[1])
    monkeypatch.setattr(moe_ops.common, "copy_ms", lambda nbytes, dev: 1.0)
    result = moe_ops.run(device=device, permute_shapes=[(6, 256, 2)], swiglu_shapes=[(256, 6, 2, 128)])
    names = {(r["op"], r["direction"]) for r in result["rows"]}
    assert ("permute+pad fp8", "forward") in names and ("swiglu+quant", "backward") in names
    assert "| permute+pad bf16 |" in moe_ops.render(result)


def test_permutation_feeds_sat_with_aligned_groups(device):
    """permute+pad FP8 rows, then SAT over the padded groups: exact vs dequantize+requantize."""
    rm, probs = make_routing(90, 6, 2, "skewed", seed=12)
    perm = _plan(rm, 2, 16, device)
    q = fp8.quantize(torch.randn(90, 256, device=device))
    rows, _ = ops.permute_pad(q, probs.to(device), perm)
    groups = perm.group_splits()
    assert groups.row_alignment % 16 == 0
    got = fp8.scaling_aware_transpose(rows, groups)
    sizes = perm.padded_sizes.cpu().tolist()
    ref_rows = fp8.BlockwiseFP8Tensor(rows.data.cpu(), rows.scale_inv.cpu(), rows.layout, rows.shape)
    exp = fp8.quantize(ref_rows.dequantize(), "colwise", m_splits=sizes, backend="reference")
    nb = exp.scale_inv.shape[0]
    assert_bits_equal(got.data.cpu(), exp.data, "data")
    assert_bits_equal(got.scale_inv[:nb].cpu(), exp.scale_inv, "scales")


def test_routing_over_topk_is_a_clear_error_on_cpu():
    rm, _ = make_routing(10, 4, 2, "random")
    with pytest.raises(ValueError, match="more than topk = 1"):
        ops.plan_permutation(rm, 1)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(0, 70),
    e=st.integers(1, 9),
    topk=st.integers(1, 4),
    align=st.sampled_from([1, 16, 32, 128]),
    seed=st.integers(0, 2**16),
)
def test_permute_roundtrip_property(device, n, e, topk, align, seed):
    """Random routings (any number of experts per token up to topk): permute then unpermute
    returns each token times its number of experts; rows match the reference exactly."""
    g = torch.Generator().manual_seed(seed)
    rm = torch.rand(n, e, generator=g) < (topk / e)
    over = rm.sum(1) > topk  # keep at most topk experts per token
    rm[over] = False
    probs = torch.rand(n, e, generator=g)
    x = torch.randn(n, 128, generator=g)
    perm = _plan(rm, topk, align, device)
    rows, p = ops.permute_pad(x.to(device), probs.to(device), perm)
    exp, _, exp_p, _, padded = R.permute_pad(x, probs, rm, align)
    assert_bits_equal(rows.cpu(), exp)
    assert_bits_equal(p.cpu(), exp_p)
    back = ops.unpad_unpermute(rows, perm).cpu()
    torch.testing.assert_close(back, x * rm.sum(1, keepdim=True), rtol=1e-6, atol=1e-6)


def test_cpu_paths_match_the_kernels(monkeypatch):
    """CPU runs without the Triton interpreter use plain-PyTorch forms of the data-movement
    kernels and of the SwiGLU op: the same bits for data movement, fp32-rounding-close for the
    SwiGLU."""
    from megatron_fp8flow.kernels import fp8_common, gather_rows, scatter_rows, swiglu_quant

    if torch.cuda.is_available():
        pytest.skip("the CPU paths are compared with the interpreted kernels on a CPU machine")
    g = torch.Generator().manual_seed(4)
    n, e, topk, h = 37, 5, 2, 256
    scores = torch.rand(n, e, generator=g)
    routing = torch.zeros(n, e, dtype=torch.bool).scatter_(1, scores.topk(topk, dim=1).indices, True)
    routing[3] = False  # a token routed nowhere
    perm = ops.plan_permutation(routing, topk, 16)
    x = fp8.quantize(torch.randn(n, h, generator=g).bfloat16())
    probs = torch.rand(n, e, generator=g)
    kernel = scatter_rows.scatter_rows(x.data, perm.row_map, perm.counts, perm.offsets, perm.num_out_rows, 16,
                                       src_scales=x.scale_inv, probs=probs, slot_expert=perm.slot_expert)
    plain = scatter_rows._scatter_rows_torch(x.data, perm.row_map, perm.num_out_rows, x.scale_inv, probs,
                                             perm.slot_expert)
    assert torch.equal(kernel[0].view(torch.uint8), plain[0].view(torch.uint8))
    assert torch.equal(kernel[1], plain[1]) and torch.equal(kernel[2], plain[2])
    rows = torch.randn(perm.num_out_rows, h, generator=g).bfloat16()
    gp = torch.randn(perm.num_out_rows, generator=g)
    kernel = gather_rows.gather_sum_rows(rows, perm.row_map, n, grad_probs=gp, slot_expert=perm.slot_expert,
                                         num_experts=e)
    plain = gather_rows._gather_sum_rows_torch(rows, perm.row_map, n, gp, perm.slot_expert, e)
    assert torch.equal(kernel[0], plain[0]) and torch.equal(kernel[1], plain[1])

    m, f = 40, 256
    xs = (torch.randn(m, 2 * f, generator=g) * 3).bfloat16()
    w, dy = torch.rand(m, generator=g), torch.randn(m, f, generator=g).bfloat16()
    fwd_k = swiglu_quant.swiglu_quant_forward(xs, w, torch.float32)
    bwd_k = swiglu_quant.swiglu_quant_backward(dy, xs, w)
    monkeypatch.setattr(fp8_common, "use_cpu_path", lambda *t: True)
    fwd_p = ops.swiglu_quant_forward(xs, w, torch.float32)
    bwd_p = ops.swiglu_quant_backward(dy, xs, w)
    assert torch.allclose(fwd_k[2], fwd_p[2], rtol=1e-5, atol=1e-6)
    for k, p in ((fwd_k, fwd_p), (bwd_k, bwd_p)):
        dk = fp8.BlockwiseFP8Tensor(k[0], k[1], fp8.Layout.ROWWISE, tuple(k[0].shape)).dequantize()
        dp = fp8.BlockwiseFP8Tensor(p[0], p[1], fp8.Layout.ROWWISE, tuple(p[0].shape)).dequantize()
        assert ((dk - dp).abs() <= 2.0**-3 * dk.abs() + 1e-30).all()  # at most one E4M3 step apart
        assert (k[0].view(torch.uint8) != p[0].view(torch.uint8)).float().mean() < 0.01
    assert torch.allclose(bwd_k[2], bwd_p[2], rtol=1e-4, atol=1e-5)
