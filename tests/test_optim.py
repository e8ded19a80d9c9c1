"""GroupedOptim against pyro.optim: the same steps, the same checkpoints, clear errors."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from torch.distributions import constraints

from pyro_elbo_ext.optim import GroupedOptim


def model(data, use_extra):
    z = pyro.sample("z", dist.Normal(torch.zeros(3, dtype=data.dtype), 1.0).to_event(1))
    with pyro.plate("data", data.shape[0]):
        pyro.sample("obs", dist.Normal(z.sum(), 1.0), obs=data)
    if use_extra:
        u = pyro.sample("u", dist.Normal(torch.zeros((), dtype=data.dtype), 1.0))
        pyro.sample("v", dist.Normal(u, 0.5), obs=data.new_tensor(0.3))


def guide(data, use_extra):
    loc = pyro.param("loc", lambda: data.new_zeros(3))
    scale = pyro.param("scale", lambda: data.new_ones(3), constraint=constraints.positive)
    pyro.sample("z", dist.Normal(loc, scale).to_event(1))
    if use_extra:  # a parameter that only some steps use
        pyro.sample("u", dist.Normal(pyro.param("u_loc", lambda: data.new_tensor(0.5)), 1.0))


DATA = torch.linspace(-1.0, 2.0, 7, dtype=torch.float64)
# 'u_loc' joins at the second step (add_param_group) and then sits some steps out
SCHEDULE = [False, True, False, True, False, True, True, False, True, False] * 3


def run(optim, steps=SCHEDULE, seed=0, restart=True):
    if restart:
        pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    svi = SVI(model, guide, optim, loss=Trace_ELBO())
    for use_extra in steps:
        svi.step(DATA, use_extra)
    return {name: value.detach().clone() for name, value in pyro.get_param_store().items()}


@pytest.mark.parametrize(
    "constructor, args",
    [
        (torch.optim.Adam, {"lr": 0.05}),
        (torch.optim.Adam, {"lr": 0.05, "betas": (0.8, 0.95), "weight_decay": 0.1}),
        (torch.optim.SGD, {"lr": 0.01, "momentum": 0.9}),
        (torch.optim.RMSprop, {"lr": 0.01}),
    ],
)
def test_same_trajectory_as_pyro_optim_bit_for_bit(constructor, args):
    """Element-wise optimizers: one optimizer over all parameters takes Pyro's exact steps,
    including a parameter ('u_loc') that only some steps use."""
    ours = run(GroupedOptim(constructor, args))
    reference = run(pyro.optim.PyroOptim(constructor, args))
    assert ours.keys() == reference.keys() == {"loc", "scale", "u_loc"}
    for name in reference:
        assert torch.equal(ours[name], reference[name]), name


def test_foreach_kernels_agree_to_rounding():
    ours = run(GroupedOptim(torch.optim.Adam, {"lr": 0.05, "foreach": True}))
    reference = run(pyro.optim.Adam({"lr": 0.05}))
    for name in reference:
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-12, atol=1e-12)


def test_gradient_clipping_is_per_parameter_like_pyro():
    for clip in ({"clip_norm": 0.1}, {"clip_value": 0.05}):
        ours = run(GroupedOptim(torch.optim.SGD, {"lr": 0.02}, clip_args=clip))
        reference = run(pyro.optim.PyroOptim(torch.optim.SGD, {"lr": 0.02}, clip_args=clip))
        unclipped = run(pyro.optim.PyroOptim(torch.optim.SGD, {"lr": 0.02}))
        for name in reference:
            assert torch.equal(ours[name], reference[name]), (clip, name)
        assert not torch.equal(reference["loc"], unclipped["loc"])  # clipping did bite


@pytest.mark.parametrize("first, second", [("grouped", "pyro"), ("pyro", "grouped")])
def test_checkpoints_move_between_grouped_and_pyro_optim(first, second, tmp_path):
    """Ten steps with one optimizer, save; a fresh optimizer of the other kind loads the
    checkpoint and continues exactly as an uninterrupted run does."""
    make = {"grouped": lambda: GroupedOptim(torch.optim.Adam, {"lr": 0.05}),
            "pyro": lambda: pyro.optim.Adam({"lr": 0.05})}
    uninterrupted = run(make[second](), SCHEDULE[:10] + SCHEDULE[10:20], seed=1)

    optim = make[first]()
    run(optim, SCHEDULE[:10], seed=1)
    optim.save(tmp_path / "optim.pt")
    params = pyro.get_param_store().get_state()
    rng = torch.get_rng_state()
    pyro.clear_param_store()
    pyro.get_param_store().set_state(params)
    resumed_optim = make[second]()
    resumed_optim.load(tmp_path / "optim.pt")
    torch.set_rng_state(rng)
    svi = SVI(model, guide, resumed_optim, loss=Trace_ELBO())
    for use_extra in SCHEDULE[10:20]:
        svi.step(DATA, use_extra)
    for name, value in uninterrupted.items():
        torch.testing.assert_close(pyro.param(name).detach(), value, rtol=0, atol=1e-14)


def test_state_is_empty_before_the_first_step():
    assert GroupedOptim(torch.optim.Adam, {"lr": 0.1}).get_state() == {}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"optim_args": lambda name: {"lr": 0.1}}, "per-parameter arguments use pyro.optim"),
        ({"optim_args": {"lr": 0.1}, "clip_args": lambda m, p: {}}, "clip_args as a dict"),
        ({"optim_args": {"lr": 0.1}, "clip_args": {"max_norm": 1.0}}, "'max_norm'"),
    ],
)
def test_invalid_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GroupedOptim(torch.optim.Adam, **kwargs)


def test_a_step_without_parameters_is_a_no_op():
    def model():
        pyro.sample("x", dist.Normal(0.0, 1.0), obs=torch.tensor(0.3))

    svi = SVI(model, lambda: None, GroupedOptim(torch.optim.Adam, {"lr": 0.1}), loss=Trace_ELBO())
    assert svi.step() == pytest.approx(-float(dist.Normal(0.0, 1.0).log_prob(torch.tensor(0.3))))


def test_a_checkpoint_restores_state_but_not_hyper_parameters(tmp_path):
    """Documented: the moments come from the checkpoint, the lr from this optimizer."""
    pyro_optim = pyro.optim.Adam({"lr": 0.05})
    run(pyro_optim, SCHEDULE[:4], seed=2)
    pyro_optim.save(tmp_path / "optim.pt")
    grouped = GroupedOptim(torch.optim.Adam, {"lr": 0.01})
    grouped.load(tmp_path / "optim.pt")
    run(grouped, SCHEDULE[4:5], seed=3, restart=False)
    state = grouped.get_state()["loc"]
    assert state["param_groups"][0]["lr"] == 0.01
    assert int(state["state"][0]["step"]) == 5  # 4 restored steps + 1
