"""``fp8flow`` command line: numerics report and GPU benchmarks."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict


def _cmd_numerics(args) -> int:
    from rich.console import Console

    from . import numerics

    console = Console()
    rows = numerics.run(m=args.m, k=args.k, groups=args.groups, seed=args.seed)
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU, Triton interpreter"
    console.print(numerics.render(rows, args.m, args.k, args.groups, device))
    console.print(
        "rel. error = ||x_hat - x|| / ||x||. DQ+RQ = dequantize the row-wise tensor, requantize "
        "column-wise (double quantization). SAT = scaling-aware transpose on the FP8 bytes."
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    bad = [r.kind for r in rows if r.sat_column_code_mismatches or r.sat_column_scale_mismatches]
    if bad:
        console.print(f"[red]SAT column is not bit-identical to dequantize+requantize for: {bad}[/red]")
        return 1
    return 0


def _cmd_bench(args) -> int:
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
    import os

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
    from .megatron import audit

    backend = args.gemm_backend if torch.cuda.is_available() or args.gemm_backend != "auto" else "emulated"
    results = audit.run(ep=args.ep, gemm_backend=backend)
    print(audit.render(results, args.ep))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if results.get("flow", {}).get("explicit") == 2 else 1


def _cmd_data(args) -> int:
    from .training.text import write_indexed_dataset

    stats = write_indexed_dataset(args.prefix, args.corpus)
    print(f"{args.prefix}.bin/.idx: {args.corpus}, {stats['documents']:,} documents, {stats['tokens']:,} byte "
          f"tokens (vocab_size 256). Train on it with --set data_path={args.prefix} (compact loop or --megatron).")
    return 0


def _cmd_recipe(args) -> int:
    from .recipes import list_recipes, load_recipe, to_argv
    from .recipes.recipe import parse_override

    if args.action == "list":
        print("\n".join(list_recipes()))
        return 0
    if not args.name:
        print("fp8flow recipe argv needs a recipe name (see: fp8flow recipe list)", file=sys.stderr)
        return 2
    recipe = load_recipe(args.name, dict(parse_override(kv) for kv in args.set))
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


def _relaunch_with_torchrun(argv: list, nproc: int, overrides: dict) -> int:
    """``fp8flow train --nproc N``: the same command under torchrun, one process per GPU, with
    expert parallelism N unless the recipe or --set says otherwise (the loop then names the
    mismatch)."""
    import subprocess

    argv = list(argv)
    if "expert_model_parallel_size" not in overrides:
        argv += ["--set", f"expert_model_parallel_size={nproc}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "megatron_fp8flow.cli", *argv]
    print("+ " + " ".join(cmd), flush=True)
    return subprocess.call(cmd)


def _launch_megatron(recipe_name: str, precisions, overrides: dict, nproc: int, dry_run: bool,
                     steps=None) -> int:
    """``fp8flow train --megatron``: Megatron's pretrain() through megatron_fp8flow.pretrain_gpt,
    one launch per precision (fp8flow: the recipe's mode; bf16/blockwise: that plugin mode)."""
    import subprocess

    from .pretrain_gpt import launch_command
    from .recipes import load_recipe
    from .training.checkpoint import per_precision_dirs
    from .training.compare import PRECISION_MODES

    if steps is not None:
        overrides = {**overrides, "train_iters": steps}
    for precision in precisions:
        mode = {"fp8flow": {}}.get(precision, {"fp8flow.mode": PRECISION_MODES.get(precision, precision)})
        recipe = per_precision_dirs(load_recipe(recipe_name, {**overrides, "fp8flow.enabled": True, **mode}),
                                    precision)
        cmd = launch_command(recipe, nproc)
        print("+ " + " ".join(cmd), flush=True)
        if not dry_run:
            rc = subprocess.call(cmd)
            if rc:
                return rc
    return 0


def _cmd_train(args) -> int:
    from .recipes.recipe import parse_override
    from .training import compare

    recipe = args.recipe if args.command == "train" else compare.demo_recipe()
    precisions = [p.strip() for p in args.compare.split(",")] if args.compare else ["fp8flow"]
    if args.command == "demo":
        precisions = ["bf16", "fp8flow"]
        if args.steps is None and recipe != "proxies/tiny_cpu":
            args.steps = compare.DEMO_GPU_STEPS
    overrides = dict(parse_override(kv) for kv in getattr(args, "set", []) or [])
    nproc = getattr(args, "nproc", 1) or 1
    if getattr(args, "megatron", False):
        return _launch_megatron(recipe, precisions, overrides, nproc, args.dry_run, args.steps)
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _relaunch_with_torchrun(args.argv, nproc, overrides)
    results = compare.run(recipe, precisions, steps=args.steps, overrides=overrides, out_dir=args.out)
    if results is None:  # not rank 0
        return 0
    print()
    print(compare.table(results))
    print(f"\nLoss curves: {args.out}/loss_curves.png; figures: {args.out}/compare.json")
    return 0


def _cmd_compare(args) -> int:
    from .training import compare

    labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
    results = compare.merge(args.dirs, args.out, labels, args.smooth)
    print(compare.table(results))
    if len(results) > 1:
        report = compare.convergence(results, window=args.window)
        print()
        print(compare.convergence_table(report, next(iter(results))))
        with open(os.path.join(args.out, "convergence.json"), "w") as fh:
            json.dump(report, fh, indent=1)
    print(f"\nLoss curves: {args.out}/loss_curves.png")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fp8flow", description="FP8-Flow MoE for Megatron-Core")
    sub = p.add_subparsers(dest="command", required=True)

    n = sub.add_parser("numerics", help="report quantization, double-quantization and SAT errors")
    n.add_argument("--m", type=int, default=2048, help="tokens (rows)")
    n.add_argument("--k", type=int, default=1024, help="hidden size (columns)")
    n.add_argument("--groups", type=int, default=8, help="experts the tokens are grouped into")
    n.add_argument("--seed", type=int, default=0)
    n.add_argument("--json", help="also write the figures to this JSON file")
    n.set_defaults(func=_cmd_numerics)

    b = sub.add_parser("bench", help="GPU benchmarks (CUDA required)")
    b.add_argument(
        "which", choices=["sat", "moe", "experts", "gemm"],
        help="sat: scaling-aware transpose and row-wise quantize; moe: permute/unpermute/SwiGLU "
        "kernels; experts: one DeepSeek-V3 expert block forward+backward in every precision mode; "
        "gemm: the grouped FP8 GEMMs, cuBLAS per group against the single-launch Triton kernels",
    )
    b.add_argument("--ep", type=int, default=8, help="expert parallel size: local experts = experts / EP")
    b.add_argument("--out", help="directory for the JSON results")
    b.add_argument("--sweep", action="store_true", help="also time kernel launch configurations")
    b.add_argument("--gemm-backend", default="auto", choices=["auto", "cublas", "triton"],
                   help="experts: the FP8 GEMM backend of the FP8 modes")
    b.set_defaults(func=_cmd_bench)

    a = sub.add_parser("audit", help="count the BF16<->FP8 casts of one MoE layer per step, per mode "
                                     "(needs megatron-core; runs on CPU or GPU)")
    a.add_argument("--ep", type=int, default=1, help="expert parallel size (> 1 starts that many processes)")
    a.add_argument("--gemm-backend", default="auto", choices=["auto", "cublas", "triton", "emulated"])
    a.add_argument("--json", help="also write the counts to this JSON file")
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
    pt.add_argument("checkout", help="path of the Megatron-LM checkout (or fork)")
    pt.add_argument("--dry-run", action="store_true", help="only check that the patch applies")
    pt.set_defaults(func=_cmd_patch)

    t = sub.add_parser("train", help="train a recipe with the compact loop (one process)")
    t.add_argument("recipe", help="recipe name (see fp8flow recipe list) or path")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value")
    t.add_argument("--steps", type=int, help="training steps (default: the recipe's train_iters)")
    t.add_argument("--compare", help="precisions to train side by side, e.g. bf16,fp8flow (default: fp8flow)")
    t.add_argument("--out", default="fp8flow_results", help="directory for the figures and the loss plot")
    t.add_argument("--nproc", type=int, default=1,
                   help="processes (GPUs) under torchrun; the compact loop runs expert parallelism EP = N")
    t.add_argument("--megatron", action="store_true",
                   help="launch Megatron's pretrain() (python -m megatron_fp8flow.pretrain_gpt) instead of the "
                        "compact loop: pipeline, expert and data parallelism, Megatron's datasets; needs "
                        "megatron.training (megatron-core >= 0.19)")
    t.add_argument("--dry-run", action="store_true", help="with --megatron: print the launch commands only")
    t.set_defaults(func=_cmd_train)

    c = sub.add_parser("compare", help="merge runs made apart (fp8flow train --out DIR, one per precision) into "
                                       "one table, loss plot and convergence check")
    c.add_argument("dirs", nargs="+", help="output directories of fp8flow train")
    c.add_argument("--out", default="fp8flow_results", help="directory for the merged figures and plot")
    c.add_argument("--window", type=int, help="moving-average window (points) for the check (default: 3 "
                                              "validation points, or 20 logged training points)")
    c.add_argument("--labels", help="a name per directory instead of its precision, e.g. repeats of one "
                                    "precision: 'bf16,fp8flow,bf16 repeat' (the first is the baseline)")
    c.add_argument("--smooth", type=int, default=1, help="plot the training loss as a mean of N logged points")
    c.set_defaults(func=_cmd_compare)

    d = sub.add_parser("demo", help="the main job: the proxy that fits this machine, bf16 and fp8flow "
                                    "side by side on real text, a table and a loss plot")
    d.add_argument("--steps", type=int, help="training steps (default: the recipe's)")
    d.add_argument("--out", default="fp8flow_results", help="directory for the figures and the loss plot")
    d.set_defaults(func=_cmd_train, compare=None)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # what a relaunch under torchrun repeats
    from .recipes import RecipeError

    try:
        return args.func(args)
    except RecipeError as err:  # a recipe or --set value that cannot be used: the message says why
        print(f"fp8flow {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
