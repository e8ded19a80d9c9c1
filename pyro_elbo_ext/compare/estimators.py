"""The named-estimator registry: our losses in their configurations and Pyro's own ELBOs.

* :class:`EstimatorSpec` -- a name, a one-line description, the objective whose gradient it
  estimates, a ``factory(problem, num_particles)`` returning the loss together with the model
  and guide to pass it (TraceEnum_ELBO needs enumeration-configured callables), and
  applicability rules (:mod:`.applicability`) behind :meth:`EstimatorSpec.applies_to`;
* :data:`ESTIMATORS`, :func:`register`, :func:`get_estimator`, :func:`applicable_estimators`,
  :func:`chosen_estimators`;
* :class:`UnknownEstimatorError`, :class:`IncompatibleEstimatorError`;
* the entries: ``jensen_{analytic,sampled,path}``, ``analytic_kl``, ``hard_attention_enum``,
  ``hard_attention_reinforce{,_ma,_learned,_loo}``,
  ``discrete_{loo,disarm,relax,gumbel_st}`` (JensenELBO with that ``discrete_estimator``),
  ``importance_weighted_{iwae,dreg}``, and Pyro's ``trace_elbo``,
  ``tracemeanfield_elbo``, ``tracegraph_elbo``, ``traceenum_elbo``, ``renyi_elbo``.

A new estimator is one :func:`register` call with an :class:`EstimatorSpec`.

References
----------
- Roeder, Wu & Duvenaud (2017), "Sticking the landing", arXiv:1703.09194 (``jensen_path``).
- Ranganath, Gerrish & Blei (2014), "Black box variational inference", arXiv:1401.0118.
- Li & Turner (2016), "Rényi divergence variational inference", arXiv:1602.02311.
- Ba, Mnih & Kavukcuoglu (2014), arXiv:1412.7755; Mnih & Gregor (2014), arXiv:1402.0030;
  Mnih & Rezende (2016), arXiv:1602.06725 (the hard-attention entries).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from pyro.infer import (
    ELBO,
    RenyiELBO,
    Trace_ELBO,
    TraceEnum_ELBO,
    TraceGraph_ELBO,
    TraceMeanField_ELBO,
    config_enumerate,
)

from ..elbos import AnalyticKLELBO, HardAttentionELBO, JensenELBO
from ..problems import Problem
from .applicability import (
    Rule,
    discrete_sites_of,
    needs_discrete_guide_sites,
    needs_discrete_latents,
    needs_enumerable_unguided,
    needs_guided_latents,
    needs_reparameterized_guide,
    needs_unguided_latents,
    problem_structure,
)

#: the objective of an unbiased estimator of L and dL
ELBO_OBJECTIVE = "L"


class UnknownEstimatorError(KeyError):
    """An estimator name that is not in the registry."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


class IncompatibleEstimatorError(ValueError):
    """An estimator that cannot be used on a problem (the message says why)."""


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


def chosen_estimators(problem: Problem, names: Iterable[str] | None = None) -> list[str]:
    """The estimators a run uses: ``names`` as given, or every one that applies to ``problem``.

    Raises
    ------
    ValueError
        When a name is given more than once (it would give duplicate rows).
    """
    if names is None:
        return applicable_estimators(problem)
    names = list(names)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"estimator(s) {repeated} named more than once; name each once")
    return names


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


# ------------------------------------------------------------ AnalyticKLELBO, HardAttentionELBO
register(EstimatorSpec(
    "analytic_kl", "AnalyticKLELBO: E_q[log p(x|z)] - KL[q||p], analytic KL where valid",
    "ours", _plain(AnalyticKLELBO), rules=(needs_guided_latents,),
))


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


# ---------------------------------------------------------------------------- discrete estimators
def _discrete(estimator: str, min_particles: int = 1, even: bool = False) -> Builder:
    """JensenELBO (analytic entropy) with ``discrete_estimator=estimator`` at
    K = max(min_particles, particles) (rounded up to even for DisARM's pairs), vectorized."""

    def factory(problem: Problem, num_particles: int):
        k = max(min_particles, num_particles)
        k += k % 2 if even else 0
        loss = JensenELBO(num_particles=k, vectorize_particles=k > 1,
                          max_plate_nesting=problem.max_plate_nesting,
                          discrete_estimator=estimator)
        return loss, problem.model, problem.guide

    return factory


for _name, _k, _even, _text, _rules, _objective in [
    ("loo", 2, False, "leave-one-out baseline across the particles, K = max(2, particles)",
     (needs_discrete_guide_sites,), ELBO_OBJECTIVE),
    ("disarm", 2, True, "DisARM antithetic pairs, K = particles rounded up to an even "
     "number >= 2", (discrete_sites_of("bernoulli"),), ELBO_OBJECTIVE),
    ("relax", 1, False, "RELAX, control variate trained on the variance during the draws",
     (discrete_sites_of("bernoulli", "categorical", "one_hot_categorical"),), ELBO_OBJECTIVE),
    ("gumbel_st", 1, False, "straight-through Gumbel-softmax (biased)",
     (discrete_sites_of("bernoulli", "one_hot_categorical"),),
     "straight-through surrogate of L (biased)"),
]:
    register(EstimatorSpec(
        f"discrete_{_name}", f"JensenELBO(discrete_estimator='{_name}'): {_text}", "ours",
        _discrete(_name, _k, _even), objective=_objective,
        rules=(needs_guided_latents, *_rules),
    ))


# ---------------------------------------------------------------------------- importance weighted
# L_K with K = max(IW_MIN_PARTICLES, particles): at K = 1 it would be L itself; its objective
# is L_K, not L.
from ..elbos.importance_weighted import ImportanceWeightedELBO  # noqa: E402

#: the fewest particles of the importance-weighted entries (so that L_K differs from L)
IW_MIN_PARTICLES = 4


def _importance_weighted(estimator: str) -> Builder:
    def factory(problem: Problem, num_particles: int):
        loss = ImportanceWeightedELBO(num_particles=max(IW_MIN_PARTICLES, num_particles),
                                      max_plate_nesting=problem.max_plate_nesting,
                                      estimator=estimator)
        return loss, problem.model, problem.guide

    return factory


for _iw_estimator, _iw_text in [
    ("iwae", "normalized-weight (IWAE) gradient"),
    ("dreg", "doubly reparameterized (DReG) gradient for reparameterized guide sites"),
]:
    register(EstimatorSpec(
        f"importance_weighted_{_iw_estimator}",
        f"ImportanceWeightedELBO, L_K with K = max({IW_MIN_PARTICLES}, particles), "
        f"{_iw_text}; VIMCO for discrete sites",
        "ours", _importance_weighted(_iw_estimator),
        objective="importance-weighted bound L_K", rules=(needs_guided_latents,),
    ))

__all__ = [
    "ESTIMATORS",
    "EstimatorSpec",
    "IncompatibleEstimatorError",
    "UnknownEstimatorError",
    "applicable_estimators",
    "chosen_estimators",
    "get_estimator",
    "register",
]
