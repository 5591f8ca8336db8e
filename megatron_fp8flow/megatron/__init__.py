"""Megatron-Core integration: the FP8-Flow MoE layer, dispatcher, experts, spec hooks and flags.

Importing this package needs megatron-core (0.16 - 0.19); the rest of megatron_fp8flow does not.
"""

from .compat import megatron_version

megatron_version()  # a clear error for a missing or too old megatron-core

from .args import add_fp8flow_args, settings_from_args  # noqa: E402
from .dispatcher import FP8FlowTokenDispatcher  # noqa: E402
from .experts import FP8FlowExperts  # noqa: E402
from .moe_layer import FP8FlowMoELayer  # noqa: E402
from .settings import FP8FlowSettings  # noqa: E402
from .spec import apply_fp8flow_to_spec, current_settings, install, uninstall  # noqa: E402

__all__ = [
    "FP8FlowExperts",
    "FP8FlowMoELayer",
    "FP8FlowSettings",
    "FP8FlowTokenDispatcher",
    "add_fp8flow_args",
    "apply_fp8flow_to_spec",
    "current_settings",
    "install",
    "settings_from_args",
    "uninstall",
]
