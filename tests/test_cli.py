"""The ``fp8flow`` command: the numerics report, and command lines that cannot be used.

A bad command line is refused before any work starts: one line on stderr naming the flag or
recipe key, the value and what is allowed, exit code 2, no traceback, nothing trained. Results
are never written over, and Megatron's import-time warnings about TransformerEngine/apex are one
line of the command's own.
"""

import importlib.util
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from megatron_fp8flow import cli, numerics, validation

pytestmark = pytest.mark.cpu_kernels("pytorch")  # on CPU: the plain-PyTorch path (conftest says why)

HAS_MEGATRON = importlib.util.find_spec("megatron.core") is not None
needs_megatron = pytest.mark.skipif(not HAS_MEGATRON, reason="needs megatron-core (the recipes' fp8flow checks)")
TE_OR_APEX = any(importlib.util.find_spec(m) is not None for m in ("transformer_engine", "apex"))


@pytest.mark.cpu_kernels("interpreter")  # fp8flow numerics runs the SAT kernel on a CPU
def test_numerics_report(tmp_path, capsys):
    out = tmp_path / "n.json"
    rc = cli.main(["numerics", "--m", "384", "--k", "256", "--groups", "4", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "SAT column" in text and "heavy-tailed" in text
    rows = json.loads(out.read_text())
    assert [r["kind"] for r in rows] == list(numerics.KINDS)
    for r in rows:
        assert r["sat_column_code_mismatches"] == 0 and r["sat_column_scale_mismatches"] == 0
        # FP8 E4M3 with 1x128 blocks: about 2-3% relative error, never zero on random data.
        assert 0.01 < r["rowwise_err"] < 0.05
        # pow2 requantization adds (almost) nothing; fp32 scales add a second rounding error.
        assert r["dqrq_pow2_added"] < 1e-3 * r["rowwise_err"] * 10
        assert r["dqrq_fp32_added"] > 0.3 * r["rowwise_err"]


def test_router_splits_are_skewed_and_sum():
    s = numerics.router_splits(1000, 8, seed=3)
    assert sum(s) == 1000 and s[0] == 0 and max(s) > 2 * (1000 / 8)


# ---------------------------------------------------------------------------------------------
# Command lines that cannot be used


@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if a model is built or a step is trained."""
    if not HAS_MEGATRON:
        return

    def trained(*_args, **_kwargs):
        raise AssertionError("a model was built or trained for a command line that should have been refused")

    from megatron_fp8flow.training import loop

    monkeypatch.setattr(loop, "_train", trained)
    monkeypatch.setattr(loop, "build_model", trained)


def refused(argv, capsys, *needles) -> str:
    """Runs ``fp8flow ARGV`` in this process: exit code 2, one error line on stderr (besides, at
    most, the one line about TransformerEngine/apex), no traceback, every needle in the line."""
    rc = cli.main(argv)
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip() and ln != cli._TE_APEX_NOTE]
    assert rc == 2, (argv, rc, captured.err)
    assert "Traceback" not in captured.err
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith(f"fp8flow {argv[0]}: error: "), line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


@pytest.mark.parametrize("argv, needles", [
    (["numerics", "--m", "-5"], ["--m", "-5", "a positive integer"]),
    (["numerics", "--m", "0"], ["--m", "0 given", "a positive integer"]),  # would be a table of NaN
    (["numerics", "--k", "0"], ["--k", "0 given", "a positive integer"]),
    (["numerics", "--groups", "1"], ["--groups", "1 given", "an integer >= 2"]),
    (["numerics", "--m", "abc"], ["--m", "'abc' given", "a positive integer"]),
    (["numerics", "--json", "/no/such/folder/n.json"], ["--json", "/no/such/folder", "does not exist"]),
    (["demo", "--steps", "0"], ["--steps", "0 given", "a positive integer"]),  # ran 200 steps before
    (["train", "proxies/tiny_cpu", "--steps", "-3"], ["--steps", "-3", "a positive integer"]),
    (["train", "proxies/tiny_cpu", "--nproc", "0"], ["--nproc", "0 given", "a positive integer"]),
    (["train", "proxies/tiny_cpu", "--compare", "bf16,fp9"],
     ["--compare", "'fp9'", "bf16, blockwise, flow, flow_double_quant, fp8flow"]),
    (["train", "proxies/tiny_cpu", "--compare", "bf16,bf16"], ["--compare", "twice"]),
    (["train"], ["required: recipe", "fp8flow train --help"]),
    (["train", "proxies/tiny_cpu", "--profile-step", "0"], ["--profile-step", "0 given", "a positive integer"]),
    (["train", "proxies/tiny_cpu", "--megatron", "--profile-step", "2"], ["--profile-step", "--megatron",
                                                                           "--profile-step-start"]),
    (["compare", "/tmp/fp8flow-no-such-dir"], ["/tmp/fp8flow-no-such-dir", "no such directory", "fp8flow train --out"]),
    (["compare", ".", "--window", "0"], ["--window", "0 given", "a positive integer"]),
    (["compare", ".", "--smooth", "-1"], ["--smooth", "-1", "a positive integer"]),
    (["compare", ".", "--labels", "a,a"], ["--labels", "twice"]),
    (["bench", "sat", "--ep", "0"], ["--ep", "0 given", "a positive integer"]),
    (["bench", "moe", "--sweep"], ["--sweep", "bench sat and bench gemm"]),
    (["audit", "--ep", "-1"], ["--ep", "-1", "a positive integer"]),
    (["patch", "/tmp/fp8flow-no-such-checkout"], ["checkout", "/tmp/fp8flow-no-such-checkout", "no such directory"]),
    (["recipe", "argv"], ["recipe name", "fp8flow recipe list"]),
])
def test_bad_flags_are_one_line_errors(argv, needles, capsys, no_training):
    refused(argv, capsys, *needles)


def test_bench_needs_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("has a GPU; the benchmark itself is run by `fp8flow bench sat`")
    refused(["bench", "sat"], capsys, "bench sat needs a CUDA GPU", "it measures GPU kernels")


def test_compare_needs_results(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    refused(["compare", str(tmp_path / "empty")], capsys, "empty", "holds no compare.json")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "compare.json").write_text("{not json")
    refused(["compare", str(tmp_path / "bad")], capsys, "compare.json", "cannot be read as JSON")
    refused(["compare", str(tmp_path / "bad"), str(tmp_path / "empty"), "--labels", "a"], capsys,
            "--labels a", "1 labels for 2 directories")
    assert sorted(os.listdir(tmp_path)) == ["bad", "empty"]  # nothing written


@needs_megatron
def test_profile_step_beyond_the_run_is_refused(tmp_path, capsys, no_training):
    refused(["train", "proxies/tiny_cpu", "--steps", "4", "--profile-step", "9", "--out", str(tmp_path / "r")], capsys,
            "--profile-step 9", "4 steps")
    assert not (tmp_path / "r").exists()  # refused before anything was written


@needs_megatron
@pytest.mark.parametrize("kv, needles", [
    ("num_layers=-1", ["--set num_layers=-1", "num_layers must be a positive integer"]),  # was: math domain error
    ("hidden_size=abc", ["--set hidden_size=abc", "hidden_size must be a positive integer"]),  # was: TypeError
    ("seq_length=0", ["--set seq_length=0", "a positive integer"]),
    ("train_iters=2.5", ["--set train_iters=2.5", "a positive integer"]),
    ("micro_batch_size=true", ["--set micro_batch_size=true", "a positive integer"]),
    ("lr=-0.1", ["--set lr=-0.1", "lr must be a number > 0"]),
    ("lr=.nan", ["--set lr=nan", "lr must be a number > 0"]),
    ("adam_beta2=1.5", ["--set adam_beta2=1.5", "a number in [0, 1)"]),
    ("lr_warmup_iters=-1", ["--set lr_warmup_iters=-1", "an integer >= 0"]),
    ("bf16=maybe", ["--set bf16=maybe", "bf16 must be true or false"]),
    ("normalization=rms", ["--set normalization=rms", "one of LayerNorm, RMSNorm"]),
    ("fp8flow.recompute_experts=3", ["--set fp8flow.recompute_experts=3", "true or false"]),
    ("moe_router_topk=9", ["--set moe_router_topk=9", "num_experts = 4", "at most num_experts"]),
    ("global_batch_size=6", ["--set global_batch_size=6", "micro_batch_size = 4", "a multiple of micro_batch_size"]),
    ("moe_layer_freq=[0,1,1]", ["moe_layer_freq", "lists 3 layers but num_layers is 2"]),
    ("tensor_model_parallel_size=2", ["tensor_model_parallel_size = 2", "expert parallelism only"]),
    ("data_path=/tmp/fp8flow-no-such-data", ["data_path", "/tmp/fp8flow-no-such-data.bin not found", "fp8flow data"]),
    ("fp8flow.mode=fp4", ["--set fp8flow.mode=fp4", "use --compare"]),  # --compare sets the mode
    ("fp8flow.align=7", ["fp8flow: permute alignment", "got 7"]),
    ("hiden_size=64", ["--set hiden_size=64", "unknown Megatron argument", "did you mean hidden_size"]),
    ("=5", ["--set =5", "the key is missing"]),
    ("x=[1,", ["--set x=[1,", "not valid YAML"]),
])
def test_bad_recipe_values_are_refused_before_training(kv, needles, capsys, no_training, tmp_path):
    refused(["train", "proxies/tiny_cpu", "--set", kv, "--out", str(tmp_path / "out")], capsys, *needles)
    assert not (tmp_path / "out").exists()


@needs_megatron
def test_bad_values_in_a_recipe_file_name_the_file_and_key(tmp_path, capsys, no_training):
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: proxies/tiny_cpu\nnum_layers: 0\n")
    refused(["train", str(bad)], capsys, "bad.yaml: num_layers = 0", "num_layers must be a positive integer")
    bad.write_text("extends: proxies/tiny_cpu\nhidden_size: 128px\n")
    refused(["recipe", "argv", str(bad)], capsys, "bad.yaml: hidden_size = 128px", "a positive integer")
    bad.write_text("extends: proxies/tiny_cpu\nnum_experts: 4\nmoe_router_topk: 8\n")
    refused(["train", str(bad)], capsys, "bad.yaml: moe_router_topk = 8, num_experts = 4",
            "at most num_experts")


@needs_megatron
def test_recipe_values_table():
    """One table gives the values: every key in it is a pretrain_gpt argument, every recipe in
    configs/ passes it, and numbers typed as text (YAML reads 1e-3 as a string) become numbers."""
    from megatron_fp8flow.recipes import list_recipes, load_recipe
    from megatron_fp8flow.recipes.recipe import _known_args, parse_override

    known = _known_args()
    assert not [k for k in validation.RECIPE_VALUES if not k.startswith("fp8flow.") and k not in known]
    for name in list_recipes():
        load_recipe(name)
    r = load_recipe("proxies/tiny_cpu", dict([parse_override("lr=1e-3"), parse_override("train_iters=1e3")]))
    assert r.args["lr"] == 0.001 and r.args["train_iters"] == 1000 and isinstance(r.args["train_iters"], int)
    assert load_recipe("proxies/tiny_cpu", {"q_lora_rank": None}).args["q_lora_rank"] is None  # Megatron's default
    assert validation.POSITIVE_INT.allowed() == "a positive integer (1, 2, ...)"
    for value in (0, -1, True, 1.5, "x", None, [1]):
        with pytest.raises(ValueError):
            validation.POSITIVE_INT.check(value)
    with pytest.raises(ValueError, match="m = 0: expected an integer >= 1"):
        numerics.run(m=0)


@needs_megatron
def test_every_precision_is_checked_before_the_first_trains(no_training):
    from megatron_fp8flow.recipes import RecipeError
    from megatron_fp8flow.training import compare

    with pytest.raises(validation.UsageError, match="fp9"):
        compare.run("proxies/tiny_cpu", ["bf16", "fp9"])
    with pytest.raises(RecipeError, match="steps = 0"):
        compare.run("proxies/tiny_cpu", ["bf16", "fp8flow"], steps=0)
    with pytest.raises(RecipeError, match="expert_model_parallel_size = 1 with 2 process"):
        compare.check_recipes("proxies/tiny_cpu", ["bf16"], world=2)


@needs_megatron
def test_each_precision_trains_its_mode(no_training):
    """--compare names a precision; the plugin's mode is the one it stands for (the ablation too)."""
    from megatron_fp8flow.training import compare

    names = ["bf16", "blockwise", "fp8flow", "flow_double_quant"]
    recipes = compare.check_recipes("proxies/tiny_cpu", names)
    assert [recipes[n].fp8flow["mode"] for n in names] == ["bf16", "blockwise", "flow", "flow_double_quant"]
    assert validation.precisions("bf16,flow_double_quant") == ["bf16", "flow_double_quant"]


@needs_megatron
def test_dry_run_needs_megatron_flag(capsys, no_training):
    refused(["train", "proxies/tiny_cpu", "--dry-run"], capsys, "--dry-run", "--megatron")


@needs_megatron
def test_missing_packages_are_named(monkeypatch, capsys, no_training):
    real = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name in ("megatron.core", "megatron.training") else real(name, *args)

    monkeypatch.setattr(cli.importlib.util, "find_spec", find_spec)
    install = 'pip install -e ".[megatron]"'
    refused(["audit"], capsys, "audit needs megatron-core", install)
    refused(["demo"], capsys, "demo needs megatron-core", install)
    refused(["recipe", "argv", "proxies/tiny_cpu"], capsys, "recipe argv needs megatron-core", install)
    monkeypatch.setattr(cli, "_need_megatron", lambda subject: None)
    refused(["train", "proxies/tiny_cpu", "--megatron", "--steps", "6", "--set", "lr_warmup_iters=2"], capsys,
            "--megatron needs megatron.training", "megatron-core>=0.19", "without --megatron the compact loop runs")


# ---------------------------------------------------------------------------------------------
# Results are never written over


def _fake_history(recipe, steps, seed, on_log, keep_model, *_options):
    history = []
    for step in (1, 2):
        rec = {"step": step, "loss": 5.0 / step, "lr": 1e-3, "tokens_per_s": 100.0, "peak_mem_gb": 0.1,
               "val_loss": None, "grad_norm": 1.0}
        history.append(rec)
    return history


@needs_megatron
def test_results_are_never_written_over(tmp_path, monkeypatch, capsys):
    """A second run into the same --out writes a fresh DIR-2 and says so; the first stays."""
    from megatron_fp8flow.training import loop

    monkeypatch.setattr(loop, "_train", _fake_history)  # the loop itself is tested in test_training.py
    out = tmp_path / "res"
    assert cli.main(["train", "proxies/tiny_cpu", "--steps", "2", "--out", str(out)]) == 0
    first = (out / "compare.json").read_text()
    assert f"figures: {out}/compare.json" in capsys.readouterr().out
    assert cli.main(["train", "proxies/tiny_cpu", "--steps", "2", "--compare", "bf16", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"{out} holds files already (not written over): the results go to {out}-2" in text
    assert f"figures: {out}-2/compare.json" in text
    assert (out / "compare.json").read_text() == first and set(json.loads(first)) == {"fp8flow"}
    assert set(json.loads((tmp_path / "res-2" / "compare.json").read_text())) == {"bf16"}
    # fp8flow compare: into an --out that holds files, a fresh directory too.
    assert cli.main(["compare", str(out), str(tmp_path / "res-2"), "--out", str(out)]) == 0
    assert f"the merged results go to {out}-3" in capsys.readouterr().out
    assert set(json.loads((tmp_path / "res-3" / "compare.json").read_text())) == {"fp8flow", "bf16"}
    assert (out / "compare.json").read_text() == first
    (tmp_path / "empty").mkdir()  # an empty directory is used as it is
    assert validation.fresh_results_dir(str(tmp_path / "empty")) == (str(tmp_path / "empty"), False)


@pytest.mark.cpu_kernels("interpreter")  # fp8flow numerics runs the SAT kernel on a CPU
def test_json_files_are_never_written_over(tmp_path, capsys):
    path = tmp_path / "n.json"
    path.write_text("earlier")
    assert cli.main(["numerics", "--m", "4", "--k", "8", "--groups", "2", "--json", str(path)]) == 0
    assert f"writing {tmp_path / 'n-2.json'}" in capsys.readouterr().out
    assert path.read_text() == "earlier" and json.loads((tmp_path / "n-2.json").read_text())


# ---------------------------------------------------------------------------------------------
# As the user runs it: a fresh process


def _fp8flow(*argv):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "PYTHONWARNINGS")}
    return subprocess.run([sys.executable, "-m", "megatron_fp8flow.cli", *argv], capture_output=True, text=True,
                          env=env, timeout=300)


@needs_megatron
def test_megatron_warnings_are_one_line():
    """Megatron-Core warns three or more times at import that TransformerEngine and apex are
    missing; the command prints one line of its own instead, once, and its output is unchanged."""
    code = ("from megatron_fp8flow import cli\n"
            "with cli._megatron_warnings_replaced():\n"
            "    import megatron.core.optimizer, megatron.core.distributed\n"
            "print('imported')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "imported"
    assert "Apex are not installed" not in done.stderr and "Apex is not installed" not in done.stderr
    assert done.stderr.count(cli._TE_APEX_NOTE) == (0 if TE_OR_APEX else 1), done.stderr
    # A recipe's argv no longer imports Megatron at all: nothing about it is printed.
    done = _fp8flow("recipe", "argv", "proxies/tiny_cpu", "--set", "train_iters=3")
    assert done.returncode == 0 and "--train-iters 3" in done.stdout and cli._TE_APEX_NOTE not in done.stderr
    # The commands that do not import Megatron say nothing about it.
    done = _fp8flow("recipe", "list")
    assert done.returncode == 0 and "proxies/tiny_cpu" in done.stdout and not done.stderr


@needs_megatron
def test_bad_value_in_a_fresh_process_is_one_line():
    done = _fp8flow("train", "proxies/tiny_cpu", "--set", "num_layers=-1")
    assert done.returncode == 2 and "Traceback" not in done.stderr and "warn" not in done.stderr
    lines = [ln for ln in done.stderr.splitlines() if ln != cli._TE_APEX_NOTE]
    assert lines == ["fp8flow train: error: --set num_layers=-1: num_layers must be a positive integer (1, 2, ...)"]
    done = _fp8flow("numerics", "--m", "0")
    assert done.returncode == 2 and done.stderr.splitlines() == [
        "fp8flow numerics: error: argument --m: 0 given; expected a positive integer (1, 2, ...)"]


def test_megatron_syntax_warnings_at_compile_stay_out():
    """Python 3.12 flags escape sequences in Megatron-Core 0.19's docstrings when it compiles a
    module that has no bytecode yet (seen on an install without compiling); a command's output
    does not carry them. The same warning from any other file still shows."""
    if sys.version_info < (3, 12):
        pytest.skip("this Python does not flag escape sequences with a SyntaxWarning")
    source = 'x = "\\-"\n'
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with cli._megatron_warnings_replaced():
            compile(source, os.path.join("site", "megatron", "core", "inference", "kv.py"), "exec")
            compile(source, os.path.join("site", "mine", "train.py"), "exec")
    syntax = [w for w in seen if issubclass(w.category, SyntaxWarning)]
    assert [os.path.basename(w.filename) for w in syntax] == ["train.py"], [str(w.message) for w in syntax]


def test_memory_breakdown_under_megatron_goes_to_each_launch(capsys, tmp_path):
    """Under --megatron, --memory-breakdown gives every launch its own new breakdown file in
    --out (one that holds files already is not written into)."""
    from megatron_fp8flow import cli

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "kept.json").write_text("{}")
    assert cli.main(["train", "proxies/tiny_cpu", "--megatron", "--compare", "bf16,fp8flow", "--memory-breakdown",
                     "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    lines = [ln.split() for ln in capsys.readouterr().out.splitlines() if ln.startswith("+ ")]
    assert [argv[argv.index("--fp8flow-memory-breakdown") + 1] for argv in lines] == [
        str(tmp_path / "out-2" / f"memory_at_peak_{p}.json") for p in ("bf16", "fp8flow")]
    assert all("--fp8flow-memory-breakdown-step" not in argv for argv in lines)  # the launcher's default, 3
    # a run shorter than that records all of its iterations
    assert cli.main(["train", "proxies/tiny_cpu", "--megatron", "--steps", "2", "--set", "lr_warmup_iters=1",
                     "--memory-breakdown", "--out", str(tmp_path / "short"), "--dry-run"]) == 0
    argv = [ln.split() for ln in capsys.readouterr().out.splitlines() if ln.startswith("+ ")][0]
    assert argv[argv.index("--fp8flow-memory-breakdown-step") + 1] == "2"


@pytest.mark.cpu_kernels("interpreter")  # fp8flow numerics runs the SAT kernel on a CPU
def test_dump_real_expert_tensors_and_measure_them(tmp_path, capsys):
    """fp8flow train --dump-experts saves the first MoE layer's bf16 expert tokens and output
    gradient at the asked steps; fp8flow numerics --from measures them (SAT exact on them)."""
    import os
    import subprocess
    import sys

    import torch

    from megatron_fp8flow import cli

    dumps = tmp_path / "dumps"
    # training in a process of its own: it starts torch.distributed, which must not stay up in this one
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MASTER_PORT")}
    run = subprocess.run([sys.executable, "-m", "megatron_fp8flow.cli", "train", "proxies/tiny_cpu", "--compare",
                          "bf16", "--steps", "1", "--out", str(tmp_path / "r"), "--dump-experts", str(dumps),
                          "--dump-steps", "1"], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    files = sorted(p.name for p in (dumps / "bf16").iterdir())
    assert files == ["step1.pt"]
    record = torch.load(dumps / "bf16" / "step1.pt", weights_only=True)
    assert record["tokens"].dtype == torch.bfloat16 and record["tokens"].shape == record["output_grad"].shape
    assert record["tokens"].shape[0] == sum(record["splits"]) and record["tokens"].abs().sum() > 0
    assert record["output_grad"].abs().sum() > 0
    capsys.readouterr()
    assert cli.main(["numerics", "--from", str(dumps)]) == 0
    out = capsys.readouterr().out
    assert "tensors saved in training" in out and "step1.pt tokens" in out and "output_grad" in out
    assert cli.main(["train", "proxies/tiny_cpu", "--compare", "fp8flow", "--dump-experts", str(dumps)]) == 2
    assert "--compare bf16 or blockwise" in capsys.readouterr().err
    assert cli.main(["numerics", "--from", str(tmp_path / "r")]) == 2  # holds no dumps
    assert "no dumps" in capsys.readouterr().err
