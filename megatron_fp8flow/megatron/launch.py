"""What a Megatron-LM ``pretrain_gpt.py`` calls to use the plugin (see ``patches/``).

The patch adds two things to the script: ``fp8flow_setup()`` after its imports (hooks the MoE
spec builder; the hook asks the parsed arguments whether ``--moe-fp8-flow`` is on each time a
spec is built) and ``fp8flow_extra_args(previous)`` around its ``extra_args_provider`` (adds
the plugin's flags after the previous provider's, e.g. ModelOpt's).
"""

from __future__ import annotations

from typing import Callable, Optional

from .args import add_fp8flow_args, settings_from_args
from .spec import install


def fp8flow_extra_args(previous: Optional[Callable] = None) -> Callable:
    """An ``extra_args_provider`` that applies ``previous`` (if any) and adds the plugin's flags."""

    def provider(parser):
        return add_fp8flow_args(parser, chain=previous)

    return provider


def settings_from_megatron_args():
    """The plugin's settings from Megatron's parsed arguments (None when ``--moe-fp8-flow`` is off)."""
    from megatron.training import get_args

    return settings_from_args(get_args())


def fp8flow_setup() -> None:
    """Hook Megatron's MoE spec builder; the settings come from the arguments once parsed."""
    install(settings_from_megatron_args)
