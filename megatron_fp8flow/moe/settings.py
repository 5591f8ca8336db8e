"""The plugin's one settings object: how the MoE layers of a model compute and communicate.

Every other way of giving a setting is generated from the fields below: the Megatron flags
(``--moe-fp8-flow-<flag>``, :func:`add_arguments`), the keys of a recipe's ``fp8flow:`` section
(the field names) and the argv a recipe turns into (:func:`to_argv`). Add a setting here and
it exists everywhere.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List

from .. import gemm
from ..gemm import bf16 as bf16_gemm
from ..ops.permute import SUPPORTED_ALIGNMENTS

MODES = ("bf16", "blockwise", "flow_double_quant", "flow")
FLAG_PREFIX = "--moe-fp8-flow"


def _setting(default, flag: str, help: str, choices=None):
    return field(default=default, metadata={"flag": f"{FLAG_PREFIX}-{flag}", "help": help, "choices": choices})


@dataclass(frozen=True)
class FP8FlowSettings:
    """Everything ``--moe-fp8-flow`` and its options select (the expert block takes the same
    object; ``ExpertPrecision`` is its other name)."""

    mode: str = _setting("flow", "mode", "flow (FP8 from the dispatch to the combine, SAT for the column-wise "
                         "operands), flow_double_quant (the paper's ablation), blockwise (the BF16-centric FP8 "
                         "baseline), bf16", MODES)
    sat_variant: str = _setting("column", "sat", "scaling-aware transpose: exact column scales (column) or the "
                                "paper's tile scale (tile)", ("column", "tile"))
    align: int = _setting(0, "align", "pad every expert's rows to a multiple of this (16, 32 or 128); 0: what the "
                          "GEMM backend reads (128 with DeepGEMM, 16 with cuBLAS)")
    recompute_experts: bool = _setting(False, "recompute-experts", "keep only the FP8 input of the expert block "
                                       "and recompute it in the backward")
    gemm_backend: str = _setting("auto", "gemm-backend", "FP8 GEMM backend (auto: DeepGEMM on Hopper when deep_gemm "
                                 "imports, else cuBLAS; Triton on other FP8 GPUs; emulated on CPU)", gemm.BACKENDS)
    bf16_gemm: str = _setting("auto", "bf16-gemm", "grouped GEMMs of the bf16 mode (auto: the faster for the "
                              "gradient contract)", bf16_gemm.ENGINES)
    gradient_accumulation_fusion: bool = _setting(
        False, "gradient-accumulation-fusion", "add the expert weight gradients into the weights' fp32 main_grad "
        "inside the GEMMs (Megatron DDP's buffers), instead of returning them")
    cache_fp8_weights: bool = _setting(
        False, "cache-fp8-weights", "quantize the expert weights once per step: keep each layer's FP8 copies across "
        "the step's microbatches (Megatron's schedules mark the first one); holds every layer's copies from the "
        "step's first microbatch to its last")
    check_finite: bool = _setting(False, "check-finite", "debug: raise on NaN/Inf in the expert block's input and output")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            choices = f.metadata["choices"]
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"unknown {f.name} {getattr(self, f.name)!r} (flag {f.metadata['flag']}); "
                                 f"expected one of {choices}")
        if self.align and (self.align not in SUPPORTED_ALIGNMENTS or (self.mode != "bf16" and self.align % 16)):
            raise ValueError(
                f"permute alignment must be 0 (the GEMM backend's), or one of {SUPPORTED_ALIGNMENTS} and, for "
                f"the FP8 modes, a multiple of 16 (cuBLAS FP8 GEMMs); got {self.align}"
            )
        if self.recompute_experts and self.mode not in ("flow", "flow_double_quant"):
            raise ValueError(f"recompute_experts is implemented for the FP8 flow modes, not {self.mode!r}")

    def expert_precision(self) -> "FP8FlowSettings":
        """The expert block's settings: this object (kept for callers of the older split)."""
        return self

    def group_alignment(self, device) -> int:
        """Rows every expert's group is padded to on ``device``: ``align``, or the GEMM
        backend's (the bf16 mode pads like the FP8 modes so its DeepGEMM engine can run)."""
        if self.align:
            return self.align
        return max(16, gemm.layouts(self.gemm_backend, device).group_alignment)

    @property
    def fp8_dispatch(self) -> bool:
        """Tokens cross the all-to-all as FP8 (every mode but bf16)."""
        return self.mode != "bf16"

    @property
    def fp8_experts(self) -> bool:
        """The expert block takes FP8 tokens and FP8 output gradients."""
        return self.mode in ("flow", "flow_double_quant")


ExpertPrecision = FP8FlowSettings
KEYS = tuple(f.name for f in dataclasses.fields(FP8FlowSettings))


def add_arguments(group) -> None:
    """One ``--moe-fp8-flow-<flag>`` per setting, into an argparse parser or group."""
    for f in dataclasses.fields(FP8FlowSettings):
        meta = f.metadata
        if f.type in (bool, "bool"):
            group.add_argument(meta["flag"], dest=_dest(f), action="store_true", help=meta["help"])
        else:
            kind = int if f.type in (int, "int") else str
            group.add_argument(meta["flag"], dest=_dest(f), type=kind, default=f.default, choices=meta["choices"],
                               help=meta["help"])


def from_arguments(args: argparse.Namespace) -> FP8FlowSettings:
    return FP8FlowSettings(**{f.name: getattr(args, _dest(f)) for f in dataclasses.fields(FP8FlowSettings)})


def to_argv(values: Dict[str, Any]) -> List[str]:
    """The flags that give these settings (a recipe's ``fp8flow:`` section; unknown keys ignored)."""
    argv = []
    for f in dataclasses.fields(FP8FlowSettings):
        if f.name not in values:
            continue
        value = values[f.name]
        if f.type in (bool, "bool"):
            if value:
                argv.append(f.metadata["flag"])
        else:
            argv += [f.metadata["flag"], str(value)]
    return argv


def _dest(f) -> str:
    return f.metadata["flag"].lstrip("-").replace("-", "_")
