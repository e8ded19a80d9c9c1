"""Conjugate models whose evidence, posterior and L(q) have closed forms.

The closed forms are written out from the textbook formulas (e.g. Bishop 2006, sec. 2.3-2.4;
Murphy 2012, ch. 3) with ``torch.lgamma`` / ``torch.digamma``; none of them calls the
distributions' own ``entropy`` or ``kl_divergence``, so they are independent checks of the
losses.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

from .base import Problem


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def normal_normal(
    num_data: int = 20,
    subsample_size: int | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> Problem:
    """z ~ N(mu0, tau0), x_i | z ~ N(z, sigma), i = 1..N; guide q(z) = N(loc, scale).

    Posterior N(m_N, s_N) with 1/s_N^2 = 1/tau0^2 + N/sigma^2 and
    m_N = s_N^2 (mu0/tau0^2 + sum_i x_i / sigma^2); evidence x ~ N(mu0 1, sigma^2 I + tau0^2 1 1^T).
    """
    dtype = dtype or torch.get_default_dtype()
    mu0, tau0, sigma, z_true = 0.0, 2.0, 1.0, 1.3
    x = (z_true + sigma * torch.randn(num_data, generator=_generator(seed), dtype=torch.float64))
    x = x.to(dtype=dtype, device=device)

    def model(data):
        z = pyro.sample("z", dist.Normal(data.new_tensor(mu0), data.new_tensor(tau0)))
        with pyro.plate("data", data.shape[0], subsample_size=subsample_size) as idx:
            pyro.sample("obs", dist.Normal(z, sigma), obs=data[idx])

    def guide(data):
        loc = pyro.param("loc", lambda: data.new_tensor(0.0))
        scale = pyro.param("scale", lambda: data.new_tensor(0.5), constraint=constraints.positive)
        pyro.sample("z", dist.Normal(loc, scale))

    post_prec = 1 / tau0**2 + num_data / sigma**2
    post_var = 1 / post_prec
    post_mean = post_var * (mu0 / tau0**2 + x.sum() / sigma**2)
    cov = sigma**2 * torch.eye(num_data, dtype=dtype) + tau0**2 * torch.ones(
        num_data, num_data, dtype=dtype
    )
    log_evidence = torch.distributions.MultivariateNormal(
        torch.full((num_data,), mu0, dtype=dtype), covariance_matrix=cov
    ).log_prob(x.cpu())

    def exact_elbo(params):
        m, s = params["loc"], params["scale"]
        log2pi = math.log(2 * math.pi)
        e_loglik = (-0.5 * log2pi - math.log(sigma) - ((x - m) ** 2 + s**2) / (2 * sigma**2)).sum()
        e_logprior = -0.5 * log2pi - math.log(tau0) - ((m - mu0) ** 2 + s**2) / (2 * tau0**2)
        entropy = 0.5 * (log2pi + 1) + torch.log(s)
        return e_loglik + e_logprior + entropy

    return Problem(
        name="normal_normal",
        description="Normal mean with known noise, Normal prior; q(z) = Normal(loc, scale)",
        model=model,
        guide=guide,
        args=(x,),
        init_params={"loc": x.new_tensor(0.0), "scale": x.new_tensor(0.5)},
        param_constraints={"scale": constraints.positive},
        posterior_params={"loc": post_mean, "scale": x.new_tensor(math.sqrt(post_var))},
        log_evidence=float(log_evidence),
        exact_elbo=exact_elbo,
        notes={"z_true": z_true, "posterior_mean": float(post_mean),
               "posterior_sd": math.sqrt(post_var)},
    )


def _log_beta_fn(a, b):
    return torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)


def beta_bernoulli(
    num_data: int = 30,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> Problem:
    """p ~ Beta(a0, b0), x_i | p ~ Bernoulli(p); guide q(p) = Beta(alpha, beta).

    Posterior Beta(a0 + k, b0 + N - k) with k = sum_i x_i;
    log p(X) = log B(a0 + k, b0 + N - k) - log B(a0, b0).
    """
    dtype = dtype or torch.get_default_dtype()
    a0, b0, p_true = 2.0, 3.0, 0.7
    x = (torch.rand(num_data, generator=_generator(seed), dtype=torch.float64) < p_true)
    x = x.to(dtype=dtype, device=device)
    k = float(x.sum())

    def model(data):
        p = pyro.sample("p", dist.Beta(data.new_tensor(a0), data.new_tensor(b0)))
        with pyro.plate("data", data.shape[0]):
            pyro.sample("obs", dist.Bernoulli(p), obs=data)

    def guide(data):
        alpha = pyro.param("alpha", lambda: data.new_tensor(1.0), constraint=constraints.positive)
        beta = pyro.param("beta", lambda: data.new_tensor(1.0), constraint=constraints.positive)
        pyro.sample("p", dist.Beta(alpha, beta))

    t = x.new_tensor
    log_evidence = _log_beta_fn(t(a0 + k), t(b0 + num_data - k)) - _log_beta_fn(t(a0), t(b0))

    def exact_elbo(params):
        a, b = params["alpha"], params["beta"]
        e_log_p = torch.digamma(a) - torch.digamma(a + b)
        e_log_1mp = torch.digamma(b) - torch.digamma(a + b)
        e_loglik = k * e_log_p + (num_data - k) * e_log_1mp
        e_logprior = (a0 - 1) * e_log_p + (b0 - 1) * e_log_1mp - _log_beta_fn(t(a0), t(b0))
        entropy = (
            _log_beta_fn(a, b)
            - (a - 1) * torch.digamma(a)
            - (b - 1) * torch.digamma(b)
            + (a + b - 2) * torch.digamma(a + b)
        )
        return e_loglik + e_logprior + entropy

    return Problem(
        name="beta_bernoulli",
        description="Bernoulli success probability with a Beta prior; q(p) = Beta(alpha, beta)",
        model=model,
        guide=guide,
        args=(x,),
        init_params={"alpha": t(1.0), "beta": t(1.0)},
        param_constraints={"alpha": constraints.positive, "beta": constraints.positive},
        posterior_params={"alpha": t(a0 + k), "beta": t(b0 + num_data - k)},
        log_evidence=float(log_evidence),
        exact_elbo=exact_elbo,
        notes={"p_true": p_true, "successes": k},
    )


def gamma_poisson(
    num_data: int = 25,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> Problem:
    """lam ~ Gamma(a0, b0) (rate b0), x_i | lam ~ Poisson(lam); guide q(lam) = Gamma(alpha, beta).

    Posterior Gamma(a0 + S, b0 + N), S = sum_i x_i;
    log p(X) = a0 log b0 - lgamma(a0) + lgamma(a0 + S) - (a0 + S) log(b0 + N) - sum_i log x_i!.
    """
    dtype = dtype or torch.get_default_dtype()
    a0, b0, lam_true = 2.0, 1.0, 3.5
    x = torch.poisson(torch.full((num_data,), lam_true, dtype=torch.float64),
                      generator=_generator(seed))
    x = x.to(dtype=dtype, device=device)
    total = float(x.sum())
    log_factorials = float(torch.lgamma(x + 1).sum())
    t = x.new_tensor

    def model(data):
        lam = pyro.sample("lam", dist.Gamma(data.new_tensor(a0), data.new_tensor(b0)))
        with pyro.plate("data", data.shape[0]):
            pyro.sample("obs", dist.Poisson(lam), obs=data)

    def guide(data):
        alpha = pyro.param("alpha", lambda: data.new_tensor(1.0), constraint=constraints.positive)
        beta = pyro.param("beta", lambda: data.new_tensor(1.0), constraint=constraints.positive)
        pyro.sample("lam", dist.Gamma(alpha, beta))

    log_evidence = (
        a0 * math.log(b0) - math.lgamma(a0) + math.lgamma(a0 + total)
        - (a0 + total) * math.log(b0 + num_data) - log_factorials
    )

    def exact_elbo(params):
        a, b = params["alpha"], params["beta"]
        e_log_lam = torch.digamma(a) - torch.log(b)
        e_lam = a / b
        e_loglik = total * e_log_lam - num_data * e_lam - log_factorials
        e_logprior = a0 * math.log(b0) - math.lgamma(a0) + (a0 - 1) * e_log_lam - b0 * e_lam
        entropy = a - torch.log(b) + torch.lgamma(a) + (1 - a) * torch.digamma(a)
        return e_loglik + e_logprior + entropy

    return Problem(
        name="gamma_poisson",
        description="Poisson rate with a Gamma prior; q(lam) = Gamma(alpha, beta)",
        model=model,
        guide=guide,
        args=(x,),
        init_params={"alpha": t(1.0), "beta": t(1.0)},
        param_constraints={"alpha": constraints.positive, "beta": constraints.positive},
        posterior_params={"alpha": t(a0 + total), "beta": t(b0 + num_data)},
        log_evidence=float(log_evidence),
        exact_elbo=exact_elbo,
        notes={"lam_true": lam_true, "total": total},
    )
