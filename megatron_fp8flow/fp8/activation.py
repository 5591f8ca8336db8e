"""FP8Activation: a row-wise FP8 tensor that autograd treats as a [M, K] bf16 tensor.

Autograd only moves ``torch.Tensor`` objects. This wrapper subclass carries a
:class:`BlockwiseFP8Tensor` through autograd Functions (dispatcher -> experts, and FP8
gradients back through the combine) while reporting the shape and nominal dtype of the
high-precision tensor it stands for, so gradients have the right metadata. Any other
operation on it raises: dequantize explicitly instead (nothing is ever converted silently).
"""

from __future__ import annotations

from typing import Union

import torch

from .format import BlockwiseFP8Tensor, Layout

aten = torch.ops.aten


class FP8Activation(torch.Tensor):
    fp8: BlockwiseFP8Tensor

    @staticmethod
    def __new__(cls, fp8: BlockwiseFP8Tensor, nominal_dtype: torch.dtype = torch.bfloat16,
                requires_grad: bool = False):
        if fp8.layout != Layout.ROWWISE:
            raise ValueError(f"FP8Activation carries 'rowwise' tensors, got {fp8.layout.value!r}")
        t = torch.Tensor._make_wrapper_subclass(
            cls, tuple(fp8.shape), dtype=nominal_dtype, device=fp8.device, requires_grad=requires_grad
        )
        t.fp8 = fp8
        return t

    def __repr__(self) -> str:
        return f"FP8Activation({self.fp8!r}, nominal_dtype={self.dtype})"

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func in (aten.detach.default, aten.alias.default):
            return FP8Activation(args[0].fp8, args[0].dtype)
        raise NotImplementedError(
            f"{func} is not defined on an FP8Activation; use .fp8 (the BlockwiseFP8Tensor) or "
            f".fp8.dequantize() explicitly"
        )


def fp8_payload(x: Union[torch.Tensor, BlockwiseFP8Tensor]):
    """The BlockwiseFP8Tensor behind ``x``, or None when ``x`` is a plain tensor."""
    if isinstance(x, FP8Activation):
        return x.fp8
    if isinstance(x, BlockwiseFP8Tensor):
        return x
    return None
