"""Sum each token's expert rows back into token order (unpad+unpermute forward; also the
backward of permute+pad). bf16 in, fp32 accumulation in slot (expert) order, bf16 out:
deterministic. Padding rows are never read. Optionally gathers the probs gradient back to
[N, E].

Reference: ``ops.reference.unpad_unpermute`` / ``ops.reference.gather_probs_grad``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8_common import use_cpu_path, check_launchable, interpreter_active, to_output_dtype


@triton.jit
def _gather_sum_rows_kernel(
    src_ptr, dst_ptr, row_map_ptr, slot_expert_ptr, gprobs_ptr, dst_gprobs_ptr,
    H, num_experts,
    TOPK: tl.constexpr, BLOCK_H: tl.constexpr, HAS_PROBS: tl.constexpr, EMULATE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1)
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for k in tl.static_range(TOPK):
        src_row = tl.load(row_map_ptr + t * TOPK + k)
        ok = src_row >= 0
        r64 = tl.maximum(src_row, 0).to(tl.int64)
        # tl.where rather than `col_ok & ok`: Triton's interpreter turns a scalar condition broadcast into
        # a block into a non-bool mask, which 3.9 rejects; compiled, the two are the same.
        acc += tl.load(src_ptr + r64 * H + cols, mask=tl.where(ok, col_ok, False), other=0.0).to(tl.float32)
        if HAS_PROBS:
            if pid_h == 0:
                e = tl.maximum(tl.load(slot_expert_ptr + t * TOPK + k), 0)
                g = tl.load(gprobs_ptr + r64, mask=ok, other=0.0)
                tl.store(dst_gprobs_ptr + t * num_experts + e, g, mask=ok)
    tl.store(dst_ptr + t * H + cols, to_output_dtype(acc, dst_ptr.dtype.element_ty, EMULATE), mask=col_ok)


def gather_sum_rows(
    src: torch.Tensor,
    row_map: torch.Tensor,
    num_tokens: int,
    grad_probs: torch.Tensor = None,
    slot_expert: torch.Tensor = None,
    num_experts: int = 0,
    block_h: int = None,
    num_warps: int = 4,
):
    """Returns (dst [N, H] in src's dtype, probs gradient [N, E] fp32 or None)."""
    if use_cpu_path(src, row_map):
        return _gather_sum_rows_torch(src, row_map, num_tokens, grad_probs, slot_expert, num_experts)
    check_launchable(src, row_map)
    _, h = src.shape
    topk = row_map.shape[1]
    dev = src.device
    dst = torch.empty(num_tokens, h, dtype=src.dtype, device=dev)
    dst_gp = None
    if grad_probs is not None:
        dst_gp = torch.zeros(num_tokens, num_experts, dtype=torch.float32, device=dev)
    if block_h is None:
        block_h = min(triton.next_power_of_2(max(h, 1)), 1024)
    if num_tokens and h:
        grid = (num_tokens, triton.cdiv(h, block_h))
        _gather_sum_rows_kernel[grid](
            src, dst, row_map, slot_expert if slot_expert is not None else row_map,
            grad_probs if grad_probs is not None else dst, dst_gp if dst_gp is not None else dst,
            h, num_experts,
            TOPK=topk, BLOCK_H=block_h, HAS_PROBS=grad_probs is not None,
            EMULATE=interpreter_active(), num_warps=num_warps,
        )
    return dst, dst_gp


def _gather_sum_rows_torch(src, row_map, num_tokens, grad_probs=None, slot_expert=None, num_experts=0):
    """The kernel's result in plain PyTorch (CPU without the interpreter): each token's rows summed
    in fp32 in slot order, as the kernel does, then rounded once."""
    acc = torch.zeros(num_tokens, src.shape[1], dtype=torch.float32)
    dst_gp = None if grad_probs is None else torch.zeros(num_tokens, num_experts, dtype=torch.float32)
    for s in range(row_map.shape[1]):
        rows = row_map[:, s]
        ok = rows >= 0
        acc[ok] += src[rows[ok].long()].float()
        if grad_probs is not None:
            tokens = ok.nonzero().squeeze(1)
            dst_gp[tokens, slot_expert[ok, s].long()] = grad_probs[rows[ok].long()].float()
    return acc.to(src.dtype), dst_gp
