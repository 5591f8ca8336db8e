"""Megatron command-line flags of the plugin: ``--moe-fp8-flow`` and its options."""

from __future__ import annotations

import argparse
from typing import Callable, Optional

from .. import gemm
from ..moe.experts import MODES
from .settings import FP8FlowSettings


def add_fp8flow_args(parser: argparse.ArgumentParser,
                     chain: Optional[Callable[[argparse.ArgumentParser], argparse.ArgumentParser]] = None):
    """Add the plugin's flags; usable as Megatron's ``extra_args_provider``. ``chain`` is an
    existing provider (e.g. ModelOpt's in ``pretrain_gpt.py``) that is applied first."""
    if chain is not None:
        parser = chain(parser) or parser
    group = parser.add_argument_group("megatron-fp8flow", "FP8-Flow MoE (persistent FP8 dataflow)")
    group.add_argument("--moe-fp8-flow", action="store_true",
                       help="use the FP8-Flow MoE layers (dispatcher + experts) for every MoE layer")
    group.add_argument("--moe-fp8-flow-mode", choices=MODES, default="flow",
                       help="flow (default), flow_double_quant (ablation), blockwise (BF16-centric FP8 "
                            "baseline), bf16")
    group.add_argument("--moe-fp8-flow-sat", choices=("column", "tile"), default="column",
                       help="scaling-aware transpose: exact column scales (default) or the paper's tile scale")
    group.add_argument("--moe-fp8-flow-align", type=int, default=0,
                       help="pad every expert's rows to a multiple of this (16, 32 or 128); 0 (default): what "
                            "the GEMM backend reads (128 with DeepGEMM, 16 with cuBLAS)")
    group.add_argument("--moe-fp8-flow-recompute-experts", action="store_true",
                       help="keep only the FP8 input of the expert block and recompute it in the backward")
    group.add_argument("--moe-fp8-flow-gemm-backend", choices=gemm.BACKENDS,
                       default="auto", help="FP8 GEMM backend (auto: DeepGEMM on Hopper when deep_gemm imports, "
                                            "else cuBLAS; Triton on other FP8 GPUs)")
    return parser


def settings_from_args(args) -> Optional[FP8FlowSettings]:
    """The plugin's settings from parsed arguments, or None when ``--moe-fp8-flow`` is off."""
    if not getattr(args, "moe_fp8_flow", False):
        return None
    return FP8FlowSettings(
        mode=args.moe_fp8_flow_mode,
        sat_variant=args.moe_fp8_flow_sat,
        align=args.moe_fp8_flow_align,
        recompute_experts=args.moe_fp8_flow_recompute_experts,
        gemm_backend=args.moe_fp8_flow_gemm_backend,
    )
