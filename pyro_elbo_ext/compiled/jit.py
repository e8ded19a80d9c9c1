"""``jit=True``: a loss's value and gradient from one compiled graph (Inductor).

A loss with ``jit=True`` asks the registry of :mod:`pyro_elbo_ext.elbos.protocol` for the jit
backend, which is :class:`CompiledLosses` (registered in :mod:`pyro_elbo_ext.compiled`), and
keeps the one it builds.  Its ``differentiable_loss`` returns a loss tensor that carries the
compiled gradient: its ``backward()`` writes ``grad_output * d(-L_hat)/dparam`` into each
parameter's ``.grad`` (first-order only; differentiating it twice is not supported).

Per loss, one :class:`CompiledLoss` per (model, guide) pair, in a bounded cache (at most
:data:`MAX_PAIRS`; a model or guide built anew on each call, such as a ``functools.partial``,
would otherwise compile on every call and hold every graph: the cache drops the oldest and
warns).  Per pair, one graph per structure key (shapes, dtypes, non-tensor arguments), at
most :data:`MAX_GRAPHS`, and at most :data:`MAX_RETRACES` retraces forced by changed tensor
reads (see :mod:`pyro_elbo_ext.compiled.trace`) or changed constants (see
:mod:`pyro_elbo_ext.compiled.assumptions`, checked before every call) before an error says
what to change.  A graph's first result comes from its compiled call, not from its trace (whose
random draws are taken off the user's stream), so a rebuilt graph continues the stream exactly.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import pyro
import torch
from torch.autograd.function import once_differentiable

from .adapter import compile_refusal, eager_loss_fn, state_carrier, step_inputs
from .assumptions import CONSTANT_ADVICE, checked_data
from .backend import compile_step
from .cache import (
    READ_ADVICE,
    BoundedCache,
    callable_key,
    count_retrace,
    random_read_error,
    read_changed,
    warn_changed_numbers,
)
from .trace import TracedLossGrad, structure_key, trace_loss_and_grad

MAX_PAIRS = 8
MAX_GRAPHS = 8
MAX_RETRACES = 8

_PAIRS_MESSAGE = (
    "jit=True: this loss has now compiled for more than {maxsize} (model, guide) pairs and "
    "drops the oldest ({evictions} so far); a model or guide created anew for every call "
    "(e.g. a functools.partial built per step) is compiled on every call: create it once"
)
_GRAPHS_MESSAGE = (
    "compiled loss: more than {maxsize} argument structures (shapes, dtypes, non-tensor "
    "arguments) for one (model, guide) pair; dropping the oldest graph ({evictions} so far). "
    "Each new structure is a new compilation: keep shapes fixed (e.g. pad minibatches) and pass "
    "changing numbers as tensors"
)


def device_of(tensors) -> torch.device:
    for t in tensors:
        return t.device
    return torch.device("cpu")


@dataclass
class GraphEntry:
    traced: TracedLossGrad
    compiled: object


class _LossWithGradient(torch.autograd.Function):
    """A loss value whose backward hands out a gradient computed in advance."""

    @staticmethod
    def forward(ctx, value_and_grads, *params):
        value, grads = value_and_grads
        ctx.grads = grads
        return value.detach()

    @staticmethod
    @once_differentiable  # the gradient is a constant here: refuse to differentiate it again
    def backward(ctx, grad_output):
        return (None,) + tuple(grad_output * g for g in ctx.grads)


class CompiledLoss:
    """The compiled ``differentiable_loss`` of one (loss, model, guide).

    Calls trace and compile on first use of each structure key; see the module docstring.
    """

    def __init__(self, loss, model, guide, eager_random: bool = False):
        self._loss = weakref.ref(loss)
        self.model, self.guide = model, guide
        self.eager_random = eager_random
        self.graphs = BoundedCache(MAX_GRAPHS, _GRAPHS_MESSAGE)
        self.retraces = 0

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        """``-L_hat`` as a tensor whose ``backward()`` hands out the compiled gradient."""
        value, grads, params = self.value_and_grads(*args, **kwargs)
        return _LossWithGradient.apply((value, grads), *params)

    def loss_and_grads(self, *args, **kwargs) -> torch.Tensor:
        """``-L_hat``, with its compiled gradient added into the parameters' ``.grad`` directly
        (what ``self(*args, **kwargs).backward()`` does, without an autograd pass)."""
        value, grads, params = self.value_and_grads(*args, **kwargs)
        accumulate_grads(params, grads)
        return value

    def value_and_grads(self, *args, **kwargs):
        """``(-L_hat, d(-L_hat)/dparams, params)`` from one call of the compiled graph (traced
        and compiled first for a new structure, or where an assumption of the graph broke);
        the loss takes its new carried state.  ``params`` are the parameters that require
        grad."""
        loss = self._loss()
        key, data = structure_key(args, kwargs)
        extra = list(step_inputs(loss))  # e.g. a scheduled KL weight
        data = checked_data(data) + extra
        entry = self.graphs.lookup(key)
        if entry is not None:
            outputs = self._call(entry, loss, data)
            if outputs is not None:
                _announce_params(entry.traced.names)
                return self._result(loss, entry.traced, outputs)
        else:
            warn_changed_numbers(key, self.graphs.keys(), "compiled loss")
        traced = self._trace(loss, args, kwargs, extra)
        traced.built()
        inputs = traced.params + data + (traced.state_inputs(loss) or [])
        compiled = compile_step(traced.graph, inputs, device_of(inputs), self.eager_random)
        entry = GraphEntry(traced, compiled)
        self.graphs.insert(key, entry)
        # the step's result comes from the compiled graph, not from the trace (whose draws
        # were taken off the user's random stream): a rebuilt graph continues the stream
        # exactly where an uninterrupted run would
        outputs = self._run(entry, data, traced.state_inputs(loss))
        if traced.guarded and not bool(outputs[-1]):
            raise random_read_error("compiled loss", traced, "jit=False / pyro.infer.SVI")
        return self._result(loss, traced, outputs)

    def _call(self, entry: GraphEntry, loss, data):
        """The graph's outputs for this call, or ``None`` when it must be rebuilt."""
        traced = entry.traced
        stale = traced.stale(pyro.get_param_store()._params)
        if stale is not None:
            reason, counted = stale
            if counted:
                self._count_retrace(reason, CONSTANT_ADVICE)
            return None
        state = traced.state_inputs(loss)
        if state is None:
            return None
        outputs = self._run(entry, data, state)
        if traced.guarded and not bool(outputs[-1]):
            self._count_retrace(read_changed(traced), READ_ADVICE)
            return None
        return outputs

    @staticmethod
    def _run(entry: GraphEntry, data, state):
        with torch.no_grad():
            outputs = entry.compiled(*entry.traced.params, *data, *state)
        if outputs[0].is_cuda:  # a CUDA graph reuses its output buffers on the next call
            outputs = [o.clone() for o in outputs]
        return outputs

    @staticmethod
    def _result(loss, traced: TracedLossGrad, outputs):
        if traced.state_keys:
            loss.load_carried_state(traced.new_state(outputs))
            loss.report_carried_state()
        params = traced.grad_params
        return outputs[0], tuple(outputs[1: 1 + len(params)]), params

    def _trace(self, loss, args, kwargs, extra) -> TracedLossGrad:
        loss_fn, model, guide = eager_loss_fn(loss), self.model, self.guide
        return trace_loss_and_grad(lambda a, k: loss_fn(model, guide, a, k), args, kwargs,
                                   extra, state_carrier(loss), functions=(model, guide))

    def _count_retrace(self, reason: str, advice: str) -> None:
        self.retraces = count_retrace(self.retraces, MAX_RETRACES, "compiled loss", reason,
                                      advice, "jit=False / pyro.infer.SVI")


def accumulate_grads(params, grads) -> None:
    """Add ``grads`` into the parameters' ``.grad``, as ``backward()`` would (a parameter
    without one gets a copy: a graph output may alias one of its inputs)."""
    existing, increments = [], []
    for param, grad in zip(params, grads):
        if param.grad is None:
            param.grad = grad.clone()
        else:
            existing.append(param.grad)
            increments.append(grad)
    if existing:
        torch._foreach_add_(existing, increments)


def _announce_params(names) -> None:
    """Read each parameter through ``pyro.param``, as the eager loss does.

    The graph reads the parameters directly, but :class:`pyro.infer.SVI` learns which
    parameters to step from the ``pyro.param`` calls it traces during ``loss_and_grads``:
    without these reads it would step none of them after the first (traced) call.
    """
    for name in names:
        pyro.param(name)


class CompiledLosses(BoundedCache):
    """``jit=True``'s backend for one loss: its :class:`CompiledLoss` per (model, guide) pair,
    in a bounded cache (the factory registered with
    :func:`~pyro_elbo_ext.elbos.protocol.register_jit_backend`; the loss keeps it)."""

    def __init__(self, loss):
        super().__init__(MAX_PAIRS, _PAIRS_MESSAGE)
        self._loss = weakref.ref(loss)

    def for_pair(self, model, guide) -> CompiledLoss:
        """The :class:`CompiledLoss` of ``(model, guide)`` (created on first use; refused with
        the loss's own reason where it cannot be compiled faithfully)."""
        key = callable_key(model, guide)
        compiled = self.lookup(key)
        if compiled is None:
            loss = self._loss()
            reason = compile_refusal(loss, model, guide)
            if reason is not None:
                raise ValueError(f"jit=True cannot compile {reason}")
            compiled = CompiledLoss(loss, model, guide)
            self.insert(key, compiled)
        return compiled

    def differentiable_loss(self, model, guide, args, kwargs) -> torch.Tensor:
        """``-L_hat`` whose ``backward()`` hands out the compiled gradient."""
        return self.for_pair(model, guide)(*args, **kwargs)

    def loss_and_grads(self, model, guide, args, kwargs) -> torch.Tensor:
        """``-L_hat``, its compiled gradient added into the parameters' ``.grad``."""
        return self.for_pair(model, guide).loss_and_grads(*args, **kwargs)
