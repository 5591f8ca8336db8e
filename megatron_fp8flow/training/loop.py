"""The compact training loop: one process, a recipe's model and schedule, byte-level real text.

Where Megatron-LM's ``pretrain()`` is installed, ``fp8flow train`` uses it; this loop is for
megatron-core without ``megatron.training`` (the 0.16 wheel, CI, the CPU demo). It keeps what
matters for comparing precisions: fp32 master weights with AdamW, gradient accumulation to the
global batch, warm-up + cosine learning rate, gradient clipping, the router's expert-bias
update once per step, and the MTP and auxiliary losses Megatron adds in the backward.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional

import torch

from ..megatron.settings import FP8FlowSettings
from ..recipes import Recipe
from .model import build_model
from .text import ByteBatches


@dataclass
class StepLog:
    step: int
    loss: float
    lr: float
    tokens_per_s: float
    peak_mem_gb: float


def _settings(recipe: Recipe) -> Optional[FP8FlowSettings]:
    if not recipe.fp8flow_enabled:
        return None
    s = {k: v for k, v in recipe.fp8flow.items() if k != "enabled"}
    if not torch.cuda.is_available():
        s["gemm_backend"] = "emulated"  # no FP8 tensor cores on a CPU
    return FP8FlowSettings(**s)


def _lr(args, step: int, total: int) -> float:
    lr, min_lr = args.get("lr", 1e-4), args.get("min_lr", 0.0)
    warm = args.get("lr_warmup_iters", 0)
    if step < warm:
        return lr * (step + 1) / warm
    frac = min(1.0, (step - warm) / max(1, total - warm))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * frac))


def _peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def _check_layout(args) -> None:
    for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
                "context_parallel_size"):
        if args.get(key, 1) not in (1, None):
            raise ValueError(f"the compact loop runs one process: {key} = {args[key]} needs Megatron-LM's pretrain "
                             "(fp8flow train with megatron.training installed)")


def train(recipe: Recipe, steps: Optional[int] = None, seed: int = 1234,
          on_log: Optional[Callable[[StepLog], None]] = None) -> List[dict]:
    """Train the recipe's model; returns one record per logged step."""
    from megatron.core.distributed.finalize_model_grads import _update_router_expert_bias

    from ..megatron import small_model

    args = recipe.args
    _check_layout(args)
    small_model.init_parallel(0, 1, 1)
    torch.manual_seed(seed)
    model = build_model(args, _settings(recipe))
    params = [p for p in model.parameters() if p.requires_grad]
    master = [p.detach().float().clone().requires_grad_(True) for p in params]
    opt = torch.optim.AdamW(master, lr=args.get("lr", 1e-4), betas=(args.get("adam_beta1", 0.9),
                            args.get("adam_beta2", 0.95)), eps=args.get("adam_eps", 1e-8),
                            weight_decay=args.get("weight_decay", 0.0))
    micro, glob = args.get("micro_batch_size", 1), args.get("global_batch_size", args.get("micro_batch_size", 1))
    accumulate = max(1, glob // micro)
    total = steps or args.get("train_iters", 100)
    data = ByteBatches(args["seq_length"], micro, seed)
    seq = args["seq_length"]
    dev = next(model.parameters()).device
    pos = torch.arange(seq, device=dev).expand(micro, -1)
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool, device=dev), 1)[None, None]
    history, window, t0, tokens = [], [], time.perf_counter(), 0
    log_every = args.get("log_interval", 10)
    for step in range(total):
        lr = _lr(args, step, total)
        for group in opt.param_groups:
            group["lr"] = lr
        for p in params:
            p.grad = None
        step_loss = 0.0
        for _ in range(accumulate):
            ids, labels = (t.to(dev) for t in data.next())
            loss = model(ids, pos, mask, labels=labels).float().mean() / accumulate
            loss.backward()
            step_loss += float(loss.detach())
            tokens += ids.numel()
        if model.config.moe_router_enable_expert_bias:
            _update_router_expert_bias([model], model.config)
        for m, p in zip(master, params):
            m.grad = p.grad.float() if p.grad is not None else torch.zeros_like(m)
        if args.get("clip_grad"):
            torch.nn.utils.clip_grad_norm_(master, args["clip_grad"])
        opt.step()
        with torch.no_grad():
            for m, p in zip(master, params):
                p.copy_(m)
        window.append(step_loss)
        if (step + 1) % log_every == 0 or step + 1 == total:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - t0
            rec = StepLog(step + 1, sum(window) / len(window), lr, tokens / elapsed, _peak_memory_gb())
            history.append(asdict(rec))
            if on_log:
                on_log(rec)
            window, t0, tokens = [], time.perf_counter(), 0
    return history
