"""Train one recipe in several precisions side by side (the compact loop), then a table and a
plot of the loss curves: what ``fp8flow demo`` and ``fp8flow train --compare`` print."""

from __future__ import annotations

import json
import os
import statistics
from typing import Dict, List, Optional, Sequence

import torch

from ..recipes import load_recipe
from .loop import StepLog, train

PRECISION_MODES = {"bf16": "bf16", "blockwise": "blockwise", "fp8flow": "flow", "flow": "flow"}


def demo_recipe() -> str:
    """The recipe that fits this machine. The DeepSeek-V3 proxies use MLA, which the compact loop's
    local layers cannot build, so every machine runs the tiny proxy here for now."""
    return "proxies/tiny_cpu"


def run(recipe_name: str, precisions: Sequence[str] = ("bf16", "fp8flow"), steps: Optional[int] = None,
        overrides: Optional[dict] = None, out_dir: str = "fp8flow_results", echo=print) -> Dict[str, dict]:
    os.makedirs(out_dir, exist_ok=True)
    results = {}
    for precision in precisions:
        if precision not in PRECISION_MODES:
            raise ValueError(f"unknown precision {precision!r}; expected one of {sorted(PRECISION_MODES)}")
        recipe = load_recipe(recipe_name, {**(overrides or {}), "fp8flow.enabled": True,
                                           "fp8flow.mode": PRECISION_MODES[precision]})
        total = steps or recipe.args.get("train_iters", 100)

        def progress(rec: StepLog, p=precision, total=total):
            echo(f"[{p}] step {rec.step}/{total}  loss {rec.loss:.4f}  lr {rec.lr:.2e}  "
                 f"{rec.tokens_per_s:,.0f} tokens/s  peak {rec.peak_mem_gb:.2f} GB")

        history = train(recipe, steps=steps, on_log=progress)
        results[precision] = {"recipe": recipe_name, "history": history, "summary": summarize(history)}
    with open(os.path.join(out_dir, "compare.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    plot(results, os.path.join(out_dir, "loss_curves.png"), recipe_name)
    return results


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
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (plain-PyTorch kernels)"
    lines.append(f"\nDevice: {device}. Loss: mean of the last 10% of logged steps. Peak memory: "
                 f"{'GPU allocated' if torch.cuda.is_available() else 'process resident set (all runs so far)'}.")
    return "\n".join(lines)


def plot(results: Dict[str, dict], path: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for precision, r in results.items():
        ax.plot([h["step"] for h in r["history"]], [h["loss"] for h in r["history"]], label=precision)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (bytes)")
    ax.set_title(f"{title}: loss by precision")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
