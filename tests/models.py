"""Small models shared by several test files."""

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints


def local_global_model(data):
    """A global latent z and per-datum latents u in a plate subsampled to 4 of the data."""
    z = pyro.sample("z", dist.Normal(data.new_tensor(0.0), 2.0))
    with pyro.plate("data", data.shape[0], subsample_size=4) as idx:
        u = pyro.sample("u", dist.Normal(z, 1.0))
        pyro.sample("obs", dist.Normal(u, 0.5), obs=data[idx])


def local_global_guide(data):
    """Mean-field Normal guide of :func:`local_global_model` (params z_loc, z_scale, u_loc,
    u_scale), subsampling the same plate."""
    loc = pyro.param("z_loc", lambda: data.new_tensor(0.3))
    scale = pyro.param("z_scale", lambda: data.new_tensor(0.8), constraint=constraints.positive)
    pyro.sample("z", dist.Normal(loc, scale))
    u_loc = pyro.param("u_loc", lambda: torch.linspace(-1, 1, data.shape[0]).to(data))
    u_scale = pyro.param(
        "u_scale", lambda: data.new_full(data.shape, 0.7), constraint=constraints.positive
    )
    with pyro.plate("data", data.shape[0], subsample_size=4) as idx:
        pyro.sample("u", dist.Normal(u_loc[idx], u_scale[idx]))


def discrete_model(data):
    """A global discrete component k, then a Normal z around the component's mean."""
    k = pyro.sample("k", dist.Categorical(data.new_tensor([0.2, 0.5, 0.3])))
    z = pyro.sample("z", dist.Normal(data.new_tensor([-1.0, 0.0, 2.0])[k], 1.0))
    with pyro.plate("data", data.shape[0]):
        pyro.sample("obs", dist.Normal(z, 1.0), obs=data)


def discrete_guide(data):
    probs = pyro.param("k_probs", lambda: data.new_tensor([0.3, 0.3, 0.4]),
                       constraint=constraints.simplex)
    k = pyro.sample("k", dist.Categorical(probs))  # no rsample: a score-function site
    loc = pyro.param("z_loc", lambda: data.new_tensor([0.3, 0.1, -0.2]))
    pyro.sample("z", dist.Normal(loc[k], 0.5))
