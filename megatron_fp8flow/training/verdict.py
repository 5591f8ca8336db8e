"""The convergence verdict over runs of several seeds: is each precision's validation loss inside
bf16's own seed-to-seed spread, and within the paper's 0.25%?

Runs are grouped by precision (the ``precision`` and ``seed`` each run of ``fp8flow train``
records). Every run's validation loss is smoothed (a trailing mean over ``window``
evaluations) and compared over the last half of training:

* the **noise floor**: the largest |mean relative difference| between two bf16 seeds;
* per precision: each seed's mean relative difference from the mean bf16 curve, their mean
  over seeds and a 95% confidence interval from the seeds (Student's t);
* **pass** when fp8flow's mean difference is inside the noise floor and within ``limit``
  (0.25%); with fewer than two bf16 seeds there is no noise floor and the verdict is "fail",
  saying so;
* flow against blockwise: "ahead" only when flow's interval lies wholly below blockwise's;
* **resolved**: whether fp8flow's interval lies inside +-``limit``. The pass rule reads the mean;
  a pass whose interval is wider than the limit says the seeds agree on average, not that they
  show the difference below the limit (more seeds narrow the interval).
"""

from __future__ import annotations

import math
import statistics
from itertools import combinations
from typing import Dict, List, Optional, Sequence

from .compare import smoothed

REFERENCE = "bf16"
CANDIDATE = "fp8flow"
# two-sided 95% quantiles of Student's t by degrees of freedom (1..10); 1.96 beyond
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def t95(dof: int) -> float:
    return _T95[dof - 1] if 1 <= dof <= len(_T95) else 1.96


def validation_curve(run: dict) -> Dict[int, float]:
    """step -> validation loss of one run."""
    return {h["step"]: h["val_loss"] for h in run["history"] if h.get("val_loss") is not None}


def group_runs(results: Dict[str, dict]) -> Dict[str, Dict[str, dict]]:
    """precision -> {run name: run}; a run without a recorded precision is its own."""
    groups: Dict[str, Dict[str, dict]] = {}
    for name, run in results.items():
        groups.setdefault(run.get("precision", name), {})[name] = run
    return groups


def _common_steps(curves: Sequence[Dict[int, float]]) -> List[int]:
    steps = set(curves[0])
    for c in curves[1:]:
        steps &= set(c)
    return sorted(steps)


def _interval(values: Sequence[float]) -> Dict[str, Optional[float]]:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "ci95": None, "low": None, "high": None, "seeds": len(values)}
    half = t95(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return {"mean": mean, "ci95": half, "low": mean - half, "high": mean + half, "seeds": len(values)}


def verdict(results: Dict[str, dict], window: int = 3, limit: float = 0.0025) -> dict:
    """The figures and the verdict (see the module's docstring) as a JSON-ready dict."""
    groups = group_runs(results)
    reasons = []
    if REFERENCE not in groups:
        raise ValueError(f"the verdict needs {REFERENCE} runs; got {', '.join(sorted(groups))}")
    all_curves = [validation_curve(r) for g in groups.values() for r in g.values()]
    if any(not c for c in all_curves):
        raise ValueError("every run needs validation losses (eval_interval) for the verdict")
    steps = _common_steps(all_curves)
    if len(steps) < 4:
        raise ValueError(f"the runs share {len(steps)} evaluation steps; the verdict needs at least 4")
    tail = slice(len(steps) // 2, None)

    def smooth(run):
        c = validation_curve(run)
        return smoothed([c[s] for s in steps], window)[tail]

    ref = [smooth(r) for r in groups[REFERENCE].values()]
    ref_mean = [statistics.fmean(v) for v in zip(*ref)]

    def mean_rel(curve, base):
        return statistics.fmean((y - x) / x for x, y in zip(base, curve))

    pairs = [abs(mean_rel(a, b)) for a, b in combinations(ref, 2)]
    floor = max(pairs) if pairs else None
    if floor is None:
        reasons.append(f"one {REFERENCE} seed: no noise floor (run at least two)")
    figures = {}
    for precision, runs in groups.items():
        if precision == REFERENCE:
            continue
        per_seed = {name: mean_rel(smooth(r), ref_mean) for name, r in runs.items()}
        figures[precision] = {**_interval(list(per_seed.values())), "per_seed": per_seed}
    flow = figures.get(CANDIDATE)
    if flow is None:
        reasons.append(f"no {CANDIDATE} runs")
        passes = False
    else:
        inside_floor = floor is not None and abs(flow["mean"]) <= floor
        within_limit = abs(flow["mean"]) <= limit
        if floor is not None and not inside_floor:
            reasons.append(f"{CANDIDATE}'s mean difference {100 * flow['mean']:+.3f}% is outside the {REFERENCE} "
                           f"noise floor {100 * floor:.3f}%")
        if not within_limit:
            reasons.append(f"{CANDIDATE}'s mean difference {100 * flow['mean']:+.3f}% exceeds {100 * limit:.2f}%")
        passes = inside_floor and within_limit
    resolved = flow is not None and flow["low"] is not None and -limit <= flow["low"] and flow["high"] <= limit
    resolution = None
    if resolved:
        resolution = f"{CANDIDATE}'s 95% interval lies inside +-{100 * limit:.2f}%"
    elif flow is not None:
        interval = ("no interval (one seed)" if flow["low"] is None
                    else f"its 95% interval [{100 * flow['low']:+.3f}%, {100 * flow['high']:+.3f}%]")
        resolution = (f"{CANDIDATE}: {interval} is not inside +-{100 * limit:.2f}%; these {flow['seeds']} seed(s) "
                      "do not show the difference below the limit")
    ahead = None
    block = figures.get("blockwise")
    if flow is not None and block is not None:
        if flow["high"] is not None and block["low"] is not None and flow["high"] < block["low"]:
            ahead = "flow ahead of blockwise"
        elif block["high"] is not None and flow["low"] is not None and block["high"] < flow["low"]:
            ahead = "blockwise ahead of flow"
        else:
            ahead = "not resolved by these seeds (the intervals overlap or are missing)"
    return {"verdict": "pass" if passes else "fail", "reasons": reasons or ["inside the noise floor and the limit"],
            "limit": limit, "window": window, "evaluations_compared": len(steps) - len(steps) // 2,
            "from_step": steps[len(steps) // 2], "to_step": steps[-1], "noise_floor": floor,
            "reference_seeds": len(ref), "vs_bf16": figures, "resolved": resolved, "resolution": resolution,
            "flow_vs_blockwise": ahead}


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:+.3f}%"


def render(v: dict) -> str:
    pct = _pct
    floor = "-" if v["noise_floor"] is None else f"{100 * v['noise_floor']:.3f}%"
    lines = [f"Validation loss, smoothed over {v['window']} evaluations, steps {v['from_step']}-{v['to_step']} "
             f"(the last half); bf16 noise floor (largest seed-to-seed mean difference, {v['reference_seeds']} "
             f"seeds): {floor}", "",
             "| precision | seeds | mean difference vs bf16 | 95% interval | per seed |",
             "| --- | --- | --- | --- | --- |"]
    for precision, f in v["vs_bf16"].items():
        interval = "-" if f["ci95"] is None else f"[{pct(f['low'])}, {pct(f['high'])}]"
        seeds = ", ".join(pct(x) for x in f["per_seed"].values())
        lines.append(f"| {precision} | {f['seeds']} | {pct(f['mean'])} | {interval} | {seeds} |")
    lines += ["", f"Verdict: {v['verdict'].upper()} ({'; '.join(v['reasons'])})."]
    if v.get("resolution"):
        lines.append(f"Resolution: {v['resolution']}.")
    if v["flow_vs_blockwise"]:
        lines.append(f"Flow against blockwise: {v['flow_vs_blockwise']}.")
    return "\n".join(lines)


def plot(results: Dict[str, dict], v: dict, path_loss: str, path_diff: str) -> None:
    """Two figures: the smoothed validation loss per precision (mean over seeds, band from the
    lowest to the highest seed), and each precision's difference from the bf16 mean with the
    bf16 noise floor as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group_runs(results)
    steps = _common_steps([validation_curve(r) for g in groups.values() for r in g.values()])
    window = v["window"]

    def curves(runs):
        return [smoothed([validation_curve(r)[s] for s in steps], window) for r in runs.values()]

    ref = [statistics.fmean(x) for x in zip(*curves(groups[REFERENCE]))]
    fig, ax = plt.subplots(figsize=(7, 4))
    fig2, ax2 = plt.subplots(figsize=(7, 4))
    for precision, runs in groups.items():
        cs = curves(runs)
        mean = [statistics.fmean(x) for x in zip(*cs)]
        line, = ax.plot(steps, mean, label=f"{precision} ({len(cs)} seed{'s' if len(cs) > 1 else ''})")
        if len(cs) > 1:
            ax.fill_between(steps, [min(x) for x in zip(*cs)], [max(x) for x in zip(*cs)], alpha=0.2,
                            color=line.get_color())
        rel = [100 * (m - r) / r for m, r in zip(mean, ref)]
        ax2.plot(steps, rel, label=precision, color=line.get_color())
    if v["noise_floor"] is not None:
        ax2.axhspan(-100 * v["noise_floor"], 100 * v["noise_floor"], color="grey", alpha=0.2,
                    label="bf16 noise floor")
    ax2.axhline(100 * v["limit"], color="black", linestyle=":", linewidth=0.8, label=f"±{100 * v['limit']:.2f}%")
    ax2.axhline(-100 * v["limit"], color="black", linestyle=":", linewidth=0.8)
    ax.set(xlabel="step", ylabel="validation loss per byte (smoothed)", title="Validation loss by precision")
    ax2.set(xlabel="step", ylabel="difference from the bf16 mean, %", title="Difference from bf16")
    for a, f, p in ((ax, fig, path_loss), (ax2, fig2, path_diff)):
        a.legend(fontsize="small")
        a.grid(alpha=0.3)
        f.tight_layout()
        f.savefig(p, dpi=120)
        plt.close(f)
