"""What the GPU memory holds at its peak during training, by category, from torch's allocator.

:func:`recording` turns on the caching allocator's history (every allocation and free with the
Python stack that made it) around the model's construction and the first steps; the
:func:`peak_breakdown` of the snapshot replays that history to the moment the most memory was
allocated and sorts the blocks alive then by what made them:

* ``parameters``: allocated while the model was built;
* ``main_grad``: the fp32 gradient buffer (:class:`~..megatron.main_grad.MainGrads`);
* ``optimizer``: fp32 master weights and AdamW's moments;
* ``fp8_weights``: the FP8 copies of the expert weights;
* ``activations``: allocated in a forward and still alive (kept for the backward);
* ``backward``: allocated in a backward (activation gradients, the wgrad operands, workspace);
  the autograd engine runs backward functions in its own thread, so a block with no Python
  frame of the training loop counts here;
* ``other``: the rest (the data, the loss, evaluation).
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List

import torch

CATEGORIES = ("parameters", "main_grad", "optimizer", "fp8_weights", "activations", "backward", "other")
_FP8_WEIGHT_FUNCTIONS = {"_quantize_weights", "_quantize_transposed", "quantize_expert_weights"}


def category(frames: List[dict]) -> str:
    """The category of a block from the Python frames of its allocation (innermost first)."""
    names = {f.get("name", "") for f in frames}
    files = [f.get("filename", "") for f in frames]
    if names & _FP8_WEIGHT_FUNCTIONS:
        return "fp8_weights"
    if any(f.endswith("main_grad.py") for f in files):
        return "main_grad"
    if "master_weights" in names or any("torch/optim" in f for f in files):
        return "optimizer"
    if "build_model" in names:
        return "parameters"
    in_loop = "_train" in names
    if not in_loop or "backward" in names:
        return "backward"
    if "forward" in names:
        return "activations"
    return "other"


def peak_breakdown(snapshot: dict, device: int = 0) -> Dict[str, object]:
    """{"peak_gb", "by_category_gb", "events"} at the peak of allocated memory in the snapshot's
    history (``torch.cuda.memory._snapshot()``). A block counts from its allocation to the
    request to free it, as ``memory_allocated`` does."""
    events = snapshot["device_traces"][device]
    live: Dict[int, tuple] = {}
    total = best = 0
    best_live: Dict[int, tuple] = {}
    for e in events:
        action = e["action"]
        if action == "alloc":
            live[e["addr"]] = (e["size"], e.get("frames", []))
            total += e["size"]
            if total > best:
                best, best_live = total, dict(live)
        elif action == "free_requested" and e["addr"] in live:
            total -= live.pop(e["addr"])[0]
    by_cat = {c: 0 for c in CATEGORIES}
    for size, frames in best_live.values():
        by_cat[category(frames)] += size
    return {"peak_gb": best / 1e9, "by_category_gb": {c: v / 1e9 for c, v in by_cat.items()}, "events": len(events)}


@contextlib.contextmanager
def recording(enabled: bool, max_entries: int = 4_000_000) -> Iterator[dict]:
    """Record the allocator's history inside the block (CUDA only); the dict it yields gets
    ``"breakdown"`` (:func:`peak_breakdown`) when the block ends."""
    out: dict = {}
    if not (enabled and torch.cuda.is_available()):
        yield out
        return
    torch.cuda.memory._record_memory_history(max_entries=max_entries, stacks="python")
    try:
        yield out
        out["breakdown"] = peak_breakdown(torch.cuda.memory._snapshot(), torch.cuda.current_device())
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)


def render(breakdowns: Dict[str, dict]) -> str:
    """A markdown table: one column per run, one row per category, in GB."""
    names = list(breakdowns)
    lines = ["| at the peak, GB | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for c in CATEGORIES:
        lines.append(f"| {c} | " + " | ".join(f"{breakdowns[n]['by_category_gb'][c]:.2f}" for n in names) + " |")
    lines.append("| **peak allocated** | " + " | ".join(f"{breakdowns[n]['peak_gb']:.2f}" for n in names) + " |")
    return "\n".join(lines)
