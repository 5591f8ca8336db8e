"""Real tensors of one MoE layer's expert block, saved during training for the numerics report
(``fp8flow numerics --from DIR``): the tokens entering the experts, grouped by expert, and the
gradient of the experts' output, in bf16, with the group sizes, on the first micro-batch of
chosen steps.

They come from a run whose experts see bf16 (``bf16`` or, at EP = 1, ``blockwise``): the report
then quantizes them every way the precisions do (row-wise once, independent row and column
quantization, double quantization, the scaling-aware transpose) and measures each against the
bf16 source. In a flow run the tokens are FP8 from the dispatch on, and no bf16 source is left
to measure against.
"""

from __future__ import annotations

import os
from typing import Iterable, Optional

import torch

from ..fp8.activation import fp8_payload


class ExpertDump:
    """Saves ``DIR/step<N>.pt`` at each of ``steps`` from the expert block of MoE layer ``layer``
    (0: the first of the model, MTP layers counted last)."""

    def __init__(self, model: torch.nn.Module, steps: Iterable[int], directory: str, layer: int = 0):
        blocks = [m for name, m in model.named_modules() if name.endswith("mlp.experts")]
        if not blocks:
            raise ValueError("the model has no MoE layer to dump (no module named *.mlp.experts)")
        if not 0 <= layer < len(blocks):
            raise ValueError(f"MoE layer {layer} asked for; the model has {len(blocks)} (0 to {len(blocks) - 1})")
        self.steps, self.directory = set(steps), directory
        self._step: Optional[int] = None
        os.makedirs(directory, exist_ok=True)
        self._handle = blocks[layer].register_forward_hook(self._capture)

    def arm(self, step: int) -> None:
        """At the start of ``step``: its first micro-batch is saved when it is one of the steps."""
        self._step = step if step in self.steps else None

    def remove(self) -> None:
        self._handle.remove()

    def _capture(self, module, inputs, output) -> None:
        if self._step is None or not torch.is_grad_enabled():
            return
        step, self._step = self._step, None
        tokens, tokens_per_expert = inputs[0], inputs[1]
        if fp8_payload(tokens) is not None:
            raise ValueError("the experts of this run take FP8 tokens (flow): dump from a bf16 or blockwise run "
                             "of the same recipe, whose experts see the bf16 tokens")
        sizes = tokens_per_expert.tolist() if isinstance(tokens_per_expert, torch.Tensor) else list(tokens_per_expert)
        record = {"step": step, "tokens": tokens.detach().bfloat16().cpu(), "splits": [int(s) for s in sizes]}
        out = output[0] if isinstance(output, tuple) else output
        path = os.path.join(self.directory, f"step{step}.pt")

        def save(grad):
            record["output_grad"] = grad.detach().bfloat16().cpu().reshape(record["tokens"].shape)
            torch.save(record, path)

        out.register_hook(save)
