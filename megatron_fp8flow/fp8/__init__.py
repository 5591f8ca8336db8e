"""Blockwise FP8 E4M3: formats, exact reference numerics, and the public quantization API.

>>> from megatron_fp8flow import fp8
>>> q = fp8.quantize(x, layout="rowwise")                      # 1x128 blocks along K
>>> c = fp8.scaling_aware_transpose(q, m_splits=[300, 0, 212])  # grouped column-wise, exact
>>> w = fp8.quantize_weight(W); wt = w.t()                      # 128x128 blocks
"""

from . import reference
from .api import (
    dequantize,
    num_scale_blocks,
    quantize,
    quantize_row_and_col,
    quantize_weight,
    quantize_weight_transposed,
    quantize_weights,
    scaling_aware_transpose,
)
from .format import (
    BLOCK,
    E4M3_MAX,
    FP8_DTYPE,
    MIN_SCALE,
    NAN_CODE,
    ZERO_BLOCK_SCALE,
    BlockwiseFP8Tensor,
    ColStorage,
    GroupSplits,
    Layout,
    group_column_blocks,
)

__all__ = [
    "BLOCK",
    "E4M3_MAX",
    "FP8_DTYPE",
    "MIN_SCALE",
    "NAN_CODE",
    "ZERO_BLOCK_SCALE",
    "BlockwiseFP8Tensor",
    "ColStorage",
    "GroupSplits",
    "Layout",
    "group_column_blocks",
    "dequantize",
    "num_scale_blocks",
    "quantize",
    "quantize_row_and_col",
    "quantize_weight",
    "quantize_weight_transposed",
    "quantize_weights",
    "reference",
    "scaling_aware_transpose",
]
