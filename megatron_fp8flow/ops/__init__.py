"""MoE operators on the FP8 dataflow: permutation with padding, its inverse, weighted SwiGLU.

Each operator has a functional forward and backward (used by the FP8-flow expert layer) and a
plain-PyTorch reference in :mod:`.reference`.
"""

from .permute import (
    Permutation,
    PermutePad,
    UnpadUnpermute,
    permute_pad,
    permute_pad_backward,
    plan_permutation,
    unpad_unpermute,
    unpad_unpermute_backward,
)
from .swiglu import swiglu_quant_backward, swiglu_quant_forward

__all__ = [
    "Permutation",
    "PermutePad",
    "UnpadUnpermute",
    "permute_pad",
    "permute_pad_backward",
    "plan_permutation",
    "unpad_unpermute",
    "unpad_unpermute_backward",
    "swiglu_quant_backward",
    "swiglu_quant_forward",
]
