"""FP8FlowGroupedMLP: the routed-expert MLP (fc1 -> weighted SwiGLU -> fc2) for all local experts.

One module, four precision modes (so benchmarks compare like with like):

* ``bf16``: bf16 grouped GEMMs (``torch._grouped_mm``, one launch per product), our fused bf16
  SwiGLU; the BF16 baseline.
* ``blockwise``: the BF16-centric FP8 baseline: bf16 between operators, each GEMM quantizes its
  row-wise and column-wise operands from bf16 (TE's blockwise recipe).
* ``flow_double_quant``: FP8 flow, column-wise operands by dequantize + requantize.
* ``flow`` (default): FP8 flow, column-wise operands by the scaling-aware transpose, built
  lazily in the backward from the saved row-wise FP8 tensors.

What ``flow`` saves between forward and backward: X8 (+ scales), fc1 output Y1 (bf16, needed
by the SwiGLU backward), H8 (+ scales), probs, the FP8 weights, the group sizes. Lazy
column-wise copies, not eager ones: the SAT does the same work in either pass, so building X8's
and H8's column-wise copies in the forward could only move time, never save it, and would keep a
second FP8 copy of both alive between the passes (+0.3 GB, +52% held memory, at DeepSeek-V3
shapes with 32768 rows).

Parameters are named like Megatron's ``TEGroupedMLP`` (``linear_fc1.weight{i}`` [2F, H],
``linear_fc2.weight{i}`` [H, F]); see :mod:`.checkpoint` for ``SequentialMLP`` keys.

With ``recompute_experts`` only X8 (+ scales), probs, group sizes (and the weight parameters,
which live anyway) are kept; the backward re-runs fc1 and the SwiGLU (and the weight
quantization, unless the FP8 weights are cached).

FP8 weights: quantized 128x128 once per call by default; with ``is_first_microbatch`` (the
TransformerEngine convention) once per step and shared by all its microbatches. Reuse is
guarded by the weights' version counters, so an in-place update the caller did not announce
is re-quantized rather than trained on stale copies.

The GEMMs go through :mod:`megatron_fp8flow.gemm` (emulated on CPU, cuBLAS on Hopper; the
cuBLAS path is tested against the emulation on the H200).
"""

from __future__ import annotations

import logging
from typing import List, Optional, Sequence, Union

import torch
from torch import nn

from .. import fp8, gemm
from ..gemm import bf16 as bf16_gemm
from ..fp8.activation import FP8Activation, fp8_payload
from ..fp8.audit import cast_point
from ..fp8.format import BlockwiseFP8Tensor, GroupSplits
from .settings import MODES, ExpertPrecision  # noqa: F401  (MODES re-exported)
from ..ops.swiglu import swiglu_quant_backward, swiglu_quant_forward

logger = logging.getLogger(__name__)



def _main_grads(weights, cfg: ExpertPrecision) -> Optional[List[torch.Tensor]]:
    """The weights' fp32 main gradients when the GEMMs should accumulate into them, else None."""
    if not cfg.gradient_accumulation_fusion:
        return None
    grads = [getattr(w, "main_grad", None) for w in weights]
    if any(g is None for g in grads):
        raise ValueError("gradient_accumulation_fusion=True needs every expert weight to carry an fp32 "
                         "'main_grad' buffer (Megatron's DDP attaches them)")
    return grads


def _returned_grads(weights, grads, accumulated: bool):
    """What autograd gets for the weights. Accumulated into main_grad: Megatron's convention (a
    dummy gradient and ``grad_added_to_main_grad`` where the weight has that flag, else None)."""
    if not accumulated:
        return [g.to(w.dtype) for g, w in zip(grads, weights)]
    out = []
    for w in weights:
        if hasattr(w, "grad_added_to_main_grad"):
            w.grad_added_to_main_grad = True
            out.append(_stand_in_grad(w))
        else:
            out.append(None)
    return out


def _stand_in_grad(w: torch.Tensor) -> torch.Tensor:
    """The gradient autograd hands to DDP's hook for a weight whose gradient is already in
    main_grad. The hook drops it unread, so it borrows main_grad's bytes instead of allocating:
    Megatron's layers allocate an empty one per weight, but here every expert weight's would be
    alive at once (the size of all the layer's expert weights). A weight whose hook adds
    ``.grad`` anyway (``zero_out_wgrad``) gets zeros, as in Megatron."""
    if getattr(w, "zero_out_wgrad", False):
        return torch.zeros(w.shape, dtype=w.dtype, device=w.device)
    main, nbytes = w.main_grad, w.numel() * w.element_size()
    if main.is_contiguous() and main.numel() * main.element_size() >= nbytes:
        return main.reshape(-1).view(torch.uint8)[:nbytes].view(w.dtype).view(w.shape)
    return torch.empty(w.shape, dtype=w.dtype, device=w.device)


class _ExpertMLPFunction(torch.autograd.Function):
    """The expert block in every mode. The mode families share only this plumbing:
    :func:`_bf16_forward`/:func:`_bf16_backward` and :func:`_fp8_forward`/:func:`_fp8_backward`."""

    @staticmethod
    def forward(ctx, x, probs, cfg: ExpertPrecision, groups: GroupSplits, num_experts: int, fp8_weights, *weights):
        ctx.cfg, ctx.groups, ctx.num_experts = cfg, groups, num_experts
        ctx.weights = weights  # parameters: for main_grad and the returned-gradient convention
        probs = probs.float()
        if cfg.mode == "bf16":
            return _bf16_forward(ctx, x, probs, cfg, groups, weights, num_experts)
        return _fp8_forward(ctx, x, probs, cfg, groups, weights, num_experts, fp8_weights)

    @staticmethod
    def backward(ctx, dout):
        cfg, weights = ctx.cfg, ctx.weights
        main = _main_grads(weights, cfg)
        if cfg.mode == "bf16":
            dx, dprobs, grads = _bf16_backward(ctx, dout, main)
        else:
            dx, dprobs, grads = _fp8_backward(ctx, dout, main)
        # The graph's nodes outlive the backward while the caller keeps the loss: they must not
        # keep a cached FP8 weight set (every layer's) alive into the next step.
        ctx.weights = ctx.fp8_weights = None
        return (dx, dprobs, None, None, None, None, *_returned_grads(weights, grads, main is not None))


def _bf16_forward(ctx, x, probs, cfg, groups, weights, e):
    x8 = fp8_payload(x)
    xb = (x8.dequantize(torch.bfloat16) if x8 is not None else x).bfloat16()
    engine = bf16_gemm.resolve_engine(cfg.bf16_gemm, xb.device, groups.host_sizes(),
                                      into_main_grad=cfg.gradient_accumulation_fusion)
    w1 = gemm.stacked_view_or_copy([w.bfloat16() for w in weights[:e]])
    w2 = gemm.stacked_view_or_copy([w.bfloat16() for w in weights[e:]])
    y1 = bf16_gemm.grouped_mm(xb, w1, groups, engine)
    _, _, h = swiglu_quant_forward(y1, probs, torch.bfloat16, quantize=False)
    out = bf16_gemm.grouped_mm(h, w2, groups, engine)
    ctx.engine = engine
    ctx.save_for_backward(xb, y1, h, probs, w1, w2)
    return out


def _bf16_backward(ctx, dout, main):
    xb, y1, h, probs, w1, w2 = ctx.saved_tensors
    groups, e, engine, weights = ctx.groups, ctx.num_experts, ctx.engine, ctx.weights
    payload = fp8_payload(dout)
    d = (dout.bfloat16() if payload is None else payload.dequantize(torch.bfloat16)).contiguous()
    dh = bf16_gemm.grouped_mm(d, w2, groups, engine, transpose=False)
    dw2 = bf16_gemm.grouped_wgrad(d, h, groups, engine, main[e:] if main else None, weights[e:])
    dy1, _, dprobs = swiglu_quant_backward(dh, y1, probs, dx_dtype=torch.bfloat16)
    dx = bf16_gemm.grouped_mm(dy1, w1, groups, engine, transpose=False)
    dw1 = bf16_gemm.grouped_wgrad(dy1, xb, groups, engine, main[:e] if main else None, weights[:e])
    return dx, dprobs, list(dw1) + list(dw2)


def _fp8_forward(ctx, x, probs, cfg, groups, weights, e, fp8_weights):
    # One backend for the whole call, and the column-wise storage its wgrad reads.
    impl = gemm.backend_for_groups(cfg.gemm_backend, probs.device, groups.host_sizes())
    ctx.backend = be = impl.name
    lay = impl.layouts(probs.device)
    ctx.col_storage, ctx.scale_layout = lay.colwise_storage, lay.row_scales
    x8 = fp8_payload(x)
    fw = fp8_weights if fp8_weights is not None else _quantize_weights(weights, e)
    ctx.fp8_weights = fp8_weights
    if cfg.mode == "blockwise":
        xb = (x8.dequantize(torch.bfloat16) if x8 is not None else x).bfloat16()
        x_row, x_col = fp8.quantize_row_and_col(xb, groups, col_storage=ctx.col_storage, scale_layout=ctx.scale_layout)
        y1 = gemm.grouped_rowwise_gemm(x_row, fw.fc1, groups, backend=be)
        _, _, h = swiglu_quant_forward(y1, probs, torch.bfloat16, quantize=False)
        h_row, h_col = fp8.quantize_row_and_col(h, groups, col_storage=ctx.col_storage, scale_layout=ctx.scale_layout)
        out = gemm.grouped_rowwise_gemm(h_row, fw.fc2, groups, backend=be)
        _drop_if_own(fw, fp8_weights, be, out.device)
        ctx.saved = (x_col, h_col, fw)
        ctx.save_for_backward(y1, probs)
        return out
    if x8 is None:
        x8 = fp8.quantize(x, scale_layout=ctx.scale_layout)
    y1, h8, out = _flow_forward(x8, probs, fw.fc1, fw.fc2, groups, be, scale_layout=ctx.scale_layout)
    if cfg.recompute_experts:
        ctx.saved = (x8, None, None)
        ctx.save_for_backward(probs)
    else:
        _drop_if_own(fw, fp8_weights, be, out.device)
        ctx.saved = (x8, h8, fw)
        ctx.save_for_backward(y1, probs)
    return out


def _fp8_backward(ctx, dout, main):
    cfg, groups, e, be, storage = ctx.cfg, ctx.groups, ctx.num_experts, ctx.backend, ctx.col_storage
    x_saved, h_saved, fw = ctx.saved
    ctx.saved = None
    if cfg.recompute_experts:
        (probs,) = ctx.saved_tensors
        fw = ctx.fp8_weights if ctx.fp8_weights is not None else _quantize_weights(ctx.weights, e)
        y1, h_saved, _ = _flow_forward(x_saved, probs, fw.fc1, fw.fc2, groups, be, need_output=False,
                                       scale_layout=ctx.scale_layout)
    else:
        y1, probs = ctx.saved_tensors
    if cfg.mode == "blockwise":
        dout_b = dout if fp8_payload(dout) is None else fp8_payload(dout).dequantize(torch.bfloat16)
        d_row, d_col = fp8.quantize_row_and_col(dout_b.bfloat16(), groups, col_storage=storage,
                                                scale_layout=ctx.scale_layout)
        x_col, h_col = x_saved, h_saved
    else:
        d_row = fp8_payload(dout) if fp8_payload(dout) is not None else fp8.quantize(dout, scale_layout=ctx.scale_layout)
        d_col = _colwise(d_row, groups, cfg, storage)
        h_col = _colwise(h_saved, groups, cfg, storage)
    dh = _dgrad(d_row, fw, "fc2", groups, be)
    # Gradients come out in the parameters' dtype (one write, no fp32 copy for bf16 weights),
    # or are added into the fp32 main gradients by the GEMM.
    wgrad_dtype = torch.bfloat16 if ctx.weights[0].dtype == torch.bfloat16 else torch.float32
    dw2 = gemm.grouped_wgrad(d_col, h_col, accumulate_into=main[e:] if main else None, backend=be,
                             out_dtype=wgrad_dtype)
    del d_col, h_col
    if cfg.mode == "blockwise":
        dy1, _, dprobs = swiglu_quant_backward(dh, y1, probs, dx_dtype=torch.bfloat16)
        dy1_row, dy1_col = fp8.quantize_row_and_col(dy1, groups, col_storage=storage, scale_layout=ctx.scale_layout)
    else:
        with cast_point("fused_quantize"):
            data, scale, dprobs = swiglu_quant_backward(dh, y1, probs, scale_layout=ctx.scale_layout)
        dy1_row = BlockwiseFP8Tensor(data, scale, fp8.Layout.ROWWISE, tuple(data.shape))
        dy1_col = _colwise(dy1_row, groups, cfg, storage)
        x_col = _colwise(x_saved, groups, cfg, storage)
    dx = _dgrad(dy1_row, fw, "fc1", groups, be)
    dw1 = gemm.grouped_wgrad(dy1_col, x_col, accumulate_into=main[:e] if main else None, backend=be,
                             out_dtype=wgrad_dtype)
    return dx, dprobs, list(dw1) + list(dw2)


class _FP8Weights:
    """The 128x128 FP8 copies of the expert weights used by one call (or, cached, by all the
    microbatches of a step): ``fc1`` and ``fc2`` lists, each in one stacked buffer so a
    single-launch grouped GEMM reads it without another copy. cuBLAS cannot read an FP8 operand
    transposed, so its dgrad needs transposed copies: made on first use and kept with the
    others, so a cached set pays for them once per step. They are quantized again from the
    source weights by the fused kernel that writes the transposed layout (the same bytes: a
    128x128 block keeps its scale under transposition); a strided byte copy of the forward
    copies took 4 ms per linear at 32 DeepSeek-V3 experts, the kernel a fraction of that.

    Because the transposed copies come from the source weights, a set made for one call can drop
    its forward copies once the forward GEMMs are done (:meth:`drop_forward_copies`)."""

    def __init__(self, fc1: List[BlockwiseFP8Tensor], fc2: List[BlockwiseFP8Tensor], sources=None):
        self.fc1, self.fc2 = fc1, fc2
        self._sources = sources or {}  # "fc1"/"fc2" -> the weights the copies were made from
        self._transposed = {}
        self._pow2 = {}  # "fc1"/"fc2" -> the scale kind of dropped forward copies

    def drop_forward_copies(self) -> None:
        """Free the forward copies (fc1/fc2 become None) where the transposed ones can be made
        from the source weights: otherwise they would live from the forward to the backward
        (1.4 GB per DeepSeek-V3 layer at 32 experts) for nothing. Only for backends that take
        the transposed copies (cuBLAS, the emulation), not for Triton's in-place dgrad."""
        for which in ("fc1", "fc2"):
            ws = getattr(self, which)
            if ws and self._sources.get(which):
                self._pow2[which] = ws[0].pow2_scales
                setattr(self, which, None)

    def transposed(self, which: str) -> List[BlockwiseFP8Tensor]:
        if which not in self._transposed:
            self._transposed[which] = self._quantize_transposed(which)
        return self._transposed[which]

    def _quantize_transposed(self, which: str) -> Optional[List[BlockwiseFP8Tensor]]:
        ws, sources = getattr(self, which), self._sources.get(which)
        if not sources:
            return None
        if which in self._pow2:
            pow2 = self._pow2[which]
        elif ws:
            pow2 = ws[0].pow2_scales
        else:
            return None
        with torch.no_grad():
            return gemm.WeightStack(*fp8.quantize_weights([w.detach() for w in sources], pow2, transposed=True))

    def tensors(self) -> List[BlockwiseFP8Tensor]:
        return (self.fc1 or []) + (self.fc2 or []) + [w for ws in self._transposed.values() for w in ws]


def _drop_if_own(fw: "_FP8Weights", cached: Optional["_FP8Weights"], backend: str, device) -> None:
    """Drop the forward copies of a set this call made (a cached set serves later microbatches)
    when the backward takes transposed copies."""
    if cached is None and gemm.dgrad_weights(backend, device) == "transposed":
        fw.drop_forward_copies()


def _dgrad(grad: BlockwiseFP8Tensor, fw: _FP8Weights, which: str, groups: GroupSplits, backend: str):
    """grad @ W for every group, with the weights the backend's dgrad reads: the forward weights
    (read transposed in place) or the transposed copies (the only ones left once the forward
    copies are dropped: then ``fw.fc1``/``fc2`` is None)."""
    forward = getattr(fw, which)
    if forward is not None and (not forward or gemm.dgrad_weights(backend, grad.device) == "forward"):
        return gemm.grouped_dgrad(grad, forward, groups, backend=backend)
    return gemm.grouped_dgrad(grad, fw.transposed(which), groups, backend=backend)


def quantize_expert_weights(weights, num_experts: int) -> "_FP8Weights":
    """The FP8 weights of one expert block (fc1 weights of every expert, then fc2's), for
    callers that keep them across microbatches and pass them to :func:`run_expert_block`."""
    return _quantize_weights(weights, num_experts)


def _quantize_weights(weights, num_experts: int) -> _FP8Weights:
    """128x128 FP8 copies of the fc1 and fc2 weights, each linear's in one stacked buffer."""
    def stacked(ws):  # one launch per linear where the weights lie at one stride (DDP's buffer)
        return gemm.WeightStack(*fp8.quantize_weights([w.detach() for w in ws])) if ws else []

    with torch.no_grad():
        fc1, fc2 = weights[:num_experts], weights[num_experts:]
        return _FP8Weights(stacked(fc1), stacked(fc2), sources={"fc1": list(fc1), "fc2": list(fc2)})


def _flow_forward(x8, probs, w1_8, w2_8, groups, backend, need_output=True, scale_layout="row_major"):
    """fc1 -> weighted SwiGLU + quantize -> fc2 on FP8 operands. Returns (Y1, H8, out or None)."""
    y1 = gemm.grouped_rowwise_gemm(x8, w1_8, groups, backend=backend)
    with cast_point("fused_quantize"):
        h8_data, h8_scale, _ = swiglu_quant_forward(y1, probs, scale_layout=scale_layout)
    h8 = BlockwiseFP8Tensor(h8_data, h8_scale, fp8.Layout.ROWWISE, tuple(h8_data.shape))
    out = gemm.grouped_rowwise_gemm(h8, w2_8, groups, backend=backend) if need_output else None
    return y1, h8, out


def _colwise(t: BlockwiseFP8Tensor, groups: GroupSplits, cfg: ExpertPrecision, storage) -> BlockwiseFP8Tensor:
    """Column-wise copy of a saved row-wise FP8 tensor, in the storage the wgrad GEMM reads:
    SAT (flow) or dequantize + requantize (flow_double_quant)."""
    if cfg.mode == "flow":
        return fp8.scaling_aware_transpose(t, groups, variant=cfg.sat_variant, storage=storage)
    return fp8.quantize(t.dequantize(), "colwise", m_splits=groups, col_storage=storage)


class _WeightList(nn.Module):
    """Holds ``weight0 .. weight{E-1}`` like TE's grouped linear layers.

    The parameters are views of one stacked [E, N, K] buffer, so the grouped GEMMs read them as
    one tensor without a copy. Anything that re-points ``param.data`` elsewhere (Megatron's DDP
    moves parameters into its own buffer) still works: the GEMMs then stack a copy."""

    def __init__(self, num: int, shape, dtype, device):
        super().__init__()
        storage = torch.empty(num, *shape, dtype=dtype, device=device)
        for i in range(num):
            self.register_parameter(f"weight{i}", nn.Parameter(storage[i]))

    def weights(self) -> List[nn.Parameter]:
        return [getattr(self, f"weight{i}") for i in range(len(self._parameters))]


class FP8FlowGroupedMLP(nn.Module):
    """Routed experts: ``out[g] = fc2_g(silu(gate) * up * prob)`` for every local expert g."""

    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int,
                 precision: ExpertPrecision = ExpertPrecision(), dtype=torch.bfloat16, device=None,
                 init_std: float = 0.02):
        super().__init__()
        for name, v in (("hidden_size", hidden_size), ("ffn_hidden_size", ffn_hidden_size)):
            if precision.mode != "bf16" and v % 128:
                raise ValueError(f"FP8 expert GEMMs need {name} % 128 == 0, got {v}")
        self.num_experts, self.hidden_size, self.ffn_hidden_size = num_experts, hidden_size, ffn_hidden_size
        self.precision = precision
        self.linear_fc1 = _WeightList(num_experts, (2 * ffn_hidden_size, hidden_size), dtype, device)
        self.linear_fc2 = _WeightList(num_experts, (hidden_size, ffn_hidden_size), dtype, device)
        for w in self.linear_fc1.weights() + self.linear_fc2.weights():
            nn.init.normal_(w, std=init_std)
        self._fp8_cache = None  # (weight versions, _FP8Weights); see is_first_microbatch

    def forward(self, tokens: Union[torch.Tensor, FP8Activation], tokens_per_expert, probs: torch.Tensor,
                is_first_microbatch: Optional[bool] = None):
        """tokens [M, H] (bf16 or an FP8Activation), rows grouped by expert as ``tokens_per_expert``
        says (list or tensor, padded sizes); probs [M]. Returns bf16 [M, H].

        ``is_first_microbatch`` (as in TransformerEngine): None quantizes the weights in this call
        (always right); True quantizes them and keeps the FP8 copies for the following
        microbatches of the step; False reuses those copies. The forward and backward of one
        call always share one set of FP8 weights."""
        m = tokens.shape[0]
        if tokens.dim() != 2 or tokens.shape[1] != self.hidden_size:
            raise ValueError(f"tokens must be [M, {self.hidden_size}], got {tuple(tokens.shape)}")
        if probs.shape != (m,):
            raise ValueError(f"probs must be [{m}], got {tuple(probs.shape)}")
        groups = GroupSplits.build(tokens_per_expert, m, tokens.device)
        if groups.num_groups != self.num_experts:
            raise ValueError(f"tokens_per_expert has {groups.num_groups} entries for {self.num_experts} experts")
        cfg = self.precision
        weights = self.linear_fc1.weights() + self.linear_fc2.weights()
        fp8_weights = None if cfg.mode == "bf16" else self._cached_fp8_weights(weights, is_first_microbatch)
        return run_expert_block(tokens, probs, groups, self.num_experts, cfg, weights, fp8_weights)


    def _cached_fp8_weights(self, weights, is_first_microbatch: Optional[bool]):
        if is_first_microbatch is None:
            self._fp8_cache = None
            return None
        # A weight changed in place since the copies were made moves its version counter:
        # re-quantize rather than train on stale FP8 weights (and say so, it is a caller error).
        versions = tuple(w._version for w in weights)
        cache = self._fp8_cache
        if not is_first_microbatch:
            if cache is None:
                raise ValueError("is_first_microbatch=False but no FP8 weights are cached: pass True on the "
                                 "first microbatch of each step")
            if cache[0] == versions:
                return cache[1]
            logger.warning("expert weights changed since is_first_microbatch=True; re-quantizing them")
        self._fp8_cache = (versions, _quantize_weights(weights, self.num_experts))
        return self._fp8_cache[1]


def run_expert_block(tokens, probs: torch.Tensor, groups: GroupSplits, num_experts: int,
                     precision: ExpertPrecision, weights: Sequence[torch.Tensor], fp8_weights=None):
    """The expert block as a function of its weights (fc1 weights of every expert, then fc2's):
    what :class:`FP8FlowGroupedMLP` and the Megatron adapter both run. ``fp8_weights`` are
    cached FP8 copies, or None to quantize them in this call."""
    if len(weights) != 2 * num_experts:
        raise ValueError(f"expected {2 * num_experts} expert weights (fc1 then fc2), got {len(weights)}")
    if precision.check_finite:
        _check_finite("expert input", tokens)
    out = _ExpertMLPFunction.apply(tokens, probs, precision, groups, num_experts, fp8_weights, *weights)
    if precision.check_finite:
        _check_finite("expert output", out)
    return out


def _check_finite(what: str, t) -> None:
    payload = fp8_payload(t)
    vals = payload.dequantize() if payload is not None else t
    if not torch.isfinite(vals).all():
        raise FloatingPointError(f"{what} contains NaN or Inf (check_finite=True)")
