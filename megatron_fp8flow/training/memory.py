"""What the GPU memory holds at its peak during training, by category, from torch's allocator.

:func:`recording` (the compact loop) and :class:`PretrainRecorder` (Megatron's ``pretrain()``)
turn on the caching allocator's history (every allocation and free with the Python stack that
made it) from before the model is built; :func:`peak_breakdown` replays that history to the
moment the most memory was allocated and sorts the blocks alive then:

* ``parameters``: the model's parameters (under Megatron's DDP, its parameter buffers);
* ``main_grad``: the fp32 gradient buffers (Megatron's DDP, or :class:`~..megatron.main_grad.MainGrads`);
* ``optimizer``: fp32 master weights and Adam's moments;
* ``fp8_weights``: the FP8 copies of the expert weights;
* ``activations``: allocated in a forward and still alive (kept for the backward);
* ``backward``: allocated in a backward (activation gradients, the wgrad operands, workspace);
  the autograd engine runs backward functions in its own thread, so a block with no Python
  frame of the training loop counts here;
* ``other``: the rest (the data, the loss, evaluation, communication buffers).

Blocks that are still alive when the snapshot is taken and lie in a storage of the model or the
optimizer (:func:`tensor_ranges`) are sorted by what they hold; the others by the frames that
allocated them.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import os
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

from ..megatron.optimizer import torch_optimizers

logger = logging.getLogger(__name__)

CATEGORIES = ("parameters", "main_grad", "optimizer", "fp8_weights", "activations", "backward", "other")
_FP8_WEIGHT_FUNCTIONS = {"_quantize_weights", "_quantize_transposed", "quantize_expert_weights"}
# where the compact loop and Megatron's pretrain() build the model, and run a training step
_BUILD_FUNCTIONS = {"build_model", "get_model", "model_provider", "setup_model_and_optimizer"}
_STEP_FUNCTIONS = {"_train", "train_step"}
_FORWARD_FUNCTIONS = {"forward", "forward_step"}
_BACKWARD_FUNCTIONS = {"backward", "backward_step"}
_OPTIMIZER_FILES = ("torch/optim/", "megatron/core/optimizer/")

Range = Tuple[int, int, str]  # [start, end) of a storage and its category


def category(frames: List[dict]) -> str:
    """The category of a block from the Python frames of its allocation (innermost first)."""
    names = {f.get("name", "") for f in frames}
    files = [f.get("filename", "") for f in frames]
    if names & _FP8_WEIGHT_FUNCTIONS:
        return "fp8_weights"
    if any(f.endswith("main_grad.py") for f in files):
        return "main_grad"
    if "master_weights" in names or any(part in f for f in files for part in _OPTIMIZER_FILES):
        return "optimizer"
    if names & _BUILD_FUNCTIONS:
        return "parameters"
    if not (names & _STEP_FUNCTIONS) or names & _BACKWARD_FUNCTIONS:
        return "backward"
    if names & _FORWARD_FUNCTIONS:
        return "activations"
    return "other"


def tensor_ranges(modules: Iterable[torch.nn.Module], optimizer=None, device_type: str = "cuda") -> List[Range]:
    """The storages of the run's long-lived tensors: the parameters of ``modules`` (whole
    buffers where Megatron's DDP keeps them in one), their ``main_grad``, and the master
    weights and state of every torch optimizer inside ``optimizer`` (Megatron's wrappers
    included). Where two overlap, the first listed wins (a parameter the optimizer updates in
    place is a parameter)."""
    ranges: List[Range] = []
    seen = set()

    def add(t, what: str) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type != device_type:
            return
        storage = t.untyped_storage()
        start = storage.data_ptr()
        if storage.nbytes() and start not in seen:
            seen.add(start)
            ranges.append((start, start + storage.nbytes(), what))

    modules = list(modules)
    for m in modules:
        for p in m.parameters():
            add(p, "parameters")
    for m in modules:
        for p in m.parameters():
            add(getattr(p, "main_grad", None), "main_grad")
    for opt in torch_optimizers(optimizer):
        for group in opt.param_groups:
            for p in group["params"]:
                add(p, "optimizer")
        for state in opt.state.values():
            for v in state.values():
                add(v, "optimizer")
    return ranges


class _Ranges:
    """Which storage of :func:`tensor_ranges` an address lies in (storages do not overlap)."""

    def __init__(self, ranges: Sequence[Range]):
        self._ranges = sorted(ranges)
        self._starts = [r[0] for r in self._ranges]

    def find(self, addr: int) -> Optional[str]:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and addr < self._ranges[i][1]:
            return self._ranges[i][2]
        return None


def _frame_text(frames: List[dict], n: int = 8) -> List[str]:
    return [f"{os.path.basename(f.get('filename', '?'))}:{f.get('line', '?')} {f.get('name', '?')}" for f in frames[:n]]


def peak_breakdown(snapshot: dict, device: int = 0, ranges: Sequence[Range] = ()) -> Dict[str, object]:
    """{"peak_gb", "by_category_gb", "events", "peak_allocation", "unrecorded_gb"} at the peak
    of allocated memory in the snapshot's history (``torch.cuda.memory._snapshot()``). A block
    counts from its allocation to the request to free it, as ``memory_allocated`` does.

    ``ranges`` (:func:`tensor_ranges`, taken when the snapshot was) sort the blocks that are
    still alive at the snapshot by the storage they lie in. ``peak_allocation`` is the category
    and innermost frames of the allocation that reached the peak (what was running then).
    ``unrecorded_gb`` is what is alive at the snapshot but missing from the history (allocated
    before the recording started, or dropped from the allocator's bounded event buffer): the
    replay undercounts the peak by about that much. None when the snapshot has no segments."""
    events = snapshot["device_traces"][device]
    total = best = 0
    best_index = -1
    sizes: Dict[int, int] = {}
    for i, e in enumerate(events):  # pass 1: where the peak is
        if e["action"] == "alloc":
            sizes[e["addr"]] = e["size"]
            total += e["size"]
            if total > best:
                best, best_index = total, i
        elif e["action"] == "free_requested" and e["addr"] in sizes:
            total -= sizes.pop(e["addr"])
    live: Dict[int, dict] = {}
    for e in events[:best_index + 1]:  # pass 2: the blocks alive at the peak
        if e["action"] == "alloc":
            live[e["addr"]] = e
        elif e["action"] == "free_requested":
            live.pop(e["addr"], None)
    freed_later = {e["addr"] for e in events[best_index + 1:] if e["action"] == "free_requested" and e["addr"] in live}
    held = _Ranges(ranges)
    by_cat = {c: 0 for c in CATEGORIES}
    for addr, e in live.items():
        what = None if addr in freed_later else held.find(addr)
        by_cat[what or category(e.get("frames", []))] += e["size"]
    peak_event = events[best_index] if best_index >= 0 else {}
    unrecorded = None
    if "segments" in snapshot:
        alive_now = sum(b["size"] for s in snapshot["segments"] if s.get("device", device) == device
                        for b in s.get("blocks", ()) if b.get("state") == "active_allocated")
        unrecorded = max(0, alive_now - total) / 1e9
    return {
        "peak_gb": best / 1e9,
        "by_category_gb": {c: v / 1e9 for c, v in by_cat.items()},
        "events": len(events),
        "peak_allocation": {"category": category(peak_event.get("frames", [])) if peak_event else None,
                            "size_gb": peak_event.get("size", 0) / 1e9,
                            "frames": _frame_text(peak_event.get("frames", []))},
        "unrecorded_gb": unrecorded,
    }


_MAX_ENTRIES = 4_000_000


@contextlib.contextmanager
def recording(enabled: bool, max_entries: int = _MAX_ENTRIES) -> Iterator[dict]:
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


class PretrainRecorder:
    """The memory breakdown of a Megatron ``pretrain()`` run: :meth:`start` before the model is
    built (the launcher's model provider), :meth:`optimizer_built` on the optimizer Megatron
    builds; after optimizer step ``step`` (a whole iteration: every micro-batch's forward and
    backward, then the update) it writes :func:`peak_breakdown` to ``path`` as JSON and stops
    recording. Steps after the first repeat the same allocations, so a short window holds the
    run's peak; recording slows those steps."""

    def __init__(self, path: str, step: int = 3, max_entries: int = _MAX_ENTRIES, write=None):
        if step < 1:
            raise ValueError(f"the memory breakdown's step must be >= 1, got {step}")
        self.path, self.step, self.max_entries = path, step, max_entries
        self.steps_done = 0
        self.started = self.finished = False
        self._write = write or _write_json

    def start(self) -> None:
        if self.started or not torch.cuda.is_available():
            return
        torch.cuda.memory._record_memory_history(max_entries=self.max_entries, stacks="python")
        self.started = True

    def optimizer_built(self, optimizer, model_chunks) -> None:
        """Wrap ``optimizer.step`` (once) to finish after the chosen step."""
        step = optimizer.step
        if getattr(step, "_fp8flow_memory", False):
            return

        def recorded_step(*args, **kwargs):
            result = step(*args, **kwargs)
            self.steps_done += 1
            if self.started and not self.finished and self.steps_done == self.step:
                self.finish(model_chunks, optimizer)
            return result

        recorded_step._fp8flow_memory = True
        optimizer.step = recorded_step

    def finish(self, model_chunks, optimizer) -> dict:
        try:
            device = torch.cuda.current_device()
            breakdown = peak_breakdown(torch.cuda.memory._snapshot(), device, tensor_ranges(model_chunks, optimizer))
            breakdown["step"] = self.step
            breakdown["max_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)
            self.finished = True
        self._write(self.path, breakdown)
        logger.warning("fp8flow: memory at the peak of steps 1-%d by category written to %s:\n%s", self.step,
                       self.path, render({"this run": breakdown}))
        return breakdown


def _write_json(path: str, data: dict) -> None:
    if os.path.exists(path):  # checked when the run starts too; never overwrite a result
        raise FileExistsError(f"{path} exists; the memory breakdown is not written over it")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(data, fh, indent=1)


def render(breakdowns: Dict[str, dict]) -> str:
    """A markdown table: one column per run, one row per category, in GB."""
    names = list(breakdowns)
    lines = ["| at the peak, GB | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for c in CATEGORIES:
        lines.append(f"| {c} | " + " | ".join(f"{breakdowns[n]['by_category_gb'][c]:.2f}" for n in names) + " |")
    lines.append("| **peak allocated** | " + " | ".join(f"{breakdowns[n]['peak_gb']:.2f}" for n in names) + " |")
    return "\n".join(lines)
