"""Megatron-Core integration on CPU (megatron-core 0.16 in CI): the plugin's MoE layer inside a
small DeepSeek-style GPT (sigmoid router with expert bias, group-limited routing, shared expert,
MTP) against the stock MoE layer, at EP = 1 and EP = 2 (two gloo processes); spec hooks, flags,
checkpoint switching and the cast audit."""

import argparse

import pytest

pytest.importorskip("megatron.core")

import megatron_checks as checks  # noqa: E402

from megatron_fp8flow.megatron import (  # noqa: E402
    FP8FlowSettings,
    add_fp8flow_args,
    apply_fp8flow_to_spec,
    install,
    settings_from_args,
    uninstall,
)
from megatron_fp8flow.megatron import small_model as sm  # noqa: E402

pytestmark = pytest.mark.cpu_kernels("pytorch")  # on CPU: the plain-PyTorch path (conftest says why)

MODES = ["bf16", "blockwise", "flow_double_quant", "flow"]
# Gradient bounds against the stock layer with the same weights (relative, max over parameters):
# bf16: the stock MLP rounds silu(gate), the product and the probability weighting to bf16 and
# sums experts in bf16; the plugin keeps fp32 until the one rounding: bf16-sized differences.
# FP8 modes: E4M3 has 3 mantissa bits (2^-4 relative rounding) on every GEMM operand.
BOUNDS = {"bf16": 3e-2, "blockwise": 0.15, "flow_double_quant": 0.15, "flow": 0.15}


def _ranks_possible(world: int) -> bool:
    """Two ranks need two GPUs with NCCL; on CPU, gloo runs any number of processes."""
    import torch

    return not torch.cuda.is_available() or torch.cuda.device_count() >= world


# EP = 1 runs the kernels inside Megatron's model (under the interpreter on CPU); EP = 2 the CPU path.
@pytest.fixture(scope="module", params=[pytest.param(1, marks=pytest.mark.cpu_kernels("interpreter")), 2],
                ids=["ep1", "ep2"])
def compared(request):
    if not _ranks_possible(request.param):
        pytest.skip(f"EP={request.param} needs {request.param} GPUs on a CUDA machine")
    return request.param, sm.spawn(checks.compare_with_stock, request.param, MODES)


def test_plugin_layers_match_stock(compared):
    ep, ranks = compared
    for rank, r in enumerate(ranks):
        for name, res in r.items():
            for mode in MODES:
                m = res["modes"][mode]
                assert m["classes"] == ("FP8FlowMoELayer", "FP8FlowExperts", "FP8FlowTokenDispatcher")
                assert m["moe_layers"] == ["FP8FlowMoELayer"]  # MTP's MoE layer too
                assert m["num_moe_layers"] == (3 if name == "full" else 1)
                assert not m["missing_grads"] and m["finite"], m
                loss_tol = 2e-3 if mode == "bf16" else 2e-2
                assert abs(m["loss"] - res["stock_loss"]) <= loss_tol * abs(res["stock_loss"]), (ep, rank, name, m)
                worst = m["max_grad_rel"] if name == "one_layer" else m["median_grad_rel"]
                assert 0 < worst <= BOUNDS[mode], (ep, rank, name, mode, worst)  # 0 would mean nothing differs
            # SAT is exact: the flow and its dequantize+requantize ablation give the same bits.
            assert res["flow_equals_double_quant"], (ep, rank, name)


def test_checkpoint_switch_stock_plugin_stock(tmp_path):
    world = 2 if _ranks_possible(2) else 1
    for r in sm.spawn(checks.checkpoint_switch, world, str(tmp_path)):
        assert r == {"same_layout": True, "differed": True, "plugin_loaded": True, "stock_reloaded": True,
                     "resumed_loss_finite": True}


@pytest.mark.cpu_kernels("interpreter")  # as `fp8flow audit` runs on a CPU
def test_cast_audit_counts_paper_casts():
    from megatron_fp8flow.megatron import audit

    if not _ranks_possible(2):
        pytest.skip("the all-to-all casts need EP=2: two GPUs on a CUDA machine")
    counts = audit.run(ep=2, modes=["blockwise", "flow", "bf16"], gemm_backend="emulated")
    assert counts["flow"]["explicit"] == 2 and counts["flow"]["quantize"] == 2
    assert counts["blockwise"]["explicit"] == 12
    assert counts["bf16"]["explicit"] == 0


def test_spec_rewrite_and_install():
    from megatron.core.models.gpt import gpt_layer_specs, moe_module_specs
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_fp8flow.megatron import FP8FlowExperts, FP8FlowMoELayer

    from megatron_fp8flow.megatron.compat import spec_builds, spec_submodules

    stock = get_gpt_layer_local_spec(num_experts=4, moe_grouped_gemm=False)
    settings = FP8FlowSettings(mode="blockwise", align=32)
    rewritten = apply_fp8flow_to_spec(stock, settings)
    stock_mlp = stock.submodules.mlp
    assert spec_builds(stock_mlp) is MoELayer  # the input spec is left as it was
    mlp = rewritten.submodules.mlp
    assert mlp.module is FP8FlowMoELayer and mlp.params["fp8flow"] == settings
    assert mlp.submodules.experts.module is FP8FlowExperts
    assert mlp.submodules.shared_experts is spec_submodules(stock_mlp).shared_experts
    dense = apply_fp8flow_to_spec(get_gpt_layer_local_spec(), settings).submodules.mlp
    assert spec_builds(dense) is not FP8FlowMoELayer

    original = moe_module_specs.get_moe_module_spec_for_backend
    try:
        install(settings)
        install(settings)  # idempotent
        hooked = gpt_layer_specs.get_moe_module_spec_for_backend
        assert hooked.__wrapped__ is original and moe_module_specs.get_moe_module_spec_for_backend.__wrapped__ is original
        assert spec_builds(get_gpt_layer_local_spec(num_experts=4).submodules.mlp) is FP8FlowMoELayer
    finally:
        uninstall()
    assert moe_module_specs.get_moe_module_spec_for_backend is original
    assert gpt_layer_specs.get_moe_module_spec_for_backend is original
    assert spec_builds(get_gpt_layer_local_spec(num_experts=4).submodules.mlp) is MoELayer


def test_spec_builds_reads_every_spec_form():
    """ModuleSpec (a class or an import path), a partial of a class (0.18) or of a classmethod
    (0.19's dense MLP: partial(MLP.as_mlp_submodule, ...)); None where nothing builds a class."""
    import functools

    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megatron_fp8flow.megatron.compat import spec_builds

    class Built:
        @classmethod
        def make(cls, **kwargs):
            return cls()

        @staticmethod
        def helper():
            return None

    assert spec_builds(ModuleSpec(module=MoELayer)) is MoELayer
    assert spec_builds(ModuleSpec(module=("megatron.core.transformer.mlp", "MLP"))) is MLP
    assert spec_builds(functools.partial(Built, submodules=None)) is Built
    assert spec_builds(functools.partial(Built.make, submodules=None)) is Built
    assert spec_builds(functools.partial(Built().make)) is Built  # bound through an instance: still the class
    assert spec_builds(functools.partial(Built.helper)) is None
    assert spec_builds(functools.partial(len)) is None
    assert spec_builds(ModuleSpec(module=len)) is None
    assert spec_builds(None) is None and spec_builds(MLP) is None


def test_flags_and_settings():
    seen = []

    def modelopt(parser):
        seen.append(True)
        parser.add_argument("--export-te-mcore-model", action="store_true")
        return parser

    parser = add_fp8flow_args(argparse.ArgumentParser(), chain=modelopt)
    assert seen
    args = parser.parse_args(["--moe-fp8-flow", "--moe-fp8-flow-mode", "blockwise", "--moe-fp8-flow-align", "32",
                              "--moe-fp8-flow-recompute-experts"])
    with pytest.raises(ValueError, match="recompute_experts"):
        settings_from_args(args)  # recompute is for the FP8 flow modes
    args.moe_fp8_flow_mode = "flow"
    s = settings_from_args(args)
    assert (s.mode, s.align, s.recompute_experts) == ("flow", 32, True)
    assert settings_from_args(parser.parse_args([])) is None
    with pytest.raises(ValueError, match="multiple of 16"):
        FP8FlowSettings(mode="flow", align=8)
    with pytest.raises(ValueError, match="unknown mode 'fp4'"):
        FP8FlowSettings(mode="fp4")


def test_unsupported_configurations_are_named():
    from types import SimpleNamespace

    import torch.nn.functional as F

    from megatron_fp8flow.megatron.experts import _check_config
    from megatron_fp8flow.megatron.moe_layer import _check_layer_config

    layer = SimpleNamespace(moe_token_dispatcher_type="flex", moe_shared_expert_overlap=False)
    with pytest.raises(ValueError, match="alltoall"):
        _check_layer_config(layer)
    layer = SimpleNamespace(moe_token_dispatcher_type="alltoall", moe_shared_expert_overlap=True)
    with pytest.raises(ValueError, match="moe_shared_expert_overlap"):
        _check_layer_config(layer)
    ok = dict(gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
              expert_tensor_parallel_size=1, moe_apply_probs_on_input=False)
    _check_config(SimpleNamespace(**ok), 2)
    for change, message in ((dict(gated_linear_unit=False), "SwiGLU"), (dict(add_bias_linear=True), "no bias"),
                            (dict(expert_tensor_parallel_size=2), "expert tensor parallelism"),
                            (dict(moe_apply_probs_on_input=True), "moe_apply_probs_on_input")):
        with pytest.raises(ValueError, match=message):
            _check_config(SimpleNamespace(**{**ok, **change}), 2)


def test_moe_layer_benchmark_runs():
    from megatron_fp8flow.benchmarks import moe_layer

    result = sm.spawn(checks.moe_layer_benchmark_smoke, 1)[0]
    tables = result["tables"]
    assert len(tables) == len(moe_layer.CONTRACTS) + 1
    for table, grads in zip(tables, moe_layer.CONTRACTS):
        assert f"weight gradients into {grads}" in table and "one per step" in table
        assert "| stock | 1 | 2 | 32 |" in table and "| flow | 1 | 2 | 32 |" in table
    assert "2 microbatches per step (FP8 weights quantized once per step)" in tables[-1]
    # warm-up, the held-memory probe, two timed steps: once per step, not per microbatch (1 + 0 + 2)
    assert result["quantized"] == 3, result


def test_launch_hooks_follow_the_parsed_flags():
    """The patched pretrain_gpt.py installs the hook before arguments exist; the hook asks for
    the settings each time a spec is built (off: the stock layer)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_fp8flow.megatron import FP8FlowMoELayer
    from megatron_fp8flow.megatron.compat import spec_builds
    from megatron_fp8flow.megatron.launch import fp8flow_extra_args

    parser = fp8flow_extra_args(None)(argparse.ArgumentParser())
    flags = {"on": parser.parse_args(["--moe-fp8-flow"]), "off": parser.parse_args([])}
    state = {"args": flags["off"]}
    try:
        install(lambda: settings_from_args(state["args"]))
        assert spec_builds(get_gpt_layer_local_spec(num_experts=4).submodules.mlp) is MoELayer
        state["args"] = flags["on"]
        assert spec_builds(get_gpt_layer_local_spec(num_experts=4).submodules.mlp) is FP8FlowMoELayer
    finally:
        uninstall()


def test_one_settings_object_generates_flags_recipe_keys_and_argv():
    """Every FP8FlowSettings field is a Megatron flag, a recipe key and part of a recipe's argv,
    and parsing that argv gives the same settings back."""
    import dataclasses

    from megatron_fp8flow.moe import settings as st
    from megatron_fp8flow.recipes.recipe import fp8flow_keys

    parser = add_fp8flow_args(argparse.ArgumentParser())
    values = {"mode": "blockwise", "sat_variant": "tile", "align": 128, "recompute_experts": False,
              "gemm_backend": "cublas", "bf16_gemm": "torch", "gradient_accumulation_fusion": True,
              "cache_fp8_weights": True, "check_finite": True}
    assert set(values) == set(st.KEYS) and fp8flow_keys() == {"enabled", *st.KEYS}
    back = settings_from_args(parser.parse_args(["--moe-fp8-flow", *st.to_argv(values)]))
    assert back == FP8FlowSettings(**values)
    flags = {a for action in parser._actions for a in action.option_strings}
    assert {f.metadata["flag"] for f in dataclasses.fields(FP8FlowSettings)} <= flags
    assert st.ExpertPrecision is FP8FlowSettings and back.expert_precision() is back


def test_builds_of_one_seed_have_the_same_weights():
    """A seed gives the same weights also where Megatron initializes under its own RNG states (its
    linear layers and embeddings on a GPU), and another seed other weights."""
    (r,) = sm.spawn(checks.same_seed_same_weights, 1)
    assert r["same_seed_equal"] and r["other_seed_equal"] == [], r
    assert any("experts" in n for n in r["random"]) and any("embedding" in n for n in r["random"]), r["random"]


def test_expert_weights_quantized_once_per_step_with_megatron_marks():
    """With cache_fp8_weights the experts quantize their weights once per step, on the first
    microbatch that Megatron's schedules mark (set_is_first_microbatch, which stock Megatron
    forwards only under TransformerEngine FP8), with the same gradient bits as quantizing in
    every microbatch; nothing marked, they quantize in every call (never stale). With the step's
    microbatch count (Megatron's calculator) the copies are released after its last microbatch."""
    (result,) = sm.spawn(checks.fp8_weights_once_per_step, 1)
    assert result["counts"] == {"plain": [3, 3], "cached": [1, 1], "cached_unmarked": [3, 3],
                                "cached_counted": [1, 1]}, result
    assert result["same_grads"] == {"cached": True, "cached_counted": True}, result
    # Without Megatron's microbatch count the copies stay until the next step; with it they go
    # with the step's last microbatch, so they are not held through the optimizer step.
    assert result["held"]["cached"] == [0, 1, 2, 0, 1, 2] and result["held"]["cached_counted"] == [0, 1, 0, 1], result


@pytest.mark.parametrize("world", [1, 2], ids=["ep1", "ep2"])
def test_experts_accumulate_into_main_grad_like_megatron_ddp(world):
    """With gradient_accumulation_fusion the expert GEMMs add their fp32 gradients into
    main_grad (bit-equal to the unfused gradient before autograd rounds it to bf16, and summed
    exactly over microbatches); nothing else changes, and no parameter keeps a .grad."""
    if not _ranks_possible(world):
        pytest.skip(f"needs {world} GPUs")
    for rank_result in sm.spawn(checks.main_grad_contract, world, MODES):
        for mode, r in rank_result.items():
            assert r["experts"] > 0 and r["grads_left"] == [], (mode, r)
            assert r["flagged"] and r["experts_fused_round_to_unfused"], (mode, r)
            # the FP8 GEMMs return fp32 (rounded to bf16 only unfused); bf16's may be bf16 already
            assert r["experts_fused_differs"] or mode == "bf16", (mode, r)
            assert r["others_equal"] and r["accumulates"] and r["nonzero"], (mode, r)


@pytest.mark.parametrize("world", [1, 2], ids=["ep1", "ep2"])
def test_layer_syncs_the_host_once_per_forward(world):
    """One host sync per MoE layer (the routed-token counts, in the forward), none in the
    backward, in every mode (CUDA's sync-debug mode counts them)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("counts CUDA host syncs: needs a GPU")
    if not _ranks_possible(world):
        pytest.skip(f"needs {world} GPUs")
    for rank_result in sm.spawn(checks.layer_host_syncs, world, MODES):
        for mode, counts in rank_result.items():
            # exactly one: the counts read is a sync, so zero would mean nothing was counted
            assert counts["forward"] == 1 and counts["backward"] == 0, (mode, counts)


def test_expert_parameters_in_ddp_order():
    """FP8FlowExperts lists every expert's fc2, then every expert's fc1, each last expert first:
    Megatron's DDP reverses named_parameters() to lay out its buffers, so each linear's expert
    gradients then lie back to back in expert order (one [G, N, K] tensor). Names, the set of
    modules and the state dict are unchanged."""
    r = sm.spawn(checks.expert_parameter_order, 1)[0]
    assert r["same_modules"] and r["last_two"] == ["local_experts.1.linear_fc1", "local_experts.0.linear_fc1"]
    assert r["same_state_dict_order"] and r["stacked_in_ddp_layout"]
    assert not r["default_order_stacks"]  # in nn.Module's own order fc1 and fc2 alternate


def test_megatron_ddp_stacks_expert_gradients():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("Megatron's DDP allocates its buffers on a GPU")
    for dist_opt, r in sm.spawn(checks.expert_buffer_layout, 1)[0].items():
        assert r["grads_stacked"], (dist_opt, r)
        assert r["weights_stacked"] == dist_opt, (dist_opt, r)  # the parameters move into a buffer only then


def test_process_groups_are_torn_down_before_the_interpreter_exits(tmp_path):
    """A process that exits with gloo's worker threads alive can abort in the interpreter's
    finalization, now and then: init_parallel registers the teardown to run before it (also after
    a rebuild), and shutdown_parallel leaves neither torch.distributed's nor Megatron's groups
    behind, and can be called again."""
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("the gloo teardown is the CPU path (NCCL's is left to the caller)")
    script = tmp_path / "child.py"
    script.write_text(
        "import atexit, torch, torch.distributed as dist\n"
        "from megatron.core import parallel_state\n"
        "from megatron_fp8flow.megatron.parallel import init_parallel, shutdown_parallel\n"
        "init_parallel(0, 1, 1)\n"
        "shutdown_parallel(); init_parallel(0, 1, 1)  # rebuilt: the teardown is registered again\n"
        "t = torch.ones(3); dist.all_reduce(t)\n"
        "before = (dist.is_initialized(), parallel_state.model_parallel_is_initialized())\n"
        "atexit._run_exitfuncs()\n"
        "after = (dist.is_initialized(), parallel_state.model_parallel_is_initialized())\n"
        "shutdown_parallel()\n"
        "print(before, after, t.tolist())\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "(True, True) (False, False) [1.0, 1.0, 1.0]", out.stdout
