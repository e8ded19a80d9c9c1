r"""Pyro's per-site baselines (``infer={"baseline": {...}}``), with TraceGraph_ELBO's semantics.

A site whose sample carries a score function may say how its learning signal is centred,
exactly as for Pyro's ``TraceGraph_ELBO``::

    pyro.sample("z", dist.Bernoulli(logits=...),
                infer={"baseline": {"use_decaying_avg_baseline": True, "baseline_beta": 0.9}})
    pyro.sample("z", ..., infer={"baseline": {"nn_baseline": net, "nn_baseline_input": x}})
    pyro.sample("z", ..., infer={"baseline": {"baseline_value": b}})

The score term of the site then meets ``sg(R - b)`` instead of ``sg(R)``, with ``R`` its
reward (Rao-Blackwellized by the data flow: :mod:`.downstream`) and

.. math::

    b = \underbrace{a_{n-1}}_{\text{decaying average}}
        + \underbrace{f_\psi(\mathrm{sg}(x))}_{\texttt{nn\_baseline}}
        \;\text{or}\; \underbrace{b_\text{value}}_{\texttt{baseline\_value}},
    \qquad a_n = (1 - \beta)\, R_n + \beta\, a_{n-1}, \quad a_0 = 0,

element by element over the site's batch shape (no bias correction, as in Pyro).  The
network's (or the value's) parameters learn by the squared error
:math:`\sum (\mathrm{sg}(R) - b)^2`, which is subtracted from the surrogate, so that the SVI
optimizer trains them with the model's and guide's (register the network with
``pyro.module`` in the guide, as for TraceGraph_ELBO).  The baseline used at step n reads
only past state and inputs that do not depend on the site's sample, so the estimate stays
unbiased (Williams 1992; Mnih & Gregor 2014, arXiv:1402.0030).

:class:`SiteBaselines` is a part of the loss's learning signal (:mod:`.signals`): its
decaying averages are read in the forward pass, replaced by an update after the gradient
(skipped with a warning naming the site when not finite), carried through a compiled step
and saved by the loss's ``state_dict()``.  For a site with these options it takes the place
of the loss's own baseline (``HardAttentionELBO(baseline=...)``); a loss's reward transform
and normalizer still apply to the sites that use them.

Contents: :data:`BASELINE_KEYS`, :class:`BaselineOptions` and :func:`baseline_options` (the
dict, validated as Pyro validates it, naming the site), :data:`SITE_BASELINES` and
:func:`site_baseline_plan` (the options of a plan's score sites), :class:`SiteBaselines`.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from .densities import PATHWISE
from .signals import SITE_BASELINES, SignalPart, SignalSite
from .state import all_finite

#: the keys Pyro's TraceGraph_ELBO reads from ``infer["baseline"]``
BASELINE_KEYS = ("use_decaying_avg_baseline", "baseline_beta", "nn_baseline",
                 "nn_baseline_input", "baseline_value")


@dataclass(frozen=True)
class BaselineOptions:
    """A site's baseline, decided once per plan: which parts, the average's decay, and
    whether the site's treatment also takes the loss's learning signal (its reward transform
    and normalizer)."""

    decaying: bool
    beta: float
    network: bool
    value: bool
    with_loss_signal: bool = False


def baseline_options(name: str, infer: dict) -> BaselineOptions | None:
    """The options of ``infer["baseline"]`` (``None`` without one), validated as Pyro's
    ``TraceGraph_ELBO`` validates them, with errors that name the site."""
    options = infer.get("baseline")
    if options is None:
        return None
    if not isinstance(options, dict):
        raise ValueError(
            f"site '{name}': infer['baseline'] must be a dict of baseline options "
            f"({', '.join(BASELINE_KEYS)}), got {type(options).__name__}")
    unknown = sorted(set(options) - set(BASELINE_KEYS))
    if unknown:
        raise ValueError(
            f"site '{name}': unrecognized baseline options {unknown} in infer['baseline']; "
            f"the options are {', '.join(BASELINE_KEYS)} (as for Pyro's TraceGraph_ELBO)")
    decaying = options.get("use_decaying_avg_baseline", False)
    if not isinstance(decaying, bool):
        raise ValueError(f"site '{name}': use_decaying_avg_baseline must be True or False, "
                         f"got {decaying!r}")
    beta = options.get("baseline_beta", 0.9)
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0.0 <= beta < 1.0:
        raise ValueError(f"site '{name}': baseline_beta must be a number in [0, 1), got "
                         f"{beta!r}")
    network = options.get("nn_baseline") is not None
    value = options.get("baseline_value") is not None
    if network and value:
        raise ValueError(f"site '{name}': infer['baseline'] cannot use baseline_value and "
                         "nn_baseline together (as for Pyro's TraceGraph_ELBO); keep one")
    if network and not callable(options["nn_baseline"]):
        raise ValueError(f"site '{name}': nn_baseline must be a module (a callable), got "
                         f"{type(options['nn_baseline']).__name__}")
    if network and options.get("nn_baseline_input") is None:
        raise ValueError(f"site '{name}': nn_baseline needs nn_baseline_input (the tensor "
                         "the network reads; it must not depend on the site's sample)")
    return BaselineOptions(decaying, float(beta), network, value)


def site_baseline_plan(plan, model_trace, guide_trace) -> dict[str, BaselineOptions]:
    """The baseline options of a plan's score-function sites (read from the trace that
    sampled each one), validated once per plan; sites whose options ask for nothing are
    left out."""
    out = {}
    for site in plan.sites:
        if site.gradient == PATHWISE:
            continue
        by_model = site.treatment.sampled_by == "model"
        trace_site = (model_trace if by_model else guide_trace).nodes.get(site.name)
        if trace_site is None:
            continue
        options = baseline_options(site.name, trace_site["infer"])
        if options is not None and (options.decaying or options.network or options.value):
            out[site.name] = BaselineOptions(options.decaying, options.beta, options.network,
                                             options.value,
                                             site.treatment.uses_learning_signal)
    return out


class SiteBaselines(SignalPart):
    """Pyro's per-site baselines as a learning-signal part (see the module docstring).

    State per site with a decaying average: ``(site, "average")``, a tensor of the site's
    signal shape (zeros before the first update, and again if that shape changes).
    """

    kind = "site_baselines"
    what = "decaying-average baseline"

    @staticmethod
    def options(site: SignalSite) -> BaselineOptions:
        return site.ctx.plan.fact(SITE_BASELINES)[site.name]

    def average(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The site's current average (zeros of ``like``'s shape before its first update)."""
        average = self.slots.get((name, "average"))
        if average is None or average.shape != like.shape:
            average = self.slots[(name, "average")] = torch.zeros_like(like)
            self.slots[(name, "skipped")] = torch.zeros((), dtype=torch.bool,
                                                        device=like.device)
        return average

    @staticmethod
    def _expanded(site: SignalSite, signal: torch.Tensor) -> torch.Tensor:
        return signal.expand(torch.broadcast_shapes(signal.shape, site.score_function.shape))

    def _baseline(self, site: SignalSite, reward: torch.Tensor):
        """``(b, learned part or None)`` for the site at this step."""
        options = self.options(site)
        baseline = self.average(site.name, reward) if options.decaying else None
        learned = None
        given = site.infer["baseline"]
        if options.network:
            x = given["nn_baseline_input"]
            learned = given["nn_baseline"](x.detach() if torch.is_tensor(x) else x)
        elif options.value:
            learned = given["baseline_value"]
            if not torch.is_tensor(learned):
                learned = torch.as_tensor(learned, dtype=reward.dtype, device=reward.device)
        if learned is not None:
            try:
                shape = torch.broadcast_shapes(learned.shape, reward.shape)
            except RuntimeError:
                shape = None
            if shape != reward.shape:
                raise ValueError(
                    f"site '{site.name}': the baseline has shape {tuple(learned.shape)}, but "
                    f"the site's learning signal has shape {tuple(reward.shape)}; give one "
                    "value per element of the site's batch shape (or a scalar)")
            baseline = learned if baseline is None else baseline + learned
        return baseline, learned

    def apply(self, site: SignalSite, signal: torch.Tensor) -> torch.Tensor:
        """``sg(R - b)``; a network's or a value's squared error is kept for the surrogate."""
        reward = self._expanded(site, signal)
        baseline, learned = self._baseline(site, reward)
        if learned is not None:
            site.memo[(self, site.name)] = (reward.detach() - baseline).pow(2).sum()
        return (reward - baseline).detach()

    def surrogate(self, site: SignalSite, signal: torch.Tensor) -> torch.Tensor | None:
        """Minus the squared error of a network or value baseline (the SVI optimizer then
        regresses it on the reward), or ``None``."""
        error = site.memo.pop((self, site.name), None)
        return None if error is None else -error

    def update(self, site: SignalSite, signal: torch.Tensor, applied: torch.Tensor) -> None:
        """``a <- (1 - beta) R + beta a`` where the reward is finite (else skipped, warned)."""
        options = self.options(site)
        if not options.decaying:
            return
        reward = self._expanded(site, signal).detach()
        average = self.average(site.name, reward)
        ok = all_finite(reward)
        beta = options.beta
        self.slots[(site.name, "average")] = torch.where(
            ok, (1 - beta) * reward + beta * average, average)
        self.settle(site.name, ok)


__all__ = ["BASELINE_KEYS", "SITE_BASELINES", "BaselineOptions", "SiteBaselines",
           "baseline_options", "site_baseline_plan"]
