r"""Torch's and Pyro's optimizers written as pure functions: ``(param, grad, state) -> (new_param,
new_state)``, nothing mutated.

Each :class:`FunctionalOptimizer` mirrors one torch (or Pyro) optimizer's single-tensor update,
operation for operation, so that the update can be traced into a graph (the compiled step of
:mod:`pyro_elbo_ext.compiled`) or carried as explicit state (the learned baseline of
:mod:`pyro_elbo_ext.elbos.learned_baseline`, whose weights and Adam moments are state that an
update replaces).  The arithmetic of the step-size terms is done in float64 tensors where torch
does it in Python floats, so an uncompiled update agrees with torch's to the last bit or within
a rounding of the parameter's dtype (Inductor may fuse and reorder the float operations of a
compiled one: within rounding).

State moves to and from torch's ``state_dict`` format for one parameter (what
:meth:`pyro.optim.PyroOptim.get_state` stores per parameter name).  This module belongs to
neither the losses nor the compiled path: both import it.

Classes: :class:`FunctionalOptimizer`, :class:`Adam` (``torch.optim.Adam``),
:class:`ClippedAdam` (``pyro.optim.ClippedAdam``, with ``lrd``), :class:`SGD` (momentum,
dampening, Nesterov), :class:`RMSprop` (momentum, centered); :func:`clip_gradient` (Pyro's
``clip_args``).  References: Kingma & Ba 2014 (Adam, arXiv:1412.6980); Tieleman & Hinton 2012
(RMSprop); Sutskever et al. 2013 (momentum).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_F64 = torch.float64

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


__all__ = ["SGD", "Adam", "ClippedAdam", "FunctionalOptimizer", "RMSprop", "State",
           "clip_gradient"]
