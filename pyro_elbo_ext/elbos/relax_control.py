r"""RELAX's control variates: one network per site, trained on the variance of the estimate.

:class:`RelaxControls` holds, for every site whose estimator is ``"relax"``, a control variate
:math:`c_\phi(z)` on the site's relaxation (a one-hidden-layer tanh network from the
relaxation of one element of the site's batch, its event dimensions or categories, to a
number) and trains it as Grathwohl et al. (2018, arXiv:1711.00123, eq. 5) do: by the gradient
of the single-sample variance objective :math:`\sum \hat g^2`, here of the estimate
:math:`\hat g` with respect to the site's logits (the site-local part of the chain rule: cheap,
and it needs no knowledge of the optimizer's parameters), which needs the second derivative
:math:`\nabla_\phi \nabla_\alpha c_\phi`.

Learning-signal rules (as :class:`~.learned_baseline.LearnedBaseline`): the forward pass
reads the weights (so the estimate at this step does not depend on the update, and is unbiased
for any weights); the variance objective's gradient is taken in the forward pass (it needs the
step's graph) and applied after the step's gradient, by one Adam step
(:class:`~pyro_elbo_ext.functional_optim.Adam`, pure) that *replaces* the weight and moment
tensors (:class:`~.state.StateSlots`): not in Pyro's parameter store, not seen by the user's
optimizer, saved with the loss's ``state_dict``, carried through a compiled step.  A
non-finite objective gradient skips the update with a warning naming the site.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from ..functional_optim import Adam
from .discrete_sampling import DiscreteDraw
from .discrete_terms import relax_surrogate_terms, site_logits
from .state import StateSlots, add_network, all_finite, network_weights, step_network

#: the default control network's hidden width and Adam learning rate
DEFAULT_HIDDEN = 32
DEFAULT_LR = 1e-2


def default_control_net(in_features: int, hidden_dim: int) -> nn.Module:
    """``R^in_features -> R``: one tanh hidden layer (zero output weights: c starts at 0)."""
    net = nn.Sequential(nn.Linear(in_features, hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, 1))
    nn.init.zeros_(net[2].weight)
    nn.init.zeros_(net[2].bias)
    return net


class RelaxControls(StateSlots):
    """The control variates of a loss's ``"relax"`` sites (see the module docstring)."""

    kind = "relax"
    what = "RELAX control variate"

    def __init__(self, hidden_dim: int = DEFAULT_HIDDEN, lr: float = DEFAULT_LR):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.lr = lr
        self.adam = Adam.from_args({"lr": lr})
        self.adam_keys = tuple(self.adam.init_state(torch.zeros(())))
        self.architectures: dict[str, nn.Module] = {}
        self.in_features: dict[str, int] = {}
        #: while true, training calls read the weights but do not train them
        self.paused = False
        #: this step's objective gradients, by site, until :meth:`update`
        self.pending: dict[str, tuple[dict, list, torch.Tensor]] = {}

    def _add_net(self, site: str, in_features: int, like: torch.Tensor) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same start for every run: a checkpoint needs no RNG
            net = default_control_net(in_features, self.hidden_dim)
        net = net.to(dtype=like.dtype, device=like.device)
        self.architectures[site] = net
        self.in_features[site] = in_features
        add_network(self.slots, site, net, self.adam, like)

    def weights(self, site: str, in_features: int, like: torch.Tensor) -> dict:
        if site not in self.architectures:
            self._add_net(site, in_features, like)
        elif self.in_features[site] != in_features:
            raise ValueError(
                f"discrete_estimator='relax' at site '{site}': its relaxation has "
                f"{in_features} features per element, but its control variate was built for "
                f"{self.in_features[site]}; keep the site's event shape fixed"
            )
        return network_weights(self.slots, site)

    def surrogate(self, site: str, fn, value: torch.Tensor, score: torch.Tensor,
                  signal: torch.Tensor, draw: DiscreteDraw, event_dim: int,
                  training: bool) -> torch.Tensor:
        """The site's RELAX surrogate (summed); in a training call, also the variance
        objective's gradient for :meth:`update`."""
        bernoulli = draw.family == "bernoulli"
        width = (value.shape[-1] if event_dim else 1) if bernoulli else draw.noise.shape[-1]
        weights = self.weights(site, width, draw.noise)
        train = training and not self.paused and torch.is_grad_enabled()
        leaves = ({n: w.detach().requires_grad_() for n, w in weights.items()} if train
                  else weights)
        net = self.architectures[site]

        def control(z: torch.Tensor) -> torch.Tensor:
            features = z if (event_dim or not bernoulli) else z.unsqueeze(-1)
            return functional_call(net, leaves, (features,)).squeeze(-1)

        total = relax_surrogate_terms(fn, value, score, signal, draw, control, event_dim).sum()
        if train:
            logits = site_logits(fn)
            (g,) = torch.autograd.grad(total, logits, create_graph=True)
            objective = (g ** 2).sum()
            grads = torch.autograd.grad(objective, list(leaves.values()), allow_unused=True,
                                        retain_graph=True)  # the step's backward follows
            grads = [torch.zeros_like(w) if gr is None else gr.detach()
                     for w, gr in zip(leaves.values(), grads)]
            self.pending[site] = (weights, grads, all_finite(*grads))
        return total

    def update(self) -> None:
        """After the step's gradient: one Adam step of each site's variance objective."""
        pending, self.pending = self.pending, {}
        for site, (weights, grads, ok) in pending.items():
            step_network(self.slots, site, weights, grads, ok, self.adam, self.adam_keys)
            self.settle(site, ok)

    # ------------------------------------------------------------------ checkpoints
    def get_extra_state(self) -> dict:
        dtypes = {w.dtype for k, w in self.slots.items() if k[1] == "weight"}
        return {"kind": self.kind, "hidden_dim": self.hidden_dim, "lr": self.lr,
                "in_features": dict(self.in_features),
                "dtype": dtypes.pop() if len(dtypes) == 1 else None,
                "slots": self.saved_slots()}

    def set_extra_state(self, state: dict) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"cannot load {state.get('kind')!r} state into RELAX controls")
        for key in ("hidden_dim", "lr"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot load the RELAX control variates: saved with relax_{key}="
                    f"{state[key]!r}, but this loss has relax_{key}={getattr(self, key)!r}"
                )
        self.slots = {}
        self.architectures, self.in_features = {}, {}
        like = torch.zeros((), dtype=state.get("dtype") or torch.get_default_dtype())
        for site, width in state["in_features"].items():
            self._add_net(site, width, like)
        self.load_slots(state["slots"])


__all__ = ["DEFAULT_HIDDEN", "DEFAULT_LR", "RelaxControls", "default_control_net"]
