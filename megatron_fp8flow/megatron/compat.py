"""Everything that differs between the Megatron-Core versions we support (0.16 - 0.19).

Other modules of this package ask here instead of testing versions themselves.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any, Optional

SUPPORTED = ((0, 16), (0, 19))  # oldest and newest minor versions checked


def _parse(version: str) -> tuple:
    parts = []
    for p in version.split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


@functools.lru_cache(maxsize=None)
def megatron_version() -> tuple:
    """(major, minor, patch) of the installed megatron-core; a clear error when it is missing."""
    if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
        raise ImportError(
            "megatron-core is not installed: the Megatron integration of megatron-fp8flow needs "
            f"megatron-core {SUPPORTED[0][0]}.{SUPPORTED[0][1]} - {SUPPORTED[1][0]}.{SUPPORTED[1][1]} "
            "(pip install megatron-core)"
        )
    import megatron.core

    version = getattr(megatron.core, "__version__", "0.0.0")
    parsed = _parse(version)
    if parsed[:2] < SUPPORTED[0]:
        raise ImportError(
            f"megatron-core {version} is too old for megatron-fp8flow: it needs >= "
            f"{SUPPORTED[0][0]}.{SUPPORTED[0][1]} (the MoE dispatcher hooks and process-group collections)"
        )
    return parsed


def have_transformer_engine() -> bool:
    # Never import megatron.core.extensions.transformer_engine to find out: in 0.16 it stands
    # in a MagicMock for TE when TE is missing, so its names always "import".
    return importlib.util.find_spec("transformer_engine") is not None


def have_apex() -> bool:
    return importlib.util.find_spec("apex") is not None


def default_pg_collection():
    """Megatron's process groups for MoE from its global parallel state."""
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    return get_default_pg_collection()


def local_expert_mlp_submodules():
    """Submodules of one expert MLP built from Megatron's own (non-TE) linear layers."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules

    return MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)


def spec_builds(spec: Any) -> Optional[type]:
    """The class a layer spec builds: a ``ModuleSpec`` (every version) or, from 0.18, a
    ``functools.partial`` of the class or of one of its classmethods (0.19's dense MLP spec is
    ``partial(MLP.as_mlp_submodule, ...)``); None for anything else."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(spec, ModuleSpec):
        module = spec.module
        if isinstance(module, tuple):  # (import path, name)
            module = getattr(importlib.import_module(module[0]), module[1])
        return module if isinstance(module, type) else None
    if isinstance(spec, functools.partial):
        if isinstance(spec.func, type):
            return spec.func
        owner = getattr(spec.func, "__self__", None)  # a classmethod bound to its class
        if isinstance(owner, type):
            return owner
    return None


def spec_submodules(spec: Any):
    """The ``submodules`` a ModuleSpec or partial carries (None if it has none)."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(spec, ModuleSpec):
        return spec.submodules
    if isinstance(spec, functools.partial):
        return spec.keywords.get("submodules")
    return None


def moe_spec_function_modules() -> list:
    """Modules that hold ``get_moe_module_spec_for_backend`` (the GPT layer specs import it by
    name, so both names must be hooked)."""
    import megatron.core.models.gpt.gpt_layer_specs as gpt_layer_specs
    import megatron.core.models.gpt.moe_module_specs as moe_module_specs

    return [m for m in (moe_module_specs, gpt_layer_specs) if hasattr(m, "get_moe_module_spec_for_backend")]


def mtp_layer_spec(mtp_layer_submodules):
    """The transformer layer spec inside an MTP layer's submodules: ``transformer_layer`` up to
    0.18, ``mtp_model_layer`` from 0.19."""
    for name in ("mtp_model_layer", "transformer_layer"):
        spec = getattr(mtp_layer_submodules, name, None)
        if spec is not None:
            return spec
    raise AttributeError(f"{type(mtp_layer_submodules).__name__} has neither mtp_model_layer nor transformer_layer")


def build_from_spec(spec: Any, **kwargs):
    """Build a module from a ``ModuleSpec`` (every version) or a ``functools.partial`` (0.18+)."""
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    if isinstance(spec, ModuleSpec):
        return build_module(spec, **kwargs)
    return spec(**kwargs)


def allow_mla_without_te() -> None:
    """Let MLA be built from local (non-TE) layers when TransformerEngine is not installed.

    Up to 0.17, ``multi_latent_attention`` sets its ``HAVE_TE`` from whether Megatron's TE
    wrapper module imports, which it does without TE (it stands in mocks), and then calls
    ``isinstance(linear_proj, TELinear)`` with ``TELinear`` not a type. Setting ``HAVE_TE`` to
    the truth is the fix; 0.19 reads it from the wrapper and needs nothing. Idempotent."""
    import logging

    from megatron.core.transformer import multi_latent_attention as mla

    if have_transformer_engine() or not getattr(mla, "HAVE_TE", False) or isinstance(mla.TELinear, type):
        return
    mla.HAVE_TE = False
    logging.getLogger(__name__).info("megatron.core.transformer.multi_latent_attention.HAVE_TE set to False "
                                     "(TransformerEngine is not installed; megatron-core %s)",
                                     ".".join(map(str, megatron_version())))


def microbatches_per_step() -> Optional[int]:
    """The number of microbatches in a training step, from Megatron's calculator (set up by
    ``pretrain()``), or None where nothing has set it up (the compact loop, tests)."""
    try:
        from megatron.core.num_microbatches_calculator import get_num_microbatches

        return int(get_num_microbatches())
    except Exception:  # not importable, or no calculator initialized (its global is None)
        return None


def accepted_kwargs(fn, kwargs: dict) -> dict:
    """The keyword arguments ``fn`` takes in this version (all of them if it takes ``**kwargs``)."""
    import inspect

    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(kwargs)
    return {k: v for k, v in kwargs.items() if k in params}


def use_prebuilt_dataset_helpers() -> bool:
    """Skip Megatron's runtime ``make`` of its dataset helpers when they are already built.

    ``pretrain()`` always runs ``make`` in ``megatron/core/datasets`` on rank 0 and exits when it
    fails. The megatron-core wheels ship the compiled ``helpers_cpp`` but no Makefile, so from a
    wheel that ``make`` always fails. When ``helpers_cpp`` imports, the build is replaced by a
    no-op (the original kept in ``__wrapped__``); a source checkout without it still builds.
    Idempotent; returns whether the build is skipped."""
    import logging

    from megatron.core.datasets import utils

    if getattr(utils.compile_helpers, "__wrapped__", None) is not None:
        return True
    if importlib.util.find_spec("megatron.core.datasets.helpers_cpp") is None:
        return False
    original = utils.compile_helpers

    def compile_helpers():  # the helpers are importable: nothing to build
        return None

    compile_helpers.__wrapped__ = original
    utils.compile_helpers = compile_helpers
    logging.getLogger(__name__).info("megatron.core.datasets.utils.compile_helpers skipped: helpers_cpp is "
                                     "already built (megatron-core %s)", ".".join(map(str, megatron_version())))
    return True


def run_pretrain(datasets_provider, model_provider, forward_step, extra_args_provider, check_args) -> None:
    """Megatron's ``pretrain()`` in the form this version has: from 0.19 it takes a config
    container built from the parsed arguments; before, it parses the arguments itself."""
    import inspect

    from megatron.core.enums import ModelType
    from megatron.training import pretrain

    use_prebuilt_dataset_helpers()
    if "cfg_container" in inspect.signature(pretrain).parameters:
        from megatron.training.argument_utils import pretrain_cfg_container_from_args
        from megatron.training.arguments import parse_and_validate_args

        args = parse_and_validate_args(extra_args_provider=extra_args_provider)
        check_args(args)
        pretrain(pretrain_cfg_container_from_args(args), datasets_provider, ModelType.encoder_or_decoder,
                 forward_step, model_provider=model_provider)
    else:
        pretrain(datasets_provider, model_provider, ModelType.encoder_or_decoder, forward_step,
                 extra_args_provider=extra_args_provider)
