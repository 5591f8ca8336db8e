"""Megatron's torch-optimizer fallback switched to torch's fused Adam (CPU: torch's fused kernels
run there too)."""

import copy
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron_fp8flow.megatron import optimizer as fused_adam  # noqa: E402


def _adam(seed, cls=torch.optim.AdamW, shapes=((96, 40), (7,), (3, 130))):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    return cls([{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}],
               lr=1e-2, betas=(0.9, 0.95), eps=1e-8)


def _megatron_like(*adams):
    """Megatron's wrappers as the switch sees them: a chained optimizer of optimizers holding
    a torch optimizer each."""
    return SimpleNamespace(chained_optimizers=[SimpleNamespace(optimizer=a) for a in adams])


@pytest.mark.parametrize("cls", [torch.optim.AdamW, torch.optim.Adam])
def test_fused_steps_match_the_default_implementation(cls):
    """Three steps of the switched optimizer against the unswitched one on the same fresh
    parameters and gradients: the same update up to fp32 rounding of another operation order."""
    fused, plain = _adam(1, cls), _adam(1, cls)
    start = [p.detach().clone() for g in plain.param_groups for p in g["params"]]
    assert fused_adam.fuse_torch_adam(_megatron_like(fused)) == 2
    assert all(g["fused"] and not g["foreach"] for g in fused.param_groups)
    for _ in range(3):
        fused.step()
        plain.step()
    pairs = zip([p for g in fused.param_groups for p in g["params"]], [p for g in plain.param_groups for p in g["params"]])
    for (pf, pp), p0 in zip(pairs, start):
        assert not torch.equal(pp, p0)  # the parameters moved: not a comparison of untouched copies
        torch.testing.assert_close(pf, pp, rtol=1e-5, atol=1e-6)


def test_nan_gradients_stay_nan():
    adam = _adam(2)
    adam.param_groups[0]["params"][0].grad[3, 5] = float("nan")
    fused_adam.fuse_torch_adam(adam)
    adam.step()
    assert torch.isnan(adam.param_groups[0]["params"][0][3, 5])


def test_switching_is_refused_after_a_step_and_skips_what_it_cannot_fuse():
    stepped = _adam(3)
    stepped.step()
    with pytest.raises(RuntimeError, match="before its first step"):
        fused_adam.fuse_torch_adam(stepped)
    ints = _adam(4)
    ints.param_groups[1]["params"] = [torch.zeros(4, dtype=torch.float64, requires_grad=True)]
    assert fused_adam.fuse_torch_adam(ints) == 1  # the fp64 group stays as it was
    assert ints.param_groups[1]["fused"] in (None, False)
    other = SimpleNamespace(optimizer=SimpleNamespace(param_groups=[]))  # not a torch Adam: untouched
    assert fused_adam.fuse_torch_adam(other) == 0


def test_install_wraps_megatrons_builder_once(caplog):
    built = []

    def get_megatron_optimizer(config, model):
        built.append(_megatron_like(_adam(5), _adam(6)))
        return built[-1]

    training = SimpleNamespace(get_megatron_optimizer=get_megatron_optimizer)
    assert fused_adam.install(training) is True
    assert fused_adam.install(training) is False  # idempotent: one wrapper
    with caplog.at_level("WARNING"):
        opt = training.get_megatron_optimizer(None, None)
    assert opt is built[0]
    assert all(g["fused"] for part in opt.chained_optimizers for g in part.optimizer.param_groups)
    assert "fused implementation" in caplog.text
    assert training.get_megatron_optimizer.__name__ == "get_megatron_optimizer"


def test_state_dicts_round_trip_between_fused_and_default():
    """A checkpoint of the fused optimizer loads into a fresh, switched one and steps on to the
    same parameters (what a resumed pretrain() run does)."""
    a = _adam(7)
    fused_adam.fuse_torch_adam(a)
    a.step()
    b = _adam(7)
    fused_adam.fuse_torch_adam(b)
    with torch.no_grad():
        for pa, pb in zip(a.param_groups[0]["params"] + a.param_groups[1]["params"],
                          b.param_groups[0]["params"] + b.param_groups[1]["params"]):
            pb.copy_(pa)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    a.step()
    b.step()
    for pa, pb in zip(a.param_groups[0]["params"], b.param_groups[0]["params"]):
        assert torch.equal(pa, pb)
