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


def binary_chain(
    num_sites: int = 6,
    markov: bool = True,
    stay: float = 0.8,
    noise: float = 1.0,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> Problem:
    """A chain of binary latents sampled one after another, each with its own observation.

    Model (no plates; ``markov=False``: independent sites, ``p(z_t) = 1/2``)::

        z_0 ~ Bernoulli(1/2)
        z_t | z_{t-1} ~ Bernoulli(stay if z_{t-1} else 1 - stay)        t = 1 .. T-1
        x_t | z_t ~ Normal(mu[z_t], noise)                              (mu: a model parameter)

    Guide (mean-field, sampled in order ``z_0, ..., z_{T-1}`` in a Python loop)::

        z_t ~ Bernoulli(logits = q_logits[t])

    The guide's sample order puts every site before all later ones, while the data flow
    links ``z_t`` only to ``z_{t-1}``, ``z_{t+1}`` (``markov=True``) or to nothing
    (``markov=False``): the case where a sample-order rule overstates the dependencies.
    ``exact_elbo`` sums over the ``2 ** T`` configurations (64 by default), so its autograd
    gradient is the exact dL wrt ``q_logits`` and ``mu``.
    """
    dtype = dtype or torch.get_default_dtype()
    gen = torch.Generator().manual_seed(seed)
    true_mu = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    z, states = 0, []
    for t in range(num_sites):
        p = 0.5 if t == 0 or not markov else (stay if z else 1.0 - stay)
        z = int(torch.rand((), generator=gen, dtype=torch.float64) < p)
        states.append(z)
    x = true_mu[torch.tensor(states)] + noise * torch.randn(num_sites, generator=gen,
                                                            dtype=torch.float64)
    x = x.to(dtype=dtype, device=device)

    def transition(previous):
        if previous is None or not markov:
            return dist.Bernoulli(x.new_tensor(0.5))
        return dist.Bernoulli(torch.where(previous.bool(), x.new_tensor(stay),
                                          x.new_tensor(1.0 - stay)))

    def model(data):
        mu = pyro.param("mu", lambda: data.new_tensor([-0.5, 0.5]))
        z = None
        for t in range(num_sites):
            z = pyro.sample(f"z_{t}", transition(z))
            pyro.sample(f"x_{t}", dist.Normal(torch.where(z.bool(), mu[1], mu[0]), noise),
                        obs=data[t])

    def guide(data):
        q_logits = pyro.param("q_logits", lambda: data.new_zeros(num_sites))
        for t in range(num_sites):
            pyro.sample(f"z_{t}", dist.Bernoulli(logits=q_logits[t]))

    configs = torch.tensor(list(itertools.product((0.0, 1.0), repeat=num_sites)),
                           dtype=dtype, device=device)  # (2^T, T)

    def exact_elbo(params):
        mu, q_logits = params["mu"], params["q_logits"]
        log_p = dist.Normal(torch.where(configs.bool(), mu[1], mu[0]), noise).log_prob(x).sum(-1)
        log_p = log_p + dist.Bernoulli(x.new_tensor(0.5)).log_prob(configs[:, 0])
        for t in range(1, num_sites):
            log_p = log_p + transition(configs[:, t - 1]).log_prob(configs[:, t])
        log_q = dist.Bernoulli(logits=q_logits).log_prob(configs).sum(-1)
        return (log_q.exp() * (log_p - log_q)).sum()

    init = {
        "mu": x.new_tensor([-0.5, 0.5]),
        "q_logits": (0.5 * torch.randn(num_sites, generator=gen, dtype=torch.float64)).to(x),
    }
    return Problem(
        name="binary_chain" if markov else "independent_bits",
        description=(f"{num_sites} binary latents sampled in sequence "
                     f"({'a Markov chain' if markov else 'independent'}), Normal observations"),
        model=model,
        guide=guide,
        args=(x,),
        init_params=init,
        exact_elbo=exact_elbo,
        max_plate_nesting=0,
        notes={"states": states},
    )


def two_cluster_mixture(
    num_data: int = 20,
    separation: float = 2.0,
    prior_scale: float = 3.0,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> Problem:
    """A two-cluster Gaussian mixture whose guide samples each point's assignment.

    Model::

        loc_k ~ Normal(0, prior_scale)             (plate "components", k = 0, 1)
        z_i ~ Bernoulli(1/2)                       (plate "data")
        x_i | z_i, loc ~ Normal(loc[z_i], 1)

    Guide (the global locations first, then the assignments, independent of them)::

        loc_k ~ Normal(q_loc[k], q_scale[k])
        z_i ~ Bernoulli(logits = assign_logits[i])

    The data are ``num_data`` points, half around ``-separation`` and half around
    ``+separation``; the guide starts nearly collapsed (``q_loc = (-0.1, 0.1)``).
    ``exact_elbo`` is L in closed form (the expectation over the Normal locations is
    analytic: ``E[log N(x; loc, 1)] = log N(x; m, 1) - s^2 / 2``).
    """
    dtype = dtype or torch.get_default_dtype()
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_data) % 2
    x = (2 * labels - 1) * separation + torch.randn(num_data, generator=gen,
                                                    dtype=torch.float64)
    x = x.to(dtype=dtype, device=device)

    def mean_of(locs, z):
        return torch.where(z.bool(), locs[..., 1:2], locs[..., 0:1])

    def model(data):
        with pyro.plate("components", 2):
            locs = pyro.sample("locs", dist.Normal(data.new_zeros(()), prior_scale))
        with pyro.plate("data", data.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(data.new_tensor(0.5)))
            pyro.sample("x", dist.Normal(mean_of(locs, z), 1.0), obs=data)

    def guide(data):
        q_loc = pyro.param("q_loc", lambda: data.new_tensor([-0.1, 0.1]))
        q_scale = pyro.param("q_scale", lambda: data.new_tensor([0.5, 0.5]),
                             constraint=constraints.positive)
        logits = pyro.param("assign_logits", lambda: data.new_zeros(data.shape[0]))
        with pyro.plate("components", 2):
            pyro.sample("locs", dist.Normal(q_loc, q_scale))
        with pyro.plate("data", data.shape[0]):
            pyro.sample("z", dist.Bernoulli(logits=logits))

    def exact_elbo(params):
        m, s, logits = params["q_loc"], params["q_scale"], params["assign_logits"]
        prior = dist.Normal(x.new_zeros(()), prior_scale)
        global_terms = (prior.log_prob(m) - s**2 / (2 * prior_scale**2)).sum() + dist.Normal(
            m, s).entropy().sum()
        expected = dist.Normal(m, 1.0).log_prob(x.unsqueeze(-1)) - s**2 / 2  # (N, 2)
        q1 = torch.sigmoid(logits)
        local = (1 - q1) * expected[:, 0] + q1 * expected[:, 1] + torch.log(x.new_tensor(0.5))
        entropy = dist.Bernoulli(logits=logits).entropy()
        return global_terms + (local + entropy).sum()

    init = {
        "q_loc": x.new_tensor([-0.1, 0.1]),
        "q_scale": x.new_tensor([0.5, 0.5]),
        "assign_logits": x.new_zeros(num_data),
    }
    return Problem(
        name="two_cluster_mixture",
        description=f"two-cluster Gaussian mixture, {num_data} points, sampled assignments",
        model=model,
        guide=guide,
        args=(x,),
        init_params=init,
        param_constraints={"q_scale": constraints.positive},
        exact_elbo=exact_elbo,
        max_plate_nesting=1,
        notes={"labels": labels.tolist()},
    )
