"""Cast audit: how many BF16 <-> FP8 conversions of activations and gradients a run makes.

The plugin's cast points (``fp8.quantize``, ``quantize_row_and_col``, ``dequantize``, and the
quantizing SwiGLU) report themselves through :func:`cast_point`. While an audit is active, a
dispatch mode also watches every PyTorch operation: a conversion between an FP8 dtype and a
16/32-bit float that happens outside a cast point (someone else's cast) counts as ``"other"``.

Kinds:

* ``quantize``: a bf16/fp32 activation or gradient became FP8 (one per FP8 tensor produced:
  a row-wise plus column-wise quantization counts two);
* ``dequantize``: an FP8 activation or gradient became bf16/fp32;
* ``fused_quantize``: FP8 produced inside a fused operator (the weighted SwiGLU), not a
  standalone cast;
* ``weight_quantize``: 128x128 weight quantization (once per step and weight, not per token);
* ``transpose``: scaling-aware transposes (FP8 to FP8, no conversion);
* ``other``: conversions outside the plugin's cast points.

The paper's count ("12 casts per MoE layer for the BF16-centric baseline, 2 for FP8-Flow") is
``quantize + dequantize + other``.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

FP8_DTYPES = {torch.float8_e4m3fn, torch.float8_e5m2}
WIDE_DTYPES = {torch.bfloat16, torch.float16, torch.float32}
EXPLICIT_KINDS = ("quantize", "dequantize", "other")

_active: Optional["CastAudit"] = None
_depth = 0  # > 0 inside a cast point: its own internal conversions are not counted again


class CastAudit:
    """Counts by kind; ``explicit`` is the paper's cast count."""

    def __init__(self):
        self.counts: Counter = Counter()

    @property
    def explicit(self) -> int:
        return sum(self.counts[k] for k in EXPLICIT_KINDS)

    def as_dict(self) -> dict:
        return dict(self.counts)


def audit_active() -> bool:
    return _active is not None


@contextmanager
def cast_point(kind: str, count: int = 1) -> Iterator[None]:
    """Mark a plugin cast: counted once as ``kind`` (``count`` tensors), and the conversions
    inside it are not counted again by the dispatch watcher."""
    global _depth
    if _active is not None and _depth == 0 and count:
        _active.counts[kind] += count
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1


class _ConversionWatcher(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if _active is not None and _depth == 0 and func.overloadpacket in _CONVERTING_OPS and _is_conversion(args, out):
            _active.counts["other"] += 1
        return out


# Operators that change a tensor's dtype (a GEMM taking FP8 operands and writing bf16 is not a cast).
_CONVERTING_OPS = {torch.ops.aten._to_copy, torch.ops.aten.copy_, torch.ops.aten.to, torch.ops.aten.clone,
                   torch.ops.aten.mul, torch.ops.aten.div, torch.ops.aten.add, torch.ops.aten.sub}


def _is_conversion(args, out) -> bool:
    src = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if src is None or not isinstance(out, torch.Tensor) or src.dtype == out.dtype:
        return False
    pair = {src.dtype, out.dtype}
    return bool(pair & FP8_DTYPES) and bool(pair & WIDE_DTYPES)


@contextmanager
def cast_audit() -> Iterator[CastAudit]:
    """Count the casts made inside the block: ``with cast_audit() as audit: ...; audit.counts``."""
    global _active
    if _active is not None:
        raise RuntimeError("cast audits do not nest")
    audit = CastAudit()
    _active = audit
    try:
        with _ConversionWatcher():
            yield audit
    finally:
        _active = None


def counted(kind, count: int = 1):
    """Decorator form of :func:`cast_point` for the API's cast functions; ``kind`` may be a
    function of the call's arguments. Costs nothing while no audit is active."""
    import functools

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if _active is None:
                return fn(*args, **kwargs)
            with cast_point(kind(*args, **kwargs) if callable(kind) else kind, count):
                return fn(*args, **kwargs)

        return wrapper

    return decorate
