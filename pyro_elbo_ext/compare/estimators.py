"""The named-estimator registry: our losses in their configurations and Pyro's own ELBOs.

Each entry is an :class:`EstimatorSpec`: a name, a one-line description, the objective whose
gradient it estimates, a ``build(problem, num_particles)`` factory returning the loss together
with the model and guide to pass it (TraceEnum_ELBO needs enumeration-configured callables), and
an :meth:`EstimatorSpec.applies_to` check that says, with a reason, whether it can be used on a
problem.  The check is made from the problem's actual trace structure (see
:func:`problem_structure`): which latent sites the guide samples, which are reparameterized,
which are discrete and enumerable.

Entries for losses that are still being written (``AnalyticKLELBO`` in
:mod:`pyro_elbo_ext.elbos.analytic_kl`, ``HardAttentionELBO`` in
:mod:`pyro_elbo_ext.elbos.hard_attention`) are added when those modules import.

References
----------
- Roeder, Wu & Duvenaud (2017), "Sticking the landing", arXiv:1703.09194 (``jensen_path``).
- Ranganath, Gerrish & Blei (2014), "Black box variational inference", arXiv:1401.0118.
- Li & Turner (2016), "Rényi divergence variational inference", arXiv:1602.02311.
- Ba, Mnih & Kavukcuoglu (2014), arXiv:1412.7755; Mnih & Gregor (2014), arXiv:1402.0030;
  Mnih & Rezende (2016), arXiv:1602.06725 (the hard-attention entries).
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import pyro
import pyro.poutine as poutine
from pyro.infer import (
    ELBO,
    RenyiELBO,
    Trace_ELBO,
    TraceEnum_ELBO,
    TraceGraph_ELBO,
    TraceMeanField_ELBO,
    config_enumerate,
)

from ..elbos import JensenELBO
from ..problems import Problem

#: the objective of an unbiased estimator of L and dL
ELBO_OBJECTIVE = "L"


class UnknownEstimatorError(KeyError):
    """An estimator name that is not in the registry."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


class IncompatibleEstimatorError(ValueError):
    """An estimator that cannot be used on a problem (the message says why)."""


# ---------------------------------------------------------------------------- problem structure
@dataclass(frozen=True)
class ProblemStructure:
    """What the estimators' applicability depends on, read from one (guide, model) trace.

    Attributes
    ----------
    guided_latents : tuple of str
        Model latent sites that the guide samples.
    unguided_latents : tuple of str
        Model latent sites the guide does not sample (hard-attention / prior-proposal sites).
    nonreparam_guide_sites : tuple of str
        Guide sample sites without ``rsample`` (discrete or otherwise score-function sites).
    enumerable_sites : tuple of str
        Latent sites (guide or model) whose distribution has a finite, enumerable support.
    continuous_sites : tuple of str
        Latent sites whose support cannot be enumerated.
    """

    guided_latents: tuple[str, ...]
    unguided_latents: tuple[str, ...]
    nonreparam_guide_sites: tuple[str, ...]
    enumerable_sites: tuple[str, ...]
    continuous_sites: tuple[str, ...]

    @property
    def fully_reparameterized(self) -> bool:
        return not self.nonreparam_guide_sites and not self.unguided_latents

    @property
    def has_discrete_latents(self) -> bool:
        return bool(self.enumerable_sites)


#: id(problem) -> (weak reference to it, its structure)
_STRUCTURE_CACHE: dict[int, tuple[weakref.ref, ProblemStructure]] = {}


def problem_structure(problem: Problem) -> ProblemStructure:
    """Trace the guide and replay the model once at ``init_params`` and classify the sites.

    The param store is saved and restored around the trace, so this has no side effect.
    The result is cached per problem object.
    """
    cached = _STRUCTURE_CACHE.get(id(problem))
    if cached is not None and cached[0]() is problem:
        return cached[1]
    store = pyro.get_param_store()
    saved = store.get_state()
    try:
        problem.set_params()
        guide_trace = poutine.trace(problem.guide).get_trace(*problem.args, **problem.kwargs)
        model_trace = poutine.trace(poutine.replay(problem.model, trace=guide_trace)).get_trace(
            *problem.args, **problem.kwargs
        )
    finally:
        store.set_state(saved)
    guide_sites = {
        name: site for name, site in guide_trace.nodes.items() if site["type"] == "sample"
    }
    latents = {
        name: site
        for name, site in model_trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"]
        and not site["infer"].get("_do_not_trace") and not _is_subsample(site)
    }
    guided = tuple(n for n in latents if n in guide_sites)
    unguided = tuple(n for n in latents if n not in guide_sites)
    nonreparam = tuple(
        n for n, s in guide_sites.items()
        if not _is_subsample(s) and not getattr(s["fn"], "has_rsample", False)
    )
    all_latent = {**{n: s for n, s in guide_sites.items() if not _is_subsample(s)}, **latents}
    enumerable = tuple(
        n for n, s in all_latent.items() if getattr(s["fn"], "has_enumerate_support", False)
    )
    continuous = tuple(n for n in all_latent if n not in enumerable)
    structure = ProblemStructure(guided, unguided, nonreparam, enumerable, continuous)
    for key in [k for k, (ref, _) in _STRUCTURE_CACHE.items() if ref() is None]:
        del _STRUCTURE_CACHE[key]
    _STRUCTURE_CACHE[id(problem)] = (weakref.ref(problem), structure)
    return structure


def _is_subsample(site: dict) -> bool:
    return type(site["fn"]).__name__ == "_Subsample"


# ---------------------------------------------------------------------------- applicability rules
#: a rule maps a problem's structure to ``None`` (applies) or the reason it does not
Rule = Callable[[ProblemStructure], "str | None"]


def needs_guided_latents(s: ProblemStructure) -> str | None:
    """Every model latent must be sampled by the guide."""
    if s.unguided_latents:
        return (
            f"the guide does not sample the latent site(s) {list(s.unguided_latents)}; "
            "use a hard_attention_* estimator"
        )
    return None


def needs_reparameterized_guide(s: ProblemStructure) -> str | None:
    """Every guide site must be reparameterized (``rsample``)."""
    if s.nonreparam_guide_sites:
        return (
            f"the guide site(s) {list(s.nonreparam_guide_sites)} are not reparameterizable "
            "(discrete); use trace_elbo, tracegraph_elbo or a jensen_* estimator"
        )
    return None


def needs_discrete_latents(s: ProblemStructure) -> str | None:
    """Enumeration needs at least one enumerable latent and no continuous unguided latent."""
    if not s.has_discrete_latents:
        return "the problem has no discrete latent site to enumerate (all latents are continuous)"
    return None


def needs_unguided_latents(s: ProblemStructure) -> str | None:
    """The hard-attention bound needs latents drawn from the model's own distribution."""
    if not s.unguided_latents:
        return (
            "the problem has no attention (unguided) latent site; its guide samples every latent, "
            "so use a jensen_* or trace_* estimator"
        )
    return None


def needs_enumerable_unguided(s: ProblemStructure) -> str | None:
    """Exact enumeration of the attention sites needs each to have a finite support."""
    reason = needs_unguided_latents(s)
    if reason:
        return reason
    bad = [n for n in s.unguided_latents if n not in s.enumerable_sites]
    if bad:
        return f"the attention site(s) {bad} have no finite support to enumerate"
    return None


# ---------------------------------------------------------------------------- the spec
Builder = Callable[[Problem, int], "tuple[ELBO, Callable, Callable]"]


@dataclass(frozen=True)
class EstimatorSpec:
    """A named estimator configuration.

    Attributes
    ----------
    name : str
        Registry key, e.g. ``"jensen_path"``.
    description : str
        One line for tables and ``pyro-elbo-ext list``.
    family : str
        ``"ours"`` or ``"pyro"``.
    objective : str
        ``"L"`` when the estimator is unbiased for L and dL; otherwise the objective whose
        gradient it estimates (e.g. the Rényi bound), so that a bias against dL is expected.
    factory : callable
        ``factory(problem, num_particles) -> (loss, model, guide)``.
    rules : tuple of callables
        Applicability rules, each ``rule(structure) -> None | reason``.
    """

    name: str
    description: str
    family: str
    factory: Builder
    objective: str = ELBO_OBJECTIVE
    rules: tuple[Rule, ...] = field(default=())

    def applies_to(self, problem: Problem) -> tuple[bool, str]:
        """Whether this estimator can be used on ``problem``, and if not, why.

        Returns
        -------
        (bool, str)
            ``(True, "")`` or ``(False, reason)``.
        """
        structure = problem_structure(problem)
        for rule in self.rules:
            reason = rule(structure)
            if reason:
                return False, reason
        return True, ""

    def build(self, problem: Problem, num_particles: int = 1) -> tuple[ELBO, Callable, Callable]:
        """The loss and the (possibly wrapped) model and guide to evaluate it on ``problem``.

        Raises
        ------
        IncompatibleEstimatorError
            When :meth:`applies_to` says no.
        """
        ok, reason = self.applies_to(problem)
        if not ok:
            raise IncompatibleEstimatorError(
                f"estimator {self.name!r} does not apply to problem {problem.name!r}: {reason}"
            )
        return self.factory(problem, num_particles)


ESTIMATORS: dict[str, EstimatorSpec] = {}


def register(spec: EstimatorSpec) -> EstimatorSpec:
    """Add ``spec`` to :data:`ESTIMATORS` (replacing an entry of the same name)."""
    ESTIMATORS[spec.name] = spec
    return spec


def get_estimator(name: str) -> EstimatorSpec:
    """The registry entry ``name``.

    Raises
    ------
    UnknownEstimatorError
        Listing the known names.
    """
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise UnknownEstimatorError(
            f"unknown estimator {name!r}; known estimators: {', '.join(ESTIMATORS)}"
        ) from None


def applicable_estimators(problem: Problem, names: Iterable[str] | None = None) -> list[str]:
    """The names (of ``names``, default all) that apply to ``problem``, in registry order."""
    names = list(ESTIMATORS) if names is None else list(names)
    return [n for n in names if get_estimator(n).applies_to(problem)[0]]


def _plain(loss_cls, **options) -> Builder:
    def factory(problem: Problem, num_particles: int):
        loss = loss_cls(
            num_particles=num_particles, max_plate_nesting=problem.max_plate_nesting, **options
        )
        return loss, problem.model, problem.guide

    return factory


def _traceenum(problem: Problem, num_particles: int):
    loss = TraceEnum_ELBO(
        num_particles=num_particles, max_plate_nesting=problem.max_plate_nesting
    )
    model = config_enumerate(problem.model, default="parallel")
    guide = config_enumerate(problem.guide, default="parallel")
    return loss, model, guide


def _renyi(alpha: float) -> Builder:
    def factory(problem: Problem, num_particles: int):
        # the Renyi bound needs K >= 2 samples; with K = 1 it is the ordinary ELBO
        loss = RenyiELBO(
            alpha=alpha, num_particles=max(2, num_particles),
            max_plate_nesting=problem.max_plate_nesting,
        )
        return loss, problem.model, problem.guide

    return factory


# ---------------------------------------------------------------------------- our estimators
for _entropy, _text in [
    ("analytic", "JensenELBO, analytic entropy H[q] where it has a closed form"),
    ("sampled", "JensenELBO, sampled entropy -log q(z) (Trace_ELBO's estimator)"),
    ("path", "JensenELBO, path-derivative entropy (sticking the landing)"),
]:
    register(EstimatorSpec(
        name=f"jensen_{_entropy}",
        description=_text,
        family="ours",
        factory=_plain(JensenELBO, entropy=_entropy),
        rules=(needs_guided_latents,),
    ))

# ---------------------------------------------------------------------------- Pyro's estimators
register(EstimatorSpec(
    "trace_elbo", "Pyro Trace_ELBO: -log q(z) sampled, score function for discrete sites",
    "pyro", _plain(Trace_ELBO), rules=(needs_guided_latents,),
))
register(EstimatorSpec(
    "tracemeanfield_elbo", "Pyro TraceMeanField_ELBO: analytic KL where registered",
    "pyro", _plain(TraceMeanField_ELBO),
    rules=(needs_guided_latents, needs_reparameterized_guide),
))
register(EstimatorSpec(
    "tracegraph_elbo", "Pyro TraceGraph_ELBO: score function with dependency-graph costs",
    "pyro", _plain(TraceGraph_ELBO), rules=(needs_guided_latents,),
))
register(EstimatorSpec(
    "traceenum_elbo", "Pyro TraceEnum_ELBO: discrete sites summed out by parallel enumeration",
    "pyro", _traceenum, rules=(needs_guided_latents, needs_discrete_latents),
))
register(EstimatorSpec(
    "renyi_elbo", "Pyro RenyiELBO(alpha=0.5), K = max(2, particles) samples",
    "pyro", _renyi(0.5), objective="Renyi bound (alpha=0.5)",
    rules=(needs_guided_latents, needs_reparameterized_guide),
))


# ---------------------------------------------------------------------------- losses in progress
def _optional_class(module: str, name: str):
    """``module.name`` if the module exists, else ``None`` (it may not have landed yet).

    A module that exists but fails to import raises as usual; one without the class warns.
    """
    if importlib.util.find_spec(module) is None:
        return None
    cls = getattr(importlib.import_module(module), name, None)
    if cls is None:
        warnings.warn(f"{module} has no {name}; its estimators are not registered", stacklevel=2)
    return cls


AnalyticKLELBO = _optional_class("pyro_elbo_ext.elbos.analytic_kl", "AnalyticKLELBO")
HardAttentionELBO = _optional_class("pyro_elbo_ext.elbos.hard_attention", "HardAttentionELBO")

if AnalyticKLELBO is not None:
    register(EstimatorSpec(
        "analytic_kl", "AnalyticKLELBO: E_q[log p(x|z)] - KL[q||p], analytic KL where valid",
        "ours", _plain(AnalyticKLELBO), rules=(needs_guided_latents,),
    ))

if HardAttentionELBO is not None:
    def _hard_attention(estimator: str, baseline: str | None = None, min_particles: int = 1):
        def factory(problem: Problem, num_particles: int):
            options: dict = {"estimator": estimator}
            if estimator == "reinforce":
                options["baseline"] = baseline
            if min_particles > 1:  # leave-one-out: the particles must be vectorized
                options["vectorize_particles"] = True
            loss = HardAttentionELBO(
                num_particles=max(min_particles, num_particles),
                max_plate_nesting=problem.max_plate_nesting, **options,
            )
            return loss, problem.model, problem.guide

        return factory

    register(EstimatorSpec(
        "hard_attention_enum", "HardAttentionELBO, exact F by enumerating attention sites",
        "ours", _hard_attention("enum"), rules=(needs_enumerable_unguided,),
    ))
    for _suffix, _baseline, _k, _text in [
        ("", None, 1, "no baseline"),
        ("_ma", "moving_average", 1, "moving-average baseline"),
        ("_learned", "learned", 1, "learned input-dependent baseline (NVIL)"),
        ("_loo", "leave_one_out", 2, "leave-one-out baseline, K = max(2, particles)"),
    ]:
        register(EstimatorSpec(
            f"hard_attention_reinforce{_suffix}",
            f"HardAttentionELBO, REINFORCE, {_text}",
            "ours", _hard_attention("reinforce", _baseline, _k),
            rules=(needs_unguided_latents,),
        ))


# ---------------------------------------------------------------------------- importance weighted
# (issue 17) L_K with K = the registry's num_particles; its objective is L_K, not L.
from ..elbos.importance_weighted import ImportanceWeightedELBO  # noqa: E402

for _iw_estimator, _iw_text in [
    ("iwae", "normalized-weight (IWAE) gradient"),
    ("dreg", "doubly reparameterized (DReG) gradient for reparameterized guide sites"),
]:
    register(EstimatorSpec(
        f"importance_weighted_{_iw_estimator}",
        f"ImportanceWeightedELBO, L_K with K = particles, {_iw_text}; VIMCO for discrete sites",
        "ours", _plain(ImportanceWeightedELBO, estimator=_iw_estimator),
        objective="importance-weighted bound L_K", rules=(needs_guided_latents,),
    ))

__all__ = [
    "ESTIMATORS",
    "EstimatorSpec",
    "IncompatibleEstimatorError",
    "ProblemStructure",
    "UnknownEstimatorError",
    "applicable_estimators",
    "get_estimator",
    "problem_structure",
    "register",
]
