r"""Pyro's optimizers written as pure functions, so that their update can join the compiled step.

Each :class:`FunctionalOptimizer` mirrors one torch (or Pyro) optimizer's single-tensor update,
operation for operation; :meth:`~FunctionalOptimizer.update` maps ``(param, grad, state)`` to
``(new_param, new_state)`` without mutating anything.  The arithmetic of the step-size terms is
done in float64 tensors where torch does it in Python floats, so an uncompiled update agrees
with torch's to the last bit or within a rounding of the parameter's dtype (Inductor may fuse
and reorder the float operations of the compiled one: within rounding).

State moves to and from torch's ``state_dict`` format for one parameter (what
:meth:`pyro.optim.PyroOptim.get_state` stores per parameter name), so checkpoints move between
:class:`pyro.infer.SVI` and :class:`~pyro_elbo_ext.CompiledSVI` in both directions.

Supported (:func:`functional_optimizer`): ``pyro.optim.Adam``, ``pyro.optim.ClippedAdam``
(with ``lrd``), ``pyro.optim.SGD`` (momentum, dampening, Nesterov), ``pyro.optim.RMSprop``
(momentum, centered), each also inside :class:`~pyro_elbo_ext.GroupedOptim`, with Pyro's
``clip_args`` (``clip_norm``, ``clip_value``).  References: Kingma & Ba 2014 (Adam,
arXiv:1412.6980); Tieleman & Hinton 2012 (RMSprop); Sutskever et al. 2013 (momentum).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from pyro.optim import PyroOptim
from pyro.optim.clipped_adam import ClippedAdam as _TorchClippedAdam

from ..optim import GroupedOptim

_F64 = torch.float64

#: optimizers the compiled step supports, as the error message lists them
SUPPORTED = (
    "pyro.optim.Adam, pyro.optim.ClippedAdam, pyro.optim.SGD, pyro.optim.RMSprop, and "
    "pyro_elbo_ext.GroupedOptim over torch.optim.Adam / SGD / RMSprop or ClippedAdam"
)

State = dict[str, torch.Tensor]


def _scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(value, dtype=_F64, device=like.device)


@dataclass(frozen=True)
class FunctionalOptimizer:
    """One parameter's optimizer: hyper-parameters (Python constants) and a pure update."""

    hyper: dict

    #: hyper-parameter names and defaults (subclasses); anything else given is refused
    DEFAULTS: dict = None  # type: ignore[assignment]
    #: settings accepted only at these values
    FIXED: dict = None  # type: ignore[assignment]

    @classmethod
    def from_args(cls, args: dict) -> FunctionalOptimizer:
        hyper = dict(cls.DEFAULTS)
        for key, value in args.items():
            if key in cls.FIXED:
                if bool(value) != bool(cls.FIXED[key]):
                    raise ValueError(
                        f"the compiled step's {cls.__name__} does not support {key}={value!r}; "
                        "use pyro.infer.SVI for it"
                    )
            elif key in hyper:
                hyper[key] = value
            elif key not in ("foreach", "fused", "capturable", "differentiable", "params"):
                raise ValueError(f"{cls.__name__}: unknown optimizer argument {key!r}")
        return cls(hyper)

    def init_state(self, param: torch.Tensor) -> State:
        raise NotImplementedError

    def update(self, param, grad, state: State) -> tuple[torch.Tensor, State]:
        raise NotImplementedError

    def load(self, param: torch.Tensor, saved: dict) -> State:
        """State from one parameter's torch ``state_dict`` (``{}`` state: a fresh one)."""
        state = self.init_state(param)
        entry = saved.get("state", {})
        entry = next(iter(entry.values())) if entry else {}
        for key, value in entry.items():
            if key in state:
                state[key] = torch.as_tensor(value).to(state[key]).clone()
        return state

    def export(self, state: State) -> dict:
        """One parameter's torch ``state_dict``."""
        inner = {k: v.detach().clone() for k, v in state.items()}
        return {"state": {0: inner}, "param_groups": [dict(self.hyper, params=[0])]}


class Adam(FunctionalOptimizer):
    """``torch.optim.Adam`` (coupled ``weight_decay``; no amsgrad/maximize).

        m <- b1 m + (1 - b1) g,    v <- b2 v + (1 - b2) g^2,
        theta <- theta - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    """

    DEFAULTS = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
    FIXED = {"amsgrad": False, "maximize": False, "decoupled_weight_decay": False}

    def init_state(self, param):
        return {"step": torch.zeros((), dtype=torch.float32, device=param.device),
                "exp_avg": torch.zeros_like(param), "exp_avg_sq": torch.zeros_like(param)}

    def update(self, param, grad, state):
        beta1, beta2 = self.hyper["betas"]
        lr, eps, decay = self.hyper["lr"], self.hyper["eps"], self.hyper["weight_decay"]
        step = state["step"] + 1
        if decay != 0:
            grad = grad + decay * param
        exp_avg = torch.lerp(state["exp_avg"], grad, 1 - beta1)
        exp_avg_sq = state["exp_avg_sq"] * beta2 + (1 - beta2) * grad * grad
        t = step.to(_F64)
        step_size = lr / (1 - torch.pow(_scalar(beta1, t), t))
        bias2_sqrt = torch.sqrt(1 - torch.pow(_scalar(beta2, t), t))
        denom = exp_avg_sq.sqrt() / bias2_sqrt.to(param.dtype) + eps
        new = param - step_size.to(param.dtype) * (exp_avg / denom)
        return new, {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


class ClippedAdam(FunctionalOptimizer):
    """Pyro's ``ClippedAdam``: Adam on gradients clamped to ``[-clip_norm, clip_norm]``, with
    the learning rate multiplied by ``lrd`` on every step (the decayed rate is state)."""

    DEFAULTS = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
                "clip_norm": 10.0, "lrd": 1.0, "centered_variance": False}
    FIXED: dict = {}

    def init_state(self, param):
        return {"step": torch.zeros((), dtype=_F64, device=param.device),
                "lr": torch.tensor(float(self.hyper["lr"]), dtype=_F64, device=param.device),
                "exp_avg": torch.zeros_like(param), "exp_avg_sq": torch.zeros_like(param)}

    def load(self, param, saved):
        state = super().load(param, saved)
        groups = saved.get("param_groups") or [{}]
        state["lr"] = torch.tensor(float(groups[0].get("lr", self.hyper["lr"])), dtype=_F64,
                                   device=param.device)
        return state

    def export(self, state):
        out = super().export({k: v for k, v in state.items() if k != "lr"})
        inner = next(iter(out["state"].values()))
        inner["step"] = int(state["step"].item())
        out["param_groups"][0]["lr"] = float(state["lr"].item())
        return out

    def update(self, param, grad, state):
        h = self.hyper
        beta1, beta2 = h["betas"]
        lr = state["lr"] * h["lrd"]
        grad = grad.clamp(-h["clip_norm"], h["clip_norm"])
        step = state["step"] + 1
        if h["weight_decay"] != 0:
            grad = grad + h["weight_decay"] * param
        exp_avg = state["exp_avg"] * beta1 + (1 - beta1) * grad
        grad_var = grad - exp_avg if h["centered_variance"] else grad
        exp_avg_sq = state["exp_avg_sq"] * beta2 + (1 - beta2) * grad_var * grad_var
        denom = exp_avg_sq.sqrt() + h["eps"]
        step_size = (lr * torch.sqrt(1 - torch.pow(_scalar(beta2, step), step))
                     / (1 - torch.pow(_scalar(beta1, step), step)))
        new = param - step_size.to(param.dtype) * (exp_avg / denom)
        return new, {"step": step, "lr": lr, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


class SGD(FunctionalOptimizer):
    """``torch.optim.SGD`` with momentum, dampening, Nesterov and coupled weight decay.

    The momentum buffer starts as the first gradient (as torch's does); ``step`` counts
    updates so that the first one can be told apart inside a graph (not exported)."""

    DEFAULTS = {"lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0,
                "nesterov": False}
    FIXED = {"maximize": False}

    def init_state(self, param):
        state = {"step": torch.zeros((), dtype=_F64, device=param.device)}
        if self.hyper["momentum"] != 0:
            state["momentum_buffer"] = torch.zeros_like(param)
        return state

    def load(self, param, saved):
        state = super().load(param, saved)
        entry = saved.get("state", {})
        entry = next(iter(entry.values())) if entry else {}
        if entry.get("momentum_buffer") is not None:
            state["step"] = torch.ones((), dtype=_F64, device=param.device)
        return state

    def export(self, state):
        inner = {}
        if "momentum_buffer" in state and float(state["step"].item()) > 0:
            inner["momentum_buffer"] = state["momentum_buffer"].detach().clone()
        return {"state": {0: inner} if inner else {},
                "param_groups": [dict(self.hyper, params=[0])]}

    def update(self, param, grad, state):
        h = self.hyper
        if h["weight_decay"] != 0:
            grad = grad + h["weight_decay"] * param
        new_state = {"step": state["step"] + 1}
        if h["momentum"] != 0:
            running = state["momentum_buffer"] * h["momentum"] + (1 - h["dampening"]) * grad
            buf = torch.where(state["step"] > 0, running, grad)
            new_state["momentum_buffer"] = buf
            grad = grad + h["momentum"] * buf if h["nesterov"] else buf
        return param - h["lr"] * grad, new_state


class RMSprop(FunctionalOptimizer):
    """``torch.optim.RMSprop`` (momentum, centered, coupled weight decay)."""

    DEFAULTS = {"lr": 1e-2, "alpha": 0.99, "eps": 1e-8, "weight_decay": 0.0, "momentum": 0.0,
                "centered": False}
    FIXED = {"maximize": False}

    def init_state(self, param):
        state = {"step": torch.zeros((), dtype=torch.float32, device=param.device),
                 "square_avg": torch.zeros_like(param)}
        if self.hyper["momentum"] > 0:
            state["momentum_buffer"] = torch.zeros_like(param)
        if self.hyper["centered"]:
            state["grad_avg"] = torch.zeros_like(param)
        return state

    def update(self, param, grad, state):
        h = self.hyper
        alpha = h["alpha"]
        new_state = {"step": state["step"] + 1}
        if h["weight_decay"] != 0:
            grad = grad + h["weight_decay"] * param
        square_avg = state["square_avg"] * alpha + (1 - alpha) * grad * grad
        new_state["square_avg"] = square_avg
        if h["centered"]:
            grad_avg = torch.lerp(state["grad_avg"], grad, 1 - alpha)
            new_state["grad_avg"] = grad_avg
            avg = (square_avg - grad_avg * grad_avg).sqrt()
        else:
            avg = square_avg.sqrt()
        avg = avg + h["eps"]
        if h["momentum"] > 0:
            buf = state["momentum_buffer"] * h["momentum"] + grad / avg
            new_state["momentum_buffer"] = buf
            return param - h["lr"] * buf, new_state
        return param - h["lr"] * (grad / avg), new_state


def clip_gradient(grad: torch.Tensor, clip_norm=None, clip_value=None) -> torch.Tensor:
    """Pyro's ``clip_args`` on one parameter: ``clip_grad_norm_`` then ``clip_grad_value_``."""
    if clip_norm is not None:
        norm = torch.linalg.vector_norm(grad)
        grad = grad * torch.clamp(clip_norm / (norm + 1e-6), max=1.0)
    if clip_value is not None:
        grad = grad.clamp(-clip_value, clip_value)
    return grad


_BY_CONSTRUCTOR = {
    torch.optim.Adam: Adam,
    _TorchClippedAdam: ClippedAdam,
    torch.optim.SGD: SGD,
    torch.optim.RMSprop: RMSprop,
}


@dataclass(frozen=True)
class ParamOptimizer:
    """The optimizer of one named parameter: its update and its gradient clipping."""

    optimizer: FunctionalOptimizer
    clip: dict

    def update(self, param, grad, state):
        if self.clip:
            grad = clip_gradient(grad, **self.clip)
        return self.optimizer.update(param, grad, state)


def check_supported(optim) -> type[FunctionalOptimizer]:
    """The functional optimizer class mirroring ``optim``, or a TypeError listing
    :data:`SUPPORTED`."""
    kind = _BY_CONSTRUCTOR.get(getattr(optim, "pt_optim_constructor", None))
    if not isinstance(optim, PyroOptim) or kind is None:
        what = getattr(optim, "pt_optim_constructor", type(optim))
        raise TypeError(
            f"CompiledSVI cannot compile the optimizer {getattr(what, '__name__', what)}; "
            f"supported: {SUPPORTED}. Use pyro.infer.SVI for other optimizers"
        )
    return kind


def functional_optimizer(optim, param: torch.Tensor, saved: dict | None = None) -> ParamOptimizer:
    """The functional mirror of ``optim`` (a :class:`pyro.optim.PyroOptim`) for one parameter.

    Hyper-parameters are ``optim``'s for this parameter (a callable ``optim_args`` is called
    as Pyro calls it); under a :class:`pyro.optim.PyroOptim`, a ``saved`` checkpoint's
    hyper-parameters win, as ``torch.optim.Optimizer.load_state_dict`` makes them win there
    (a :class:`~pyro_elbo_ext.GroupedOptim` keeps its own; see its docstring).

    Raises
    ------
    TypeError
        For any other optimizer, listing :data:`SUPPORTED`.
    """
    kind = check_supported(optim)
    args = dict(optim._get_optim_args(param))
    clip = optim._get_grad_clip_args(param) or {}
    unknown = set(clip) - {"clip_norm", "clip_value"}
    if unknown:
        raise ValueError(f"clip_args keys must be 'clip_norm'/'clip_value', got {sorted(unknown)}")
    if saved and not isinstance(optim, GroupedOptim):
        groups = saved.get("param_groups") or [{}]
        args.update({k: v for k, v in groups[0].items() if k != "params" and k != "initial_lr"})
    for key in ("lr",):
        if key in args and not math.isfinite(float(args[key])):
            raise ValueError(f"optimizer {key} must be finite, got {args[key]!r}")
    return ParamOptimizer(kind.from_args(args), dict(clip))


__all__ = ["SUPPORTED", "ClippedAdam", "Adam", "SGD", "RMSprop", "FunctionalOptimizer",
           "ParamOptimizer", "check_supported", "clip_gradient", "functional_optimizer"]
