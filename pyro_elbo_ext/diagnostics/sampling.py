"""Vectorized draws from a guide, the model replayed on them, and per-draw log densities.

This module knows nothing of ArviZ: it returns tensors with their dimension names, and
:mod:`.inference_data` turns them into an :class:`arviz.InferenceData`.

All ``num_samples`` draws are taken at once under an outer ``pyro.plate`` placed left of the
model's own plates (``dim = -(max_plate_nesting + 1)``), the device used by
``pyro.infer.Predictive(parallel=True)``; there is no Python loop over draws.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
from pyro.poutine.uncondition_messenger import UnconditionMessenger
from pyro.poutine.util import prune_subsample_sites

#: name of the outer plate over draws (chosen not to clash with a user's plate)
DRAWS_PLATE = "_elbo_ext_draws"


SUPPORT_HINT = (
    "The guide's draws may lie outside the model's support (e.g. a Normal guide for a "
    "positive latent): give the guide a distribution with the model's support, or use an "
    "AutoGuide. "
)


class SamplingError(RuntimeError):
    """The guide (or the model replayed on its draws) could not be run with the given arguments.

    Attributes
    ----------
    role : str
        ``"guide"`` or ``"model"``.
    callable_name : str
        The name of the guide or model.
    site : str or None
        The sample site being run when the error happened (or the last one completed).
    """

    def __init__(self, message: str, role: str, callable_name: str, site: str | None):
        super().__init__(message)
        self.role = role
        self.callable_name = callable_name
        self.site = site


@dataclass
class SiteArray:
    """One site's per-draw values with named dimensions.

    Attributes
    ----------
    values : Tensor, shape ``(num_samples, *shape)``
    dims : tuple of str
        Names of the dimensions after the draw dimension (plate names where a plate owns the
        dimension).
    """

    values: torch.Tensor
    dims: tuple[str, ...]


@dataclass
class GuideDraws:
    """Everything :func:`draw_from_guide` computed, keyed by site name.

    Attributes
    ----------
    num_samples, max_plate_nesting : int
    latent, deterministic : dict of str to SiteArray
        Model latent sites (the guide's draws, replayed) and ``pyro.deterministic`` sites.
    predictive : dict of str to SiteArray
        Observed sites re-sampled from the model given each draw (``poutine.uncondition``).
    observed : dict of str to SiteArray
        The observed values (``values`` without the draw dimension).
    log_likelihood : dict of str to SiteArray
        Pointwise log p(x | z) of each observed site, per draw and per plate element.
    log_joint, log_q, log_prior : Tensor, shape (num_samples,)
        log p(X, Z), log q(Z) (every guide sample site, auxiliary ones included) and log p(Z).
    point_mass_guide : bool
        Every guide sample site is a Delta (e.g. ``AutoDelta``): q has no density.
    plate_sizes : dict of str to int
    """

    num_samples: int
    max_plate_nesting: int
    latent: dict[str, SiteArray] = field(default_factory=dict)
    deterministic: dict[str, SiteArray] = field(default_factory=dict)
    predictive: dict[str, SiteArray] = field(default_factory=dict)
    observed: dict[str, SiteArray] = field(default_factory=dict)
    log_likelihood: dict[str, SiteArray] = field(default_factory=dict)
    log_joint: torch.Tensor | None = None
    log_q: torch.Tensor | None = None
    log_prior: torch.Tensor | None = None
    point_mass_guide: bool = False
    plate_sizes: dict[str, int] = field(default_factory=dict)

    @property
    def log_weight(self) -> torch.Tensor:
        """log w = log p(X, Z) - log q(Z), per draw."""
        return self.log_joint - self.log_q


def check_num_samples(num_samples) -> int:
    """``num_samples`` as an int >= 1, else a ValueError naming it."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    return num_samples


def callable_name(fn: Callable) -> str:
    """A readable name for a model or guide (an AutoGuide's class name)."""
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return name if isinstance(name, str) else type(fn).__name__


class _SiteRecorder(Messenger):
    """Remembers the sample site being run and the last one completed."""

    def __init__(self):
        super().__init__()
        self.current: str | None = None
        self.last: str | None = None

    def _pyro_sample(self, msg):
        if not _is_subsample(msg):
            self.current = msg["name"]

    def _pyro_post_sample(self, msg):
        if not _is_subsample(msg):
            self.last, self.current = msg["name"], None


def _is_subsample(msg) -> bool:
    return isinstance(msg["fn"], _Subsample)


class _UnconditionObserved(UnconditionMessenger):
    """``poutine.uncondition`` that leaves ``pyro.deterministic`` sites alone."""

    def _pyro_sample(self, msg):
        if not (msg["infer"] or {}).get("_deterministic", False):
            super()._pyro_sample(msg)


def _describe_args(args, kwargs) -> str:
    def one(a):
        return f"Tensor{tuple(a.shape)}" if torch.is_tensor(a) else type(a).__name__

    parts = [one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()]
    return "(" + ", ".join(parts) + ")"


def _run(fn, role, args, kwargs, hint, wrap=None):
    """Trace ``fn(*args, **kwargs)`` (wrapped by ``wrap``), turning a failure into SamplingError."""
    recorder = _SiteRecorder()
    runnable = fn if wrap is None else wrap(fn)
    try:
        with recorder:
            return prune_subsample_sites(poutine.trace(runnable).get_trace(*args, **kwargs))
    except SamplingError:
        raise
    except Exception as error:
        name = callable_name(fn)
        if recorder.current is not None:
            where, site = f"at sample site '{recorder.current}'", recorder.current
        elif recorder.last is not None:
            where, site = f"after sample site '{recorder.last}'", recorder.last
        else:
            where, site = "before its first sample site", None
        raise SamplingError(
            f"could not run the {role} '{name}' with arguments {_describe_args(args, kwargs)}: "
            f"it failed {where} with {type(error).__name__}: {error}. {hint}",
            role,
            name,
            site,
        ) from error


def _draws_plate(fn, num_samples: int, max_plate_nesting: int):
    def vectorized(*args, **kwargs):
        with pyro.plate(DRAWS_PLATE, num_samples, dim=-(max_plate_nesting + 1)):
            return fn(*args, **kwargs)

    return vectorized


def _sample_sites(trace):
    return {name: site for name, site in trace.nodes.items() if site["type"] == "sample"}


def _is_deterministic(site) -> bool:
    return bool(site["infer"].get("_deterministic", False))


def _frames(site):
    return [f for f in site["cond_indep_stack"] if f.vectorized and f.name != DRAWS_PLATE]


def _guess_max_plate_nesting(*traces) -> int:
    """The deepest plate dim, or batch rank, of any sample site of the un-vectorized traces."""
    deepest = 0
    for trace in traces:
        for site in _sample_sites(trace).values():
            for frame in _frames(site):
                deepest = max(deepest, -frame.dim)
            if not _is_deterministic(site):
                deepest = max(deepest, len(site["fn"].batch_shape))
    return deepest


def _check_no_subsampling(trace, role, name):
    for site in _sample_sites(trace).values():
        for frame in _frames(site):
            if frame.full_size is not None and frame.full_size != frame.size:
                raise ValueError(
                    f"plate '{frame.name}' of the {role} '{name}' subsamples {frame.size} of "
                    f"{frame.full_size} elements (at site '{site['name']}'); diagnostics need "
                    "the full data: build the model and guide without subsample_size"
                )


def _is_point_mass(fn) -> bool:
    while True:
        if isinstance(fn, dist.Delta):
            return True
        inner = getattr(fn, "base_dist", None)
        if inner is None:
            return False
        fn = inner


def _dim_names(site_name, shape, batch_ndim, frames, user_dims):
    """Name each dim of a per-draw ``shape``; plate dims get the plate's name.

    Returns the names and the positions of batch dims of size 1 that no plate owns (dropped).
    """
    by_dim = {f.dim: f for f in frames}
    names, drop, k = [], [], 0
    for i, size in enumerate(shape):
        frame = by_dim.get(i - batch_ndim) if i < batch_ndim else None
        if frame is not None and frame.size == size:
            names.append(frame.name)
        elif i < batch_ndim and size == 1:
            drop.append(i)
        else:
            names.append(f"{site_name}_dim_{k}")
            k += 1
    if user_dims is not None and site_name in user_dims:
        given = tuple(user_dims[site_name])
        if len(given) != len(names):
            kept = tuple(s for i, s in enumerate(shape) if i not in drop)
            raise ValueError(
                f"dims['{site_name}'] = {list(given)} names {len(given)} dimension(s), but the "
                f"site has per-draw shape {kept} (default names {names}); give one name per "
                "dimension"
            )
        names = list(given)
    return tuple(names), drop


def _per_draw(site_name, value, num_samples, shape):
    """Reshape a vectorized value to (num_samples, *shape)."""
    numel = math.prod(shape)
    if value.numel() == num_samples * numel:
        return value.reshape((num_samples, *shape))
    if value.numel() == numel:  # does not depend on the draws
        return value.reshape(shape).expand((num_samples, *shape))
    raise ValueError(
        f"site '{site_name}' has shape {tuple(value.shape)} under {num_samples} vectorized draws, "
        f"which is not (draws, {shape}); make it broadcast over leading batch dimensions "
        "(e.g. index with `...`, reduce with dim=-1, not over all dims)"
    )


def _check_deterministic_has_draws(site_name, vectorized, single, num_samples):
    """A deterministic value without a draws dimension must be a constant, not a reduction.

    ``single`` is the value from one ordinary (non-vectorized) run: a constant gives the same
    value in both runs, while a value reduced over all dimensions (e.g. ``z.sum()``) mixes the
    draws together and almost surely differs from it.
    """
    if num_samples == 1 or vectorized.numel() != single.numel():
        return
    vectorized = vectorized.reshape(single.shape).to(single.dtype)
    if not torch.allclose(vectorized, single, equal_nan=True):
        raise ValueError(
            f"deterministic site '{site_name}' depends on the latent draws but has no draws "
            f"dimension (shape {tuple(vectorized.shape)} under {num_samples} vectorized draws): "
            "it reduces over all dimensions; reduce over the event/plate dims only "
            "(e.g. z.sum(-1) instead of z.sum()) so each draw keeps its own value"
        )


def _squeeze(values, drop):
    # values has the draw dim first, so per-draw position i is tensor dim i + 1
    for i in sorted(drop, reverse=True):
        values = values.squeeze(i + 1)
    return values


def _sum_per_draw(name, log_prob, num_samples, max_plate_nesting):
    """Sum a site's vectorized log_prob over everything but the draws dimension."""
    if not torch.is_tensor(log_prob):
        log_prob = torch.as_tensor(log_prob)
    if log_prob.dim() <= max_plate_nesting:
        return log_prob.sum().expand(num_samples)
    lead = log_prob.shape[: log_prob.dim() - max_plate_nesting]
    if len(lead) != 1 or lead[0] not in (1, num_samples):
        raise ValueError(
            f"site '{name}' has log_prob shape {tuple(log_prob.shape)}, with batch dims left of "
            f"the {max_plate_nesting} plate dim(s); declare every batch dim with a pyro.plate, "
            "use .to_event() for event dims, or pass max_plate_nesting="
        )
    return log_prob.reshape(lead[0], -1).sum(-1).expand(num_samples)


def _zeros(num_samples, trace):
    """Zeros of the dtype and device of the trace's first log density (default dtype if none)."""
    for site in _sample_sites(trace).values():
        if torch.is_tensor(site.get("log_prob")):
            lp = site["log_prob"]
            return torch.zeros(num_samples, dtype=lp.dtype, device=lp.device)
    return torch.zeros(num_samples, dtype=torch.get_default_dtype())


def _compute_log_probs(trace, role, name, hint):
    """Each sample site's log_prob, with an error naming the site that fails."""
    for site_name in _sample_sites(trace):
        try:
            trace.compute_log_prob(site_filter=lambda n, _s, target=site_name: n == target)
        except (ValueError, RuntimeError) as error:
            support = SUPPORT_HINT if role == "model" else ""
            raise SamplingError(
                f"the log density of site '{site_name}' in the {role} '{name}' failed on the "
                f"guide's draws with {type(error).__name__}: {error}. {support}{hint}",
                role,
                name,
                site_name,
            ) from error


def draw_from_guide(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    num_samples: int,
    max_plate_nesting: int | None = None,
    dims: dict[str, list[str]] | None = None,
) -> GuideDraws:
    """Draw ``num_samples`` latents from ``guide`` at once and replay ``model`` on them.

    Parameters
    ----------
    model, guide : callable
        Ordinary Pyro callables taking ``*args, **kwargs``.
    args, kwargs
        Their inputs.
    num_samples : int
        Number of draws (>= 1).
    max_plate_nesting : int, optional
        Plate dims the model uses; guessed from one un-vectorized run when omitted.
    dims : dict of str to list of str, optional
        Names overriding the per-draw dimension names of a site.

    Returns
    -------
    GuideDraws

    Raises
    ------
    ValueError
        For ``num_samples`` < 1, subsampled plates, a model latent the guide does not sample,
        or site shapes that do not broadcast over the draws.
    SamplingError
        When the guide, or the model replayed on its draws, cannot be run.
    """
    num_samples = check_num_samples(num_samples)
    guide_name, model_name = callable_name(guide), callable_name(model)
    same_args = (
        "Pass the arguments the guide takes (the model and guide of SVI are called with the "
        "same *args and **kwargs), and check that the guide's sites match the model's."
    )
    with torch.no_grad():
        plain_guide = _run(guide, "guide", args, kwargs, same_args)
        plain_model = _run(
            model, "model", args, kwargs, SUPPORT_HINT + same_args,
            wrap=lambda fn: poutine.replay(fn, trace=plain_guide),
        )
        _check_no_subsampling(plain_model, "model", model_name)
        _check_no_subsampling(plain_guide, "guide", guide_name)
        model_sites, guide_sites = _sample_sites(plain_model), _sample_sites(plain_guide)
        missing = [
            n for n, s in model_sites.items()
            if not s["is_observed"] and not _is_deterministic(s) and n not in guide_sites
        ]
        if missing:
            raise ValueError(
                f"the guide '{guide_name}' does not sample the model's latent site(s) {missing}; "
                "an importance weight p(X, Z) / q(Z) needs q over every latent: add the "
                "site(s) to the guide (an AutoGuide covers every latent)"
            )
        if max_plate_nesting is None:
            max_plate_nesting = _guess_max_plate_nesting(plain_model, plain_guide)

        vector_hint = (
            f"The guide and model run once but not under an outer pyro.plate of {num_samples} "
            f"draws at dim {-(max_plate_nesting + 1)}: make them broadcast over leading batch "
            "dims (declare plates, index with `...`, no .item() or Python branching on sampled "
            "values), or pass max_plate_nesting= if the model has deeper plates."
        )

        def vectorize(fn):
            return _draws_plate(fn, num_samples, max_plate_nesting)

        guide_trace = _run(guide, "guide", args, kwargs, vector_hint, wrap=vectorize)

        def replayed(fn):
            return poutine.replay(vectorize(fn), trace=guide_trace)

        def unconditioned(fn):
            return _UnconditionObserved()(replayed(fn))

        model_hint = SUPPORT_HINT + vector_hint
        model_trace = _run(model, "model", args, kwargs, model_hint, wrap=replayed)
        predictive_trace = _run(model, "model", args, kwargs, model_hint, wrap=unconditioned)
        _compute_log_probs(guide_trace, "guide", guide_name, vector_hint)
        _compute_log_probs(model_trace, "model", model_name, vector_hint)

        out = GuideDraws(num_samples=num_samples, max_plate_nesting=max_plate_nesting)
        log_q = _zeros(num_samples, guide_trace)
        point_mass = True
        for name, site in _sample_sites(guide_trace).items():
            if site["is_observed"]:
                continue
            point_mass = point_mass and _is_point_mass(site["fn"])
            lp = _sum_per_draw(name, site["log_prob"], num_samples, max_plate_nesting)
            log_q = log_q + lp
        out.point_mass_guide = point_mass
        log_prior = log_lik = _zeros(num_samples, model_trace)
        for name, site in _sample_sites(model_trace).items():
            plain = model_sites[name]
            frames = _frames(plain)
            for frame in frames:
                out.plate_sizes[frame.name] = frame.size
            if _is_deterministic(site):
                value = plain["value"]
                event_ndim = len(plain["fn"].event_shape)
                batch_ndim = value.dim() - (0 if event_ndim >= value.dim() else event_ndim)
                shape = tuple(value.shape)
                names, drop = _dim_names(name, shape, batch_ndim, frames, dims)
                _check_deterministic_has_draws(name, site["value"], value, num_samples)
                values = _per_draw(name, site["value"], num_samples, shape)
                out.deterministic[name] = SiteArray(_squeeze(values, drop), names)
                continue
            batch = tuple(plain["fn"].batch_shape)
            shape = batch + tuple(plain["fn"].event_shape)
            names, drop = _dim_names(name, shape, len(batch), frames, dims)
            lp = _sum_per_draw(name, site["log_prob"], num_samples, max_plate_nesting)
            if not site["is_observed"]:
                log_prior = log_prior + lp
                values = _per_draw(name, site["value"], num_samples, shape)
                out.latent[name] = SiteArray(_squeeze(values, drop), names)
                continue
            log_lik = log_lik + lp
            observed = plain["value"].expand(shape)
            out.observed[name] = SiteArray(_squeeze(observed.unsqueeze(0), drop)[0], names)
            resampled = _per_draw(name, predictive_trace.nodes[name]["value"], num_samples, shape)
            out.predictive[name] = SiteArray(_squeeze(resampled, drop), names)
            pointwise = _per_draw(name, site["log_prob"], num_samples, batch)
            batch_drop = [i for i in drop if i < len(batch)]
            out.log_likelihood[name] = SiteArray(
                _squeeze(pointwise, batch_drop), names[: len(batch) - len(batch_drop)]
            )
        out.log_q, out.log_prior = log_q, log_prior
        out.log_joint = log_prior + log_lik
    return out
