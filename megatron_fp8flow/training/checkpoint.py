"""Checkpoints of the compact training loop, so a long run can go on in later jobs.

Megatron's flag names: ``save`` (a directory), ``save_interval`` (steps) and ``load`` (a
directory to resume from). A checkpoint is everything the next step depends on: the model's
weights, the fp32 master weights, AdamW's state, the text reader's position, the random number
generators and the logged history. One file per rank:
``DIR/iter_0000900/rank000.pt``, and ``DIR/latest_iteration.txt`` names the newest complete one
(written after every rank has saved). These are the compact loop's own files, not Megatron's
distributed checkpoints (``pretrain()`` writes those).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist

TRACKER = "latest_iteration.txt"


def per_precision_dirs(recipe, precision: str):
    """A run of several precisions must not share one checkpoint directory: ``save`` and
    ``load`` get a subdirectory named after the precision (always, so a run resumes the same
    way whether it was started alone or beside others). Returns the recipe, changed in place."""
    for key in ("save", "load"):
        if recipe.args.get(key):
            recipe.args[key] = os.path.join(str(recipe.args[key]), precision)
    return recipe


def _rank_file(directory: str, step: int, rank: int) -> str:
    return os.path.join(directory, f"iter_{step:07d}", f"rank{rank:03d}.pt")


def _identity(args: dict, mode: Optional[str], world: int) -> dict:
    """What a checkpoint must agree on with the run that loads it."""
    keys = ("num_layers", "hidden_size", "num_experts", "moe_ffn_hidden_size", "seq_length", "vocab_size",
            "micro_batch_size", "global_batch_size", "train_iters")
    return {"precision": mode or "stock", "world": world, **{k: args.get(k) for k in keys}}


def save(directory: str, step: int, rank: int, world: int, args: dict, mode: Optional[str], model, master,
         optimizer, data, history) -> str:
    """Write this rank's state after ``step`` steps; rank 0 updates the tracker once all ranks have."""
    path = _rank_file(directory, step, rank)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    state = {
        "step": step,
        "identity": _identity(args, mode, world),
        "model": model.state_dict(),
        "master": [m.detach() for m in master],
        "param_names": _param_names(model),  # the order of master and of the optimizer's state
        "optimizer": optimizer.state_dict(),
        "data_rng": data.gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "history": history,
    }
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)  # a file is either whole or absent
    if world > 1:
        dist.barrier()
    if rank == 0:
        with open(os.path.join(directory, TRACKER + ".tmp"), "w") as fh:
            fh.write(f"{step}\n")
        os.replace(os.path.join(directory, TRACKER + ".tmp"), os.path.join(directory, TRACKER))
    return path


def _param_names(model) -> list:
    """Names of the trainable parameters, in the order the training loop lists them."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def latest_step(directory: str) -> Optional[int]:
    """The newest complete checkpoint's step in ``directory``, or None when it holds none."""
    tracker = os.path.join(directory, TRACKER)
    if not os.path.exists(tracker):
        return None
    with open(tracker) as fh:
        text = fh.read().strip()
    if not text.isdigit():
        raise ValueError(f"{tracker} should hold a step number, found {text!r}")
    return int(text)


def load(directory: str, rank: int, world: int, args: dict, mode: Optional[str], model, master,
         optimizer, data) -> tuple:
    """Restore this rank's state from the newest checkpoint in ``directory``; returns
    (steps done, history), or (0, []) when the directory holds no checkpoint yet (a first run
    with ``load`` and ``save`` naming the same directory starts fresh)."""
    step = latest_step(directory) if os.path.isdir(directory) else None
    if step is None:
        return 0, []
    path = _rank_file(directory, step, rank)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory} names step {step} as its newest checkpoint but {path} is missing "
                                f"(was it saved by {world} processes?)")
    state = torch.load(path, map_location="cpu", weights_only=False)
    want = _identity(args, mode, world)
    if state["identity"] != want:
        diff = {k: (state["identity"].get(k), v) for k, v in want.items() if state["identity"].get(k) != v}
        raise ValueError(f"the checkpoint {path} belongs to another run: (saved, now) differ in {diff}")
    names = _param_names(model)
    saved_names = state.get("param_names")
    if saved_names is None:
        raise ValueError(f"the checkpoint {path} does not name its parameters (written by an earlier version, whose "
                         "parameter order may differ); resume it with the version that wrote it")
    if sorted(saved_names) != sorted(names):
        raise ValueError(f"the checkpoint {path} holds other parameters: missing {sorted(set(names) - set(saved_names))[:4]}, "
                         f"unexpected {sorted(set(saved_names) - set(names))[:4]}")
    where = {n: i for i, n in enumerate(saved_names)}
    model.load_state_dict(state["model"])
    with torch.no_grad():
        for m, name in zip(master, names, strict=True):
            m.copy_(state["master"][where[name]])
    # torch's optimizer state is by position: list the saved positions in today's parameter order
    opt_state = state["optimizer"]
    for group in opt_state["param_groups"]:
        group["params"] = [group["params"][where[name]] for name in names]
    optimizer.load_state_dict(opt_state)
    data.gen.set_state(state["data_rng"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"])
    return state["step"], state["history"]
