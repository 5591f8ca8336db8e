"""FP8FlowMoELayer: Megatron's ``MoELayer`` with the plugin's dispatcher and experts.

Router, shared experts, auxiliary losses, expert bias, group-limited routing and MTP are the
stock layer's; the token dispatcher is replaced by :class:`.dispatcher.FP8FlowTokenDispatcher`
and the experts come from the spec (:class:`.experts.FP8FlowExperts` after
:func:`.spec.apply_fp8flow_to_spec`). FP8 here never needs ``config.fp8`` (TransformerEngine's
switch): the plugin's own :class:`.settings.FP8FlowSettings` selects it.
"""

from __future__ import annotations

from megatron.core.transformer.moe.moe_layer import MoELayer

from . import compat
from .dispatcher import FP8FlowTokenDispatcher
from .settings import FP8FlowSettings


def _check_layer_config(config) -> None:
    if config.moe_token_dispatcher_type == "flex":
        raise ValueError("FP8FlowMoELayer brings its own all-to-all dispatcher: set "
                         "--moe-token-dispatcher-type alltoall (flex would require DeepEP)")
    if config.moe_shared_expert_overlap:
        raise ValueError("moe_shared_expert_overlap is not supported by the FP8-flow dispatcher yet; turn it off")


class FP8FlowMoELayer(MoELayer):
    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None,
                 fp8flow: FP8FlowSettings = FP8FlowSettings(), **kwargs):
        _check_layer_config(config)
        if pg_collection is None:  # 0.15 - 0.17 pass None to MoELayer subclasses
            pg_collection = compat.default_pg_collection()
        super().__init__(config, submodules, layer_number=layer_number, pg_collection=pg_collection, **kwargs)
        self.fp8flow = fp8flow
        self.token_dispatcher = FP8FlowTokenDispatcher(
            self.num_local_experts, self.local_expert_indices, config=self.config,
            pg_collection=pg_collection, settings=fp8flow,
        )
