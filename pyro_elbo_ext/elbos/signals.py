r"""Learning signals: what a score-function term meets instead of its plain reward.

A score-function site j with score :math:`\log q(z_j)` (or :math:`\log p(l_j)` for a site drawn
from the model) and reward :math:`R_j` (the part of the estimate that may depend on
:math:`z_j`) contributes :math:`\nabla \log q(z_j)\, \mathrm{sg}(s_j)` to the surrogate, where
the learning signal :math:`s_j` is :math:`R_j` passed through a chain of **parts**: a reward
transform, a baseline :math:`R_j - b_j`, a normalizer.  Because
:math:`\mathbb{E}[\nabla \log q(z_j)] = 0`, any :math:`b_j` that does not depend on
:math:`z_j` leaves the estimate unbiased (Williams 1992; Mnih & Gregor 2014,
arXiv:1402.0030); a good one reduces its variance.

The protocol every part answers (:class:`SignalPart`; no caller asks which kind it is):

``apply(site, signal) -> signal``
    The forward pass: the signal after this part.  Reads the part's state only.
``update(site, signal, applied)``
    After the batch's gradient: fold what the forward pass saw (``signal`` entering the part,
    ``applied`` leaving it) into the state, by replacing the state's tensors
    (:class:`~.state.StateSlots`), guarded against non-finite values (skipped with a warning
    naming the site).  No-op for a stateless part.
``surrogate(site, signal) -> Tensor | None``
    Extra differentiable terms the part adds to the surrogate, with no value of their own: a
    baseline whose parameters the user's optimizer trains by a regression loss (Pyro's
    ``nn_baseline``), a control variate's correction (RELAX's
    :math:`\nabla c_\phi(z) - \nabla c_\phi(\tilde z)`).  ``None`` by default.
``settings() -> dict``, ``kind``
    What a checkpoint must agree on, and the part's name; both are saved with its state (the
    kind always), and a checkpoint of another kind or setting is refused naming both values.
``notes() -> tuple[str, ...]``
    Caveats ``decompose`` prints (e.g. a normalizer makes the estimate rescaled, not
    unbiased).

:class:`SignalSite` is what a part sees of a site: its name, score function, plates, the
particle dimension, the site's own trace entries (so a per-site setting in
``infer={"baseline": ...}`` or an input in ``infer={"baseline_input": x}`` is read from the
site) and a per-batch memo.  :class:`LearningSignal` chains a loss's parts, carries their state
through a compiled step (``carried_state`` / ``load_carried_state``) and checkpoints them;
:class:`BoundSignal` is the chain bound to one batch (the engine's
:data:`~.engine.SignalFn`).  Parts: the baselines and normalizer of :mod:`.baselines`,
:class:`~.learned_baseline.LearnedBaseline`, :class:`ZeroOneReward`, and VIMCO's
(:mod:`.importance_weighted`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .engine import Frame, ScoreSite, sum_to_frames
from .plan import PlanFact
from .state import StateSlots, check_setting, warn_skipped

#: the Pyro per-site baseline options of a plan's score sites (site -> options), decided once
#: per plan (:func:`~.site_baselines.site_baseline_plan`)
SITE_BASELINES: PlanFact[dict] = PlanFact("per-site baselines")


@dataclass
class SignalSite:
    """A score-function site as a learning-signal part sees it (one batch, one call).

    Attributes
    ----------
    name : str
    score_function : torch.Tensor
        The site's score (unscaled, unmasked), shaped like its batch.
    frames : frozenset of Frame
        Its vectorized plates.
    particle_dim : int or None
        The dimension of the vectorized particles (``None``: one particle).
    model_site, guide_site : dict or None
        The site's entries in the model and guide traces.
    ctx : StepContext
        The batch's traces, plan and settings.
    memo : dict
        Per-batch values a part computes once for all sites, keyed by the part itself (e.g.
        a reward transform of the whole trace).
    downstream_sites : frozenset of str or None
        The sites whose terms the site's reward holds (``None``: every site not separated
        from it by plates), for a transform that adds per-site values to the reward.
    """

    name: str
    score_function: torch.Tensor
    frames: frozenset[Frame]
    particle_dim: int | None
    model_site: dict | None
    guide_site: dict | None
    ctx: Any = None
    memo: dict = field(default_factory=dict)
    downstream_sites: frozenset[str] | None = None

    @property
    def sample_site(self) -> dict:
        """The trace entry of the sample (the guide's, or the model's for a model-drawn site)."""
        return self.guide_site if self.guide_site is not None else self.model_site

    @property
    def scale(self):
        """The plate scale of the sample's site (``N / batch_size`` under subsampling)."""
        return self.sample_site["scale"]

    @property
    def infer(self) -> dict:
        """The sample site's ``infer`` dict (per-site settings and inputs)."""
        return self.sample_site["infer"]


class SignalPart(StateSlots):
    """One part of a learning signal (see the module docstring for the protocol).

    Subclasses set :attr:`kind` and :attr:`what`, implement :meth:`apply`, and where they have
    state, :meth:`update` and :meth:`settings`.
    """

    #: the part's name in checkpoints and errors
    kind: str = "part"
    #: the names of the settings for the user (keys of :meth:`settings` -> argument names)
    setting_names: Mapping[str, str] = {}

    def apply(self, site: SignalSite, signal: torch.Tensor) -> torch.Tensor:
        """The signal after this part (reads the state only)."""
        return signal

    def update(self, site: SignalSite, signal: torch.Tensor, applied: torch.Tensor) -> None:
        """After the gradient: fold this step's observation into the state (replacing it)."""

    def surrogate(self, site: SignalSite, signal: torch.Tensor) -> torch.Tensor | None:
        """Extra differentiable terms of the surrogate (none by default)."""
        return None

    def settings(self) -> dict[str, Any]:
        """The settings a checkpoint must agree on (saved with the state)."""
        return {}

    def notes(self) -> tuple[str, ...]:
        """Caveats for ``decompose``."""
        return ()

    # ------------------------------------------------------------------ checkpoints
    def get_extra_state(self) -> dict:
        return {"kind": self.kind, **self.settings(), **self.extra_state(),
                "slots": self.saved_slots()}

    def set_extra_state(self, state: dict) -> None:
        saved_kind = state.get("kind", self.legacy_kind(state))
        if saved_kind != self.kind:
            raise ValueError(
                f"cannot load the state of a {saved_kind} {self.what} into a {self.kind} "
                f"{self.what}; build the loss with the {self.what} it was saved with"
            )
        for key, own in self.settings().items():
            check_setting(self.what, self.setting_names.get(key, key), state.get(key), own)
        self.slots = {}
        self.restore_extra_state(state)
        self.load_slots(state["slots"])

    def extra_state(self) -> dict:
        """Part-specific entries of the checkpoint besides kind, settings and slots."""
        return {}

    def restore_extra_state(self, state: dict) -> None:
        """Rebuild what :meth:`extra_state` saved (before the slots are loaded)."""

    def legacy_kind(self, state: dict) -> str | None:
        """The kind of a checkpoint saved before kinds were always saved (``None``: unknown)."""
        return None


class ZeroOneReward(SignalPart):
    """The 0/1 correct-label reward of Ba, Mnih & Kavukcuoglu (2014, arXiv:1412.7755).

    Replaces the log-likelihood reward by ``R = 1[the observed label is a most probable value
    of its distribution]`` (:func:`~.rewards.zero_one_shift`, computed once per batch), summed
    over the plates the site is not in.  A different objective: expected accuracy.
    """

    kind = "zero_one"
    what = "reward transform"

    def apply(self, site: SignalSite, signal: torch.Tensor) -> torch.Tensor:
        from .rewards import shift_for, zero_one_shift  # the transform's arithmetic

        shift = site.memo.get(self)
        if shift is None:
            shift = site.memo[self] = zero_one_shift(site.ctx.model_trace)
        if not shift:
            return signal
        return signal + sum_to_frames(shift_for(shift, site.downstream_sites), site.frames)

    def notes(self) -> tuple[str, ...]:
        return ("reward='zero_one': the attention policy's gradient is not that of F",)


class LearningSignal(nn.Module):
    """A loss's learning signal: a chain of :class:`SignalPart` s.

    Its state (:meth:`carried_state`) is a flat dict of tensors keyed
    ``(part, site, what, ...)`` (``part`` a module path such as ``"baseline"`` or
    ``"baseline.center"``); a compiled step carries it through its graph.

    Parameters
    ----------
    baseline : SignalPart or None
        What is subtracted from the reward (a moving average, a learned network, the
        leave-one-out mean, VIMCO's bound of the other particles).
    normalizer : SignalPart or None
        What the centred signal is divided by.
    reward : SignalPart or None
        A transform of the reward applied first (e.g. :class:`ZeroOneReward`).
    """

    def __init__(self, baseline: SignalPart | None = None,
                 normalizer: SignalPart | None = None, reward: SignalPart | None = None):
        super().__init__()
        self.reward = reward
        self.baseline = baseline
        self.normalizer = normalizer
        #: Pyro's per-site baselines (``infer={"baseline": ...}``), added by the loss when a
        #: plan has a site with them (:mod:`.site_baselines`)
        self.site_baselines: SignalPart | None = None
        #: while true, training calls read (and create) the state but do not update it
        self.paused = False

    @property
    def parts(self) -> list[SignalPart]:
        """The parts in the order they apply (to the sites without per-site baselines)."""
        return [p for p in (self.reward, self.baseline, self.normalizer) if p is not None]

    def parts_for(self, site: SignalSite) -> list[SignalPart]:
        """The parts a site's signal goes through: a site with Pyro's per-site baseline
        options has its own baseline in place of the loss's (and the loss's reward transform
        and normalizer only where its treatment takes the loss's signal)."""
        if self.site_baselines is None:
            return self.parts
        own = site.ctx.plan.fact(SITE_BASELINES, {}).get(site.name)
        if own is None:
            return self.parts
        if not own.with_loss_signal:
            return [self.site_baselines]
        return [p for p in (self.reward, self.site_baselines, self.normalizer)
                if p is not None]

    @property
    def needed(self) -> bool:
        """Whether the signal differs from the plain reward at all."""
        return bool(self.parts)

    def _slot_owners(self) -> dict[str, StateSlots]:
        return {name: module for name, module in self.named_modules()
                if isinstance(module, StateSlots) and name}

    def carried_state(self) -> dict[tuple, torch.Tensor]:
        """Every state tensor, keyed ``(part, site, what, ...)``."""
        return {(name,) + key: value for name, part in self._slot_owners().items()
                for key, value in part.slots.items()}

    def load_carried_state(self, state: dict[tuple, torch.Tensor]) -> None:
        """Replace state tensors by the given ones (keys as :meth:`carried_state`'s)."""
        owners = self._slot_owners()
        for key, value in state.items():
            owners[key[0]].slots[key[1:]] = value

    def warn_skipped(self) -> None:
        """Warn, naming the site, for every update of the last step that was skipped."""
        for part in self._slot_owners().values():
            for site in part.skipped_sites():
                warn_skipped(part.what, site)

    def notes(self) -> tuple[str, ...]:
        return tuple(note for part in self.parts for note in part.notes())

    def bind(self, ctx, training: bool, particle_dim: int | None) -> BoundSignal:
        """The signal of one batch (the engine's ``SignalFn``), reading the state only."""
        return BoundSignal(self, ctx, training and not self.paused, particle_dim)

    def load_state_dict(self, state_dict, strict: bool = True):
        """Restore a checkpoint, refusing one of another baseline kind (or with another
        normalizer setting) with a named error."""
        own = self.baseline.kind if self.baseline is not None else None
        saved = _saved_kind(state_dict, self.baseline)
        if saved != own:
            raise ValueError(
                f"cannot load the state of baseline={saved!r} into a loss with "
                f"baseline={own!r}; build the loss with baseline={saved!r} to use this "
                "checkpoint"
            )
        has_normalizer = any(k.startswith("normalizer.") for k in state_dict)
        if has_normalizer != (self.normalizer is not None):
            raise ValueError(
                f"cannot load the checkpoint: it was saved with normalize={has_normalizer}, "
                f"but this loss has normalize={self.normalizer is not None}"
            )
        state_dict = dict(state_dict)
        key = "site_baselines._extra_state"
        if key in state_dict and self.site_baselines is None:
            from .site_baselines import SiteBaselines

            self.site_baselines = SiteBaselines()
        elif key not in state_dict and self.site_baselines is not None:
            self.site_baselines.slots = {}  # a checkpoint without them: start afresh
            state_dict[key] = self.site_baselines.get_extra_state()
        for name, part in (("reward", self.reward), ("baseline", self.baseline)):
            key = f"{name}._extra_state"
            if part is not None and not part.slots and key not in state_dict:
                state_dict[key] = part.get_extra_state()  # a stateless part saved before kinds
        return super().load_state_dict(state_dict, strict)


def _saved_kind(state_dict, own: SignalPart | None) -> str | None:
    extra = state_dict.get("baseline._extra_state")
    if isinstance(extra, dict):
        kind = extra.get("kind")
        return kind if kind is not None else (own.legacy_kind(extra) if own else None)
    if own is not None and not own.slots and not own.settings():
        return own.kind  # a stateless baseline saved before kinds were saved: nothing to load
    return None


class BoundSignal:
    """The learning signal of one batch: its parts applied in order to each site's reward.

    Called by the engine for each site whose treatment uses the learning signal (forward: the
    state is read only); :meth:`update` then applies what it observed, once the batch's
    gradient is taken, and :meth:`surrogate` gives the parts' extra surrogate terms.
    """

    def __init__(self, signal: LearningSignal, ctx, training: bool,
                 particle_dim: int | None):
        self.signal = signal
        self.ctx = ctx
        self.training = training
        self.particle_dim = particle_dim
        self.memo: dict = {}
        self.observed: list[tuple[SignalPart, SignalSite, torch.Tensor, torch.Tensor]] = []
        self.extra: list[torch.Tensor] = []

    def site(self, score: ScoreSite, particle_dim: int | None = None) -> SignalSite:
        """What the parts see of ``score``'s site in this batch."""
        return SignalSite(score.site, score.score_function, score.frames,
                          self.particle_dim if particle_dim is None else particle_dim,
                          self.ctx.model_trace.nodes.get(score.site),
                          self.ctx.guide_trace.nodes.get(score.site), self.ctx, self.memo,
                          score.downstream_sites)

    def __call__(self, score: ScoreSite, reward: torch.Tensor,
                 particle_dim: int | None = None) -> torch.Tensor:
        site = self.site(score, particle_dim)
        signal = reward
        for part in self.signal.parts_for(site):
            applied = part.apply(site, signal)
            extra = part.surrogate(site, signal)
            if extra is not None:
                self.extra.append(extra)
            if self.training:
                self.observed.append((part, site, signal.detach(), applied.detach()))
            signal = applied
        return signal

    def surrogate(self) -> torch.Tensor | None:
        """The parts' extra surrogate terms of this batch (``None`` where there are none)."""
        if not self.extra:
            return None
        total = self.extra[0]
        for term in self.extra[1:]:
            total = total + term
        return total

    def update(self) -> None:
        """Apply this batch's observations to the state (each guarded against NaN)."""
        for part, site, signal, applied in self.observed:
            part.update(site, signal, applied)
        self.observed = []


__all__ = ["SITE_BASELINES", "BoundSignal", "LearningSignal", "SignalPart", "SignalSite",
           "ZeroOneReward"]
