"""Bad input gets an error that names the problem and the requirement."""

import subprocess
import sys

import pytest
import torch

from megatron_fp8flow import fp8


def test_fp8_core_imports_without_megatron():
    code = "import sys, megatron_fp8flow; from megatron_fp8flow import fp8; print('megatron' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda: fp8.quantize(torch.randn(2, 3, 128)), ValueError, "2-D"),
        (lambda: fp8.quantize(torch.ones(4, 128, dtype=torch.int32)), TypeError, "bf16, fp16 or fp32"),
        (lambda: fp8.quantize(torch.randn(4, 128), layout="blocky"), ValueError, "'rowwise', 'colwise'"),
        (lambda: fp8.quantize(torch.randn(4, 128), layout="colwise"), ValueError, "needs m_splits"),
        (lambda: fp8.quantize(torch.randn(4, 128), layout="colwise", m_splits=[1, 2]), ValueError, "sum to the number of rows"),
        (lambda: fp8.quantize(torch.randn(4, 128), layout="colwise", m_splits=[5, -1]), ValueError, "non-negative"),
        (lambda: fp8.quantize(torch.randn(4, 128), m_splits=[4]), ValueError, "'colwise' layout only"),
        (lambda: fp8.quantize(torch.randn(4, 128), backend="cuda"), ValueError, "unknown backend"),
        (lambda: fp8.quantize(torch.randn(4, 128), layout="weight"), ValueError, "quantize_weight"),
        (lambda: fp8.quantize_weight(torch.randn(4)), ValueError, "2-D"),
        (lambda: fp8.quantize(torch.randn(4, 128)).t(), ValueError, "'weight' layout only"),
        (lambda: fp8.quantize(torch.randn(4, 128), layout="colwise", m_splits=torch.tensor([[4]])), ValueError, "1-D"),
    ],
)
def test_errors(call, exc, words):
    with pytest.raises(exc, match=words):
        call()


def test_sat_refuses_fp32_scales_and_wrong_layout():
    x = torch.randn(256, 128)
    with pytest.raises(ValueError, match="power-of-two scales"):
        fp8.scaling_aware_transpose(fp8.quantize(x, pow2_scales=False, backend="reference"), [256])
    with pytest.raises(ValueError, match="'rowwise'"):
        fp8.scaling_aware_transpose(fp8.quantize(x, "colwise", m_splits=[256], backend="reference"), [256])
    with pytest.raises(ValueError, match="'column' or 'tile'"):
        fp8.scaling_aware_transpose(fp8.quantize(x, backend="reference"), [256], variant="row")
    with pytest.raises(ValueError, match="sum to the number of rows"):
        fp8.scaling_aware_transpose(fp8.quantize(x, backend="reference"), [128])


def test_nan_and_inf_never_become_finite(device):
    x = torch.randn(4, 256, device=device)
    x[0, 0], x[1, 1], x[2, 130] = float("nan"), float("inf"), -float("inf")
    for backend in ("reference", "triton"):
        for pow2 in (True, False):
            d = fp8.quantize(x, pow2_scales=pow2, backend=backend).dequantize()
            assert d[0, 0].isnan() and d[1, 1].isnan() and d[2, 130].isnan()
            assert torch.isfinite(d).sum() == x.numel() - 3
        c = fp8.quantize(x, "colwise", m_splits=[4], backend=backend).dequantize()
        assert c[0, 0].isnan() and c[1, 1].isnan() and c[2, 130].isnan()
        w = fp8.quantize_weight(x, backend=backend).dequantize()
        assert w[0, 0].isnan() and w[1, 1].isnan() and w[2, 130].isnan()


def test_kernels_refuse_cpu_tensors_without_interpreter(monkeypatch):
    """Without TRITON_INTERPRET, a CPU tensor handed to a Triton kernel that has no CPU form gets
    an error that says what to do, not a pointer error from the launcher; the data-movement
    kernels and the SwiGLU op run their plain-PyTorch forms instead (compared with the kernels in
    test_moe_ops)."""
    from megatron_fp8flow.fp8.format import GroupSplits
    from megatron_fp8flow.kernels.gather_rows import gather_sum_rows
    from megatron_fp8flow.kernels.grouped_gemm import grouped_rowwise_gemm
    from megatron_fp8flow.kernels.swiglu_quant import swiglu_quant_forward
    from megatron_fp8flow.ops import swiglu_quant_forward as swiglu_op

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(4, 256).bfloat16()
    q = fp8.quantize(x, backend="reference")
    w = fp8.quantize_weight(torch.randn(128, 256), backend="reference")
    with pytest.raises(ValueError, match="need CUDA tensors.*TRITON_INTERPRET=1"):
        grouped_rowwise_gemm(q.data, q.scale_inv, w.data[None], w.scale_inv[None], GroupSplits.build([4], 4, "cpu"),
                             torch.empty(4, 128, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="need CUDA tensors.*TRITON_INTERPRET=1"):
        swiglu_quant_forward(x, torch.rand(4))
    data, scale, _ = swiglu_op(x, torch.rand(4))
    assert data.shape == (4, 128) and scale.shape == (4, 1)
    summed, _ = gather_sum_rows(x, torch.zeros(4, 1, dtype=torch.int32), 4)
    assert torch.equal(summed, x[[0, 0, 0, 0]])


@pytest.mark.parametrize("path", [pytest.param("pytorch", marks=pytest.mark.cpu_kernels("pytorch")),
                                  pytest.param("interpreter", marks=pytest.mark.cpu_kernels("interpreter")),
                                  "unmarked"])
def test_cpu_kernels_mark_picks_the_cpu_path(path):
    """The conftest's mark: on a CPU-only machine the plain-PyTorch path only where asked for
    (SAT then skips the kernel it would otherwise interpret); a GPU always runs the kernels."""
    from megatron_fp8flow.kernels import scaling_aware_transpose as sat_kernel
    from megatron_fp8flow.kernels.fp8_common import interpreter_active

    if torch.cuda.is_available():
        pytest.skip("a GPU runs every test on the kernels")
    assert interpreter_active() == (path != "pytorch")
    launched = []
    original = sat_kernel.scaling_aware_transpose

    def spy(*args, **kwargs):
        launched.append(True)
        return original(*args, **kwargs)

    sat_kernel.scaling_aware_transpose = spy
    try:
        row = fp8.quantize(torch.randn(8, 128).bfloat16(), backend="reference")
        fp8.scaling_aware_transpose(row, [3, 5])
    finally:
        sat_kernel.scaling_aware_transpose = original
    assert launched == ([] if path == "pytorch" else [True])
