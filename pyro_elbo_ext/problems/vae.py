"""A small variational autoencoder on scikit-learn's bundled 8x8 digits (no download)."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.params.param_store import param_with_module_name
from torch import nn

from .._extras import require
from .base import Problem


class _Encoder(nn.Module):
    """x (64 pixels) -> hidden -> (loc, scale) of q(z | x)."""

    def __init__(self, num_pixels: int, hidden: int, latent: int):
        super().__init__()
        self.hidden = nn.Linear(num_pixels, hidden)
        self.out = nn.Linear(hidden, 2 * latent)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.hidden(x))
        loc, raw_scale = self.out(h).chunk(2, dim=-1)
        return loc, nn.functional.softplus(raw_scale) + 1e-3


class _Decoder(nn.Module):
    """z -> hidden -> Bernoulli logits of the 64 pixels."""

    def __init__(self, latent: int, hidden: int, num_pixels: int):
        super().__init__()
        self.hidden = nn.Linear(latent, hidden)
        self.out = nn.Linear(hidden, num_pixels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(z)))


def load_binarized_digits(
    num_data: int | None = 100, seed: int = 0, threshold: float = 8.0
) -> torch.Tensor:
    """scikit-learn's 8x8 digits (1797 images, grey levels 0..16) binarized at ``threshold``.

    Returns a float64 tensor of shape ``(num_data, 64)`` with a seeded random subset of the
    images (all of them when ``num_data`` is None).
    """
    datasets = require("sklearn.datasets", "compare", "the digits data set")
    images = torch.as_tensor(datasets.load_digits().data, dtype=torch.float64)
    if num_data is not None:
        if not 1 <= num_data <= images.shape[0]:
            raise ValueError(f"num_data must be in 1..{images.shape[0]}, got {num_data}")
        order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
        images = images[order[:num_data]]
    return (images > threshold).to(torch.float64)


def vae_digits(
    num_data: int = 100,
    latent_dim: int = 2,
    hidden_dim: int = 16,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> Problem:
    """A VAE (Kingma & Welling 2013, arXiv:1312.6114) on binarized 8x8 digits.

    Model, for each image x_i (plate ``data``)::

        z_i ~ Normal(0, I_d)                              (d = latent_dim)
        x_i | z_i ~ Bernoulli(logits = decoder(z_i))      (64 independent pixels)

    Amortized guide: q(z_i | x_i) = Normal(loc(x_i), diag scale(x_i)^2) with
    ``(loc, scale) = encoder(x_i)``.  Encoder and decoder are one-hidden-layer tanh MLPs
    registered with ``pyro.module(..., update_module_params=True)``, so their weights are the
    param store's leaves (``"encoder$$$hidden.weight"``, ...) and ``Problem.set_params`` and the
    gradient statistics see them like any other parameter.

    L (the sum over images of E_q[log p(x_i | z_i)] - KL[q(z_i | x_i) || p(z_i)]) and
    log p(X) have no closed form, so ``exact_elbo`` and ``log_evidence`` are None; compare
    against a many-sample reference gradient instead.
    """
    dtype = dtype or torch.get_default_dtype()
    x = load_binarized_digits(num_data, seed).to(dtype=dtype, device=device)
    num_pixels = x.shape[-1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = _Encoder(num_pixels, hidden_dim, latent_dim).to(dtype=dtype, device=device)
        decoder = _Decoder(latent_dim, hidden_dim, num_pixels).to(dtype=dtype, device=device)

    def model(data):
        net = pyro.module("decoder", decoder, update_module_params=True)
        with pyro.plate("data", data.shape[0]):
            prior = dist.Normal(data.new_zeros(latent_dim), data.new_ones(latent_dim))
            z = pyro.sample("z", prior.to_event(1))
            pyro.sample("obs", dist.Bernoulli(logits=net(z)).to_event(1), obs=data)

    def guide(data):
        net = pyro.module("encoder", encoder, update_module_params=True)
        loc, scale = net(data)
        with pyro.plate("data", data.shape[0]):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    init_params = {
        param_with_module_name(module_name, name): value.detach().clone()
        for module_name, net in (("encoder", encoder), ("decoder", decoder))
        for name, value in net.named_parameters()
    }
    return Problem(
        name="vae_digits",
        description="small VAE on binarized 8x8 digits; amortized Normal guide (encoder MLP)",
        model=model,
        guide=guide,
        args=(x,),
        init_params=init_params,
        max_plate_nesting=1,
        notes={"latent_dim": latent_dim, "hidden_dim": hidden_dim, "num_data": x.shape[0],
               "data": "sklearn.datasets.load_digits, pixels > 8 -> 1"},
    )


def binary_vae_digits(
    num_data: int = 100,
    latent_dim: int = 16,
    hidden_dim: int = 32,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> Problem:
    """A VAE with binary latents on binarized 8x8 digits (a discrete guide site per image).

    Model, for each image x_i (plate ``data``)::

        z_i ~ Bernoulli(1/2)^d                            (d = latent_dim bits)
        x_i | z_i ~ Bernoulli(logits = decoder(z_i))      (64 independent pixels)

    Amortized guide: q(z_i | x_i) = Bernoulli(logits = encoder(x_i)), one score-function
    site per image.  The networks are as in :func:`vae_digits` (the encoder's output layer
    gives the d logits) and are the param store's leaves (``"encoder$$$out.bias"``, ...).
    No closed form for L.
    """
    dtype = dtype or torch.get_default_dtype()
    x = load_binarized_digits(num_data, seed).to(dtype=dtype, device=device)
    num_pixels = x.shape[-1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = nn.Sequential(nn.Linear(num_pixels, hidden_dim), nn.Tanh(),
                                nn.Linear(hidden_dim, latent_dim)).to(dtype=dtype,
                                                                       device=device)
        decoder = _Decoder(latent_dim, hidden_dim, num_pixels).to(dtype=dtype, device=device)

    def model(data):
        net = pyro.module("decoder", decoder, update_module_params=True)
        with pyro.plate("data", data.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(data.new_full((latent_dim,), 0.5)).to_event(1))
            pyro.sample("obs", dist.Bernoulli(logits=net(z)).to_event(1), obs=data)

    def guide(data):
        net = pyro.module("encoder", encoder, update_module_params=True)
        with pyro.plate("data", data.shape[0]):
            pyro.sample("z", dist.Bernoulli(logits=net(data)).to_event(1))

    init_params = {
        param_with_module_name(module_name, name): value.detach().clone()
        for module_name, net in (("encoder", encoder), ("decoder", decoder))
        for name, value in net.named_parameters()
    }
    return Problem(
        name="binary_vae_digits",
        description="VAE with binary latents on binarized 8x8 digits; amortized Bernoulli guide",
        model=model,
        guide=guide,
        args=(x,),
        init_params=init_params,
        max_plate_nesting=1,
        notes={"latent_dim": latent_dim, "hidden_dim": hidden_dim, "num_data": x.shape[0]},
    )


__all__ = ["binary_vae_digits", "load_binarized_digits", "vae_digits"]
