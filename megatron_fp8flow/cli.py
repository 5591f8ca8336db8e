"""``fp8flow`` command line: the demo, training, comparisons, the numerics report, benchmarks.

Every command line is checked before any work starts (:mod:`megatron_fp8flow.validation`): a
value of the wrong type or range, a missing GPU, package or input file is one line on stderr
naming the flag or recipe key, the value and what is allowed, and exit code 2. Results are
never written over: a results directory that holds files already gets a fresh sibling
(``DIR-2``, ``DIR-3``, ...), and the command says so. See docs/cli.md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
import warnings
from dataclasses import asdict
from typing import Optional

from .validation import (PRECISION_MODES, UsageError, as_text, fresh_results_dir, int_at_least, labels,
                         non_negative_int, positive_int, precisions, step_list, writable_file)

MEGATRON_EXTRA = 'pip install -e ".[megatron]"'
# Megatron-Core warns at import, once per module, that it falls back to PyTorch code without
# these packages; the CLI says it once instead (_megatron_warnings_replaced).
_TE_APEX_WARNINGS = ("Transformer Engine and Apex are not installed", "Apex is not installed")
_TE_APEX_NOTE = ("fp8flow: TransformerEngine and apex are not installed: Megatron-Core runs its local PyTorch "
                 "layers and norms, PyTorch optimizers and multi-tensor fallbacks (the plugin's FP8 path needs "
                 "neither)")
# Import-time notices of Megatron-Core 0.19 that say nothing about the command: it falls back to
# the logging module without absl, torch's extension builder (which it imports) finds no CUDA
# on a CPU machine, and Python 3.12 flags escape sequences in its docstrings when it compiles a
# module that has no bytecode yet (an install without --compile, a read-only site-packages).
_IMPORT_NOISE_WARNINGS = ("absl.logging is not installed",)
_IMPORT_NOISE_SYNTAX_FROM = r".*[/\\]megatron[/\\]core[/\\]"
_IMPORT_NOISE_LOGGERS = ("torch.utils.cpp_extension",)


def _lead() -> bool:
    return int(os.environ.get("RANK", 0) or 0) == 0


@contextlib.contextmanager
def _megatron_warnings_replaced():
    """Within a command: Megatron-Core's import-time warnings about TransformerEngine/apex are
    not printed; the first one prints _TE_APEX_NOTE instead (on rank 0). Other warnings pass."""
    import logging

    shown = []
    quieted = [logging.getLogger(name) for name in _IMPORT_NOISE_LOGGERS]
    levels = [log.level for log in quieted]
    for log in quieted:
        log.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        for text in _TE_APEX_WARNINGS:  # shown (to the hook below), never turned into errors
            warnings.filterwarnings("default", message=text, category=UserWarning)
        for text in _IMPORT_NOISE_WARNINGS:
            warnings.filterwarnings("ignore", message=text, category=UserWarning)
        warnings.filterwarnings("ignore", category=SyntaxWarning, module=_IMPORT_NOISE_SYNTAX_FROM)
        previous = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if not str(message).startswith(_TE_APEX_WARNINGS):
                return previous(message, category, filename, lineno, file, line)
            if not shown and _lead():
                print(_TE_APEX_NOTE, file=sys.stderr, flush=True)
            shown.append(filename)

        warnings.showwarning = show
        try:
            yield
        finally:
            for log, level in zip(quieted, levels):
                log.setLevel(level)


def _need_module(module: str, subject: str, what: str, install: str) -> None:
    """UsageError ("``subject`` needs ``what``", naming ``install``) when ``module`` is missing."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise UsageError(f"{subject} needs {what} ({module} is not installed): {install}")


def _need_megatron(subject: str) -> None:
    _need_module("megatron.core", subject, "megatron-core 0.16.1 - 0.19.x", MEGATRON_EXTRA)


def _need_gpu(subject: str, why: str) -> None:
    import torch

    if torch.cuda.is_available():
        return
    seen = ("this torch build has no CUDA" if torch.version.cuda is None
            else f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU")
    raise UsageError(f"{subject} needs a CUDA GPU ({why}); {seen}")


def _fresh_dir(path: str, what: str = "the results") -> str:
    """``path``, or a fresh sibling when it holds files already (said on stdout)."""
    out, moved = fresh_results_dir(path)
    if moved and _lead():
        print(f"{path} holds files already (not written over): {what} go to {out} (--out names another)",
              flush=True)
    return out


def _fresh_file_name(path: str) -> str:
    """The first of ``stem-2.ext``, ``stem-3.ext``, ... that does not exist."""
    stem, ext = os.path.splitext(path)
    n = 2
    while os.path.exists(f"{stem}-{n}{ext}"):
        n += 1
    return f"{stem}-{n}{ext}"


def _fresh_file(path: str) -> str:
    """``path``, or ``stem-2.ext`` (-3, ...) when it exists (said on stdout)."""
    if not os.path.exists(path):
        return path
    fresh = _fresh_file_name(path)
    print(f"{path} exists (not written over): writing {fresh}", flush=True)
    return fresh


def _cmd_numerics(args) -> int:
    from rich.console import Console

    from . import numerics

    json_path = _fresh_file(args.json) if args.json else None
    console = Console()
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU, Triton interpreter"
    if args.dump:
        try:
            rows = numerics.run_dump(args.dump)
        except ValueError as err:
            raise UsageError(f"--from {args.dump}: {err}") from None
        title = f"FP8 E4M3 1x128 numerics on tensors saved in training ({args.dump}; {device})"
        console.print(numerics.render(rows, 0, 0, 0, device, title=title))
    else:
        rows = numerics.run(m=args.m, k=args.k, groups=args.groups, seed=args.seed)
        console.print(numerics.render(rows, args.m, args.k, args.groups, device))
    console.print(
        "rel. error = ||x_hat - x|| / ||x||. DQ+RQ = dequantize the row-wise tensor, requantize "
        "column-wise (double quantization). SAT = scaling-aware transpose on the FP8 bytes."
    )
    if json_path:
        with open(json_path, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    bad = [r.kind for r in rows if r.sat_column_code_mismatches or r.sat_column_scale_mismatches]
    if bad:
        console.print(f"[red]SAT column is not bit-identical to dequantize+requantize for: {bad}[/red]")
        return 1
    return 0


# The file each benchmark writes into --out.
BENCH_FILES = {"sat": "sat_quantize.json", "moe": "moe_ops.json", "experts": "expert_block.json",
               "gemm": "grouped_gemm.json"}


def _keep_previous(directory: str, name: str) -> None:
    """An earlier result of this benchmark in ``directory`` is kept as NAME-2.json (-3, ...)."""
    path = os.path.join(directory, name)
    if os.path.exists(path):
        kept = _fresh_file_name(path)
        os.replace(path, kept)
        print(f"{path} holds an earlier result: kept as {kept}", flush=True)


def _cmd_bench(args) -> int:
    if args.which != "sat" and args.ep != 8:
        raise UsageError(f"--ep {args.ep}: only bench sat takes --ep")
    if args.which in ("moe", "experts") and args.sweep:
        raise UsageError(f"--sweep: for bench sat and bench gemm, not bench {args.which}")
    if args.gemm_backend != "auto" and args.which != "experts":
        raise UsageError(f"--gemm-backend {args.gemm_backend}: for bench experts, not bench {args.which}")
    if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out}: is a file; expected a directory")
    _need_gpu(f"bench {args.which}", "it measures GPU kernels")
    _need_module("triton", f"bench {args.which}", "Triton", "pip install triton")
    if args.out:
        _keep_previous(args.out, BENCH_FILES[args.which])
    from .benchmarks import sat_quantize

    if args.which == "sat":
        result = sat_quantize.run(ep=args.ep, out_dir=args.out, sweep=args.sweep)
        print(sat_quantize.render(result))
    elif args.which == "moe":
        from .benchmarks import moe_ops

        print(moe_ops.render(moe_ops.run(out_dir=args.out)))
    elif args.which == "experts":
        from .benchmarks import expert_block

        print(expert_block.render(expert_block.run(out_dir=args.out, gemm_backend=args.gemm_backend)))
    elif args.which == "gemm":
        from .benchmarks import grouped_gemm

        print(grouped_gemm.render(grouped_gemm.run(out_dir=args.out, sweep=args.sweep)))
    return 0


def _cmd_audit(args) -> int:
    import torch

    _need_megatron("audit")
    if args.gemm_backend in ("cublas", "deepgemm"):
        _need_gpu(f"--gemm-backend {args.gemm_backend}", "Hopper FP8 GEMMs; on a CPU use auto or emulated")
    json_path = _fresh_file(args.json) if args.json else None
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
    from .megatron import audit

    backend = args.gemm_backend if torch.cuda.is_available() or args.gemm_backend != "auto" else "emulated"
    results = audit.run(ep=args.ep, gemm_backend=backend)
    print(audit.render(results, args.ep))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if results.get("flow", {}).get("explicit") == 2 else 1


def _cmd_data(args) -> int:
    from .training.text import write_indexed_dataset

    _need_megatron("data")  # Megatron's indexed-dataset writer
    stats = write_indexed_dataset(args.prefix, args.corpus)
    print(f"{args.prefix}.bin/.idx: {args.corpus}, {stats['documents']:,} documents, {stats['tokens']:,} byte "
          f"tokens (vocab_size 256; fingerprint {stats['sha256']}). Train on it with --set data_path={args.prefix} "
          "(compact loop or --megatron).")
    return 0


def _cmd_recipe(args) -> int:
    from .recipes import list_recipes, load_recipe, to_argv
    from .recipes.recipe import parse_override

    if args.action == "list":
        print("\n".join(list_recipes()))
        return 0
    if not args.name:
        raise UsageError("recipe argv needs a recipe name (see: fp8flow recipe list)")
    overrides = dict(parse_override(kv) for kv in args.set)
    _need_megatron("recipe argv")  # the fp8flow section is checked by the plugin's settings
    recipe = load_recipe(args.name, overrides)
    print(" ".join(to_argv(recipe)))
    return 0


def _cmd_patch(args) -> int:
    from .patching import PatchError, apply

    try:
        results = apply(args.checkout, dry_run=args.dry_run)
    except PatchError as err:
        print(f"fp8flow patch: {err}", file=sys.stderr)
        return 1
    for r in results:
        print(f"{r.patch.parent.name}/{r.patch.name}: {r.status}")
    return 0


def _relaunch_with_torchrun(argv: list, nproc: int, overrides: dict, out: str) -> int:
    """``fp8flow train --nproc N``: the same command under torchrun, one process per GPU, with
    expert parallelism N unless the recipe or --set says otherwise (checked before the launch),
    writing into ``out`` (the results directory chosen here)."""
    import subprocess

    argv = list(argv) + ["--out", out]
    if "expert_model_parallel_size" not in overrides:
        argv += ["--set", f"expert_model_parallel_size={nproc}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "megatron_fp8flow.cli", *argv]
    print("+ " + " ".join(cmd), flush=True)
    return subprocess.call(cmd)


def _launch_megatron(recipe_name: str, precisions, overrides: dict, nproc: int, dry_run: bool,
                     steps=None, memory_dir: Optional[str] = None) -> int:
    """``fp8flow train --megatron``: Megatron's pretrain() through megatron_fp8flow.pretrain_gpt,
    one launch per precision (fp8flow: the recipe's mode; bf16/blockwise: that plugin mode).
    Every launch command is built (and its recipe checked) before the first one starts. With
    ``memory_dir`` each launch writes its memory breakdown there (``memory_at_peak_PRECISION.json``)
    and the breakdowns are printed side by side at the end."""
    import subprocess

    from .pretrain_gpt import launch_command
    from .recipes import load_recipe
    from .training.checkpoint import per_precision_dirs

    if steps is not None:
        overrides = {**overrides, "train_iters": steps}
    commands = []
    for precision in precisions:
        mode = {"fp8flow": {}}.get(precision, {"fp8flow.mode": PRECISION_MODES[precision]})
        recipe = per_precision_dirs(load_recipe(recipe_name, {**overrides, "fp8flow.enabled": True, **mode}),
                                    precision)
        cmd = launch_command(recipe, nproc)
        if memory_dir is not None:
            cmd += ["--fp8flow-memory-breakdown", os.path.join(memory_dir, f"memory_at_peak_{precision}.json")]
            iters = recipe.args.get("train_iters")
            if iters is not None and int(iters) < 3:  # the launcher's default last recorded iteration
                cmd += ["--fp8flow-memory-breakdown-step", str(int(iters))]
        commands.append(cmd)
    if not dry_run:
        _need_module("megatron.training", "--megatron", "megatron.training (Megatron's pretrain())",
                     "install megatron-core>=0.19, whose wheel ships it, or put a Megatron-LM checkout on PYTHONPATH; "
                     "without --megatron the compact loop runs")
    for cmd in commands:
        print("+ " + " ".join(cmd), flush=True)
        if not dry_run:
            rc = subprocess.call(cmd)
            if rc:
                return rc
    if memory_dir is not None:
        from .training.memory import render

        found = {p: os.path.join(memory_dir, f"memory_at_peak_{p}.json") for p in precisions}
        breakdowns = {}
        for p, path in found.items():
            if os.path.exists(path):
                with open(path) as fh:
                    breakdowns[p] = json.load(fh)
        if breakdowns:
            print("\nGPU memory at each run's peak (first rank), by what holds it:\n" + render(breakdowns))
        missing = sorted(set(found) - set(breakdowns))
        if missing:
            print(f"no memory breakdown from {', '.join(missing)} (the run ended before its breakdown step; "
                  "see --fp8flow-memory-breakdown-step)")
    return 0


def _cmd_train(args) -> int:
    from .recipes.recipe import parse_override

    overrides = dict(parse_override(kv) for kv in getattr(args, "set", []) or [])
    if args.dry_run and not getattr(args, "megatron", False):
        raise UsageError("--dry-run prints the launch commands of --megatron; add --megatron, or leave it out")
    if getattr(args, "profile_step", None) and getattr(args, "megatron", False):
        raise UsageError("--profile-step profiles the compact loop; under --megatron use Megatron's own --profile "
                         "--profile-step-start/--profile-step-end")
    _need_megatron(args.command)
    from .training import compare

    recipe = args.recipe if args.command == "train" else compare.demo_recipe()
    chosen = args.compare or ["fp8flow"]
    if args.command == "demo":
        chosen = ["bf16", "fp8flow"]
        if args.steps is None and recipe != "proxies/tiny_cpu":
            args.steps = compare.DEMO_GPU_STEPS
    nproc = getattr(args, "nproc", 1) or 1
    if getattr(args, "megatron", False):
        memory_dir = _fresh_dir(args.out) if getattr(args, "memory_breakdown", False) else None
        return _launch_megatron(recipe, chosen, overrides, nproc, args.dry_run, args.steps, memory_dir)
    for key in ("fp8flow.mode", "fp8flow.enabled"):  # the compact loop sets both per precision
        if key in overrides:
            raise UsageError(f"--set {key}={as_text(overrides[key])}: the compact loop trains the precisions that --compare "
                             "names (bf16, blockwise, fp8flow, flow_double_quant); use --compare instead")
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        relaunched = {"expert_model_parallel_size": nproc, **overrides}
        compare.check_recipes(recipe, chosen, args.steps, relaunched, world=nproc)  # before starting N processes
        return _relaunch_with_torchrun(args.argv, nproc, overrides, _fresh_dir(args.out))
    out = _fresh_dir(args.out)
    dump = (args.dump_experts, args.dump_steps or [1]) if getattr(args, "dump_experts", None) else None
    if dump and any(PRECISION_MODES[c] in ("flow", "flow_double_quant") for c in chosen):
        raise UsageError("--dump-experts saves the bf16 tokens the experts see: --compare bf16 or blockwise (a flow "
                         "run's experts take FP8 tokens)")
    profile_step = getattr(args, "profile_step", None)
    results = compare.run(recipe, chosen, steps=args.steps, overrides=overrides, out_dir=out,
                          memory_breakdown=getattr(args, "memory_breakdown", False), dump=dump,
                          profile_step=profile_step)
    if results is None:  # not rank 0
        return 0
    print()
    print(compare.table(results))
    memory = {p: r["memory_at_peak"] for p, r in results.items() if "memory_at_peak" in r}
    if memory:
        from .training.memory import render

        print("\nGPU memory at each run's peak, by what allocated it:\n" + render(memory))
    profiles = {p: r["step_profile"] for p, r in results.items() if "step_profile" in r}
    if profiles:
        from .training.profile import render as render_profile

        print(f"\nStep {profile_step} by kernel category (device ms; idle: no kernel running):\n"
              + render_profile(profiles))
    print(f"\nLoss curves: {out}/loss_curves.png; figures: {out}/compare.json")
    return 0


def _cmd_compare(args) -> int:
    from .training import compare

    if args.labels is not None and len(args.labels) != len(args.dirs):
        raise UsageError(f"--labels {','.join(args.labels)}: {len(args.labels)} labels for {len(args.dirs)} "
                         "directories; give one per directory")
    for d in args.dirs:
        compare.read_results(d)  # every input readable before anything is written
    out = _fresh_dir(args.out, "the merged results")
    results = compare.merge(args.dirs, out, args.labels, args.smooth)
    print(compare.table(results))
    if len(results) > 1:
        report = compare.convergence(results, window=args.window)
        print()
        print(compare.convergence_table(report, next(iter(results))))
        with open(os.path.join(out, "convergence.json"), "w") as fh:
            json.dump(report, fh, indent=1)
    print(f"\nLoss curves: {out}/loss_curves.png")
    from .training import verdict

    if verdict.REFERENCE in verdict.group_runs(results) and len(results) > 1:
        try:
            v = verdict.verdict(results, window=args.window or 3)
        except ValueError as err:
            print(f"\nNo convergence verdict: {err}")
            return 0
        path = _fresh_file(args.verdict or os.path.join(out, "verdict.json"))
        with open(path, "w") as fh:
            json.dump(v, fh, indent=1)
        verdict.plot(results, v, os.path.join(out, "validation_by_seed.png"), os.path.join(out, "difference.png"))
        print("\n" + verdict.render(v))
        print(f"\nVerdict: {path}; plots: {out}/validation_by_seed.png, {out}/difference.png")
    return 0


def existing_dir(text: str) -> str:
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r}: no such directory")
    return text


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line on stderr (exit code 2), not a usage block."""

    def error(self, message):
        hint = "" if message.startswith("argument ") else f" (see: {self.prog} --help)"
        self.exit(2, f"{self.prog}: error: {message}{hint}\n")


OUT_HELP = ("directory for the {what}; one that holds files already is never written over: the results then go to "
            "DIR-2 (DIR-3, ...) and the command says so")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fp8flow", description="FP8-Flow MoE for Megatron-Core. Every subcommand and flag: docs/cli.md.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    n = sub.add_parser("numerics", help="report quantization, double-quantization and SAT errors")
    n.add_argument("--m", type=positive_int, default=2048, help="tokens (rows), >= 1")
    n.add_argument("--k", type=positive_int, default=1024, help="hidden size (columns), >= 1")
    n.add_argument("--groups", type=int_at_least(2, "one group is kept empty, like an unused expert"), default=8,
                   help="experts the tokens are grouped into, >= 2")
    n.add_argument("--seed", type=non_negative_int, default=0)
    n.add_argument("--from", dest="dump", metavar="DUMP", help="measure tensors saved in training (a directory or "
                   "file written by fp8flow train --dump-experts) instead of synthetic ones")
    n.add_argument("--json", type=writable_file, help="also write the figures to this JSON file (an existing one is "
                                                      "kept: the figures then go to NAME-2.json)")
    n.set_defaults(func=_cmd_numerics)

    b = sub.add_parser("bench", help="GPU benchmarks (CUDA required)")
    b.add_argument(
        "which", choices=["sat", "moe", "experts", "gemm"],
        help="sat: scaling-aware transpose and row-wise quantize; moe: permute/unpermute/SwiGLU "
        "kernels; experts: one DeepSeek-V3 expert block forward+backward in every precision mode; "
        "gemm: the grouped FP8 GEMMs, cuBLAS per group against the single-launch Triton kernels",
    )
    b.add_argument("--ep", type=positive_int, default=8,
                   help="sat: expert parallel size: local experts = experts / EP")
    b.add_argument("--out", help="directory for the JSON results (an earlier result of the same benchmark there is "
                                 "kept as NAME-2.json)")
    b.add_argument("--sweep", action="store_true", help="sat, gemm: also time kernel launch configurations")
    b.add_argument("--gemm-backend", default="auto", choices=["auto", "deepgemm", "cublas", "triton"],
                   help="experts: the FP8 GEMM backend of the FP8 modes")
    b.set_defaults(func=_cmd_bench)

    a = sub.add_parser("audit", help="count the BF16<->FP8 casts of one MoE layer per step, per mode "
                                     "(needs megatron-core; runs on CPU or GPU)")
    a.add_argument("--ep", type=positive_int, default=1, help="expert parallel size (> 1 starts that many processes)")
    a.add_argument("--gemm-backend", default="auto", choices=["auto", "deepgemm", "cublas", "triton", "emulated"])
    a.add_argument("--json", type=writable_file, help="also write the counts to this JSON file (an existing one is "
                                                      "kept: the counts then go to NAME-2.json)")
    a.set_defaults(func=_cmd_audit)

    r = sub.add_parser("recipe", help="list the YAML recipes, or print a recipe's Megatron arguments")
    r.add_argument("action", choices=["list", "argv"])
    r.add_argument("name", nargs="?", help="recipe name (configs/...) or path")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override an argument (fp8flow.mode=... for the plugin's settings)")
    r.set_defaults(func=_cmd_recipe)

    from .training.text import CORPORA

    dd = sub.add_parser("data", help="write real text that ships with Python as a Megatron indexed dataset "
                                     "(byte-level tokens) for data_path")
    dd.add_argument("prefix", help="output path without extension: PREFIX.bin and PREFIX.idx")
    dd.add_argument("--corpus", choices=CORPORA, default="python-docs",
                    help="python-docs (~0.5 MB, the default) or python-stdlib (docs + standard library, ~12 MB)")
    dd.set_defaults(func=_cmd_data)

    pt = sub.add_parser("patch", help="add the plugin to a Megatron-LM checkout's pretrain_gpt.py")
    pt.add_argument("checkout", type=existing_dir, help="path of the Megatron-LM checkout (or fork)")
    pt.add_argument("--dry-run", action="store_true", help="only check that the patch applies")
    pt.set_defaults(func=_cmd_patch)

    t = sub.add_parser("train", help="train a recipe with the compact loop (one process, or EP = N under torchrun), "
                                     "or with Megatron's pretrain() (--megatron)")
    t.add_argument("recipe", help="recipe name (see fp8flow recipe list) or path")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value (checked like the recipe's own: type and range)")
    t.add_argument("--steps", type=positive_int, help="training steps, >= 1 (default: the recipe's train_iters)")
    t.add_argument("--compare", type=precisions, metavar="P1,P2",
                   help="precisions to train side by side: bf16, blockwise, fp8flow (default: fp8flow)")
    t.add_argument("--out", default="fp8flow_results", help=OUT_HELP.format(what="figures and the loss plot"))
    t.add_argument("--nproc", type=positive_int, default=1,
                   help="processes (GPUs) under torchrun; the compact loop runs expert parallelism EP = N")
    t.add_argument("--megatron", action="store_true",
                   help="launch Megatron's pretrain() (python -m megatron_fp8flow.pretrain_gpt) instead of the "
                        "compact loop: pipeline, expert and data parallelism, Megatron's datasets; needs "
                        "megatron.training (megatron-core >= 0.19)")
    t.add_argument("--dry-run", action="store_true", help="with --megatron: print the launch commands only")
    t.add_argument("--dump-experts", metavar="DIR", help="save the first MoE layer's expert tokens and output "
                   "gradient (bf16) at --dump-steps into DIR/PRECISION/stepN.pt, for fp8flow numerics --from")
    t.add_argument("--dump-steps", type=step_list, metavar="N,N,...", help="steps to dump (default: 1)")
    t.add_argument("--memory-breakdown", action="store_true",
                   help="record the GPU allocator's history and report each run's memory at its peak by category "
                        "(parameters, main_grad, optimizer, FP8 weights, activations, backward); slows the run "
                        "(under --megatron only its first iterations, into --out)")
    t.add_argument("--profile-step", type=positive_int, metavar="N",
                   help="profile step N of each run (torch.profiler): device time by kernel category (GEMM, cast, "
                        "SAT, permutation, attention, optimizer, communication, ...) and idle, into compare.json")
    t.set_defaults(func=_cmd_train)

    c = sub.add_parser("compare", help="merge runs made apart (fp8flow train --out DIR, one per precision) into "
                                       "one table, loss plot and convergence check")
    c.add_argument("dirs", nargs="+", help="output directories of fp8flow train")
    c.add_argument("--out", default="fp8flow_results", help=OUT_HELP.format(what="merged figures and plot"))
    c.add_argument("--window", type=positive_int, help="moving-average window (points) for the check (default: 3 "
                                                       "validation points, or 20 logged training points)")
    c.add_argument("--verdict", metavar="PATH", type=writable_file,
                   help="where to write the convergence verdict (JSON) when bf16 runs are among the inputs "
                        "(default: OUT/verdict.json; an existing file is not written over)")
    c.add_argument("--labels", type=labels, help="a name per directory instead of its precision, e.g. repeats of one "
                                                 "precision: 'bf16,fp8flow,bf16 repeat' (the first is the baseline)")
    c.add_argument("--smooth", type=positive_int, default=1,
                   help="plot the training loss as a mean of N logged points")
    c.set_defaults(func=_cmd_compare)

    d = sub.add_parser("demo", help="the main job: the proxy that fits this machine, bf16 and fp8flow "
                                    "side by side on real text, a table and a loss plot")
    d.add_argument("--steps", type=positive_int, help="training steps, >= 1 (default: the recipe's)")
    d.add_argument("--out", default="fp8flow_results", help=OUT_HELP.format(what="figures and the loss plot"))
    d.set_defaults(func=_cmd_train, compare=None, dry_run=False)
    return p


def main(argv=None) -> int:
    """Run one command; returns its exit code (2: the command line cannot be used, said in one
    line on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, or a command line refused by the parser
        return done.code if isinstance(done.code, int) else 2
    args.argv = argv  # what a relaunch under torchrun repeats
    from .recipes import RecipeError

    try:
        with _megatron_warnings_replaced():
            return args.func(args)
    except (RecipeError, UsageError) as err:  # a value that cannot be used: the message says why
        print(f"fp8flow {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
