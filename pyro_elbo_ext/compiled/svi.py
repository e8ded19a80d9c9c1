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

Which loss is traced, and what runs eagerly instead, is decided by :mod:`.adapter`.  An
argument structure compiles once it has taken ``compile_after`` steps eagerly (a count, so the
step at which a run switches is the same in every run from the same seed; see
:class:`CompiledSVI`); :meth:`CompiledSVI.run` compiles at once and takes many steps per
compiled call (:mod:`.fused`).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Hashable

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.svi import SVI as PyroSVI  # bound at import: a patched pyro.infer.SVI
from pyro.infer.util import torch_item
from torch.fx.experimental.proxy_tensor import make_fx

from .adapter import (
    Adapted,
    adapt,
    advance_step,
    compile_refusal,
    eager_loss_fn,
    is_compilable,
    prepare_step_inputs,
    state_carrier,
    step_inputs,
    warn_eager,
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
from .optimizers import ParamOptimizer, apply_eagerly, check_supported, functional_optimizer
from .rng import cuda_devices, rng_preserved
from .trace import TracedLossGrad, structure_key, trace_loss_and_grad

_GRAPHS_MESSAGE = (
    "CompiledSVI: more than {maxsize} argument structures (shapes, dtypes, non-tensor "
    "arguments); dropping the oldest compiled step ({evictions} so far). Each new structure "
    "compiles anew: keep shapes fixed (e.g. pad minibatches) and pass changing numbers as "
    "tensors"
)

#: ``CompiledSVI(compile_after=...)``'s default: eager steps an argument structure takes before
#: it compiles.  About a quarter of the break-even number of steps measured on the digits VAE
#: (4,000-6,100, ``benchmarks/end_to_end.py``): a run shorter than this never waits for a
#: compile, and a long run pays for this many eager steps (about a quarter of one compile)
DEFAULT_COMPILE_AFTER = 1000

#: argument structures whose eager step count is remembered (the oldest is forgotten beyond)
MAX_EAGER_STRUCTURES = 256

#: refusals raised while a step is built that stand (raised, not run eagerly): where SVI's
#: own step would be wrong, not merely uncompilable (a ``pyro.module`` layer replaced after
#: registration: eagerly Pyro steps the old tensors while the network computes with the new)
STANDING_REFUSALS = ("a layer replaced after the network was registered",)


class _Step:
    """One compiled whole step and the tensors it reads and writes.

    The step (loss graph, the update of every parameter that requires grad, and the loss's
    carried state) is traced once more into a single ATen graph, on copies of the parameters,
    state and data, and that graph is compiled.  Inputs: parameters (frozen ones included:
    the graph reads them but does not update them), optimizer state, data, carried state;
    outputs: loss, guard, new trainable parameters, new optimizer state, new carried state.
    ``graph`` (the ATen graph of the whole step) is kept: the fused run (:mod:`.fused`) chains
    copies of it.
    """

    def __init__(self, traced: TracedLossGrad, optimizers: list[ParamOptimizer],
                 states: list[dict], data: list[torch.Tensor], device: torch.device, loss,
                 eager_random: bool = False):
        self.traced = traced
        self.loss = loss
        self.device = device
        self.eager_random = eager_random
        self.keys = [sorted(state) for state in states]
        # detached aliases (the same storage) of the parameters and state, written in place
        params = [t.detach() for t in traced.params]
        trained = [i for i, flag in enumerate(traced.trainable) if flag]
        state_inputs = [state[k].detach() for state, keys in zip(states, self.keys)
                        for k in keys]
        self.inputs = params + state_inputs
        self.targets = [params[i] for i in trained] + state_inputs  # what a step writes
        n, keys = len(params), self.keys
        #: the position among ``inputs`` of each target
        self.target_positions = trained + list(range(n, n + len(state_inputs)))
        n_inputs, n_data = len(self.inputs), len(data)
        self.n_data = n_data
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
        self.n_carried = len(carried)
        # copies throughout: real-mode tracing knows a tensor by identity, so the same tensor
        # passed as two arguments must not become one input
        copies = [t.detach().clone() for t in self.inputs + list(data) + carried]
        with torch.no_grad(), pyro.validation_enabled(False), rng_preserved(
                cuda_devices(copies)):
            self.graph = make_fx(whole_step, tracing_mode="real")(*copies)
        self.compiled = compile_step(self.graph, self.inputs + list(data) + carried, device,
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
        self.write_back(new, carried)
        return loss, ok

    def write_back(self, new, carried) -> None:
        """Copy a call's new parameters and optimizer state into their tensors, and hand the
        new carried state to the loss."""
        # the new values are written back here, not inside the graph: AOTAutograd dropped
        # the graph's in-place writes to float64 inputs (torch 2.13)
        count = len(self.targets)
        if count:  # a model without parameters has nothing to write
            torch._foreach_copy_(self.targets, list(new[:count]))
        if carried:
            fresh = new[count:]
            if fresh[0].is_cuda:  # a CUDA graph reuses its output buffers on the next call
                fresh = [t.clone() for t in fresh]
            self.loss.load_carried_state(dict(zip(self.traced.state_keys, fresh)))
            self.loss.report_carried_state()


class CompiledSVI:
    """Stochastic variational inference with the whole step compiled.

    The interface of :class:`pyro.infer.SVI`: ``step(*args, **kwargs)`` takes one step and
    returns the loss estimate (a float) before it, ``evaluate_loss`` estimates the loss
    without a step (eager); :meth:`run` takes many steps per compiled call.  The loss, its
    gradient and the optimizer's update run as one graph (Inductor, torch.compile's compiler;
    CUDA graphs on a GPU), built once per argument structure after its first
    ``compile_after`` steps, which run eagerly (a compile takes seconds; Inductor's on-disk
    cache makes later processes faster).

    Parameters
    ----------
    model, guide : callable
        As for :class:`pyro.infer.SVI`.
    optim : pyro.optim.PyroOptim
        ``pyro.optim.Adam``, ``ClippedAdam``, ``SGD``, ``RMSprop``, or a
        :class:`~pyro_elbo_ext.GroupedOptim` over one of them, with ``clip_args``, compile;
        with any other optimizer every step runs eagerly, as :class:`pyro.infer.SVI` runs it
        (one :class:`~pyro_elbo_ext.compiled.adapter.EagerFallbackWarning`).  Its state (e.g.
        after ``optim.set_state`` or steps of :class:`pyro.infer.SVI`) is taken over on the
        first step.
    loss : pyro.infer.elbo.ELBO
        Whatever :class:`pyro.infer.SVI` accepts (see :mod:`pyro_elbo_ext.compiled.adapter`):
        a loss of this package is traced itself (its ``jit`` flag is ignored); Pyro's
        ``Trace_ELBO``, ``TraceMeanField_ELBO``, ``TraceGraph_ELBO``, ``RenyiELBO(alpha=0)``
        and their ``Jit*`` forms as the loss of ours with the same estimator and settings;
        ``TraceEnum_ELBO`` through Pyro's own enumeration; anything else (and anything that
        cannot be traced faithfully) runs eagerly, exactly as under ``SVI``, with one warning
        naming the loss and the reason.  A learning signal's state (moving-average or learned
        baseline, normalizer) enters the graph as inputs and leaves it as outputs, and is
        handed back to the loss after every step (``loss.state_dict()`` stays current).
    compile_after : int, optional
        Steps an argument structure (the shapes, dtypes and non-tensor values of the step's
        arguments) takes eagerly before it compiles (default :data:`DEFAULT_COMPILE_AFTER`,
        1000; ``0`` compiles at its first step).  An eager step is the same update, from the
        same optimizer state, with the loss and gradient computed as ``SVI`` computes them.
        A compile takes seconds (4-15 s on a two-core CPU, less with Inductor's disk cache
        warm), more than a few hundred eager steps of most models: a run shorter than
        ``compile_after`` steps, and a structure seen rarely (a data loader's shorter last
        batch, a number that changes every call), never pay for one.  The switch is made on
        a count, not a clock, so a run from the same seed switches at the same step and
        follows the same trajectory every time.  A structure compiled once and dropped (the
        graph cache's bound, ``set_state`` with new hyper-parameters) recompiles at once;
        :meth:`run` compiles at once.

    Notes
    -----
    Random numbers are Inductor's, seeded from torch's generator: the same
    ``pyro.set_rng_seed`` gives the same trajectory, a different one than :class:`pyro.infer.SVI`
    draws (equal in distribution).  Python control flow on tensor values is guarded, and new
    shapes or non-tensor arguments compile a new step (bounded cache, with warnings; see
    ``recompile``).  The rest of what a graph assumes (which tensors are parameters and
    whether they require grad, tensors it holds as constants, ``pyro.module`` networks, the
    arguments' layout) is checked before every step (:mod:`pyro_elbo_ext.compiled.assumptions`);
    a parameter that does not require grad is read but not updated.  Python state outside
    tensors (a global flag the model reads) is invisible to the graph.  Building a step leaves
    the random generators as it found them, so a run restored from a checkpoint continues bit
    for bit.  Checkpoints: :meth:`get_state` / :meth:`set_state` use
    :meth:`pyro.optim.PyroOptim.get_state`'s format, so
    ``svi.optim.set_state(compiled.get_state())`` continues under ``SVI``, and the optimizer
    passed in answers Pyro's recipe (``optim.get_state()``, ``save``, ``load``) with this
    step's state.

    On CUDA the step runs as a CUDA graph (Inductor's ``triton.cudagraphs``, what
    ``mode="reduce-overhead"`` sets); that path has not been run on a GPU yet (no device was
    available when it was written): only the CPU path is tested.
    """

    def __init__(self, model, guide, optim, loss, *, compile_after: int | None = None):
        if compile_after is None:
            compile_after = DEFAULT_COMPILE_AFTER
        if isinstance(compile_after, bool) or not isinstance(compile_after, int) or (
                compile_after < 0):
            raise ValueError("compile_after must be an integer >= 0 (eager steps before an "
                             f"argument structure compiles; 0 compiles at once), got "
                             f"{compile_after!r}")
        self.model, self.guide, self.optim, self.loss = model, guide, optim, loss
        self.compile_after = compile_after
        self.adapted: Adapted = adapt(loss)
        #: the loss whose eager path is traced (the user's, or ours with the same estimator)
        self.traced_loss = self.adapted.traced
        self._warned: set[str] = set()
        #: every step delegated to pyro.infer.SVI (the loss or the optimizer cannot compile)
        self._delegate = None
        reason = self.adapted.reason
        if reason is None:
            try:
                check_supported(optim)
            except TypeError as error:
                reason = str(error).replace("Use pyro.infer.SVI for other optimizers", "")
        if reason is None:
            refusal = compile_refusal(self.traced_loss, model, guide)
            if refusal is not None:
                reason = f"{type(loss).__name__} cannot be compiled faithfully: {refusal}"
        if reason is not None:
            self._delegate = PyroSVI(model, guide, optim, loss)
            self._warn_eager(reason, stacklevel=2)
        else:  # Pyro's optim.get_state() / save() / load() reach this step's state
            adopt(optim, self)
        self._loss_fn = eager_loss_fn(self.traced_loss) if self.traced_loss is not None \
            else None
        self._steps = BoundedCache(MAX_GRAPHS, _GRAPHS_MESSAGE)
        self._states: dict[str, tuple[torch.Tensor, dict]] = {}  # name -> (param, state)
        self._optimizers: dict[str, ParamOptimizer] = {}
        self._waiting: dict[str, dict] | None = None
        #: argument structures that run eagerly: key -> eager steps taken so far (see
        #: ``compile_after``), or ``math.inf`` where compiling failed or is refused
        self._eager_structures: dict[Hashable, float] = {}
        self._compiled_keys: set[Hashable] = set()  # structures compiled at least once
        self._fused: dict = {}  # structure key -> compiled loop (fused run)
        self.retraces = 0
        #: compile with Inductor's ``fallback_random``: torch's own random kernels, so the
        #: step draws the numbers the eager loss would (tests)
        self.eager_random = False
        #: seconds each build took (trace and first compiled call), most recent last
        self.compile_seconds: list[float] = []
        #: seconds the first call of each fused loop took (its compile and its steps)
        self.fused_compile_seconds: list[float] = []

    # ------------------------------------------------------------------ SVI's interface
    def step(self, *args, **kwargs) -> float:
        """Take one step; returns the loss estimate at the parameters before it."""
        return self._take_step(args, kwargs)

    def _take_step(self, args: tuple, kwargs: dict, compile_now: bool = False) -> float:
        """:meth:`step`; ``compile_now``: a structure that may compile does so now, whatever
        its count (:meth:`run`)."""
        if self._delegate is not None:
            return self._delegate.step(*args, **kwargs)
        key, data = structure_key(args, kwargs)
        prepare_step_inputs(self.traced_loss)  # this step's scheduled values (a KL weight)
        extra = list(step_inputs(self.traced_loss))
        step = self._steps.lookup(key)
        if step is None and key not in self._eager_structures:  # first sight of it
            warn_changed_numbers(key, self._seen_keys(), "CompiledSVI")
        if step is None and not self._compiles_now(key, compile_now):
            return self._eager_step(key, args, kwargs)
        try:
            data = checked_data(data) + extra
        except ValueError as error:  # an argument that requires grad: SVI's step, this once
            return self._eager_step(key, args, kwargs, failed=str(error), remember=False)
        if step is not None:
            stale = step.traced.stale(pyro.get_param_store()._params)
            if stale is None:
                result = step(data)
                if result is not None:
                    loss, ok = result
                    if not step.traced.guarded or bool(ok):
                        return self._finish(loss)
                    self._count_retrace(read_changed(step.traced), READ_ADVICE)
            elif stale[1]:
                self._count_retrace(stale[0], CONSTANT_ADVICE)
        return self._build_and_step(key, args, kwargs, extra, data)

    def run(self, num_steps: int, *args, steps_per_call: int | None = None,
            unroll: int | None = None, progress_bar: bool = False, **kwargs) -> torch.Tensor:
        """Take ``num_steps`` steps with the same arguments, many per compiled call.

        The steps run inside one compiled loop (torch's ``while_loop``, compiled once per
        argument structure, its body ``unroll`` steps whose loss, gradient and update feed the
        next), up to ``steps_per_call`` steps per call.  A run is known to be long, so its
        first step compiles at once, whatever ``compile_after`` says: the same trajectory as
        ``num_steps`` calls of :meth:`step` from the same seed with ``compile_after=0`` (see
        :mod:`pyro_elbo_ext.compiled.fused`).  Where the loop does not apply (eager steps, a
        graph that guards Python reads, a scheduled loss input), and for the first step and
        the last ``< unroll`` ones, the steps are :meth:`step` calls.

        Parameters
        ----------
        num_steps : int
            Steps to take (>= 0).
        *args, **kwargs
            The model's and guide's arguments, as for :meth:`step`.
        steps_per_call : int, optional
            Most steps per compiled call (default 1024): the progress bar moves once per call.
        unroll : int, optional
            Steps per iteration of the compiled loop (default 4): more cuts the loop's
            overhead per step and lengthens its one compile.
        progress_bar : bool
            Show a ``tqdm`` progress bar, updated per call (tqdm is part of the ``compare``
            extra).

        Returns
        -------
        Tensor
            The ``num_steps`` loss estimates (each before its step), as :meth:`step` returns
            them one by one.
        """
        from .fused import run_steps

        return run_steps(self, num_steps, args, kwargs, steps_per_call, unroll, progress_bar)

    def evaluate_loss(self, *args, **kwargs) -> float:
        """The loss estimate at the current parameters, eager, without a step."""
        if self._delegate is not None:
            return self._delegate.evaluate_loss(*args, **kwargs)
        with torch.no_grad():
            loss = self.loss.loss(self.model, self.guide, *args, **kwargs)
            if isinstance(loss, tuple):
                return type(loss)(map(torch_item, loss))
            return torch_item(loss)

    # ------------------------------------------------------------------ checkpoints
    def get_state(self) -> dict:
        """The optimizer state, ``{param_name: torch state_dict}`` (``PyroOptim.get_state``)."""
        if self._delegate is not None:
            return self.optim.get_state()
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
        if self._delegate is not None:
            self.optim.set_state(state)
            return
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

    # ------------------------------------------------------------------ stepping
    def _finish(self, loss: torch.Tensor | float) -> float:
        """A step was taken: advance the loss's step count; the loss as a float."""
        advance_step(self.traced_loss)
        value = torch_item(loss)
        if math.isnan(value) and not is_compilable(self.loss):
            warnings.warn("Encountered NaN: loss", stacklevel=3)  # as Pyro's warn_if_nan
        return value

    def _seen_keys(self) -> list:
        """The argument structures compiled or stepped eagerly so far."""
        return [*self._steps.keys(), *self._eager_structures]

    def _compiles_now(self, key: Hashable, compile_now: bool = False) -> bool:
        """Whether a structure without a compiled step compiles now (see ``compile_after``):
        not one whose compile failed or was refused; one compiled before (its graph dropped:
        evicted, or cleared by ``set_state``), or ``compile_now``, or one that has taken
        ``compile_after`` eager steps."""
        taken = self._eager_structures.get(key, 0)
        if taken == math.inf:
            return False
        return compile_now or key in self._compiled_keys or taken >= self.compile_after

    def _build_and_step(self, key, args, kwargs, extra, data) -> float:
        start = time.perf_counter()
        try:
            step = self._build(args, kwargs, extra, data)
        except _Refused as refused:
            return self._eager_step(key, args, kwargs, failed=str(refused))
        except Exception as error:  # noqa: BLE001 -- whatever the trace could not follow
            if any(refusal in str(error) for refusal in STANDING_REFUSALS):
                raise
            return self._eager_step(key, args, kwargs,
                                    failed=f"{type(error).__name__}: {error}")
        self._steps.insert(key, step)
        self._compiled_keys.add(key)
        self._eager_structures.pop(key, None)
        loss, ok = step(data)  # the compiled graph takes the step: the trace's draws were
        # taken off the user's random stream, so a rebuilt step continues it exactly
        self.compile_seconds.append(time.perf_counter() - start)
        if not bool(ok):  # same arguments, parameters and state: the read is random (a
            # rejection sampler's loop, subsample indices read with .tolist()): no graph can
            # freeze it; the graph did not apply its update, SVI's step is taken instead
            self._steps.pop(key, None)
            error = random_read_error("CompiledSVI", step.traced, "pyro.infer.SVI")
            return self._eager_step(key, args, kwargs, failed=f"RuntimeError: {error}")
        return self._finish(loss)

    def _eager_step(self, key, args, kwargs, failed: str | None = None,
                    remember: bool = True) -> float:
        """One step without a compiled graph: the loss and its gradient eagerly (the user's
        Pyro ELBO as ``SVI`` runs it, or the eager path of a loss of ours), then this
        CompiledSVI's optimizer update from its own state.  ``failed``: why this structure
        could not be compiled (with ``remember`` it then always runs eagerly; one warning,
        after the step succeeded, so that an error of the model itself is raised as ``SVI``
        raises it)."""
        with poutine.trace(param_only=True) as capture:
            if is_compilable(self.loss) or self.adapted.traced is self.loss:
                value = self._loss_fn(self.model, self.guide, args, kwargs)
                if value.requires_grad:
                    value.backward()
                value = value.detach()
            else:
                value = self.loss.loss_and_grads(self.model, self.guide, *args, **kwargs)
        params = {name: site["value"].unconstrained()
                  for name, site in capture.trace.nodes.items()}
        with torch.no_grad():
            stepped = [(name, param) for name, param in params.items()
                       if param.grad is not None]
            states = [self._state_for(name, param) for name, param in stepped]  # (first: it
            # makes a new parameter's optimizer)
            apply_eagerly([(self._optimizers[name], param, param.grad, state)
                           for (name, param), state in zip(stepped, states)])
            for _, param in stepped:
                param.grad = torch.zeros_like(param.grad)  # as pyro.infer.util.zero_grads
        if failed is not None:
            if remember:
                self._eager_structures[key] = math.inf
            self._warn_eager(failed, what="this argument structure", stacklevel=3)
        elif remember and self._eager_structures.get(key) != math.inf:
            taken = self._eager_structures.pop(key, 0)  # re-inserted: the newest is last
            self._eager_structures[key] = taken + 1
            while len(self._eager_structures) > MAX_EAGER_STRUCTURES:  # a number that
                del self._eager_structures[next(iter(self._eager_structures))]  # changes
        return self._finish(value)

    def _warn_eager(self, reason: str, what: str = "every step", stacklevel: int = 2) -> None:
        if reason in self._warned:
            return
        self._warned.add(reason)
        warn_eager(type(self.loss).__name__, reason, what, stacklevel=stacklevel + 1)

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
        check = self.adapted.structure_check
        if check is not None:
            with rng_preserved(cuda_devices(data)):
                reason = check(self.model, self.guide, args, kwargs)
            if reason is not None:
                raise _Refused(reason)
        loss_fn, model, guide = self._loss_fn, self.model, self.guide
        carrier = state_carrier(self.traced_loss)
        traced = trace_loss_and_grad(lambda a, k: loss_fn(model, guide, a, k), args, kwargs,
                                     extra, carrier, functions=(model, guide))
        trained = [(n, p) for n, p, t in zip(traced.names, traced.params, traced.trainable)
                   if t]
        states = [self._state_for(n, p) for n, p in trained]
        optimizers = [self._optimizers[n] for n, _ in trained]
        step = _Step(traced, optimizers, states, data, device_of(traced.params + data),
                     self.traced_loss, self.eager_random)
        traced.built()
        return step

    def _count_retrace(self, reason: str, advice: str) -> None:
        self.retraces = count_retrace(self.retraces, MAX_RETRACES, "CompiledSVI", reason,
                                      advice, "pyro.infer.SVI")


class _Refused(Exception):
    """A structure the adapter says runs eagerly (not an error: its reason is warned once)."""


__all__ = ["DEFAULT_COMPILE_AFTER", "CompiledSVI"]
