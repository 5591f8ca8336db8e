"""Putting the plugin into a model: rewrite a layer/block spec, or hook Megatron's MoE spec builder.

* :func:`apply_fp8flow_to_spec` returns a copy of any GPT layer spec, block spec, list of layer
  specs or MTP block spec in which every MoE layer (MTP layers included) is an
  :class:`.moe_layer.FP8FlowMoELayer` with :class:`.experts.FP8FlowExperts`. The router and
  shared experts of the original spec are kept. The input spec is not modified.
* :func:`install` hooks ``get_moe_module_spec_for_backend`` so that code building its specs
  itself (Megatron-LM's ``pretrain_gpt.py``, NeMo, ...) gets the plugin's layers. Idempotent;
  the original function is kept in ``__wrapped__``; :func:`uninstall` puts it back.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable, Optional, Union

from . import compat
from .settings import FP8FlowSettings

logger = logging.getLogger(__name__)
_MARKER = "_megatron_fp8flow_hook"


def _moe_layer_spec(original: Any, settings: FP8FlowSettings):
    from megatron.core.transformer.moe.moe_layer import MoESubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec

    from .experts import FP8FlowExperts
    from .moe_layer import FP8FlowMoELayer

    old = compat.spec_submodules(original)
    experts = ModuleSpec(module=FP8FlowExperts, params={"precision": settings.expert_precision()},
                         submodules=compat.local_expert_mlp_submodules())
    fields = {"experts": experts}
    if old is not None:
        fields["shared_experts"] = old.shared_experts
        if hasattr(old, "router"):
            fields["router"] = old.router
    return ModuleSpec(module=FP8FlowMoELayer, params={"fp8flow": settings}, submodules=MoESubmodules(**fields))


def apply_fp8flow_to_spec(spec: Any, settings: Optional[FP8FlowSettings] = None) -> Any:
    """A copy of ``spec`` with every MoE layer replaced by the plugin's (see module docstring)."""
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.spec_utils import ModuleSpec

    settings = settings or FP8FlowSettings()

    def visit(node):
        built = compat.spec_builds(node)
        if built is not None and issubclass(built, MoELayer):
            return _moe_layer_spec(node, settings)
        if isinstance(node, ModuleSpec):
            return dataclasses.replace(node, submodules=visit(node.submodules))
        if isinstance(node, functools.partial):
            keywords = {k: visit(v) for k, v in node.keywords.items()}
            return functools.partial(node.func, *node.args, **keywords)
        if dataclasses.is_dataclass(node) and not isinstance(node, type):
            changes = {f.name: visit(getattr(node, f.name)) for f in dataclasses.fields(node) if f.init}
            return dataclasses.replace(node, **changes)
        if isinstance(node, (list, tuple)):
            return type(node)(visit(v) for v in node)
        return node

    return visit(spec)


def install(settings: Union[FP8FlowSettings, Callable[[], Optional[FP8FlowSettings]], None] = None) -> None:
    """Hook Megatron's MoE spec builder (``get_moe_module_spec_for_backend``) so every MoE
    layer it builds uses the plugin. Calling it again only updates the settings.

    ``settings`` may be a function, asked each time a spec is built (None from it leaves the
    stock layer): the Megatron-LM patch passes one that reads ``--moe-fp8-flow`` from the
    parsed arguments, which exist only after the hook is installed."""
    compat.megatron_version()
    settings = settings or FP8FlowSettings()
    for module in compat.moe_spec_function_modules():
        current = module.get_moe_module_spec_for_backend
        if getattr(current, _MARKER, False):
            continue
        original = current

        @functools.wraps(original)
        def hooked(*args, __original=original, **kwargs):
            spec, settings = __original(*args, **kwargs), current_settings()
            return spec if settings is None else apply_fp8flow_to_spec(spec, settings)

        setattr(hooked, _MARKER, True)
        hooked.__wrapped__ = original
        module.get_moe_module_spec_for_backend = hooked
        logger.info("megatron_fp8flow: hooked %s.get_moe_module_spec_for_backend (%s)", module.__name__,
                    "settings from the parsed arguments" if callable(settings) else f"mode {settings.mode}")
    _state["settings"] = settings


_state: dict = {}


def current_settings() -> Optional[FP8FlowSettings]:
    """The settings of the installed hook (resolved if it was given a function), or None when it
    is not installed or the function says the plugin is off."""
    settings = _state.get("settings")
    return settings() if callable(settings) else settings


def uninstall() -> None:
    """Undo :func:`install` (no-op when it is not installed)."""
    for module in compat.moe_spec_function_modules():
        current = module.get_moe_module_spec_for_backend
        if getattr(current, _MARKER, False):
            module.get_moe_module_spec_for_backend = current.__wrapped__
            logger.info("megatron_fp8flow: restored %s.get_moe_module_spec_for_backend", module.__name__)
    _state.pop("settings", None)


def use_core_attention(spec: Any, core_attention: type) -> Any:
    """A copy of a layer/block/MTP spec whose self-attention uses ``core_attention``."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    def visit(node, in_attention=False):
        if isinstance(node, ModuleSpec):
            return dataclasses.replace(node, submodules=visit(node.submodules, in_attention))
        if dataclasses.is_dataclass(node) and not isinstance(node, type):
            changes = {}
            for f in dataclasses.fields(node):
                if not f.init:
                    continue
                if f.name == "core_attention" and in_attention:
                    changes[f.name] = core_attention
                else:
                    changes[f.name] = visit(getattr(node, f.name), in_attention or f.name == "self_attention")
            return dataclasses.replace(node, **changes)
        if isinstance(node, (list, tuple)):
            return type(node)(visit(v, in_attention) for v in node)
        return node

    return visit(spec)


def gpt_model_specs(config, settings: Optional[FP8FlowSettings], use_transformer_engine: bool = False,
                    sdpa: bool = True, vp_stage: Optional[int] = None):
    """(decoder block spec, MTP block spec or None) for a GPTModel of ``config``, the way
    Megatron-LM's ``pretrain_gpt`` builds them (dense and MoE layers by ``moe_layer_freq``, this
    pipeline stage's layers), with the plugin's MoE layers when ``settings`` is given.

    Without TransformerEngine the local layers' attention is :class:`.attention.SDPAttention`
    when ``sdpa`` is set or the model uses MLA (Megatron's local attention cannot take MLA)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_mtp_block_spec

    from .attention import SDPAttention

    mla = bool(getattr(config, "multi_latent_attention", False))
    if mla and not use_transformer_engine:
        compat.allow_mla_without_te()
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=use_transformer_engine,
                                       normalization=config.normalization, vp_stage=vp_stage)
    if not use_transformer_engine and (sdpa or mla):
        block = use_core_attention(block, SDPAttention)
    mtp = None
    if getattr(config, "mtp_num_layers", None):
        mtp = get_gpt_mtp_block_spec(config, block, use_transformer_engine=use_transformer_engine, vp_stage=vp_stage)
    if settings is not None:
        block, mtp = apply_fp8flow_to_spec(block, settings), apply_fp8flow_to_spec(mtp, settings)
    return block, mtp
