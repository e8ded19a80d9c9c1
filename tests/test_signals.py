"""The learning-signal protocol (``elbos/signals.py``): what a per-site baseline and a control
variate with trainable parameters need, checked on a toy of each.

Reference: the exact gradient of F = E_p(l)[log p(y | l)] by enumerating l (two values).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from pyro_elbo_ext import HardAttentionELBO
from pyro_elbo_ext.elbos import LearningSignal, SignalPart, SignalSite

from .mc import assert_mean_close

Y = torch.tensor(1.0)


def _model():
    logits = pyro.param("logits", torch.tensor([0.3, -0.2]))
    where = pyro.sample("where", dist.Categorical(logits=logits),
                        infer={"toy_baseline": torch.tensor(-1.2)})
    pyro.sample("y", dist.Normal(where.to(Y.dtype), 1.0), obs=Y)


def _exact_gradient() -> torch.Tensor:
    logits = pyro.param("logits", torch.tensor([0.3, -0.2])).detach().requires_grad_()
    log_lik = dist.Normal(torch.tensor([0.0, 1.0]), 1.0).log_prob(Y)
    (grad,) = torch.autograd.grad((torch.softmax(logits, -1) * log_lik).sum(), [logits])
    return grad


class SiteValueBaseline(SignalPart):
    """A per-site baseline read from the site (``infer={"toy_baseline": b}``; Pyro's own
    ``infer={"baseline": ...}`` is :mod:`~pyro_elbo_ext.elbos.site_baselines`), with a
    running count of its uses as state."""

    kind = "site_value"
    what = "site baseline"

    def apply(self, site: SignalSite, signal):
        return signal - site.infer["toy_baseline"]

    def update(self, site: SignalSite, signal, applied):
        count = self.slots.get((site.name, "uses"), torch.zeros(()))
        self.slots[(site.name, "uses")] = count + 1  # replaced, never written into


class TrainedConstant(SignalPart):
    """A control variate c (a ``pyro.param``, trained by the user's optimizer): the signal is
    ``R - c``, and the surrogate gets ``-(c - R)^2 / 2`` so that the optimizer regresses c on R
    (Pyro's ``nn_baseline`` recipe)."""

    kind = "trained_constant"
    what = "trained constant"

    def apply(self, site: SignalSite, signal):
        return signal - pyro.param("c", torch.tensor(0.0)).detach()

    def surrogate(self, site: SignalSite, signal):
        return -0.5 * (pyro.param("c", torch.tensor(0.0)) - signal.detach()).pow(2).sum()


def _gradient_draws(elbo, num_draws=300):
    leaf = pyro.param("logits", torch.tensor([0.3, -0.2])).unconstrained()
    draws = []
    for _ in range(num_draws):
        loss = elbo.differentiable_loss(_model, lambda: None)
        (grad,) = torch.autograd.grad(loss, [leaf])
        draws.append(-grad)
    return torch.stack(draws)


def _reinforce() -> HardAttentionELBO:
    """REINFORCE with 32 vectorized particles: each call's gradient is a mean of 32."""
    return HardAttentionELBO(estimator="reinforce", num_particles=32, vectorize_particles=True,
                             max_plate_nesting=0)


def _loss_with(part) -> HardAttentionELBO:
    elbo = _reinforce()
    elbo.learning_signal = LearningSignal(baseline=part)
    return elbo


def test_a_per_site_baseline_with_state_fits_the_protocol():
    elbo = _loss_with(SiteValueBaseline())
    draws = _gradient_draws(elbo)
    assert_mean_close(draws, _exact_gradient(), what="per-site baseline")
    plain = _gradient_draws(_reinforce())
    assert bool((draws.var(0) < plain.var(0)).all())  # -1.2 is near E[R]: less variance
    assert float(elbo.carried_state()[("baseline", "where", "uses")]) == 300
    saved = elbo.state_dict()["baseline._extra_state"]
    assert saved["kind"] == "site_value" and float(saved["slots"][("where", "uses")]) == 300


def test_a_control_variate_with_trainable_parameters_fits_the_protocol():
    elbo = _loss_with(TrainedConstant())
    pyro.param("c", torch.tensor(0.0))
    plain = _reinforce()
    pyro.set_rng_seed(0)
    reference = float(plain.differentiable_loss(_model, lambda: None).detach())
    pyro.set_rng_seed(0)
    loss = elbo.differentiable_loss(_model, lambda: None)
    assert float(loss.detach()) == reference  # its terms change the gradient, not the value
    (grad_c,) = torch.autograd.grad(loss, [pyro.param("c").unconstrained()])
    assert float(grad_c) != 0.0  # the optimizer trains it
    assert_mean_close(_gradient_draws(elbo), _exact_gradient(), what="control variate")
