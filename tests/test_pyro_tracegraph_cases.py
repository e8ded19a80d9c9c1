"""Cases from Pyro's own TraceGraph_ELBO tests, written anew for our losses.

Pyro's ``tests/infer/test_gradient.py`` and ``tests/integration_tests/test_tracegraph_elbo.py``
run whole against ``JensenELBO(entropy="sampled")`` with
``python -m benchmarks.pyro_tracegraph_tests /path/to/pyro``; the representative ones are kept
here: a non-reparameterized guide in a subsampled, scaled plate, and nuisance sites sampled in
the opposite order in model and guide, whose terms the plate's score must not meet.  Exact
gradients in closed form; Monte Carlo within ``K_SE`` standard errors.
"""

from __future__ import annotations

import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.distributions.testing import fakes

from pyro_elbo_ext import AnalyticKLELBO, JensenELBO
from pyro_elbo_ext.elbos.downstream import score_downstream
from tests.mc import assert_mean_close

DATA = torch.tensor([-0.5, 2.0], dtype=torch.float64)
LOSSES = {"jensen_sampled": lambda **kw: JensenELBO(entropy="sampled", **kw),
          "jensen_analytic": lambda **kw: JensenELBO(**kw),
          "analytic_kl": lambda **kw: AnalyticKLELBO(**kw)}


def _exact(scale_factor: float) -> dict[str, torch.Tensor]:
    """dL at loc = 0, scale = 1 for z_i ~ N(0, 1), x_i ~ N(z_i, 1), q(z_i) = N(loc_i, s):
    dL/dloc_i = x_i - 2 loc_i, dL/ds = sum_i (1/s - 2 s); times the poutine scale."""
    return {"loc": scale_factor * DATA.clone(),
            "scale": scale_factor * torch.tensor([-2.0], dtype=torch.float64)}


CASES = [("jensen_sampled", subsample, scale) for subsample in (False, True)
         for scale in (1.0, 2.0)] + [(loss, True, 2.0) for loss in ("jensen_analytic",
                                                                   "analytic_kl")]


@pytest.mark.parametrize("loss, subsample, scale", CASES)
def test_nonreparameterized_guide_in_a_subsampled_scaled_plate(loss, subsample, scale):
    size = 1 if subsample else 2

    def model():
        with pyro.plate("data", 2, subsample_size=size) as idx:
            z = pyro.sample("z", fakes.NonreparameterizedNormal(0.0, 1.0))
            pyro.sample("x", fakes.NonreparameterizedNormal(z, 1.0), obs=DATA[idx])

    def guide():
        s = pyro.param("scale", lambda: torch.ones(1, dtype=torch.float64))
        loc = pyro.param("loc", lambda: torch.zeros(2, dtype=torch.float64))
        with pyro.plate("data", 2, subsample_size=size) as idx:
            pyro.sample("z", fakes.NonreparameterizedNormal(loc[idx], s))

    model, guide = poutine.scale(model, scale=scale), poutine.scale(guide, scale=scale)
    elbo = LOSSES[loss](num_particles=200, vectorize_particles=True, max_plate_nesting=1)
    elbo.loss(model, guide)
    names, leaves = zip(*sorted(pyro.get_param_store().named_parameters()))
    rows = {name: [] for name in names}
    for _ in range(150):
        grads = torch.autograd.grad(elbo.differentiable_loss(model, guide), leaves)
        for name, g in zip(names, grads):
            rows[name].append(-g)
    exact = _exact(scale)
    for name in names:
        assert_mean_close(torch.stack(rows[name]), exact[name], what=f"{loss} dL/d{name}")


def test_nuisance_sites_in_reversed_order_do_not_meet_the_plates_score():
    """The guide samples the global nuisance sites around the plate in the opposite order to
    the model: a sample-order rule would let z's score meet two of them; the data flow lets
    it meet z's own terms and x only, and the gradient is the exact one."""
    def model():
        data_plate = pyro.plate("data", 2)  # one plate, entered twice
        pyro.sample("nuisance_a", fakes.NonreparameterizedNormal(0.0, 1.0))
        with data_plate:
            z = pyro.sample("z", fakes.NonreparameterizedNormal(0.0, 1.0))
        pyro.sample("nuisance_b", fakes.NonreparameterizedNormal(2.0, 3.0))
        with data_plate:
            pyro.sample("x", fakes.NonreparameterizedNormal(z, 1.0), obs=DATA)
        pyro.sample("nuisance_c", fakes.NonreparameterizedNormal(4.0, 5.0))

    def guide():
        loc = pyro.param("loc", lambda: torch.zeros(2, dtype=torch.float64))
        s = pyro.param("scale", lambda: torch.ones(1, dtype=torch.float64))
        pyro.sample("nuisance_c", fakes.NonreparameterizedNormal(4.0, 5.0))
        with pyro.plate("data", 2):
            pyro.sample("z", fakes.NonreparameterizedNormal(loc, s))
        pyro.sample("nuisance_b", fakes.NonreparameterizedNormal(2.0, 3.0))
        pyro.sample("nuisance_a", fakes.NonreparameterizedNormal(0.0, 1.0))

    elbo = JensenELBO(entropy="sampled", num_particles=200, vectorize_particles=True,
                      max_plate_nesting=1)
    assert score_downstream(elbo, model, guide)["z"] == {"z", "x"}
    names, leaves = zip(*sorted(pyro.get_param_store().named_parameters()))
    rows = {name: [] for name in names}
    for _ in range(60):
        for name, g in zip(names, torch.autograd.grad(elbo.differentiable_loss(model, guide),
                                                      leaves)):
            rows[name].append(-g)
    for name, exact in _exact(1.0).items():
        assert_mean_close(torch.stack(rows[name]), exact, what=f"dL/d{name}")
