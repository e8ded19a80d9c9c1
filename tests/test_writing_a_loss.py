"""The "Writing a loss" page's worked example runs as written and estimates its objective.

The block is the page's first ``python`` block: an entropy-bonus objective
L_beta = E_q[log p(X, Z)] + beta H[q(Z)] on a conjugate Normal model, whose closed form the block
defines; the loss's Monte Carlo draws must agree with it within ``K_SE`` standard errors, and
``decompose`` must say that the objective is not L.
"""

from __future__ import annotations

import re
from pathlib import Path

import pyro
import torch

from .mc import K_SE

PAGE = Path(__file__).resolve().parent.parent / "docs" / "guide" / "writing_a_loss.md"


def test_the_worked_example_estimates_its_closed_form(capsys):
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
    assert blocks, "the page has no python block"
    namespace: dict = {}
    exec(compile(blocks[0], str(PAGE), "exec"), namespace)
    draws, exact = namespace["draws"], namespace["exact"]
    se = float(draws.std() / draws.shape[0] ** 0.5)
    assert abs(float(draws.mean()) - exact) <= K_SE * se
    # the comparison can tell L_beta from L: at beta = 1 the closed form differs by 0.5 H[q]
    with torch.no_grad():
        elbo_1 = namespace["closed_form"](pyro.param("loc"), pyro.param("scale"), 1.0)
    assert abs(elbo_1 - exact) > 2 * K_SE * se, (elbo_1, exact, se)
    out = capsys.readouterr().out
    assert "closed form" in out and "beta = 0.5 multiplies the 'entropy' terms" in out


def test_the_worked_example_trains_to_its_optimum():
    """At the optimum of L_beta on the conjugate model, q has the posterior mean and sqrt(beta)
    times the posterior sd (the entropy is analytic and the gradient of the Monte Carlo terms
    vanishes in expectation there)."""
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
    namespace: dict = {}
    source = blocks[0].split("elbo = EntropyBonusELBO")[0]  # the definitions only
    exec(compile(source, str(PAGE), "exec"), namespace)
    data = namespace["data"]
    elbo = namespace["EntropyBonusELBO"](beta=0.5, num_particles=32, vectorize_particles=True)
    svi = pyro.infer.SVI(namespace["model"], namespace["guide"],
                         pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.995}), loss=elbo)
    for _ in range(800):
        svi.step(data)
    post_var = 1.0 / (1.0 / 4.0 + len(data))
    post_mean = post_var * float(data.sum())
    assert abs(pyro.param("loc").item() - post_mean) < 0.05 * post_var**0.5
    assert abs(pyro.param("scale").item() - (0.5 * post_var) ** 0.5) < 0.05 * post_var**0.5
    assert torch.isfinite(pyro.param("scale"))
