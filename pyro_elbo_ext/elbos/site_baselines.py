r"""Pyro's per-site baselines (``infer={"baseline": {...}}``), with TraceGraph_ELBO's semantics.

A guide site whose sample carries a score function may say how its learning signal is
centred, exactly as for Pyro's ``TraceGraph_ELBO``::

    pyro.sample("z", dist.Bernoulli(logits=...),
                infer={"baseline": {"use_decaying_avg_baseline": True, "baseline_beta": 0.9}})
    pyro.sample("z", ..., infer={"baseline": {"nn_baseline": net, "nn_baseline_input": x}})
    pyro.sample("z", ..., infer={"baseline": {"baseline_value": b}})

The score term of the site then meets ``sg(R - b)`` instead of ``sg(R)``, with ``R`` its
Rao-Blackwellized reward (:mod:`.downstream`) and

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

The decaying averages are learning-signal state like the loss-level baselines of
:mod:`.baselines`: read in the forward pass, replaced by an update after the particle's
gradient (skipped with a warning naming the site when not finite), carried through a compiled
step (:meth:`~.baselines.LearningSignal.carried_state`) and saved by the loss's
``state_dict()`` under ``"site_baselines"``.

Contents: :data:`BASELINE_KEYS`, :class:`BaselineOptions` and :func:`baseline_options` (the
dict, validated as Pyro validates it, naming the site), :class:`SiteBaselines` (the state),
:func:`site_baseline_plan` (the options of a plan's score sites).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .baselines import StateSlots, _all_finite
from .densities import PATHWISE

#: the keys Pyro's TraceGraph_ELBO reads from ``infer["baseline"]``
BASELINE_KEYS = ("use_decaying_avg_baseline", "baseline_beta", "nn_baseline",
                 "nn_baseline_input", "baseline_value")


@dataclass(frozen=True)
class BaselineOptions:
    """A site's baseline: which parts (decided once per plan) and the average's decay."""

    decaying: bool
    beta: float
    network: bool
    value: bool


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
    network, value = options.get("nn_baseline") is not None, options.get(
        "baseline_value") is not None
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
    sampled each one), validated once per plan."""
    out = {}
    for site in plan.sites:
        if site.estimator == PATHWISE:
            continue
        sampled_by_model = getattr(site.treatment, "sampled_by", "guide") == "model"
        trace_site = (model_trace if sampled_by_model else guide_trace).nodes.get(site.name)
        if trace_site is None:
            continue
        options = baseline_options(site.name, trace_site["infer"])
        if options is not None and (options.decaying or options.network or options.value):
            out[site.name] = options
    return out


class SiteBaselines(StateSlots):
    """The decaying averages of Pyro's per-site baselines, one per site, element by element.

    State per site: ``(site, "average")``, a tensor of the site's signal shape (zeros before
    the first update).  Saved by the loss's ``state_dict()`` (:meth:`checkpoint`).
    """

    what = "decaying-average baseline"

    def average(self, site: str, like: torch.Tensor) -> torch.Tensor:
        """The site's current average (zeros of ``like``'s shape before its first update, or
        when the site's shape has changed)."""
        average = self.slots.get((site, "average"))
        if average is None or average.shape != like.shape:
            average = self.slots[(site, "average")] = torch.zeros_like(like)
            self.slots[(site, "skipped")] = torch.zeros((), dtype=torch.bool,
                                                        device=like.device)
        return average

    def update(self, site: str, reward: torch.Tensor, beta: float) -> None:
        """``a <- (1 - beta) R + beta a`` where the reward is finite (else skipped, warned)."""
        reward = reward.detach()
        average = self.average(site, reward)
        ok = _all_finite(reward)
        self.slots[(site, "average")] = torch.where(ok, (1 - beta) * reward + beta * average,
                                                    average)
        self._settle(site, ok)

    def checkpoint(self) -> dict:
        """The state to save (``{}`` when no site has an average)."""
        return self._saved_slots()

    def restore(self, saved: dict) -> None:
        """Load what :meth:`checkpoint` saved."""
        self.slots = {}
        self._load_slots(saved)


def centre(name: str, options: BaselineOptions, infer: dict, reward: torch.Tensor,
           average: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor,
                                                                     torch.Tensor | None]:
    """``(sg(R - b), regression)``: the site's centred signal and, for a network or a value,
    the squared error ``sum (sg(R) - b)^2`` that trains it (``None`` otherwise).

    ``reward`` is expanded to the site's signal shape; ``average(like)`` reads the decaying
    average.  The baseline must broadcast to that shape (a scalar, or the shape itself).
    """
    baseline = average(reward) if options.decaying else None
    learned = None
    if options.network:
        net, x = infer["baseline"]["nn_baseline"], infer["baseline"]["nn_baseline_input"]
        learned = net(x.detach() if torch.is_tensor(x) else x)
    elif options.value:
        learned = infer["baseline"]["baseline_value"]
        if not torch.is_tensor(learned):
            learned = torch.as_tensor(learned, dtype=reward.dtype, device=reward.device)
    if learned is not None:
        try:
            shape = torch.broadcast_shapes(learned.shape, reward.shape)
        except RuntimeError:
            shape = None
        if shape != reward.shape:
            raise ValueError(
                f"site '{name}': the baseline has shape {tuple(learned.shape)}, but the "
                f"site's learning signal has shape {tuple(reward.shape)}; give one value per "
                "element of the site's batch shape (or a scalar)")
        baseline = learned if baseline is None else baseline + learned
    signal = (reward - baseline).detach()
    regression = None if learned is None else (reward.detach() - baseline).pow(2).sum()
    return signal, regression


__all__ = ["BASELINE_KEYS", "BaselineOptions", "SiteBaselines", "baseline_options", "centre",
           "site_baseline_plan"]
