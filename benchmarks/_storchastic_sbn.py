"""Storchastic's estimators on the digits benchmark's SBN, in a separate interpreter.

Run by ``benchmarks/discrete_digits.py`` with ``--storchastic-python PYTHON`` (an interpreter
that has ``storchastic`` installed, e.g. a scratch venv); nothing of this package imports
Storchastic (AGPL-3.0), and none of its code is copied: this script only calls its public API
(``storch.method.*``, ``storch.add_cost``, ``storch.backward``).

``python _storchastic_sbn.py SPEC RESULT``: SPEC (``torch.save``'d by the benchmark) holds the
initial parameters, the training images, the benchmark's options and the methods to run;
RESULT receives, per method, the training curve, the encoder-gradient variance along training
and the final parameters (scored by the benchmark with the same code as every contestant).

The model is the benchmark's: prior logits a, h ~ Bernoulli(sigmoid(a)), x | h ~
Bernoulli(sigmoid(W h + c)); guide q(h | x) = Bernoulli(sigmoid(V x + d)); the costs handed to
Storchastic are -log p(x | h) - log p(h) (downstream of the sample) and -H[q(h | x)] (analytic),
so its objective is the same L as ``JensenELBO(entropy="analytic")``'s; Storchastic averages
the costs over the batch, so its gradients are per image, as the benchmark reports every
contestant's.

``python _storchastic_sbn.py --check-toy``: each Storchastic estimator's mean gradient on the
three-site toy of ``benchmarks/discrete_toys.py`` (targets 0.499, 0.45, 0.55, interaction 0.1),
against the exact gradient by enumeration, printed as z-scores (JSON).
"""

from __future__ import annotations

import itertools
import json
import math
import sys
import time

import storch
import torch
from storch.method import REBAR, RELAX, DisARM, ScoreFunction
from torch.distributions import Bernoulli

TARGETS = torch.tensor([0.499, 0.45, 0.55])


def make_method(name: str, particles: int, latent: int):
    if name == "reinforce":
        return ScoreFunction("h", n_samples=particles)
    if name == "loo":
        return ScoreFunction("h", n_samples=particles, baseline_factory="batch_average")
    if name == "relax":
        return RELAX("h", n_samples=particles, in_dim=(latent,))
    if name == "rebar":
        return REBAR("h", n_samples=particles)
    if name == "disarm":
        return DisARM("h", n_samples=max(particles // 2, 1))
    raise ValueError(f"unknown method {name!r}")


def toy_f(b):
    return ((b - TARGETS) ** 2).sum(-1) + 0.1 * b[..., 0] * b[..., 1]


def check_toy(draws: int = 3000) -> dict:
    logits0 = torch.tensor([0.3, -0.5, 1.0])
    configs = torch.tensor(list(itertools.product((0.0, 1.0), repeat=3)))
    leaf = logits0.clone().requires_grad_(True)
    log_q = Bernoulli(logits=leaf).log_prob(configs).sum(-1)
    (exact,) = torch.autograd.grad((log_q.exp() * toy_f(configs)).sum(), leaf)
    out = {"exact": exact.tolist()}
    for name in ("reinforce", "loo", "disarm", "relax", "rebar"):
        method = make_method(name, 2, 3)
        rows = []
        for _ in range(draws):
            eta = logits0.clone().requires_grad_(True)
            b = method(Bernoulli(logits=eta))
            if b.dtype == torch.bool:
                b = b.float()
            storch.add_cost(toy_f(b), "cost")
            storch.backward()
            rows.append(eta.grad.detach().clone())
        g = torch.stack(rows)
        z = (g.mean(0) - exact) / (g.std(0) / math.sqrt(draws))
        out[name] = {"mean": g.mean(0).tolist(), "max_abs_z": float(z.abs().max())}
    return out


class SBN(torch.nn.Module):
    def __init__(self, params: dict):
        super().__init__()
        enc_w, dec_w = params["sbn_encoder$$$body.weight"], params["sbn_decoder$$$body.weight"]
        self.encoder = torch.nn.Linear(enc_w.shape[1], enc_w.shape[0])
        self.decoder = torch.nn.Linear(dec_w.shape[1], dec_w.shape[0])
        self.prior = torch.nn.Parameter(params["sbn_prior_logits"].clone())
        with torch.no_grad():
            self.encoder.weight.copy_(enc_w)
            self.encoder.bias.copy_(params["sbn_encoder$$$body.bias"])
            self.decoder.weight.copy_(dec_w)
            self.decoder.bias.copy_(params["sbn_decoder$$$body.bias"])

    def params_by_name(self) -> dict:
        return {"sbn_prior_logits": self.prior.detach().clone(),
                "sbn_encoder$$$body.weight": self.encoder.weight.detach().clone(),
                "sbn_encoder$$$body.bias": self.encoder.bias.detach().clone(),
                "sbn_decoder$$$body.weight": self.decoder.weight.detach().clone(),
                "sbn_decoder$$$body.bias": self.decoder.bias.detach().clone()}


def step_costs(model: SBN, method, x: torch.Tensor) -> float:
    """Add this batch's costs; return the per-image estimate of L (a float)."""
    data = storch.denote_independent(x, 0, "data")
    q = Bernoulli(logits=model.encoder(data))
    h = method(q)
    if h.dtype == torch.bool:
        h = h.float()
    log_px = Bernoulli(logits=model.decoder(h)).log_prob(data).sum(-1)
    log_ph = Bernoulli(logits=model.prior).log_prob(h).sum(-1)
    entropy = q.entropy().sum(-1)
    storch.add_cost(-(log_px + log_ph), "reconstruction_and_prior")
    storch.add_cost(-entropy, "entropy")
    value = (log_px + log_ph)._tensor.detach().mean() + entropy._tensor.detach().mean()
    return float(value)


def encoder_variance(spec_params, state, name, opts, x) -> float:
    rows = []
    for _ in range(opts["variance_draws"]):
        model = SBN(spec_params)
        model.load_state_dict(state)
        method = make_method(name, opts["particles"], model.prior.shape[0])
        step_costs(model, method, x)
        storch.backward()
        rows.append(torch.cat([model.encoder.weight.grad.reshape(-1),
                               model.encoder.bias.grad.reshape(-1)]))
    return float(torch.stack(rows).var(0).sum())


def train(spec: dict, name: str) -> dict:
    opts, x = spec["options"], spec["train"]
    torch.manual_seed(opts["seed"])
    model = SBN(spec["init_params"])
    method = make_method(name, opts["particles"], model.prior.shape[0])
    optimizer = torch.optim.Adam(list(model.parameters()) + list(method.parameters()),
                                 lr=opts["lr"])
    order = torch.Generator().manual_seed(opts["seed"])
    fixed = x[:opts["batch"]]
    marks = [opts["budget"] * f for f in (0.0, 0.25, 0.5, 0.75, 1.0)]
    elapsed, step, curve, variance, running = 0.0, 0, [], [], None
    while True:
        while marks and elapsed >= marks[0]:
            state = {k: v.clone() for k, v in model.state_dict().items()}
            variance.append({"time": elapsed, "step": step, "variance": encoder_variance(
                spec["init_params"], state, name, opts, fixed)})
            marks.pop(0)
        if not marks:
            break
        idx = torch.randint(0, x.shape[0], (opts["batch"],), generator=order)
        start = time.perf_counter()
        optimizer.zero_grad()
        value = step_costs(model, method, x[idx])
        storch.backward()
        optimizer.step()
        if step > 0:  # as the benchmark: the first step's set-up is not counted
            elapsed += time.perf_counter() - start
        step += 1
        running = value if running is None else 0.98 * running + 0.02 * value
        if step % 10 == 0:
            curve.append({"time": elapsed, "step": step, "train_estimate": running})
    return {"name": f"storchastic {name}", "description": f"Storchastic 0.3.7 {name}",
            "biased": False, "steps": step, "train_time": elapsed, "curve": curve,
            "variance": variance, "final_params": model.params_by_name()}


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    if argv[:1] == ["--check-toy"]:
        print(json.dumps(check_toy()))
        return
    spec = torch.load(argv[0], weights_only=False)
    runs = [train(spec, name) for name in spec["methods"]]
    torch.save(runs, argv[1])


if __name__ == "__main__":
    main(sys.argv[1:])
