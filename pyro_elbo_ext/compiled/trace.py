"""Trace a loss and its gradient, parameters as explicit inputs, into one ATen graph.

:func:`trace_loss_and_grad` runs the loss once through Pyro's handlers under
:func:`torch.fx.experimental.proxy_tensor.make_fx` (``tracing_mode="real"``): every tensor
operation below autograd is recorded, including the backward pass of
:func:`torch.autograd.grad`, so the graph maps ``(parameters, data) -> (-L_hat, d(-L_hat)/dparams)``
and Pyro's Python (handlers, messages, plates) is gone from the hot path.  The unconstrained
parameter tensors of Pyro's param store are the graph's first inputs; because real-mode tracing
recognises a tensor by identity, a ``pyro.module`` network's weights (the same tensors as the
store's) become inputs too.  The call's tensors are traced as fresh contiguous copies, so that
each argument is its own input (the same tensor passed twice is two inputs) and a tensor the
model reads some other way (a global that happens to be the argument) is not mistaken for it.
Random draws are recorded as random operations, so the graph draws fresh noise on every call;
the runs that build a graph leave the user's random generators as they found them
(:mod:`.rng`), except where they create parameters.

What a graph cannot see, and how it is guarded
----------------------------------------------
* **Shapes, dtypes, devices and non-tensor arguments** are baked into the graph; they form the
  structure key (:func:`structure_key`) under which a graph is cached.
* **Python control flow on tensor values** (``if x.sum() > 0``, ``int(n)``, ``t.item()``,
  ``t.tolist()``, ``t.numpy()``) is followed once, at trace time.  Every such read (the
  dispatcher's ``aten._local_scalar_dense`` and ``aten.equal``; ``tolist``, ``numpy`` and
  ``__array__`` through a :class:`~torch.overrides.TorchFunctionMode`) is recorded with the line
  that made it; the graph also computes whether each read tensor still has the traced value
  (one boolean output), and the caller retraces (with a warning naming that line) when it does
  not, so a stale graph is never used silently.
* **Output shapes that depend on values** (boolean-mask indexing, ``nonzero``, ``unique``) are
  refused when traced, naming the operation and the line.
* **Everything else the graph assumes** (which tensors are parameters and whether they require
  grad, tensors read as constants, ``pyro.module`` networks) is recorded in a
  :class:`~pyro_elbo_ext.compiled.assumptions.GraphAssumptions`, checked before every call.

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
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field

import pyro
import pyro.poutine as poutine
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_unflatten

from .assumptions import (
    GraphAssumptions,
    ModuleRecorder,
    grad_message,
    name_constants,
    restore_buffers,
)
from .backend import ensure_cache_dir
from .rng import RngSnapshot, rng_preserved

_aten = torch.ops.aten
_LIBRARY_DIRS = tuple(
    os.path.dirname(module.__file__) + os.sep for module in (torch, pyro)
) + tuple(os.path.join(os.path.dirname(os.path.dirname(__file__)), sub) + os.sep
          for sub in ("compiled", "elbos"))


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


def changed_numbers(key: tuple, others: Iterable[tuple]) -> list[tuple]:
    """``(old, new)`` for each Python number argument that is all that tells ``key`` from one
    of ``others`` (empty when no such key): a number that changes from call to call compiles
    a new graph for every value."""
    if len(key) != 2 or not isinstance(key[1], tuple):
        return []
    layout, signature = key
    for other in others:
        if len(other) != 2 or other[0] != layout or len(other[1]) != len(signature):
            continue
        changes = []
        for old, new in zip(other[1], signature):
            if old == new:
                continue
            if not (_is_number_leaf(old) and _is_number_leaf(new)):
                break
            changes.append((old[1], new[1]))
        else:
            if changes:
                return changes
    return []


def _is_number_leaf(entry) -> bool:
    return (len(entry) == 2 and entry[0] in (int, float)  # not bool: a flag is structure
            and not isinstance(entry[1], bool))


def number_hint(changes: list[tuple]) -> str:
    """The warning for :func:`changed_numbers`: pass a 0-dim tensor."""
    listed = ", ".join(f"{old!r} -> {new!r}" for old, new in changes)
    return (
        f"a Python number argument changed since an earlier call ({listed}): each new value is "
        "baked into a new compiled graph (seconds to compile). Pass it as a 0-dim tensor "
        "(torch.tensor(value)): one graph then serves every value"
    )


@dataclass
class ScalarRead:
    """A tensor whose value Python read while the graph was traced.

    ``value`` is the Python number read (``item``, ``bool``, ``int``...), or, for a whole
    tensor read (``tolist``, ``numpy``), a copy of the tensor's value when read.
    """

    tensor: torch.Tensor
    value: object
    where: str


class DataDependentShapeError(RuntimeError):
    """The model or guide calls an operation whose output shape depends on tensor values."""


def _user_frame() -> str:
    """``file:line (function)`` of the innermost frame outside torch, Pyro and this package."""
    frames = traceback.extract_stack()[:-1]
    for frame in reversed(frames):
        if not frame.filename.startswith(_LIBRARY_DIRS):
            return f"{frame.filename}:{frame.lineno} ({frame.name})"
    frame = frames[-1]
    return f"{frame.filename}:{frame.lineno} ({frame.name})"


def _value_dependent_shape(func, args, kwargs) -> bool:
    """Whether this call of an op tagged ``dynamic_output_shape`` has an output whose shape
    depends on tensor values (integer indexing and an explicit class count do not)."""
    if torch.Tag.dynamic_output_shape not in func.tags:
        return False
    if func is _aten.index.Tensor:
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                   for i in args[1])
    if func is _aten.one_hot.default:
        classes = args[1] if len(args) > 1 else kwargs.get("num_classes", -1)
        return classes == -1
    if func is _aten.repeat_interleave.Tensor:
        return kwargs.get("output_size") is None
    return True


class _RecordScalarReads(TorchDispatchMode):
    """Record every tensor value that Python reads (``bool``, ``int``, ``item``, ``equal``),
    and refuse operations whose output shape depends on values."""

    def __init__(self, reads: list[ScalarRead]) -> None:
        super().__init__()
        self.reads = reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _aten._local_scalar_dense.default or func is _aten.equal.default:
            # make_fx refuses to read a traced tensor; read it outside the trace, and guard it
            with _disable_current_modes():
                out = func(*args, **kwargs)
            tensor = args[0] if func is _aten._local_scalar_dense.default else None
            if tensor is None and args[0].shape == args[1].shape:
                tensor = torch.eq(args[0], args[1]).all()
            if tensor is not None:
                self.reads.append(ScalarRead(tensor, out, _user_frame()))
            return out
        if _value_dependent_shape(func, args, kwargs):
            raise DataDependentShapeError(
                f"the model or guide calls {func} at {_user_frame()}, whose output's shape "
                "depends on tensor values (boolean-mask indexing such as data[~data.isnan()], "
                "nonzero, unique, masked_select): a compiled graph has fixed shapes. Keep the "
                "shape fixed: mask instead of selecting (pyro.poutine.mask(mask=...) or "
                "pyro.plate(...) with a mask, and torch.where to fill the masked-out values), "
                "or use jit=False / pyro.infer.SVI for this model"
            )
        return func(*args, **kwargs)


#: Tensor methods that read a whole tensor's values into Python without the dispatcher seeing
#: a read (``tolist``, ``numpy`` and NumPy's ``__array__`` protocol)
_VALUE_METHODS = frozenset({"tolist", "numpy", "__array__"})


class _RecordValueReads(TorchFunctionMode):
    """Record ``tolist()``, ``numpy()`` and ``numpy.asarray(tensor)`` reads, which the
    dispatcher does not see (they read the tensor's memory directly)."""

    def __init__(self, reads: list[ScalarRead], exclude: set[int]) -> None:
        super().__init__()
        self.reads = reads
        self.exclude = exclude  # the copies made here are not the user's constants

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", None) in _VALUE_METHODS and args \
                and isinstance(args[0], torch.Tensor):
            tensor = args[0]
            with _disable_current_modes():
                value = tensor.detach().clone()
            self.exclude.add(id(value))
            self.reads.append(ScalarRead(tensor, value, _user_frame()))
        return out


def _still_equal(read: ScalarRead) -> torch.Tensor:
    """A boolean tensor: does the read tensor still hold the traced value?"""
    tensor, value = read.tensor, read.value
    if isinstance(value, torch.Tensor):  # a whole tensor read: exactly the same values
        same = tensor == value
        if tensor.is_floating_point() or tensor.is_complex():
            same = same | (tensor.isnan() & value.isnan())
        return same.all()
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
        each parameter that requires grad (zeros where the loss does not depend on it), the new
        value of each carried state tensor (``state_keys``) and, when ``reads`` is not empty,
        one boolean: every value Python read during the trace is unchanged.
    names : list of str
        Param-store names of the parameter inputs, in input order (frozen ones included: they
        are inputs, so the graph reads their current values, but get no gradient).
    params : list of Tensor
        The unconstrained parameter tensors the graph was traced with (the store's leaves).
    reads : list of ScalarRead
        The tensor values Python read during the trace, with where.
    outputs : tuple of Tensor
        The trace's own outputs: the loss, gradient and new state of the traced call itself.
    state_keys : list
        The keys of the loss's carried state, in input (and output) order.
    assumptions : GraphAssumptions
        What the graph assumes beyond its inputs, checked before each call.
    buffers : list of (Tensor, Tensor)
        The ``pyro.module`` networks' buffers and their values before the build (undone by
        :meth:`built`).
    """

    graph: torch.fx.GraphModule
    names: list[str]
    params: list[torch.Tensor]
    reads: list[ScalarRead] = field(default_factory=list)
    outputs: tuple = ()
    state_keys: list = field(default_factory=list)
    assumptions: GraphAssumptions = None  # type: ignore[assignment]
    buffers: list = field(default_factory=list)

    def __post_init__(self):
        if self.assumptions is None:
            self.assumptions = GraphAssumptions(self.names, self.params)
        #: the parameters with a gradient output, in output order
        self.grad_params = [p for p, t in zip(self.params, self.trainable) if t]

    @property
    def guarded(self) -> bool:
        return bool(self.reads)

    @property
    def trainable(self) -> list[bool]:
        """Per parameter input: does it require grad (get a gradient output and an update)?"""
        return self.assumptions.trainable

    def built(self) -> None:
        """Call once every run of a build is done (the trace, and any trace of a larger step
        around it): the networks' buffers go back to their values before the build, so that
        the first compiled call updates them once, as an eager step does."""
        restore_buffers(self.buffers)
        self.buffers = []
        self.assumptions.refresh_versions()

    def where_read(self) -> str:
        """The lines whose tensor reads the graph guards (for warnings)."""
        return "; ".join(sorted({read.where for read in self.reads}))

    def stale(self, store_params: dict) -> tuple[str, bool] | None:
        """Why the graph no longer applies (and whether that counts as a retrace), or ``None``
        (see :meth:`GraphAssumptions.broken`)."""
        return self.assumptions.broken(store_params)

    def params_current(self, store_params: dict) -> bool:
        """Whether every assumption of the graph still holds (:meth:`stale` is ``None``)."""
        return self.assumptions.broken(store_params) is None

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
        start = 1 + len(self.grad_params)
        return dict(zip(self.state_keys, outputs[start: start + len(self.state_keys)]))


@contextmanager
def _paused(carrier):
    if carrier is None:
        yield
    else:
        with carrier.state_updates_paused():
            yield


def discover_params(loss_fn) -> tuple[list[str], list[torch.Tensor], ModuleRecorder]:
    """Run ``loss_fn`` once eagerly (creating and validating parameters); the ones it read.

    Returns the param-store names and unconstrained leaf tensors of every parameter read, in
    the order first read (those that do not require grad included), and what was recorded of
    the ``pyro.module`` networks (:class:`~pyro_elbo_ext.compiled.assumptions.ModuleRecorder`).
    """
    with poutine.trace(param_only=True) as capture, ModuleRecorder() as modules:
        loss_fn()
    names, leaves = [], []
    for name, site in capture.trace.nodes.items():
        names.append(name)
        leaves.append(site["value"].unconstrained())
    return names, leaves, modules


def _cuda_devices() -> list[int]:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return list(range(torch.cuda.device_count()))
    return []


def trace_loss_and_grad(loss_fn: Callable, args: tuple, kwargs: dict,
                        extra: Iterable[torch.Tensor] = (), carrier=None,
                        functions: Iterable = ()) -> TracedLossGrad:
    """Trace ``loss_fn(args, kwargs) -> -L_hat`` and its gradient into an ATen graph.

    Parameters
    ----------
    loss_fn : callable
        ``(args, kwargs) -> -L_hat``, the differentiable loss.
    args, kwargs
        The call's arguments.  Their tensors (in :func:`structure_key`'s order) become graph
        inputs after the parameters; the trace runs on contiguous copies of them.
    extra : iterable of Tensor
        Tensors the loss reads itself (its per-step inputs, e.g. a scheduled KL weight),
        inputs after the data, recognised by identity.
    carrier : loss, optional
        The loss whose carried state (``carried_state``, ``load_carried_state``,
        ``state_updates_paused``) enters and leaves the graph; its state is as before on
        return (the trace's own new state is in ``outputs``).
    functions : iterable of callable
        The model and guide: the global and closure names through which they read a tensor
        the graph holds as a constant are guarded (see :mod:`.assumptions`).

    Raises
    ------
    ValueError
        If a tensor among the arguments requires grad (its gradient would be dropped).
    RuntimeError
        If the loss reads a tensor that requires grad but is not in Pyro's param store (it
        would be frozen into the graph as a constant).
    DataDependentShapeError
        If an operation's output shape depends on tensor values.
    """
    leaves, spec = tree_flatten((args, kwargs))
    data = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
    for index, tensor in enumerate(data):
        if tensor.requires_grad:
            raise ValueError(grad_message(index, tensor))
    extra = list(extra)
    ensure_cache_dir()  # before make_fx, whose imports fix Inductor's cache directory
    devices = _cuda_devices()
    store = pyro.get_param_store()
    before, count = RngSnapshot(devices), len(store._params)
    with _paused(carrier):
        names, params, modules = discover_params(lambda: loss_fn(args, kwargs))
    if len(store._params) == count:  # no parameter created: the discovery drew nothing of use
        before.restore()
    trainable = [p for p in params if p.requires_grad]
    carried = carrier.carried_state() if carrier is not None else {}
    keys, state = list(carried), list(carried.values())

    # the trace reads contiguous copies of the arguments: each argument its own input
    copies = [t.detach().clone(memory_format=torch.contiguous_format) for t in data]
    copied = iter(copies)
    args_c, kwargs_c = tree_unflatten(
        [next(copied) if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves], spec)

    reads: list[ScalarRead] = []
    made_here: set[int] = set()
    outputs: list = []

    def loss_and_grad(*inputs):
        with _RecordScalarReads(reads), _RecordValueReads(reads, made_here):
            loss = loss_fn(args_c, kwargs_c)
            grads = (torch.autograd.grad(loss, trainable, allow_unused=True)
                     if trainable else ())
        result = (loss.detach(),) + tuple(
            torch.zeros_like(p) if g is None else g for p, g in zip(trainable, grads)
        )
        if keys:
            result = result + _new_state(carrier, keys)
        if reads:
            checks = [_still_equal(read) for read in reads]
            result = result + (torch.stack([c.reshape(()) for c in checks]).all(),)
        outputs[:] = [result]
        return result

    try:
        with pyro.validation_enabled(False), rng_preserved(devices):
            graph = make_fx(loss_and_grad, tracing_mode="real")(
                *params, *copies, *extra, *state)
    finally:
        if keys:  # the trace was not a step: its update is in outputs, not in the loss
            carrier.load_carried_state(dict(zip(keys, state)))
    constants, written = _graph_constants(graph, made_here)
    assumptions = GraphAssumptions(names, params, name_constants(constants, functions),
                                   modules.bindings, written)
    return TracedLossGrad(graph, names, params, reads, outputs[0], keys, assumptions,
                          modules.buffers)


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


def _graph_constants(graph: torch.fx.GraphModule, made_here: set[int]
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The tensors the graph holds as constants that existed before the trace (a literal such
    as ``torch.tensor(2.0)`` is created by the graph itself: ``lift_fresh_copy``), and those of
    them the graph writes into (a network's buffers, such as BatchNorm's running statistics).

    Raises a RuntimeError for a constant that requires grad (a parameter outside the param
    store, which a compiled step could not update).
    """
    constants, written, seen = [], [], set()
    for node in graph.graph.nodes:
        if node.op != "get_attr":
            continue
        value = getattr(graph, node.target, None)
        if not isinstance(value, torch.Tensor) or id(value) in made_here or id(value) in seen:
            continue
        users = list(node.users)
        if users and all(u.target is _aten.lift_fresh_copy.default for u in users):
            continue
        if any(_writes(u, node) for u in users):
            written.append(value)
        if value.requires_grad:
            raise RuntimeError(
                f"the loss reads a tensor of shape {tuple(value.shape)} that requires grad but "
                "is not in Pyro's param store, so a compiled step could not update it; "
                "register it with pyro.param or pyro.module (a network created anew on every "
                "call cannot be compiled)"
            )
        seen.add(id(value))
        constants.append(value)
    return constants, written


def _writes(user: torch.fx.Node, node: torch.fx.Node) -> bool:
    """Whether the operation ``user`` writes into its argument ``node`` in place: a mutable
    argument of its schema (``Tensor(a!)``), or a batch norm's running statistics (which
    ``native_batch_norm`` updates without saying so in its schema)."""
    schema = getattr(user.target, "_schema", None)
    if schema is None:
        return False
    given = dict(zip((a.name for a in schema.arguments), user.args))
    given.update(user.kwargs)
    for argument in schema.arguments:
        if given.get(argument.name) is not node:
            continue
        if argument.alias_info is not None and argument.alias_info.is_write:
            return True
        if argument.name in ("running_mean", "running_var"):
            return True
    return False
