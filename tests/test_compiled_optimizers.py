"""The functional optimizers of the compiled step take torch's (and Pyro's) steps.

Each is run side by side with the optimizer it mirrors on the same gradient sequence; the
parameters and the state agree bit for bit in float64 up to a few ulps, and within float32
rounding in float32.  Checkpoints convert both ways in torch's ``state_dict`` format.
"""

import pyro.optim
import pytest
import torch
from pyro.optim.clipped_adam import ClippedAdam as TorchClippedAdam

from pyro_elbo_ext import GroupedOptim
from pyro_elbo_ext.compiled.optimizers import clip_gradient, functional_optimizer

CASES = [
    (torch.optim.Adam, {"lr": 0.05}),
    (torch.optim.Adam, {"lr": 0.02, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1}),
    (TorchClippedAdam, {"lr": 0.05, "lrd": 0.97, "clip_norm": 0.5}),
    (TorchClippedAdam, {"lr": 0.05, "centered_variance": True, "weight_decay": 0.01}),
    (torch.optim.SGD, {"lr": 0.1}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    (torch.optim.RMSprop, {"lr": 0.01}),
    (torch.optim.RMSprop, {"lr": 0.01, "momentum": 0.5, "centered": True, "weight_decay": 0.1}),
]
IDS = [f"{c.__name__}-{i}" for i, (c, _) in enumerate(CASES)]


def _gradients(dtype, steps=12):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(3, 2, generator=g, dtype=dtype) * 3 for _ in range(steps)]


def _pyro_optim(constructor, args):
    return pyro.optim.PyroOptim(constructor, args)


def _run_both(constructor, args, dtype, clip=None):
    start = torch.linspace(-1, 1, 6, dtype=dtype).reshape(3, 2)
    torch_param = start.clone().requires_grad_()
    optimizer = constructor([torch_param], **args)
    mirror = functional_optimizer(pyro.optim.PyroOptim(constructor, args, clip), torch_param)
    param, state = start.clone(), mirror.optimizer.init_state(start)
    for grad in _gradients(dtype):
        torch_param.grad = grad.clone()
        if clip:
            if "clip_norm" in clip:
                torch.nn.utils.clip_grad_norm_(torch_param, clip["clip_norm"])
            if "clip_value" in clip:
                torch.nn.utils.clip_grad_value_(torch_param, clip["clip_value"])
        optimizer.step()
        param, state = mirror.update(param, grad, state)
    return torch_param.detach().clone(), optimizer, param, state, mirror


@pytest.mark.parametrize("constructor, args", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_update_matches_torch(constructor, args, dtype):
    expected, optimizer, param, state, _ = _run_both(constructor, args, dtype)
    tol = {"rtol": 1e-13, "atol": 1e-14} if dtype == torch.float64 else \
        {"rtol": 2e-6, "atol": 1e-7}
    torch.testing.assert_close(param, expected, **tol)
    torch_state = optimizer.state_dict()["state"].get(0, {})
    for key, value in torch_state.items():
        torch.testing.assert_close(torch.as_tensor(state[key]).to(torch.as_tensor(value)),
                                   torch.as_tensor(value), **tol)
    assert not torch.equal(expected, torch.linspace(-1, 1, 6, dtype=dtype).reshape(3, 2))


def test_clip_args_match_pyro():
    clip = {"clip_norm": 1.0, "clip_value": 0.2}
    expected, _, param, _, _ = _run_both(torch.optim.Adam, {"lr": 0.1}, torch.float64, clip)
    torch.testing.assert_close(param, expected, rtol=1e-13, atol=1e-14)
    big = torch.tensor([3.0, 4.0], dtype=torch.float64)
    torch.testing.assert_close(clip_gradient(big, clip_norm=1.0), big / (5 + 1e-6))


@pytest.mark.parametrize("constructor, args", CASES, ids=IDS)
def test_state_round_trips_through_torch_format(constructor, args):
    """A torch optimizer's state_dict loads into the mirror and continues identically, and the
    mirror's export loads into a fresh torch optimizer that continues identically too."""
    dtype = torch.float64
    expected, optimizer, _, _, mirror = _run_both(constructor, args, dtype)
    saved = optimizer.state_dict()
    state = mirror.optimizer.load(expected, saved)
    exported = mirror.optimizer.export(state)
    fresh_param = expected.clone().requires_grad_()
    fresh = constructor([fresh_param], **args)
    fresh.load_state_dict(exported)
    grad = torch.full_like(expected, 0.7)
    optimizer.param_groups[0]["params"][0].grad = grad.clone()
    optimizer.step()
    fresh_param.grad = grad.clone()
    fresh.step()
    param, _ = mirror.update(expected, grad, state)
    reference = optimizer.param_groups[0]["params"][0].detach()
    torch.testing.assert_close(param, reference, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(fresh_param.detach(), reference, rtol=0, atol=0)


def test_grouped_optim_is_supported_and_others_are_refused():
    p = torch.zeros(2, requires_grad=True)
    grouped = functional_optimizer(GroupedOptim(torch.optim.SGD, {"lr": 0.5}), p)
    assert grouped.optimizer.hyper["lr"] == 0.5
    with pytest.raises(TypeError, match="cannot compile the optimizer Adagrad.*supported"):
        functional_optimizer(pyro.optim.Adagrad({"lr": 0.1}), p)
    with pytest.raises(ValueError, match="does not support amsgrad=True"):
        functional_optimizer(pyro.optim.Adam({"lr": 0.1, "amsgrad": True}), p)
