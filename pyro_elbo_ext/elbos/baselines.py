r"""Baselines and the normalizer of a learning signal: the parts with a running state.

Each is a :class:`~.signals.SignalPart` (the protocol is in :mod:`.signals`): ``apply`` reads
the state in the forward pass, ``update`` replaces it after the gradient, guarded against
non-finite values (skipped with a warning naming the site).

Classes
-------
MovingAverageBaseline
    ``b_j`` = bias-corrected exponential moving average of past rewards (Xu et al. 2015,
    arXiv:1502.03044; Mnih et al. 2014, arXiv:1406.6247).
LeaveOneOutBaseline
    With K vectorized particles, ``b_j^k = mean_{k' != k} R_j^{k'}`` (VIMCO-style, Mnih &
    Rezende 2016, arXiv:1602.06725).  Stateless.
SignalNormalizer
    NVIL's division of the centred learning signal by ``max(1, running std)``.

The learned baseline (a network per site) is in :mod:`.learned_baseline`.
"""

from __future__ import annotations

import torch

from .signals import SignalPart, SignalSite
from .state import all_finite
from .validation import check_number

#: the names accepted by ``HardAttentionELBO(baseline=...)`` (besides ``None``)
BASELINES = ("moving_average", "learned", "leave_one_out")


def check_decay(decay: float) -> float:
    """``decay`` as a float in [0, 1), or a ValueError naming the argument."""
    return check_number("decay", decay, low=0.0, high=1.0, high_open=True)


class MovingAverageBaseline(SignalPart):
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
        ok = all_finite(mean) if gate is None else gate & all_finite(mean)
        self.slots[(site, "average")] = torch.where(ok, new_average, average)
        self.slots[(site, "count")] = torch.where(ok, new_count, count)
        return ok

    def apply(self, site: SignalSite, signal: torch.Tensor) -> torch.Tensor:
        return signal - self.value(site.name, signal)

    def update(self, site: SignalSite, signal: torch.Tensor, applied: torch.Tensor) -> None:
        """Fold this step's mean reward into the average (skipped if it is not finite)."""
        self.settle(site.name, self.fold(site.name, signal))

    def settings(self) -> dict:
        return {"decay": self.decay}

    def legacy_kind(self, state: dict) -> str | None:
        return "learned" if "hidden_dim" in state else "moving_average"


class LeaveOneOutBaseline(SignalPart):
    r"""Each particle's baseline is the mean reward of the other particles.

    .. math::

        b^{(k)} = \frac{1}{K - 1} \sum_{k' \ne k} R^{(k')}

    along the vectorized particle dimension (``vectorize_particles=True``, K >= 2).  The other
    particles are independent of particle k, so the estimate is unbiased (the VIMCO idea of
    Mnih & Rezende 2016, arXiv:1602.06725, applied to the reward of a single-sample bound).
    Stateless.
    """

    kind = "leave_one_out"
    what = "leave-one-out baseline"

    @staticmethod
    def value(site: str, reward: torch.Tensor, particle_dim: int | None,
              score: torch.Tensor) -> torch.Tensor:
        """The leave-one-out mean of ``reward`` along ``particle_dim``."""
        reward = reward.detach()
        reward = reward.expand(torch.broadcast_shapes(reward.shape, score.shape))
        if (particle_dim is None or reward.dim() < -particle_dim
                or reward.shape[particle_dim] < 2):
            raise ValueError(
                f"baseline='leave_one_out' found no particle dimension of size >= 2 at dim "
                f"{particle_dim} for site '{site}'; use num_particles >= 2 with "
                "vectorize_particles=True"
            )
        k = reward.shape[particle_dim]
        return (reward.sum(particle_dim, keepdim=True) - reward) / (k - 1)

    def apply(self, site: SignalSite, signal: torch.Tensor) -> torch.Tensor:
        return signal - self.value(site.name, signal, site.particle_dim, site.score_function)


class SignalNormalizer(SignalPart):
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

    kind = "normalizer"
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

    def apply(self, site: SignalSite, signal: torch.Tensor) -> torch.Tensor:
        return self.value(site.name, signal)

    def update(self, site: SignalSite, signal: torch.Tensor, applied: torch.Tensor) -> None:
        """Fold this step's centred signal into the running second moment (finite only)."""
        second = signal.detach().pow(2).mean()
        variance, seen = self._state(site.name, second)
        variance = variance.to(second)
        blended = torch.where(seen, self.decay * variance + (1 - self.decay) * second, second)
        ok = all_finite(second)
        self.slots[(site.name, "variance")] = torch.where(ok, blended, variance)
        self.slots[(site.name, "seen")] = seen | ok
        self.settle(site.name, ok)

    def settings(self) -> dict:
        return {"decay": self.decay}

    def legacy_kind(self, state: dict) -> str | None:
        return "normalizer"

    def notes(self) -> tuple[str, ...]:
        return ("normalize=True rescales the score-function gradient (not unbiased)",)


__all__ = ["BASELINES", "LeaveOneOutBaseline", "MovingAverageBaseline", "SignalNormalizer",
           "check_decay"]
