"""Plain-PyTorch references for the MoE data-movement operators (permute/pad, unpad/unpermute,
weighted SwiGLU + quantize). Written for clarity; the Triton kernels must match them
(bit for bit where the math is order-independent, within stated bounds otherwise).

Conventions shared with the kernels:

* Token order inside an expert group is increasing token index; groups are in expert order.
* Each group of ``count[e]`` rows is followed by zero padding up to a multiple of ``align``
  (data 0, FP8 scales 0, probs 0).
* ``row_map[t, s]`` is the padded row of token t's s-th expert (experts in increasing index),
  -1 for unused slots.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..fp8 import reference as fp8_ref


def permutation_rows(routing_map: torch.Tensor, align: int):
    """(row_map [N, topk_max] int64, padded_sizes [E], counts [E]) by a plain loop."""
    n, e = routing_map.shape
    counts = routing_map.sum(0).tolist()
    padded = [-(-c // align) * align for c in counts]
    offsets = [0]
    for p in padded:
        offsets.append(offsets[-1] + p)
    k_max = int(routing_map.sum(1).max()) if n else 0
    row_map = torch.full((n, max(k_max, 1)), -1, dtype=torch.int64)
    fill = [0] * e
    for t in range(n):
        s = 0
        for x in range(e):
            if routing_map[t, x]:
                row_map[t, s] = offsets[x] + fill[x]
                fill[x] += 1
                s += 1
    return row_map, padded, counts


def permute_pad(tokens: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor, align: int,
                scales: Optional[torch.Tensor] = None):
    """Rows grouped by expert and padded. Returns (out, out_scales or None, out_probs, row_map, padded)."""
    row_map, padded, _ = permutation_rows(routing_map.cpu(), align)
    mp = sum(padded)
    n, h = tokens.shape
    out = torch.zeros(mp, h, dtype=tokens.dtype)
    out_scales = None if scales is None else torch.zeros(mp, scales.shape[1], dtype=scales.dtype)
    out_probs = torch.zeros(mp, dtype=torch.float32)
    experts = [torch.nonzero(routing_map[t].cpu()).flatten().tolist() for t in range(n)]
    for t in range(n):
        for s, x in enumerate(experts[t]):
            r = int(row_map[t, s])
            out[r] = tokens[t].cpu()
            if scales is not None:
                out_scales[r] = scales[t].cpu()
            out_probs[r] = probs[t, x].cpu()
    return out, out_scales, out_probs, row_map, padded


def unpad_unpermute(y: torch.Tensor, row_map: torch.Tensor) -> torch.Tensor:
    """out[t] = sum over token t's rows (fp32 accumulate in slot order, result in y's dtype)."""
    n = row_map.shape[0]
    out = torch.zeros(n, y.shape[1], dtype=torch.float32)
    yf = y.float().cpu()
    for t in range(n):
        for r in row_map[t].tolist():
            if r >= 0:
                out[t] += yf[r]
    return out.to(y.dtype)


def scatter_to_padded(grad: torch.Tensor, row_map: torch.Tensor, num_rows: int,
                      scales: Optional[torch.Tensor] = None):
    """Backward of unpad+unpermute: each token's gradient row copied to all its rows; pads zero."""
    out = torch.zeros(num_rows, grad.shape[1], dtype=grad.dtype)
    out_s = None if scales is None else torch.zeros(num_rows, scales.shape[1], dtype=scales.dtype)
    for t in range(row_map.shape[0]):
        for r in row_map[t].tolist():
            if r >= 0:
                out[r] = grad[t].cpu()
                if scales is not None:
                    out_s[r] = scales[t].cpu()
    return out, out_s


def gather_probs_grad(grad_out_probs: torch.Tensor, row_map: torch.Tensor, routing_map: torch.Tensor):
    """Backward of the probs permutation: grad_probs[t, e] = grad_out_probs[row of (t, e)]."""
    n, e = routing_map.shape
    g = torch.zeros(n, e, dtype=torch.float32)
    for t in range(n):
        experts = torch.nonzero(routing_map[t].cpu()).flatten().tolist()
        for s, x in enumerate(experts):
            g[t, x] = grad_out_probs[int(row_map[t, s])].float().cpu()
    return g


def silu_parts(a: torch.Tensor):
    """(sigmoid(a), silu(a)) in a's precision, as the kernels compute them: 1 / (1 + exp(-a))."""
    sig = 1.0 / (1.0 + torch.exp(-a))
    return sig, a * sig


def weighted_swiglu(x: torch.Tensor, w: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """y = silu(gate) * up * w with x = [gate | up], computed in ``dtype``."""
    f = x.shape[1] // 2
    a, b = x[:, :f].to(dtype), x[:, f:].to(dtype)
    _, silu = silu_parts(a)
    return (silu * b) * w.to(dtype)[:, None]


def weighted_swiglu_quant(x: torch.Tensor, w: torch.Tensor):
    """Forward reference: fp32 y, then 1x128 power-of-two quantization. Returns (data, scale_inv, y)."""
    y = weighted_swiglu(x, w, torch.float32)
    data, scale_inv = fp8_ref.quantize_rowwise(y)
    return data, scale_inv, y


def weighted_swiglu_backward(g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, dtype=torch.float32):
    """(d_gate, d_up, dw) in ``dtype``: d_gate = g w b silu'(a), d_up = g w silu(a), dw = sum g silu(a) b."""
    f = x.shape[1] // 2
    a, b = x[:, :f].to(dtype), x[:, f:].to(dtype)
    gg, ww = g.to(dtype), w.to(dtype)[:, None]
    sig, silu = silu_parts(a)
    dsilu = sig * (1.0 + a * (1.0 - sig))
    gw = gg * ww
    d_gate = gw * b * dsilu
    d_up = gw * silu
    dw = (gg * silu * b).sum(dim=1)
    return d_gate, d_up, dw


def weighted_swiglu_quant_backward(g: torch.Tensor, x: torch.Tensor, w: torch.Tensor):
    """Backward reference: [d_gate | d_up] quantized 1x128 as one row-wise [M, 2F] tensor, and dw."""
    d_gate, d_up, dw = weighted_swiglu_backward(g, x, w, torch.float32)
    data, scale_inv = fp8_ref.quantize_rowwise(torch.cat([d_gate, d_up], dim=1))
    return data, scale_inv, dw
