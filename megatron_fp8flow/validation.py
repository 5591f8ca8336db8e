"""Checks of what a command line and a recipe ask for, made before any work starts.

* :data:`RECIPE_VALUES`: one table of the recipe keys whose type and range are known (sizes,
  steps and layer counts are positive integers, learning rates positive numbers, flags true or
  false, ...). :func:`check_recipe_values` checks a recipe's values against it, then the few
  rules that tie two keys together (:data:`RECIPE_RULES`). Keys outside the table (Megatron-LM
  has several hundred arguments) are passed on as given; Megatron's own checks still apply.
* ``argparse`` types for the flags (:func:`positive_int`, :func:`precisions`, ...): a bad value
  is refused while the command line is parsed.
* :class:`UsageError`: anything else the command cannot start without (a GPU, an optional
  package, an input file). ``fp8flow`` prints its message as one line and exits with code 2.

Every message names the flag or key, the value given and what is allowed.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Optional, Tuple


class UsageError(ValueError):
    """A command that cannot start as asked; the message says what is wrong and what is allowed."""


# --------------------------------------------------------------------------------------------
# One value's type and range


def as_text(value: Any) -> str:
    """A value as it would be typed after ``--set key=`` (YAML spelling)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass(frozen=True)
class Value:
    """The values a key accepts. ``kind``: int, float, bool, str or list; ``low``/``high``:
    bounds (``low_open``/``high_open``: the bound itself excluded); ``choices``: the strings
    allowed; ``optional``: null is allowed too (Megatron's default then applies)."""

    kind: str
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    choices: Optional[Tuple[str, ...]] = None
    optional: bool = False

    def allowed(self) -> str:
        if self.kind == "int" and self.low == 1 and self.high is None:
            text = "a positive integer (1, 2, ...)"
        elif self.kind == "int" and self.low == 0 and self.high is None:
            text = "an integer >= 0"
        elif self.kind in ("int", "float"):
            noun = "an integer" if self.kind == "int" else "a number"
            if self.low is not None and self.high is not None:
                text = (f"{noun} in {'(' if self.low_open else '['}{self.low:g}, "
                        f"{self.high:g}{')' if self.high_open else ']'}")
            elif self.low is not None:
                text = f"{noun} {'>' if self.low_open else '>='} {self.low:g}"
            else:
                text = noun
        elif self.kind == "bool":
            text = "true or false"
        elif self.kind == "str":
            text = f"one of {', '.join(self.choices)}" if self.choices else "a string"
        else:
            text = "a value or a list of values"
        return text + (", or null (Megatron's default)" if self.optional else "")

    def check(self, value: Any) -> Any:
        """The value (numbers written as text, e.g. ``1e-3``, as numbers); ValueError if not allowed."""
        if value is None:
            if self.optional:
                return None
            raise ValueError
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
            raise ValueError
        if self.kind == "str":
            if isinstance(value, bool) or isinstance(value, (list, dict)):
                raise ValueError
            value = value if isinstance(value, str) else str(value)
            if self.choices and value not in self.choices:
                raise ValueError
            return value
        if self.kind == "list":
            if isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, (list, dict)) for v in value)):
                raise ValueError
            return value
        # int / float
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError
        if isinstance(value, str):
            value = float(value.strip())  # ValueError for text that is no number
            if self.kind == "int":
                if not value.is_integer():
                    raise ValueError
                value = int(value)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError
        if self.kind == "int" and not isinstance(value, int):
            if not float(value).is_integer():
                raise ValueError
            value = int(value)
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            raise ValueError
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            raise ValueError
        return value


POSITIVE_INT = Value("int", low=1)
OPTIONAL_POSITIVE_INT = Value("int", low=1, optional=True)
NON_NEGATIVE_INT = Value("int", low=0)
POSITIVE = Value("float", low=0, low_open=True)
NON_NEGATIVE = Value("float", low=0)
BETA = Value("float", low=0, high=1, high_open=True)
PROBABILITY = Value("float", low=0, high=1, high_open=True)
BOOL = Value("bool")
TEXT = Value("str")
OPTIONAL_TEXT = Value("str", optional=True)
ONE_OR_MANY = Value("list", optional=True)


def _keys(spec: Value, *names: str) -> Dict[str, Value]:
    return {name: spec for name in names}


# The recipe keys whose values are known (Megatron-LM's pretrain_gpt spelling). A key not here
# is passed on unchecked.
RECIPE_VALUES: Dict[str, Value] = {
    # model sizes
    **_keys(POSITIVE_INT, "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size",
            "seq_length", "max_position_embeddings", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim",
            "v_head_dim", "moe_router_topk", "moe_ffn_hidden_size", "rotary_base"),
    **_keys(OPTIONAL_POSITIVE_INT, "num_query_groups", "kv_channels", "q_lora_rank", "num_experts",
            "moe_shared_expert_intermediate_size", "moe_router_num_groups", "moe_router_group_topk",
            "recompute_num_layers", "decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers"),
    "mtp_num_layers": Value("int", low=0, optional=True),
    "moe_layer_freq": Value("list"),  # an int, a list or a list expression; checked by RECIPE_RULES
    # parallel layout
    **_keys(POSITIVE_INT, "tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
            "expert_model_parallel_size", "expert_tensor_parallel_size"),
    # batch and schedule
    **_keys(POSITIVE_INT, "micro_batch_size", "global_batch_size", "train_iters", "log_interval"),
    **_keys(OPTIONAL_POSITIVE_INT, "eval_interval", "save_interval", "exit_interval", "lr_decay_iters"),
    "eval_iters": NON_NEGATIVE_INT,
    "lr_warmup_iters": NON_NEGATIVE_INT,
    "lr_warmup_fraction": Value("float", low=0, high=1, optional=True),
    "seed": NON_NEGATIVE_INT,
    # optimizer
    "lr": POSITIVE,
    "min_lr": NON_NEGATIVE,
    **_keys(BETA, "adam_beta1", "adam_beta2"),
    "adam_eps": POSITIVE,
    "weight_decay": NON_NEGATIVE,
    "clip_grad": NON_NEGATIVE,  # 0: no clipping
    "init_method_std": POSITIVE,
    "norm_epsilon": POSITIVE,
    **_keys(PROBABILITY, "hidden_dropout", "attention_dropout"),
    # MoE and MTP losses, router
    **_keys(NON_NEGATIVE, "moe_aux_loss_coeff", "moe_z_loss_coeff", "mtp_loss_scaling_factor",
            "moe_router_bias_update_rate"),
    "moe_router_topk_scaling_factor": Value("float", low=0, low_open=True, optional=True),
    "moe_router_score_function": Value("str", choices=("softmax", "sigmoid")),
    "moe_router_dtype": Value("str", choices=("fp32", "fp64"), optional=True),
    **_keys(TEXT, "moe_router_load_balancing_type", "moe_token_dispatcher_type", "position_embedding_type",
            "lr_decay_style"),
    # attention / rope
    **_keys(POSITIVE, "rotary_scaling_factor", "mscale", "mscale_all_dim"),
    "rotary_percent": Value("float", low=0, high=1, low_open=True),
    "normalization": Value("str", choices=("LayerNorm", "RMSNorm")),
    # flags
    **_keys(BOOL, "bf16", "fp16", "swiglu", "disable_bias_linear", "untie_embeddings_and_output_weights",
            "multi_latent_attention", "moe_router_enable_expert_bias", "qk_layernorm", "group_query_attention",
            "use_distributed_optimizer", "deterministic_mode", "mock_data", "moe_grouped_gemm"),
    # recompute
    "recompute_granularity": Value("str", choices=("full", "selective"), optional=True),
    "recompute_method": Value("str", choices=("uniform", "block"), optional=True),
    "recompute_modules": ONE_OR_MANY,
    # files
    **_keys(OPTIONAL_TEXT, "save", "load", "tokenizer_type", "tokenizer_model", "split",
            "pipeline_model_parallel_layout"),
    "data_path": ONE_OR_MANY,
    # the plugin's section (its other settings are checked by FP8FlowSettings)
    "fp8flow.enabled": BOOL,
    "fp8flow.recompute_experts": BOOL,
}


def _layer_freq_problem(args: dict) -> Optional[str]:
    value, layers = args.get("moe_layer_freq"), args.get("num_layers")
    if value is None:
        return None
    from .training.model import layer_freq  # torch only; no Megatron import

    try:
        freq = layer_freq(value)
    except (ValueError, SyntaxError, TypeError):
        return "must be an integer >= 1, a list of 0/1 per layer or a list expression such as ([0]*3+[1]*58)"
    if isinstance(freq, int):
        return None if freq >= 1 else "as an integer must be >= 1 (every N-th layer is MoE)"
    if not (isinstance(freq, list) and all(v in (0, 1) for v in freq)):
        return "must be a list of 0 (dense) and 1 (MoE), one per layer"
    if isinstance(layers, int) and len(freq) != layers:
        return f"lists {len(freq)} layers but num_layers is {layers}"
    return None


# Rules that tie keys together: (keys, problem(args) -> None or what is wrong). A rule applies
# when all its keys are set (not null).
RECIPE_RULES: Tuple[Tuple[Tuple[str, ...], Callable[[dict], Optional[str]]], ...] = (
    (("moe_layer_freq",), _layer_freq_problem),
    (("moe_router_topk", "num_experts"),
     lambda a: None if a["moe_router_topk"] <= a["num_experts"] else "moe_router_topk must be at most num_experts"),
    (("global_batch_size", "micro_batch_size"),
     lambda a: None if a["global_batch_size"] % a["micro_batch_size"] == 0
     else "global_batch_size must be a multiple of micro_batch_size"),
    (("num_experts", "expert_model_parallel_size"),
     lambda a: None if a["num_experts"] % a["expert_model_parallel_size"] == 0
     else "num_experts must be a multiple of expert_model_parallel_size"),
    (("num_experts", "moe_router_num_groups"),
     lambda a: None if a["num_experts"] % a["moe_router_num_groups"] == 0
     else "num_experts must be a multiple of moe_router_num_groups"),
    (("moe_router_group_topk", "moe_router_num_groups"),
     lambda a: None if a["moe_router_group_topk"] <= a["moe_router_num_groups"]
     else "moe_router_group_topk must be at most moe_router_num_groups"),
    (("min_lr", "lr"), lambda a: None if a["min_lr"] <= a["lr"] else "min_lr must be at most lr"),
)


def _label(key: str, value: Any, where: str, overridden: Iterable[str]) -> str:
    if key in overridden:
        return f"--set {key}={as_text(value)}"
    return f"{where}: {key} = {as_text(value)}"


def check_recipe_values(args: Dict[str, Any], fp8flow: Dict[str, Any], where: str,
                        overridden: Iterable[str] = ()) -> None:
    """Check (and, for numbers written as text, convert in place) a recipe's values against
    :data:`RECIPE_VALUES`, then :data:`RECIPE_RULES`. ``where``: the recipe file, named in the
    message; ``overridden``: keys given by ``--set`` (``fp8flow.`` prefixed for the plugin's),
    named as ``--set key=value`` instead. Raises RecipeError."""
    from .recipes.recipe import RecipeError

    overridden = set(overridden)
    for section, prefix in ((args, ""), (fp8flow, "fp8flow.")):
        for key, value in list(section.items()):
            spec = RECIPE_VALUES.get(prefix + key)
            if spec is None:
                continue
            try:
                section[key] = spec.check(value)
            except (TypeError, ValueError):
                raise RecipeError(f"{_label(prefix + key, value, where, overridden)}: {prefix + key} must be "
                                  f"{spec.allowed()}") from None
    for keys, problem in RECIPE_RULES:
        if any(args.get(k) is None for k in keys):
            continue
        why = problem(args)
        if why:
            named = [f"--set {k}={as_text(args[k])}" for k in keys if k in overridden]
            rest = ", ".join(f"{k} = {as_text(args[k])}" for k in keys if k not in overridden)
            if not named:
                head = f"{where}: {rest}"
            else:
                head = ", ".join(named) + (f" with {rest} from {where}" if rest else "")
            raise RecipeError(f"{head}: {why}")


# --------------------------------------------------------------------------------------------
# argparse types (argparse names the flag: "argument --steps: ...")


def _number(text: str, kind, allowed: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} given; expected {allowed}") from None
    return value


def _int_at_least(low: int, allowed: str, name: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = _number(text, int, allowed)
        if value < low:
            raise argparse.ArgumentTypeError(f"{text} given; expected {allowed}")
        return value

    parse.__name__ = name
    return parse


def int_at_least(low: int, what: str = "") -> Callable[[str], int]:
    """An argparse type: an integer >= ``low`` (``what``: why, shown in the message)."""
    return _int_at_least(low, f"an integer >= {low}{f' ({what})' if what else ''}", f"int_at_least_{low}")


# A count, size or step number: 1, 2, ...
positive_int = _int_at_least(1, "a positive integer (1, 2, ...)", "positive_int")
non_negative_int = _int_at_least(0, "an integer >= 0", "non_negative_int")


# The precisions the compact loop trains: name -> the plugin's mode (flow_double_quant: the
# paper's ablation, FP8 tokens with dequantize + requantize in place of the transpose).
PRECISION_MODES = {"bf16": "bf16", "blockwise": "blockwise", "fp8flow": "flow", "flow": "flow",
                   "flow_double_quant": "flow_double_quant"}


def precisions(text: str) -> list:
    """A comma-separated list of precisions, e.g. ``bf16,fp8flow``: each known, none twice."""
    names = [p.strip() for p in text.split(",")]
    allowed = ", ".join(sorted(PRECISION_MODES))
    for name in names:
        if name not in PRECISION_MODES:
            raise argparse.ArgumentTypeError(f"{text!r} names an unknown precision {name!r}; expected a "
                                             f"comma-separated list of {allowed}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r} names a precision twice; each trains once")
    return names


def step_list(text: str) -> list:
    """Comma-separated step numbers, e.g. ``1,500,1000``: each a positive integer."""
    steps = []
    for part in text.split(","):
        try:
            steps.append(positive_int(part.strip()))
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"{text!r}: {part.strip()!r} is not a step; expected positive integers "
                                             "separated by commas (1,500,1000)") from None
    return sorted(set(steps))


def labels(text: str) -> list:
    names = [x.strip() for x in text.split(",")]
    if any(not n for n in names):
        raise argparse.ArgumentTypeError(f"{text!r} has an empty label; expected names separated by commas")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r} names a run twice; every label must be different")
    return names


def writable_file(text: str) -> str:
    """A file to write: its folder must exist."""
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"{text!r}: the folder {folder} does not exist")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; expected a file name")
    return text


# --------------------------------------------------------------------------------------------
# Results directories


def fresh_results_dir(path: str) -> Tuple[str, bool]:
    """``path`` if it does not exist or is an empty directory, else the first of ``path-2``,
    ``path-3``, ... that is: results are never written over. Returns (directory, moved)."""
    def free(p: str) -> bool:
        return not os.path.exists(p) or (os.path.isdir(p) and not os.listdir(p))

    if free(path):
        return path, False
    base = path.rstrip("/\\") or path
    n = 2
    while not free(f"{base}-{n}"):
        n += 1
    return f"{base}-{n}", True
