"""Shared pieces of the benchmarks: the case tables, problem builders and hand-written floors.

Every (our loss, Pyro counterpart, problem) case is a row of a table that names the modules it
needs; a case whose module cannot be imported yet (a loss or problem still being written) is
reported as "not available" instead of failing the run.

SVI steps take an optimizer factory ``optim(lr) -> PyroOptim``: :func:`pyro_adam` (Pyro's
``pyro.optim.Adam``, one ``torch.optim.Adam`` per parameter, the default) or
:func:`grouped_adam` (:class:`pyro_elbo_ext.optim.GroupedOptim`, one ``torch.optim.Adam`` over
all parameters, the optimizer of the hand-written floors).  :func:`make_bound` builds the
benchmark-only :class:`~benchmarks._bound.LowerBoundELBO` for a problem.
"""

from __future__ import annotations

import copy
import importlib
import math
import platform
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import Bernoulli, Categorical, Normal, kl_divergence

StepFn = Callable[[], float]


class Unavailable(Exception):
    """A case cannot be built here (module missing, optional dependency not installed...)."""


def require(module: str):
    """Import ``module`` or raise :class:`Unavailable` naming it."""
    try:
        return importlib.import_module(module)
    except Exception as exc:  # ImportError, or a half-written module failing on import
        raise Unavailable(f"not available ({module}: {type(exc).__name__}: {exc})") from None


# ---------------------------------------------------------------------------- problems
@dataclass
class ProblemSpec:
    """How to build one benchmark problem and which floors/NumPyro ports it has.

    Attributes
    ----------
    name : str
        The key used in tables and on the command line.
    module : str
        The module holding the factory (checked for importability).
    build : callable
        ``build(**options) -> Problem``.
    floor : callable
        ``floor(problem, estimator, num_particles) -> loss_fn, leaves`` with
        ``loss_fn() -> Tensor`` the hand-written negative surrogate.
    numpyro : callable or None
        ``numpyro(problem, num_particles, run=False) -> step`` (NumPyro's jitted SVI update;
        with ``run=True`` its ``SVI.run`` loop), or None.
    description : str
        One line for the table.
    """

    name: str
    module: str
    build: Callable
    floor: Callable
    numpyro: Callable | None = None
    description: str = ""
    options: dict = field(default_factory=dict)


def _leaf(value: torch.Tensor) -> torch.Tensor:
    return value.detach().clone().requires_grad_(True)


def _nn_floor(problem, estimator: str, num_particles: int):
    """Floor for normal_normal (JensenELBO: log p + analytic entropy; KL: loglik - KL)."""
    (x,) = problem.args
    loc = _leaf(problem.init_params["loc"])
    log_scale = _leaf(problem.init_params["scale"].log())
    n = x.shape[0]
    sub = problem.notes.get("subsample_size")
    prior = Normal(x.new_tensor(0.0), x.new_tensor(2.0))

    def loss_fn():
        scale = log_scale.exp()
        q = Normal(loc, scale)
        z = q.rsample((num_particles,))
        if sub:
            idx = torch.randperm(n)[:sub]
            data, factor = x[idx], n / sub
        else:
            data, factor = x, 1.0
        loglik = Normal(z.unsqueeze(-1), 1.0).log_prob(data).sum(-1) * factor
        if estimator == "kl":
            elbo = loglik.mean() - kl_divergence(q, prior)
        else:
            elbo = (loglik + prior.log_prob(z)).mean() + q.entropy()
        return -elbo

    return loss_fn, [loc, log_scale]


def _logistic_floor(problem, estimator: str, num_particles: int):
    x, y = problem.args
    loc = _leaf(problem.init_params["w_loc"])
    log_scale = _leaf(problem.init_params["w_scale"].log())
    n, d = x.shape
    sub = problem.notes.get("subsample_size")
    prior = Normal(x.new_zeros(d), x.new_ones(d) * problem.notes.get("prior_scale", 1.0))

    def loss_fn():
        q = Normal(loc, log_scale.exp())
        w = q.rsample((num_particles,))  # (P, D)
        if sub:
            idx = torch.randperm(n)[:sub]
            xs, ys, factor = x[idx], y[idx], n / sub
        else:
            xs, ys, factor = x, y, 1.0
        logits = (xs * w.unsqueeze(-2)).sum(-1)  # (P, B), the model's own arithmetic
        loglik = Bernoulli(logits=logits).log_prob(ys).sum(-1) * factor
        if estimator == "kl":
            elbo = loglik.mean() - kl_divergence(q, prior).sum()
        else:
            elbo = (loglik + prior.log_prob(w).sum(-1)).mean() + q.entropy().sum()
        return -elbo

    return loss_fn, [loc, log_scale]


def _mlp(params: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    h = torch.tanh(x @ params[f"{prefix}$$$hidden.weight"].T + params[f"{prefix}$$$hidden.bias"])
    return h @ params[f"{prefix}$$$out.weight"].T + params[f"{prefix}$$$out.bias"]


def _vae_floor(problem, estimator: str, num_particles: int):
    (x,) = problem.args
    params = {name: _leaf(v) for name, v in problem.init_params.items()}
    latent = problem.notes["latent_dim"]

    def loss_fn():
        loc, raw = _mlp(params, "encoder", x).chunk(2, dim=-1)
        q = Normal(loc, torch.nn.functional.softplus(raw) + 1e-3)
        z = q.rsample((num_particles,))  # (P, N, d)
        logits = _mlp(params, "decoder", z)
        loglik = Bernoulli(logits=logits).log_prob(x).sum(-1)  # (P, N)
        prior = Normal(x.new_zeros(latent), x.new_ones(latent))
        if estimator == "kl":
            elbo = loglik.sum(-1).mean() - kl_divergence(q, prior).sum()
        else:
            elbo = (loglik + prior.log_prob(z).sum(-1)).sum(-1).mean() + q.entropy().sum()
        return -elbo

    return loss_fn, list(params.values())


def _attention_floor(problem, estimator: str, num_particles: int):
    coarse, patches, labels = problem.args
    nets = copy.deepcopy(problem.notes["networks"])
    attention, classifier = nets["attention"], nets["classifier"]
    n = coarse.shape[0]
    batch = problem.notes["batch_size"]
    factor = n / batch

    def loss_fn():
        idx = torch.randperm(n)[:batch]
        view, lab = coarse[idx], labels[idx]
        log_pl = torch.log_softmax(attention(view), -1)  # (B, L)
        if estimator == "enum":
            logits_y = classifier(patches[idx])  # (B, L, 10)
            log_py = torch.log_softmax(logits_y, -1).gather(
                -1, lab[:, None, None].expand(-1, logits_y.shape[1], 1)
            ).squeeze(-1)
            elbo = (log_pl.exp() * log_py).sum()
        else:
            where = Categorical(logits=log_pl).sample((num_particles,))  # (P, B)
            seen = patches[idx, where]  # (P, B, 64)
            log_py = torch.log_softmax(classifier(seen), -1).gather(
                -1, lab.expand(num_particles, -1).unsqueeze(-1)).squeeze(-1)
            log_l = log_pl.gather(-1, where.T).T  # (P, B)
            elbo = (log_py + log_l * log_py.detach()).sum(-1).mean()
        return -elbo * factor

    params = list(attention.parameters()) + list(classifier.parameters())
    return loss_fn, params


def _numpyro_normal_normal(problem, num_particles: int, run: bool = False):
    jax, jnp, numpyro, ndist = _numpyro()
    x = jnp.asarray(problem.args[0].numpy())
    sub = problem.notes.get("subsample_size")

    def model(data):
        z = numpyro.sample("z", ndist.Normal(0.0, 2.0))
        with numpyro.plate("data", data.shape[0], subsample_size=sub):
            batch = numpyro.subsample(data, event_dim=0)
            numpyro.sample("obs", ndist.Normal(z, 1.0), obs=batch)

    def guide(data):
        loc = numpyro.param("loc", 0.0)
        scale = numpyro.param("scale", 0.5, constraint=ndist.constraints.positive)
        numpyro.sample("z", ndist.Normal(loc, scale))

    return _numpyro_step(model, guide, (x,), num_particles, run)


def _numpyro_logistic(problem, num_particles: int, run: bool = False):
    jax, jnp, numpyro, ndist = _numpyro()
    xs = jnp.asarray(problem.args[0].numpy())
    ys = jnp.asarray(problem.args[1].numpy())
    sub = problem.notes.get("subsample_size")
    d = xs.shape[1]

    def model(x, y):
        w = numpyro.sample("w", ndist.Normal(jnp.zeros(d), jnp.ones(d)).to_event(1))
        with numpyro.plate("data", x.shape[0], subsample_size=sub):
            xb = numpyro.subsample(x, event_dim=1)
            yb = numpyro.subsample(y, event_dim=0)
            numpyro.sample("obs", ndist.Bernoulli(logits=(xb * w).sum(-1)), obs=yb)

    def guide(x, y):
        loc = numpyro.param("w_loc", jnp.zeros(d))
        scale = numpyro.param("w_scale", jnp.full(d, 0.5), constraint=ndist.constraints.positive)
        numpyro.sample("w", ndist.Normal(loc, scale).to_event(1))

    return _numpyro_step(model, guide, (xs, ys), num_particles, run)


def _numpyro():
    require("numpyro")
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as ndist

    return jax, jnp, numpyro, ndist


def _numpyro_step(model, guide, args, num_particles: int, run: bool = False) -> StepFn:
    """NumPyro's jitted ``SVI.update``; with ``run``, its ``SVI.run`` loop (several steps a
    call, see :func:`benchmarks._compiled.numpyro_run_step`)."""
    jax, _, numpyro, _ = _numpyro()
    from numpyro.infer import SVI, Trace_ELBO

    svi = SVI(model, guide, numpyro.optim.Adam(1e-3), Trace_ELBO(num_particles=num_particles))
    if run:
        from ._compiled import numpyro_run_step

        return numpyro_run_step(lambda _: (svi, args), num_particles)
    state = svi.init(jax.random.PRNGKey(0), *args)
    update = jax.jit(svi.update)
    holder = [state]

    def step() -> float:
        holder[0], loss = update(holder[0], *args)
        return float(loss)  # blocks until the update is done

    return step


def _build_normal_normal(num_data: int = 1000, subsample_size: int | None = None, **_):
    from pyro_elbo_ext.problems.conjugate import normal_normal

    problem = normal_normal(num_data=num_data, subsample_size=subsample_size)
    problem.notes["subsample_size"] = subsample_size
    return problem


def _build_logistic(num_data: int = 2000, num_features: int = 20,
                    subsample_size: int | None = None, **_):
    mod = require("pyro_elbo_ext.problems.logistic")
    problem = mod.logistic_regression(num_data=num_data, num_features=num_features,
                                      subsample_size=subsample_size)
    problem.notes.setdefault("subsample_size", subsample_size)
    return problem


def _build_vae(num_data: int = 100, **_):
    mod = require("pyro_elbo_ext.problems.vae")
    return mod.vae_digits(num_data=num_data)


def _build_attention(batch_size: int = 64, **_):
    mod = require("pyro_elbo_ext.problems.hard_attention")
    problem = mod.cluttered_digits(num_train=1000, num_test=100, batch_size=batch_size)
    problem.notes["batch_size"] = batch_size
    return problem


PROBLEMS: dict[str, ProblemSpec] = {
    spec.name: spec
    for spec in [
        ProblemSpec("normal_normal", "pyro_elbo_ext.problems.conjugate", _build_normal_normal,
                    _nn_floor, _numpyro_normal_normal, "Normal-Normal, N=1000"),
        ProblemSpec("logistic", "pyro_elbo_ext.problems.logistic", _build_logistic,
                    _logistic_floor, _numpyro_logistic, "logistic regression 2000x20, full batch"),
        ProblemSpec("logistic_sub", "pyro_elbo_ext.problems.logistic", _build_logistic,
                    _logistic_floor, _numpyro_logistic,
                    "logistic regression 2000x20, plate subsampled to 200",
                    options={"subsample_size": 200}),
        ProblemSpec("vae", "pyro_elbo_ext.problems.vae", _build_vae, _vae_floor, None,
                    "VAE on 100 binarized 8x8 digits, latent 2, hidden 16"),
        ProblemSpec("hard_attention", "pyro_elbo_ext.problems.hard_attention", _build_attention,
                    _attention_floor, None,
                    "cluttered 16x16 digits, 9 glimpse locations, batch 64 of 1000"),
    ]
}


# ---------------------------------------------------------------------------- loss pairings
def _elbo_kwargs(problem, num_particles: int) -> dict:
    vectorize = num_particles > 1
    return {"num_particles": num_particles, "vectorize_particles": vectorize,
            "max_plate_nesting": problem.max_plate_nesting}


def _ours(module: str, cls: str, **options):
    def make(problem, num_particles: int, jit: bool):
        loss_cls = getattr(require(module), cls)
        kwargs = _elbo_kwargs(problem, num_particles)
        if jit:
            kwargs["jit"] = True
        return loss_cls(**options, **kwargs), problem.model, problem.guide

    return make


def _pyro(name: str, jit_name: str, model_guide: Callable | None = None):
    def make(problem, num_particles: int, jit: bool):
        loss_cls = getattr(pyro.infer, jit_name if jit else name)
        kwargs = _elbo_kwargs(problem, num_particles)
        if "Enum" in name:
            kwargs["max_plate_nesting"] = problem.max_plate_nesting
        model, guide = (problem.model, problem.guide) if model_guide is None else model_guide(
            problem)
        return loss_cls(**kwargs), model, guide

    return make


def _enumerated_model(problem):
    """The hard-attention model with its attention site enumerated in parallel."""
    return pyro.infer.config_enumerate(problem.model, default="parallel"), problem.guide


def _attention_guide(problem):
    """A guide that proposes the attention site from the model's own distribution."""
    attention = problem.notes["networks"]["attention"]
    batch = problem.notes["batch_size"]

    def guide(coarse, patches, labels):
        pyro.module("attention", attention)
        with pyro.plate("data", coarse.shape[0], subsample_size=min(batch, coarse.shape[0])
                        ) as idx:
            pyro.sample("where", dist.Categorical(logits=attention(coarse[idx])))

    return problem.model, guide


@dataclass
class Pairing:
    """One of our losses, the Pyro ELBO it replaces, the floor's estimator and the targets.

    Attributes
    ----------
    ours, pyro : str
        Labels.
    module : str
        Our loss's module (checked for importability).
    make_ours, make_pyro : callable
        ``(problem, num_particles, jit) -> (elbo, model, guide)``.
    floor : str
        The floor's estimator for :attr:`ProblemSpec.floor`.
    problems : tuple of str
        Problem keys this pairing runs on.
    eager_target : float
        Target of (our eager step) / (Pyro eager step).
    bound_na : str or None
        Why :class:`~benchmarks._bound.LowerBoundELBO` is no bound for this loss (e.g.
        enumeration, which the bound does not do), or None when it is.
    """

    ours: str
    pyro: str
    module: str
    make_ours: Callable
    make_pyro: Callable
    floor: str
    problems: tuple[str, ...]
    eager_target: float = 0.8
    bound_na: str | None = None


_SMOOTH = ("normal_normal", "logistic", "logistic_sub", "vae")
PAIRINGS: list[Pairing] = [
    Pairing("JensenELBO", "Trace_ELBO", "pyro_elbo_ext.elbos.jensen",
            _ours("pyro_elbo_ext.elbos.jensen", "JensenELBO"),
            _pyro("Trace_ELBO", "JitTrace_ELBO"), "jensen", _SMOOTH),
    Pairing("AnalyticKLELBO", "TraceMeanField_ELBO", "pyro_elbo_ext.elbos.analytic_kl",
            _ours("pyro_elbo_ext.elbos.analytic_kl", "AnalyticKLELBO"),
            _pyro("TraceMeanField_ELBO", "JitTraceMeanField_ELBO"), "kl", _SMOOTH),
    Pairing("HardAttentionELBO(enum)", "TraceEnum_ELBO", "pyro_elbo_ext.elbos.hard_attention",
            _ours("pyro_elbo_ext.elbos.hard_attention", "HardAttentionELBO", estimator="enum"),
            _pyro("TraceEnum_ELBO", "JitTraceEnum_ELBO", _enumerated_model), "enum",
            ("hard_attention",), bound_na="n/a (enumeration)"),
    Pairing("HardAttentionELBO(reinforce)", "TraceGraph_ELBO",
            "pyro_elbo_ext.elbos.hard_attention",
            _ours("pyro_elbo_ext.elbos.hard_attention", "HardAttentionELBO",
                  estimator="reinforce"),
            _pyro("TraceGraph_ELBO", "JitTraceGraph_ELBO", _attention_guide), "reinforce",
            ("hard_attention",), eager_target=0.3),
]


def make_bound(problem, num_particles: int):
    """``(LowerBoundELBO, model, guide)``: the bound on the model and guide our losses run.

    With ``entropy="analytic"``: closed-form entropies where the guide's distributions have
    them, the cheapest per-site arithmetic of our losses (JensenELBO's default estimator).

    The particles are vectorized as for the other contestants (:func:`_elbo_kwargs`).
    """
    from ._bound import LowerBoundELBO

    return (LowerBoundELBO(entropy="analytic", **_elbo_kwargs(problem, num_particles)),
            problem.model, problem.guide)


# ---------------------------------------------------------------------------- step functions
def pyro_adam(lr: float):
    """Pyro's ``pyro.optim.Adam({"lr": lr})``: one ``torch.optim.Adam`` per parameter."""
    return pyro.optim.Adam({"lr": lr})


def grouped_adam(lr: float):
    """``GroupedOptim(torch.optim.Adam, {"lr": lr})``: one ``torch.optim.Adam`` for all
    parameters (the same steps as :func:`pyro_adam`, bit for bit)."""
    return require("pyro_elbo_ext.optim").GroupedOptim(torch.optim.Adam, {"lr": lr})


def svi_step(elbo, model, guide, args, lr: float = 1e-3,
             optim: Callable | None = None) -> StepFn:
    """One ``pyro.infer.SVI`` step (loss, backward, Adam) as a closure.

    Parameters
    ----------
    elbo, model, guide, args
        The loss, the model and guide, and their positional arguments.
    lr : float
        Adam's learning rate.
    optim : callable, optional
        ``optim(lr) -> PyroOptim``; :func:`pyro_adam` (``pyro.optim.Adam({"lr": lr})``) when
        None, :func:`grouped_adam` for one torch optimizer over all parameters.
    """
    svi = pyro.infer.SVI(model, guide, (optim or pyro_adam)(lr), loss=elbo)
    return lambda: svi.step(*args)


def floor_step(loss_fn: Callable[[], torch.Tensor], leaves: list, lr: float = 1e-3) -> StepFn:
    """One hand-written step: zero grads, loss, backward, ``torch.optim.Adam``."""
    optim = torch.optim.Adam(leaves, lr=lr)

    def step() -> float:
        optim.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        optim.step()
        return float(loss)

    return step


#: which clock :func:`time_calls` reports: "cpu" (process CPU time, immune to preemption by
#: other processes on a shared machine) or "wall"
CLOCK = {"name": "cpu"}


def time_calls(fn: Callable[[], object], repeat: int, both: bool = False):
    """Seconds per call of ``fn``, averaged over ``repeat`` back-to-back calls.

    The clock is ``CLOCK["name"]``: ``"cpu"`` is :func:`time.process_time` (CPU time of every
    thread of this process: what a step costs, whatever else the machine runs), ``"wall"`` is
    :func:`time.perf_counter`. With ``both=True`` returns ``(selected, wall, cpu)``.
    """
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(repeat):
        fn()
    wall = (time.perf_counter() - wall0) / repeat
    cpu = (time.process_time() - cpu0) / repeat
    selected = cpu if CLOCK["name"] == "cpu" else wall
    return (selected, wall, cpu) if both else selected


@contextmanager
def single_thread_no_validation() -> Iterator[None]:
    """One torch thread, Pyro validation off and warnings silenced; restored on exit
    (validation is switched back on)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    pyro.enable_validation(False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.set_num_threads(previous)
        pyro.enable_validation(True)


def machine_info(probe_numpyro: bool = True) -> dict:
    """Machine, versions and thread settings, for the output files.

    Parameters
    ----------
    probe_numpyro : bool
        Import NumPyro and JAX to report their versions (slow to import; off in smoke runs).
    """
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    try:
        import os

        info["cpu_count"] = os.cpu_count()
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if not probe_numpyro:
        info["numpyro"] = "not probed"
        return info
    try:
        import jax
        import numpyro

        info["numpyro"] = numpyro.__version__
        info["jax"] = jax.__version__
    except Exception:
        info["numpyro"] = "not installed"
    return info


def median(values: list[float]) -> float:
    """The median (nan for an empty list)."""
    values = sorted(v for v in values if not math.isnan(v))
    if not values:
        return math.nan
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile (nan for an empty list)."""
    values = sorted(v for v in values if not math.isnan(v))
    if not values:
        return math.nan
    pos = q * (len(values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)
