"""The compact training loop and its pieces: recipe arguments to a Megatron config, the
byte-level corpus, and two real training steps of the tiny recipe (in a separate process: the
CPU shims patch torch.cuda)."""

import math
import os

import pytest

pytest.importorskip("megatron.core")

import megatron_checks as checks  # noqa: E402

from megatron_fp8flow.megatron import small_model as sm  # noqa: E402
from megatron_fp8flow.recipes import load_recipe  # noqa: E402
from megatron_fp8flow.training.model import config_kwargs, layer_freq  # noqa: E402
from megatron_fp8flow.training.text import ByteBatches, corpus  # noqa: E402

pytestmark = pytest.mark.cpu_kernels("pytorch")  # on CPU: the plain-PyTorch path (conftest says why)


def test_layer_freq_expressions():
    assert layer_freq("([0]*3+[1]*58)") == [0] * 3 + [1] * 58
    assert layer_freq("[0,1,1]") == [0, 1, 1] and layer_freq(2) == 2
    with pytest.raises(ValueError, match="only integers"):
        layer_freq("__import__('os')")


def test_config_from_recipe():
    import torch.nn.functional as F

    kw = config_kwargs(load_recipe("proxies/tiny_cpu").args)
    assert kw["gated_linear_unit"] and kw["activation_func"] is F.silu and kw["add_bias_linear"] is False
    assert kw["num_moe_experts"] == 4 and kw["moe_router_score_function"] == "sigmoid"
    assert "vocab_size" not in kw and "lr" not in kw  # training arguments stay out of the model config


def test_model_specs_follow_layer_freq_mla_and_mtp():
    """The compact loop's specs: dense and MoE layers by moe_layer_freq, the plugin's MoE layer in
    the decoder and the MTP block, SDPA core attention (MLA needs it without TE)."""
    r = sm.spawn(checks.model_specs, 1)[0]
    assert r["config"] == "MLATransformerConfig"
    assert r["plugin"] == ["MLP", "FP8FlowMoELayer", "FP8FlowMoELayer"] and r["mtp"] == "FP8FlowMoELayer"
    assert r["stock"] == ["MLP", "MoELayer", "MoELayer"]
    assert r["attention"] == ["SDPAttention"] * 3


def test_byte_corpus_is_real_text():
    data = corpus()
    assert len(data) > 400_000
    text = bytes(data[:2000].tolist()).decode("utf-8")
    assert sum(ch.isalpha() or ch.isspace() for ch in text) > 0.8 * len(text)
    batches = ByteBatches(seq=32, batch=3, seed=5)
    ids, labels = batches.next()
    assert ids.shape == (3, 32) and (ids[:, 1:] == labels[:, :-1]).all()
    assert not (ByteBatches(32, 3, seed=5).next()[0] != ids).any()  # seeded


def test_indexed_dataset_of_real_text(tmp_path, capsys):
    """`fp8flow data` writes the corpus as a Megatron indexed dataset: read back byte for byte,
    read by Megatron's own GPTDataset (what pretrain() uses with --data-path), and trained on by
    the compact loop through data_path; bad data paths and splits are named."""
    import hashlib
    import os

    import numpy
    import torch

    from megatron_fp8flow.cli import main
    from megatron_fp8flow.training import text

    prefix = str(tmp_path / "docs")
    assert main(["data", prefix]) == 0
    assert "python-docs" in capsys.readouterr().out
    docs = text.documents("python-docs")
    stream = text.read_indexed_datasets([prefix], vocab_size=256)
    assert torch.equal(stream, torch.cat(docs).long())  # every document, in order, every byte
    # Megatron's GPTDataset over it: windows of the text, labels shifted by one.
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

    cfg = GPTDatasetConfig(random_seed=1, sequence_length=64, blend=([prefix], None), split="98,2,0",
                           tokenizer=NullTokenizer(256), reset_position_ids=False, reset_attention_mask=False,
                           eod_mask_loss=False, path_to_cache=str(tmp_path / "cache"), mmap_bin_files=True)
    train_ds, valid_ds, _ = BlendedMegatronDatasetBuilder(GPTDataset, [8, 4, 0], lambda: True, cfg).build()
    whole = bytes(stream.to(torch.uint8).tolist())
    for ds in (train_ds, valid_ds):
        sample = ds[0][0] if isinstance(ds[0], tuple) else ds[0]
        tokens, labels = sample["tokens"], sample["labels"]
        assert tokens.shape == (64,) and torch.equal(tokens[1:], labels[:-1]) and int(tokens.max()) < 256
        assert bytes(tokens[:24].to(torch.uint8).tolist()) in whole  # real text from the corpus
    # The compact loop trains on it (data_path, Megatron's split).
    os.environ["FP8FLOW_TEST_DATA"] = prefix
    try:
        ranks = sm.spawn(checks.compact_loop_on_indexed_data, 1)
    finally:
        del os.environ["FP8FLOW_TEST_DATA"]
    run = ranks[0]
    cut, valid = int(0.9 * len(stream)), int(0.1 * len(stream))

    def digest(t):
        return hashlib.sha256(t.cpu().numpy().tobytes()).hexdigest()

    assert run["sizes"] == (cut, valid) and run["train"] == digest(stream[:cut])
    assert run["valid"] == digest(stream[cut:cut + valid])
    assert all(math.isfinite(h["loss"]) for h in run["history"]) and run["history"][1]["val_loss"] is not None
    # Errors that name the problem.
    with pytest.raises(FileNotFoundError, match=r"nothere.bin not found .*fp8flow data"):
        text.read_indexed_datasets([str(tmp_path / "nothere")])
    with pytest.raises(ValueError, match="weighted blends are for Megatron's pretrain"):
        text.read_indexed_datasets(["0.3", prefix, "0.7", prefix])
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    wide = str(tmp_path / "wide")
    builder = IndexedDatasetBuilder(wide + ".bin", dtype=numpy.uint16)
    builder.add_document(numpy.array([5, 300, 7], dtype=numpy.uint16), [3])
    builder.finalize(wide + ".idx")
    with pytest.raises(ValueError, match=r"token id 300 is outside the vocabulary \(vocab_size 256\)"):
        text.read_indexed_datasets(wide, vocab_size=256)
    assert text.split_fractions("949,50,1") == (0.949, 0.05) and text.split_fractions(None) == (0.95, 0.05)
    with pytest.raises(ValueError, match="split '1,2,3,4'"):
        text.split_fractions("1,2,3,4")
    with pytest.raises(ValueError, match="the validation split holds 0 tokens"):
        text.ByteBatches(16, 2, tokens=stream[:1000], split=1.0)
    with pytest.raises(ValueError, match="unknown corpus 'wiki'"):
        text.documents("wiki")


def test_stdlib_corpus_is_larger_real_text():
    from megatron_fp8flow.training import text

    docs = text.documents("python-stdlib")
    small = text.documents("python-docs")
    assert len(docs) > len(small) + 300 and sum(map(len, docs)) > 10 * sum(map(len, small))
    assert all(len(d) for d in docs) and all(a.equal(b) for a, b in zip(docs, small))  # the docs come first


def test_torch_corpus_holds_a_convergence_run_seen_about_once():
    """python-torch: the stdlib corpus, then PyTorch's own source; enough bytes for the
    convergence recipe (1500 steps x 32k tokens) to see each about once, and no test files."""
    from megatron_fp8flow.recipes import load_recipe
    from megatron_fp8flow.training import text

    stdlib, docs = text.documents("python-stdlib"), text.documents("python-torch")
    assert all(a.equal(b) for a, b in zip(docs, stdlib)) and len(docs) > len(stdlib) + 1000
    args = load_recipe("proxies/deepseek_v3_convergence").args
    needed = args["train_iters"] * args["global_batch_size"] * args["seq_length"]
    assert sum(map(len, docs)) > 0.9 * needed  # each byte seen about once (the issue allows ~3 passes)


@pytest.mark.parametrize("world", [1, 2], ids=["ep1", "ep2"])
def test_compact_loop_trains_two_steps(world):
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() < world:
        pytest.skip(f"EP={world} needs {world} GPUs on a CUDA machine")
    ranks = sm.spawn(checks.compact_loop_smoke, world)
    history = ranks[0]["history"]
    assert [h["step"] for h in history] == [1, 2]  # exit_interval 2 ends the 5-step run
    lr_step2 = ranks[0]["lr_step2"]
    assert history[1]["lr"] == lr_step2[5] != lr_step2[2]  # on the 5-step schedule, not a 2-step one
    assert all(math.isfinite(h["loss"]) and 3.0 < h["loss"] < 8.0 for h in history)  # ~ln(256) = 5.5 at the start
    assert all(math.isfinite(h["grad_norm"]) and h["grad_norm"] > 0 for h in history)
    assert all(h["grad_norm"] == history[0]["grad_norm"] for h in (r["history"][0] for r in ranks))
    assert all(h["tokens_per_s"] > 0 for h in history)
    losses = [[(h["loss"], h["val_loss"]) for h in r["history"]] for r in ranks]
    assert all(lo == losses[0] for lo in losses)  # the logged losses are means over all ranks
    assert history[0]["val_loss"] is None and 3.0 < history[1]["val_loss"] < 8.0  # eval_interval 2
    if world == 2:
        # Replicated parameters got the same summed gradients and updates on both ranks; each
        # rank holds half of the experts (its own, different parameters).
        a, b = ranks[0]["shared"], ranks[1]["shared"]
        assert a.keys() == b.keys() and a == b
        assert ranks[0]["expert_params"] > 0


def _without_timing(history):
    """A run's logged records without what varies between two runs of the same bits."""
    return [{k: v for k, v in h.items() if k not in ("tokens_per_s", "peak_mem_gb")} for h in history]


def test_compact_loop_resumes_from_a_checkpoint():
    """save / exit_interval / load split a run into jobs without changing it: the resumed run's
    losses, gradient norms and final weights are bit for bit those of the run made in one go."""
    (res,) = sm.spawn(checks.compact_loop_resume, 1)
    strip = _without_timing(res["whole"])
    assert [h["step"] for h in res["first"]] == [1, 2] and [h["step"] for h in res["resumed"]] == [1, 2, 3]
    assert _without_timing(res["resumed"]) == strip
    assert res["compared"] > 10 and res["leftover_counts"] == 0
    # name: max |difference|; a run repeated in one go tells nondeterminism from a lossy resume
    assert (res["repeat_differing"], res["differing"]) == ({}, {}), (
        f"repeated run differs in {res['repeat_differing']}; resumed run differs in {res['differing']}")
    assert res["saved"] == ["iter_0000002", "latest_iteration.txt"] and res["latest"] == 3
    assert res["refused"] and "belongs to another run" in res["refused"] and "hidden_size" in res["refused"]
    assert res["refused_steps"] and "train_iters" in res["refused_steps"]


def test_compact_loop_quantizes_cached_expert_weights_once_per_step():
    """With cache_fp8_weights the compact loop marks each step's first microbatch, as Megatron's
    schedules do: every expert block quantizes its weights once per step (not once per
    microbatch), releases the copies before the optimizer step, and an
    evaluation after that step quantizes the updated weights. The run is bit for bit the run
    without the cache."""
    (res,) = sm.spawn(checks.compact_loop_weight_cache, 1)
    plain, cached = res[False], res[True]
    layers, steps, micro, evals = cached["layers"], 2, 2, 1
    assert layers >= 1 and plain["layers"] == layers
    assert plain["quantized"] == layers * (steps * micro + evals)
    assert cached["quantized"] == layers * (steps + evals)
    assert cached["held_after"] == 0  # none kept after the run's steps
    strip = _without_timing(plain["history"])
    assert _without_timing(cached["history"]) == strip
    assert len({h["loss"] for h in strip}) == steps and strip[-1]["val_loss"] is not None
    assert not [m for m in res["warnings"] if "cache_fp8_weights" in m], res["warnings"]


def test_checkpoint_directories_per_precision():
    from megatron_fp8flow.recipes import load_recipe
    from megatron_fp8flow.training.checkpoint import per_precision_dirs

    got = {p: per_precision_dirs(load_recipe("proxies/tiny_cpu", {"save": "ck"}), p).args for p in ("bf16", "fp8flow")}
    assert got["bf16"]["save"] == os.path.join("ck", "bf16") and got["fp8flow"]["save"] == os.path.join("ck", "fp8flow")
    assert not got["bf16"].get("load")  # only the directories a recipe names


def test_train_command_compares_precisions(tmp_path):
    """`fp8flow train --compare` end to end in a fresh process (the CPU shims stay out of this
    one), on the plain-PyTorch CPU paths: progress lines, the table, the JSON and the plot."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "megatron_fp8flow.cli", "train", "proxies/tiny_cpu", "--steps", "4", "--compare",
         "bf16,fp8flow", "--set", "log_interval=2", "--set", "seq_length=16", "--set", "max_position_embeddings=16",
         "--profile-step", "3", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Step 3 by kernel category" in out.stdout and "| idle |" in out.stdout
    assert "[bf16] step 2/4" in out.stdout and "[fp8flow] step 4/4" in out.stdout
    assert "| fp8flow | 4 |" in out.stdout
    results = json.loads((tmp_path / "compare.json").read_text())
    assert set(results) == {"bf16", "fp8flow"} and len(results["fp8flow"]["history"]) == 2
    prof = results["fp8flow"]["step_profile"]
    assert prof["step"] == 3 and prof["step_ms"] > 0 and "idle" in prof["device_ms_by_category"]
    assert (tmp_path / "loss_curves.png").stat().st_size > 1000
    # Megatron's deterministic_mode: deterministic algorithms only (on the CPU some take another
    # summation order, so the losses agree closely, not to the bit).
    again = subprocess.run(
        [sys.executable, "-m", "megatron_fp8flow.cli", "train", "proxies/tiny_cpu", "--steps", "4", "--compare",
         "fp8flow", "--set", "log_interval=2", "--set", "seq_length=16", "--set", "max_position_embeddings=16",
         "--set", "deterministic_mode=true", "--out", str(tmp_path / "det")],
        capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    det = json.loads((tmp_path / "det" / "compare.json").read_text())["fp8flow"]["history"]
    assert len(det) == 2 and all(h["loss"] == pytest.approx(r["loss"], rel=1e-4)
                                 for h, r in zip(det, results["fp8flow"]["history"]))


def test_flow_and_its_double_quantization_ablation_train_identically(tmp_path):
    """With power-of-two scales the scaling-aware transpose gives the codes and scales that
    dequantize + column-wise requantize gives, so flow and flow_double_quant train to the same
    bits: losses and gradient norms of every step are equal (runs of the ablation measure nothing
    flow's runs do not)."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "megatron_fp8flow.cli", "train", "proxies/tiny_cpu", "--steps", "4", "--compare",
         "fp8flow,flow_double_quant", "--set", "log_interval=1", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads((tmp_path / "compare.json").read_text())
    flow, ablation = (results[p]["history"] for p in ("fp8flow", "flow_double_quant"))
    assert len(flow) == 4 and len({h["loss"] for h in flow}) > 1  # it trained
    assert [(h["loss"], h["grad_norm"]) for h in flow] == [(h["loss"], h["grad_norm"]) for h in ablation]


def test_step_profile_sorts_device_time_by_category():
    """The step record from a profiler's kernels: categories (the benchmarks'), idle as the wall
    time no kernel covered, the top kernels; and its table."""
    from types import SimpleNamespace

    import torch

    from megatron_fp8flow.training import profile

    cuda = torch.autograd.DeviceType.CUDA
    events = [SimpleNamespace(name=n, device_type=cuda, device_time=us) for n, us in (
        ("void deep_gemm::sm90_fp8_gemm_1d2d_impl<...>", 4000.0), ("_quantize_weight_kernel", 1500.0),
        ("_sat_packed_kernel", 500.0), ("flash_fwd_kernel", 700.0), ("multi_tensor_apply_kernel<adam>", 300.0),
        ("_quantize_weight_kernel", 500.0), ("ncclDevKernel_AllToAll", 250.0), ("mystery", 50.0))]
    events.append(SimpleNamespace(name="aten::mm", device_type=torch.autograd.DeviceType.CPU, device_time=0.0))
    rec = profile.summarize(SimpleNamespace(events=lambda: events), wall_ms=9.0, step=5)
    cats = rec["device_ms_by_category"]
    assert cats == {"GEMM": 4.0, "cast": 2.0, "attention": 0.7, "SAT": 0.5, "optimizer": 0.3, "communication": 0.25,
                    "other": 0.05, "idle": 1.2}
    assert rec["busy_ms"] == 7.8 and rec["step"] == 5 and rec["top_kernels_ms"]["_quantize_weight_kernel"] == 2.0
    over = profile.summarize(SimpleNamespace(events=lambda: events), wall_ms=5.0, step=5)
    assert over["device_ms_by_category"]["idle"] == 0.0  # kernels on several streams may overlap the wall time
    table = profile.render({"bf16": {**rec, "device_ms_by_category": {"GEMM": 6.0, "idle": 0.5}}, "fp8flow": rec})
    assert table.splitlines()[2] == "| GEMM | 6.00 | 4.00 |" and "| cast | 0.00 | 2.00 |" in table
    assert table.splitlines()[-2].startswith("| idle |")


def test_convergence_criterion_and_merge(tmp_path):
    import json

    from megatron_fp8flow.training import compare

    assert compare.smoothed([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    steps = range(1, 201)
    base = [5.0 / (1 + 0.01 * s) + (0.05 if s % 2 else -0.05) for s in steps]  # decaying, noisy

    def run(losses):
        return {"recipe": "r", "history": [{"step": s, "loss": v, "tokens_per_s": 1.0, "peak_mem_gb": 1.0}
                                           for s, v in zip(steps, losses)]}

    close = [v * 1.001 for v in base]
    late_drift = [v * (1.0 if s < 150 else 1.01) for s, v in zip(steps, base)]  # 1% off in the last quarter
    report = compare.convergence({"bf16": run(base), "close": run(close), "drift": run(late_drift)})
    assert report["close"]["passes"] and abs(report["close"]["max_abs_rel"] - 0.001) < 1e-9
    assert not report["drift"]["passes"] and report["drift"]["max_abs_rel"] > 0.0025
    assert report["close"]["loss"] == "loss"
    # With validation losses in every run, those are compared (here: equal, while training drifts).
    with_val = {name: run(losses) for name, losses in (("bf16", base), ("drift", late_drift))}
    for r in with_val.values():
        for i, h in enumerate(r["history"]):
            h["val_loss"] = 2.0 + 1.0 / (1 + i) if i % 10 == 9 else None
    report = compare.convergence(with_val, window=3)
    assert report["drift"]["loss"] == "val_loss" and report["drift"]["passes"] and report["drift"]["points"] == 10
    for name, losses in (("bf16", base), ("fp8flow", close)):
        (tmp_path / name).mkdir()
        r = {**run(losses), "summary": compare.summarize(run(losses)["history"]), "device": "GPU X, peak memory: Y"}
        (tmp_path / name / "compare.json").write_text(json.dumps({name: r}))
    merged = compare.merge([str(tmp_path / "bf16"), str(tmp_path / "fp8flow")], str(tmp_path / "both"))
    assert list(merged) == ["bf16", "fp8flow"] and (tmp_path / "both" / "loss_curves.png").stat().st_size > 1000
    assert "Device: GPU X, peak memory: Y." in compare.table(merged)  # the runs' machine, not this one
    with pytest.raises(ValueError, match="more than one"):
        compare.merge([str(tmp_path / "bf16"), str(tmp_path / "both")], str(tmp_path / "again"))
    # Repeats of one precision, labelled apart: the repeat compares against the first run.
    repeat = compare.merge([str(tmp_path / "bf16"), str(tmp_path / "bf16")], str(tmp_path / "rep"),
                           labels=["bf16", "bf16 repeat"], smooth=5)
    assert list(repeat) == ["bf16", "bf16 repeat"] and compare.convergence(repeat)["bf16 repeat"]["max_abs_rel"] == 0
    with pytest.raises(ValueError, match="holds 2 runs"):
        compare.merge([str(tmp_path / "both")], str(tmp_path / "x"), labels=["a"])
    with pytest.raises(ValueError, match="1 labels for 2"):
        compare.merge([str(tmp_path / "bf16"), str(tmp_path / "fp8flow")], str(tmp_path / "x"), labels=["a"])


def test_clipping_uses_the_global_norm():
    import torch

    from megatron_fp8flow.training.loop import _sync_and_clip

    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]
    params[1].allreduce = False  # an expert parameter: counted in the norm like the others at EP = 1
    master = [p.detach().clone() for p in params]
    master[0].grad, master[1].grad = torch.tensor([3.0, 0.0, 4.0]), torch.full((2, 2), 6.0)  # norm 13
    assert float(_sync_and_clip(params, master, clip=1.3, world=1)) == pytest.approx(13.0)  # before clipping
    assert torch.allclose(master[0].grad, torch.tensor([0.3, 0.0, 0.4]), atol=1e-6)
    assert torch.allclose(master[1].grad, torch.full((2, 2), 0.6), atol=1e-6)
    before = [m.grad.clone() for m in master]
    _sync_and_clip(params, master, clip=100.0, world=1)  # below the limit: unchanged
    assert all(torch.equal(a, m.grad) for a, m in zip(before, master))


def test_memory_breakdown_replays_to_the_peak():
    """The allocator history is replayed to the moment of most memory allocated, and the blocks
    alive then are sorted by the frames that allocated them."""
    from megatron_fp8flow.training import memory

    def frames(*names, file="loop.py"):
        return [{"name": n, "filename": file, "line": 1} for n in names]

    trace = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": frames("__init__", "build_model", "_train")},
        {"action": "alloc", "addr": 2, "size": 400, "frames": [{"name": "__init__", "filename": "x/main_grad.py"}]},
        {"action": "alloc", "addr": 3, "size": 800, "frames": frames("master_weights", "_train")},
        {"action": "alloc", "addr": 4, "size": 50, "frames": frames("_quantize_weights", "forward", "_train")},
        {"action": "alloc", "addr": 5, "size": 70, "frames": frames("forward", "_train")},
        {"action": "alloc", "addr": 6, "size": 10, "frames": []},  # the autograd engine's thread
        {"action": "free_requested", "addr": 6, "size": 10},
        {"action": "free_completed", "addr": 6, "size": 10},
        {"action": "alloc", "addr": 7, "size": 20, "frames": frames("backward", "_ExpertMLPFunction")},
        {"action": "alloc", "addr": 8, "size": 9, "frames": frames("step", file="torch/optim/adamw.py")},
        {"action": "free_requested", "addr": 7, "size": 20},
        {"action": "free_requested", "addr": 4, "size": 50},
        {"action": "alloc", "addr": 9, "size": 60, "frames": frames("_batches", "_train")},  # below the peak
    ]
    out = memory.peak_breakdown({"device_traces": [trace]})
    gb = {k: round(v * 1e9) for k, v in out["by_category_gb"].items()}
    assert round(out["peak_gb"] * 1e9) == 100 + 400 + 800 + 50 + 70 + 20 + 9 == sum(gb.values())
    assert gb == {"parameters": 100, "main_grad": 400, "optimizer": 809, "fp8_weights": 50, "activations": 70,
                  "backward": 20, "other": 0}
    assert "| **peak allocated** | 0.00 |" in memory.render({"flow": out})


def test_memory_breakdown_sorts_long_lived_blocks_by_their_storage():
    """Under Megatron's pretrain() the parameter and gradient buffers are allocated in DDP's
    constructor and the optimizer state in its first step: blocks still alive at the snapshot
    are sorted by the storage they lie in, not by their frames; a block freed after the peak
    (its address may hold something else by then) by its frames. Megatron's own function names
    (get_model, train_step, forward_step, backward_step, megatron/core/optimizer) are known."""
    from megatron_fp8flow.training import memory

    def frames(*names, file="training.py"):
        return [{"name": n, "filename": file, "line": 7} for n in names]

    ddp = frames("__init__", "get_model", file="param_and_grad_buffer.py")
    trace = [
        {"action": "alloc", "addr": 1000, "size": 200, "frames": ddp},  # DDP's parameter buffer
        {"action": "alloc", "addr": 2000, "size": 400, "frames": ddp},  # DDP's gradient buffer
        {"action": "alloc", "addr": 3000, "size": 800, "frames": frames("step", "train_step")},  # Adam's state
        {"action": "alloc", "addr": 4000, "size": 60, "frames": frames("forward", "forward_step", "train_step")},
        {"action": "alloc", "addr": 5000, "size": 30, "frames": frames("backward_step", "train_step")},
        {"action": "alloc", "addr": 6000, "size": 11, "frames": frames("step", "train_step",
                                                                        file="megatron/core/optimizer/distrib_optimizer.py")},
        {"action": "alloc", "addr": 7000, "size": 5, "frames": frames("quantize_expert_weights", "forward", "train_step")},
        {"action": "free_requested", "addr": 4000, "size": 60},
        {"action": "alloc", "addr": 4000, "size": 20, "frames": frames("forward", "forward_step", "train_step")},
    ]
    ranges = [(1000, 1200, "parameters"), (2000, 2400, "main_grad"), (3000, 3800, "optimizer"),
              (4000, 4100, "optimizer")]  # 4000 held the peak's activation, freed and reused since
    snapshot = {"device_traces": [trace], "segments": [
        {"device": 0, "blocks": [{"size": 200, "state": "active_allocated"}, {"size": 400, "state": "active_allocated"},
                                 {"size": 800, "state": "active_allocated"}, {"size": 30, "state": "inactive"}]}]}
    out = memory.peak_breakdown(snapshot, ranges=ranges)
    gb = {k: round(v * 1e9) for k, v in out["by_category_gb"].items()}
    assert gb == {"parameters": 200, "main_grad": 400, "optimizer": 811, "fp8_weights": 5, "activations": 60,
                  "backward": 30, "other": 0}
    assert round(out["peak_gb"] * 1e9) == sum(gb.values())
    assert out["peak_allocation"]["category"] == "fp8_weights" and out["unrecorded_gb"] == 0
    assert out["peak_allocation"]["frames"][0] == "training.py:7 quantize_expert_weights"
    # without the ranges the frames decide: DDP's buffers count as built with the model
    gb = {k: round(v * 1e9) for k, v in memory.peak_breakdown(snapshot)["by_category_gb"].items()}
    assert gb["parameters"] == 600 and gb["main_grad"] == 0 and gb["optimizer"] == 11 and gb["other"] == 800
    # a history that lost its first events (the allocator keeps a bounded number) says how much
    cut = {**snapshot, "device_traces": [trace[2:]]}
    assert round(memory.peak_breakdown(cut)["unrecorded_gb"] * 1e9) == 1400 - (800 + 30 + 11 + 5 + 20)
    assert memory.peak_breakdown({"device_traces": [trace]})["unrecorded_gb"] is None


def test_tensor_ranges_cover_parameters_main_grad_and_optimizer_state():
    """The storages tensor_ranges reports: each parameter's whole storage (one buffer where
    DDP keeps them), main_grad, and the master weights and Adam state inside Megatron-like
    wrappers (a chained optimizer of mixed-precision ones); a storage is listed once."""
    from types import SimpleNamespace

    import torch

    from megatron_fp8flow.training import memory

    buffer = torch.zeros(30)
    model = torch.nn.Module()
    model.a = torch.nn.Parameter(buffer[:10])
    model.b = torch.nn.Parameter(buffer[10:])
    for p in (model.a, model.b):
        p.main_grad = torch.zeros(p.shape, dtype=torch.float32)
    master = [model.a.detach().double().clone().requires_grad_(True)]
    master[0].grad = torch.ones_like(master[0])
    adam = torch.optim.Adam(master)
    adam.step()
    wrapped = SimpleNamespace(chained_optimizers=[SimpleNamespace(optimizer=adam)])
    ranges = memory.tensor_ranges([model], wrapped, device_type="cpu")
    kinds = [(end - start, what) for start, end, what in ranges]
    assert kinds[0] == (120, "parameters") and kinds[1:3] == [(40, "main_grad"), (80, "main_grad")]
    state = adam.state[master[0]]
    assert sorted(kinds[3:]) == sorted([(80, "optimizer")] + [(t.untyped_storage().nbytes(), "optimizer")
                                                              for t in state.values() if t.untyped_storage().nbytes()])
    assert memory.tensor_ranges([model], wrapped) == []  # only storages of the device the snapshot is of


def test_pretrain_recorder_writes_once_after_its_step(monkeypatch, tmp_path):
    """The pretrain() recorder starts the allocator history, wraps the optimizer's step once,
    and after step N writes the breakdown (never over an existing file) and stops recording."""
    import json
    from types import SimpleNamespace

    import torch

    from megatron_fp8flow.training import memory

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 1500)
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", lambda *a, **k: calls.append(k.get("enabled", "on")))
    trace = [{"action": "alloc", "addr": 1, "size": 1000, "frames": [{"name": "get_model", "filename": "t.py"}]}]
    monkeypatch.setattr(torch.cuda.memory, "_snapshot", lambda: {"device_traces": [trace]})
    path = tmp_path / "memory.json"
    rec = memory.PretrainRecorder(str(path), step=2)
    rec.start()
    rec.start()  # once
    steps = []
    opt = SimpleNamespace(step=lambda: steps.append(1) or (True, 1.0, 0))
    rec.optimizer_built(opt, [])
    rec.optimizer_built(opt, [])  # one wrapper
    assert opt.step() == (True, 1.0, 0) and not path.exists()
    opt.step()
    opt.step()
    assert len(steps) == 3 and calls == ["on", None]
    data = json.loads(path.read_text())
    assert data["step"] == 2 and data["by_category_gb"]["parameters"] == 1e-6 and data["max_allocated_gb"] == 1.5e-6
    with pytest.raises(FileExistsError, match="not written over"):
        memory._write_json(str(path), {})
    with pytest.raises(ValueError, match="step must be >= 1"):
        memory.PretrainRecorder(str(path), step=0)


def _seeded_run(precision, seed, offset, steps=400, every=20):
    """A run whose validation loss is a decaying curve times (1 + offset)."""
    hist = [{"step": s, "loss": 9.0, "lr": 1e-3, "tokens_per_s": 1.0, "peak_mem_gb": 1.0, "grad_norm": 1.0,
             "val_loss": (3.0 + 2.0 / (1 + s / 100)) * (1 + offset)} for s in range(every, steps + 1, every)]
    return {"recipe": "r", "precision": precision, "seed": seed, "history": hist,
            "summary": {"final_loss": 9.0, "tokens_per_s": 1.0, "peak_mem_gb": 1.0, "steps": steps}}


def test_convergence_verdict_from_seeds(tmp_path):
    """The noise floor from the bf16 seeds, each precision's mean difference with its interval
    from the seeds, the pass rule, and flow against blockwise."""
    from megatron_fp8flow.training import verdict

    runs = {f"bf16 seed {i}": _seeded_run("bf16", i, e) for i, e in enumerate((0.0, 0.001, -0.001))}
    runs.update({f"fp8flow seed {i}": _seeded_run("fp8flow", i, e) for i, e in enumerate((0.0005, 0.0003, 0.0007))})
    runs.update({f"blockwise seed {i}": _seeded_run("blockwise", i, e) for i, e in enumerate((0.004, 0.0042))})
    v = verdict.verdict(runs, window=3)
    assert v["verdict"] == "pass" and v["noise_floor"] == pytest.approx(0.002 / 0.999, rel=1e-9)  # relative to the lower seed
    flow, block = v["vs_bf16"]["fp8flow"], v["vs_bf16"]["blockwise"]
    assert flow["mean"] == pytest.approx(0.0005, rel=1e-6) and flow["seeds"] == 3
    assert flow["ci95"] == pytest.approx(4.303 * 0.0002 / 3 ** 0.5, rel=1e-4)
    assert block["mean"] == pytest.approx(0.0041, rel=1e-6) and v["flow_vs_blockwise"] == "flow ahead of blockwise"
    assert v["from_step"] == 200 + 20 and v["to_step"] == 400  # the last half of 20 evaluations
    assert v["resolved"] and "lies inside +-0.25%" in v["resolution"]
    text = verdict.render(v)
    assert "| fp8flow | 3 | +0.050% |" in text and "Verdict: PASS" in text
    verdict.plot(runs, v, str(tmp_path / "a.png"), str(tmp_path / "b.png"))
    assert (tmp_path / "a.png").stat().st_size > 0 and (tmp_path / "b.png").stat().st_size > 0

    worse = {**runs, **{f"fp8flow seed {i}": _seeded_run("fp8flow", i, 0.003) for i in range(3)}}
    v = verdict.verdict(worse)
    assert v["verdict"] == "fail" and any("outside the bf16 noise floor" in r for r in v["reasons"])
    assert any("exceeds 0.25%" in r for r in v["reasons"])
    # two seeds far apart: the mean passes, the interval is wider than the limit
    wide = {**runs, **{f"fp8flow seed {i}": _seeded_run("fp8flow", i, e) for i, e in enumerate((0.0015, -0.0005))}}
    del wide["fp8flow seed 2"]
    v = verdict.verdict(wide)
    assert v["verdict"] == "pass" and not v["resolved"] and "do not show the difference" in v["resolution"]
    assert "Resolution: fp8flow: its 95% interval [" in verdict.render(v)
    one = {"bf16": _seeded_run("bf16", 1, 0.0), "fp8flow": _seeded_run("fp8flow", 1, 0.0)}
    v = verdict.verdict(one)
    assert v["verdict"] == "fail" and v["noise_floor"] is None and "no noise floor" in v["reasons"][0]
    assert v["vs_bf16"]["fp8flow"]["ci95"] is None and not v["resolved"] and "no interval" in v["resolution"]
    with pytest.raises(ValueError, match="needs bf16 runs"):
        verdict.verdict({"fp8flow": _seeded_run("fp8flow", 1, 0.0)})


def test_compare_merges_seeds_and_writes_the_verdict(tmp_path, capsys):
    import json

    from megatron_fp8flow import cli

    dirs = []
    for precision, seed, offset in (("bf16", 1, 0.0), ("bf16", 2, 0.001), ("fp8flow", 1, 0.0004),
                                    ("fp8flow", 2, 0.0006)):
        d = tmp_path / f"{precision}_{seed}"
        d.mkdir()
        (d / "compare.json").write_text(json.dumps({precision: _seeded_run(precision, seed, offset)}))
        dirs.append(str(d))
    out, target = tmp_path / "merged", tmp_path / "verdict.json"
    assert cli.main(["compare", *dirs, "--out", str(out), "--verdict", str(target)]) == 0
    text = capsys.readouterr().out
    assert "Verdict: PASS" in text and json.loads(target.read_text())["verdict"] == "pass"
    merged = json.loads((out / "compare.json").read_text())
    assert sorted(merged) == ["bf16 seed 1", "bf16 seed 2", "fp8flow seed 1", "fp8flow seed 2"]
    assert (out / "validation_by_seed.png").exists() and (out / "difference.png").exists()
    assert cli.main(["compare", *dirs, "--out", str(tmp_path / "again"), "--verdict", str(target)]) == 0
    assert "not written over" in capsys.readouterr().out and (tmp_path / "verdict-2.json").exists()


def test_checkpoint_loads_by_parameter_name(tmp_path):
    """Master weights and AdamW's state are matched to parameters by name, so a checkpoint
    written with the parameters listed in another order resumes each parameter from its own
    state; one that names no parameters (an earlier format) is refused."""
    import types

    import torch

    from megatron_fp8flow.training import checkpoint

    def build():
        torch.manual_seed(0)
        model = torch.nn.ModuleDict({"a": torch.nn.Linear(3, 2), "b": torch.nn.Linear(2, 2, bias=False)})
        master = [p.detach().float().clone().requires_grad_(True) for p in model.parameters()]
        return model, master, torch.optim.AdamW(master, lr=0.1)

    model, master, opt = build()
    for i, m in enumerate(master):
        m.grad = torch.full_like(m, float(i + 1))
    opt.step()
    data = types.SimpleNamespace(gen=torch.Generator())
    args = {"train_iters": 5}
    path = checkpoint.save(str(tmp_path), 1, 0, 1, args, "flow", model, master, opt, data, [])
    state = torch.load(path, weights_only=False)
    order = [2, 0, 1]  # as if written with the parameters listed as b.weight, a.weight, a.bias
    state["param_names"] = [state["param_names"][i] for i in order]
    state["master"] = [state["master"][i] for i in order]
    state["optimizer"]["state"] = {new: state["optimizer"]["state"][old] for new, old in enumerate(order)}
    torch.save(state, path)
    fresh, fresh_master, fresh_opt = build()
    checkpoint.load(str(tmp_path), 0, 1, args, "flow", fresh, fresh_master, fresh_opt, data)
    assert all(torch.equal(a, b) for a, b in zip(master, fresh_master))
    for a, b in zip(master, fresh_master):
        sa, sb = opt.state[a], fresh_opt.state[b]
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    del state["param_names"]
    torch.save(state, path)
    with pytest.raises(ValueError, match="does not name its parameters"):
        checkpoint.load(str(tmp_path), 0, 1, args, "flow", fresh, fresh_master, fresh_opt, data)
