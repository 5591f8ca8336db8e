"""A small DeepSeek-style MoE GPT built from stock megatron-core, with or without the plugin.

Used by the tests, ``fp8flow audit`` and the CPU demo: sigmoid router with expert bias and
group-limited routing, a shared expert, SwiGLU experts, RMSNorm, RoPE and one MTP layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .parallel import free_port, init_parallel, reseed, shutdown_parallel  # noqa: F401  (init_parallel: callers use it from here too)
from .settings import FP8FlowSettings


@dataclass(frozen=True)
class SmallMoE:
    num_layers: int = 2
    hidden: int = 128
    heads: int = 4
    ffn: int = 256
    experts: int = 4
    topk: int = 2
    moe_ffn: int = 128
    shared_ffn: int = 128
    groups: int = 2
    group_topk: int = 1
    mtp_layers: int = 1
    vocab: int = 256
    seq: int = 32
    batch: int = 2


def device_shape(**overrides) -> SmallMoE:
    """The small model for this machine: wider layers on a GPU, where cuBLAS's blockwise FP8
    GEMMs need K % 512 == 0 (PyTorch 2.11)."""
    widths = dict(hidden=512, ffn=1024, moe_ffn=512, shared_ffn=512) if torch.cuda.is_available() else {}
    return SmallMoE(**{**widths, **overrides})


def config(shape: SmallMoE = SmallMoE(), **overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kw = dict(
        num_layers=shape.num_layers, hidden_size=shape.hidden, num_attention_heads=shape.heads,
        ffn_hidden_size=shape.ffn, num_moe_experts=shape.experts, moe_router_topk=shape.topk,
        moe_ffn_hidden_size=shape.moe_ffn, moe_shared_expert_intermediate_size=shape.shared_ffn,
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
        moe_router_num_groups=shape.groups, moe_router_group_topk=shape.group_topk,
        moe_router_topk_scaling_factor=2.5, moe_router_dtype="fp32", moe_aux_loss_coeff=1e-4,
        moe_router_load_balancing_type="seq_aux_loss", moe_token_dispatcher_type="alltoall",
        mtp_num_layers=shape.mtp_layers or None, mtp_loss_scaling_factor=0.1,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, normalization="RMSNorm",
        bf16=True, params_dtype=torch.bfloat16, hidden_dropout=0.0, attention_dropout=0.0,
        expert_model_parallel_size=_ep_size(), use_cpu_initialization=not torch.cuda.is_available(),
    )
    kw.update(overrides)
    return TransformerConfig(**kw)


def _ep_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_expert_model_parallel_world_size()


def layer_specs(cfg, settings: Optional[FP8FlowSettings]):
    """(decoder layer spec, MTP block spec) for ``cfg``: stock local (non-TE) specs with every
    layer MoE, or the plugin's."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec, get_gpt_mtp_block_spec

    from .spec import apply_fp8flow_to_spec

    layer = get_gpt_layer_local_spec(num_experts=cfg.num_moe_experts, moe_grouped_gemm=False,
                                     normalization=cfg.normalization)
    mtp = get_gpt_mtp_block_spec(cfg, layer, use_transformer_engine=False) if cfg.mtp_num_layers else None
    if settings is not None:
        layer, mtp = apply_fp8flow_to_spec(layer, settings), apply_fp8flow_to_spec(mtp, settings)
    return layer, mtp


def build(cfg, settings: Optional[FP8FlowSettings] = None, shape: SmallMoE = SmallMoE(), seed: int = 7):
    """The GPT model; ``settings`` None gives the stock MoE layers."""
    from megatron.core.models.gpt.gpt_model import GPTModel

    reseed(seed)
    layer, mtp = layer_specs(cfg, settings)
    model = GPTModel(cfg, transformer_layer_spec=layer, vocab_size=shape.vocab, max_sequence_length=shape.seq,
                     position_embedding_type="rope", mtp_block_spec=mtp)
    return model.to("cuda") if torch.cuda.is_available() else model


def batch(shape: SmallMoE = SmallMoE(), seed: int = 0):
    """Token ids, position ids, causal attention mask and labels for one step."""
    g = torch.Generator().manual_seed(seed)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tokens = torch.randint(0, shape.vocab, (shape.batch, shape.seq + 1), generator=g)
    ids, labels = tokens[:, :-1].to(dev), tokens[:, 1:].to(dev)
    pos = torch.arange(shape.seq, device=dev).expand(shape.batch, -1)
    mask = torch.triu(torch.ones(shape.seq, shape.seq, dtype=torch.bool, device=dev), 1)[None, None]
    return ids, pos, mask, labels


def loss_and_backward(model, data) -> torch.Tensor:
    """Mean LM loss (MTP and auxiliary losses flow into the backward as Megatron arranges)."""
    ids, pos, mask, labels = data
    loss = model(ids, pos, mask, labels=labels).float().mean()
    loss.backward()
    return loss.detach()


def spawn(worker, world: int, *args) -> list:
    """Run ``worker(rank, world, port, *args, queue)`` in ``world`` processes, each of which puts
    ``(rank, result)`` in the queue; returns the results in rank order. A failing rank fails the call."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(worker, rank, world, port, args, queue)) for rank in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    failed = [i for i, p in enumerate(procs) if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"rank(s) {failed} failed (exit codes {[procs[i].exitcode for i in failed]})")
    results = dict(queue.get() for _ in range(world))
    return [results[r] for r in range(world)]


def _rank_main(worker, rank: int, world: int, port: int, args: tuple, queue) -> None:
    """One spawned rank: the worker, then its process groups torn down before the interpreter's
    exit (not after a failure, where another rank may still be inside a collective)."""
    import faulthandler

    faulthandler.enable()  # a native abort prints every thread's Python stack
    worker(rank, world, port, *args, queue)
    shutdown_parallel()
