"""Megatron's optimizer fallback without TransformerEngine or apex, made fused.

Without either, Megatron builds torch's ``Adam``/``AdamW`` with torch's default implementation
on GPUs, ``foreach``. That one computes each update through whole-list intermediates, so a step
allocates temporaries as large as the optimizer's fp32 state (tens of GB at DeepSeek-V3 proxy
sizes on one GPU). Torch's ``fused`` implementation is the same update in one kernel per
tensor list, without them. :func:`fuse_torch_adam` switches an optimizer's eligible parameter
groups to it; :func:`install` makes Megatron's ``pretrain()`` do that for the optimizer it
builds (idempotent, like the rest of the plugin's patches). TE's and apex's fused optimizers
are left as they are.
"""

from __future__ import annotations

import functools
import logging
from typing import Iterator

import torch

logger = logging.getLogger(__name__)

_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def torch_optimizers(optimizer) -> Iterator[torch.optim.Optimizer]:
    """The torch optimizers inside Megatron's wrappers (a chained optimizer's parts, a
    mixed-precision or distributed optimizer's ``optimizer``), or ``optimizer`` itself."""
    if optimizer is None:
        return
    if isinstance(optimizer, torch.optim.Optimizer):
        yield optimizer
        return
    for part in getattr(optimizer, "chained_optimizers", None) or ():
        yield from torch_optimizers(part)
    inner = getattr(optimizer, "optimizer", None)
    if inner is not None and inner is not optimizer:
        yield from torch_optimizers(inner)


def torch_adams(optimizer) -> Iterator[torch.optim.Optimizer]:
    """The torch Adam/AdamW optimizers among :func:`torch_optimizers`."""
    for opt in torch_optimizers(optimizer):
        if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):  # AdamW derives from Adam only from torch 2.6
            yield opt


def _fused_devices() -> tuple:
    try:  # what torch.optim itself asks
        return tuple(torch.utils._foreach_utils._get_fused_kernels_supported_devices())
    except AttributeError:
        return ("cuda",)


def _fusable(group: dict) -> bool:
    supported = _fused_devices()
    return (not group.get("fused") and not group.get("differentiable") and group["params"]
            and all(p.device.type in supported and p.dtype in _FUSED_DTYPES for p in group["params"]))


def fuse_torch_adam(optimizer) -> int:
    """Switch the torch Adam/AdamW parameter groups in ``optimizer`` to torch's fused kernel,
    before their first step (the state torch keeps per step differs between the two). Returns
    how many groups were switched."""
    switched = 0
    for adam in torch_adams(optimizer):
        for group in adam.param_groups:
            if not _fusable(group):
                continue
            if any(adam.state.get(p) for p in group["params"]):
                raise RuntimeError("fuse_torch_adam: this optimizer has already stepped; switch it before its "
                                   "first step")
            group["fused"], group["foreach"] = True, False
            switched += 1
    return switched


def install(training_module=None) -> bool:
    """Wrap ``get_megatron_optimizer`` where Megatron's ``pretrain()`` calls it (in
    ``megatron.training.training``), so the optimizer it builds runs fused. Returns False when
    it was wrapped already."""
    if training_module is None:
        import megatron.training.training as training_module
    build = training_module.get_megatron_optimizer
    if getattr(build, "_fp8flow_fused", False):
        return False

    @functools.wraps(build)
    def get_megatron_optimizer(*args, **kwargs):
        optimizer = build(*args, **kwargs)
        switched = fuse_torch_adam(optimizer)
        if switched:
            logger.warning("fp8flow: Megatron fell back to torch's Adam (no TransformerEngine or apex); its %d "
                           "parameter group(s) run torch's fused implementation", switched)
        return optimizer

    get_megatron_optimizer._fp8flow_fused = True
    training_module.get_megatron_optimizer = get_megatron_optimizer
    return True
