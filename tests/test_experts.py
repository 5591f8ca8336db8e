"""FP8FlowGroupedMLP: every precision mode against an fp64 reference MLP, exactness of SAT
inside the block (flow == flow_double_quant bit for bit), FP8 inputs through autograd, and
checkpoint key mapping."""

import pytest
import torch

from megatron_fp8flow import fp8
from megatron_fp8flow.fp8.activation import FP8Activation
from megatron_fp8flow.moe import ExpertPrecision, FP8FlowGroupedMLP, grouped_to_sequential, sequential_to_grouped

H, F = 128, 256
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: kernels run interpreted
SPLITS = [0, 48, 16, 80]  # an empty expert, padded sizes


def _make(mode, seed=0, backend="emulated", h=H, f=F):
    torch.manual_seed(seed)
    return FP8FlowGroupedMLP(len(SPLITS), h, f, ExpertPrecision(mode=mode, gemm_backend=backend),
                             dtype=torch.float32).to(DEV)


def _inputs(seed=1, h=H):
    g = torch.Generator().manual_seed(seed)
    m = sum(SPLITS)
    x = torch.randn(m, h, generator=g).bfloat16()
    probs = torch.rand(m, generator=g)
    dout = torch.randn(m, h, generator=g).bfloat16()
    return x.to(DEV), probs.to(DEV), dout.to(DEV)


def _reference(module, x, probs, dout):
    """Plain fp64 MLP with the same weights: output and gradients (x, probs, fc1, fc2)."""
    x64 = x.cpu().double().requires_grad_(True)
    p64 = probs.cpu().double().requires_grad_(True)
    w1 = [w.detach().cpu().double().requires_grad_(True) for w in module.linear_fc1.weights()]
    w2 = [w.detach().cpu().double().requires_grad_(True) for w in module.linear_fc2.weights()]
    outs, start = [], 0
    for m, a, b in zip(SPLITS, w1, w2):
        xs = x64[start : start + m]
        y1 = xs @ a.t()
        h = torch.nn.functional.silu(y1[:, :F]) * y1[:, F:] * p64[start : start + m, None]
        outs.append(h @ b.t())
        start += m
    out = torch.cat(outs)
    out.backward(dout.cpu().double())
    return out, x64.grad, p64.grad, [w.grad for w in w1], [w.grad for w in w2]


def _run(module, x, probs, dout):
    xr = x.clone().requires_grad_(True)
    pr = probs.clone().requires_grad_(True)
    out = module(xr, SPLITS, pr)
    out.backward(dout)
    return (out, xr.grad, pr.grad, [w.grad.clone() for w in module.linear_fc1.weights()],
            [w.grad.clone() for w in module.linear_fc2.weights()])


def _rel(a, b):
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return float(torch.linalg.norm(a - b) / (torch.linalg.norm(b) + 1e-30))


@pytest.mark.parametrize("mode, tol", [("bf16", 2e-2), ("blockwise", 0.1), ("flow_double_quant", 0.1), ("flow", 0.1)])
def test_modes_against_fp64_reference(mode, tol):
    """Relative Frobenius error vs the unquantized fp64 math. bf16: a few bf16 roundings
    (2^-9 each) -> well under 2%. FP8: every product sees four E4M3 operands (activation and
    weight of two GEMMs), each with <= 2^-4 / sqrt(3) ~ 3.6% RMS rounding error, which adds to
    ~7% in quadrature: bound 10% (measured: 6.5%)."""
    module = _make(mode)
    x, probs, dout = _inputs()
    got = _run(module, x, probs, dout)
    exp = _reference(module, x, probs, dout)
    names = ["out", "dx", "dprobs", "dw1", "dw2"]
    for name, g, e in zip(names, got, exp):
        if isinstance(g, list):
            for i, (gi, ei) in enumerate(zip(g, e)):
                if SPLITS[i]:
                    assert _rel(gi, ei) < tol, f"{mode} {name}[{i}]"
                else:
                    assert torch.count_nonzero(gi) == 0, f"{mode} {name}[{i}] of an empty expert"
        else:
            assert _rel(g, e) < tol, f"{mode} {name}: {_rel(g, e)}"


def test_flow_equals_double_quant_bit_for_bit():
    """With power-of-two scales SAT is exactly dequantize + requantize, so the whole block agrees."""
    x, probs, dout = _inputs(seed=3)
    a = _run(_make("flow"), x, probs, dout)
    b = _run(_make("flow_double_quant"), x, probs, dout)
    for ga, gb in zip(a, b):
        for u, v in zip(ga if isinstance(ga, list) else [ga], gb if isinstance(gb, list) else [gb]):
            assert torch.equal(u, v)


def test_fp8_activation_input_and_gradient():
    """X8 arrives as an FP8Activation (as from the dispatcher); its gradient comes back through autograd."""
    module = _make("flow")
    x, probs, dout = _inputs(seed=4)
    q = fp8.quantize(x)
    carrier = FP8Activation(q, torch.bfloat16, requires_grad=True)
    out = module(carrier, SPLITS, probs)
    out.backward(dout)
    assert carrier.grad is not None and carrier.grad.shape == x.shape and carrier.grad.dtype == torch.bfloat16
    ref = _run(_make("flow"), q.dequantize(torch.bfloat16), probs, dout)  # same X8 after quantization
    assert torch.equal(out, ref[0]) and torch.equal(carrier.grad, ref[1])
    with pytest.raises(NotImplementedError, match="dequantize"):
        carrier + 1
    # The output gradient may arrive as FP8 too (the combine's backward sends it so): the same
    # result as its dequantized bf16 values, which re-quantize to the same codes.
    d8 = fp8.quantize(dout)
    grads = []
    for d in (FP8Activation(d8, torch.bfloat16), d8.dequantize(torch.bfloat16)):
        module.zero_grad(set_to_none=True)
        carrier = FP8Activation(q, torch.bfloat16, requires_grad=True)
        module(carrier, SPLITS, probs).backward(d)
        grads.append((carrier.grad, module.linear_fc1.weight1.grad.clone(), module.linear_fc2.weight3.grad.clone()))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_checkpoint_keys_round_trip():
    module = _make("flow")
    sd = {f"decoder.layers.0.mlp.experts.{k}": v for k, v in module.state_dict().items()}
    seq = grouped_to_sequential(sd)
    assert "decoder.layers.0.mlp.experts.local_experts.2.linear_fc1.weight" in seq
    assert seq["decoder.layers.0.mlp.experts.local_experts.2.linear_fc1.weight"].shape == (2 * F, H)
    back = sequential_to_grouped(seq)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    fresh = _make("flow", seed=9)
    fresh.load_state_dict(sequential_to_grouped(grouped_to_sequential(module.state_dict())))
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), module.parameters()))


def test_parameters_share_one_stacked_buffer():
    """Each linear's expert weights are views of one [E, N, K] buffer (the grouped GEMMs read it
    without a copy), and loading a state dict keeps them so."""
    from megatron_fp8flow import gemm

    module = FP8FlowGroupedMLP(len(SPLITS), H, F, ExpertPrecision(mode="bf16"), device=DEV)
    other = FP8FlowGroupedMLP(len(SPLITS), H, F, ExpertPrecision(mode="bf16"), device=DEV)
    other.load_state_dict(module.state_dict())
    for lin in (other.linear_fc1, other.linear_fc2):
        ws = lin.weights()
        view = gemm.stacked_view_or_copy(ws)
        assert view.data_ptr() == ws[0].data_ptr() and view.shape[0] == len(SPLITS)
        assert all(torch.equal(view[i], w) for i, w in enumerate(ws))
    # A weight moved elsewhere (as a data-parallel wrapper does) is stacked by copy, same values.
    ws = other.linear_fc1.weights()
    ws[2].data = ws[2].data.clone()
    copy = gemm.stacked_view_or_copy(ws)
    assert copy.data_ptr() != ws[0].data_ptr() and all(torch.equal(copy[i], w) for i, w in enumerate(ws))


def test_expert_errors():
    with pytest.raises(ValueError, match="hidden_size % 128 == 0"):
        FP8FlowGroupedMLP(2, 100, 128)
    with pytest.raises(ValueError, match="unknown mode 'fp4' \\(flag --moe-fp8-flow-mode\\)"):
        ExpertPrecision(mode="fp4")
    module = _make("flow")
    x, probs, _ = _inputs()
    with pytest.raises(ValueError, match="must sum to the number of rows"):
        module(x, [1, 2, 3, 4], probs)
    with pytest.raises(ValueError, match="4 experts"):
        module(x, [sum(SPLITS)], probs)
    bad = x.clone()
    bad[3, 3] = float("nan")
    dbg = FP8FlowGroupedMLP(len(SPLITS), H, F, ExpertPrecision(check_finite=True, gemm_backend="emulated")).to(DEV)
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        dbg(bad, SPLITS, probs)
    assert module(bad, SPLITS, probs).isnan().any()  # without the debug check NaN propagates


@pytest.mark.parametrize("mode", ["flow", "flow_double_quant"])
def test_recompute_gives_identical_gradients(mode):
    x, probs, dout = _inputs(seed=6)
    torch.manual_seed(0)
    plain = _make(mode)
    torch.manual_seed(0)
    rec = FP8FlowGroupedMLP(len(SPLITS), H, F, ExpertPrecision(mode=mode, gemm_backend="emulated",
                                                               recompute_experts=True), dtype=torch.float32).to(DEV)
    a, b = _run(plain, x, probs, dout), _run(rec, x, probs, dout)
    for ga, gb in zip(a, b):
        for u, v in zip(ga if isinstance(ga, list) else [ga], gb if isinstance(gb, list) else [gb]):
            assert torch.equal(u, v)
    with pytest.raises(ValueError, match="recompute_experts"):
        ExpertPrecision(mode="bf16", recompute_experts=True)


@pytest.mark.parametrize("mode", ["blockwise", "flow"])
def test_forward_copies_are_dropped_without_changing_gradients(mode, monkeypatch):
    """A call that quantizes its own weights frees their forward FP8 copies after the forward
    GEMMs (the backward quantizes transposed copies from the source weights); a cached set keeps
    them for the next microbatch. Gradients are bit for bit those of the cached set, which
    never drops."""
    from megatron_fp8flow.moe import experts

    dropped = []
    real_drop = experts._FP8Weights.drop_forward_copies

    def spy(self):
        real_drop(self)
        dropped.append((self.fc1, self.fc2, sorted(self._pow2)))

    monkeypatch.setattr(experts._FP8Weights, "drop_forward_copies", spy)
    x, probs, dout = _inputs(seed=9)
    own = _run(_make(mode), x, probs, dout)
    assert dropped == [(None, None, ["fc1", "fc2"])]
    cached_module = _make(mode)
    xr, pr = x.clone().requires_grad_(True), probs.clone().requires_grad_(True)
    out = cached_module(xr, SPLITS, pr, is_first_microbatch=True)
    out.backward(dout)
    assert len(dropped) == 1 and cached_module._fp8_cache[1].fc1 is not None  # kept for later microbatches
    cached = (out, xr.grad, pr.grad, [w.grad for w in cached_module.linear_fc1.weights()],
              [w.grad for w in cached_module.linear_fc2.weights()])
    for ga, gb in zip(own, cached):
        for u, v in zip(ga if isinstance(ga, list) else [ga], gb if isinstance(gb, list) else [gb]):
            assert torch.equal(u, v)


def test_expert_benchmark_routing_and_render():
    """The benchmark's routings sum to tokens x top-k (padded) and its table renders; the timing
    itself needs a GPU (`fp8flow bench experts`)."""
    from megatron_fp8flow.benchmarks import expert_block as eb

    for experts in (8, 16, 32):
        for routing in ("balanced", "skewed"):
            sizes = eb.group_sizes(experts, routing)
            assert len(sizes) == experts and all(s % 16 == 0 for s in sizes)
            assert eb.TOKENS * eb.TOPK <= sum(sizes) < eb.TOKENS * eb.TOPK + 16 * experts
    assert eb.group_sizes(8, "skewed")[0] > 2 * eb.group_sizes(8, "skewed")[-1]
    row = eb.BlockRow("flow", False, 8, "balanced", 32768, 10.0, 900.0, 1.0, 2.0, 0.35, 7.0, 0.7)
    from dataclasses import asdict

    assert "| 8 | balanced | flow | no |" in eb.render({"gpu": "x", "torch": "y", "rows": [asdict(row)]})


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9),
                    reason="cuBLAS blockwise FP8 GEMMs need a Hopper GPU")
@pytest.mark.parametrize("mode", ["blockwise", "flow"])
def test_cublas_block_matches_emulated(mode):
    """The whole block through cuBLAS against the exact-dequantize emulation: only the GEMMs'
    accumulation order and fp32 rounding differ (the GEMMs alone agree to ~1e-4 relative; the
    block's FP8 casts of GEMM outputs can flip a code either way, so the bound is looser).
    Sizes that are multiples of 512: see test_gemm for the others."""
    x, probs, dout = _inputs(seed=8, h=512)
    emulated = _make(mode, h=512, f=512)
    fast = _make(mode, backend="cublas", h=512, f=512)
    for name, u, v in zip(["out", "dx", "dprobs", "dw1", "dw2"], _run(fast, x, probs, dout), _run(emulated, x, probs, dout)):
        for i, (p, q) in enumerate(zip(u if isinstance(u, list) else [u], v if isinstance(v, list) else [v])):
            assert _rel(p, q) <= 2e-2, f"{mode} {name}[{i}]: {_rel(p, q)}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-device synchronization is a GPU matter")
@pytest.mark.parametrize("mode", ["bf16", "blockwise", "flow"])
def test_block_never_synchronizes_with_the_gpu(mode):
    """Forward and backward of a block with host-side group sizes issue no host-device sync
    (a sync per MoE layer would stall the host's run-ahead of the GPU)."""
    module = _make(mode, backend="auto", h=512, f=512)
    x, probs, dout = _inputs(seed=12, h=512)
    xr = x.clone().requires_grad_(True)
    _run(module, x, probs, dout)  # first call: allocations, compilation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = module(xr, SPLITS, probs)
        out.backward(dout)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_fp8_weight_cache_across_microbatches(monkeypatch):
    """is_first_microbatch=True quantizes the weights once; False reuses them bit for bit; an
    in-place weight update since then is caught by the version counter and re-quantized."""
    from megatron_fp8flow.moe import experts as ex

    calls = []
    real = ex.fp8.quantize_weights

    def counting(ws, *a, **k):  # the forward copies (the transposed ones are checked below)
        calls.extend([] if k.get("transposed") else [1] * len(ws))
        return real(ws, *a, **k)

    monkeypatch.setattr(ex.fp8, "quantize_weights", counting)
    module = _make("flow")
    x, probs, dout = _inputs(seed=11)
    with pytest.raises(ValueError, match="is_first_microbatch=False but no FP8 weights"):
        module(x, SPLITS, probs, is_first_microbatch=False)
    plain = _run(module, x, probs, dout)
    n = len(calls)
    assert n == 2 * len(SPLITS)
    for first in (True, False):
        module.zero_grad(set_to_none=True)
        xr, pr = x.clone().requires_grad_(True), probs.clone().requires_grad_(True)
        out = module(xr, SPLITS, pr, is_first_microbatch=first)
        out.backward(dout)
        assert torch.equal(out, plain[0]) and torch.equal(xr.grad, plain[1])
    assert len(calls) == 2 * n  # quantized for True, reused for False
    # The transposed copies the dgrad takes (cuBLAS, emulation) are exact and made once per step.
    cached = module._fp8_cache[1]
    fc1_t = cached.transposed("fc1")
    assert fc1_t is cached.transposed("fc1")
    for w, wt in zip(cached.fc1, fc1_t):
        ref = w.t()
        assert torch.equal(wt.data.view(torch.uint8), ref.data.view(torch.uint8))
        assert torch.equal(wt.scale_inv, ref.scale_inv) and wt.shape == ref.shape
    with torch.no_grad():
        module.linear_fc1.weight1.mul_(2.0)  # an optimizer step the caller did not announce
    stale_checked = module(x, SPLITS, probs, is_first_microbatch=False)
    fresh = module(x, SPLITS, probs)
    assert torch.equal(stale_checked, fresh) and not torch.equal(fresh, plain[0])


@pytest.mark.parametrize("mode", ["blockwise", "flow"])
def test_graph_kept_after_backward_holds_no_cached_fp8_weights(mode):
    """A training loop keeps its last loss, and so the graph's nodes, until the next step's
    forward: after the backward they must not hold the step's cached FP8 weight set (every
    layer's would then be alive twice at the next step's peak)."""
    import gc
    import weakref

    from megatron_fp8flow.moe import experts as ex

    module = _make(mode)
    x, probs, dout = _inputs(seed=13)
    weights = module.linear_fc1.weights() + module.linear_fc2.weights()
    cached = ex.quantize_expert_weights(weights, module.num_experts)
    cached.transposed("fc1")  # as the dgrad of the emulation and cuBLAS makes them
    alive = weakref.ref(cached)
    groups = ex.GroupSplits.build(SPLITS, x.shape[0], x.device)
    out = ex.run_expert_block(x.clone().requires_grad_(True), probs.clone().requires_grad_(True), groups,
                              module.num_experts, module.precision, weights, cached)
    out.backward(dout)
    assert out.grad_fn is not None  # the graph's nodes are still here
    del cached
    gc.collect()
    assert alive() is None


@pytest.mark.parametrize("mode", ["blockwise", "flow"])
def test_triton_gemm_block_matches_emulated(mode):
    """The whole block on the single-launch Triton GEMMs against the exact-dequantize emulation
    (same bound as cuBLAS: only accumulation order differs, and FP8 casts of GEMM outputs may flip)."""
    x, probs, dout = _inputs(seed=12)
    emulated, fast = _make(mode), _make(mode, backend="triton")
    for name, u, v in zip(["out", "dx", "dprobs", "dw1", "dw2"], _run(fast, x, probs, dout), _run(emulated, x, probs, dout)):
        for i, (p, q) in enumerate(zip(u if isinstance(u, list) else [u], v if isinstance(v, list) else [v])):
            assert _rel(p, q) <= 2e-2, f"{mode} {name}[{i}]: {_rel(p, q)}"
