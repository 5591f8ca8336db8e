"""The compact training loop and its pieces: recipe arguments to a Megatron config, the
byte-level corpus, and two real training steps of the tiny recipe (in a separate process: the
CPU shims patch torch.cuda)."""

import math

import pytest

pytest.importorskip("megatron.core")

import megatron_checks as checks  # noqa: E402

from megatron_fp8flow.megatron import small_model as sm  # noqa: E402
from megatron_fp8flow.recipes import load_recipe  # noqa: E402
from megatron_fp8flow.training.model import config_kwargs, layer_freq  # noqa: E402
from megatron_fp8flow.training.text import ByteBatches, corpus  # noqa: E402


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


def test_byte_corpus_is_real_text():
    data = corpus()
    assert len(data) > 400_000
    text = bytes(data[:2000].tolist()).decode("utf-8")
    assert sum(ch.isalpha() or ch.isspace() for ch in text) > 0.8 * len(text)
    batches = ByteBatches(seq=32, batch=3, seed=5)
    ids, labels = batches.next()
    assert ids.shape == (3, 32) and (ids[:, 1:] == labels[:, :-1]).all()
    assert not (ByteBatches(32, 3, seed=5).next()[0] != ids).any()  # seeded


def test_compact_loop_trains_two_steps():
    history = sm.spawn(checks.compact_loop_smoke, 1)[0]
    assert [h["step"] for h in history] == [1, 2]
    assert all(math.isfinite(h["loss"]) and 3.0 < h["loss"] < 8.0 for h in history)  # ~ln(256) = 5.5 at the start
    assert all(h["tokens_per_s"] > 0 for h in history)
