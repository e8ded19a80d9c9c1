r"""The learned baseline: an input-dependent network per site, regressed on the reward (NVIL).

A :class:`~.signals.SignalPart`: :class:`LearnedBaseline` (and :func:`default_baseline_net`,
its default network).  Its weights and Adam moments are state (:class:`~.state.StateSlots`)
that each update replaces, stepped by the pure Adam of :mod:`pyro_elbo_ext.functional_optim`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call

from ..functional_optim import Adam
from .baselines import MovingAverageBaseline
from .signals import SignalPart, SignalSite
from .state import add_network, all_finite, network_weights, step_network
from .validation import check_number, check_positive_int


def default_baseline_net(in_features: int, hidden_dim: int) -> nn.Module:
    """A one-hidden-layer tanh network ``R^in_features -> R`` (the default learned baseline)."""
    return nn.Sequential(nn.Linear(in_features, hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, 1))


class LearnedBaseline(SignalPart):
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
    setting_names = {"hidden_dim": "baseline_hidden_dim", "lr": "baseline_lr"}

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
        self.adam = Adam.from_args({"lr": self.lr})  # torch.optim.Adam, pure
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
        add_network(self.slots, site, net, self.adam, like)

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
        weights = network_weights(self.slots, site)
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

    def fit(self, site: str, reward: torch.Tensor, baseline_input: torch.Tensor,
            scale: torch.Tensor | float) -> None:
        """After the gradient: move the average, then one Adam step of the regression.

        Skipped, with a warning naming the site, when the reward or the input is not finite
        (the average too), or when the regression's gradient is not.
        """
        x = self._input(site, baseline_input, reward)
        target = reward.detach() / scale
        inputs_ok = all_finite(target, x)
        center = self.center.value(site, target)
        self.center.fold(site, target, inputs_ok)
        weights = self._weights(site, x)
        with torch.enable_grad():
            leaves = {name: w.detach().requires_grad_() for name, w in weights.items()}
            prediction = functional_call(self.architectures[site], leaves, (x,)).squeeze(-1)
            loss = 0.5 * (target - center - prediction).pow(2).sum()
            grads = torch.autograd.grad(loss, list(leaves.values()))
        ok = inputs_ok & all_finite(*grads)
        step_network(self.slots, site, weights, grads, ok, self.adam, self.adam_keys)
        self.settle(site, ok)

    # ------------------------------------------------------------------ the protocol
    def apply(self, site: SignalSite, signal: torch.Tensor) -> torch.Tensor:
        x = site.infer.get("baseline_input")
        return signal - self.predict(site.name, x, site.scale, reward_like=signal)

    def update(self, site: SignalSite, signal: torch.Tensor, applied: torch.Tensor) -> None:
        self.fit(site.name, signal, site.infer.get("baseline_input"), site.scale)

    def settings(self) -> dict:
        return {"hidden_dim": self.hidden_dim, "lr": self.lr}

    def extra_state(self) -> dict:
        dtypes = {w.dtype for k, w in self.slots.items() if k[1] == "weight"}
        return {"in_features": dict(self.in_features),
                "dtype": dtypes.pop() if len(dtypes) == 1 else None}

    def restore_extra_state(self, state: dict) -> None:
        like = torch.zeros((), dtype=state.get("dtype") or torch.get_default_dtype())
        for site, in_features in state["in_features"].items():
            if site not in self.architectures:
                self._add_net(site, in_features, like)

    def legacy_kind(self, state: dict) -> str | None:
        return "learned" if "hidden_dim" in state else None


__all__ = ["LearnedBaseline", "default_baseline_net"]
