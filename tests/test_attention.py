"""SDPAttention (the local specs' core attention for MLA and flash kernels) against an explicit
softmax(QK^T * scale + mask) V in fp64."""

import math

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron.core.transformer.enums import AttnMaskType  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from megatron_fp8flow.megatron.attention import SDPAttention  # noqa: E402


def _reference(q, k, v, scale, mask):
    """q [s, b, h, dk], k [s, b, g, dk], v [s, b, g, dv]; mask [s, s] True = masked."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    scores = torch.einsum("sbhd,tbhd->bhst", q.double(), k.double()) * scale
    scores = scores.masked_fill(mask, float("-inf"))
    out = torch.einsum("bhst,tbhd->sbhd", scores.softmax(-1), v.double())
    return out.reshape(out.shape[0], out.shape[1], -1)


def _attention(mask_type, scale=None, heads=4):
    cfg = TransformerConfig(num_layers=1, hidden_size=32 * heads, num_attention_heads=heads, attention_dropout=0.0)
    return SDPAttention(cfg, layer_number=1, attn_mask_type=mask_type, attention_type="self", softmax_scale=scale)


@pytest.mark.parametrize("seq,batch,heads,groups,dk,dv", [(17, 2, 4, 4, 48, 32), (33, 1, 8, 2, 24, 24),
                                                          (5, 3, 2, 1, 192, 128)])
def test_causal_matches_reference(seq, batch, heads, groups, dk, dv):
    g = torch.Generator().manual_seed(seq * heads + dk)
    q = torch.randn(seq, batch, heads, dk, generator=g)
    k = torch.randn(seq, batch, groups, dk, generator=g)
    v = torch.randn(seq, batch, groups, dv, generator=g)
    scale = 0.7 / math.sqrt(dk)  # MLA passes a yarn-adjusted scale: it must be used, not 1/sqrt(dk)
    out = _attention(AttnMaskType.causal, scale, heads)(q, k, v, attention_mask=None)
    causal = torch.triu(torch.ones(seq, seq, dtype=torch.bool), 1)
    assert out.shape == (seq, batch, heads * dv)
    torch.testing.assert_close(out.double(), _reference(q, k, v, scale, causal), rtol=1e-5, atol=1e-5)


def test_explicit_padding_mask_and_nan_propagation():
    seq, heads, d = 9, 2, 16
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(seq, 1, heads, d, generator=g) for _ in range(3))
    mask = torch.rand(seq, seq, generator=g) < 0.3
    mask.fill_diagonal_(False)  # every query sees at least itself
    attn = _attention(AttnMaskType.padding, heads=heads)
    out = attn(q, k, v, attention_mask=mask[None, None])
    torch.testing.assert_close(out.double(), _reference(q, k, v, 1 / math.sqrt(d), mask), rtol=1e-5, atol=1e-5)
    q[3, 0, 0, 0] = float("nan")  # one query of head 0: its output row is NaN, nothing else is
    out = attn(q, k, v, attention_mask=mask[None, None])
    assert torch.isnan(out[3, 0, :d]).all()
    assert torch.isfinite(out[3, 0, d:]).all() and torch.isfinite(out[torch.arange(seq) != 3]).all()


def test_unsupported_inputs_are_named():
    attn = _attention(AttnMaskType.causal)
    q = torch.randn(4, 1, 4, 32)
    with pytest.raises(ValueError, match="packed sequences"):
        attn(q, q, q, None, packed_seq_params=object())
    cfg = TransformerConfig(num_layers=1, hidden_size=128, num_attention_heads=4, context_parallel_size=2)
    with pytest.raises(ValueError, match="context parallelism"):
        SDPAttention(cfg, 1, AttnMaskType.causal, "self")
