"""YAML recipes: every recipe in configs/ loads and validates; inheritance, overrides, the
Megatron command line, and errors that name the file and the key."""

import pytest

from megatron_fp8flow.recipes import RecipeError, list_recipes, load_recipe, to_argv
from megatron_fp8flow.recipes.recipe import parse_override

pytest.importorskip("megatron.core")  # the fp8flow sections are checked by the plugin's settings


@pytest.mark.parametrize("name", list_recipes())
def test_every_recipe_loads_and_validates(name):
    recipe = load_recipe(name)
    argv = to_argv(recipe)
    assert "--num-layers" in argv and "--hidden-size" in argv
    assert ("--moe-fp8-flow" in argv) == recipe.fp8flow_enabled


def test_keys_are_megatron_lm_arguments(tmp_path):
    from megatron_fp8flow.recipes.recipe import megatron_arg_names

    releases = megatron_arg_names()
    assert {"core_r0.16", "core_r0.19"} <= set(releases)
    for names in releases.values():  # flags as pretrain_gpt spells them, not TransformerConfig's fields
        assert {"num_experts", "moe_layer_freq", "pipeline_model_parallel_layout", "no_rope_fusion"} <= names
        assert not {"num_moe_experts", "layernorm_epsilon", "gated_linear_unit"} & names
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: proxies/tiny_cpu\nnum_moe_experts: 8\n")
    with pytest.raises(RecipeError, match=r"'num_moe_experts' \(not a pretrain_gpt argument.*did you mean num_experts"):
        load_recipe(bad)


def _world_size(args) -> int:
    return (args.get("tensor_model_parallel_size", 1) * args.get("pipeline_model_parallel_size", 1)
            * args.get("expert_model_parallel_size", 1))


@pytest.mark.parametrize("name", list_recipes())
def test_every_recipe_passes_megatron_lm_argument_checks(name, monkeypatch):
    """Where megatron.training is importable (megatron-core >= 0.19, or a Megatron-LM checkout):
    the launch command of each recipe is accepted by Megatron's own parser and validate_args."""
    pytest.importorskip("megatron.training.arguments")
    from megatron.training.arguments import parse_args, validate_args

    from megatron_fp8flow.megatron.args import add_fp8flow_args
    from megatron_fp8flow.pretrain_gpt import launch_command

    recipe = load_recipe(name)
    if "micro_batch_size" not in recipe.args:
        pytest.skip("a model definition without training settings: the recipes that extend it are launched")
    world = _world_size(recipe.args)
    cmd = launch_command(recipe, 1)
    monkeypatch.setattr("sys.argv", ["pretrain_gpt.py", *cmd[cmd.index("megatron_fp8flow.pretrain_gpt") + 1:]])
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    args = parse_args(extra_args_provider=add_fp8flow_args)
    validate_args(args, {})
    assert args.num_experts == recipe.args["num_experts"] and args.world_size == world


def test_expected_recipes_exist():
    names = set(list_recipes())
    for layout in ("ep8_pp32", "ep16_pp16", "ep32_pp8"):
        for precision in ("bf16", "blockwise", "fp8flow"):
            assert f"deepseek_v3_671b/{precision}_{layout}" in names
    for proxy in ("deepseek_v3_proxy_1gpu", "deepseek_v3_proxy_2gpu", "deepseek_v3_proxy_8gpu", "tiny_cpu"):
        assert f"proxies/{proxy}" in names
    assert {"models/deepseek_v2_lite", "models/qwen3_235b_a22b"} <= names


def test_inheritance_and_layouts():
    r = load_recipe("deepseek_v3_671b/fp8flow_ep16_pp16")
    assert r.args["hidden_size"] == 7168 and r.args["global_batch_size"] == 15360  # from model and base
    assert (r.args["expert_model_parallel_size"], r.args["pipeline_model_parallel_size"]) == (16, 16)
    assert r.fp8flow == {"enabled": True, "mode": "flow"} and len(r.sources) == 4
    full = load_recipe("deepseek_v3_671b/fp8flow_ep8_pp32_full_recompute")
    assert full.args["recompute_granularity"] == "full"
    argv = to_argv(full)
    assert "--recompute-modules" not in argv  # null removes an inherited value
    assert argv[argv.index("--moe-fp8-flow-mode") + 1] == "flow"


def test_overrides_and_argv():
    r = load_recipe("proxies/tiny_cpu", dict([parse_override("train_iters=5"), parse_override("fp8flow.mode=bf16"),
                                              parse_override("fp8flow.recompute_experts=false")]))
    assert r.args["train_iters"] == 5 and r.fp8flow["mode"] == "bf16"
    argv = to_argv(r)
    assert argv[argv.index("--train-iters") + 1] == "5" and "--bf16" in argv and "--moe-fp8-flow-recompute-experts" not in argv
    assert parse_override("recompute_modules=[moe_act, layernorm]") == ("recompute_modules", ["moe_act", "layernorm"])
    with pytest.raises(RecipeError, match="key=value"):
        parse_override("train_iters")


def test_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: proxies/tiny_cpu\nhidden_sise: 64\n")
    with pytest.raises(RecipeError,
                       match=r"bad.yaml: unknown Megatron argument 'hidden_sise' .*core_r0.19\); did you mean hidden_size"):
        load_recipe(bad)
    bad.write_text("extends: proxies/tiny_cpu\nfp8flow:\n  mode: fp4\n")
    with pytest.raises(RecipeError, match="bad.yaml: fp8flow: unknown mode 'fp4' \\(flag --moe-fp8-flow-mode\\)"):
        load_recipe(bad)
    bad.write_text("extends: proxies/tiny_cpu\nfp8flow:\n  modes: flow\n")
    with pytest.raises(RecipeError, match="unknown fp8flow setting 'modes'"):
        load_recipe(bad)
    (tmp_path / "a.yaml").write_text("extends: b.yaml\nnum_layers: 2\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")
    with pytest.raises(RecipeError, match="not found"):
        load_recipe("no_such_recipe")
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(RecipeError, match="a map of argument"):
        load_recipe(bad)


def test_recipe_command(capsys):
    from megatron_fp8flow.cli import main

    assert main(["recipe", "list"]) == 0
    assert "proxies/tiny_cpu" in capsys.readouterr().out
    assert main(["recipe", "argv", "proxies/tiny_cpu", "--set", "train_iters=3"]) == 0
    out = capsys.readouterr().out
    assert "--train-iters 3" in out and "--moe-fp8-flow-mode flow" in out


def test_examples_name_existing_recipes_and_parse():
    import pathlib
    import re
    import subprocess

    from megatron_fp8flow.recipes import load_recipe

    scripts = sorted((pathlib.Path(__file__).parent.parent / "examples").glob("*.sh"))
    assert len(scripts) >= 4
    for script in scripts:
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script
        names = re.findall(r"proxies/[a-z0-9_]+", script.read_text())
        assert names, script
        for name in names:
            load_recipe(name)  # raises on a missing or invalid recipe
