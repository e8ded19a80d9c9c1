"""The engine's bookkeeping, checked on small hand-made tensors (exact arithmetic)."""

import pytest
import torch

from pyro_elbo_ext.elbos.engine import Frame, ScoreSite, Term, combine, sum_to_frames

DATA = Frame("data", -1)
GROUPS = Frame("groups", -2)


def test_sum_to_frames_keeps_shared_plates_and_sums_the_others():
    costs = {
        frozenset(): torch.tensor(10.0),
        frozenset({DATA}): torch.tensor([1.0, 2.0, 3.0]),
        frozenset({GROUPS}): torch.tensor([[100.0], [200.0]]),
        frozenset({GROUPS, DATA}): torch.arange(6.0).reshape(2, 3),
    }
    # a site in "data" only: groups are summed out, data kept element by element
    got = sum_to_frames(costs, frozenset({DATA}))
    expected = 10.0 + torch.tensor([1.0, 2.0, 3.0]) + 300.0 + torch.tensor([3.0, 5.0, 7.0])
    torch.testing.assert_close(got.reshape(-1), expected)
    # a global site meets the total cost
    assert float(sum_to_frames(costs, frozenset()).sum()) == 10 + 6 + 300 + 15
    # a site in both plates meets each cell's own costs plus the broadcast globals
    both = sum_to_frames(costs, frozenset({GROUPS, DATA}))
    expected = 10.0 + torch.tensor([1.0, 2, 3]) + torch.tensor([[100.0], [200.0]])
    torch.testing.assert_close(both, expected + torch.arange(6.0).reshape(2, 3))


def test_combine_value_pathwise_and_score_terms():
    theta = torch.tensor(0.3, requires_grad=True)
    log_q = torch.tensor([-1.0, -2.0]) * theta  # a stand-in score with d/dtheta = [-1, -2]
    terms = [
        Term("a", "log_likelihood", torch.tensor([0.5, 1.5]), None, frozenset({DATA})),
        Term("b", "kl", -theta * 2.0, -theta * 2.0, frozenset()),
    ]
    est = combine(terms, [ScoreSite("s", log_q, frozenset({DATA}))])
    assert float(est.elbo) == pytest.approx(2.0 - 0.6)
    (grad,) = torch.autograd.grad(est.surrogate, theta)
    # pathwise: -2; score: sum_i dlogq_i * (cost_i) with cost_i = lik_i + global kl term
    cost = torch.tensor([0.5, 1.5]) - 0.6
    assert float(grad) == pytest.approx(-2.0 + float((torch.tensor([-1.0, -2.0]) * cost).sum()))


def test_baseline_is_subtracted_and_its_penalty_reaches_only_the_surrogate():
    theta = torch.tensor(1.0, requires_grad=True)
    terms = [Term("x", "log_likelihood", torch.tensor(3.0), None, frozenset())]

    def baseline(site, cost):
        return torch.tensor(2.0), (theta - 5.0) ** 2

    est = combine(terms, [ScoreSite("s", theta * 1.0, frozenset())], baseline)
    assert float(est.elbo) == 3.0
    (grad,) = torch.autograd.grad(est.surrogate, theta)
    assert float(grad) == pytest.approx((3.0 - 2.0) - 2 * (1.0 - 5.0))


def test_no_terms_is_an_error():
    with pytest.raises(ValueError, match="no sample sites"):
        combine([])
