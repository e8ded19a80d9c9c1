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
owned by the loss (never by Pyro's global parameter store), saved and restored with
``state_dict()`` / ``load_state_dict()``; a checkpoint whose settings differ from the loss's
own (a decay, a network width) is refused with an error naming both values.

Classes
-------
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

import copy
import warnings
from collections.abc import Callable

import torch
from torch import nn

from .engine import Frame, ScoreSite, sum_to_frames
from .validation import check_number, check_positive_int

#: the names accepted by ``HardAttentionELBO(baseline=...)`` (besides ``None``)
BASELINES = ("moving_average", "learned", "leave_one_out")


def check_decay(decay: float) -> float:
    """``decay`` as a float in [0, 1), or a ValueError naming the argument."""
    return check_number("decay", decay, low=0.0, high=1.0, high_open=True)


def _finite(tensor: torch.Tensor) -> bool:
    return bool(torch.isfinite(tensor).all())


def _skip_warning(what: str, site: str) -> None:
    warnings.warn(
        f"the {what} of site '{site}' was not updated: this step's learning signal is not "
        "finite (a NaN or infinite reward or baseline input); the last finite state is kept",
        RuntimeWarning,
        stacklevel=4,
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


class MovingAverageBaseline(nn.Module):
    r"""Exponential moving average of the reward, one per site.

    .. math::

        m_n = \delta\, m_{n-1} + (1 - \delta)\, \bar R_n, \qquad
        b_{n+1} = m_n / (1 - \delta^n)

    where :math:`\bar R_n` is the mean reward of step n over the site's batch (and particles)
    and the division is the bias correction of a zero-initialized average (as in Adam).  The
    baseline used at step n+1 only depends on past steps, so the estimate stays unbiased.
    The first step uses ``b = 0``.

    Parameters
    ----------
    decay : float
        :math:`\delta \in [0, 1)`; larger is smoother.
    """

    kind = "moving_average"

    def __init__(self, decay: float = 0.9):
        super().__init__()
        self.decay = check_decay(decay)
        self.averages: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def value(self, site: str, like: torch.Tensor) -> torch.Tensor:
        """The current baseline of ``site`` (0 before its first update); reads the state."""
        count = self.counts.get(site, 0)
        if count == 0:
            return like.new_zeros(())
        return (self.averages[site] / (1.0 - self.decay**count)).to(like)

    @staticmethod
    def advance(average: torch.Tensor | None, count: int, mean_reward: torch.Tensor,
                decay: float) -> tuple[torch.Tensor, int]:
        """The state after one step, state in and state out: ``(m_n, n)``."""
        previous = mean_reward.new_zeros(()) if average is None else average.to(mean_reward)
        return decay * previous + (1.0 - decay) * mean_reward, count + 1

    def update(self, site: str, reward: torch.Tensor) -> None:
        """Fold this step's mean reward into the average (skipped if it is not finite)."""
        mean = reward.detach().mean()
        if not _finite(mean):
            _skip_warning("moving-average baseline", site)
            return
        self.averages[site], self.counts[site] = self.advance(
            self.averages.get(site), self.counts.get(site, 0), mean, self.decay
        )

    def get_extra_state(self) -> dict:
        return {
            "kind": self.kind,
            "decay": self.decay,
            "averages": {k: v.detach().clone() for k, v in self.averages.items()},
            "counts": dict(self.counts),
        }

    def set_extra_state(self, state: dict) -> None:
        _check_kind(state, self.kind)
        _check_setting("moving-average baseline", "decay", state["decay"], self.decay)
        self.averages = {k: v.detach().clone() for k, v in state["averages"].items()}
        self.counts = dict(state["counts"])


def default_baseline_net(in_features: int, hidden_dim: int) -> nn.Module:
    """A one-hidden-layer tanh network ``R^in_features -> R`` (the default learned baseline)."""
    return nn.Sequential(nn.Linear(in_features, hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, 1))


class LearnedBaseline(nn.Module):
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

    How it learns: the forward pass predicts the baseline from the current parameters
    (:meth:`predict`); after the particle's gradient is taken, :meth:`update` moves the
    average and takes one step of the network's own Adam optimizer (learning rate ``lr``) on
    the squared error against that step's rewards.  The prediction used in the learning signal
    comes from the parameters before that update, so it does not depend on the sample it
    multiplies, and the estimator stays unbiased.  The network's parameters belong to this
    module only: not to Pyro's parameter store, not to the user's optimizer.  Evaluation calls
    (``loss``, ``decompose``) neither update the average nor train the network.

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
        Learning rate (> 0, finite) of the network's own Adam optimizer.
    """

    kind = "learned"

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
        self.nets = nn.ModuleDict()
        self.site_keys: dict[str, str] = {}  # site name -> ModuleDict key
        self.in_features: dict[str, int] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}  # ModuleDict key -> its Adam
        self.center = MovingAverageBaseline(decay)

    def _add_net(self, site: str, key: str, in_features: int, like: torch.Tensor) -> None:
        if self.net_factory is not None:
            net = self.net_factory(site, in_features)
        else:
            net = default_baseline_net(in_features, self.hidden_dim)
        net = net.to(dtype=like.dtype, device=like.device)
        self.nets[key] = net
        self.site_keys[site] = key
        self.in_features[site] = in_features
        self.optimizers[key] = torch.optim.Adam(net.parameters(), lr=self.lr)

    def _net(self, site: str, x: torch.Tensor) -> nn.Module:
        key = self.site_keys.get(site)
        if key is None:
            key = f"site{len(self.site_keys)}"
            self._add_net(site, key, x.shape[-1], x)
        elif self.in_features[site] != x.shape[-1]:
            raise ValueError(
                f"the baseline_input of site '{site}' has {x.shape[-1]} features, but its "
                f"baseline network was built for {self.in_features[site]}; keep the input's "
                "last dimension fixed"
            )
        net = self.nets[key]
        weight = next(net.parameters(), None)
        if weight is not None and weight.dtype != x.dtype:
            raise ValueError(
                f"the baseline_input of site '{site}' has dtype {x.dtype}, but its baseline "
                f"network has dtype {weight.dtype}; pass infer={{'baseline_input': "
                f"x.to({weight.dtype})}} (the dtype of the model's data)"
            )
        return net

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
        with torch.no_grad():
            prediction = self._net(site, x)(x).squeeze(-1)
        return (scale * (self.center.value(site, like) + prediction)).detach()

    def update(self, site: str, reward: torch.Tensor, baseline_input: torch.Tensor,
               scale: torch.Tensor | float) -> None:
        """After the gradient: move the average, then one Adam step of the regression.

        Skipped, with a warning naming the site, when the reward or the input is not finite.
        """
        x = self._input(site, baseline_input, reward)
        target = reward.detach() / scale
        if not (_finite(target) and _finite(x)):
            _skip_warning("learned baseline", site)
            return
        center = self.center.value(site, target)
        self.center.update(site, target)
        key = self.site_keys[site]
        net, optimizer = self.nets[key], self.optimizers[key]
        with torch.enable_grad():
            loss = 0.5 * (target - center - net(x).squeeze(-1)).pow(2).sum()
            grads = torch.autograd.grad(loss, list(net.parameters()))
        if not all(_finite(g) for g in grads):
            _skip_warning("learned baseline", site)
            return
        optimizer.zero_grad(set_to_none=True)
        for param, grad in zip(net.parameters(), grads):
            param.grad = grad
        optimizer.step()

    def get_extra_state(self) -> dict:
        dtypes = {p.dtype for p in self.nets.parameters()}
        return {"kind": self.kind, "site_keys": dict(self.site_keys),
                "in_features": dict(self.in_features), "hidden_dim": self.hidden_dim,
                "lr": self.lr, "dtype": dtypes.pop() if len(dtypes) == 1 else None,
                # copies: torch's optimizer state_dict holds the live moment tensors, and a
                # loss restored in the same process would otherwise step them in place too
                "optimizers": {k: copy.deepcopy(opt.state_dict())
                               for k, opt in self.optimizers.items()}}

    def set_extra_state(self, state: dict) -> None:
        _check_kind(state, self.kind)
        _check_setting("learned baseline", "baseline_hidden_dim", state["hidden_dim"],
                       self.hidden_dim)
        _check_setting("learned baseline", "baseline_lr", state["lr"], self.lr)
        like = torch.zeros((), dtype=state.get("dtype") or torch.get_default_dtype())
        for site, key in state["site_keys"].items():
            if site not in self.site_keys:
                if key in self.nets:
                    raise ValueError(f"cannot load baseline state: key {key!r} already in use")
                self._add_net(site, key, state["in_features"][site], like)
        # the parameters are copied in after this (children load later), into the same
        # tensors the optimizers hold
        for key, optimizer_state in state.get("optimizers", {}).items():
            self.optimizers[key].load_state_dict(optimizer_state)


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


class SignalNormalizer(nn.Module):
    r"""NVIL's variance normalization of the centred learning signal.

    .. math::

        s = (R - b) / \max(1, \sqrt{v}), \qquad v \leftarrow \delta v + (1 - \delta)
        \overline{(R - b)^2}

    (Mnih & Gregor 2014, arXiv:1402.0030, section 3.3).  ``v`` is updated after use, so each
    step's scale only depends on the past.  Dividing the score-function part (and not the
    pathwise part) by a positive number changes the gradient's direction whenever that number
    is not 1: with normalization the estimate is a rescaled, not an unbiased, estimate of dF.
    """

    def __init__(self, decay: float = 0.9):
        super().__init__()
        self.decay = check_decay(decay)
        self.variances: dict[str, torch.Tensor] = {}

    def value(self, site: str, signal: torch.Tensor) -> torch.Tensor:
        """The normalized signal, from the current state."""
        variance = self.variances.get(site)
        scale = 1.0 if variance is None else float(variance.clamp(min=1.0).sqrt())
        return signal / scale

    def update(self, site: str, signal: torch.Tensor) -> None:
        """Fold this step's centred signal into the running second moment (finite only)."""
        second = signal.detach().pow(2).mean()
        if not _finite(second):
            _skip_warning("signal normalizer", site)
            return
        variance = self.variances.get(site)
        self.variances[site] = (second if variance is None
                                else self.decay * variance.to(second) + (1 - self.decay) * second)

    def get_extra_state(self) -> dict:
        return {"decay": self.decay,
                "variances": {k: v.detach().clone() for k, v in self.variances.items()}}

    def set_extra_state(self, state: dict) -> None:
        _check_setting("signal normalizer", "decay", state["decay"], self.decay)
        self.variances = {k: v.detach().clone() for k, v in state["variances"].items()}


class LearningSignal(nn.Module):
    """Everything a hard-attention loss learns besides the model: reward, baseline, normalizer.

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
        super().__init__()
        self.baseline = baseline
        self.normalizer = normalizer
        self.zero_one = zero_one

    @property
    def needed(self) -> bool:
        """Whether the signal differs from the plain reward at all."""
        return self.baseline is not None or self.normalizer is not None or self.zero_one

    def bind(self, ctx, training: bool, particle_dim: int) -> BoundSignal:
        """The signal of one particle (the engine's ``SignalFn``), reading the state only."""
        from .rewards import zero_one_shift  # the reward transform's own module

        shift = zero_one_shift(ctx.model_trace) if self.zero_one else None
        return BoundSignal(self, ctx.model_trace, shift, training, particle_dim)

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

    Called by the engine for each attention site's score term (forward: the state is read
    only); :meth:`update` then applies what it observed, once the gradient is taken.
    """

    def __init__(self, signal: LearningSignal, model_trace, shift, training: bool,
                 particle_dim: int):
        self.signal = signal
        self.model_trace = model_trace
        self.shift: dict[frozenset[Frame], torch.Tensor] | None = shift
        self.training = training
        self.particle_dim = particle_dim
        self.observed: list[tuple] = []

    def __call__(self, site: ScoreSite, reward: torch.Tensor) -> torch.Tensor:
        reward = reward
        if self.shift:
            reward = reward + sum_to_frames(self.shift, site.frames)
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
        for site, reward, centred, x, scale in self.observed:
            if baseline is not None and baseline.kind == "moving_average":
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
    "check_decay",
    "default_baseline_net",
]
