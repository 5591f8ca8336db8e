"""The Megatron pretrain() launcher: what can be checked without megatron.training and a GPU
(the launch itself runs on GPU machines with megatron-core >= 0.19)."""

import importlib.util
from types import SimpleNamespace

import pytest

pytest.importorskip("megatron.core")

from megatron_fp8flow import pretrain_gpt  # noqa: E402
from megatron_fp8flow.megatron import compat  # noqa: E402

pytestmark = pytest.mark.cpu_kernels("pytorch")  # on CPU: the plain-PyTorch path (conftest says why)


@pytest.mark.skipif(importlib.util.find_spec("megatron.training") is not None,
                    reason="megatron.training is installed here")
def test_missing_megatron_training_is_named():
    with pytest.raises(ImportError, match=r"needs megatron.training.*megatron-core>=0.19.*fp8flow patch"):
        pretrain_gpt.main([])


def test_layouts_outside_the_scope_are_named():
    ok = SimpleNamespace(tensor_model_parallel_size=1, context_parallel_size=1, sft=False, fim_data=False)
    pretrain_gpt.check_layout(ok)
    for change, message in ((dict(tensor_model_parallel_size=2), "tensor_model_parallel_size=2"),
                            (dict(context_parallel_size=2), "context_parallel_size=2"),
                            (dict(sft=True), "SFT")):
        with pytest.raises(ValueError, match=message):
            pretrain_gpt.check_layout(SimpleNamespace(**{**vars(ok), **change}))


def test_memory_breakdown_flags_are_checked_before_the_run(tmp_path):
    """--fp8flow-memory-breakdown: parsed with the plugin's flags; a file that exists or a step
    outside the run is refused before anything starts."""
    import argparse

    parser = pretrain_gpt.add_launcher_args(argparse.ArgumentParser())
    args = parser.parse_args(["--moe-fp8-flow", "--fp8flow-memory-breakdown", str(tmp_path / "m.json")])
    assert args.moe_fp8_flow and args.fp8flow_memory_breakdown_step == 3
    ok = dict(tensor_model_parallel_size=1, context_parallel_size=1, sft=False, fim_data=False, train_iters=10,
              fp8flow_memory_breakdown=str(tmp_path / "m.json"), fp8flow_memory_breakdown_step=3)
    pretrain_gpt.check_args(SimpleNamespace(**ok))
    (tmp_path / "old.json").write_text("{}")
    for change, message in ((dict(fp8flow_memory_breakdown_step=11), r"between 1 and --train-iters \(10\)"),
                            (dict(fp8flow_memory_breakdown_step=0), "between 1"),
                            (dict(fp8flow_memory_breakdown=str(tmp_path / "old.json")), "exists; name a new one")):
        with pytest.raises(ValueError, match=message):
            pretrain_gpt.check_args(SimpleNamespace(**{**ok, **change}))
    assert (tmp_path / "old.json").read_text() == "{}"


def test_optimizer_hook_hands_the_optimizer_to_the_recorder(monkeypatch):
    """The launcher wraps Megatron's optimizer builder once; with a recorder the optimizer it
    builds and the model chunks are handed over, without one it is returned untouched."""
    seen = []

    def get_megatron_optimizer(config, model_chunks, **kwargs):
        return SimpleNamespace(step=lambda: None, chunks=model_chunks, kwargs=kwargs)

    training = SimpleNamespace(get_megatron_optimizer=get_megatron_optimizer)
    assert pretrain_gpt._install_optimizer_hook(training) is True
    assert pretrain_gpt._install_optimizer_hook(training) is False
    monkeypatch.setattr(pretrain_gpt, "_memory_recorder", None)
    opt = training.get_megatron_optimizer("cfg", ["chunk"], use_gloo_process_groups=False)
    assert opt.chunks == ["chunk"] and opt.kwargs == {"use_gloo_process_groups": False}
    monkeypatch.setattr(pretrain_gpt, "_memory_recorder",
                        SimpleNamespace(optimizer_built=lambda o, chunks: seen.append((o, chunks))))
    opt = training.get_megatron_optimizer("cfg", ["chunk"])
    assert seen == [(opt, ["chunk"])]


def test_keyword_arguments_follow_the_signature():
    def takes(a, b=1):
        return a, b

    def takes_all(a, **kw):
        return a, kw

    assert compat.accepted_kwargs(takes, {"a": 1, "b": 2, "vp_stage": 0}) == {"a": 1, "b": 2}
    assert compat.accepted_kwargs(takes_all, {"a": 1, "vp_stage": 0}) == {"a": 1, "vp_stage": 0}


def test_loss_is_the_masked_sum_with_its_token_count():
    import torch

    losses = torch.tensor([[1.0, 2.0, 4.0], [8.0, 16.0, 32.0]])
    mask = torch.tensor([[1, 0, 1], [0, 1, 1]])
    loss, tokens, report = pretrain_gpt._loss(mask, losses)
    assert float(loss) == 1 + 4 + 16 + 32 and int(tokens) == 4
    assert report["lm loss"].tolist() == [53.0, 4.0]


def test_train_megatron_dry_run_builds_one_launch_per_precision(capsys):
    from megatron_fp8flow.cli import main

    assert main(["train", "proxies/deepseek_v3_proxy_2gpu", "--megatron", "--nproc", "2", "--compare",
                 "bf16,fp8flow", "--steps", "5", "--set", "lr_warmup_iters=1", "--set", "moe_layer_freq=[0, 1, 1]",
                 "--set", "save=ck", "--set", "load=ck", "--dry-run"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("+ ")]
    assert len(lines) == 2
    for line, mode in zip(lines, ("bf16", "flow")):
        argv = line.split()
        assert "--nproc_per_node=2" in argv and "megatron_fp8flow.pretrain_gpt" in argv
        assert argv[argv.index("--moe-fp8-flow-mode") + 1] == mode and argv.count("--moe-fp8-flow") == 1
        assert argv[argv.index("--train-iters") + 1] == "5" and argv[argv.index("--expert-model-parallel-size") + 1] == "2"
        assert "--mock-data" in argv and argv[argv.index("--tokenizer-type") + 1] == "NullTokenizer"
        assert argv[argv.index("--moe-layer-freq") + 1] == "[0,1,1]"  # one list literal, as Megatron parses it
        precision = {"flow": "fp8flow"}.get(mode, mode)  # one checkpoint directory per precision
        assert argv[argv.index("--save") + 1] == argv[argv.index("--load") + 1] == f"ck/{precision}"
        if not compat.have_transformer_engine():  # this machine: Megatron's local layers, no TE fusions
            assert argv[argv.index("--transformer-impl") + 1] == "local" and "--no-rope-fusion" in argv
            assert "--no-gradient-accumulation-fusion" in argv
            assert ("--no-persist-layer-norm" in argv) == (not compat.have_apex())


def test_prebuilt_dataset_helpers_skip_megatrons_make(monkeypatch, caplog):
    """The megatron-core wheels ship helpers_cpp without the Makefile that pretrain()'s ``make``
    needs: with the helpers importable the build becomes a no-op; without them it stays."""
    import logging
    import subprocess

    from megatron.core.datasets import utils

    original = utils.compile_helpers
    monkeypatch.setattr(utils, "compile_helpers", original)  # restored after the test
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("make must not run"))
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "megatron.core.datasets.helpers_cpp" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    assert compat.use_prebuilt_dataset_helpers() is False and utils.compile_helpers is original
    monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)
    if real_find_spec("megatron.core.datasets.helpers_cpp") is None:
        pytest.skip("this megatron-core has no built helpers_cpp")
    with caplog.at_level(logging.INFO):
        assert compat.use_prebuilt_dataset_helpers() is True
        assert compat.use_prebuilt_dataset_helpers() is True  # idempotent: wrapped once
    assert utils.compile_helpers.__wrapped__ is original and utils.compile_helpers() is None
    assert sum("compile_helpers skipped" in r.getMessage() for r in caplog.records) == 1


def test_warmup_longer_than_the_run_is_named():
    from megatron_fp8flow.recipes import RecipeError, load_recipe

    with pytest.raises(RecipeError, match=r"lr_warmup_iters \(10\) must be less than train_iters \(6\).*lr_warmup_iters=0"):
        pretrain_gpt.launch_command(load_recipe("proxies/tiny_cpu", {"train_iters": 6}))
    assert pretrain_gpt.launch_command(load_recipe("proxies/tiny_cpu", {"train_iters": 6, "lr_warmup_iters": 2}))


def test_cli_reports_recipe_errors_without_a_traceback(capsys):
    from megatron_fp8flow.cli import main

    assert main(["train", "proxies/tiny_cpu", "--megatron", "--steps", "6", "--dry-run"]) == 2
    assert "fp8flow train: error: tiny_cpu: lr_warmup_iters (10) must be less than" in capsys.readouterr().err
    assert main(["train", "proxies/tiny_cpu", "--set", "hidden_sise=64"]) == 2
    assert "unknown Megatron argument 'hidden_sise'" in capsys.readouterr().err


def test_launch_accumulates_expert_gradients_into_main_grad():
    """Under pretrain() Megatron's DDP gives every weight an fp32 main_grad: the launcher asks
    the experts to add into it unless the recipe says otherwise."""
    from megatron_fp8flow.recipes import load_recipe

    base = {"train_iters": 6, "lr_warmup_iters": 2, "fp8flow.enabled": True}
    flag = "--moe-fp8-flow-gradient-accumulation-fusion"
    assert flag in pretrain_gpt.launch_command(load_recipe("proxies/tiny_cpu", base))
    off = pretrain_gpt.launch_command(load_recipe("proxies/tiny_cpu", {**base, "fp8flow.gradient_accumulation_fusion": False}))
    assert flag not in off and "--moe-fp8-flow" in off
    stock = pretrain_gpt.launch_command(load_recipe("proxies/tiny_cpu", {**base, "fp8flow.enabled": False}))
    assert flag not in stock and "--moe-fp8-flow" not in stock
