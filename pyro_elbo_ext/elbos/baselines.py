r"""Variance reduction for score-function (REINFORCE) terms: baselines and signal normalization.

A score-function site j with score ``log p(l_j)`` and downstream cost (reward) ``R_j``
contributes ``d log p(l_j) * (R_j - b_j)`` to the gradient estimate.  Because
``E[d log p(l_j)] = 0``, any baseline ``b_j`` that does not depend on the sample ``l_j``
(it may depend on the inputs, on ``l_<j`` and on *other* independent samples) leaves the
estimate unbiased, and a good one (``b_j ~ E[R_j | inputs, l_<j]``) reduces its variance
(Williams 1992; Mnih & Gregor 2014, arXiv:1402.0030).

The state of every baseline here is held by a :class:`torch.nn.Module`, owned by the loss that
uses it: never by Pyro's global parameter store under a magic name, so two losses can be
compared side by side and each can be checkpointed with ``state_dict()`` /
``load_state_dict()``.  Per-site state that is created on first use (one running average or
one network per attention site) is carried through ``get_extra_state`` so that a fresh module
can load it.

Classes
-------
MovingAverageBaseline
    ``b_j`` = bias-corrected exponential moving average of past rewards (Xu et al. 2015,
    arXiv:1502.03044; Mnih et al. 2014, arXiv:1406.6247).
LearnedBaseline
    ``b_j = f_psi(x_j)``, an input-dependent network regressed on the reward by squared error
    (Mnih et al. 2014; NVIL, Mnih & Gregor 2014).
LeaveOneOutBaseline
    With K vectorized particles, ``b_j^k = mean_{k' != k} R_j^{k'}`` (VIMCO-style, Mnih &
    Rezende 2016, arXiv:1602.06725).
SignalNormalizer
    NVIL's division of the centred learning signal by ``max(1, running std)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

#: the names accepted by ``HardAttentionELBO(baseline=...)`` (besides ``None``)
BASELINES = ("moving_average", "learned", "leave_one_out")



def check_decay(decay: float) -> float:
    """``decay`` as a float in [0, 1), or a ValueError naming the argument."""
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be a number in [0, 1), got {decay!r}")
    return float(decay)


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

    def __init__(self, decay: float = 0.9):
        super().__init__()
        self.decay = check_decay(decay)
        self.averages: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def value(self, site: str, like: torch.Tensor) -> torch.Tensor:
        """The current baseline of ``site`` (0 before its first update)."""
        count = self.counts.get(site, 0)
        if count == 0:
            return like.new_zeros(())
        return (self.averages[site] / (1.0 - self.decay**count)).to(like)

    def forward(self, site: str, cost: torch.Tensor, update_state: bool) -> torch.Tensor:
        """The baseline for this step; then, if ``update_state``, fold ``cost`` into the mean."""
        baseline = self.value(site, cost)
        if update_state:
            mean = cost.detach().mean()
            previous = self.averages.get(site, mean.new_zeros(()))
            self.averages[site] = self.decay * previous.to(mean) + (1.0 - self.decay) * mean
            self.counts[site] = self.counts.get(site, 0) + 1
        return baseline

    def get_extra_state(self) -> dict:
        return {
            "decay": self.decay,
            "averages": {k: v.detach().clone() for k, v in self.averages.items()},
            "counts": dict(self.counts),
        }

    def set_extra_state(self, state: dict) -> None:
        self.decay = check_decay(state["decay"])
        self.averages = {k: v.detach().clone() for k, v in state["averages"].items()}
        self.counts = dict(state["counts"])


def default_baseline_net(in_features: int, hidden_dim: int) -> nn.Module:
    """A one-hidden-layer tanh network ``R^in_features -> R`` (the default learned baseline)."""
    return nn.Sequential(nn.Linear(in_features, hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, 1))


class LearnedBaseline(nn.Module):
    r"""An input-dependent baseline network per site, regressed on the reward.

    .. math::

        b_j = s_j\,(m_j + f_{\psi_j}(x_j)), \qquad
        \text{penalty} = \tfrac12 \sum (R_j / s_j - m_j - f_{\psi_j}(x_j))^2

    As in NVIL, the network learns the input-dependent residual around ``m_j``, a moving
    average of past rewards (:class:`MovingAverageBaseline`, with ``decay``), and it regresses
    the reward divided by the site's plate scale ``s_j`` (``N / batch_size`` under
    subsampling), so that its targets are of order one whatever the data size.

    ``x_j`` is the tensor the model attaches to the attention site as
    ``infer={"baseline_input": x}`` (shape ``batch_shape + (features,)``; e.g. the coarse view
    of the image, and for a later glimpse anything computed from earlier ones).  ``x_j`` must
    not depend on ``l_j`` itself (Mnih et al. 2014, arXiv:1406.6247; NVIL, Mnih & Gregor 2014,
    arXiv:1402.0030).

    How it learns: on every training call the module first predicts the baseline for this
    step, then takes one step of its own Adam optimizer (learning rate ``lr``) on the squared
    error against this step's rewards.  The prediction used in the learning signal comes from
    the parameters before that update, so it does not depend on the sample it multiplies, and
    the estimator stays unbiased.  The network's parameters belong to this module only: not to
    Pyro's parameter store, not to the user's optimizer.  So it trains the same way under
    :class:`pyro.infer.SVI`, with the ``ELBOModule`` interface and a torch optimizer, and under
    data-parallel training, and ``state_dict()`` / ``load_state_dict()`` of the owning loss save
    and restore the network with its optimizer state.  Evaluation calls (``loss``,
    ``decompose``) neither update the moving average nor train the network.

    Parameters
    ----------
    hidden_dim : int
        Width of the default network's hidden layer.
    decay : float
        Decay of the moving average ``m_j``.
    net_factory : callable, optional
        ``net_factory(site_name, in_features) -> nn.Module`` mapping ``(..., in_features)`` to
        ``(..., 1)``; default :func:`default_baseline_net`.  With a custom factory,
        ``load_state_dict`` into a fresh loss needs the same factory.
    lr : float
        Learning rate of the network's own Adam optimizer.
    """

    def __init__(
        self,
        hidden_dim: int = 32,
        net_factory: Callable[[str, int], nn.Module] | None = None,
        decay: float = 0.9,
        lr: float = 1e-2,
    ):
        super().__init__()
        if isinstance(hidden_dim, bool) or not isinstance(hidden_dim, int) or hidden_dim < 1:
            raise ValueError(f"baseline_hidden_dim must be an integer >= 1, got {hidden_dim!r}")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise ValueError(f"baseline_lr must be a number > 0, got {lr!r}")
        self.hidden_dim = hidden_dim
        self.net_factory = net_factory
        self.lr = float(lr)
        self.nets = nn.ModuleDict()
        self.site_keys: dict[str, str] = {}  # site name -> ModuleDict key
        self.in_features: dict[str, int] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}  # ModuleDict key -> its Adam
        self.center = MovingAverageBaseline(decay)

    def _make_net(self, site: str, in_features: int) -> nn.Module:
        if self.net_factory is not None:
            return self.net_factory(site, in_features)
        return default_baseline_net(in_features, self.hidden_dim)

    def _add_net(self, site: str, key: str, in_features: int, like: torch.Tensor) -> None:
        net = self._make_net(site, in_features).to(dtype=like.dtype, device=like.device)
        self.nets[key] = net
        self.site_keys[site] = key
        self.in_features[site] = in_features
        self.optimizers[key] = torch.optim.Adam(net.parameters(), lr=self.lr)

    def _net(self, site: str, in_features: int, like: torch.Tensor) -> nn.Module:
        key = self.site_keys.get(site)
        if key is None:
            key = f"site{len(self.site_keys)}"
            self._add_net(site, key, in_features, like)
        elif self.in_features[site] != in_features:
            raise ValueError(
                f"the baseline_input of site '{site}' has {in_features} features, but its "
                f"baseline network was built for {self.in_features[site]}; keep the input's "
                "last dimension fixed"
            )
        return self.nets[key]

    def forward(
        self,
        site: str,
        cost: torch.Tensor,
        baseline_input: torch.Tensor | None,
        scale: torch.Tensor | float = 1.0,
        update_state: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(baseline, penalty)`` for one site's cost; trains the network when updating.

        The penalty returned is 0: the network's regression step is taken here, by its own
        optimizer, after the baseline for this step has been computed.
        """
        center, prediction = self._parts(site, cost, baseline_input, scale, update_state)
        baseline = (scale * (center + prediction)).detach()
        if update_state and torch.is_grad_enabled():
            target = cost.detach() / scale - center
            net = self.nets[self.site_keys[site]]
            optimizer = self.optimizers[self.site_keys[site]]
            optimizer.zero_grad(set_to_none=True)
            loss = 0.5 * (target - prediction).pow(2).sum()
            grads = torch.autograd.grad(loss, list(net.parameters()))
            for param, grad in zip(net.parameters(), grads):
                param.grad = grad
            optimizer.step()
        return baseline, 0.0

    def predict(self, site: str, baseline_input: torch.Tensor,
                scale: torch.Tensor | float = 1.0) -> torch.Tensor:
        """The current baseline ``scale * (m + f(x))`` of ``site`` (no state update)."""
        like = baseline_input.new_zeros(())
        center, prediction = self._parts(site, like, baseline_input, scale, False)
        return (scale * (center + prediction)).detach()

    def _parts(self, site, cost, baseline_input, scale, update_state):
        if baseline_input is None:
            raise ValueError(
                f"baseline='learned' needs an input for attention site '{site}': pass "
                f"infer={{'baseline_input': x}} to pyro.sample('{site}', ...), with x of shape "
                "batch_shape + (features,) (e.g. the coarse view), or choose "
                "baseline='moving_average'"
            )
        x = baseline_input.detach()
        if x.dim() == 0:
            x = x.reshape(1)
        net = self._net(site, x.shape[-1], cost)
        center = self.center(site, cost.detach() / scale, update_state)
        return center, net(x).squeeze(-1)

    def get_extra_state(self) -> dict:
        dtypes = {p.dtype for p in self.nets.parameters()}
        return {"site_keys": dict(self.site_keys), "in_features": dict(self.in_features),
                "hidden_dim": self.hidden_dim, "lr": self.lr,
                "dtype": dtypes.pop() if len(dtypes) == 1 else None,
                "optimizers": {k: opt.state_dict() for k, opt in self.optimizers.items()}}

    def set_extra_state(self, state: dict) -> None:
        self.hidden_dim = state["hidden_dim"]
        self.lr = state.get("lr", self.lr)
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

    def forward(self, site: str, cost: torch.Tensor, particle_dim: int,
                score: torch.Tensor) -> torch.Tensor:
        cost = cost.detach()
        shape = torch.broadcast_shapes(cost.shape, score.shape)
        cost = cost.expand(shape)
        if cost.dim() < -particle_dim or cost.shape[particle_dim] < 2:
            raise ValueError(
                f"baseline='leave_one_out' found no particle dimension of size >= 2 at dim "
                f"{particle_dim} for site '{site}'; use num_particles >= 2 with "
                "vectorize_particles=True"
            )
        k = cost.shape[particle_dim]
        return (cost.sum(particle_dim, keepdim=True) - cost) / (k - 1)


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

    def forward(self, site: str, signal: torch.Tensor, update_state: bool) -> torch.Tensor:
        variance = self.variances.get(site)
        scale = 1.0 if variance is None else float(variance.clamp(min=1.0).sqrt())
        if update_state:
            second = signal.detach().pow(2).mean()
            self.variances[site] = (
                second if variance is None
                else self.decay * variance.to(second) + (1.0 - self.decay) * second
            )
        return signal / scale

    def get_extra_state(self) -> dict:
        return {"decay": self.decay,
                "variances": {k: v.detach().clone() for k, v in self.variances.items()}}

    def set_extra_state(self, state: dict) -> None:
        self.decay = check_decay(state["decay"])
        self.variances = {k: v.detach().clone() for k, v in state["variances"].items()}


class SignalState(nn.Module):
    """Everything a :class:`~pyro_elbo_ext.elbos.hard_attention.HardAttentionELBO` learns
    besides the model: its baseline (or ``None``) and its normalizer (or ``None``)."""

    def __init__(self, baseline: nn.Module | None, normalizer: SignalNormalizer | None):
        super().__init__()
        self.baseline = baseline
        self.normalizer = normalizer


__all__ = [
    "BASELINES",
    "LearnedBaseline",
    "LeaveOneOutBaseline",
    "MovingAverageBaseline",
    "SignalNormalizer",
    "SignalState",
    "check_decay",
    "default_baseline_net",
]
