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
    * ``align``: rows per expert are padded to a multiple of this; 0 (default) takes what the
      GEMM backend reads (128 for DeepGEMM's contiguous layout, 16 for cuBLAS, 1 otherwise).
    * ``recompute_experts``: keep only the FP8 input of the expert block for the backward.
    * ``gemm_backend``: ``auto`` | ``deepgemm`` | ``cublas`` | ``triton`` | ``emulated``.
    """

    mode: str = "flow"
    sat_variant: str = "column"
    align: int = 0
    recompute_experts: bool = False
    gemm_backend: str = "auto"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown --moe-fp8-flow mode {self.mode!r}; expected one of {MODES}")
        if self.align and (self.align not in SUPPORTED_ALIGNMENTS or (self.mode != "bf16" and self.align % 16)):
            raise ValueError(
                f"permute alignment must be 0 (the GEMM backend's), or one of {SUPPORTED_ALIGNMENTS} and, for "
                f"the FP8 modes, a multiple of 16 (cuBLAS FP8 GEMMs); got {self.align}"
            )
        self.expert_precision()  # validates the rest

    def expert_precision(self) -> ExpertPrecision:
        return ExpertPrecision(
            mode=self.mode,
            sat_variant=self.sat_variant,
            gemm_backend=self.gemm_backend,
            recompute_experts=self.recompute_experts,
        )

    def group_alignment(self, device) -> int:
        """Rows every expert's group is padded to on ``device``: ``align``, or the GEMM
        backend's (the bf16 mode pads like the FP8 modes so its DeepGEMM engine can run)."""
        if self.align:
            return self.align
        from .. import gemm

        return max(16, gemm.layouts(self.gemm_backend, device).group_alignment)

    @property
    def fp8_dispatch(self) -> bool:
        """Tokens cross the all-to-all as FP8 (every mode but bf16)."""
        return self.mode != "bf16"

    @property
    def fp8_experts(self) -> bool:
        """The expert block takes FP8 tokens and FP8 output gradients."""
        return self.mode in ("flow", "flow_double_quant")
