"""The DeepGEMM engine: the layouts our kernels write for it (CPU, interpreted) and the backend
itself against the emulation (Hopper with ``deep_gemm`` only)."""

import importlib.util

import pytest
import torch

from megatron_fp8flow import fp8, gemm
from megatron_fp8flow.fp8.format import GroupSplits, per_group_from_side_by_side, side_by_side_from_per_group
from megatron_fp8flow.gemm import deepgemm
from megatron_fp8flow.moe import ExpertPrecision, FP8FlowGroupedMLP

from conftest import HAS_CUDA, make_activations

HAS_DEEPGEMM = importlib.util.find_spec("deep_gemm") is not None
HOPPER = HAS_CUDA and torch.cuda.get_device_capability()[0] == 9
DEV = torch.device("cuda" if HAS_CUDA else "cpu")
needs_deepgemm = [pytest.mark.gpu, pytest.mark.skipif(not (HOPPER and HAS_DEEPGEMM),
                                                      reason="needs a Hopper GPU and the deep_gemm module")]


# -- layouts (every device; the kernels run interpreted on CPU) ----------------------------------
@pytest.mark.parametrize("sizes, k", [([0, 130, 4, 0, 256], 256), ([12, 0, 132, 8], 384), ([7, 0, 129], 130),
                                      ([256, 0, 0], 128)])
@pytest.mark.parametrize("variant", ["column", "tile"])
def test_sat_per_group_storage_is_the_side_by_side_bytes_regrouped(sizes, k, variant):
    """SAT into per-group storage writes exactly the side-by-side codes, each group's [K, m_g]
    block contiguous at K * start_g (word, packed and byte kernels; empty groups; partial
    blocks), with the same scales, and equals the plain-PyTorch reference re-laid out."""
    q = fp8.quantize(make_activations(sum(sizes), k, "heavy", seed=sum(sizes) + k, device=DEV).bfloat16())
    side = fp8.scaling_aware_transpose(q, sizes, variant=variant)
    per = fp8.scaling_aware_transpose(q, sizes, variant=variant, storage="per_group")
    assert per.col_storage == fp8.ColStorage.PER_GROUP and per.data.shape == (k * sum(sizes),)
    assert torch.equal(per_group_from_side_by_side(side.data, sizes).view(torch.uint8), per.data.view(torch.uint8))
    assert torch.equal(per.scale_inv, side.scale_inv)
    ref = fp8.scaling_aware_transpose(q, sizes, variant=variant, storage="per_group", backend="reference")
    assert torch.equal(ref.data.view(torch.uint8), per.data.view(torch.uint8))
    for blk, start, rows in zip(fp8.group_column_blocks(per), [sum(sizes[:i]) for i in range(len(sizes))], sizes):
        assert torch.equal(blk.view(torch.uint8), side.data[:, start:start + rows].view(torch.uint8))
    assert torch.equal(side_by_side_from_per_group(per.data, k, sizes).view(torch.uint8), side.data.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_colwise_quantize_per_group_storage(dtype):
    """The column-wise quantizers (fused and word kernels) write the per-group storage too."""
    sizes, k = [0, 64, 130, 0, 16], 256
    x = make_activations(sum(sizes), k, "outlier", seed=5, device=DEV).to(dtype)
    side = fp8.quantize(x, "colwise", sizes)
    per = fp8.quantize(x, "colwise", sizes, col_storage="per_group")
    assert torch.equal(per_group_from_side_by_side(side.data, sizes).view(torch.uint8), per.data.view(torch.uint8))
    row, col = fp8.quantize_row_and_col(x, sizes, col_storage="per_group")
    assert torch.equal(col.data.view(torch.uint8), per.data.view(torch.uint8))
    assert torch.equal(col.dequantize(), side.dequantize())


def test_row_group_index_and_mn_major_scales():
    """The per-row group index (built on the device, kept with the groups) and the TMA-aligned
    MN-major scale layout (values unchanged, strides (1, M rounded up to 4), no copy when the
    scales already have it)."""
    sizes = [0, 128, 0, 256, 128]
    groups = GroupSplits.build(sizes, sum(sizes), DEV)
    idx = groups.row_group_index()
    assert idx.dtype == torch.int32 and idx is groups.row_group_index()
    assert torch.equal(idx.cpu(), torch.repeat_interleave(torch.arange(5, dtype=torch.int32), torch.tensor(sizes)))
    for m in (6, 8, 512):
        s = torch.rand(m, 3, device=DEV)
        t = deepgemm.mn_major_scales(s)
        assert torch.equal(t, s) and t.stride() == (1, -(-m // 4) * 4)
        assert deepgemm.mn_major_scales(t) is t


def test_grouped_layout_is_the_cumulative_row_ends_with_a_tuned_for_count_on_a_ladder():
    """DeepGEMM's psum layout is exactly the groups' cumulative padded row ends (empty groups
    repeat the previous end); the tuned-for rows per group cover the mean, stay within a quarter
    octave (or one 128-row block) of it, grow with it, and take few values over a routing's
    range, so a run settles on few kernel builds."""
    sizes = [0, 256, 128, 0, 384, 0]
    groups = GroupSplits.build(sizes, sum(sizes), DEV)
    args = deepgemm.grouped_rows_call_args(groups)
    layout = args["grouped_layout"]
    assert layout.dtype == torch.int32 and layout.is_contiguous() and args["use_psum_layout"]
    assert layout.cpu().tolist() == [0, 256, 384, 384, 768, 768]
    totals = sorted(set(range(0, 300_000, 997)) | {1, 127, 128, 129, 4096 * 8})
    for g in (1, 8, 32, 256):
        tuned = [deepgemm.expected_rows_per_group(total, g) for total in totals]
        assert tuned == sorted(tuned)
        for total, e in zip(totals, tuned):
            mean = -(-max(total, 1) // g)
            assert e % 128 == 0 and e >= mean and e <= max(mean * 5 // 4, mean + 127, 128), (total, g, e)
    # one GPU's routing at 4096 tokens x top-8 over 32 experts: the padded total moves over
    # 32768 .. 32768 + 127 * 32 rows; the tuned-for count takes at most two values there
    assert len({deepgemm.expected_rows_per_group(32768 + 128 * j, 32) for j in range(32)}) <= 2
    assert args["expected_m_for_psum_layout"] == deepgemm.expected_rows_per_group(768, 6) == 128


@pytest.mark.parametrize("m, k", [(130, 384), (256, 130), (7, 256)])
def test_mn_major_scales_written_by_the_producers(m, k):
    """Row-wise quantization (plain and with the grouped column-wise output) writes MN-major
    scales when asked: the same codes and scale values, strides (1, M rounded up to 4); SAT and
    dequantization read them to the same bits as row-major ones."""
    x = make_activations(m, k, "heavy", seed=m + k, device=DEV)
    sizes = [m - m // 2, m // 2]
    for xin in (x, x.bfloat16()):
        row = fp8.quantize(xin)
        mn = fp8.quantize(xin, scale_layout="mn_major")
        assert mn.scale_inv.stride() == (1, -(-m // 4) * 4) and torch.equal(mn.scale_inv, row.scale_inv)
        assert torch.equal(mn.data.view(torch.uint8), row.data.view(torch.uint8))
        assert torch.equal(mn.dequantize(), row.dequantize())
        r2, c2 = fp8.quantize_row_and_col(xin, sizes, scale_layout="mn_major", col_storage="per_group")
        assert r2.scale_inv.stride() == mn.scale_inv.stride() and torch.equal(r2.scale_inv, row.scale_inv)
        for variant in ("column", "tile"):
            a = fp8.scaling_aware_transpose(row, sizes, variant=variant)
            b = fp8.scaling_aware_transpose(mn, sizes, variant=variant)
            assert torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8)) and torch.equal(a.scale_inv, b.scale_inv)
    with pytest.raises(ValueError, match="scale_layout must be"):
        fp8.quantize(x, scale_layout="column_major")


def test_swiglu_writes_mn_major_scales():
    """The fused weighted SwiGLU + quantize (forward and backward) writes either scale layout,
    the same codes, scales and dw."""
    from megatron_fp8flow.ops.swiglu import swiglu_quant_backward, swiglu_quant_forward

    m, f = 70, 256
    x = make_activations(m, 2 * f, seed=9, device=DEV).bfloat16()
    w = torch.rand(m, device=DEV)
    g = make_activations(m, f, "heavy", seed=10, device=DEV).bfloat16()
    for fn, args in ((swiglu_quant_forward, (x, w)), (swiglu_quant_backward, (g, x, w))):
        a, b = fn(*args), fn(*args, scale_layout="mn_major")
        assert b[1].stride() == (1, -(-m // 4) * 4) and a[1].is_contiguous()
        assert torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8)) and torch.equal(a[1], b[1])


def test_permutation_writes_mn_major_scales_for_the_experts():
    """permute+pad and the unpad+unpermute backward write the scale layout their plan asks for
    (rows bound for the GEMMs), with the same bytes, scales and zero padding rows."""
    from megatron_fp8flow.ops.permute import permute_pad, plan_permutation, unpad_unpermute_backward

    g = torch.Generator().manual_seed(4)
    n, e, h = 40, 4, 256
    scores = torch.rand(n, e, generator=g)
    routing = torch.zeros(n, e, dtype=torch.bool)
    routing.scatter_(1, scores.topk(2, dim=1).indices, True)
    routing[:, 3] = False  # an empty expert
    counts = routing.sum(0).tolist()
    tokens = fp8.quantize(make_activations(n, h, "outlier", seed=5, device=DEV).bfloat16())
    probs = torch.rand(n, e, generator=g).to(DEV)
    outs = {}
    for mn in (False, True):
        perm = plan_permutation(routing.to(DEV), 2, 128, tokens_per_expert=counts, mn_major_scales=mn)
        outs[mn] = (permute_pad(tokens, probs, perm)[0], unpad_unpermute_backward(tokens, perm))
    for a, b in zip(outs[False], outs[True]):
        assert b.scale_inv.stride() == (1, -(-b.shape[0] // 4) * 4) and a.scale_inv.is_contiguous()
        assert torch.equal(a.scale_inv, b.scale_inv) and torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8))


def test_emulated_wgrad_reads_both_storages():
    sizes, n, k = [0, 48, 16, 130], 256, 384
    g = fp8.quantize(make_activations(sum(sizes), n, seed=7, device=DEV).bfloat16())
    x = fp8.quantize(make_activations(sum(sizes), k, "heavy", seed=8, device=DEV).bfloat16())
    side = gemm.grouped_wgrad(fp8.scaling_aware_transpose(g, sizes), fp8.scaling_aware_transpose(x, sizes),
                              backend="emulated")
    per = gemm.grouped_wgrad(fp8.scaling_aware_transpose(g, sizes, storage="per_group"),
                             fp8.scaling_aware_transpose(x, sizes, storage="per_group"), backend="emulated")
    for a, b in zip(side, per):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="one column-wise storage"):
        gemm.grouped_wgrad(fp8.scaling_aware_transpose(g, sizes), fp8.scaling_aware_transpose(x, sizes, storage="per_group"),
                           backend="emulated")


@pytest.mark.skipif(HAS_DEEPGEMM, reason="deep_gemm is installed here")
def test_deepgemm_missing_is_a_clear_error():
    with pytest.raises(RuntimeError, match=r"deep_gemm.*pip install --no-build-isolation deepinfer-gemm"):
        gemm.resolve_backend("deepgemm", DEV)
    if not HAS_CUDA:
        assert gemm.resolve_backend("auto", DEV) == "emulated"


# -- the backend on the GPU --------------------------------------------------------------------
def _stacked(n, k, count, seed):
    data = torch.empty(count, n, k, dtype=fp8.FP8_DTYPE, device=DEV)
    scale = torch.empty(count, n // 128, k // 128, device=DEV)
    return [fp8.quantize_weight(make_activations(n, k, "outlier", seed=seed + i, device=DEV) * 0.05,
                                out=(data[i], scale[i])) for i in range(count)]


def _bound(a64, b64, out):
    """|fp32-promoted FP8 product - fp64| (fp32 sums, tensor-core partial sums of ~14 bits
    inside each 128-deep block, DeepSeek-V3 sec. 3.3.2) plus the bf16 rounding of the output."""
    mag = a64.abs() @ b64.abs().t()
    return a64.shape[1] * 2.0**-23 * mag + 128 * 2.0**-13 * mag + out.abs() * 2.0**-8 + 1e-30


ROUTINGS = {"empty experts": [0, 256, 0, 384, 128], "one expert": [0, 0, 1024, 0],
            "skewed": [768, 128, 0, 256, 128, 128]}


@pytest.mark.parametrize("routing", list(ROUTINGS))
@pytest.mark.parametrize("n, k", [(512, 384), (256, 1024)])
def test_deepgemm_rowwise_matches_fp64(routing, n, k):
    """fprop and dgrad (transposed copies) against the exactly dequantized operands in fp64;
    padding rows (zero codes, the permutation's output) give zero rows."""
    sizes = ROUTINGS[routing]
    m = sum(sizes)
    x = make_activations(m, k, "heavy", seed=m + n, device=DEV)
    pads = torch.zeros(m, dtype=torch.bool, device=DEV)
    start = 0
    for rows in sizes:  # the last 40 rows of every group are padding, as the permutation writes them
        if rows:
            pads[start + rows - 40: start + rows] = True
        start += rows
    x[pads] = 0
    a = fp8.quantize(x.bfloat16())
    ws = _stacked(n, k, len(sizes), seed=3)
    out = gemm.grouped_rowwise_gemm(a, ws, sizes, backend="deepgemm")
    ref = gemm.grouped_rowwise_gemm(a, ws, sizes, backend="emulated", out_dtype=torch.float32)
    ad, start = a.dequantize().double(), 0
    for rows, w in zip(sizes, ws):
        if rows:
            wd, sl = w.dequantize().double(), slice(start, start + rows)
            assert (((out[sl].double() - ad[sl] @ wd.t()).abs()) <= _bound(ad[sl], wd, out[sl].double())).all()
        start += rows
    assert torch.count_nonzero(out[pads]) == 0
    assert float(torch.linalg.norm(out.double() - ref.double()) / torch.linalg.norm(ref.double())) < 5e-3
    g = fp8.quantize(make_activations(m, n, seed=m, device=DEV).bfloat16())
    dgrad = gemm.grouped_rowwise_gemm(g, ws, sizes, backend="deepgemm", transpose_weights=True)
    dref = gemm.grouped_rowwise_gemm(g, ws, sizes, backend="emulated", transpose_weights=True, out_dtype=torch.float32)
    assert float(torch.linalg.norm(dgrad.double() - dref.double()) / torch.linalg.norm(dref.double())) < 5e-3
    again = gemm.grouped_rowwise_gemm(a, ws, sizes, backend="deepgemm")
    assert torch.equal(again, out)  # the same bits twice


@pytest.mark.parametrize("routing", list(ROUTINGS))
@pytest.mark.parametrize("method", ["k_grouped", "dense", "cublas"])
def test_deepgemm_wgrad_candidates_match_emulation(routing, method):
    """Every wgrad candidate, accumulating into fp32 main gradients (one stacked buffer, so the
    k-grouped kernel accumulates in place) and written once in bf16, against the emulation.
    Bound: fp32 accumulation over the tokens, relative 1e-3 (measured ~1e-4)."""
    sizes = ROUTINGS[routing]
    m, n, k = sum(sizes), 256, 384
    g = fp8.quantize(make_activations(m, n, seed=11, device=DEV).bfloat16())
    x = fp8.quantize(make_activations(m, k, "outlier", seed=12, device=DEV).bfloat16())
    gc, xc = (fp8.scaling_aware_transpose(t, sizes, storage="per_group") for t in (g, x))
    ref = gemm.grouped_wgrad(gc, xc, backend="emulated")
    backend = deepgemm.DeepGemmBackend(wgrad_method=method)
    groups = gc.groups
    start = torch.randn(len(sizes), n, k, device=DEV)
    main = start.clone()
    got = backend.wgrad(gc, xc, groups, list(main.unbind(0)), torch.float32)
    for i, rows in enumerate(sizes):
        assert got[i].data_ptr() == main[i].data_ptr()
        if rows:
            assert float(torch.linalg.norm(main[i] - start[i] - ref[i]) / torch.linalg.norm(ref[i])) < 1e-3
        else:
            assert torch.equal(main[i], start[i])  # an empty expert leaves its gradient untouched
    once = backend.wgrad(gc, xc, groups, None, torch.bfloat16)
    for i, rows in enumerate(sizes):
        assert once[i].dtype == torch.bfloat16
        if rows:
            assert float(torch.linalg.norm(once[i].float() - ref[i]) / torch.linalg.norm(ref[i])) < 1e-2
        else:
            assert torch.count_nonzero(once[i]) == 0


@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_deepgemm_bf16_wgrad_accumulates_with_empty_experts(routing):
    """bf16 mode's k-grouped wgrad on DeepGEMM, empty experts included, against the exact
    product of the bf16 operands in fp64. Bound: fp32 accumulation over the rows and the fp32
    add into main_grad (relative 1e-4; torch's grouped GEMM, which rounds its products to bf16,
    is no reference at this bound). An empty expert's main_grad keeps its bits."""
    from megatron_fp8flow.gemm import bf16 as bf16_gemm

    sizes = ROUTINGS[routing]
    m, n, k = sum(sizes), 256, 384
    g = make_activations(m, n, seed=21, device=DEV).bfloat16()
    x = make_activations(m, k, "outlier", seed=22, device=DEV).bfloat16()
    groups = GroupSplits.build(sizes, m, DEV)
    like = [torch.empty(n, k, dtype=torch.bfloat16, device=DEV)] * len(sizes)
    start = torch.randn(len(sizes), n, k, device=DEV)
    got = start.clone()
    bf16_gemm.grouped_wgrad(g, x, groups, "deepgemm", list(got.unbind(0)), like)
    first = 0
    for i, rows in enumerate(sizes):
        if rows:
            rg, rx = g[first: first + rows].double(), x[first: first + rows].double()
            ref = rg.t() @ rx
            delta = got[i].double() - start[i].double()
            assert float(torch.linalg.norm(delta - ref) / torch.linalg.norm(ref)) < 1e-4
        else:
            assert torch.equal(got[i], start[i])
        first += rows


@pytest.mark.parametrize("mode", ["blockwise", "flow_double_quant", "flow"])
def test_deepgemm_block_matches_emulated_and_accumulates_main_grad(mode):
    """The whole block on DeepGEMM against the emulation (only accumulation order differs); with
    gradient_accumulation_fusion the weight gradients land in fp32 main_grad and autograd gets none."""
    sizes, h, f = [0, 256, 128, 384], 512, 256
    torch.manual_seed(0)
    mods = {be: FP8FlowGroupedMLP(len(sizes), h, f, ExpertPrecision(mode=mode, gemm_backend=be), dtype=torch.float32,
                                  device=DEV) for be in ("emulated", "deepgemm")}
    mods["deepgemm"].load_state_dict(mods["emulated"].state_dict())
    x = torch.randn(sum(sizes), h, device=DEV).bfloat16()
    probs = torch.rand(sum(sizes), device=DEV)
    dout = torch.randn(sum(sizes), h, device=DEV).bfloat16()
    res = {}
    for be, mod in mods.items():
        xr = x.clone().requires_grad_(True)
        out = mod(xr, sizes, probs)
        out.backward(dout)
        res[be] = [out, xr.grad] + [p.grad for p in mod.parameters()]
    for i, (p, q) in enumerate(zip(res["deepgemm"], res["emulated"])):
        rel = float(torch.linalg.norm(p.double() - q.double()) / (torch.linalg.norm(q.double()) + 1e-30))
        assert rel <= 2e-2, f"{mode} tensor {i}: {rel}"
    fused = FP8FlowGroupedMLP(len(sizes), h, f, ExpertPrecision(mode=mode, gemm_backend="deepgemm",
                                                                gradient_accumulation_fusion=True),
                              dtype=torch.float32, device=DEV)
    fused.load_state_dict(mods["emulated"].state_dict())
    params = list(fused.parameters())
    main = torch.zeros(len(params), *params[0].shape, device=DEV) if len({p.shape for p in params}) == 1 else None
    for i, p in enumerate(params):
        p.main_grad = torch.zeros(p.shape, device=DEV) if main is None else main[i]
    fused(x.clone().requires_grad_(True), sizes, probs).backward(dout)
    for p, q in zip(params, mods["deepgemm"].parameters()):
        assert p.grad is None
        assert float(torch.linalg.norm(p.main_grad - q.grad.float()) / (torch.linalg.norm(q.grad.float()) + 1e-30)) < 1e-2


@pytest.mark.parametrize("mode", ["bf16", "flow"])
def test_deepgemm_block_never_synchronizes(mode):
    """Forward + backward on DeepGEMM (bf16 mode: its bf16 grouped GEMMs) issue no host sync."""
    sizes, h, f = [128, 0, 256, 128], 512, 256
    mod = FP8FlowGroupedMLP(len(sizes), h, f, ExpertPrecision(mode=mode, gemm_backend="deepgemm",
                                                              bf16_gemm="deepgemm"), device=DEV)
    x = torch.randn(sum(sizes), h, device=DEV).bfloat16()
    probs = torch.rand(sum(sizes), device=DEV)
    mod(x.clone().requires_grad_(True), sizes, probs).sum().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mod(x.clone().requires_grad_(True), sizes, probs).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


_BUILD_COUNT_SCRIPT = """
import os, random, sys, torch
from megatron_fp8flow import fp8, gemm
rng = random.Random(7)
ws = [fp8.quantize_weight(torch.randn(512, 384, device="cuda") * 0.05) for _ in range(8)]
for step in range(12):  # skewed routings whose padded totals move by up to 127 rows per group
    sizes = [128 * rng.randint(0, 8) for _ in range(7)]
    sizes.append(8 * 1024 + 128 * rng.randint(0, 7) - sum(sizes))
    a = fp8.quantize(torch.randn(sum(sizes), 384, device="cuda").bfloat16())
    gemm.grouped_rowwise_gemm(a, ws, sizes, backend="deepgemm")
torch.cuda.synchronize()
print(len(os.listdir(os.path.join(os.environ["DG_JIT_CACHE_DIR"], "cache"))))
"""


_WGRAD_BUILD_COUNT_SCRIPT = """
import os, random, torch
from megatron_fp8flow import fp8
from megatron_fp8flow.fp8.format import GroupSplits
from megatron_fp8flow.gemm import bf16 as bf16_gemm, deepgemm
rng = random.Random(8)
n, k, experts = 512, 384, 8
fp8_main = torch.zeros(experts, n, k, device="cuda")
bf16_main = torch.zeros(experts, n, k, device="cuda")
like = [torch.empty(n, k, dtype=torch.bfloat16, device="cuda")] * experts
backend = deepgemm.DeepGemmBackend(wgrad_method="k_grouped")
for step in range(12):  # routings with a different set of empty experts each time
    sizes = [128 * rng.choice([0, 0, 1, 2, 3, 5]) for _ in range(experts)]
    sizes[rng.randrange(experts)] += 128
    m = sum(sizes)
    g = torch.randn(m, n, device="cuda").bfloat16()
    x = torch.randn(m, k, device="cuda").bfloat16()
    gc, xc = (fp8.scaling_aware_transpose(fp8.quantize(t), sizes, storage="per_group") for t in (g, x))
    backend.wgrad(gc, xc, gc.groups, list(fp8_main.unbind(0)), torch.float32)
    bf16_gemm.grouped_wgrad(g, x, GroupSplits.build(sizes, m, "cuda"), "deepgemm", list(bf16_main.unbind(0)), like)
torch.cuda.synchronize()
names = os.listdir(os.path.join(os.environ["DG_JIT_CACHE_DIR"], "cache"))
print(sum(name.startswith("sm90_fp8_gemm_1d1d") for name in names),
      sum(name.startswith("sm90_bf16_k_grouped_gemm") for name in names))
"""


def _kernel_builds(script, tmp_path):
    """What ``script`` prints last, run in a process of its own with an empty kernel cache."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, DG_JIT_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return [int(v) for v in out.stdout.strip().splitlines()[-1].split()]


def test_deepgemm_routing_changes_build_few_kernels(tmp_path):
    """Twelve routings of one GEMM shape, their totals within one step of the ladder, build at
    most two kernels (each new row count used to be able to pick a new configuration, a JIT
    build of seconds)."""
    (builds,) = _kernel_builds(_BUILD_COUNT_SCRIPT, tmp_path)
    assert builds <= 2


def test_deepgemm_wgrad_empty_experts_build_few_kernels(tmp_path):
    """Twelve routings of one shape, each with other experts empty, through both k-grouped
    wgrads (FP8 and bf16): every launch covers all experts, so the group count compiled into the
    kernel stays one; only the tuning for the longest group may pick another configuration
    (launching over the runs of non-empty experts built a kernel per run length)."""
    fp8_builds, bf16_builds = _kernel_builds(_WGRAD_BUILD_COUNT_SCRIPT, tmp_path)
    assert fp8_builds <= 3 and bf16_builds <= 3, (fp8_builds, bf16_builds)


for _name in list(globals()):
    if _name.startswith("test_deepgemm_") and _name != "test_deepgemm_missing_is_a_clear_error":
        for _mark in needs_deepgemm:
            globals()[_name] = _mark(globals()[_name])
