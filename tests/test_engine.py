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
    assert float(est.total) == pytest.approx(2.0 - 0.6)
    (grad,) = torch.autograd.grad(est.surrogate, theta)
    # pathwise: -2; score: sum_i dlogq_i * (cost_i) with cost_i = lik_i + global kl term
    cost = torch.tensor([0.5, 1.5]) - 0.6
    assert float(grad) == pytest.approx(-2.0 + float((torch.tensor([-1.0, -2.0]) * cost).sum()))


def test_learning_signal_replaces_the_cost_only_where_marked():
    theta = torch.tensor(1.0, requires_grad=True)
    terms = [Term("x", "log_likelihood", torch.tensor(3.0), None, frozenset())]

    def signal(site, cost):
        return cost - 2.0

    sites = [ScoreSite("attended", theta * 1.0, frozenset(), learning_signal=True),
             ScoreSite("guided", theta * 10.0, frozenset())]
    est = combine(terms, sites, signal)
    assert float(est.total) == 3.0
    (grad,) = torch.autograd.grad(est.surrogate, theta)
    # the marked site meets the signal 3 - 2, the other the plain cost 3
    assert float(grad) == pytest.approx(1.0 * (3.0 - 2.0) + 10.0 * 3.0)


def test_empty_program_has_zero_bound():
    """Pyro's ELBOs give 0 for a model and guide with no sample sites; so does the engine."""
    est = combine([])
    assert float(est.total) == 0.0 and float(est.surrogate) == 0.0
