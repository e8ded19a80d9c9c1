"""HardAttentionELBO: exact enumeration, unbiased REINFORCE with baselines, gap, errors, digits.

Exact references are written here by hand (explicit loops over location sequences), never
computed by the code under test.
"""

import itertools
import math
import time
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceEnum_ELBO, config_enumerate

from pyro_elbo_ext.elbos import AnalyticKLELBO, JensenELBO
from pyro_elbo_ext.elbos.hard_attention import HardAttentionELBO, empty_guide
from pyro_elbo_ext.problems.hard_attention import (
    cluttered_digits,
    random_attention,
    train_hard_attention,
)
from tests.mc import K_SE, assert_mean_close, draw_loss_and_grads

BASELINE_CHOICES = [None, "moving_average", "learned", "leave_one_out"]


@pytest.fixture(autouse=True)
def _one_thread_float64():
    """Double precision for exact comparisons; one thread (tests run concurrently on 2 cores)."""
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- hand references
def hand_sequences(problem, params):
    """For every location sequence s: p(s | x_i) and log p(y_i | s), by explicit loops."""
    x, glimpses, y = problem.args
    num_data, num_locations, _ = glimpses.shape
    num_glimpses = params["cls_w"].shape[0]
    probs, log_lik = [], []
    for seq in itertools.product(range(num_locations), repeat=num_glimpses):
        p_seq, ll_seq = [], []
        for i in range(num_data):
            p = torch.ones(())
            logits_y = torch.zeros(params["cls_w"].shape[-1])
            for t, loc in enumerate(seq):
                logits = x[i] @ params["att_w"]
                if t > 0:
                    logits = logits + params["trans"][seq[t - 1]]
                p = p * torch.exp(logits[loc]) / torch.exp(logits).sum()
                logits_y = logits_y + glimpses[i, loc] @ params["cls_w"][t]
            p_seq.append(p)
            ll_seq.append(logits_y[y[i]] - torch.log(torch.exp(logits_y).sum()))
        probs.append(torch.stack(p_seq))
        log_lik.append(torch.stack(ll_seq))
    return torch.stack(probs), torch.stack(log_lik)  # (num_sequences, num_data) each


def hand_F(problem, params):
    probs, log_lik = hand_sequences(problem, params)
    return (probs * log_lik).sum()


def hand_F_and_grad(problem):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in problem.init_params.items()}
    F = hand_F(problem, leaves)
    grads = torch.autograd.grad(F, list(leaves.values()))
    return F.detach(), dict(zip(leaves, grads))


def make_problem(num_glimpses, **options):
    problem = random_attention(num_glimpses=num_glimpses, **options)
    problem.set_params()
    return problem


# ---------------------------------------------------------------------------- enum is exact
@pytest.mark.parametrize("num_glimpses", [1, 2])
def test_enum_equals_hand_computation(num_glimpses):
    problem = make_problem(num_glimpses, num_data=3, num_locations=4)
    F, dF = hand_F_and_grad(problem)
    elbo = HardAttentionELBO(estimator="enum", max_plate_nesting=1)
    loss = elbo.differentiable_loss(problem.model, problem.guide, *problem.args)
    leaves = problem.unconstrained_params()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    assert torch.allclose(-loss.detach(), F, rtol=1e-12, atol=1e-12)
    for name, g in zip(leaves, grads):
        assert torch.allclose(-g, dF[name], rtol=1e-10, atol=1e-12), name
    # the float interface agrees and the guide may be any guide that samples nothing
    assert math.isclose(elbo.loss(problem.model, empty_guide, *problem.args), -float(F),
                        rel_tol=1e-12)


def test_enum_with_vectorized_particles_and_svi_grads():
    """Vectorized particles do not change the exact value; loss_and_grads fills .grad."""
    problem = make_problem(2)
    F, dF = hand_F_and_grad(problem)
    elbo = HardAttentionELBO(estimator="enum", num_particles=3, vectorize_particles=True,
                             max_plate_nesting=1)
    loss = elbo.loss_and_grads(problem.model, problem.guide, *problem.args)
    assert math.isclose(loss, -float(F), rel_tol=1e-10)
    for name, leaf in problem.unconstrained_params().items():
        assert torch.allclose(-leaf.grad, dF[name], rtol=1e-10, atol=1e-12), name


def test_entropy_bonus_enum_matches_hand():
    problem = make_problem(1)
    weight = 0.3
    params = problem.init_params
    x = problem.args[0]
    p = torch.softmax(x @ params["att_w"], -1)
    entropy = -(p * p.log()).sum()
    elbo = HardAttentionELBO(estimator="enum", entropy_weight=weight, max_plate_nesting=1)
    value = -elbo.loss(problem.model, problem.guide, *problem.args)
    assert math.isclose(value, float(hand_F(problem, params) + weight * entropy), rel_tol=1e-12)
    decomposition = elbo.decompose(problem.model, problem.guide, *problem.args)
    assert math.isclose(decomposition.by_kind()["bonus"], weight * float(entropy), rel_tol=1e-12)
    assert any("bonus" in note for note in decomposition.notes)


# ---------------------------------------------------------------------------- gap = KL
@pytest.mark.parametrize("num_glimpses", [1, 2])
def test_log_evidence_gap_is_kl(num_glimpses):
    problem = make_problem(num_glimpses)
    probs, log_lik = hand_sequences(problem, problem.init_params)
    log_evidence = torch.log((probs * log_lik.exp()).sum(0)).sum()
    posterior = probs * log_lik.exp() / (probs * log_lik.exp()).sum(0)
    kl = (probs * (probs.log() - posterior.log())).sum()
    for estimator in ("enum", "reinforce"):
        elbo = HardAttentionELBO(estimator=estimator, max_plate_nesting=1)
        d = elbo.decompose(problem.model, problem.guide, *problem.args)
        assert d.log_evidence >= d.exact_bound
        assert math.isclose(d.log_evidence, float(log_evidence), rel_tol=1e-10)
        assert math.isclose(d.exact_bound, float((probs * log_lik).sum()), rel_tol=1e-10)
        assert math.isclose(d.gap, float(kl), rel_tol=1e-8, abs_tol=1e-10)
        assert "log p(y)" in str(d)


@pytest.mark.parametrize("estimator", ["enum", "reinforce"])
def test_decompose_computes_everything_on_one_minibatch(estimator):
    """With a subsampling plate, the estimate and the exact F, log p(y) and gap of one
    ``decompose`` call all use the same minibatch; for ``enum`` the estimate then equals the
    exact F."""
    x = torch.randn(12, 2)
    y = torch.randn(12)
    seen = []

    def model(x, y):
        w = pyro.param("w", torch.tensor([[0.5, -1.0, 0.2], [0.3, 0.8, -0.6]]))
        means = pyro.param("means", torch.tensor([-1.0, 0.0, 2.0]))
        with pyro.plate("data", 12, subsample_size=4) as idx:
            seen.append(idx.clone())
            where = pyro.sample("where", dist.Categorical(logits=x[idx] @ w))
            pyro.sample("y", dist.Normal(means[where], 1.0), obs=y[idx])

    elbo = HardAttentionELBO(estimator=estimator, max_plate_nesting=1)
    for seed in range(3):
        pyro.set_rng_seed(seed)
        seen.clear()
        d = elbo.decompose(model, empty_guide, x, y)
        # the estimate, the exact F and log p(y); a new plan's data-flow analysis replays once
        assert len(seen) == (4 if seed == 0 and estimator == "reinforce" else 3)
        assert all(torch.equal(idx, seen[0]) for idx in seen)
        assert d.log_evidence >= d.exact_bound
        if estimator == "enum":
            assert math.isclose(d.elbo, d.exact_bound, rel_tol=1e-6)


# ---------------------------------------------------------------------------- reinforce
def _train_learned_baseline(elbo, problem, steps=300):
    """Let the baseline network regress on the reward (the model's parameters stay fixed):
    every training call takes one step of the network's own optimizer."""
    for _ in range(steps):
        elbo.differentiable_loss(problem.model, problem.guide, *problem.args)


@pytest.fixture(scope="module")
def reinforce_draws():
    """1500 gradient draws per baseline on the two-glimpse model (4 vectorized particles).

    ``init_scale=0.5`` keeps every location sequence reasonably probable, so that no gradient
    coordinate is driven by rare events (whose sample standard error is unreliable).
    """
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    pyro.set_rng_seed(1)
    problem = make_problem(2, init_scale=0.5)
    F, dF = hand_F_and_grad(problem)
    out = {}
    for baseline in BASELINE_CHOICES:
        elbo = HardAttentionELBO(estimator="reinforce", baseline=baseline, num_particles=4,
                                 vectorize_particles=True, max_plate_nesting=1)
        if baseline == "learned":
            _train_learned_baseline(elbo, problem)
        if baseline == "moving_average":  # warm the average up
            for _ in range(50):
                elbo.differentiable_loss(problem.model, problem.guide, *problem.args)
        with pyro.validation_enabled(False):
            values, grads = draw_loss_and_grads(elbo, problem, 1500)
        out[baseline] = (values, grads)
    pyro.clear_param_store()
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)
    return F, dF, out


@pytest.mark.parametrize("baseline", BASELINE_CHOICES)
def test_reinforce_gradient_is_unbiased(reinforce_draws, baseline):
    F, dF, out = reinforce_draws
    values, grads = out[baseline]
    assert_mean_close(values, F, what=f"F, baseline={baseline}")
    for name, draws in grads.items():
        assert_mean_close(draws, dF[name], k=K_SE, what=f"d{name}, baseline={baseline}")


@pytest.mark.parametrize("baseline", ["moving_average", "learned", "leave_one_out"])
def test_baselines_reduce_score_function_variance(reinforce_draws, baseline):
    """The attention parameters get score-function gradients only: compare their variance."""
    _, _, out = reinforce_draws

    def variance(b):
        grads = out[b][1]
        return sum(float(grads[name].var(0).sum()) for name in ("att_w", "trans"))

    ratio = variance(baseline) / variance(None)
    print(f"variance ratio {baseline}: {ratio:.3f}")
    assert ratio < 0.7, ratio


def test_zero_one_reward_is_expected_accuracy_gradient():
    """With reward='zero_one' the attention gradient is that of E_p(l)[1(correct)]."""
    pyro.set_rng_seed(2)
    problem = make_problem(1)
    x, glimpses, y = problem.args
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in problem.init_params.items()}
    probs = torch.softmax(x @ leaves["att_w"], -1)  # (N, L)
    correct = torch.stack([
        ((glimpses[:, loc] @ leaves["cls_w"][0]).argmax(-1) == y).double()
        for loc in range(glimpses.shape[1])
    ], -1)
    (d_accuracy,) = torch.autograd.grad((probs * correct).sum(), [leaves["att_w"]])
    # the classifier still learns F by backpropagation: E_p(l)[d log p(y | l) / d cls_w]
    log_py = torch.stack([
        torch.log_softmax(glimpses[:, loc] @ leaves["cls_w"][0], -1).gather(-1, y[:, None])[:, 0]
        for loc in range(glimpses.shape[1])
    ], -1)
    (d_classifier,) = torch.autograd.grad((probs.detach() * log_py).sum(), [leaves["cls_w"]])
    elbo = HardAttentionELBO(estimator="reinforce", reward="zero_one", num_particles=8,
                             vectorize_particles=True, max_plate_nesting=1)
    with pyro.validation_enabled(False):
        _, grads = draw_loss_and_grads(elbo, problem, 600)
    assert_mean_close(grads["att_w"], d_accuracy, what="zero_one attention gradient")
    assert_mean_close(grads["cls_w"], d_classifier, what="zero_one classifier gradient")
    assert any("zero_one" in n for n in elbo.decompose(problem.model, problem.guide,
                                                       *problem.args).notes)


# ---------------------------------------------------------------------------- state
def test_moving_average_state_round_trip():
    problem = make_problem(2)
    elbo = HardAttentionELBO(estimator="reinforce", baseline="moving_average", decay=0.8,
                             normalize=True, max_plate_nesting=1)
    for _ in range(5):
        elbo.differentiable_loss(problem.model, problem.guide, *problem.args)
    state = elbo.state_dict()
    fresh = HardAttentionELBO(estimator="reinforce", baseline="moving_average", decay=0.8,
                              normalize=True, max_plate_nesting=1)
    fresh.load_state_dict(state)
    like = torch.zeros(())
    for site in ("l0", "l1"):
        assert float(fresh.learning_signal.baseline.value(site, like)) == float(
            elbo.learning_signal.baseline.value(site, like)) != 0.0
    assert fresh.learning_signal.baseline.decay == 0.8
    assert {key[0] for key in fresh.learning_signal.normalizer.slots} == {"l0", "l1"}
    # evaluation does not move the average
    before = float(elbo.learning_signal.baseline.value("l0", like))
    elbo.loss(problem.model, problem.guide, *problem.args)
    elbo.decompose(problem.model, problem.guide, *problem.args)
    assert float(elbo.learning_signal.baseline.value("l0", like)) == before
    # nothing of the moving average lives in the param store
    assert all(name in problem.init_params for name in pyro.get_param_store().keys())


def test_learned_baseline_trains_under_plain_svi_and_round_trips():
    pyro.set_rng_seed(3)
    problem = make_problem(1, num_data=20)
    elbo = HardAttentionELBO(estimator="reinforce", baseline="learned", num_particles=4,
                             vectorize_particles=True, max_plate_nesting=1)
    svi = pyro.infer.SVI(problem.model, problem.guide, pyro.optim.Adam({"lr": 0.02}), elbo)
    svi.step(*problem.args)
    net = elbo.learning_signal.baseline
    x = problem.args[0]

    def regression_error():
        torch.manual_seed(0)
        reward = []
        with torch.no_grad():
            for _ in range(200):  # the reward's mean per example, by sampling
                tr = pyro.poutine.trace(problem.model).get_trace(*problem.args)
                reward.append(tr.nodes["y"]["fn"].log_prob(tr.nodes["y"]["value"]))
            target = torch.stack(reward).mean(0)
            return float(((net.predict("l0", x) - target) ** 2).mean())

    before = regression_error()
    for _ in range(300):
        svi.step(*problem.args)
    after = regression_error()
    assert after < 0.25 * before, (before, after)
    # it trained without a single entry in Pyro's global param store (only the model's own)
    assert set(pyro.get_param_store().keys()) == set(problem.init_params), \
        sorted(pyro.get_param_store().keys())
    fresh = HardAttentionELBO(estimator="reinforce", baseline="learned", num_particles=4,
                              vectorize_particles=True, max_plate_nesting=1)
    fresh.load_state_dict(elbo.state_dict())
    assert torch.equal(fresh.learning_signal.baseline.predict("l0", x), net.predict("l0", x))


# ---------------------------------------------------------------------------- errors
def test_error_continuous_site_with_enum():
    def model(data):
        with pyro.plate("data", 2):
            loc = pyro.sample("where", dist.Normal(torch.zeros(2), 1.0))
            pyro.sample("y", dist.Normal(loc, 1.0), obs=data)

    elbo = HardAttentionELBO(estimator="enum", max_plate_nesting=1)
    with pytest.raises(ValueError, match=r"'where'.*cannot be enumerated.*estimator='reinforce'"):
        elbo.loss(model, empty_guide, torch.zeros(2))


def test_error_support_too_large():
    problem = make_problem(2, num_locations=4)
    elbo = HardAttentionELBO(estimator="enum", max_enum_size=10, max_plate_nesting=1)
    with pytest.raises(ValueError, match=r"16 joint configurations.*max_enum_size=10"):
        elbo.loss(problem.model, problem.guide, *problem.args)


def test_error_leave_one_out_with_one_particle():
    with pytest.raises(ValueError, match=r"leave_one_out.*num_particles >= 2.*num_particles=1"):
        HardAttentionELBO(estimator="reinforce", baseline="leave_one_out", num_particles=1)
    with pytest.raises(ValueError, match=r"vectorize_particles=True"):
        HardAttentionELBO(estimator="reinforce", baseline="leave_one_out", num_particles=4)


def test_error_unknown_reward_and_other_arguments():
    with pytest.raises(ValueError, match=r"reward must be one of .*'log_likelihood'.*accuracy"):
        HardAttentionELBO(estimator="reinforce", reward="accuracy")
    with pytest.raises(ValueError, match=r"estimator must be one of"):
        HardAttentionELBO(estimator="exact")
    with pytest.raises(ValueError, match=r"baseline must be None or one of"):
        HardAttentionELBO(estimator="reinforce", baseline="mean")
    with pytest.raises(ValueError, match=r"only applies to estimator='reinforce'"):
        HardAttentionELBO(estimator="enum", baseline="moving_average")
    with pytest.raises(ValueError, match=r"decay must be"):
        HardAttentionELBO(estimator="reinforce", baseline="moving_average", decay=1.0)
    with pytest.raises(ValueError, match=r"entropy_weight must be"):
        HardAttentionELBO(entropy_weight=-1.0)


def test_error_learned_baseline_without_input():
    def model(y):
        loc = pyro.sample("where", dist.Categorical(logits=torch.zeros(3)))
        pyro.sample("y", dist.Normal(loc.double(), 1.0), obs=y)

    elbo = HardAttentionELBO(estimator="reinforce", baseline="learned")
    with pytest.raises(ValueError, match=r"'where'.*baseline_input"):
        elbo.differentiable_loss(model, empty_guide, torch.tensor(1.0))


# ------------------------------------------------------- a mixture marked for Pyro's enumeration
MIXTURE_DATA = torch.tensor([-2.1, -1.7, -2.4, 1.9, 2.3, 2.0])


@config_enumerate
def gaussian_mixture(data):
    """Pyro's Gaussian-mixture tutorial model: the assignment is meant to be summed out."""
    weights = pyro.sample("weights", dist.Dirichlet(0.5 * torch.ones(2)))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 2.0))
    with pyro.plate("components", 2):
        locs = pyro.sample("locs", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(data)):
        assignment = pyro.sample("assignment", dist.Categorical(weights))
        pyro.sample("obs", dist.Normal(locs[assignment], scale), obs=data)


def mixture_guide(data):
    """Point masses on the globals (AutoDelta's role in the tutorial), at fixed values."""
    pyro.sample("weights", dist.Delta(torch.tensor([0.3, 0.7]), event_dim=1))
    pyro.sample("scale", dist.Delta(torch.tensor(0.8)))
    with pyro.plate("components", 2):
        pyro.sample("locs", dist.Delta(torch.tensor([-2.0, 2.0])))


def hand_mixture_objectives(data):
    """(F, log p(x)) at the guide's values, by explicit loops over points and components:
    F = sum_i sum_k w_k log N(x_i | loc_k, s) and log p(x) = sum_i log sum_k w_k N(...), each
    plus the globals' log prior (the point masses' entropy is 0)."""
    w, s, locs = [0.3, 0.7], 0.8, [-2.0, 2.0]
    prior = (dist.Dirichlet(0.5 * torch.ones(2)).log_prob(torch.tensor(w))
             + dist.LogNormal(0.0, 2.0).log_prob(torch.tensor(s))
             + sum(dist.Normal(0.0, 10.0).log_prob(torch.tensor(m)) for m in locs))
    F = log_px = prior
    for x in data.tolist():
        logs = [float(dist.Normal(m, s).log_prob(torch.tensor(x))) for m in locs]
        F = F + sum(wk * lk for wk, lk in zip(w, logs))
        log_px = log_px + math.log(sum(wk * math.exp(lk) for wk, lk in zip(w, logs)))
    return float(F), float(log_px)


@pytest.mark.parametrize("loss", [JensenELBO, AnalyticKLELBO])
def test_mixture_refusal_names_traceenum_elbo(loss):
    """A discrete model latent the guide does not sample: the error says to keep Pyro's
    TraceEnum_ELBO for summing it out (and when HardAttentionELBO is the loss instead)."""
    with pytest.raises(ValueError, match="'assignment' is not sampled by the guide") as error:
        loss(max_plate_nesting=1).loss(gaussian_mixture, mixture_guide, MIXTURE_DATA)
    message = str(error.value)
    assert "keep Pyro's TraceEnum_ELBO" in message and "log sum_z p(x, z)" in message
    assert "HardAttentionELBO" in message and "E_p(z)[log p(x | z)]" in message


@pytest.mark.parametrize("estimator", ["enum", "reinforce"])
def test_site_marked_for_enumeration_warns_which_objective(estimator):
    """HardAttentionELBO on a site marked for Pyro's enumeration warns that it maximizes F,
    not log p(x); and F is what it computes (by hand), while TraceEnum_ELBO gives log p(x)."""
    F, log_px = hand_mixture_objectives(MIXTURE_DATA)
    loss = HardAttentionELBO(estimator=estimator, max_plate_nesting=1)
    with pytest.warns(UserWarning, match="'assignment' is marked infer=") as record:
        value = loss.loss(gaussian_mixture, mixture_guide, MIXTURE_DATA)
    message = str(record[0].message)
    assert "TraceEnum_ELBO" in message
    assert "log p(x) = log sum_assignment p(x, assignment)" in message
    assert "F = E_p(assignment)[log p(x | assignment)] <= log p(x)" in message
    if estimator == "enum":  # the stated objective, exactly
        assert -value == pytest.approx(F, rel=1e-12)
    pyro_value = TraceEnum_ELBO(max_plate_nesting=1).loss(gaussian_mixture, mixture_guide,
                                                          MIXTURE_DATA)
    assert -pyro_value == pytest.approx(log_px, rel=1e-12)
    assert log_px - F > 1.0  # the two objectives differ: the warning is not pedantry


def test_unmarked_attention_site_does_not_warn():
    problem = make_problem(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HardAttentionELBO(estimator="enum").loss(problem.model, empty_guide, *problem.args)


# ---------------------------------------------------------------------------- digits
@pytest.mark.parametrize("estimator, baseline, steps", [
    ("enum", None, 500),
    ("reinforce", "moving_average", 1500),
])
def test_cluttered_digits_reduced_trains(estimator, baseline, steps):
    torch.set_default_dtype(torch.float32)
    start = time.perf_counter()
    result = train_hard_attention(estimator, baseline, num_steps=steps, num_test=500)
    elapsed = time.perf_counter() - start
    print(estimator, baseline, result["accuracy"], result["seconds"])
    assert result["accuracy"] > 3 * result["chance"], result["accuracy"]
    assert elapsed < 60


def test_cluttered_digits_problem_record():
    torch.set_default_dtype(torch.float32)
    problem = cluttered_digits(canvas=20, num_train=50, num_test=20)
    coarse, patches, labels = problem.args
    assert problem.notes["num_locations"] == 16 and patches.shape == (50, 16, 64)
    assert coarse.shape == (50, 100) and labels.shape == (50,)
    # the glimpse marked as the digit's location holds more ink than the average glimpse
    ink = patches.sum(-1)
    true = problem.notes["true_location"]["train"]
    above = ink[torch.arange(50), true] > ink.mean(-1)
    assert float(above.double().mean()) > 0.9


@pytest.mark.slow
def test_cluttered_digits_full_size():
    torch.set_default_dtype(torch.float32)
    for estimator, baseline, bonus in (("enum", None, 0.0), ("reinforce", "learned", 0.1)):
        result = train_hard_attention(estimator, baseline, num_steps=3000, canvas=20,
                                      elbo_options={"entropy_weight": bonus})
        print(estimator, baseline, result["accuracy"], result["seconds"])
        assert result["accuracy"] > 5 * result["chance"]


# ------------------------------------ model-drawn sites: continuous, sequential; reward's scope
@pytest.mark.parametrize("baseline", [None, "moving_average"])
def test_continuous_model_drawn_site_is_pathwise_and_unbiased(baseline):
    """l ~ N(0.5, s), y ~ N(l, 1), y = 2: F = -0.5 log 2pi - ((y - 0.5)^2 + s^2) / 2.

    dF/d(log s) = -s^2 exactly; a score term on top of the pathwise gradient would bias it.
    """

    def model():
        s = pyro.param("s", torch.tensor(0.7, dtype=torch.float64),
                       constraint=torch.distributions.constraints.positive)
        where = pyro.sample("l", dist.Normal(torch.tensor(0.5, dtype=torch.float64), s))
        pyro.sample("y", dist.Normal(where, 1.0), obs=torch.tensor(2.0, dtype=torch.float64))

    elbo = HardAttentionELBO(estimator="reinforce", baseline=baseline, num_particles=16,
                             vectorize_particles=True, max_plate_nesting=0)
    pyro.poutine.trace(model).get_trace()  # creates the parameter
    leaf = pyro.param("s").unconstrained()
    draws = torch.stack([
        -torch.autograd.grad(elbo.differentiable_loss(model, empty_guide), leaf)[0]
        for _ in range(300)
    ])
    assert_mean_close(draws, -(0.7**2), what="dF/dlog s")


def test_enum_refuses_markov_recycled_dimensions():
    def model():
        logits = pyro.param("logits", torch.zeros(3))
        prev = torch.tensor(0)
        for t in pyro.markov(range(3)):
            prev = pyro.sample(f"l_{t}", dist.Categorical(logits=logits + prev.float()))
            pyro.sample(f"y_{t}", dist.Normal(prev.float(), 1.0), obs=torch.tensor(1.0))

    with pytest.raises(ValueError, match=r"attention sites 'l_0' and 'l_2' share enumeration"):
        HardAttentionELBO(estimator="enum", max_plate_nesting=0).loss(model, empty_guide)

    # a plain loop (one dimension per glimpse) is fine
    def plain():
        logits = pyro.param("logits", torch.zeros(3))
        prev = torch.tensor(0)
        for t in range(3):
            prev = pyro.sample(f"l_{t}", dist.Categorical(logits=logits + prev.float()))
            pyro.sample(f"y_{t}", dist.Normal(prev.float(), 1.0), obs=torch.tensor(1.0))

    assert math.isfinite(HardAttentionELBO(estimator="enum", max_plate_nesting=0)
                         .loss(plain, empty_guide))


def test_learning_signal_transform_leaves_guide_sampled_sites_alone():
    """With reward='zero_one' the guide's discrete site still gets dL of the log-likelihood."""
    data = torch.tensor([0.0, 1.0, 1.0])

    def model():
        c = pyro.sample("c", dist.Bernoulli(0.5))
        with pyro.plate("data", 3):
            where = pyro.sample("where", dist.Categorical(logits=pyro.param("a", torch.zeros(2))))
            logits = torch.stack([c * where, (1 - c) * where], -1) * 2.0
            pyro.sample("y", dist.Categorical(logits=logits), obs=data.long())

    def guide():
        q = pyro.param("q", torch.tensor(0.3),
                       constraint=torch.distributions.constraints.unit_interval)
        pyro.sample("c", dist.Bernoulli(q))

    # the guide site's gradient is the same whatever reward the attention site is trained on
    results = []
    for reward in ("log_likelihood", "zero_one"):
        pyro.clear_param_store()
        elbo = HardAttentionELBO(estimator="reinforce", reward=reward, max_plate_nesting=1)
        pyro.set_rng_seed(3)
        loss = elbo.differentiable_loss(model, guide)
        results.append(torch.autograd.grad(loss, pyro.param("q").unconstrained())[0])
    torch.testing.assert_close(results[0], results[1])


def test_zero_one_reward_skips_deterministic_sites():
    def model():
        where = pyro.sample("where", dist.Categorical(logits=pyro.param("a", torch.zeros(2))))
        pyro.deterministic("loc", where.float() * 2)
        pyro.sample("y", dist.Categorical(logits=torch.stack([where.float(), 1 - where.float()])),
                    obs=torch.tensor(1))

    elbo = HardAttentionELBO(estimator="reinforce", reward="zero_one", max_plate_nesting=0)
    assert math.isfinite(elbo.loss(model, empty_guide))


def test_canvases_from_glimpses_inverts_views():
    from pyro_elbo_ext.problems.hard_attention import canvases_from_glimpses, views

    canvases = np.random.default_rng(0).random((5, 16, 16)).astype(np.float32)
    _, patches = views(canvases, 8, 4, 2)
    torch.testing.assert_close(canvases_from_glimpses(patches, 16, 8, 4),
                               torch.from_numpy(canvases), rtol=0, atol=0)
