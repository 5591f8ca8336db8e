"""MoE token permutation with per-expert padding, and its inverse, for bf16 or FP8 rows.

``permute_pad`` groups token rows by expert and pads each group to the alignment the FP8
GEMMs need; ``unpad_unpermute`` sums each token's expert rows back. Both directions of each
have kernels (``kernels.scatter_rows`` / ``kernels.gather_rows``) and autograd wrappers for
the bf16 case; the FP8 flow calls the functional forms directly.

Host syncs: every offset is computed on the device. The output row count must be known to
allocate the output: it comes from ``tokens_per_expert`` when that is a host list (Megatron's
all-to-all dispatcher already has it on the host), or from ``num_out_rows`` (an upper bound is
fine: rows past the real total are left unwritten); otherwise one ``.item()`` reads the padded
total from the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from ..fp8.format import BlockwiseFP8Tensor, GroupSplits, Layout

SUPPORTED_ALIGNMENTS = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass
class Permutation:
    """Where every (token, expert) copy lives in the padded, expert-grouped layout."""

    row_map: torch.Tensor  # int32 [N, topk]: padded row of the token's s-th expert, -1 unused
    slot_expert: torch.Tensor  # int32 [N, topk]: expert of slot s, -1 unused
    counts: torch.Tensor  # int32 [E] rows routed to each expert
    padded_sizes: torch.Tensor  # int32 [E] counts rounded up to ``align``
    offsets: torch.Tensor  # int32 [E + 1] cumulative padded sizes
    num_out_rows: int  # rows of the padded layout (exact, or an upper bound)
    align: int
    padded_sizes_host: Optional[list] = None  # when the counts were given on the host
    # FP8 rows written into this layout get MN-major scales (what DeepGEMM reads) instead of
    # row-major ones (what the all-to-all sends): set where the rows go straight to the experts.
    mn_major_scales: bool = False

    @property
    def num_tokens(self) -> int:
        return self.row_map.shape[0]

    @property
    def num_experts(self) -> int:
        return self.counts.numel()

    def group_splits(self) -> GroupSplits:
        """The padded expert groups, for the column-wise FP8 kernels (SAT, grouped quantize).

        Host sizes when the counts were given on the host; otherwise device sizes (no sync),
        declared aligned to ``align`` so the kernels may use their widest accesses.
        """
        if self.padded_sizes_host is not None:
            return GroupSplits.build(self.padded_sizes_host, sum(self.padded_sizes_host), self.row_map.device)
        return GroupSplits.build(self.padded_sizes, self.num_out_rows, self.row_map.device, row_alignment=self.align)


def plan_permutation(
    routing_map: torch.Tensor,
    topk: int,
    align: int = 16,
    tokens_per_expert: Optional[Union[Sequence[int], torch.Tensor]] = None,
    num_out_rows: Optional[int] = None,
    mn_major_scales: bool = False,
) -> Permutation:
    """Device-side offsets and row map for a multi-hot ``routing_map`` [N, E] (bool).

    A token routed to more than ``topk`` experts is rejected: with a clear error on CPU, by a
    device-side assert on the GPU (no sync).
    """
    if routing_map.dtype != torch.bool or routing_map.dim() != 2:
        raise ValueError(
            f"routing_map must be a 2-D bool [tokens, experts] tensor, got {routing_map.dtype} "
            f"{tuple(routing_map.shape)}"
        )
    if align not in SUPPORTED_ALIGNMENTS:
        raise ValueError(f"align must be one of {SUPPORTED_ALIGNMENTS} (16 default; 32 and 128 for FP8), got {align}")
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    n, e = routing_map.shape
    dev = routing_map.device
    rm = routing_map.to(torch.int32)
    if n:
        per_token = rm.sum(1).max()
        if dev.type == "cuda":
            torch._assert_async(per_token <= topk)  # no host sync on the GPU
        elif int(per_token) > topk:
            raise ValueError(f"routing_map routes a token to {int(per_token)} experts, more than topk = {topk}")
    counts = rm.sum(0, dtype=torch.int32)
    host_padded = None
    if tokens_per_expert is not None and not isinstance(tokens_per_expert, torch.Tensor):
        host = [int(v) for v in tokens_per_expert]
        if len(host) != e:
            raise ValueError(f"tokens_per_expert has {len(host)} entries for {e} experts")
        host_padded = [-(-v // align) * align for v in host]
        if num_out_rows is None:
            num_out_rows = sum(host_padded)
    padded = (counts + (align - 1)) // align * align
    offsets = torch.zeros(e + 1, dtype=torch.int32, device=dev)
    offsets[1:] = torch.cumsum(padded, 0)
    if num_out_rows is None:
        num_out_rows = int(offsets[-1].item())  # the one host sync (see module docstring)
    # Position of each copy inside its expert group (token order), and its slot (expert order).
    # (scanned along the tokens as the rows of the transposed map: a scan along the outer dim
    # of [N, E] runs one thread per expert on the GPU, slow for thousands of tokens)
    pos = torch.cumsum(rm.t().contiguous(), 1, dtype=torch.int32).t() - 1
    dest = offsets[:-1][None, :] + pos
    slot = torch.cumsum(rm, 1, dtype=torch.int32) - 1
    slot = torch.where(routing_map, slot, torch.full_like(slot, topk)).long()
    row_map = torch.full((n, topk + 1), -1, dtype=torch.int32, device=dev)
    row_map.scatter_(1, slot, torch.where(routing_map, dest, -1))
    slot_expert = torch.full((n, topk + 1), -1, dtype=torch.int32, device=dev)
    experts = torch.arange(e, dtype=torch.int32, device=dev).expand(n, e)
    slot_expert.scatter_(1, slot, torch.where(routing_map, experts, -1))
    return Permutation(
        row_map=row_map[:, :topk].contiguous(),
        slot_expert=slot_expert[:, :topk].contiguous(),
        counts=counts,
        padded_sizes=padded,
        offsets=offsets,
        num_out_rows=int(num_out_rows),
        align=align,
        padded_sizes_host=host_padded,
        mn_major_scales=mn_major_scales,
    )


def _check_rows(x: torch.Tensor, n: int, what: str) -> None:
    if x.dim() != 2 or x.shape[0] != n:
        raise ValueError(f"{what} must be [{n}, H], got {tuple(x.shape)}")


def permute_pad(
    tokens: Union[torch.Tensor, BlockwiseFP8Tensor],
    probs: torch.Tensor,
    perm: Permutation,
):
    """Group rows by expert and pad. Returns (rows, permuted probs [rows] fp32).

    ``tokens`` is bf16/fp32 [N, H] or a row-wise FP8 tensor (H % 128 == 0): FP8 codes and
    scales move as bytes; padding rows have data 0, scale 0 and prob 0.
    """
    from ..kernels.scatter_rows import scatter_rows

    n = perm.num_tokens
    if probs.shape != (n, perm.num_experts):
        raise ValueError(f"probs must be [{n}, {perm.num_experts}], got {tuple(probs.shape)}")
    probs = probs.float()
    if isinstance(tokens, BlockwiseFP8Tensor):
        _check_fp8_rows(tokens, n)
        data, scales, p = scatter_rows(
            tokens.data, perm.row_map, perm.counts, perm.offsets, perm.num_out_rows, perm.align,
            src_scales=tokens.scale_inv, probs=probs, slot_expert=perm.slot_expert, mn_major_scales=perm.mn_major_scales,
        )
        out = BlockwiseFP8Tensor(data, scales, Layout.ROWWISE, (perm.num_out_rows, tokens.shape[1]), tokens.pow2_scales)
        return out, p
    _check_rows(tokens, n, "tokens")
    data, _, p = scatter_rows(
        tokens.contiguous(), perm.row_map, perm.counts, perm.offsets, perm.num_out_rows, perm.align,
        probs=probs, slot_expert=perm.slot_expert,
    )
    return data, p


def _check_fp8_rows(t: BlockwiseFP8Tensor, n: int) -> None:
    if t.layout != Layout.ROWWISE:
        raise ValueError(f"FP8 rows must be in the 'rowwise' layout, got {t.layout.value!r}")
    if t.shape[0] != n:
        raise ValueError(f"FP8 rows must have {n} rows, got {t.shape[0]}")
    if t.shape[1] % 128:
        raise ValueError(f"FP8 permutation needs H % 128 == 0 (whole 1x128 scale blocks), got H = {t.shape[1]}")


def permute_pad_backward(grad_rows: torch.Tensor, grad_probs: Optional[torch.Tensor], perm: Permutation):
    """(grad_tokens [N, H], grad_probs [N, E] fp32 or None): sums of each token's copies."""
    from ..kernels.gather_rows import gather_sum_rows

    _check_rows(grad_rows, perm.num_out_rows, "grad_rows")
    return gather_sum_rows(
        grad_rows.contiguous(), perm.row_map, perm.num_tokens,
        grad_probs=None if grad_probs is None else grad_probs.float().contiguous(),
        slot_expert=perm.slot_expert, num_experts=perm.num_experts,
    )


def unpad_unpermute(rows: torch.Tensor, perm: Permutation) -> torch.Tensor:
    """out[t] = sum of token t's expert rows (fp32 accumulate, output in rows' dtype)."""
    from ..kernels.gather_rows import gather_sum_rows

    _check_rows(rows, perm.num_out_rows, "rows")
    out, _ = gather_sum_rows(rows.contiguous(), perm.row_map, perm.num_tokens)
    return out


def unpad_unpermute_backward(grad: Union[torch.Tensor, BlockwiseFP8Tensor], perm: Permutation):
    """Scatter the token gradient into the padded layout; FP8 in gives FP8 out (bytes + scales)."""
    from ..kernels.scatter_rows import scatter_rows

    n = perm.num_tokens
    if isinstance(grad, BlockwiseFP8Tensor):
        _check_fp8_rows(grad, n)
        data, scales, _ = scatter_rows(
            grad.data, perm.row_map, perm.counts, perm.offsets, perm.num_out_rows, perm.align,
            src_scales=grad.scale_inv, mn_major_scales=perm.mn_major_scales,
        )
        return BlockwiseFP8Tensor(data, scales, Layout.ROWWISE, (perm.num_out_rows, grad.shape[1]), grad.pow2_scales)
    _check_rows(grad, n, "grad")
    data, _, _ = scatter_rows(grad.contiguous(), perm.row_map, perm.counts, perm.offsets, perm.num_out_rows, perm.align)
    return data


class PermutePad(torch.autograd.Function):
    """Autograd wrapper of :func:`permute_pad`. Tokens are bf16/fp32, or FP8 rows carried as an
    :class:`~megatron_fp8flow.fp8.activation.FP8Activation` (FP8 out, bf16 gradient back)."""

    @staticmethod
    def forward(ctx, tokens, probs, perm: Permutation):
        from ..fp8.activation import FP8Activation, fp8_payload

        ctx.perm = perm
        payload = fp8_payload(tokens)
        rows, p = permute_pad(payload if payload is not None else tokens, probs, perm)
        if payload is not None:
            rows = FP8Activation(rows, tokens.dtype)
        return rows, p

    @staticmethod
    def backward(ctx, grad_rows, grad_probs):
        g_tok, g_probs = permute_pad_backward(_plain_gradient(grad_rows), grad_probs, ctx.perm)
        return g_tok, g_probs, None


class UnpadUnpermute(torch.autograd.Function):
    """Autograd wrapper of :func:`unpad_unpermute`. The gradient may come back as bf16 or as FP8
    rows (an ``FP8Activation``): FP8 in gives FP8 out, bytes and scales moved."""

    @staticmethod
    def forward(ctx, rows, perm: Permutation):
        ctx.perm = perm
        return unpad_unpermute(rows, perm)

    @staticmethod
    def backward(ctx, grad):
        from ..fp8.activation import FP8Activation, fp8_payload

        payload = fp8_payload(grad)
        if payload is not None:
            return FP8Activation(unpad_unpermute_backward(payload, ctx.perm), grad.dtype), None
        return unpad_unpermute_backward(grad.contiguous(), ctx.perm), None


def _plain_gradient(grad):
    """A gradient that arrived as FP8 where bf16 is summed: dequantize it (an explicit cast)."""
    from ..fp8.activation import fp8_payload

    payload = fp8_payload(grad)
    return payload.dequantize(grad.dtype) if payload is not None else grad
