"""Train one recipe in several precisions side by side (the compact loop), then a table and a
plot of the loss curves: what ``fp8flow demo`` and ``fp8flow train --compare`` print."""

from __future__ import annotations

import json
import os
import statistics
from typing import Dict, List, Optional, Sequence

import torch

from ..recipes import Recipe, load_recipe
from ..validation import PRECISION_MODES, UsageError, fresh_results_dir
from .checkpoint import per_precision_dirs

# The compact loop (.loop) imports Megatron-Core; it is imported where training starts, so that
# merging results (fp8flow compare) needs neither Megatron nor its import time.


def demo_recipe() -> str:
    """The recipe that fits this machine: the one-H200 DeepSeek-V3 proxy on a GPU with FP8
    tensor cores and H200-class memory (its bf16 run needs most of an H200's), the tiny proxy otherwise."""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        if (props.major, props.minor) >= (8, 9) and props.total_memory >= 140e9:
            return "proxies/deepseek_v3_proxy_1gpu"
    return "proxies/tiny_cpu"


def device_description() -> str:
    """What ran the training and how its peak memory is measured (kept with each result, so a
    comparison merged elsewhere names the machine of its runs, not its own)."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, peak memory: GPU allocated"
    return "CPU (plain-PyTorch kernels), peak memory: process resident set (all runs so far)"


DEMO_GPU_STEPS = 200  # the demo's default length on a GPU (the recipe's 2000 are the convergence run)


def check_recipes(recipe_name: str, precisions: Sequence[str], steps: Optional[int] = None,
                  overrides: Optional[dict] = None, world: Optional[int] = None) -> Dict[str, Recipe]:
    """Each precision's recipe, loaded and checked for the compact loop on ``world`` processes
    (default: WORLD_SIZE) before anything trains; RecipeError/UsageError name the problem."""
    unknown = [p for p in precisions if p not in PRECISION_MODES]
    if unknown or not precisions:
        raise UsageError(f"precisions {','.join(precisions)}: expected one or more of "
                         f"{', '.join(sorted(PRECISION_MODES))}")
    from .loop import check_run

    recipes = {}
    for precision in precisions:
        recipe = per_precision_dirs(load_recipe(recipe_name, {**(overrides or {}), "fp8flow.enabled": True,
                                                              "fp8flow.mode": PRECISION_MODES[precision]}), precision)
        check_run(recipe, steps, world)
        recipes[precision] = recipe
    return recipes


def run(recipe_name: str, precisions: Sequence[str] = ("bf16", "fp8flow"), steps: Optional[int] = None,
        overrides: Optional[dict] = None, out_dir: str = "fp8flow_results", echo=print,
        memory_breakdown: bool = False, dump: Optional[tuple] = None,
        profile_step: Optional[int] = None) -> Dict[str, dict]:
    """Train the recipe once per precision; under torchrun every rank trains and rank 0 reports
    (returns the results on rank 0, None on the others). Every precision's recipe is loaded and
    checked before the first one trains. Results are never written over: when ``out_dir`` holds
    files already, they go to ``out_dir-2`` (or -3, ...), and ``echo`` says so. Besides
    compare.json: rows.json (one row per run: precision, tokens/s, peak GB) and, with
    ``memory_breakdown`` (GPU), each run's memory at its peak by category (:mod:`.memory`);
    ``dump`` (directory, steps): each run's expert tensors at those steps in directory/PRECISION
    (:mod:`.dump`); ``profile_step``: each run's step of that number profiled by kernel category
    (:mod:`.profile`), under "step_profile"."""
    from .loop import StepLog, train

    lead = int(os.environ.get("RANK", 0)) == 0
    if not lead:
        echo = _silent
    recipes = check_recipes(recipe_name, precisions, steps, overrides)
    for precision, recipe in recipes.items():
        total = steps if steps is not None else recipe.args.get("train_iters", 100)
        if profile_step is not None and not 1 <= profile_step <= total:
            raise UsageError(f"--profile-step {profile_step}: the run has {total} steps (--steps or train_iters); "
                             "profile one of them, after the first few (kernel builds and autotuning happen there)")
    if lead:
        out_dir, moved = fresh_results_dir(out_dir)
        if moved:
            echo(f"{out_dir}: the results go here (the directory asked for holds files already; --out names another)")
        os.makedirs(out_dir, exist_ok=True)
    results = {}
    for precision, recipe in recipes.items():
        total = steps if steps is not None else recipe.args.get("train_iters", 100)

        def progress(rec: StepLog, p=precision, total=total):
            val = f"  val {rec.val_loss:.4f}" if rec.val_loss is not None else ""
            norm = f"  grad norm {rec.grad_norm:.3f}" if rec.grad_norm is not None else ""
            echo(f"[{p}] step {rec.step}/{total}  loss {rec.loss:.4f}{val}{norm}  lr {rec.lr:.2e}  "
                 f"{rec.tokens_per_s:,.0f} tokens/s  peak {rec.peak_mem_gb:.2f} GB")

        memory = {} if memory_breakdown else None
        where = (os.path.join(dump[0], precision), dump[1]) if dump else None
        profiled = {} if profile_step else None
        history = train(recipe, steps=steps, on_log=progress, memory=memory, dump=where,
                        profile=(profile_step, profiled) if profile_step else None)
        results[precision] = {"recipe": recipe_name, "precision": precision, "seed": recipe.args.get("seed", 1234),
                              "history": history, "summary": summarize(history), "device": device_description()}
        if memory:
            results[precision]["memory_at_peak"] = memory["breakdown"]
        if profiled:
            results[precision]["step_profile"] = profiled["step_profile"]
    if not lead:
        return None
    with open(os.path.join(out_dir, "compare.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    rows = [{"precision": p, "recipe": recipe_name, "tokens_per_s": r["summary"]["tokens_per_s"],
             "peak_gb": r["summary"]["peak_mem_gb"], "steps": r["summary"]["steps"],
             "final_loss": r["summary"]["final_loss"], "device": r["device"]} for p, r in results.items()]
    with open(os.path.join(out_dir, "rows.json"), "w") as fh:
        json.dump(rows, fh, indent=1)
    plot(results, os.path.join(out_dir, "loss_curves.png"), recipe_name)
    return results


def _silent(*_args, **_kwargs) -> None:
    pass


def merge(dirs: Sequence[str], out_dir: str, labels: Optional[Sequence[str]] = None,
          smooth: int = 1, echo=print) -> Dict[str, dict]:
    """Results of runs made apart (e.g. one precision per GPU, side by side) as one comparison:
    compare.json and loss_curves.png in ``out_dir``. ``labels`` names each directory's run
    instead of its precision (each directory then holds one run): repeats of one precision, e.g.
    "bf16,fp8flow,bf16 repeat", compare as runs of their own. Every input is read before
    anything is written; a non-empty ``out_dir`` is not written over (``out_dir-2``, ... instead,
    said by ``echo``)."""
    results: Dict[str, dict] = {}
    if labels is not None and len(labels) != len(dirs):
        raise UsageError(f"{len(labels)} labels for {len(dirs)} directories")
    found = []
    for i, d in enumerate(dirs):
        runs = read_results(d)
        if labels is not None:
            if len(runs) != 1:
                raise UsageError(f"{d} holds {len(runs)} runs ({', '.join(runs)}); a label names one")
            runs = {labels[i]: next(iter(runs.values()))}
        found += list(runs.items())
    names = [n for n, _ in found]
    for name, r in found:
        if labels is None and names.count(name) > 1 and "seed" in r:  # seeds of one precision: named apart
            name = f"{name} seed {r['seed']}"
        if name in results:
            raise UsageError(f"run {name!r} is in more than one of {list(dirs)}; label them apart (labels=)")
        results[name] = r
    if not results:
        raise UsageError(f"no results in {list(dirs)}")
    out_dir, moved = fresh_results_dir(out_dir)
    if moved:
        echo(f"{out_dir}: the merged results go here (the directory asked for holds files already; --out names "
             "another)")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "compare.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    plot(results, os.path.join(out_dir, "loss_curves.png"), next(iter(results.values()))["recipe"], smooth)
    return results


def read_results(directory: str) -> Dict[str, dict]:
    """The runs in ``directory``/compare.json (what ``fp8flow train --out`` writes); UsageError,
    naming the directory, when it is missing or is not such a file."""
    path = os.path.join(directory, "compare.json")
    if not os.path.isdir(directory):
        raise UsageError(f"{directory}: no such directory (expected an output directory of fp8flow train --out)")
    if not os.path.isfile(path):
        raise UsageError(f"{directory}: holds no compare.json (expected an output directory of fp8flow train --out)")
    try:
        with open(path) as fh:
            runs = json.load(fh)
    except (OSError, ValueError) as err:
        raise UsageError(f"{path}: cannot be read as JSON ({err})") from None
    if not isinstance(runs, dict) or not all(isinstance(r, dict) and r.get("history") for r in runs.values()):
        raise UsageError(f"{path}: not the results of fp8flow train (expected precision -> run with a history)")
    return runs


def smoothed(losses: Sequence[float], window: int) -> List[float]:
    """Trailing moving average (shorter at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(losses):
        total += v
        if i >= window:
            total -= losses[i - window]
        out.append(total / min(i + 1, window))
    return out


def _series(history: List[dict], key: str) -> List[float]:
    return [h[key] for h in history if h.get(key) is not None]


def convergence(results: Dict[str, dict], window: Optional[int] = None, limit: float = 0.0025) -> Dict[str, dict]:
    """The paper's criterion, each precision against the first: the relative difference of the
    smoothed loss (moving average over ``window`` points) over the last half of training;
    passes when its largest value stays below ``limit`` (0.25%). Uses the held-out validation
    loss when every run logged it (the same text at every evaluation, so far less noisy than
    the training loss of single small batches), else the training loss. ``window`` defaults to
    3 validation points or 20 logged training points."""
    names = list(results)
    key = "val_loss" if all(_series(r["history"], "val_loss") for r in results.values()) else "loss"
    window = window or (3 if key == "val_loss" else 20)
    base = _series(results[names[0]]["history"], key)
    report = {}
    for name in names[1:]:
        other = _series(results[name]["history"], key)
        n = min(len(base), len(other))
        a, b = smoothed(base[:n], window), smoothed(other[:n], window)
        rel = [(y - x) / x for x, y in zip(a[n // 2:], b[n // 2:])]
        worst = max(rel, key=abs) if rel else 0.0
        report[name] = {"max_abs_rel": abs(worst), "signed_at_max": worst, "mean_rel": sum(rel) / max(1, len(rel)),
                        "points": len(rel), "window": window, "limit": limit, "passes": abs(worst) < limit,
                        "loss": key}
    return report


def convergence_table(report: Dict[str, dict], base: str) -> str:
    lines = [f"| precision | loss compared | vs {base}: largest rel. diff (last half, smoothed) | mean rel. diff | "
             "criterion < 0.25% |", "| --- | --- | --- | --- | --- |"]
    for name, r in report.items():
        what = "validation" if r["loss"] == "val_loss" else "training"
        lines.append(f"| {name} | {what} | {100 * r['signed_at_max']:+.3f}% | {100 * r['mean_rel']:+.3f}% | "
                     f"{'met' if r['passes'] else 'MISSED'} |")
    return "\n".join(lines)


def summarize(history: List[dict]) -> dict:
    tail = history[-max(1, len(history) // 10):]
    speeds = [h["tokens_per_s"] for h in history[1:]] or [history[0]["tokens_per_s"]]
    return {"final_loss": statistics.fmean(h["loss"] for h in tail), "tokens_per_s": statistics.median(speeds),
            "peak_mem_gb": max(h["peak_mem_gb"] for h in history), "steps": history[-1]["step"]}


def table(results: Dict[str, dict]) -> str:
    base = next(iter(results.values()))["summary"]
    lines = ["| precision | steps | final loss | vs first | tokens/s | vs first | peak memory GB |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for precision, r in results.items():
        s = r["summary"]
        lines.append(f"| {precision} | {s['steps']} | {s['final_loss']:.4f} | "
                     f"{100 * (s['final_loss'] / base['final_loss'] - 1):+.2f}% | {s['tokens_per_s']:,.0f} | "
                     f"{s['tokens_per_s'] / base['tokens_per_s']:.2f}x | {s['peak_mem_gb']:.2f} |")
    devices = sorted({r.get("device", "not recorded") for r in results.values()})
    lines.append(f"\nDevice: {'; '.join(devices)}. Loss: mean of the last 10% of logged steps.")
    return "\n".join(lines)


def plot(results: Dict[str, dict], path: str, title: str, smooth: int = 1) -> str:
    """Training loss per logged step (a trailing mean over ``smooth`` points when > 1) and the
    validation points, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for precision, r in results.items():
        hist = r["history"]
        val = [(h["step"], h["val_loss"]) for h in hist if h.get("val_loss") is not None]
        train_label = f"{precision} (training{f', mean of {smooth}' if smooth > 1 else ''})"
        line, = ax.plot([h["step"] for h in hist], smoothed([h["loss"] for h in hist], max(1, smooth)),
                        label=train_label, alpha=0.45 if val else 1.0, linewidth=0.8 if val else 1.5)
        if val:
            ax.plot(*zip(*val), marker="o", markersize=3, color=line.get_color(), label=f"{precision} (validation)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss per byte")
    ax.set_title(f"{title}: loss by precision")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
