"""pyro_elbo_ext.compare.estimators and .applicability: the registry, what applies where and
why, and the errors for unknown, incompatible or repeated names."""

from __future__ import annotations

import pytest

from pyro_elbo_ext.compare import (
    ESTIMATORS,
    IncompatibleEstimatorError,
    UnknownEstimatorError,
    get_estimator,
)
from pyro_elbo_ext.compare.estimators import chosen_estimators
from pyro_elbo_ext.problems import UnknownProblemError, get_problem


def test_registry_applicability_and_errors():
    normal = get_problem("normal_normal")
    discrete = get_problem("tiny_discrete")
    ok, reason = get_estimator("traceenum_elbo").applies_to(normal)
    assert not ok and "discrete" in reason
    assert get_estimator("traceenum_elbo").applies_to(discrete)[0]
    ok, reason = get_estimator("tracemeanfield_elbo").applies_to(discrete)
    assert not ok and "reparameterizable" in reason
    assert not get_estimator("renyi_elbo").applies_to(discrete)[0]
    for name in ("jensen_analytic", "jensen_sampled", "jensen_path", "trace_elbo",
                 "tracegraph_elbo"):
        assert get_estimator(name).applies_to(normal)[0]
        assert get_estimator(name).applies_to(discrete)[0]
    with pytest.raises(IncompatibleEstimatorError, match="traceenum_elbo.*normal_normal"):
        get_estimator("traceenum_elbo").build(normal)
    with pytest.raises(UnknownEstimatorError, match="known estimators: .*trace_elbo"):
        get_estimator("no_such_estimator")
    with pytest.raises(UnknownProblemError, match="known problems: .*vae_digits"):
        get_problem("no_such_problem")
    with pytest.raises(ValueError, match="no option"):
        get_problem("normal_normal", bogus=1)


def test_analytic_kl_is_registered_and_applies_to_continuous_models():
    assert "analytic_kl" in ESTIMATORS
    assert get_estimator("analytic_kl").applies_to(get_problem("normal_normal"))[0]


def test_hard_attention_estimators_apply_only_to_attention_problems():
    names = [n for n in ESTIMATORS if n.startswith("hard_attention")]
    assert {"hard_attention_enum", "hard_attention_reinforce",
            "hard_attention_reinforce_ma"} <= set(names)
    normal = get_problem("normal_normal")
    for name in names:
        ok, reason = get_estimator(name).applies_to(normal)
        assert not ok and "attention" in reason


def test_a_name_given_twice_is_an_error_not_a_duplicate_row():
    problem = get_problem("normal_normal")
    assert chosen_estimators(problem, ["jensen_path", "trace_elbo"]) == ["jensen_path",
                                                                        "trace_elbo"]
    assert chosen_estimators(problem, None) == [n for n in ESTIMATORS
                                                if get_estimator(n).applies_to(problem)[0]]
    with pytest.raises(ValueError, match=r"\['jensen_path'\] named more than once"):
        chosen_estimators(problem, ["jensen_path", "trace_elbo", "jensen_path"])
