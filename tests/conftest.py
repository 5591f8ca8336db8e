"""Shared test set-up.

Kernels run natively when a CUDA GPU is present; otherwise under the Triton interpreter on CPU
(``TRITON_INTERPRET`` must be set before any kernel module is imported, hence here).

On a CPU-only machine a test marked ``cpu_kernels("pytorch")`` runs the plugin's plain-PyTorch
path instead (``TRITON_INTERPRET=0``, what a CPU user of the plugin runs): the kernel, op, GEMM
and expert-block tests prove the kernels equal to those forms under the interpreter, which is
hundreds of times slower, so the Megatron-facing tests need not interpret them again. Unmarked
tests, and those marked ``cpu_kernels("interpreter")``, run the kernels. The GPU runs every test
on the kernels.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    import importlib
    import pkgutil

    os.environ.setdefault("TRITON_INTERPRET", "1")
    import megatron_fp8flow.kernels as _kernels

    # Triton picks interpreted or compiled when a kernel is defined: define them all now, under
    # the interpreter, so a test on the plain-PyTorch path that imports one first cannot define it
    # compiled for the tests after it.
    for _mod in pkgutil.iter_modules(_kernels.__path__):
        importlib.import_module(f"{_kernels.__name__}.{_mod.name}")

from megatron_fp8flow import fp8  # noqa: E402


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: a worker per core on a CPU-only machine; on a GPU machine at most four,
    since every worker holds a CUDA context and the tests share the GPU."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(cores, 4) if HAS_CUDA else cores


_CPU_KERNEL_PATHS = {"interpreter": "1", "pytorch": "0"}


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before the test's fixtures (module-scoped ones and spawned ranks inherit it): the
    closest ``cpu_kernels`` mark picks the CPU path."""
    if HAS_CUDA:
        return
    marker = item.get_closest_marker("cpu_kernels")
    path = marker.args[0] if marker else "interpreter"
    if path not in _CPU_KERNEL_PATHS:
        raise pytest.UsageError(f"{item.nodeid}: cpu_kernels({path!r}); expected one of {sorted(_CPU_KERNEL_PATHS)}")
    os.environ["TRITON_INTERPRET"] = _CPU_KERNEL_PATHS[path]


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the Triton kernels under test run: the GPU, or the CPU interpreter."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(params=["native", "emulated"] if HAS_CUDA else ["emulated"])
def cast_path(request, monkeypatch):
    """On a GPU, run kernel tests through both E4M3 cast implementations."""
    if request.param == "emulated" and HAS_CUDA:
        monkeypatch.setenv("FP8FLOW_EMULATE_FP8_CAST", "1")
    return request.param


def codes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "tensor") -> None:
    """Exact equality of bit patterns (FP8 codes or fp32 scales), with a useful message."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    a, e = codes(actual).cpu(), codes(expected).cpu()
    nan_a = nan_e = torch.zeros(a.shape, dtype=torch.bool)
    if a.dtype.is_floating_point:
        # Wide floats: every NaN counts as the same value (payload bits carry no meaning).
        nan_a, nan_e = a.isnan(), e.isnan()
        int_t = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[a.dtype]
        a, e = a.view(int_t), e.view(int_t)
    diff = (a != e) & ~(nan_a & nan_e) | (nan_a != nan_e)
    n = int(diff.sum())
    if n:
        idx = diff.nonzero()[:5].tolist()
        samples = [(i, int(a[tuple(i)]), int(e[tuple(i)])) for i in idx]
        raise AssertionError(f"{what}: {n} of {a.numel()} elements differ; (index, got, expected): {samples}")


def assert_fp8_equal(actual: fp8.BlockwiseFP8Tensor, expected: fp8.BlockwiseFP8Tensor, what: str = "") -> None:
    assert actual.layout == expected.layout, f"{what}: layout {actual.layout} != {expected.layout}"
    assert tuple(actual.shape) == tuple(expected.shape)
    assert_bits_equal(actual.data, expected.data, f"{what} data")
    assert_bits_equal(actual.scale_inv, expected.scale_inv, f"{what} scale_inv")


def make_activations(m: int, k: int, kind: str = "gaussian", seed: int = 0, device="cpu", dtype=torch.float32):
    """Realistic test inputs: Gaussian, heavy-tailed (log-normal row magnitudes) or outlier channels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    if kind == "heavy":
        x = x * torch.exp(2.0 * torch.randn(m, 1, generator=g))
    elif kind == "outlier":
        cols = torch.randperm(k, generator=g)[: max(1, k // 64)]
        x[:, cols] *= 200.0
    elif kind == "wide":
        # Rows spanning 2^-40 .. 2^40: column-wise re-encoding pushes many values into
        # (and below) the E4M3 subnormal range.
        x = x * torch.exp2(torch.randint(-40, 41, (m, 1), generator=g).float())
    elif kind == "tiny":
        # Row scales near the 2^-126 clamp: dequantized values are fp32 subnormals.
        x = x * torch.exp2(torch.randint(-140, -100, (m, 1), generator=g).float())
    elif kind != "gaussian":
        raise ValueError(kind)
    return x.to(device=device, dtype=dtype)
