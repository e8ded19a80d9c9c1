r"""Learning signals for score-function (REINFORCE) terms: baselines and normalization.

A score-function site j with score ``log p(l_j)`` and downstream reward ``R_j`` contributes
``d log p(l_j) * (R_j - b_j)`` to the gradient estimate.  Because ``E[d log p(l_j)] = 0``, any
baseline ``b_j`` that does not depend on the sample ``l_j`` leaves the estimate unbiased, and a
good one (``b_j ~ E[R_j | inputs, l_<j]``) reduces its variance (Williams 1992; Mnih & Gregor
2014, arXiv:1402.0030).

Every object here has explicit state and two phases: the forward pass *reads* the state
(``value`` / ``predict``), and the state changes only in an explicit ``update`` that the loss
calls after the particle's gradient is taken, from what the forward pass observed.  An update
that would take a non-finite value (a NaN reward, a NaN input) is skipped with a warning naming
the site, and the last finite state is kept.  The state is held by :class:`torch.nn.Module` s
owned by the loss (never by Pyro's global parameter store), as named tensors
(:class:`StateSlots`) that an update *replaces* and never writes into: the update is a pure
function of the old state and the observations, so the same code is traced into a compiled
step, which takes the state as inputs and returns the new tensors.  It is saved and restored
with ``state_dict()`` / ``load_state_dict()``; a checkpoint whose settings differ from the
loss's own (a decay, a network width) is refused with an error naming both values.

Classes
-------
StateSlots
    State as named tensors, replaced by updates; the base of the stateful objects below.
MovingAverageBaseline
    ``b_j`` = bias-corrected exponential moving average of past rewards (Xu et al. 2015,
    arXiv:1502.03044; Mnih et al. 2014, arXiv:1406.6247).
LearnedBaseline
    ``b_j = s_j (m_j + f_psi(x_j))``, an input-dependent network regressed on the reward
    (Mnih et al. 2014; NVIL, Mnih & Gregor 2014).
LeaveOneOutBaseline
    With K vectorized particles, ``b_j^k = mean_{k' != k} R_j^{k'}`` (VIMCO-style, Mnih &
    Rezende 2016, arXiv:1602.06725).  Stateless.
SignalNormalizer
    NVIL's division of the centred learning signal by ``max(1, running std)``.
LearningSignal
    The reward transform, baseline and normalizer of one loss, bound to a particle
    (:meth:`LearningSignal.bind`) as the engine's :data:`~.engine.SignalFn`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call

from .engine import Frame, ScoreSite, sum_to_frames
from .tracing import graph_tracing
from .validation import check_number, check_positive_int

#: the names accepted by ``HardAttentionELBO(baseline=...)`` (besides ``None``)
BASELINES = ("moving_average", "learned", "leave_one_out")

#: a state tensor's key within its object: ``(site, what, ...)``
SlotKey = tuple


def check_decay(decay: float) -> float:
    """``decay`` as a float in [0, 1), or a ValueError naming the argument."""
    return check_number("decay", decay, low=0.0, high=1.0, high_open=True)


def _all_finite(*tensors: torch.Tensor) -> torch.Tensor:
    """A 0-dim boolean tensor: every element of every tensor is finite (no Python read)."""
    flags = [torch.isfinite(t).all() for t in tensors]
    return torch.stack(flags).all() if len(flags) > 1 else flags[0]


def _skip_warning(what: str, site: str) -> None:
    warnings.warn(
        f"the {what} of site '{site}' was not updated: this step's learning signal is not "
        "finite (a NaN or infinite reward or baseline input); the last finite state is kept",
        RuntimeWarning,
        stacklevel=5,
    )


def _check_setting(kind: str, name: str, saved, own) -> None:
    if saved != own:
        raise ValueError(
            f"cannot load the {kind} state: it was saved with {name}={saved!r}, but this loss "
            f"has {name}={own!r}; build the loss with {name}={saved!r} to continue from the "
            "checkpoint"
        )


def _check_kind(state: dict, kind: str) -> None:
    saved = state.get("kind") if isinstance(state, dict) else None
    if saved != kind:
        raise ValueError(
            f"cannot load the state of a {saved or 'different'} baseline into a {kind} "
            f"baseline; build the loss with baseline={saved!r} to use this checkpoint"
        )


class StateSlots(nn.Module):
    """State held as named tensors that each update *replaces* (it never writes in place).

    ``slots`` maps ``(site, what, ...)`` to a tensor, created with its initial value the first
    time the forward pass reads it.  Because an update only rebinds entries, the same code is
    the eager update and, traced, the graph's: a compiled step takes the slots as inputs and
    hands the new tensors back (through :meth:`LearningSignal.carried_state` and
    :meth:`LearningSignal.load_carried_state`).  Every update also sets ``(site, "skipped")``,
    true when it was skipped for a non-finite input.
    """

    #: how warnings name this object
    what = "state"

    def __init__(self):
        super().__init__()
        self.slots: dict[SlotKey, torch.Tensor] = {}

    def _settle(self, site: str, ok: torch.Tensor) -> None:
        """Record whether ``site``'s update was taken; eager, warn at once if it was not."""
        self.slots[(site, "skipped")] = ~ok
        if not graph_tracing() and not bool(ok):
            _skip_warning(self.what, site)

    def skipped_sites(self) -> list[str]:
        """The sites whose last update was skipped (one read of all flags)."""
        flags = [(key[0], flag) for key, flag in self.slots.items() if key[1:] == ("skipped",)]
        if not flags or not bool(torch.stack([f for _, f in flags]).any()):
            return []
        return [site for site, flag in flags if bool(flag)]

    def _saved_slots(self) -> dict:
        """The state for a checkpoint (the per-step skip flags are not state)."""
        return {k: v.detach().clone() for k, v in self.slots.items() if k[1:] != ("skipped",)}

    def _load_slots(self, saved: dict) -> None:
        self.slots.update({k: v.detach().clone() for k, v in saved.items()})
        for site in {key[0] for key in saved}:
            device = saved[next(k for k in saved if k[0] == site)].device
            self.slots.setdefault((site, "skipped"),
                                  torch.zeros((), dtype=torch.bool, device=device))


class MovingAverageBaseline(StateSlots):
    r"""Exponential moving average of the reward, one per site.

    .. math::

        m_n = \delta\, m_{n-1} + (1 - \delta)\, \bar R_n, \qquad
        b_{n+1} = m_n / (1 - \delta^n)

    where :math:`\bar R_n` is the mean reward of step n over the site's batch (and particles)
    and the division is the bias correction of a zero-initialized average (as in Adam).  The
    baseline used at step n+1 only depends on past steps, so the estimate stays unbiased.
    The first step uses ``b = 0``.  State per site: ``m_n`` and ``n`` (0-dim tensors).

    Parameters
    ----------
    decay : float
        :math:`\delta \in [0, 1)`; larger is smoother.
    """

    kind = "moving_average"
    what = "moving-average baseline"

    def __init__(self, decay: float = 0.9):
        super().__init__()
        self.decay = check_decay(decay)

    def _state(self, site: str, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        average = self.slots.get((site, "average"))
        if average is None:
            average = self.slots[(site, "average")] = like.new_zeros(())
            self.slots[(site, "count")] = like.new_zeros(())
            self.slots[(site, "skipped")] = torch.zeros((), dtype=torch.bool,
                                                        device=like.device)
        return average, self.slots[(site, "count")]

    def value(self, site: str, like: torch.Tensor) -> torch.Tensor:
        """The current baseline of ``site`` (0 before its first update); reads the state."""
        average, count = self._state(site, like)
        debiased = average / (1.0 - self.decay**count)  # 0/0 before the first update
        return torch.where(count > 0, debiased, torch.zeros_like(debiased)).to(like)

    @staticmethod
    def advance(average: torch.Tensor, count: torch.Tensor, mean_reward: torch.Tensor,
                decay: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The state after one step, state in and state out: ``(m_n, n)``."""
        return decay * average.to(mean_reward) + (1.0 - decay) * mean_reward, count + 1

    def fold(self, site: str, reward: torch.Tensor,
             gate: torch.Tensor | None = None) -> torch.Tensor:
        """Fold this step's mean reward in where it is finite (and ``gate`` holds); returns
        whether it was folded in (a 0-dim boolean tensor)."""
        mean = reward.detach().mean()
        average, count = self._state(site, mean)
        new_average, new_count = self.advance(average, count, mean, self.decay)
        ok = _all_finite(mean) if gate is None else gate & _all_finite(mean)
        self.slots[(site, "average")] = torch.where(ok, new_average, average)
        self.slots[(site, "count")] = torch.where(ok, new_count, count)
        return ok

    def update(self, site: str, reward: torch.Tensor) -> None:
        """Fold this step's mean reward into the average (skipped if it is not finite)."""
        self._settle(site, self.fold(site, reward))

    def get_extra_state(self) -> dict:
        return {"kind": self.kind, "decay": self.decay, "slots": self._saved_slots()}

    def set_extra_state(self, state: dict) -> None:
        _check_kind(state, self.kind)
        _check_setting("moving-average baseline", "decay", state["decay"], self.decay)
        self.slots = {}
        self._load_slots(state["slots"])


def default_baseline_net(in_features: int, hidden_dim: int) -> nn.Module:
    """A one-hidden-layer tanh network ``R^in_features -> R`` (the default learned baseline)."""
    return nn.Sequential(nn.Linear(in_features, hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, 1))


def _adam(lr: float):
    from ..compiled.optimizers import Adam  # torch.optim.Adam's update, as a pure function

    return Adam.from_args({"lr": lr})


class LearnedBaseline(StateSlots):
    r"""An input-dependent baseline network per site, regressed on the reward.

    .. math::

        b_j = s_j\,(m_j + f_{\psi_j}(x_j)), \qquad
        \text{loss}_\psi = \tfrac12 \sum (R_j / s_j - m_j - f_{\psi_j}(x_j))^2

    As in NVIL, the network learns the input-dependent residual around ``m_j``, a moving
    average of past rewards (:class:`MovingAverageBaseline`, with ``decay``), and it regresses
    the reward divided by the site's plate scale ``s_j`` (``N / batch_size`` under
    subsampling), so that its targets are of order one whatever the data size.

    ``x_j`` is the tensor the model attaches to the attention site as
    ``infer={"baseline_input": x}`` (shape ``batch_shape + (features,)``, the dtype of the
    reward; e.g. the coarse view of the image).  ``x_j`` must not depend on ``l_j`` itself
    (Mnih et al. 2014, arXiv:1406.6247; NVIL, Mnih & Gregor 2014, arXiv:1402.0030).

    How it learns: the forward pass predicts the baseline from the current weights
    (:meth:`predict`); after the particle's gradient is taken, :meth:`update` moves the
    average and takes one Adam step (learning rate ``lr``; ``torch.optim.Adam``'s update,
    written as a pure function) on the squared error against that step's rewards.  The
    prediction used in the learning signal comes from the weights before that update, so it
    does not depend on the sample it multiplies, and the estimator stays unbiased.  The
    weights and the Adam moments are tensors of this object's state (``slots``; the network
    module only gives the architecture, evaluated with :func:`torch.func.functional_call`):
    not in Pyro's parameter store, not seen by the user's optimizer, and carried through a
    compiled step.  Evaluation calls (``loss``, ``decompose``) neither update the average nor
    train the network.

    Parameters
    ----------
    hidden_dim : int
        Width of the default network's hidden layer.
    net_factory : callable, optional
        ``net_factory(site_name, in_features) -> nn.Module`` mapping ``(..., in_features)`` to
        ``(..., 1)``; default :func:`default_baseline_net`.  With a custom factory,
        ``load_state_dict`` into a fresh loss needs the same factory.
    decay : float
        Decay of the moving average ``m_j``.
    lr : float
        Learning rate (> 0, finite) of the network's Adam.
    """

    kind = "learned"
    what = "learned baseline"

    def __init__(
        self,
        hidden_dim: int = 32,
        net_factory: Callable[[str, int], nn.Module] | None = None,
        decay: float = 0.9,
        lr: float = 1e-2,
    ):
        super().__init__()
        self.hidden_dim = check_positive_int("baseline_hidden_dim", hidden_dim)
        self.net_factory = net_factory
        self.lr = check_number("baseline_lr", lr, low=0.0, low_open=True)
        self.adam = _adam(self.lr)
        #: the names of Adam's per-weight state (step, moments)
        self.adam_keys = tuple(self.adam.init_state(torch.zeros(())))
        #: per site, the network's architecture (its weights live in ``slots``)
        self.architectures: dict[str, nn.Module] = {}
        self.in_features: dict[str, int] = {}
        self.center = MovingAverageBaseline(decay)

    def _add_net(self, site: str, in_features: int, like: torch.Tensor) -> None:
        if self.net_factory is not None:
            net = self.net_factory(site, in_features)
        else:
            net = default_baseline_net(in_features, self.hidden_dim)
        net = net.to(dtype=like.dtype, device=like.device)
        self.architectures[site] = net
        self.in_features[site] = in_features
        self.slots[(site, "skipped")] = torch.zeros((), dtype=torch.bool, device=like.device)
        for name, param in net.named_parameters():
            self.slots[(site, "weight", name)] = param.detach().clone()
            for key, value in self.adam.init_state(param).items():
                self.slots[(site, "adam", name, key)] = value

    def _weights(self, site: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The current weights of ``site``'s network (built on first use), checked against x."""
        if site not in self.architectures:
            self._add_net(site, x.shape[-1], x)
        elif self.in_features[site] != x.shape[-1]:
            raise ValueError(
                f"the baseline_input of site '{site}' has {x.shape[-1]} features, but its "
                f"baseline network was built for {self.in_features[site]}; keep the input's "
                "last dimension fixed"
            )
        weights = {key[2]: value for key, value in self.slots.items()
                   if key[0] == site and key[1] == "weight"}
        weight = next(iter(weights.values()), None)
        if weight is not None and weight.dtype != x.dtype:
            raise ValueError(
                f"the baseline_input of site '{site}' has dtype {x.dtype}, but its baseline "
                f"network has dtype {weight.dtype}; pass infer={{'baseline_input': "
                f"x.to({weight.dtype})}} (the dtype of the model's data)"
            )
        return weights

    def _input(self, site: str, baseline_input, reward: torch.Tensor) -> torch.Tensor:
        """The checked, detached input of ``site``'s network."""
        if baseline_input is None:
            raise ValueError(
                f"baseline='learned' needs an input for attention site '{site}': pass "
                f"infer={{'baseline_input': x}} to pyro.sample('{site}', ...), with x of shape "
                "batch_shape + (features,) (e.g. the coarse view), or choose "
                "baseline='moving_average'"
            )
        if not torch.is_tensor(baseline_input):
            raise ValueError(
                f"the baseline_input of site '{site}' must be a tensor of shape batch_shape + "
                f"(features,), got a {type(baseline_input).__name__}; pass torch.as_tensor(x)"
            )
        x = baseline_input.detach()
        if x.dim() == 0:
            x = x.reshape(1)
        try:
            torch.broadcast_shapes(x.shape[:-1], reward.shape)
        except RuntimeError:
            raise ValueError(
                f"the baseline_input of site '{site}' has batch shape {tuple(x.shape[:-1])} "
                f"(features last), which does not broadcast with the site's reward of shape "
                f"{tuple(reward.shape)}; give one row of features per element of the site's "
                "plates"
            ) from None
        return x

    def predict(self, site: str, baseline_input: torch.Tensor,
                scale: torch.Tensor | float = 1.0,
                reward_like: torch.Tensor | None = None) -> torch.Tensor:
        """The current baseline ``scale * (m + f(x))`` of ``site``; reads the state only."""
        like = baseline_input.new_zeros(()) if reward_like is None else reward_like
        x = self._input(site, baseline_input, like)
        weights = self._weights(site, x)
        with torch.no_grad():
            prediction = functional_call(self.architectures[site], weights, (x,)).squeeze(-1)
        return (scale * (self.center.value(site, like) + prediction)).detach()

    def update(self, site: str, reward: torch.Tensor, baseline_input: torch.Tensor,
               scale: torch.Tensor | float) -> None:
        """After the gradient: move the average, then one Adam step of the regression.

        Skipped, with a warning naming the site, when the reward or the input is not finite
        (the average too), or when the regression's gradient is not.
        """
        x = self._input(site, baseline_input, reward)
        target = reward.detach() / scale
        inputs_ok = _all_finite(target, x)
        center = self.center.value(site, target)
        self.center.fold(site, target, inputs_ok)
        weights = self._weights(site, x)
        with torch.enable_grad():
            leaves = {name: w.detach().requires_grad_() for name, w in weights.items()}
            prediction = functional_call(self.architectures[site], leaves, (x,)).squeeze(-1)
            loss = 0.5 * (target - center - prediction).pow(2).sum()
            grads = torch.autograd.grad(loss, list(leaves.values()))
        ok = inputs_ok & _all_finite(*grads)
        for (name, weight), grad in zip(weights.items(), grads):
            state = {key: self.slots[(site, "adam", name, key)] for key in self.adam_keys}
            new_weight, new_state = self.adam.update(weight, grad, state)
            self.slots[(site, "weight", name)] = torch.where(ok, new_weight, weight)
            for key in self.adam_keys:
                self.slots[(site, "adam", name, key)] = torch.where(ok, new_state[key], state[key])
        self._settle(site, ok)

    def get_extra_state(self) -> dict:
        dtypes = {w.dtype for k, w in self.slots.items() if k[1] == "weight"}
        return {"kind": self.kind, "in_features": dict(self.in_features),
                "hidden_dim": self.hidden_dim, "lr": self.lr,
                "dtype": dtypes.pop() if len(dtypes) == 1 else None,
                "slots": self._saved_slots()}

    def set_extra_state(self, state: dict) -> None:
        _check_kind(state, self.kind)
        _check_setting("learned baseline", "baseline_hidden_dim", state["hidden_dim"],
                       self.hidden_dim)
        _check_setting("learned baseline", "baseline_lr", state["lr"], self.lr)
        like = torch.zeros((), dtype=state.get("dtype") or torch.get_default_dtype())
        for site, in_features in state["in_features"].items():
            if site not in self.architectures:
                self._add_net(site, in_features, like)
        self._load_slots(state["slots"])


class LeaveOneOutBaseline(nn.Module):
    r"""Each particle's baseline is the mean reward of the other particles.

    .. math::

        b^{(k)} = \frac{1}{K - 1} \sum_{k' \ne k} R^{(k')}

    along the vectorized particle dimension (``vectorize_particles=True``, K >= 2).  The other
    particles are independent of particle k, so the estimate is unbiased (the VIMCO idea of
    Mnih & Rezende 2016, arXiv:1602.06725, applied to the reward of a single-sample bound).
    Stateless.
    """

    kind = "leave_one_out"

    @staticmethod
    def value(site: str, reward: torch.Tensor, particle_dim: int,
              score: torch.Tensor) -> torch.Tensor:
        """The leave-one-out mean of ``reward`` along ``particle_dim``."""
        reward = reward.detach()
        reward = reward.expand(torch.broadcast_shapes(reward.shape, score.shape))
        if reward.dim() < -particle_dim or reward.shape[particle_dim] < 2:
            raise ValueError(
                f"baseline='leave_one_out' found no particle dimension of size >= 2 at dim "
                f"{particle_dim} for site '{site}'; use num_particles >= 2 with "
                "vectorize_particles=True"
            )
        k = reward.shape[particle_dim]
        return (reward.sum(particle_dim, keepdim=True) - reward) / (k - 1)


class SignalNormalizer(StateSlots):
    r"""NVIL's variance normalization of the centred learning signal.

    .. math::

        s = (R - b) / \max(1, \sqrt{v}), \qquad v \leftarrow \delta v + (1 - \delta)
        \overline{(R - b)^2}

    (Mnih & Gregor 2014, arXiv:1402.0030, section 3.3); the first update sets
    :math:`v = \overline{(R - b)^2}`, and before it the signal is not scaled.  ``v`` is updated
    after use, so each step's scale only depends on the past.  Dividing the score-function
    part (and not the pathwise part) by a positive number changes the gradient's direction
    whenever that number is not 1: with normalization the estimate is a rescaled, not an
    unbiased, estimate of dF.
    """

    what = "signal normalizer"

    def __init__(self, decay: float = 0.9):
        super().__init__()
        self.decay = check_decay(decay)

    def _state(self, site: str, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        variance = self.slots.get((site, "variance"))
        if variance is None:
            variance = self.slots[(site, "variance")] = like.new_zeros(())
            self.slots[(site, "seen")] = torch.zeros((), dtype=torch.bool, device=like.device)
            self.slots[(site, "skipped")] = torch.zeros((), dtype=torch.bool,
                                                        device=like.device)
        return variance, self.slots[(site, "seen")]

    def value(self, site: str, signal: torch.Tensor) -> torch.Tensor:
        """The normalized signal, from the current state."""
        variance, seen = self._state(site, signal)
        scale = torch.where(seen, variance.to(signal).clamp(min=1.0).sqrt(),
                            torch.ones_like(variance, dtype=signal.dtype))
        return signal / scale

    def update(self, site: str, signal: torch.Tensor) -> None:
        """Fold this step's centred signal into the running second moment (finite only)."""
        second = signal.detach().pow(2).mean()
        variance, seen = self._state(site, second)
        variance = variance.to(second)
        blended = torch.where(seen, self.decay * variance + (1 - self.decay) * second, second)
        ok = _all_finite(second)
        self.slots[(site, "variance")] = torch.where(ok, blended, variance)
        self.slots[(site, "seen")] = seen | ok
        self._settle(site, ok)

    def get_extra_state(self) -> dict:
        return {"decay": self.decay, "slots": self._saved_slots()}

    def set_extra_state(self, state: dict) -> None:
        _check_setting("signal normalizer", "decay", state["decay"], self.decay)
        self.slots = {}
        self._load_slots(state["slots"])


class LearningSignal(nn.Module):
    """Everything a hard-attention loss learns besides the model: reward, baseline, normalizer.

    Its state (:meth:`carried_state`) is a flat dict of tensors, keyed ``(part, site, what,
    ...)`` with ``part`` one of ``"baseline"``, ``"center"`` (a learned baseline's average)
    and ``"normalizer"``; a compiled step carries it through its graph.

    Parameters
    ----------
    baseline : module or None
        One of the baselines above.
    normalizer : SignalNormalizer or None
    zero_one : bool
        Use the 0/1 correct-label reward (see ``HardAttentionELBO(reward="zero_one")``).
    """

    def __init__(self, baseline: nn.Module | None, normalizer: SignalNormalizer | None,
                 zero_one: bool = False):
        from .site_baselines import SiteBaselines  # Pyro's per-site baselines' state

        super().__init__()
        self.baseline = baseline
        self.normalizer = normalizer
        self.zero_one = zero_one
        #: the decaying averages of sites with ``infer={"baseline": {...}}`` (every loss)
        self.sites = SiteBaselines()
        #: while true, training calls read (and create) the state but do not update it
        self.paused = False

    @property
    def needed(self) -> bool:
        """Whether the signal differs from the plain reward at all."""
        return self.baseline is not None or self.normalizer is not None or self.zero_one

    def _parts(self) -> dict[str, StateSlots]:
        parts = {"baseline": self.baseline, "center": getattr(self.baseline, "center", None),
                 "normalizer": self.normalizer, "sites": self.sites}
        return {name: part for name, part in parts.items() if isinstance(part, StateSlots)}

    def carried_state(self) -> dict[tuple, torch.Tensor]:
        """Every state tensor, keyed ``(part, site, what, ...)``."""
        return {(name,) + key: value for name, part in self._parts().items()
                for key, value in part.slots.items()}

    def load_carried_state(self, state: dict[tuple, torch.Tensor]) -> None:
        """Replace state tensors by the given ones (keys as :meth:`carried_state`'s)."""
        parts = self._parts()
        for key, value in state.items():
            parts[key[0]].slots[key[1:]] = value

    def warn_skipped(self) -> None:
        """Warn, naming the site, for every update of the last step that was skipped."""
        for part in self._parts().values():
            for site in part.skipped_sites():
                _skip_warning(part.what, site)

    def bind(self, ctx, training: bool, particle_dim: int) -> BoundSignal:
        """The signal of one particle (the engine's ``SignalFn``), reading the state only."""
        from .rewards import zero_one_shift  # the reward transform's own module

        shift = zero_one_shift(ctx.model_trace) if self.zero_one else None
        return BoundSignal(self, ctx.model_trace, shift, training and not self.paused,
                           particle_dim, ctx.guide_trace, ctx.plan.baselines)

    def load_state_dict(self, state_dict, strict: bool = True):
        """Restore a checkpoint, refusing one of another baseline kind with a named error."""
        own = self.baseline.kind if self.baseline is not None else None
        saved = _saved_kind(state_dict)
        if saved != own and (own != "leave_one_out" or saved is not None):
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
        return super().load_state_dict(state_dict, strict)


def _saved_kind(state_dict) -> str | None:
    extra = state_dict.get("baseline._extra_state")
    if isinstance(extra, dict):
        if "kind" in extra:
            return extra["kind"]
        return "learned" if "hidden_dim" in extra else "moving_average"
    return None


class BoundSignal:
    """The learning signal of one particle: ``normalize(reward - baseline)``.

    Called by the engine for each marked site's score term (forward: the state is read
    only); :meth:`update` then applies what it observed, once the gradient is taken.  A site
    with Pyro's ``infer={"baseline": {...}}`` (``site_options``) is centred by its own
    baseline (:mod:`.site_baselines`), the others by the loss's.
    """

    def __init__(self, signal: LearningSignal, model_trace, shift, training: bool,
                 particle_dim: int, guide_trace=None, site_options: dict | None = None):
        self.signal = signal
        self.model_trace = model_trace
        self.guide_trace = guide_trace
        self.site_options = site_options or {}
        self.shift: dict[str, tuple[frozenset[Frame], torch.Tensor]] | None = shift
        self.training = training
        self.particle_dim = particle_dim
        self.observed: list[tuple] = []
        self.site_observed: list[tuple] = []
        self.regressions: list[torch.Tensor] = []

    def surrogate_terms(self) -> torch.Tensor | None:
        """What the surrogate adds for per-site baseline networks or values: minus their
        squared errors, so that the SVI optimizer regresses them on the reward."""
        if not self.regressions:
            return None
        return -sum(self.regressions[1:], self.regressions[0])

    def _per_site(self, site: ScoreSite, reward: torch.Tensor, options) -> torch.Tensor:
        from .site_baselines import centre

        name = site.site
        nodes = self.guide_trace.nodes if self.guide_trace is not None else {}
        trace_site = nodes.get(name) or self.model_trace.nodes[name]
        shape = torch.broadcast_shapes(reward.shape, site.score_function.shape)
        reward = reward.expand(shape)
        centred, regression = centre(name, options, trace_site["infer"], reward,
                                     lambda like: self.signal.sites.average(name, like))
        if regression is not None:
            self.regressions.append(regression)
        if self.training and options.decaying:
            self.site_observed.append((name, reward.detach(), options.beta))
        return centred

    def __call__(self, site: ScoreSite, reward: torch.Tensor) -> torch.Tensor:
        if self.shift:
            from .rewards import shift_for

            reward = reward + sum_to_frames(shift_for(self.shift, site.downstream_sites),
                                            site.frames)
        options = self.site_options.get(site.site)
        if options is not None:
            centred = self._per_site(site, reward, options)
            normalizer = self.signal.normalizer
            if normalizer is None:
                return centred
            if self.training:
                self.observed.append((site.site, None, centred, None, None))
            return normalizer.value(site.site, centred)
        baseline = self.signal.baseline
        model_site = self.model_trace.nodes[site.site]
        x = scale = None
        if baseline is None:
            centred = reward
        elif baseline.kind == "moving_average":
            centred = reward - baseline.value(site.site, reward)
        elif baseline.kind == "learned":
            x = model_site["infer"].get("baseline_input")
            scale = model_site["scale"]
            centred = reward - baseline.predict(site.site, x, scale, reward_like=reward)
        else:
            centred = reward - baseline.value(site.site, reward, self.particle_dim,
                                              site.score_function)
        normalizer = self.signal.normalizer
        signal = centred if normalizer is None else normalizer.value(site.site, centred)
        if self.training:
            self.observed.append((site.site, reward.detach(), centred.detach(), x, scale))
        return signal

    def update(self) -> None:
        """Apply this particle's observations to the state (each guarded against NaN)."""
        baseline, normalizer = self.signal.baseline, self.signal.normalizer
        for site, reward, beta in self.site_observed:
            self.signal.sites.update(site, reward, beta)
        self.site_observed = []
        for site, reward, centred, x, scale in self.observed:
            if reward is None:  # a per-site baseline's signal: the normalizer only
                pass
            elif baseline is not None and baseline.kind == "moving_average":
                baseline.update(site, reward)
            elif baseline is not None and baseline.kind == "learned":
                baseline.update(site, reward, x, scale)
            if normalizer is not None:
                normalizer.update(site, centred)
        self.observed = []


__all__ = [
    "BASELINES",
    "BoundSignal",
    "LearnedBaseline",
    "LearningSignal",
    "LeaveOneOutBaseline",
    "MovingAverageBaseline",
    "SignalNormalizer",
    "StateSlots",
    "check_decay",
    "default_baseline_net",
]
