"""Every loss runs on every available device and dtype (CUDA is skipped cleanly without one).

Nothing in the losses may create a tensor without the device of the data or parameters: the
loss, its gradients and its decomposition stay on the data's device.
"""

import math

import pyro
import pytest
import torch

from pyro_elbo_ext import AnalyticKLELBO, HardAttentionELBO, JensenELBO
from pyro_elbo_ext.problems import get_problem

CASES = {
    "jensen_path": ("normal_normal", lambda p: JensenELBO(entropy="path", num_particles=4,
                                                          vectorize_particles=True,
                                                          max_plate_nesting=1)),
    "jensen_discrete": ("tiny_discrete", lambda p: JensenELBO(max_plate_nesting=1)),
    "analytic_kl": ("beta_bernoulli", lambda p: AnalyticKLELBO(max_plate_nesting=1)),
    "analytic_kl_discrete": ("tiny_discrete", lambda p: AnalyticKLELBO(max_plate_nesting=1)),
    "hard_attention_enum": ("random_attention", lambda p: HardAttentionELBO(
        estimator="enum", max_plate_nesting=p.max_plate_nesting)),
    "hard_attention_learned": ("random_attention", lambda p: HardAttentionELBO(
        estimator="reinforce", baseline="learned", max_plate_nesting=p.max_plate_nesting)),
    "hard_attention_loo": ("random_attention", lambda p: HardAttentionELBO(
        estimator="reinforce", baseline="leave_one_out", num_particles=3,
        vectorize_particles=True, max_plate_nesting=p.max_plate_nesting)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_gradients_and_decomposition_stay_on_the_device(case, dtype, device):
    problem_name, make = CASES[case]
    problem = get_problem(problem_name, dtype=dtype, device=device)
    problem.set_params()
    elbo = make(problem)
    for _ in range(2):  # the second call runs with the state the first one created
        loss = elbo.differentiable_loss(problem.model, problem.guide, *problem.args)
    assert loss.device.type == device.type and loss.dtype == dtype
    assert math.isfinite(float(loss.detach()))
    params = [p.unconstrained() for p in pyro.get_param_store().values()]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    assert any(g is not None for g in grads)
    for g in grads:
        if g is not None:
            assert g.device.type == device.type and bool(g.isfinite().all())
    assert math.isfinite(elbo.decompose(problem.model, problem.guide, *problem.args).elbo)
