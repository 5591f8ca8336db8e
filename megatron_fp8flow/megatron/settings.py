"""The plugin's one switch, as the Megatron adapters name it: :class:`FP8FlowSettings` lives in
:mod:`megatron_fp8flow.moe.settings` (the expert block reads the same object)."""

from ..moe.settings import FP8FlowSettings

__all__ = ["FP8FlowSettings"]
