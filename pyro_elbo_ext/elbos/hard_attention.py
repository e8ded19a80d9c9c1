r"""HardAttentionELBO: the marginal bound of hard-attention models, exact or sampled.

See :class:`HardAttentionELBO`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import pyro.poutine as poutine
import torch
from pyro.infer.traceenum_elbo import TraceEnum_ELBO
from pyro.infer.util import is_validation_enabled

from .baselines import (
    BASELINES,
    LearnedBaseline,
    LeaveOneOutBaseline,
    MovingAverageBaseline,
    SignalNormalizer,
    SignalState,
    check_decay,
)
from .decomposition import Decomposition
from .engine import (
    BaselineFn,
    Frame,
    ParticleEstimate,
    ScoreSite,
    Term,
    combine,
    plate_frames,
    sum_to_frames,
)
from .jensen import JensenELBO, _has_undecided_path_site, _record_upstream_values
from .tracing import record_guide_and_model
from .treatments import (
    analytic_entropy,
    is_reparameterized,
    log_density,
    scaled,
    score_site,
)
from .validation import (
    check_guide_sites,
    check_plate_shapes,
    is_subsample_site,
)

ESTIMATORS = ("enum", "reinforce")
#: baselines that learn from call to call (a compiled trace would freeze them)
STATEFUL_BASELINES = ("moving_average", "learned")
REWARDS = ("log_likelihood", "zero_one")


def empty_guide(*args, **kwargs) -> None:
    """A guide that samples nothing: every latent of the model is an attention site.

    Use it with :class:`HardAttentionELBO` when the model's own distribution p(l | I, W) is the
    proposal for every latent, as in Ba, Mnih & Kavukcuoglu (2014).
    """


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
        where the reward ``R_t`` is the part of F that may lie downstream of ``l_t``
        (Rao-Blackwellized by ``pyro.plate`` independence).  Unbiased for dF whenever the
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
        :class:`~pyro_elbo_ext.elbos.baselines.LearnedBaseline` for how its parameters reach
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

    ``jit=True`` compiles the loss as for the other losses (:func:`pyro.ops.jit.trace`) where
    nothing in it changes from call to call: ``estimator="enum"``, and ``"reinforce"`` with
    ``baseline=None`` or ``"leave_one_out"`` and ``normalize=False``.  The moving-average and
    learned baselines and the normalizer learn on every call, which a compiled trace would
    freeze, so they refuse ``jit=True``.  The baseline and normalizer state is a
    :class:`torch.nn.Module`,
    :attr:`baseline_state`, owned by this loss; :meth:`state_dict` / :meth:`load_state_dict`
    save and restore it.

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
        Learning rate of the learned baseline's own optimizer (it trains itself inside each
        training call; see :class:`~pyro_elbo_ext.elbos.baselines.LearnedBaseline`).
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
        if kwargs.get("jit") and (baseline in STATEFUL_BASELINES or normalize):
            what = f"baseline={baseline!r}" if baseline in STATEFUL_BASELINES else "normalize=True"
            raise ValueError(
                f"HardAttentionELBO with {what} cannot be compiled (jit=True): it updates its "
                "state on every call, which a compiled trace would freeze. Use jit=False, or a "
                "stateless configuration (estimator='enum', or baseline=None / 'leave_one_out' "
                "without normalize)"
            )
        super().__init__(num_particles=num_particles, entropy=entropy, **kwargs)
        self._base_plate_nesting = self.max_plate_nesting - (
            1 if self.vectorize_particles and self.num_particles > 1 else 0
        )
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if baseline is not None and baseline not in BASELINES:
            raise ValueError(
                f"baseline must be None or one of {BASELINES}, got {baseline!r}"
            )
        if reward not in REWARDS:
            raise ValueError(
                f"reward must be one of {REWARDS}, got {reward!r}: 'log_likelihood' gives the "
                "gradient of F, 'zero_one' the 0/1 correct-label reward of Ba et al. (2014)"
            )
        decay = check_decay(decay)
        if isinstance(entropy_weight, bool) or not isinstance(entropy_weight, (int, float)) \
                or not math.isfinite(entropy_weight) or entropy_weight < 0:
            raise ValueError(f"entropy_weight must be a finite number >= 0, got {entropy_weight!r}")
        if isinstance(max_enum_size, bool) or not isinstance(max_enum_size, int) \
                or max_enum_size < 1:
            raise ValueError(f"max_enum_size must be an integer >= 1, got {max_enum_size!r}")
        if estimator == "enum":
            if baseline is not None:
                raise ValueError(
                    f"baseline={baseline!r} only applies to estimator='reinforce'; "
                    "estimator='enum' is exact and needs no baseline (pass baseline=None)"
                )
            if normalize:
                raise ValueError("normalize=True only applies to estimator='reinforce'")
            if reward != "log_likelihood":
                raise ValueError(
                    f"reward={reward!r} only applies to estimator='reinforce'; "
                    "estimator='enum' computes F with the log-likelihood"
                )
        if baseline == "leave_one_out" and (num_particles < 2 or not self.vectorize_particles):
            raise ValueError(
                "baseline='leave_one_out' needs num_particles >= 2 and vectorize_particles=True "
                f"(got num_particles={num_particles}, "
                f"vectorize_particles={self.vectorize_particles}): each particle's baseline is "
                "the mean reward of the others; raise num_particles or choose "
                "baseline='moving_average'"
            )
        self.estimator = estimator
        self.baseline = baseline
        self.decay = decay
        self.normalize = bool(normalize)
        self.entropy_weight = float(entropy_weight)
        self.reward = reward
        self.max_enum_size = max_enum_size
        module = {
            None: None,
            "moving_average": lambda: MovingAverageBaseline(decay),
            "learned": lambda: LearnedBaseline(baseline_hidden_dim, baseline_net_factory, decay,
                                               baseline_lr),
            "leave_one_out": LeaveOneOutBaseline,
        }[baseline]
        #: the loss's learned state (baseline and normalizer), a torch.nn.Module
        self.baseline_state = SignalState(
            module() if module is not None else None,
            SignalNormalizer(decay) if self.normalize else None,
        )
        self._model_trace = None  # the trace of the particle being combined (reinforce)
        self._reward_shift: dict[frozenset[Frame], torch.Tensor] | None = None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The baseline and normalizer state (see :attr:`baseline_state`)."""
        return self.baseline_state.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the state saved by :meth:`state_dict`."""
        self.baseline_state.load_state_dict(state_dict)

    # ------------------------------------------------------------------ traces
    def _get_traces(self, model, guide, args, kwargs):
        if self.estimator == "enum" and self.max_plate_nesting == float("inf"):
            self._guess_max_plate_nesting(model, guide, args, kwargs)
        yield from super()._get_traces(model, guide, args, kwargs)

    def _get_trace(self, model, guide, args, kwargs):
        if self.estimator == "reinforce":
            return super()._get_trace(model, guide, args, kwargs)
        model_trace, guide_trace = record_guide_and_model(
            model, guide, args, kwargs, wrap_model=self._enumerated_model
        )
        if is_validation_enabled():
            check_guide_sites(model_trace, guide_trace, type(self).__name__)
            check_plate_shapes(guide_trace, self.max_plate_nesting)
        guide_names = set(guide_trace.nodes)
        self._check_enum_size(model_trace, guide_names)
        if self.entropy == "path" and _has_undecided_path_site(guide_trace, self._path_blocked):
            _record_upstream_values(guide_trace)
        return model_trace, guide_trace

    def _enumerated_model(self, model, guide_trace):
        """The model with every latent the guide does not sample enumerated in parallel."""
        return poutine.enum(
            poutine.infer_config(model, self._enum_config(set(guide_trace.nodes))),
            first_available_dim=-1 - self.max_plate_nesting,
        )

    def _enum_config(self, guide_names: set[str]):
        """``infer_config`` function: enumerate, in parallel, each latent the guide does not
        sample; refuse sites whose support is not finite."""

        def config(msg) -> dict:
            if (msg["type"] != "sample" or msg["is_observed"] or msg["name"] in guide_names
                    or is_subsample_site(msg)):
                return {}
            fn = msg["fn"]
            if not getattr(fn, "has_enumerate_support", False):
                raise ValueError(
                    f"attention site '{msg['name']}' has a {type(fn).__name__} distribution, "
                    "whose support cannot be enumerated; estimator='enum' needs a finite "
                    "discrete support (Categorical, Bernoulli, OneHotCategorical, ...). Use "
                    "estimator='reinforce' for this site, or sample it in the guide"
                )
            return {"enumerate": "parallel"}

        return config

    def _check_enum_size(self, model_trace, guide_names: set[str]) -> None:
        sizes = {
            name: _support_size(site)
            for name, site in model_trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"] and name not in guide_names
        }
        total = math.prod(sizes.values())
        if total > self.max_enum_size:
            detail = " x ".join(f"{n}: {k}" for n, k in sizes.items())
            raise ValueError(
                f"estimator='enum' would enumerate {total} joint configurations of the "
                f"attention sites ({detail}), more than max_enum_size={self.max_enum_size}; "
                "use estimator='reinforce', fewer or coarser attention sites, or raise "
                "max_enum_size"
            )

    # ------------------------------------------------------------------ site treatments
    def _unguided_latent_terms(
        self, name: str, model_site: dict
    ) -> tuple[list[Term], list[ScoreSite]]:
        """Prior-proposal treatment: no term of its own (plus the entropy bonus, if any);
        the unscaled ``log p(l)`` carries the score-function term.

        A reparameterized model-drawn site (``pyro.sample`` draws it with ``rsample``) already
        carries the pathwise gradient of F = E_eps[log p(y | l(eps, W))] into the terms
        downstream of it; adding a score term on top would count the gradient twice, so such
        a site gets none.
        """
        terms = []
        if self.entropy_weight > 0:
            terms.append(self._bonus_term(name, model_site))
        if is_reparameterized(model_site):
            return terms, []
        return terms, [score_site(name, model_site)]

    def _bonus_term(self, name: str, model_site: dict) -> Term:
        entropy = analytic_entropy(model_site["fn"])
        if entropy is None:
            raise ValueError(
                f"entropy_weight > 0 needs the entropy of attention site '{name}' in closed "
                f"form, which {type(model_site['fn']).__name__} does not provide; set "
                "entropy_weight=0"
            )
        value = scaled(model_site, self.entropy_weight * entropy)
        return Term(name, "bonus", value, value, plate_frames(model_site), analytic=True)

    # ------------------------------------------------------------------ particles
    def _particle(self, model_trace, guide_trace, update_state: bool = True) -> ParticleEstimate:
        if self.estimator == "enum":
            return self._enum_particle(model_trace, guide_trace)
        self._model_trace = model_trace
        guide_nodes = guide_trace.nodes
        for name, site in model_trace.nodes.items():
            if site["type"] == "sample" and not site["is_observed"]:
                site["_elbo_ext_guided"] = name in guide_nodes
        self._reward_shift = (
            _zero_one_shift(model_trace) if self.reward == "zero_one" else None
        )
        try:
            return super()._particle(model_trace, guide_trace, update_state)
        finally:
            self._model_trace = None
            self._reward_shift = None

    def _enum_particle(self, model_trace, guide_trace) -> ParticleEstimate:
        """Exact expectation of every term over the enumerated attention sites."""
        guide_nodes = guide_trace.nodes
        attention = {
            name: site
            for name, site in model_trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"] and name not in guide_nodes
        }
        _check_distinct_enum_dims(attention)
        weights: dict[frozenset[Frame], torch.Tensor | float] = {}
        # with no guide latents every expectation is exact: mark the terms analytic
        exact = not any(s["type"] == "sample" for s in guide_nodes.values())
        nesting = self.max_plate_nesting

        def expect(term: Term) -> Term:
            weight = weights.get(term.frames)
            if weight is None:
                log_w = sum(
                    (log_density(s) for s in attention.values()
                     if plate_frames(s) <= term.frames),
                    0.0,
                )
                weight = log_w.exp() if torch.is_tensor(log_w) else 1.0
                weights[term.frames] = weight
            value = term.contribution * weight
            if torch.is_tensor(value) and value.dim() > nesting:
                value = value.sum(tuple(range(value.dim() - nesting)))
            return Term(term.site, term.kind, value, value, term.frames, exact or term.analytic)

        terms: list[Term] = []
        score_sites: list[ScoreSite] = []
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample":
                continue
            if site["is_observed"]:
                value = scaled(site, log_density(site))
                terms.append(expect(Term(name, "log_likelihood", value, value,
                                         plate_frames(site))))
            elif name in attention:
                if self.entropy_weight > 0:
                    terms.append(expect(self._bonus_term(name, site)))
            else:
                guide_site = guide_nodes[name]
                terms.extend(expect(t) for t in self._latent_terms(name, site, guide_site))
                if not is_reparameterized(guide_site):
                    score_sites.append(
                        score_site(name, guide_site)
                    )
        for name, site in guide_nodes.items():
            if site["type"] == "sample" and name not in model_trace.nodes:
                terms.extend(self._auxiliary_terms(name, site))
                if not is_reparameterized(site):
                    score_sites.append(score_site(name, site))
        return combine(terms, score_sites, None)

    # ------------------------------------------------------------------ learning signal
    def _baseline(self, update_state: bool) -> BaselineFn | None:
        """The learning-signal transform: reward choice, baseline, normalization.

        Returned as the engine's :data:`~pyro_elbo_ext.elbos.engine.BaselineFn`: what it
        returns as "baseline" is ``cost - signal``, so the engine's ``cost - baseline`` is the
        signal ``(R - b) / scale``.
        """
        if (self.baseline is None and not self.normalize and self.reward == "log_likelihood"):
            return None
        state = self.baseline_state
        model_trace = self._model_trace

        def signal_fn(score_site: ScoreSite, cost: torch.Tensor):
            model_site = model_trace.nodes.get(score_site.site) if model_trace else None
            if model_site is None or model_site.get("_elbo_ext_guided", False):
                # a guide-sampled (or auxiliary) site: its score meets the plain cost, as in
                # JensenELBO; rewards, baselines and normalization are for attention sites
                return cost.new_zeros(()) if torch.is_tensor(cost) else 0.0, 0.0
            reward = cost
            if self._reward_shift:
                reward = reward + sum_to_frames(self._reward_shift, score_site.frames)
            penalty: torch.Tensor | float = 0.0
            if self.baseline is None:
                signal = reward
            elif self.baseline == "moving_average":
                signal = reward - state.baseline(score_site.site, reward, update_state)
            elif self.baseline == "learned":
                site = model_trace.nodes.get(score_site.site) if model_trace else None
                x = site["infer"].get("baseline_input") if site is not None else None
                scale = site["scale"] if site is not None else 1.0
                b, penalty = state.baseline(score_site.site, reward, x, scale, update_state)
                signal = reward - b
            else:  # leave_one_out
                signal = reward - state.baseline(
                    score_site.site, reward, -self.max_plate_nesting, score_site.score
                )
            if state.normalizer is not None:
                signal = state.normalizer(score_site.site, signal, update_state)
            return cost - signal, penalty

        return signal_fn

    # ------------------------------------------------------------------ decomposition
    def _decomposition_notes(self) -> tuple[str, ...]:
        notes = []
        if self.entropy_weight > 0:
            notes.append(
                f"L includes the entropy bonus {self.entropy_weight:g} * sum_t H[p(l_t|l_<t)] "
                "(kind 'bonus'): L - bonus is F"
            )
        if self.reward == "zero_one":
            notes.append("reward='zero_one': the attention policy's gradient is not that of F")
        if self.normalize:
            notes.append("normalize=True rescales the score-function gradient (not unbiased)")
        return tuple(notes)

    def decompose(self, model, guide, *args, **kwargs) -> HardAttentionDecomposition:
        """The terms of L, with the exact F, log p(y | I, W) and their gap where enumerable.

        Returns
        -------
        HardAttentionDecomposition
            ``elbo`` and ``terms`` as for every loss (the estimate of F, exact for
            ``estimator="enum"``); ``exact_bound`` is F by enumeration, ``log_evidence`` is
            log p(y | I, W) by exact marginalization, and ``gap = log_evidence - exact_bound``
            (= KL[p(l | I, W) || p(l | y, I, W)] >= 0).  The three are ``None`` when the
            attention sites cannot be enumerated (continuous, or more than
            ``max_enum_size`` configurations), and when the guide samples latents (the bound
            then also has a guide gap and is not computed exactly).  With a subsampling plate
            every one of these is computed on the same minibatch (that of the first particle
            when the particles are not vectorized): each pass starts from the same random
            state, so ``pyro.plate`` draws the same indices.
        """
        with torch.random.fork_rng():  # the exact values below replay these random draws
            base = super().decompose(model, guide, *args, **kwargs)
        values = {f.name: getattr(base, f.name) for f in fields(Decomposition)}
        exact = self.exact_values(model, guide, *args, **kwargs)
        return HardAttentionDecomposition(**values, **exact)

    def exact_values(self, model, guide, *args, **kwargs) -> dict[str, float | None]:
        """``{"exact_bound": F, "log_evidence": log p(y), "gap": ...}`` by enumeration.

        Each entry is ``None`` where it cannot be computed (see :meth:`decompose`).
        """
        out: dict[str, float | None] = {"exact_bound": None, "log_evidence": None, "gap": None}
        nesting = self._base_plate_nesting
        options = {} if nesting == float("inf") else {"max_plate_nesting": nesting}
        with torch.random.fork_rng():  # each pass sees the same minibatch (see decompose)
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        if any(s["type"] == "sample" for s in guide_trace.nodes.values()):
            return out  # the bound then also depends on q: nothing here is exact
        exact = HardAttentionELBO(estimator="enum", max_enum_size=self.max_enum_size,
                                  entropy=self.entropy, **options)
        try:
            with torch.no_grad(), torch.random.fork_rng():
                out["exact_bound"] = -exact.loss(model, guide, *args, **kwargs)
        except ValueError as error:
            if "estimator='enum'" not in str(error):
                raise
            return out
        guide_names: set[str] = set()
        enum_model = poutine.infer_config(model, exact._enum_config(guide_names))
        with torch.no_grad():
            log_evidence = -TraceEnum_ELBO(max_plate_nesting=exact.max_plate_nesting).loss(
                enum_model, guide, *args, **kwargs
            )
        out["log_evidence"] = log_evidence
        out["gap"] = log_evidence - out["exact_bound"]
        return out


@dataclass(frozen=True)
class HardAttentionDecomposition(Decomposition):
    """A :class:`Decomposition` with the exact bound, log evidence and gap of a hard-attention
    model (``None`` where the attention sites cannot be enumerated)."""

    exact_bound: float | None = None
    log_evidence: float | None = None
    gap: float | None = None

    def __str__(self) -> str:
        lines = [super().__str__()]
        if self.exact_bound is not None:
            lines.append(f"  exact F = {self.exact_bound:.6g}")
        if self.log_evidence is not None:
            lines.append(f"  log p(y) = {self.log_evidence:.6g}  gap = KL[p(l)||p(l|y)] = "
                         f"{self.gap:.6g}")
        return "\n".join(lines)


def _support_size(site: dict) -> int:
    """Number of values an enumerated site takes (its enumerated dimension's size)."""
    value = site["value"]
    dim = site["infer"].get("_enumerate_dim")
    if dim is not None and torch.is_tensor(value) and value.dim() >= -dim:
        return int(value.shape[dim])
    return int(site["fn"].enumerate_support(expand=False).shape[0])


def _check_distinct_enum_dims(attention: dict[str, dict]) -> None:
    """The expectation over the enumerated sites needs one dimension per site.

    ``pyro.markov`` recycles enumeration dimensions along a chain; the product of the sites'
    probabilities is then no longer the joint p(l), and the expectation would be wrong.
    """
    owner: dict[int, str] = {}
    for name, site in attention.items():
        dim = site["infer"].get("_enumerate_dim")
        if dim is None:
            continue
        if dim in owner:
            raise ValueError(
                f"attention sites '{owner[dim]}' and '{name}' share enumeration dimension {dim} "
                "(pyro.markov recycles dimensions), which estimator='enum' cannot take an "
                "expectation over; write the glimpses in a plain Python loop (or a "
                "pyro.markov(history=T) window covering all of them), or use "
                "estimator='reinforce'"
            )
        owner[dim] = name


def _zero_one_shift(model_trace) -> dict[frozenset[Frame], torch.Tensor]:
    """Per plate set: ``R - log p(y | l)`` summed over observed sites, scaled and masked.

    ``R = 1`` where the observed value is a most probable value of its distribution, else 0;
    adding this to the engine's cost turns the log-likelihood reward into the 0/1 reward.
    """
    shift: dict[frozenset[Frame], torch.Tensor] = {}
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or not site["is_observed"]:
            continue
        if site["infer"].get("_deterministic"):  # pyro.deterministic: not a label
            continue
        fn = site["fn"]
        if not getattr(fn, "has_enumerate_support", False):
            raise ValueError(
                f"reward='zero_one' needs observed site '{name}' to have a finite support (a "
                f"class label), but its distribution is {type(fn).__name__}; use "
                "reward='log_likelihood'"
            )
        # outside no_grad: log_density memoizes, and the observed term reuses this tensor
        log_p = log_density(site).detach()
        with torch.no_grad():
            support = fn.enumerate_support(expand=False)
            best = fn.log_prob(support).max(0).values
            correct = (log_p >= best - 1e-6).to(log_p.dtype)
            value = scaled(site, correct - log_p)
        frames = plate_frames(site)
        shift[frames] = shift[frames] + value if frames in shift else value
    return shift


__all__ = ["ESTIMATORS", "REWARDS", "HardAttentionDecomposition", "HardAttentionELBO",
           "empty_guide"]
