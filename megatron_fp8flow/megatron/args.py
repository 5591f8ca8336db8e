"""Megatron command-line flags of the plugin: ``--moe-fp8-flow`` and its options."""

from __future__ import annotations

import argparse
from typing import Callable, Optional

from ..moe import settings
from ..moe.settings import FP8FlowSettings


def add_fp8flow_args(parser: argparse.ArgumentParser,
                     chain: Optional[Callable[[argparse.ArgumentParser], argparse.ArgumentParser]] = None):
    """Add the plugin's flags; usable as Megatron's ``extra_args_provider``. ``chain`` is an
    existing provider (e.g. ModelOpt's in ``pretrain_gpt.py``) that is applied first."""
    if chain is not None:
        parser = chain(parser) or parser
    group = parser.add_argument_group("megatron-fp8flow", "FP8-Flow MoE (persistent FP8 dataflow)")
    group.add_argument("--moe-fp8-flow", action="store_true",
                       help="use the FP8-Flow MoE layers (dispatcher + experts) for every MoE layer")
    settings.add_arguments(group)  # one flag per field of FP8FlowSettings
    return parser


def settings_from_args(args) -> Optional[FP8FlowSettings]:
    """The plugin's settings from parsed arguments, or None when ``--moe-fp8-flow`` is off."""
    if not getattr(args, "moe_fp8_flow", False):
        return None
    return settings.from_arguments(args)
