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
from .assumptions import CONSTANT_ADVICE, checked_data
from .backend import compile_step
from .cache import (
    READ_ADVICE,
    BoundedCache,
    count_retrace,
    random_read_error,
    read_changed,
    warn_changed_numbers,
)
from .checkpoint import adopt, own_state
from .jit import MAX_GRAPHS, MAX_RETRACES, device_of
from .optimizers import ParamOptimizer, check_supported, functional_optimizer
from .rng import cuda_devices, rng_preserved
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

    The step (loss graph, the update of every parameter that requires grad, and the loss's
    carried state) is traced once more into a single ATen graph, on copies of the parameters,
    state and data, and that graph is compiled.  Inputs: parameters (frozen ones included:
    the graph reads them but does not update them), optimizer state, data, carried state;
    outputs: loss, guard, new trainable parameters, new optimizer state, new carried state.
    """

    def __init__(self, traced: TracedLossGrad, optimizers: list[ParamOptimizer],
                 states: list[dict], data: list[torch.Tensor], device: torch.device, loss,
                 eager_random: bool = False):
        self.traced = traced
        self.loss = loss
        self.keys = [sorted(state) for state in states]
        # detached aliases (the same storage) of the parameters and state, written in place
        params = [t.detach() for t in traced.params]
        trained = [i for i, flag in enumerate(traced.trainable) if flag]
        state_inputs = [state[k].detach() for state, keys in zip(states, self.keys)
                        for k in keys]
        self.inputs = params + state_inputs
        self.targets = [params[i] for i in trained] + state_inputs  # what a step writes
        n, keys = len(params), self.keys
        n_inputs, n_data = len(self.inputs), len(data)
        guarded = traced.guarded

        def whole_step(*flat):
            params, carried = flat[:n], flat[n_inputs + n_data:]
            outputs = traced.graph(*params, *flat[n_inputs: n_inputs + n_data], *carried)
            ok = outputs[-1] if guarded else None

            def kept(new, old):
                return new if ok is None else torch.where(ok, new, old)

            new_params, new_states, position = [], [], n
            grads = outputs[1: 1 + len(trained)]
            for i, g, opt, names in zip(trained, grads, optimizers, keys):
                p = params[i]
                state = dict(zip(names, flat[position: position + len(names)]))
                position += len(names)
                new_p, new_state = opt.update(p, g, state)
                new_params.append(kept(new_p, p))
                new_states.extend(kept(new_state[k], state[k]) for k in names)
            start = 1 + len(trained)
            new_carried = [kept(new, old) for new, old in
                           zip(outputs[start: start + len(carried)], carried)]
            flag = ok if ok is not None else torch.ones((), dtype=torch.bool)
            return (outputs[0], flag, *new_params, *new_states, *new_carried)

        carried = traced.state_inputs(loss) or []
        # copies throughout: real-mode tracing knows a tensor by identity, so the same tensor
        # passed as two arguments must not become one input
        copies = [t.detach().clone() for t in self.inputs + list(data) + carried]
        with torch.no_grad(), pyro.validation_enabled(False), rng_preserved(
                cuda_devices(copies)):
            graph = make_fx(whole_step, tracing_mode="real")(*copies)
        self.compiled = compile_step(graph, self.inputs + list(data) + carried, device,
                                     eager_random)

    def __call__(self, data):
        """Take the step, or return ``None`` when the loss's carried state no longer has the
        traced keys (the caller then builds anew)."""
        carried = self.traced.state_inputs(self.loss)
        if carried is None:
            return None
        # no autograd here: the inputs are detached aliases (and the data is the user's; a
        # data tensor that requires grad is refused)
        loss, ok, *new = self.compiled(*self.inputs, *data, *carried)
        # the new values are written back here, not inside the graph: AOTAutograd dropped
        # the graph's in-place writes to float64 inputs (torch 2.13)
        count = len(self.targets)
        if count:
            torch._foreach_copy_(self.targets, new[:count])
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
    shapes or non-tensor arguments compile a new step (bounded cache, with warnings).  The
    rest of what a graph assumes (which tensors are parameters and whether they require grad,
    tensors it holds as constants, ``pyro.module`` networks, the arguments' layout) is checked
    before every step (:mod:`pyro_elbo_ext.compiled.assumptions`); a parameter that does not
    require grad is read but not updated.  Python state outside tensors (a global flag the
    model reads) is invisible to the graph.  Building a step leaves the random generators as
    it found them, so a run restored from a checkpoint continues bit for bit.
    Checkpoints: :meth:`get_state` / :meth:`set_state` use :meth:`pyro.optim.PyroOptim.get_state`'s
    format, so ``svi.optim.set_state(compiled.get_state())`` continues under ``SVI``, and the
    optimizer passed in answers Pyro's recipe (``optim.get_state()``, ``save``, ``load``) with
    this step's state.

    On CUDA the step runs as a CUDA graph (Inductor's ``triton.cudagraphs``, what
    ``mode="reduce-overhead"`` sets); that path has not been run on a GPU yet (no device was
    available when it was written): only the CPU path is tested.
    """

    def __init__(self, model, guide, optim, loss):
        _check_loss(loss, model, guide)
        check_supported(optim)
        self.model, self.guide, self.optim, self.loss = model, guide, optim, loss
        adopt(optim, self)  # Pyro's optim.get_state() / save() / load() reach this step's state
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
        extra = list(step_inputs(self.loss))
        data = checked_data(data) + extra
        step = self._steps.lookup(key)
        if step is not None:
            stale = step.traced.stale(pyro.get_param_store()._params)
            if stale is None:
                result = step(data)
                if result is not None:
                    loss, ok = result
                    if not step.traced.guarded or bool(ok):
                        self._advance()
                        return torch_item(loss)
                    self._count_retrace(read_changed(step.traced), READ_ADVICE)
            elif stale[1]:
                self._count_retrace(stale[0], CONSTANT_ADVICE)
        else:
            warn_changed_numbers(key, self._steps, "CompiledSVI")
        start = time.perf_counter()
        step = self._build(args, kwargs, extra, data)
        self._steps.insert(key, step)
        loss, ok = step(data)  # the compiled graph takes the step: the trace's draws were
        # taken off the user's random stream, so a rebuilt step continues it exactly
        self.compile_seconds.append(time.perf_counter() - start)
        if not bool(ok):  # same arguments, parameters and state: the read is random
            raise random_read_error("CompiledSVI", step.traced, "pyro.infer.SVI")
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
        """Load optimizer state saved by :meth:`get_state` or ``PyroOptim.get_state``.

        A parameter's state is loaded now into the state of the tensor the step updates, and
        is also kept, as :meth:`pyro.optim.PyroOptim.set_state` keeps it, for a new tensor of
        that name: restoring the param store (``pyro.get_param_store().set_state``, before or
        after this call) puts new tensors there, and the step rebuilt for them continues from
        this state (an early-stopping rollback continues as the uninterrupted run would).
        """
        pending = self._pending()
        for name, saved in state.items():
            pending[name] = saved
            if name in self._states:
                param, old = self._states[name]
                optimizer = functional_optimizer(self.optim, param, saved)
                with torch.no_grad():
                    fresh = optimizer.optimizer.load(param, saved)
                    for key, value in old.items():  # the compiled steps hold these tensors
                        value.copy_(fresh[key])
                if optimizer != self._optimizers[name]:  # new hyper-parameters: new graphs
                    self._optimizers[name] = optimizer
                    self._steps.clear()

    # ------------------------------------------------------------------ building
    def _pending(self) -> dict:
        if self._waiting is None:  # take over the optimizer's state on first use
            self._waiting = dict(getattr(self.optim, "_state_waiting_to_be_consumed", {}))
            self._waiting.update(own_state(self.optim))
        return self._waiting

    def _state_for(self, name: str, param: torch.Tensor) -> dict:
        entry = self._states.get(name)
        if entry is not None and entry[0] is param:
            return entry[1]
        # a new tensor of this name: the state saved for the name (set_state), else fresh
        saved = self._pending().pop(name, None)
        optimizer = functional_optimizer(self.optim, param, saved)
        self._optimizers[name] = optimizer
        with torch.no_grad():
            state = (optimizer.optimizer.load(param, saved) if saved
                     else optimizer.optimizer.init_state(param))
        self._states[name] = (param, state)
        return state

    def _build(self, args, kwargs, extra, data) -> _Step:
        loss_fn, model, guide = self._loss_fn, self.model, self.guide
        traced = trace_loss_and_grad(lambda a, k: loss_fn(model, guide, a, k), args, kwargs,
                                     extra, self.loss, functions=(model, guide))
        trained = [(n, p) for n, p, t in zip(traced.names, traced.params, traced.trainable)
                   if t]
        states = [self._state_for(n, p) for n, p in trained]
        optimizers = [self._optimizers[n] for n, _ in trained]
        step = _Step(traced, optimizers, states, data, device_of(traced.params + data),
                     self.loss, self.eager_random)
        traced.built()
        return step

    def _count_retrace(self, reason: str, advice: str) -> None:
        self.retraces = count_retrace(self.retraces, MAX_RETRACES, "CompiledSVI", reason,
                                      advice, "pyro.infer.SVI")


__all__ = ["CompiledSVI"]
