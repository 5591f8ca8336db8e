"""The plugin's one switch: how the MoE layers of a model compute and communicate."""

from __future__ import annotations

from dataclasses import dataclass

from ..moe.experts import MODES, ExpertPrecision
from ..ops.permute import SUPPORTED_ALIGNMENTS


@dataclass(frozen=True)
class FP8FlowSettings:
    """Everything ``--moe-fp8-flow`` and its options select.

    * ``mode``: ``flow`` (FP8 from the dispatch to the combine, SAT for the column-wise
      operands), ``flow_double_quant`` (the paper's ablation), ``blockwise`` (the BF16-centric
      FP8 baseline: FP8 all-to-all, bf16 between operators), ``bf16``.
    * ``sat_variant``: ``column`` (exact, default) or ``tile`` (the paper's tile-max scale).
    * ``align``: rows per expert are padded to a multiple of this (16 for the FP8 GEMMs).
    * ``recompute_experts``: keep only the FP8 input of the expert block for the backward.
    * ``gemm_backend``: ``auto`` | ``cublas`` | ``triton`` | ``emulated``.
    """

    mode: str = "flow"
    sat_variant: str = "column"
    align: int = 16
    recompute_experts: bool = False
    gemm_backend: str = "auto"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown --moe-fp8-flow mode {self.mode!r}; expected one of {MODES}")
        if self.align not in SUPPORTED_ALIGNMENTS or (self.mode != "bf16" and self.align % 16):
            raise ValueError(
                f"permute alignment must be one of {SUPPORTED_ALIGNMENTS} and, for the FP8 modes, a "
                f"multiple of 16 (cuBLAS FP8 GEMMs); got {self.align}"
            )
        self.expert_precision()  # validates the rest

    def expert_precision(self) -> ExpertPrecision:
        return ExpertPrecision(
            mode=self.mode,
            sat_variant=self.sat_variant,
            gemm_backend=self.gemm_backend,
            recompute_experts=self.recompute_experts,
        )

    @property
    def fp8_dispatch(self) -> bool:
        """Tokens cross the all-to-all as FP8 (every mode but bf16)."""
        return self.mode != "bf16"

    @property
    def fp8_experts(self) -> bool:
        """The expert block takes FP8 tokens and FP8 output gradients."""
        return self.mode in ("flow", "flow_double_quant")
