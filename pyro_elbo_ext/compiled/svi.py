"""``CompiledSVI``: the loss, its gradient and the optimizer's update in one compiled graph.

Per structure key (see :mod:`pyro_elbo_ext.compiled.trace`) the step is built once:

1. an eager run of the loss finds (and creates, and under validation checks) the parameters;
2. :func:`~pyro_elbo_ext.compiled.trace.trace_loss_and_grad` traces loss and gradient through
   Pyro's handlers into an ATen graph, parameters and data as inputs;
3. one function runs that graph and the functional optimizer of every parameter
   (:mod:`pyro_elbo_ext.compiled.optimizers`), returning the new parameters and optimizer
   state; it is traced into one ATen graph and Inductor compiles it whole.  The new values
   are copied into the parameters' and state's own tensors (one ``torch._foreach_copy_``).

The parameters are the param store's own tensors, updated in place on every step, so
``pyro.param``, ``guide.median()``, ``Predictive`` and ``pyro.get_param_store().get_state()``
see them.  Where the graph guards Python's reads of tensor values, the update is applied only
if the guard holds (``torch.where`` inside the graph); otherwise the step is retraced and
retaken, with a warning.
"""

from __future__ import annotations

import time

import pyro
import torch
from pyro.infer.util import torch_item
from torch.fx.experimental.proxy_tensor import make_fx

from .adapter import (
    advance_step,
    compile_refusal,
    eager_loss_fn,
    is_compilable,
    prepare_step_inputs,
    step_inputs,
)
from .backend import compile_step
from .cache import BoundedCache, count_retrace
from .jit import MAX_GRAPHS, MAX_RETRACES, device_of
from .optimizers import ParamOptimizer, check_supported, functional_optimizer
from .trace import TracedLossGrad, structure_key, trace_loss_and_grad

_GRAPHS_MESSAGE = (
    "CompiledSVI: more than {maxsize} argument structures (shapes, dtypes, non-tensor "
    "arguments); dropping the oldest compiled step ({evictions} so far). Each new structure "
    "compiles anew: keep shapes fixed (e.g. pad minibatches) and pass changing numbers as "
    "tensors"
)


def _check_loss(loss, model, guide) -> None:
    if not is_compilable(loss):
        raise TypeError(
            "CompiledSVI compiles the losses of pyro_elbo_ext (JensenELBO, AnalyticKLELBO, "
            f"HardAttentionELBO); got {type(loss).__name__}: use pyro.infer.SVI for it (Pyro's "
            "Trace_ELBO reads its surrogate's value into Python with .item(), which a graph "
            "would freeze; JensenELBO(entropy='sampled') estimates the same L)"
        )
    reason = compile_refusal(loss, model, guide)
    if reason is not None:
        raise ValueError(f"CompiledSVI cannot compile {reason}")


class _Step:
    """One compiled whole step and the tensors it reads and writes.

    The step (loss graph, every parameter's update, and the loss's carried state) is traced
    once more into a single ATen graph, on copies of the parameters and state, and that graph
    is compiled.  Inputs: parameters, optimizer state, data, carried state; outputs: loss,
    guard, new parameters, new optimizer state, new carried state.
    """

    def __init__(self, traced: TracedLossGrad, optimizers: list[ParamOptimizer],
                 states: list[dict], data: list[torch.Tensor], device: torch.device, loss,
                 eager_random: bool = False):
        self.traced = traced
        self.loss = loss
        self.keys = [sorted(state) for state in states]
        # detached aliases (the same storage) of the parameters and state, written in place
        self.inputs = [t.detach() for t in traced.params] + [
            state[k].detach() for state, keys in zip(states, self.keys) for k in keys]
        n, keys = len(traced.params), self.keys
        n_inputs, n_data = len(self.inputs), len(data)
        guarded = traced.guarded

        def whole_step(*flat):
            params, carried = flat[:n], flat[n_inputs + n_data:]
            outputs = traced.graph(*params, *flat[n_inputs: n_inputs + n_data], *carried)
            ok = outputs[-1] if guarded else None

            def kept(new, old):
                return new if ok is None else torch.where(ok, new, old)

            new_params, new_states, position = [], [], n
            for p, g, opt, names in zip(params, outputs[1: 1 + n], optimizers, keys):
                state = dict(zip(names, flat[position: position + len(names)]))
                position += len(names)
                new_p, new_state = opt.update(p, g, state)
                new_params.append(kept(new_p, p))
                new_states.extend(kept(new_state[k], state[k]) for k in names)
            new_carried = [kept(new, old) for new, old in
                           zip(outputs[1 + n: 1 + n + len(carried)], carried)]
            flag = ok if ok is not None else torch.ones((), dtype=torch.bool)
            return (outputs[0], flag, *new_params, *new_states, *new_carried)

        carried = traced.state_inputs(loss) or []
        copies = [t.detach().clone() for t in self.inputs + carried]
        with torch.no_grad(), pyro.validation_enabled(False):
            graph = make_fx(whole_step, tracing_mode="real")(
                *copies[:n_inputs], *data, *copies[n_inputs:])
        self.compiled = compile_step(graph, self.inputs + list(data) + carried, device,
                                     eager_random)

    def __call__(self, data):
        """Take the step, or return ``None`` when the loss's carried state no longer has the
        traced keys (the caller then builds anew)."""
        carried = self.traced.state_inputs(self.loss)
        if carried is None:
            return None
        # no autograd here: the inputs are detached aliases (and the data is the user's; a
        # data tensor that requires grad is refused when tracing)
        loss, ok, *new = self.compiled(*self.inputs, *data, *carried)
        # the new values are written back here, not inside the graph: AOTAutograd dropped
        # the graph's in-place writes to float64 inputs (torch 2.13)
        count = len(self.inputs)
        torch._foreach_copy_(self.inputs, new[:count])
        if carried:
            fresh = new[count:]
            if fresh[0].is_cuda:  # a CUDA graph reuses its output buffers on the next call
                fresh = [t.clone() for t in fresh]
            self.loss.load_carried_state(dict(zip(self.traced.state_keys, fresh)))
            self.loss.report_carried_state()
        return loss, ok


class CompiledSVI:
    """Stochastic variational inference with the whole step compiled.

    The interface of :class:`pyro.infer.SVI`: ``step(*args, **kwargs)`` takes one step and
    returns the loss estimate (a float) before it, ``evaluate_loss`` estimates the loss
    without a step (eager).  The loss, its gradient and the optimizer's update run as one
    graph (Inductor, torch.compile's compiler; CUDA graphs on a GPU), built on the first step
    for each argument structure (seconds; Inductor's on-disk cache makes later processes
    faster).

    Parameters
    ----------
    model, guide : callable
        As for :class:`pyro.infer.SVI`.
    optim : pyro.optim.PyroOptim
        ``pyro.optim.Adam``, ``ClippedAdam``, ``SGD``, ``RMSprop``, or a
        :class:`~pyro_elbo_ext.GroupedOptim` over one of them, with ``clip_args``; anything
        else is refused with the list.  Its state (e.g. after ``optim.set_state`` or steps of
        :class:`pyro.infer.SVI`) is taken over on the first step.
    loss : SiteTreatmentELBO
        A loss of this package (not ``ImportanceWeightedELBO(estimator="dreg")``).  Its
        ``jit`` flag is ignored.  A learning signal's state (moving-average or learned
        baseline, normalizer) enters the graph as inputs and leaves it as outputs, and is
        handed back to the loss after every step (``loss.state_dict()`` stays current).

    Notes
    -----
    Random numbers are Inductor's, seeded from torch's generator: the same
    ``pyro.set_rng_seed`` gives the same trajectory, a different one than :class:`pyro.infer.SVI`
    draws (equal in distribution).  Python control flow on tensor values is guarded, and new
    shapes or non-tensor arguments compile a new step (bounded cache, with warnings).  Python
    state outside tensors (a global flag the model reads) is invisible to the graph.
    Checkpoints: :meth:`get_state` / :meth:`set_state` use :meth:`pyro.optim.PyroOptim.get_state`'s
    format, so ``svi.optim.set_state(compiled.get_state())`` continues under ``SVI``.

    On CUDA the step runs as a CUDA graph (Inductor's ``triton.cudagraphs``, what
    ``mode="reduce-overhead"`` sets); that path has not been run on a GPU yet (no device was
    available when it was written): only the CPU path is tested.
    """

    def __init__(self, model, guide, optim, loss):
        _check_loss(loss, model, guide)
        check_supported(optim)
        self.model, self.guide, self.optim, self.loss = model, guide, optim, loss
        self._loss_fn = eager_loss_fn(loss)
        self._steps = BoundedCache(MAX_GRAPHS, _GRAPHS_MESSAGE)
        self._states: dict[str, tuple[torch.Tensor, dict]] = {}  # name -> (param, state)
        self._optimizers: dict[str, ParamOptimizer] = {}
        self._waiting: dict[str, dict] | None = None
        self.retraces = 0
        #: compile with Inductor's ``fallback_random``: torch's own random kernels, so the
        #: step draws the numbers the eager loss would (tests)
        self.eager_random = False
        #: seconds each build took (trace and first compiled call), most recent last
        self.compile_seconds: list[float] = []

    # ------------------------------------------------------------------ SVI's interface
    def step(self, *args, **kwargs) -> float:
        """Take one step; returns the loss estimate at the parameters before it."""
        key, data = structure_key(args, kwargs)
        prepare_step_inputs(self.loss)  # this step's scheduled values (a KL weight)
        data = data + list(step_inputs(self.loss))
        step = self._steps.lookup(key)
        if step is not None and step.traced.params_current(pyro.get_param_store()._params):
            result = step(data)
            if result is not None:
                loss, ok = result
                if not step.traced.guarded or bool(ok):
                    self._advance()
                    return torch_item(loss)
                self._count_retrace(step.traced)
        start = time.perf_counter()
        step = self._build(args, kwargs, data)
        self._steps.insert(key, step)
        loss, ok = step(data)
        self.compile_seconds.append(time.perf_counter() - start)
        if not bool(ok):  # a read changed between the trace and this call: take it again
            return self.step(*args, **kwargs)
        self._advance()
        return torch_item(loss)

    def _advance(self) -> None:
        """One training step taken: the loss's step counter moves (a schedule's position)."""
        advance_step(self.loss)

    def evaluate_loss(self, *args, **kwargs) -> float:
        """The loss estimate at the current parameters, eager, without a step."""
        with torch.no_grad():
            loss = self.loss.loss(self.model, self.guide, *args, **kwargs)
            if isinstance(loss, tuple):
                return type(loss)(map(torch_item, loss))
            return torch_item(loss)

    # ------------------------------------------------------------------ checkpoints
    def get_state(self) -> dict:
        """The optimizer state, ``{param_name: torch state_dict}`` (``PyroOptim.get_state``)."""
        out = dict(self._pending())
        for name, (_, state) in self._states.items():
            out[name] = self._optimizers[name].optimizer.export(state)
        return out

    def set_state(self, state: dict) -> None:
        """Load optimizer state saved by :meth:`get_state` or ``PyroOptim.get_state``."""
        pending = self._pending()
        for name, saved in state.items():
            pending[name] = saved
            if name in self._states:
                param, old = self._states.pop(name)
                self._optimizers.pop(name)
                fresh = self._state_for(name, param)
                for key, value in old.items():  # the compiled steps hold these tensors
                    value.copy_(fresh[key])
                self._states[name] = (param, old)

    # ------------------------------------------------------------------ building
    def _pending(self) -> dict:
        if self._waiting is None:  # take over the optimizer's state on first use
            self._waiting = dict(getattr(self.optim, "_state_waiting_to_be_consumed", {}))
            self._waiting.update(self.optim.get_state())
        return self._waiting

    def _state_for(self, name: str, param: torch.Tensor) -> dict:
        entry = self._states.get(name)
        if entry is not None and entry[0] is param:
            return entry[1]
        saved = self._pending().pop(name, None)
        optimizer = functional_optimizer(self.optim, param, saved)
        self._optimizers[name] = optimizer
        with torch.no_grad():
            state = (optimizer.optimizer.load(param, saved) if saved
                     else optimizer.optimizer.init_state(param))
        self._states[name] = (param, state)
        return state

    def _build(self, args, kwargs, data) -> _Step:
        loss_fn, model, guide = self._loss_fn, self.model, self.guide
        traced = trace_loss_and_grad(lambda: loss_fn(model, guide, args, kwargs), data,
                                     self.loss)
        states = [self._state_for(n, p) for n, p in zip(traced.names, traced.params)]
        optimizers = [self._optimizers[n] for n in traced.names]
        return _Step(traced, optimizers, states, data, device_of(traced.params + data),
                     self.loss, self.eager_random)

    def _count_retrace(self, traced: TracedLossGrad) -> None:
        self.retraces = count_retrace(self.retraces, MAX_RETRACES, "CompiledSVI",
                                      traced.where_read(), "pyro.infer.SVI", stacklevel=3)


__all__ = ["CompiledSVI"]
