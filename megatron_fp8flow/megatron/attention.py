"""SDPAttention: a core attention for Megatron's local (non-TransformerEngine) layer specs,
built on ``torch.nn.functional.scaled_dot_product_attention``.

Why the plugin has one: Megatron's local ``DotProductAttention`` assumes one head dim for
queries/keys and values, so without TransformerEngine a model with MLA (DeepSeek-V3: q/k head
dim 192 = 128 + 64 RoPE, v head dim 128) cannot be built; and it materializes the full score
matrix, where SDPA uses flash/memory-efficient kernels on the GPU. Same constructor and forward
as Megatron's core attentions, so it drops into ``core_attention`` of any local spec.

Supported: causal masks (and explicit boolean masks, True = masked, Megatron's convention),
grouped-query attention, different k/v head dims. Not supported, with an error: context
parallelism and packed sequences (TransformerEngine's attention does those).
"""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class SDPAttention(MegatronModule):
    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 k_channels: Optional[int] = None, v_channels: Optional[int] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None, **unused):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError(f"SDPAttention does not support context parallelism (context_parallel_size="
                             f"{config.context_parallel_size}); use TransformerEngine's attention")
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale  # None: 1/sqrt(query head dim), SDPA's default

    def forward(self, query, key, value, attention_mask, attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias=None, packed_seq_params=None):
        """query [sq, b, heads, dk], key [sk, b, groups, dk], value [sk, b, groups, dv] ->
        [sq, b, heads * dv]."""
        if packed_seq_params is not None:
            raise ValueError("SDPAttention does not support packed sequences; use TransformerEngine's attention")
        if attention_bias is not None:
            raise ValueError("SDPAttention does not support an attention bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        if k.shape[1] != q.shape[1]:  # grouped-query attention: share each k/v head among its queries
            repeat = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        causal = mask_type == AttnMaskType.causal
        mask = None if causal or attention_mask is None else ~attention_mask.bool()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                             dropout_p=self.dropout_p if self.training else 0.0,
                                             scale=self.softmax_scale)
        sq, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)
