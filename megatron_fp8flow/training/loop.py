"""The compact training loop: a recipe's model and schedule on byte-level real text (the
python-docs corpus, or the Megatron indexed datasets a recipe names in ``data_path``).

Megatron-LM's ``pretrain()`` (:mod:`megatron_fp8flow.pretrain_gpt`) is the full launcher; this
loop runs where ``megatron.training`` is missing (the 0.16 wheel, CI, the CPU demo) and is what
the side-by-side precision comparisons use. It keeps what matters for comparing precisions:
fp32 master weights with AdamW, gradient accumulation to the global batch in fp32 ``main_grad``
buffers with Megatron DDP's contract (the plugin's experts add theirs inside the GEMMs), warm-up
+ cosine learning rate, gradient clipping, the router's expert-bias update once per step, and
the MTP and auxiliary losses Megatron adds in the backward. With Megatron's ``save`` /
``save_interval`` / ``load`` and ``exit_interval`` a long run goes on over several jobs
(:mod:`.checkpoint`).

Under ``torchrun`` with N processes it runs expert parallelism EP = N (no other model
parallelism): every rank reads its own batches, the experts are split across ranks, and the
non-expert gradients are summed over ranks (each rank's loss is scaled by 1/N, so every
gradient is that of the mean loss over all ranks' tokens).
"""

from __future__ import annotations

import math
import os
import resource
import time
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional

import torch
import torch.distributed as dist

from ..megatron.main_grad import MainGrads
from ..megatron.settings import FP8FlowSettings
from ..recipes import Recipe, RecipeError
from . import checkpoint
from .dump import ExpertDump
from .memory import recording
from .profile import profiled_step
from .model import build_model
from .text import ByteBatches, read_indexed_datasets, split_fractions


@dataclass
class StepLog:
    step: int
    loss: float
    lr: float
    tokens_per_s: float
    peak_mem_gb: float
    val_loss: Optional[float] = None  # mean LM loss on fixed held-out text (every eval_interval steps)
    grad_norm: Optional[float] = None  # global gradient norm before clipping, mean over the interval


def _settings(recipe: Recipe) -> Optional[FP8FlowSettings]:
    if not recipe.fp8flow_enabled:
        return None
    s = {k: v for k, v in recipe.fp8flow.items() if k != "enabled"}
    s.setdefault("gradient_accumulation_fusion", True)  # the loop keeps Megatron DDP's fp32 main_grad
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


def _check_layout(args, world: int) -> None:
    for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
        if args.get(key, 1) not in (1, None):
            raise RecipeError(f"the compact loop runs expert parallelism only: {key} = {args[key]} needs Megatron-LM's "
                              "pretrain (python -m megatron_fp8flow.pretrain_gpt)")
    ep = args.get("expert_model_parallel_size", 1) or 1
    if ep != world:
        raise RecipeError(f"the compact loop runs EP = number of processes: expert_model_parallel_size = {ep} with "
                          f"{world} process(es); launch {ep} (fp8flow train --nproc {ep}) or set "
                          f"expert_model_parallel_size={world}")


REQUIRED = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "seq_length")


def check_run(recipe: Recipe, steps: Optional[int] = None, world: Optional[int] = None) -> None:
    """What the compact loop needs from a recipe (already checked key by key when it was
    loaded), checked before anything is built: ``steps``, the model keys it reads, the parallel
    layout, the batch split over ``world`` processes (default: WORLD_SIZE), the data files, and
    Megatron-Core's own TransformerConfig checks. Raises RecipeError naming the key."""
    args = recipe.args
    where = recipe.sources[0] if recipe.sources else recipe.name
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise RecipeError(f"steps = {steps!r}: must be a positive integer (1, 2, ...)")
    missing = [k for k in REQUIRED if args.get(k) is None]
    if missing:
        raise RecipeError(f"{where}: the compact loop needs {', '.join(missing)} (not set)")
    world = world or int(os.environ.get("WORLD_SIZE", 1))
    _check_layout(args, world)
    micro, glob = args.get("micro_batch_size", 1), args.get("global_batch_size", args.get("micro_batch_size", 1))
    if glob % (micro * world):
        raise RecipeError(f"global_batch_size {glob} must be a multiple of micro_batch_size x processes = "
                          f"{micro} x {world}")
    if args.get("eval_interval") and args.get("eval_iters", 4) < 1:
        raise RecipeError(f"eval_iters = {args['eval_iters']} with eval_interval = {args['eval_interval']}: the "
                          "validation loss needs eval_iters >= 1 (or leave eval_interval out)")
    paths = args.get("data_path")
    for prefix in ([paths] if isinstance(paths, str) else paths or []):
        for ext in (".bin", ".idx"):
            if isinstance(prefix, str) and not os.path.isfile(prefix + ext):
                raise RecipeError(f"data_path = {prefix}: {prefix + ext} not found (make one with "
                                  f"`fp8flow data {prefix}`)")
    from .model import config_class, config_kwargs

    try:  # Megatron's own checks of the model settings, without building the model
        config_class(args)(**config_kwargs(args))
    except (AssertionError, ValueError, TypeError) as err:
        raise RecipeError(f"{where}: Megatron-Core's TransformerConfig refuses these settings: {err}") from None


def _is_expert(param) -> bool:
    return not getattr(param, "allreduce", True)  # Megatron sets allreduce=False on expert-parallel ones


def _sync_and_clip(params, master, clip: Optional[float], world: int) -> torch.Tensor:
    """Sum the non-expert gradients over ranks, then clip by the global norm (the replicated
    parameters counted once, every rank's experts counted). Returns that norm, before clipping,
    as a device tensor (read at the next log)."""
    if world > 1:
        shared = [m.grad for m, p in zip(master, params) if not _is_expert(p)]
        flat = torch.cat([g.reshape(-1) for g in shared])
        dist.all_reduce(flat)
        offset = 0
        for g in shared:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
    dev = master[0].device

    def sum_sq(grads):  # one multi-tensor norm launch, no full-size temporaries
        return torch.stack(torch._foreach_norm(grads)).square().sum() if grads else torch.zeros((), device=dev)

    expert_sq = sum_sq([m.grad for m, p in zip(master, params) if _is_expert(p)])
    if world > 1:
        dist.all_reduce(expert_sq)
    norm = (sum_sq([m.grad for m, p in zip(master, params) if not _is_expert(p)]) + expert_sq).sqrt()
    if clip:
        torch._foreach_mul_([m.grad for m in master], (clip / (norm + 1e-6)).clamp(max=1.0))
    return norm


def _validation_loss(model, data: ByteBatches, iters: int, pos, mask, rank: int, world: int) -> float:
    """Mean LM loss over ``iters`` fixed held-out batches (the same ones at every evaluation,
    different ones per rank), without gradients: no auxiliary losses, no expert-bias counts."""
    dev = pos.device
    total = torch.zeros((), device=dev)
    model.eval()
    with torch.no_grad():
        for i in range(iters):
            ids, labels = (t.to(dev) for t in data.validation(seed=1_000_003 * (rank + 1) + i))
            total += model(ids, pos, mask, labels=labels).float().mean()
    model.train()
    total /= iters * world
    if world > 1:
        dist.all_reduce(total)
    return float(total)


def _batches(args: dict, micro: int, seed: int) -> ByteBatches:
    """The recipe's text: Megatron indexed datasets when it names a ``data_path`` (split by its
    ``split``), else the python-docs corpus (95% training, 5% validation)."""
    if not args.get("data_path"):
        return ByteBatches(args["seq_length"], micro, seed)
    tokens = read_indexed_datasets(args["data_path"], args.get("vocab_size"))
    train_part, valid_part = split_fractions(args.get("split"))
    return ByteBatches(args["seq_length"], micro, seed, split=train_part, tokens=tokens, valid_fraction=valid_part)


def train(recipe: Recipe, steps: Optional[int] = None, seed: Optional[int] = None,
          on_log: Optional[Callable[[StepLog], None]] = None, keep_model: Optional[dict] = None,
          memory: Optional[dict] = None, dump: Optional[tuple] = None,
          profile: Optional[tuple] = None) -> List[dict]:
    """Train the recipe's model; returns one record per logged step (``keep_model``: a dict that
    receives the trained model under "model"; ``memory``: a dict that receives the GPU memory at
    its peak by category under "breakdown", see :mod:`.memory`; recording it slows the run, so
    time another; ``dump``: (directory, steps) to save the first MoE layer's expert tensors at,
    see :mod:`.dump`; ``profile``: (step, dict) to profile that step, 1-based, into the
    dict's "step_profile", see :mod:`.profile`). ``seed`` (default: the recipe's ``seed``, else
    Megatron's default 1234) sets the initial weights and the order of the training text.

    With the recipe's ``deterministic_mode`` (Megatron's flag) PyTorch runs deterministic
    algorithms only (an op without one raises, naming itself): without it, atomics in a few
    backward ops make two GPU runs of one seed drift apart."""
    check_run(recipe, steps)
    if not recipe.args.get("deterministic_mode"):
        return _train(recipe, steps, seed, on_log, keep_model, memory, dump, profile)
    from ..megatron.parallel import enable_deterministic_algorithms

    previous = enable_deterministic_algorithms()
    try:
        return _train(recipe, steps, seed, on_log, keep_model, memory, dump, profile)
    finally:
        torch.use_deterministic_algorithms(previous)


def _train(recipe: Recipe, steps: Optional[int], seed: Optional[int],
           on_log: Optional[Callable[[StepLog], None]], keep_model: Optional[dict],
           memory: Optional[dict] = None, dump: Optional[tuple] = None,
           profile: Optional[tuple] = None) -> List[dict]:
    with recording(memory is not None) as recorded:
        history = _train_steps(recipe, steps, seed, on_log, keep_model, dump, profile)
    if memory is not None:
        memory.update(recorded)
    return history


def master_weights(params) -> List[torch.Tensor]:
    """fp32 master copies of the parameters, whose .grad is the parameter's main_grad (the
    optimizer reads the main gradients in place: no copy)."""
    master = [p.detach().float().clone().requires_grad_(True) for p in params]
    for m, p in zip(master, params):
        m.grad = p.main_grad
    return master


def _train_steps(recipe: Recipe, steps: Optional[int], seed: Optional[int],
                 on_log: Optional[Callable[[StepLog], None]], keep_model: Optional[dict],
                 dump: Optional[tuple] = None, profile: Optional[tuple] = None) -> List[dict]:
    from megatron.core.distributed.finalize_model_grads import _update_router_expert_bias, reset_model_temporary_tensors

    from ..megatron.experts import release_fp8_weights
    from ..megatron.parallel import init_parallel, reseed

    args = recipe.args
    seed = seed if seed is not None else args.get("seed", 1234)
    rank, world = (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))
    _check_layout(args, world)
    init_parallel(rank, world, ep=world)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    reseed(seed)  # Megatron's RNG states too: on a GPU it initializes the linear layers under them
    settings = _settings(recipe)
    model = build_model(args, settings)
    params = [p for p in model.parameters() if p.requires_grad]
    main_grads = MainGrads(model)  # fp32 gradients over the step's microbatches, as Megatron's DDP keeps them
    master = master_weights(params)
    dumper = ExpertDump(model, dump[1], dump[0]) if dump else None
    opt = torch.optim.AdamW(master, lr=args.get("lr", 1e-4), betas=(args.get("adam_beta1", 0.9),
                            args.get("adam_beta2", 0.95)), eps=args.get("adam_eps", 1e-8),
                            weight_decay=args.get("weight_decay", 0.0),
                            # one kernel over all tensors, no model-sized temporaries (foreach's are)
                            fused=torch.cuda.is_available())
    micro, glob = args.get("micro_batch_size", 1), args.get("global_batch_size", args.get("micro_batch_size", 1))
    if glob % (micro * world):
        raise RecipeError(f"global_batch_size {glob} must be a multiple of micro_batch_size x processes = "
                          f"{micro} x {world}")
    accumulate = glob // (micro * world)
    total = steps if steps is not None else args.get("train_iters", 100)
    data = _batches(args, micro, seed + 1000 * rank)
    mode = getattr(settings, "mode", None)
    run_args = {**args, "train_iters": total}  # a checkpoint belongs to this schedule's length
    start, history = 0, []
    if args.get("load"):
        try:
            start, history = checkpoint.load(args["load"], rank, world, run_args, mode, model, master, opt, data)
        except (ValueError, FileNotFoundError) as err:  # a checkpoint of another run, or an incomplete one
            raise RecipeError(f"load = {args['load']}: {err}") from err
    # Megatron's exit_interval: stop after the next step that is a multiple of it, on the full
    # run's learning-rate schedule (one part of a longer run; resume it with load).
    exit_every = args.get("exit_interval")
    stop = min(total, (start // exit_every + 1) * exit_every) if exit_every else total
    save_dir, save_every = args.get("save"), args.get("save_interval")
    seq = args["seq_length"]
    dev = next(model.parameters()).device
    pos = torch.arange(seq, device=dev).expand(micro, -1)
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool, device=dev), 1)[None, None]
    window, norms, t0, tokens = [], [], time.perf_counter(), 0
    log_every = args.get("log_interval", 10)
    eval_every, eval_iters = args.get("eval_interval"), args.get("eval_iters", 4)
    for step in range(start, stop):
        lr = _lr(args, step, total)
        for group in opt.param_groups:
            group["lr"] = lr
        with profiled_step(step + 1, *(profile or (None, None))):
            main_grads.zero()
            if dumper:
                dumper.arm(step + 1)
            step_loss = torch.zeros((), device=dev)
            model.set_is_first_microbatch()  # as Megatron's schedules: cache_fp8_weights quantizes once per step
            for _ in range(accumulate):
                ids, labels = (t.to(dev) for t in data.next())
                loss = model(ids, pos, mask, labels=labels).float().mean() / (accumulate * world)
                loss.backward()
                step_loss += loss.detach()
                tokens += ids.numel() * world
            release_fp8_weights(model)  # before opt.step changes the weights in place
            if model.config.moe_router_enable_expert_bias:
                _update_router_expert_bias([model], model.config)
            # as Megatron's finalize_model_grads: the routers' token counts are one step's (the
            # expert-bias update reads them), and none are left to a checkpoint, which omits them
            reset_model_temporary_tensors(model.config, [model])
            norms.append(_sync_and_clip(params, master, args.get("clip_grad"), world))
            opt.step()
            with torch.no_grad():
                for m, p in zip(master, params):
                    p.copy_(m)
        if profile and step + 1 == profile[0]:  # the profiler's slower step stays out of tokens/s
            t0, tokens = time.perf_counter(), 0
        if world > 1:
            dist.all_reduce(step_loss)
        window.append(step_loss)  # read at the next log, not every step (no host sync per step)
        if (step + 1) % log_every == 0 or step + 1 == stop:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - t0
            rec = StepLog(step + 1, float(torch.stack(window).mean()), lr, tokens / elapsed, _peak_memory_gb(),
                          grad_norm=float(torch.stack(norms).mean()))
            if eval_every and ((step + 1) % eval_every == 0 or step + 1 == stop):
                rec.val_loss = _validation_loss(model, data, eval_iters, pos, mask, rank, world)
            history.append(asdict(rec))
            if on_log:
                on_log(rec)
            window, norms, t0, tokens = [], [], time.perf_counter(), 0
        if save_dir and ((save_every and (step + 1) % save_every == 0) or step + 1 == stop):
            checkpoint.save(save_dir, step + 1, rank, world, run_args, mode, model, master, opt, data, history)
    if keep_model is not None:
        keep_model["model"] = model
    return history
