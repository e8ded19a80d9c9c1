r"""HardAttentionELBO: the marginal bound of hard-attention models, exact or sampled.

See :class:`HardAttentionELBO`; its options are checked by :class:`AttentionOptions`, its exact
references (F and log p(y) by enumeration) are in :mod:`.exact`, its learning signals in
:mod:`.signals`, :mod:`.baselines` and :mod:`.learned_baseline`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import pyro.poutine as poutine
import torch
from pyro.poutine.messenger import Messenger

from .baselines import (
    BASELINES,
    LeaveOneOutBaseline,
    MovingAverageBaseline,
    SignalNormalizer,
    check_decay,
)
from .discrete_plan import check_default
from .exact import USER_MARK, AttentionReferences, attention_references, enumeration_config
from .jensen import JensenELBO
from .learned_baseline import LearnedBaseline
from .plan import UNGUIDED, PlanFact, Planning, SiteView, Treatment
from .signals import LearningSignal, ZeroOneReward
from .sites import is_latent_site
from .treatments import PriorProposal, analytic_entropy
from .validation import check_choice, check_number, check_positive_int

ESTIMATORS = ("enum", "reinforce")
REWARDS = ("log_likelihood", "zero_one")

#: the enumeration of the attention sites checked (distinct dimensions, size) (``None``)
ENUMERATION_CHECKED: PlanFact[None] = PlanFact("enumeration checked")


def empty_guide(*args, **kwargs) -> None:
    """A guide that samples nothing: every latent of the model is an attention site.

    Use it with :class:`HardAttentionELBO` when the model's own distribution p(l | I, W) is the
    proposal for every latent, as in Ba, Mnih & Kavukcuoglu (2014).
    """


@dataclass(frozen=True)
class AttentionOptions:
    """:class:`HardAttentionELBO`'s estimator options, checked together (each error names the
    argument and what to use instead)."""

    estimator: str = "enum"
    baseline: str | None = None
    decay: float = 0.9
    normalize: bool = False
    entropy_weight: float = 0.0
    reward: str = "log_likelihood"
    max_enum_size: int = 100_000

    def __post_init__(self):
        check_choice("estimator", self.estimator, ESTIMATORS)
        if self.baseline is not None and self.baseline not in BASELINES:
            raise ValueError(f"baseline must be None or one of {BASELINES}, got "
                             f"{self.baseline!r}")
        if self.reward not in REWARDS:
            raise ValueError(
                f"reward must be one of {REWARDS}, got {self.reward!r}: 'log_likelihood' "
                "gives the gradient of F, 'zero_one' the 0/1 correct-label reward of Ba et al. "
                "(2014)"
            )
        object.__setattr__(self, "decay", check_decay(self.decay))
        object.__setattr__(self, "entropy_weight",
                           check_number("entropy_weight", self.entropy_weight, low=0.0))
        object.__setattr__(self, "max_enum_size",
                           check_positive_int("max_enum_size", self.max_enum_size))
        object.__setattr__(self, "normalize", bool(self.normalize))
        if self.estimator == "enum":
            if self.baseline is not None:
                raise ValueError(
                    f"baseline={self.baseline!r} only applies to estimator='reinforce'; "
                    "estimator='enum' is exact and needs no baseline (pass baseline=None)"
                )
            if self.normalize:
                raise ValueError("normalize=True only applies to estimator='reinforce'")
            if self.reward != "log_likelihood":
                raise ValueError(
                    f"reward={self.reward!r} only applies to estimator='reinforce'; "
                    "estimator='enum' computes F with the log-likelihood"
                )

    def check_particles(self, num_particles: int, vectorized: bool) -> None:
        """The leave-one-out baseline needs K >= 2 vectorized particles."""
        if self.baseline == "leave_one_out" and (num_particles < 2 or not vectorized):
            raise ValueError(
                "baseline='leave_one_out' needs num_particles >= 2 and "
                f"vectorize_particles=True (got num_particles={num_particles}, "
                f"vectorize_particles={vectorized}): each particle's baseline is the mean "
                "reward of the others; raise num_particles or choose baseline='moving_average'"
            )

    def learning_signal(self, hidden_dim: int, net_factory, lr: float
                        ) -> LearningSignal | None:
        """The reward transform, baseline and normalizer these options ask for (``None``:
        the plain reward)."""
        baseline = None
        if self.baseline == "moving_average":
            baseline = MovingAverageBaseline(self.decay)
        elif self.baseline == "learned":
            baseline = LearnedBaseline(hidden_dim, net_factory, self.decay, lr)
        elif self.baseline == "leave_one_out":
            baseline = LeaveOneOutBaseline()
        signal = LearningSignal(
            baseline, SignalNormalizer(self.decay) if self.normalize else None,
            ZeroOneReward() if self.reward == "zero_one" else None,
        )
        return signal if signal.needed else None


class HardAttentionELBO(JensenELBO):
    r"""The lower bound F of a hard-attention model, exact by enumeration or by REINFORCE.

    For a model with input I, label y and attention locations l (sample sites that the guide
    does not sample) drawn from the model's own distribution p(l | I, W):

    .. math::

        \log p(y \mid I, W) = \log \sum_l p(l \mid I, W)\, p(y \mid l, I, W)
        \;\ge\; F = \sum_l p(l \mid I, W) \log p(y \mid l, I, W)

    (Jensen's inequality; Ba, Mnih & Kavukcuoglu 2014, arXiv:1412.7755), with the gap
    :math:`\log p(y \mid I, W) - F = \mathrm{KL}[p(l \mid I, W) \,\|\, p(l \mid y, I, W)]`.
    Its gradient is

    .. math::

        \frac{\partial F}{\partial W} = \mathbb{E}_{p(l \mid I, W)}\Big[
        \frac{\partial \log p(y \mid l, I, W)}{\partial W}
        + \log p(y \mid l, I, W) \frac{\partial \log p(l \mid I, W)}{\partial W}\Big].

    Several attention sites in sequence (glimpses ``l_t ~ p(l_t | l_<t, I, W)``, in a Python
    loop, or under ``pyro.markov`` with ``estimator="reinforce"``) are supported; ``l`` above
    is then the whole sequence.  ``estimator="enum"`` refuses ``pyro.markov``'s recycled
    enumeration dimensions (the expectation needs one dimension per site).  A reparameterized
    model-drawn site (a continuous ``l``) contributes its pathwise gradient and no score term.
    Latents the guide *does* sample get JensenELBO's treatment (``log p(z) + H[q(z)]``), so
    F generalizes to ``E_{p(l) q(z)}[log p(y, z | l) - log q(z)]``.

    ``estimator="enum"``
        F exactly: the attention sites are enumerated in parallel (each must have a finite
        support: ``Categorical``, ``Bernoulli``, ``OneHotCategorical``, ...) and every term
        is averaged over the enumerated values with the weights ``prod_t p(l_t | l_<t)``;
        an expectation, not a log-sum-exp.  Value and gradient are exact (up to the Monte
        Carlo of guide-sampled latents, if any).  The joint number of configurations is
        limited by ``max_enum_size``.
    ``estimator="reinforce"``
        One sample of l per particle.  The surrogate is ``log p(y | l)`` (backpropagated) plus
        the score-function term ``log p(l_t | l_<t) * stop_grad(R_t - b_t)`` for each site,
        where the reward ``R_t`` holds the terms of F that the data flow says may depend on
        ``l_t`` (its observations and later glimpses that read it: :mod:`.downstream`),
        element by element within shared ``pyro.plate`` s.  Unbiased for dF whenever the
        baseline ``b_t`` does not depend on ``l_t`` (Williams 1992; Mnih et al. 2014,
        arXiv:1406.6247).

    Baselines (``baseline=``, reinforce only):

    ``None``
        Plain REINFORCE.
    ``"moving_average"``
        A bias-corrected exponential moving average of past rewards with ``decay``
        (Xu et al. 2015, arXiv:1502.03044).
    ``"learned"``
        An input-dependent network around a moving average, ``b_t = m_t + f(x_t)``,
        regressed on the reward by squared error, trained by the same SVI step (Mnih et al.
        2014; NVIL, Mnih & Gregor 2014, arXiv:1402.0030).  ``x_t`` is given by the model as
        ``pyro.sample(name, d, infer={"baseline_input": x_t})``.  See
        :class:`~pyro_elbo_ext.elbos.learned_baseline.LearnedBaseline` for how its parameters reach
        the optimizer.
    ``"leave_one_out"``
        With ``num_particles >= 2`` and ``vectorize_particles=True``, the baseline of each
        particle is the mean reward of the others (VIMCO-style, Mnih & Rezende 2016,
        arXiv:1602.06725).

    Other options: ``normalize=True`` divides the centred signal by ``max(1, running std)``
    (NVIL; a rescaled, no longer unbiased, estimate); ``entropy_weight=lambda > 0`` adds the
    bonus ``lambda * sum_t H[p(l_t | l_<t)]`` (Xu et al. 2015), which makes the objective
    ``F + lambda * E[sum_t H_t]``; ``reward="zero_one"`` uses ``R = 1[argmax_y p(y | l) = y]``
    in the score-function term (Ba et al. 2014; Mnih et al. 2014) while the classifier still
    learns by backpropagating ``log p(y | l)``: a *different objective* (expected accuracy for
    the attention policy), not the gradient of F.  The reported loss is -F in every case
    (plus the entropy bonus when ``entropy_weight > 0``).

    ``jit=True`` (and :class:`~pyro_elbo_ext.CompiledSVI`) compiles every configuration as
    for the other losses (:mod:`pyro_elbo_ext.compiled`).  The baseline and normalizer state
    is a :class:`torch.nn.Module`, :attr:`learning_signal`
    (:class:`~pyro_elbo_ext.elbos.signals.LearningSignal`), owned by this loss; the forward
    pass reads it and an explicit update after each particle's gradient replaces it (a
    non-finite update is skipped with a warning naming the site).  Its tensors are the loss's
    :meth:`carried_state`, which a compiled step takes as inputs and returns updated, so a
    compiled baseline learns exactly as the eager one does.  :meth:`state_dict` /
    :meth:`load_state_dict` save and restore it; a checkpoint of another baseline kind, or
    with other settings (``decay``, ``baseline_hidden_dim``, ``baseline_lr``,
    ``normalize``), is refused with an error naming both values.

    Parameters
    ----------
    estimator : {"enum", "reinforce"}
        Exact enumeration or sampling of the attention sites.
    baseline : {None, "moving_average", "learned", "leave_one_out"}
        Variance reduction for ``estimator="reinforce"``.
    num_particles : int
        Samples per estimate.
    decay : float
        Decay of the moving average and of the normalizer's running variance, in [0, 1).
    normalize : bool
        NVIL variance normalization of the learning signal.
    entropy_weight : float
        Weight (>= 0) of the entropy bonus of the attention distributions.
    reward : {"log_likelihood", "zero_one"}
        The reward of the score-function term.
    baseline_hidden_dim : int
        Hidden width of the default learned baseline network.
    baseline_net_factory : callable, optional
        ``(site_name, in_features) -> nn.Module`` for ``baseline="learned"``.
    baseline_lr : float
        Learning rate of the learned baseline's own optimizer (it takes one step after each
        particle's gradient; see :class:`~pyro_elbo_ext.elbos.learned_baseline.LearnedBaseline`).
    max_enum_size : int
        Largest number of joint configurations of the attention sites that
        ``estimator="enum"`` enumerates.
    entropy : {"analytic", "sampled", "path"}
        JensenELBO's entropy estimator, for latents that the guide samples.
    **kwargs
        Forwarded to :class:`pyro.infer.elbo.ELBO` (``max_plate_nesting``,
        ``vectorize_particles``, ``retain_graph``, ...).

    Examples
    --------
    >>> elbo = HardAttentionELBO(estimator="reinforce", baseline="moving_average",
    ...                          max_plate_nesting=1)                       # doctest: +SKIP
    >>> svi = pyro.infer.SVI(model, empty_guide, pyro.optim.Adam({"lr": 1e-2}), loss=elbo)
    >>> elbo.decompose(model, empty_guide, data)   # F, log p(y) and the gap  # doctest: +SKIP
    """

    def __init__(
        self,
        estimator: str = "enum",
        baseline: str | None = None,
        num_particles: int = 1,
        decay: float = 0.9,
        normalize: bool = False,
        entropy_weight: float = 0.0,
        reward: str = "log_likelihood",
        baseline_hidden_dim: int = 32,
        baseline_net_factory=None,
        baseline_lr: float = 1e-2,
        max_enum_size: int = 100_000,
        entropy: str = "analytic",
        **kwargs,
    ):
        super().__init__(num_particles=num_particles, entropy=entropy, **kwargs)
        self._base_plate_nesting = self.max_plate_nesting - (
            1 if self.vectorize_particles and self.num_particles > 1 else 0
        )
        self.options = AttentionOptions(estimator, baseline, decay, normalize, entropy_weight,
                                        reward, max_enum_size)
        self.options.check_particles(num_particles, self.vectorize_particles)
        check_default(self.discrete_estimator, *self._discrete_support())
        #: the loss's learned state (baseline and normalizer), a torch.nn.Module; None when
        #: the learning signal is the plain reward
        self.learning_signal = self.options.learning_signal(baseline_hidden_dim,
                                                            baseline_net_factory, baseline_lr)

    def _discrete_support(self):
        if getattr(self, "options", None) is not None and \
                self.options.baseline == "leave_one_out":
            return (("reinforce",), "HardAttentionELBO(baseline='leave_one_out')",
                    "its baseline already couples the particles, and a second estimator on "
                    "that signal would meet baselines that depend on its own sample; use "
                    "discrete_estimator='loo' with baseline=None instead")
        return super()._discrete_support()

    # ------------------------------------------------------------------ the treatment
    def treat(self, site: SiteView, planning: Planning) -> Treatment:
        """A latent the guide does not sample is drawn from the model (prior proposal),
        enumerated for ``estimator="enum"``; the rest as in :class:`JensenELBO`."""
        if site.role != UNGUIDED:
            return super().treat(site, planning)
        options = self.options
        enumerated = options.estimator == "enum"
        if enumerated:
            planning.fact(ENUMERATION_CHECKED, lambda: self._check_enumeration(planning))
        infer = site.model_site["infer"]
        mark = infer.get(USER_MARK) if enumerated else infer.get("enumerate")
        if mark is not None:
            _warn_marked_for_enumeration(site.name, mark)
        if options.entropy_weight > 0 and analytic_entropy(site.model_site["fn"]) is None:
            raise ValueError(
                f"entropy_weight > 0 needs the entropy of attention site '{site.name}' in "
                f"closed form, which {type(site.model_site['fn']).__name__} does not provide; "
                "set entropy_weight=0"
            )
        return PriorProposal(options.entropy_weight, enumerated)

    def _check_enumeration(self, planning: Planning) -> None:
        """Once per plan: not too many joint configurations of the attention sites."""
        guide_nodes = planning.guide_trace.nodes
        attention = {
            name: site for name, site in planning.model_trace.nodes.items()
            if is_latent_site(site) and name not in guide_nodes
        }
        sizes = {name: _support_size(site) for name, site in attention.items()}
        total = math.prod(sizes.values())
        if total > self.options.max_enum_size:
            detail = " x ".join(f"{n}: {k}" for n, k in sizes.items())
            raise ValueError(
                f"estimator='enum' would enumerate {total} joint configurations of the "
                f"attention sites ({detail}), more than "
                f"max_enum_size={self.options.max_enum_size}; use estimator='reinforce', "
                "fewer or coarser attention sites, or raise max_enum_size"
            )

    def model_wrapper(self):
        return self._enumerated_model if self.options.estimator == "enum" else None

    def _enumerated_model(self, model, guide_trace):
        """The model with every latent the guide does not sample enumerated in parallel
        (each in a dimension of its own: see :class:`_DistinctEnumDims`)."""
        return _DistinctEnumDims()(poutine.enum(
            poutine.infer_config(model, enumeration_config(set(guide_trace.nodes))),
            first_available_dim=-1 - self.max_plate_nesting,
        ))

    # ------------------------------------------------------------------ exact references
    def exact_references(self, model, guide, args, kwargs) -> AttentionReferences:
        """F, log p(y | I, W) and their gap by enumeration, for ``decompose``.

        ``decompose`` then returns a
        :class:`~pyro_elbo_ext.elbos.decomposition.HardAttentionDecomposition`: ``elbo`` and
        ``terms`` as for every loss (the estimate of F, exact for ``estimator="enum"``);
        ``exact_bound`` is F by enumeration, ``log_evidence`` is log p(y | I, W) by exact
        marginalization, and ``gap = log_evidence - exact_bound``
        (= KL[p(l | I, W) || p(l | y, I, W)] >= 0).  The three are ``None`` when the
        attention sites cannot be enumerated (continuous, or more than ``max_enum_size``
        configurations), and when the guide samples latents (the bound then also has a guide
        gap and is not computed exactly).  With a subsampling plate every one of these is
        computed on the same minibatch (that of the first particle when the particles are not
        vectorized).
        """
        nesting = self._base_plate_nesting
        options = {} if nesting == float("inf") else {"max_plate_nesting": nesting}
        enumerating = HardAttentionELBO(estimator="enum",
                                        max_enum_size=self.options.max_enum_size,
                                        entropy=self.entropy, **options)
        return attention_references(enumerating, model, guide, args, kwargs)


def _warn_marked_for_enumeration(name: str, mark) -> None:
    """A site marked for Pyro's enumeration: say which objective this loss maximizes."""
    warnings.warn(
        f"model site '{name}' is marked infer={{'enumerate': {mark!r}}} (e.g. by "
        "config_enumerate), as for Pyro's TraceEnum_ELBO, which sums it out and "
        f"maximizes log p(x) = log sum_{name} p(x, {name}). HardAttentionELBO "
        f"draws '{name}' from the model's own distribution and maximizes a "
        f"different objective, F = E_p({name})[log p(x | {name})] <= log p(x) "
        "(a hard-attention bound; for a mixture, each assignment is drawn from the "
        "weights without looking at the data, and the fit collapses onto one "
        f"component). To marginalize '{name}', use "
        f"pyro.infer.TraceEnum_ELBO; if '{name}' is a hard-attention location, "
        "remove the mark",
        stacklevel=4,
    )


def _support_size(site: dict) -> int:
    """Number of values an enumerated site takes (its enumerated dimension's size)."""
    value = site["value"]
    dim = site["infer"].get("_enumerate_dim")
    if dim is not None and torch.is_tensor(value) and value.dim() >= -dim:
        return int(value.shape[dim])
    return int(site["fn"].enumerate_support(expand=False).shape[0])


class _DistinctEnumDims(Messenger):
    """Refuses, as the model runs, two enumerated sites sharing a dimension.

    The expectation over the enumerated sites needs one dimension per site; ``pyro.markov``
    recycles enumeration dimensions along a chain, and the product of the sites'
    probabilities is then no longer the joint p(l) (the expectation would be wrong).
    """

    def __enter__(self):
        self.owner: dict[int, str] = {}
        return super().__enter__()

    def _pyro_post_sample(self, msg) -> None:
        dim = msg["infer"].get("_enumerate_dim")
        if dim is None or msg["is_observed"]:
            return
        name = msg["name"]
        if dim in self.owner:
            raise ValueError(
                f"attention sites '{self.owner[dim]}' and '{name}' share enumeration dimension "
                f"{dim} (pyro.markov recycles dimensions), which estimator='enum' cannot take "
                "an expectation over; write the glimpses in a plain Python loop (or a "
                "pyro.markov(history=T) window covering all of them), or use "
                "estimator='reinforce'"
            )
        self.owner[dim] = name


__all__ = ["ESTIMATORS", "REWARDS", "AttentionOptions", "HardAttentionELBO", "empty_guide"]
