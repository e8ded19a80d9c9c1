"""Trace a loss and its gradient, parameters as explicit inputs, into one ATen graph.

:func:`trace_loss_and_grad` runs the loss once through Pyro's handlers under
:func:`torch.fx.experimental.proxy_tensor.make_fx` (``tracing_mode="real"``): every tensor
operation below autograd is recorded, including the backward pass of
:func:`torch.autograd.grad`, so the graph maps ``(parameters, data) -> (-L_hat, d(-L_hat)/dparams)``
and Pyro's Python (handlers, messages, plates) is gone from the hot path.  The unconstrained
parameter tensors of Pyro's param store and the tensors among the call's arguments are the
graph's inputs; because real-mode tracing recognises a tensor by identity, a ``pyro.module``
network's weights (the same tensors as the store's) become inputs too.  Random draws are
recorded as random operations, so the graph draws fresh noise on every call.

What a graph cannot see, and how it is guarded
----------------------------------------------
* **Shapes, dtypes, devices and non-tensor arguments** are baked into the graph; they form the
  structure key (:func:`structure_key`) under which a graph is cached.
* **Python control flow on tensor values** (``if x.sum() > 0``, ``int(n)``, ``t.item()``) is
  followed once, at trace time.  Every such read (``aten._local_scalar_dense``, ``aten.equal``)
  is recorded with the line that made it; the graph also computes whether each read tensor
  still has the traced value (one boolean output), and the caller retraces (with a warning naming
  that line) when it does not, so a stale graph is never used silently.  Reads the dispatcher
  does not see (``tolist()``, ``numpy()``) are not guarded.
* **Parameters created later** (a model whose parameter set changes) show up as a missing
  or reshaped parameter, and the caller retraces.

State the loss carries from step to step
----------------------------------------
A loss with a learning signal (a moving-average or learned baseline, a reward normalizer)
exposes its state as tensors (``carried_state()``) that its updates replace rather than write
into.  The trace takes them as inputs after the data and returns their new values after the
gradient, so the graph is a pure map ``(params, data, state) -> (loss, grads, new_state)``; the
caller hands the new state back to the loss (``load_carried_state``).  The run that discovers
the parameters pauses the updates (it is not a step), and the trace's own update is undone.
"""

from __future__ import annotations

import math
import os
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field

import pyro
import pyro.poutine as poutine
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

from .backend import ensure_cache_dir

_aten = torch.ops.aten
_LIBRARY_DIRS = tuple(
    os.path.dirname(module.__file__) + os.sep for module in (torch, pyro)
) + (os.path.dirname(__file__) + os.sep,)


def structure_key(args: tuple, kwargs: dict) -> tuple[tuple, list[torch.Tensor]]:
    """The part of a call that a traced graph bakes in, and the call's tensors.

    Returns
    -------
    key : tuple
        Hashable: the argument tree's layout, each tensor's shape, dtype and device, and each
        non-tensor leaf's value (a new value is a new graph).
    tensors : list of Tensor
        The tensors among ``args`` and ``kwargs``, in order: the graph's data inputs.
    """
    if not kwargs and all(type(a) is torch.Tensor for a in args):  # the common case, fast
        return tuple((a.shape, a.dtype, a.device) for a in args), list(args)
    leaves, spec = tree_flatten((args, kwargs))
    signature, tensors = [], []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            tensors.append(leaf)
            signature.append((leaf.shape, leaf.dtype, leaf.device))
            continue
        try:
            hash(leaf)
        except TypeError:
            raise TypeError(
                f"a compiled loss cannot key its graph on an argument of type "
                f"{type(leaf).__name__} (unhashable, not a tensor): pass tensors, numbers, "
                "strings, or lists/tuples/dicts of them"
            ) from None
        signature.append((type(leaf), leaf))
    return (str(spec), tuple(signature)), tensors


@dataclass
class ScalarRead:
    """A tensor whose value Python read while the graph was traced."""

    tensor: torch.Tensor
    value: object
    where: str


def _user_frame() -> str:
    """``file:line (function)`` of the innermost frame outside torch, Pyro and this package."""
    frames = traceback.extract_stack()[:-3]
    for frame in reversed(frames):
        if not frame.filename.startswith(_LIBRARY_DIRS):
            return f"{frame.filename}:{frame.lineno} ({frame.name})"
    frame = frames[-1]
    return f"{frame.filename}:{frame.lineno} ({frame.name})"


class _RecordScalarReads(TorchDispatchMode):
    """Record every tensor value that Python reads (``bool``, ``int``, ``item``, ``equal``)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[ScalarRead] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _aten._local_scalar_dense.default or func is _aten.equal.default:
            # make_fx refuses to read a traced tensor; read it outside the trace, and guard it
            with _disable_current_modes():
                out = func(*args, **(kwargs or {}))
            tensor = args[0] if func is _aten._local_scalar_dense.default else None
            if tensor is None and args[0].shape == args[1].shape:
                tensor = torch.eq(args[0], args[1]).all()
            if tensor is not None:
                self.reads.append(ScalarRead(tensor, out, _user_frame()))
            return out
        return func(*args, **(kwargs or {}))


def _still_equal(read: ScalarRead) -> torch.Tensor:
    """A boolean tensor: does the read tensor still hold the traced value?"""
    tensor, value = read.tensor, read.value
    if tensor.is_floating_point() or tensor.is_complex():
        tolerance = 1e-6 * abs(value) if math.isfinite(abs(value)) else 0.0
        return ((tensor - value).abs() <= tolerance) | (tensor == value)
    return tensor == value


@dataclass
class TracedLossGrad:
    """An ATen graph ``(*params, *data, *state) -> (loss, *grads, *new_state[, guard])`` and
    what it was traced on.

    Attributes
    ----------
    graph : torch.fx.GraphModule
        The traced loss and gradient.  Its outputs are ``-L_hat`` (detached), the gradient for
        each parameter (zeros where the loss does not depend on it), the new value of each
        carried state tensor (``state_keys``) and, when ``reads`` is not empty, one boolean:
        every value Python read during the trace is unchanged.
    names : list of str
        Param-store names of the parameter inputs, in input order.
    params : list of Tensor
        The unconstrained parameter tensors the graph was traced with (the store's leaves).
    reads : list of ScalarRead
        The tensor values Python read during the trace, with where.
    outputs : tuple of Tensor
        The trace's own outputs: the loss, gradient and new state of the traced call itself.
    state_keys : list
        The keys of the loss's carried state, in input (and output) order.
    """

    graph: torch.fx.GraphModule
    names: list[str]
    params: list[torch.Tensor]
    reads: list[ScalarRead] = field(default_factory=list)
    outputs: tuple = ()
    state_keys: list = field(default_factory=list)

    @property
    def guarded(self) -> bool:
        return bool(self.reads)

    def where_read(self) -> str:
        """The lines whose tensor reads the graph guards (for warnings)."""
        return "; ".join(sorted({read.where for read in self.reads}))

    def params_current(self, store_params: dict) -> bool:
        """Whether the param store still holds the traced parameter tensors."""
        get = store_params.get
        for name, param in zip(self.names, self.params):
            if get(name) is not param:
                return False
        return True

    def state_inputs(self, carrier) -> list[torch.Tensor] | None:
        """The carrier's current state tensors in the graph's order; ``None`` when its keys are
        not the traced ones (a site appeared or went: the graph is stale)."""
        if not self.state_keys:
            return []
        state = carrier.carried_state()
        if len(state) != len(self.state_keys):
            return None
        try:
            return [state[key] for key in self.state_keys]
        except KeyError:
            return None

    def new_state(self, outputs) -> dict:
        """The new carried state among a call's ``outputs``."""
        start = 1 + len(self.params)
        return dict(zip(self.state_keys, outputs[start: start + len(self.state_keys)]))


@contextmanager
def _paused(carrier):
    if carrier is None:
        yield
    else:
        with carrier.state_updates_paused():
            yield


def discover_params(loss_fn) -> tuple[list[str], list[torch.Tensor]]:
    """Run ``loss_fn`` once eagerly (creating and validating parameters); the ones it used.

    Returns the param-store names and unconstrained leaf tensors of every parameter read,
    in the order first read.
    """
    with poutine.trace(param_only=True) as capture:
        loss_fn()
    names, leaves = [], []
    for name, site in capture.trace.nodes.items():
        leaf = site["value"].unconstrained()
        if leaf.requires_grad:
            names.append(name)
            leaves.append(leaf)
    return names, leaves


def trace_loss_and_grad(loss_fn, data: list[torch.Tensor], carrier=None) -> TracedLossGrad:
    """Trace ``loss_fn() -> -L_hat`` and its gradient into an ATen graph.

    Parameters
    ----------
    loss_fn : callable
        No arguments; returns the differentiable loss.  It reads its data from the tensors in
        ``data`` (the same objects), which become graph inputs after the parameters.
    data : list of Tensor
        The call's tensors (see :func:`structure_key`).
    carrier : loss, optional
        The loss whose carried state (``carried_state``, ``load_carried_state``,
        ``state_updates_paused``) enters and leaves the graph; its state is as before on
        return (the trace's own new state is in ``outputs``).

    Raises
    ------
    ValueError
        If a tensor in ``data`` requires grad (its gradient would be dropped).
    RuntimeError
        If the loss reads a tensor that requires grad but is not in Pyro's param store (it
        would be frozen into the graph as a constant).
    """
    for tensor in data:
        if tensor.requires_grad:
            raise ValueError(
                f"an argument tensor of shape {tuple(tensor.shape)} requires grad: a compiled "
                "loss gives gradients for Pyro's parameters only; pass it detached, or make it "
                "a pyro.param, or use jit=False / pyro.infer.SVI"
            )
    ensure_cache_dir()  # before make_fx, whose imports fix Inductor's cache directory
    with _paused(carrier):
        names, params = discover_params(loss_fn)
    carried = carrier.carried_state() if carrier is not None else {}
    keys, state = list(carried), list(carried.values())
    recorder = _RecordScalarReads()
    outputs: list = []

    def loss_and_grad(*inputs):
        with recorder:
            loss = loss_fn()
            grads = torch.autograd.grad(loss, params, allow_unused=True) if params else ()
        result = (loss.detach(),) + tuple(
            torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)
        )
        if keys:
            result = result + _new_state(carrier, keys)
        if recorder.reads:
            checks = [_still_equal(read) for read in recorder.reads]
            result = result + (torch.stack([c.reshape(()) for c in checks]).all(),)
        outputs[:] = [result]
        return result

    try:
        with pyro.validation_enabled(False):
            graph = make_fx(loss_and_grad, tracing_mode="real")(*params, *data, *state)
    finally:
        if keys:  # the trace was not a step: its update is in outputs, not in the loss
            carrier.load_carried_state(dict(zip(keys, state)))
    _refuse_frozen_parameters(graph)
    return TracedLossGrad(graph, names, params, recorder.reads, outputs[0], keys)


def _new_state(carrier, keys: list) -> tuple:
    after = carrier.carried_state()
    if list(after) != keys:
        changed = sorted(set(map(str, after)) ^ set(map(str, keys)))
        raise RuntimeError(
            f"the loss's carried state changed its keys while tracing ({', '.join(changed)}): "
            "a learning-signal site appeared or went between two runs of the same structure; "
            "a compiled step needs the same attention sites on every call (use jit=False / "
            "pyro.infer.SVI for a model whose sites vary)"
        )
    return tuple(after[key].detach() for key in keys)


def _refuse_frozen_parameters(graph: torch.fx.GraphModule) -> None:
    for node in graph.graph.nodes:
        if node.op != "get_attr":
            continue
        value = getattr(graph, node.target, None)
        if isinstance(value, torch.Tensor) and value.requires_grad:
            raise RuntimeError(
                f"the loss reads a tensor of shape {tuple(value.shape)} that requires grad but "
                "is not in Pyro's param store, so a compiled step could not update it; "
                "register it with pyro.param or pyro.module (a network created anew on every "
                "call cannot be compiled)"
            )
