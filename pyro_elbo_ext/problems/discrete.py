"""A tiny model with discrete latents whose L, dL and log p(X) come from brute-force enumeration."""

from __future__ import annotations

import itertools

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

from .base import Problem


def tiny_discrete(
    num_data: int = 3,
    num_states: int = 3,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> Problem:
    """One global binary latent and one categorical latent per data point.

    Model::

        c ~ Bernoulli(0.4)
        z_i | c ~ Categorical(pi[c])             (plate "data")
        x_i | z_i ~ Normal(mu[z_i], 1)           (mu: a model parameter)

    Guide (not mean-field: q(z_i) depends on c)::

        c ~ Bernoulli(q_c)
        z_i | c ~ Categorical(logits=q_logits[i, c])

    ``exact_elbo`` sums q(c, z) [log p(x, c, z) - log q(c, z)] over all 2 * K^N joint
    configurations (54 by default), so its autograd gradient is the exact dL wrt the guide's
    and the model's parameters.
    """
    dtype = dtype or torch.get_default_dtype()
    gen = torch.Generator().manual_seed(seed)
    prior_c = 0.4
    pi = torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.3, 0.6]], dtype=dtype, device=device)
    if num_states != 3:
        pi = torch.softmax(torch.randn(2, num_states, generator=gen, dtype=torch.float64), -1)
        pi = pi.to(dtype=dtype, device=device)
    true_mu = torch.linspace(-2.0, 2.5, num_states, dtype=torch.float64)
    c_true = int(torch.rand((), generator=gen, dtype=torch.float64) < prior_c)
    z_true = torch.multinomial(pi[c_true].double().cpu(), num_data, replacement=True, generator=gen)
    x = (true_mu[z_true] + torch.randn(num_data, generator=gen, dtype=torch.float64))
    x = x.to(dtype=dtype, device=device)

    def model(data):
        mu = pyro.param("mu", lambda: torch.linspace(-1.0, 1.0, num_states).to(data))
        c = pyro.sample("c", dist.Bernoulli(data.new_tensor(prior_c)))
        probs = torch.where(c.bool().unsqueeze(-1), pi[1], pi[0])
        with pyro.plate("data", data.shape[0]):
            z = pyro.sample("z", dist.Categorical(probs))
            pyro.sample("obs", dist.Normal(mu[z], 1.0), obs=data)

    def guide(data):
        q_c = pyro.param("q_c", lambda: data.new_tensor(0.5), constraint=constraints.unit_interval)
        q_logits = pyro.param("q_logits", lambda: data.new_zeros(data.shape[0], 2, num_states))
        c = pyro.sample("c", dist.Bernoulli(q_c))
        logits = torch.where(c.bool().unsqueeze(-1), q_logits[:, 1], q_logits[:, 0])
        with pyro.plate("data", data.shape[0]):
            pyro.sample("z", dist.Categorical(logits=logits))

    configs = torch.tensor(
        list(itertools.product(range(num_states), repeat=num_data)), device=device
    )  # (K^N, N)
    rows = torch.arange(num_data, device=device)

    def joint_log_probs(params):
        """log p(x, c, z) and log q(c, z) for every configuration: two (2, K^N) tensors."""
        mu, q_c, q_logits = params["mu"], params["q_c"], params["q_logits"]
        log_p, log_q = [], []
        for c in (0, 1):
            lp_c = torch.log(x.new_tensor(prior_c if c else 1 - prior_c))
            lp_z = torch.log(pi[c])[configs].sum(-1)
            lp_x = (-0.5 * (x - mu[configs]) ** 2 - 0.5 * torch.log(x.new_tensor(2 * torch.pi)))
            log_p.append(lp_c + lp_z + lp_x.sum(-1))
            lq_c = torch.log(q_c) if c else torch.log1p(-q_c)
            lq_z = torch.log_softmax(q_logits[:, c], -1)[rows, configs].sum(-1)
            log_q.append(lq_c + lq_z)
        return torch.stack(log_p), torch.stack(log_q)

    def exact_elbo(params):
        log_p, log_q = joint_log_probs(params)
        return (log_q.exp() * (log_p - log_q)).sum()

    init = {
        "mu": torch.linspace(-1.0, 1.0, num_states, dtype=dtype, device=device),
        "q_c": x.new_tensor(0.5),
        "q_logits": torch.randn(num_data, 2, num_states, generator=gen, dtype=torch.float64)
        .to(dtype=dtype, device=device) * 0.5,
    }
    log_evidence = torch.logsumexp(joint_log_probs(init)[0].flatten(), 0)
    return Problem(
        name="tiny_discrete",
        description="global Bernoulli + per-point Categorical latents; exact by enumeration",
        model=model,
        guide=guide,
        args=(x,),
        init_params=init,
        param_constraints={"q_c": constraints.unit_interval},
        posterior_params=None,
        log_evidence=float(log_evidence),
        exact_elbo=exact_elbo,
        notes={"log_evidence_at": "init_params['mu']", "c_true": c_true,
               "z_true": z_true.tolist()},
    )
