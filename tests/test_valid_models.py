"""A table of valid and invalid (model, guide) pairs run through every loss.

In the style of Pyro's ``tests/infer/test_valid_models.py``: each row names a model/guide pair
and, for each loss, either ``None`` (it must run and give a finite loss and finite gradients) or
the pattern the error message must match (the site or argument, and what to do).
"""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints

from pyro_elbo_ext import AnalyticKLELBO, HardAttentionELBO, JensenELBO, empty_guide

LOSSES = {
    "jensen": lambda: JensenELBO(max_plate_nesting=2),
    "analytic_kl": lambda: AnalyticKLELBO(max_plate_nesting=2),
    "ha_enum": lambda: HardAttentionELBO(estimator="enum", max_plate_nesting=2),
    "ha_reinforce": lambda: HardAttentionELBO(
        estimator="reinforce", baseline="moving_average", max_plate_nesting=2
    ),
}
DATA = torch.tensor([0.3, -1.2, 0.8, 2.0])
MISSING = r"model latent site '{}' is not sampled by the guide.*HardAttentionELBO"


def _loc(name="loc", init=0.0):
    return pyro.param(name, torch.tensor(init))


def _scale(name="scale"):
    return pyro.param(name, torch.tensor(0.8), constraint=constraints.positive)


# ------------------------------------------------------------------------------- the cases
def global_model():
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    with pyro.plate("data", 4):
        pyro.sample("obs", dist.Normal(z, 1.0), obs=DATA)


def global_guide():
    pyro.sample("z", dist.Normal(_loc(), _scale()))


def subsample_model():
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    with pyro.plate("data", 4, subsample_size=2) as idx:
        local = pyro.sample("local", dist.Normal(z, 1.0))
        pyro.sample("obs", dist.Normal(local, 0.5), obs=DATA[idx])


def subsample_guide():
    pyro.sample("z", dist.Normal(_loc(), _scale()))
    locs = pyro.param("locs", torch.zeros(4))
    with pyro.plate("data", 4, subsample_size=2) as idx:
        pyro.sample("local", dist.Normal(locs[idx], 0.5))


def discrete_model():
    c = pyro.sample("c", dist.Bernoulli(0.4))
    with pyro.plate("data", 4):
        z = pyro.sample("z", dist.Categorical(torch.tensor([0.5, 0.3, 0.2])))
        pyro.sample("obs", dist.Normal(z.float() + c, 1.0), obs=DATA)


def discrete_guide():
    pyro.sample("c", dist.Bernoulli(pyro.param("qc", torch.tensor(0.5),
                                               constraint=constraints.unit_interval)))
    with pyro.plate("data", 4):
        pyro.sample("z", dist.Categorical(logits=pyro.param("qz", torch.zeros(4, 3))))


def auxiliary_guide():
    u = pyro.sample("u", dist.Normal(_loc("u_loc"), 1.0), infer={"is_auxiliary": True})
    pyro.sample("z", dist.Normal(u, _scale()))


def nested_model():
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    with pyro.plate("groups", 2, dim=-2):
        g = pyro.sample("g", dist.Normal(z, 1.0))
        with pyro.plate("data", 4, dim=-1):
            pyro.sample("obs", dist.Normal(g, 1.0), obs=DATA.expand(2, 4))


def nested_guide():
    pyro.sample("z", dist.Normal(_loc(), _scale()))
    with pyro.plate("groups", 2, dim=-2):
        pyro.sample("g", dist.Normal(pyro.param("g_loc", torch.zeros(2, 1)), 0.5))


def attention_model():
    logits = pyro.param("att", torch.zeros(3))
    with pyro.plate("data", 4):
        where = pyro.sample("where", dist.Categorical(logits=logits))
        means = pyro.param("means", torch.tensor([-1.0, 0.0, 1.0]))
        pyro.sample("obs", dist.Normal(means[where], 1.0), obs=DATA)


def continuous_attention_model():
    with pyro.plate("data", 4):
        shift = pyro.sample("shift", dist.Normal(_loc("shift_loc"), 1.0))
        pyro.sample("obs", dist.Normal(shift, 1.0), obs=DATA)


def huge_support_model():
    logits = pyro.param("logits", torch.zeros(500))
    with pyro.plate("data", 4):
        a = pyro.sample("a", dist.Categorical(logits=logits))
        b = pyro.sample("b", dist.Categorical(logits=logits))
        pyro.sample("obs", dist.Normal((a - b).float() / 100, 1.0), obs=DATA)


def extra_site_guide():
    global_guide()
    pyro.sample("extra", dist.Normal(0.0, 1.0))


def enumerated_continuous_guide():
    pyro.sample("z", dist.Normal(_loc(), _scale()), infer={"enumerate": "parallel"})


def bad_shape_model():
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    with pyro.plate("data", 4):
        pyro.sample("obs", dist.Normal(z, torch.ones(3)), obs=torch.zeros(3))


def nan_data_model():
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    with pyro.plate("data", 4):
        pyro.sample("obs", dist.Normal(z, 1.0), obs=torch.tensor([0.0, float("nan"), 1.0, 2.0]))


VALID = {name: None for name in LOSSES}
CASES = {
    # valid for every loss
    "global latent": (global_model, global_guide, VALID),
    "subsampled plate with local latents": (subsample_model, subsample_guide, VALID),
    "discrete global and local guide sites": (discrete_model, discrete_guide, VALID),
    "auxiliary guide site": (global_model, auxiliary_guide, VALID),
    "nested plates": (nested_model, nested_guide, VALID),
    # latents drawn from the model: only HardAttentionELBO
    "discrete attention site": (attention_model, empty_guide, {
        "jensen": MISSING.format("where"), "analytic_kl": MISSING.format("where"),
        "ha_enum": None, "ha_reinforce": None}),
    "continuous attention site": (continuous_attention_model, empty_guide, {
        "jensen": MISSING.format("shift"), "analytic_kl": MISSING.format("shift"),
        "ha_enum": r"site 'shift' has a Normal distribution.*cannot be enumerated.*reinforce",
        "ha_reinforce": None}),
    "enumeration too large": (huge_support_model, empty_guide, {
        "jensen": MISSING.format("a"), "analytic_kl": MISSING.format("a"),
        "ha_enum": r"250000 joint configurations.*max_enum_size=100000",
        "ha_reinforce": None}),
    # invalid for every loss
    "guide site absent from the model": (global_model, extra_site_guide, {
        name: r"guide site 'extra' does not appear in the model.*is_auxiliary"
        for name in LOSSES}),
    # as Pyro: a warning that enumeration needs TraceEnum_ELBO, then the site is sampled
    "enumerated continuous guide site": (global_model, enumerated_continuous_guide, VALID),
    "batch shape disagrees with the plate": (bad_shape_model, global_guide, {
        name: r"Shape mismatch inside plate\('data'\) at site obs" for name in LOSSES}),
    "NaN in observed data": (nan_data_model, global_guide, {
        name: r"(computing log_prob at site 'obs'|site 'obs' \(Normal\): cannot evaluate)"
        for name in LOSSES}),
}


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
@pytest.mark.parametrize("case", sorted(CASES))
def test_valid_and_invalid_pairs(case, loss_name):
    model, guide, expected = CASES[case]
    elbo = LOSSES[loss_name]()
    if expected[loss_name] is not None:
        with pytest.raises(ValueError, match=expected[loss_name]):
            elbo.differentiable_loss(model, guide)
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Found sample sites configured for enumeration")
        warnings.filterwarnings("ignore", ".*you need to use TraceEnum_ELBO")
        loss = elbo.differentiable_loss(model, guide)
    assert math.isfinite(float(loss.detach()))
    params = [p.unconstrained() for p in pyro.get_param_store().values()]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    assert any(g is not None for g in grads), "no parameter received a gradient"
    assert all(bool(g.isfinite().all()) for g in grads if g is not None)


@pytest.mark.parametrize(
    "make, pattern",
    [
        (lambda: JensenELBO(num_particles=0), r"num_particles must be an integer >= 1"),
        (lambda: AnalyticKLELBO(num_particles=-2), r"num_particles must be an integer >= 1"),
        (lambda: HardAttentionELBO(num_particles=0), r"num_particles must be an integer >= 1"),
        (lambda: JensenELBO(entropy="exact"), r"entropy must be one of"),
        (lambda: AnalyticKLELBO(kl_weight=-0.5), r"kl_weight"),
        (lambda: HardAttentionELBO(estimator="reinforce", decay=1.5), r"decay"),
        (lambda: HardAttentionELBO(estimator="reinforce", baseline="median"),
         r"baseline must be None or one of"),
        (lambda: HardAttentionELBO(estimator="reinforce", reward="accuracy"),
         r"reward must be one of"),
        (lambda: HardAttentionELBO(estimator="sampled"), r"estimator must be one of"),
        (lambda: HardAttentionELBO(estimator="reinforce", baseline="leave_one_out"),
         r"leave_one_out' needs num_particles >= 2"),
        (lambda: HardAttentionELBO(estimator="reinforce", entropy_weight=-1.0),
         r"entropy_weight must be a finite number >= 0"),
    ],
)
def test_invalid_hyper_parameters_name_the_argument(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make()


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
def test_duplicate_site_names_are_refused(loss_name):
    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("z", dist.Normal(0.0, 1.0))

    def guide():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(RuntimeError, match=r"Multiple sample sites named 'z'"):
        LOSSES[loss_name]().differentiable_loss(model, guide)
