"""Argument checks, one way for every loss (``elbos/validation.py``), and the decomposition's
wording where a setting changes what L means."""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_elbo_ext import AnalyticKLELBO, HardAttentionELBO, JensenELBO
from pyro_elbo_ext.elbos.validation import check_number, check_positive_int


def _model():
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(0.3))


def _guide():
    pyro.sample("z", dist.Normal(0.0, 1.0))


@pytest.mark.parametrize("make", [
    lambda: JensenELBO(num_particles=np.int64(3)),
    lambda: AnalyticKLELBO(num_particles=np.int32(2), kl_weight=np.float64(0.5)),
    lambda: HardAttentionELBO(max_enum_size=np.int64(50), num_particles=np.int64(2)),
    lambda: HardAttentionELBO(estimator="reinforce", baseline="moving_average",
                              decay=np.float32(0.5), entropy_weight=np.float64(0.1)),
])
def test_numpy_numbers_are_accepted_everywhere(make):
    make()


@pytest.mark.parametrize("make, pattern", [
    (lambda: AnalyticKLELBO(kl_weight="0.5"), r"kl_weight must be a number, got '0.5'"),
    (lambda: AnalyticKLELBO(kl_weight=True), r"kl_weight must be a number"),
    (lambda: AnalyticKLELBO(kl_weight=float("inf")), r"kl_weight must be a finite number"),
    (lambda: HardAttentionELBO(max_enum_size=2.5), r"max_enum_size must be an integer >= 1"),
    (lambda: HardAttentionELBO(max_enum_size="10"), r"max_enum_size must be an integer >= 1"),
    (lambda: HardAttentionELBO(estimator="reinforce", decay="0.9"), r"decay must be a number"),
    (lambda: AnalyticKLELBO(kl_sites=123), r"kl_sites must be None or an iterable of site"),
    (lambda: AnalyticKLELBO(kl_sites=[1, 2]), r"kl_sites must name sites by their"),
])
def test_bad_arguments_are_refused_naming_them(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make()


def test_check_helpers():
    assert check_positive_int("n", np.int64(4)) == 4
    assert check_number("w", np.float32(0.25), low=0.0) == 0.25
    with pytest.raises(ValueError, match=r"w must be a finite number in \[0, 1\)"):
        check_number("w", 1.0, low=0.0, high=1.0, high_open=True)


def test_kl_weight_on_no_site_keeps_the_bound_and_says_nothing():
    """kl_sites=[] weights no site: L is the bound itself, and the notes say nothing."""
    notes = AnalyticKLELBO(kl_weight=0.5, kl_sites=[]).decompose(_model, _guide).notes
    assert notes == ()
    weighted = AnalyticKLELBO(kl_weight=0.5).decompose(_model, _guide).notes
    assert any("NOT a lower bound" in note for note in weighted)


def test_a_zero_kl_prints_as_zero():
    def guide():
        pyro.sample("z", dist.Normal(0.0, 1.0))  # q = p: KL exactly 0

    decomposition = AnalyticKLELBO().decompose(_model, guide)
    (kl,) = [t for t in decomposition.terms if t.kind == "kl"]
    assert kl.value == 0.0 and str(kl.value) == "0.0"
    assert "-0" not in str(decomposition)
