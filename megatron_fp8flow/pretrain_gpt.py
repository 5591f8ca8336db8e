"""Pretrain a GPT with the plugin's MoE layers through Megatron's own ``pretrain()``.

    torchrun --nproc_per_node 8 -m megatron_fp8flow.pretrain_gpt <pretrain_gpt flags> --moe-fp8-flow [...]

Everything is Megatron's (argument parsing and validation, initialization, distributed
optimizer, schedules, checkpointing, logging, datasets) except three small functions that a
``pretrain_gpt.py`` script provides: the model provider (here: the GPT model with
:func:`~megatron_fp8flow.megatron.spec.gpt_model_specs`, i.e. the plugin's MoE layers when
``--moe-fp8-flow`` is given, and SDPA attention for local layers so MLA works without
TransformerEngine), the dataset provider (mock data or Megatron's indexed datasets) and the
forward step. Plugin flags come from :func:`~megatron_fp8flow.megatron.add_fp8flow_args`.

``megatron.training`` ships in the megatron-core wheel from 0.19; with older wheels put a
Megatron-LM checkout on PYTHONPATH (``fp8flow patch`` is the other way in).

Scope: tensor and context parallel size 1 (the paper's layouts are TP1); pipeline, expert and
data parallelism as Megatron provides them. Other layouts get a clear error.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
from functools import partial
from typing import Optional

import torch

from .megatron import compat


def _training():
    """megatron.training, or a clear error naming the way to get it."""
    try:
        import megatron.training  # noqa: F401
    except ImportError as err:
        version = ".".join(map(str, compat.megatron_version()))
        raise ImportError(
            f"python -m megatron_fp8flow.pretrain_gpt needs megatron.training, which megatron-core {version} does "
            "not ship (it is in the megatron-core wheel from 0.19). Install megatron-core>=0.19, or put a "
            "Megatron-LM checkout on PYTHONPATH, or patch your fork's pretrain_gpt.py with `fp8flow patch`. "
            "Without it, `fp8flow train RECIPE` runs the compact loop."
        ) from err
    import megatron.training as training

    return training


def check_layout(args) -> None:
    """The layouts this launcher supports; a clear error for the others."""
    problems = []
    if getattr(args, "tensor_model_parallel_size", 1) != 1:
        problems.append(f"tensor_model_parallel_size={args.tensor_model_parallel_size} (use 1)")
    if getattr(args, "context_parallel_size", 1) != 1:
        problems.append(f"context_parallel_size={args.context_parallel_size} (use 1)")
    if getattr(args, "sft", False) or getattr(args, "fim_data", False):
        problems.append("SFT/FIM datasets (pretraining data only)")
    if problems:
        raise ValueError("megatron_fp8flow.pretrain_gpt supports " + "; ".join(problems) +
                         "; for other layouts patch Megatron-LM's own pretrain_gpt.py (fp8flow patch)")


def add_launcher_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The plugin's flags and this launcher's own (Megatron's ``extra_args_provider``)."""
    from .megatron.args import add_fp8flow_args

    parser = add_fp8flow_args(parser)
    group = parser.add_argument_group("megatron-fp8flow launcher")
    group.add_argument("--fp8flow-memory-breakdown", metavar="JSON", default=None,
                       help="record the GPU allocator's history from the model's construction to the end of "
                       "--fp8flow-memory-breakdown-step and write the memory at its peak by category (parameters, "
                       "main_grad, optimizer state, FP8 weights, activations, backward) to this new file")
    group.add_argument("--fp8flow-memory-breakdown-step", type=int, default=3, metavar="N",
                       help="the last iteration the breakdown records (default 3; the first iteration allocates "
                       "the optimizer state at its end, later ones repeat the steady state)")
    return parser


def check_args(args) -> None:
    """The launcher's checks of the parsed arguments, before any work starts."""
    check_layout(args)
    path = getattr(args, "fp8flow_memory_breakdown", None)
    if path is None:
        return
    step, iters = getattr(args, "fp8flow_memory_breakdown_step", 3), getattr(args, "train_iters", None)
    if step < 1 or (iters is not None and step > iters):
        raise ValueError(f"--fp8flow-memory-breakdown-step {step}: must be between 1 and --train-iters ({iters})")
    if os.path.exists(path):
        raise ValueError(f"--fp8flow-memory-breakdown {path}: the file exists; name a new one (results are never "
                         "written over)")
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.exists(parent) and not os.access(parent, os.W_OK):
        raise ValueError(f"--fp8flow-memory-breakdown {path}: cannot write into {parent}")


_memory_recorder = None  # the PretrainRecorder of --fp8flow-memory-breakdown, made on the first model build


def _record_memory(args) -> None:
    """Start the allocator history before the first model is built; the optimizer Megatron
    builds next finishes it (see :func:`_install_optimizer_hook`)."""
    global _memory_recorder
    if not getattr(args, "fp8flow_memory_breakdown", None) or _memory_recorder is not None:
        return
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return  # the first rank's memory; the others do not pay for the recording
    from .training.memory import PretrainRecorder

    _memory_recorder = PretrainRecorder(args.fp8flow_memory_breakdown, args.fp8flow_memory_breakdown_step)
    _memory_recorder.start()


def _install_optimizer_hook(training_module=None) -> bool:
    """Hand the optimizer ``pretrain()`` builds (and the model chunks it is for) to the memory
    recorder, when one records; idempotent like the plugin's other wraps."""
    if training_module is None:
        import megatron.training.training as training_module
    build = training_module.get_megatron_optimizer
    if getattr(build, "_fp8flow_memory", False):
        return False

    @functools.wraps(build)
    def get_megatron_optimizer(config, model_chunks, *args, **kwargs):
        optimizer = build(config, model_chunks, *args, **kwargs)
        if _memory_recorder is not None:
            _memory_recorder.optimizer_built(optimizer, model_chunks)
        return optimizer

    get_megatron_optimizer._fp8flow_memory = True
    training_module.get_megatron_optimizer = get_megatron_optimizer
    return True


def model_provider(pre_process: bool = True, post_process: bool = True, vp_stage: Optional[int] = None,
                   config=None, pg_collection=None):
    """GPTModel of the parsed arguments, with the plugin's MoE layers under --moe-fp8-flow."""
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.training import get_args
    from megatron.training.arguments import core_transformer_config_from_args

    from .megatron import settings_from_args
    from .megatron.spec import gpt_model_specs

    args = get_args()
    check_args(args)  # before 0.19 pretrain() parses the arguments itself: checked here
    _record_memory(args)
    if config is None:
        config = core_transformer_config_from_args(args)
    use_te = getattr(args, "transformer_impl", "local") == "transformer_engine" and compat.have_transformer_engine()
    block, mtp = gpt_model_specs(config, settings_from_args(args), use_transformer_engine=use_te, vp_stage=vp_stage)
    kwargs = dict(
        config=config, transformer_layer_spec=block, vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings, pre_process=pre_process, post_process=post_process,
        fp16_lm_cross_entropy=args.fp16_lm_cross_entropy, parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type, rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base, mtp_block_spec=mtp, vp_stage=vp_stage, pg_collection=pg_collection,
    )
    return GPTModel(**compat.accepted_kwargs(GPTModel.__init__, kwargs))


def dataset_config(args):
    """GPTDatasetConfig from the arguments (only the fields this megatron-core version has)."""
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    from megatron.training import get_tokenizer
    from megatron.training.utils import get_blend_and_blend_per_split

    blend, blend_per_split = get_blend_and_blend_per_split(args)
    wanted = dict(
        random_seed=args.seed, sequence_length=args.seq_length, blend=blend, blend_per_split=blend_per_split,
        split=args.split, path_to_cache=args.data_cache_path, mmap_bin_files=args.mmap_bin_files,
        tokenizer=get_tokenizer(), reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask, eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader,
        num_dataset_builder_threads=getattr(args, "num_dataset_builder_threads", 1),
        data_parallel_size=getattr(args, "data_parallel_size", 1), context_parallel_size=1,
    )
    fields = {f.name for f in dataclasses.fields(GPTDatasetConfig) if f.init}
    return GPTDatasetConfig(**{k: v for k, v in wanted.items() if k in fields})


def datasets_provider(train_val_test_num_samples, vp_stage=None):
    """Mock data (--mock-data) or Megatron's indexed datasets (--data-path ...)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset
    from megatron.training import get_args

    args = get_args()
    kind = MockGPTDataset if args.mock_data else GPTDataset
    return BlendedMegatronDatasetBuilder(kind, train_val_test_num_samples, lambda: True, dataset_config(args)).build()


datasets_provider.is_distributed = True  # every rank builds its datasets (TP = 1)


def _loss(loss_mask: torch.Tensor, output: torch.Tensor):
    """Sum of the token losses, the token count, and what Megatron reports (its 0.19 convention:
    the schedule divides by the number of tokens over the data-parallel group)."""
    losses = output.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    tokens = mask.sum().to(torch.int)
    return loss, tokens, {"lm loss": torch.cat([loss.detach().view(1), tokens.detach().view(1).float()])}


def forward_step(data_iterator, model, return_schedule_plan: bool = False):
    """One micro-batch: its tokens through the model, and the loss function for the schedule."""
    batch = next(data_iterator) if data_iterator is not None else None
    if batch is None:  # a middle pipeline stage: activations come from the previous stage
        output = model(None, None, None)
        return output, partial(_loss, None)
    cuda = {k: (v.cuda(non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    output = model(cuda["tokens"], cuda["position_ids"], cuda.get("attention_mask"), labels=cuda["labels"],
                   loss_mask=cuda["loss_mask"])
    return output, partial(_loss, cuda["loss_mask"])


def launch_command(recipe, nproc: int = 1) -> list:
    """The torchrun command that pretrains ``recipe`` (a loaded Recipe) with this launcher.

    Defaults a recipe may leave out: mock data when it names no data, the null tokenizer (byte
    or synthetic ids need no vocabulary files) when it names no tokenizer; without
    TransformerEngine, Megatron's local layers and no RoPE fusion (TE's kernel); without apex's
    fused weight-gradient kernel, no gradient-accumulation fusion, and without TE or apex no
    persistent LayerNorm (Megatron's linear and norm layers refuse to start otherwise)."""
    from .recipes.recipe import RecipeError, to_argv

    args = recipe.args
    warmup, decay = args.get("lr_warmup_iters") or 0, args.get("lr_decay_iters") or args.get("train_iters")
    if warmup and decay and warmup >= decay:  # Megatron's scheduler asserts this without a message
        which = "lr_decay_iters" if args.get("lr_decay_iters") else "train_iters"
        raise RecipeError(f"{recipe.name}: lr_warmup_iters ({warmup}) must be less than {which} ({decay}); "
                          f"set a shorter warm-up, e.g. --set lr_warmup_iters={max(decay // 10, 0)}")
    argv = to_argv(recipe)
    if recipe.fp8flow_enabled and "gradient_accumulation_fusion" not in recipe.fp8flow:
        # Megatron's DDP gives every weight an fp32 main_grad: the expert GEMMs add into it
        argv.append("--moe-fp8-flow-gradient-accumulation-fusion")
    if not any(args.get(k) for k in ("data_path", "train_data_path", "mock_data")):
        argv.append("--mock-data")
    if not args.get("tokenizer_type"):
        argv += ["--tokenizer-type", "NullTokenizer"]
    if not compat.have_transformer_engine():
        if not args.get("transformer_impl"):
            argv += ["--transformer-impl", "local"]
        if not args.get("apply_rope_fusion"):
            argv.append("--no-rope-fusion")
        if not compat.have_apex() and not args.get("no_persist_layer_norm"):
            argv.append("--no-persist-layer-norm")  # apex's persistent LayerNorm; torch's norm refuses it
    fuse = args.get("gradient_accumulation_fusion")
    if fuse is False or (fuse is None and not _have_fused_wgrad()):  # Megatron's flag is the negation
        argv.append("--no-gradient-accumulation-fusion")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "megatron_fp8flow.pretrain_gpt", *argv]


def _have_fused_wgrad() -> bool:
    import importlib.util

    return importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None or compat.have_transformer_engine()


def main(argv=None) -> None:
    """Parse Megatron's arguments plus the plugin's, then run Megatron's ``pretrain()``."""
    _training()
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    from .megatron import optimizer

    optimizer.install()  # torch's fused Adam where Megatron falls back to torch's optimizers
    _install_optimizer_hook()

    compat.run_pretrain(datasets_provider, model_provider, forward_step, extra_args_provider=add_launcher_args,
                        check_args=check_args)


if __name__ == "__main__":
    main()
