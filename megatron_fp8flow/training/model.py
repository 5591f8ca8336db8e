"""A Megatron-Core GPT from a recipe's arguments (the compact loop's model: the same
megatron-core modules ``pretrain()`` builds, with the plugin's MoE layers when enabled)."""

from __future__ import annotations

import ast
import dataclasses
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F

# Megatron-LM arguments whose TransformerConfig field has another name.
_RENAMED = {"norm_epsilon": "layernorm_epsilon", "num_experts": "num_moe_experts"}


def layer_freq(value):
    """``moe_layer_freq`` as Megatron-LM accepts it: an int, a list, or a list expression like
    "([0]*3+[1]*58)" (evaluated without ``eval``: literals, lists, + and * only)."""
    if isinstance(value, (int, list)):
        return value

    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.List):
            return [ev(e) for e in node.elts]
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            a, b = ev(node.left), ev(node.right)
            return a + b if isinstance(node.op, ast.Add) else a * b
        raise ValueError(f"moe_layer_freq {value!r}: only integers, lists, + and * are allowed")

    return ev(ast.parse(str(value), mode="eval").body)


def config_class(args: Dict[str, Any]):
    """MLATransformerConfig for recipes with multi-latent attention, else TransformerConfig."""
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    return MLATransformerConfig if args.get("multi_latent_attention") else TransformerConfig


def config_kwargs(args: Dict[str, Any]) -> Dict[str, Any]:
    """Config keyword arguments (see :func:`config_class`) from a recipe's Megatron arguments."""
    fields = {f.name for f in dataclasses.fields(config_class(args))}
    kw: Dict[str, Any] = {}
    for key, value in args.items():
        key = _RENAMED.get(key, key)
        if key in fields and value is not None:
            kw[key] = value
    if args.get("swiglu"):
        kw.update(gated_linear_unit=True, activation_func=F.silu)
    if args.get("disable_bias_linear"):
        kw["add_bias_linear"] = False
    if "moe_layer_freq" in kw:
        kw["moe_layer_freq"] = layer_freq(kw["moe_layer_freq"])
    if args.get("bf16"):
        kw["params_dtype"] = torch.bfloat16
    kw.setdefault("hidden_dropout", 0.0)
    kw.setdefault("attention_dropout", 0.0)
    kw["use_cpu_initialization"] = not torch.cuda.is_available()
    return kw


def build_model(args: Dict[str, Any], fp8flow: Optional[Any] = None):
    """GPTModel from the recipe arguments; ``fp8flow`` (FP8FlowSettings) swaps in the plugin."""
    from megatron.core.models.gpt.gpt_model import GPTModel

    from ..megatron.spec import gpt_model_specs

    cfg = config_class(args)(**config_kwargs(args))
    layer, mtp = gpt_model_specs(cfg, fp8flow)  # SDPA attention: flash kernels on the GPU, and MLA's head dims
    model = GPTModel(
        cfg, transformer_layer_spec=layer, vocab_size=args["vocab_size"],
        max_sequence_length=args.get("max_position_embeddings", args["seq_length"]),
        position_embedding_type=args.get("position_embedding_type", "rope"),
        rotary_base=args.get("rotary_base", 10000),
        share_embeddings_and_output_weights=not args.get("untie_embeddings_and_output_weights", False),
        mtp_block_spec=mtp,
    )
    return model.cuda() if torch.cuda.is_available() else model
