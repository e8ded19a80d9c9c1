"""What a compiled graph assumes beyond its structure key, checked before every call.

A traced graph (:mod:`.trace`) is a pure function of its inputs: the parameters, the call's
tensors, the loss's per-step inputs and carried state.  Everything else it was traced with is
baked in, and is valid only while it stays as it was.  :class:`GraphAssumptions` records those
things when the graph is traced, and :meth:`GraphAssumptions.broken` checks them before every
call (the graph is rebuilt, or the call refused, when one no longer holds):

* **the parameters**: the param store still holds, under each traced name, the tensor the graph
  takes as input, with the same ``requires_grad`` (a frozen parameter gets no gradient and no
  update; freezing or unfreezing retraces) and the same storage (``param.data = ...`` or
  ``module.to(...)`` swaps it);
* **tensors read as constants** (a global, a closure's tensor, a frozen layer that is not in the
  param store): unchanged in place (their version counter), still not requiring grad, and, where
  the model or guide reads them by a global or closure name, that name still holds them;
* **pyro.module networks**: each network still holds the param store's tensors (a layer replaced
  after ``pyro.module`` registered it would be computed with by the eager loss, and trained by
  no optimizer);
* **the call's tensors** (:func:`checked_data`): none requires grad (its gradient would be
  dropped: refused), and each is contiguous (a transposed view or a column slice is copied to the
  layout the graph was compiled for).

Shapes, dtypes, devices and non-tensor arguments are the structure key itself
(:func:`.trace.structure_key`); Python reads of tensor values are guarded inside the graph
(:mod:`.trace`).  The check runs on every step, so it is a few attribute reads per parameter,
constant and data tensor.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field

import pyro
import torch
from pyro.poutine.messenger import Messenger

#: outcome of a check that needs a rebuild and a warning that counts towards the retrace limit
COUNTED = True
#: outcome of a check that needs a silent rebuild (the user changed the parameters on purpose)
SILENT = False


@dataclass
class Constant:
    """A tensor the graph holds as a constant (it existed before the trace and is no input).

    Attributes
    ----------
    tensor : Tensor
        The tensor itself (the graph holds it too).
    version : int
        Its version counter when traced (in-place writes increase it).
    names : list of (dict, str)
        Global namespaces (a function's ``__globals__``) and names in them through which the
        model or guide reads this tensor.
    cells : list of (cell, str)
        Closure cells (and the variable's name) holding this tensor.
    """

    tensor: torch.Tensor
    version: int
    names: list = field(default_factory=list)
    cells: list = field(default_factory=list)

    def describe(self) -> str:
        named = [name for _, name in self.names] + [name for _, name in self.cells]
        shape = f"a tensor of shape {tuple(self.tensor.shape)}"
        return f"{shape} read through {', '.join(repr(n) for n in named)}" if named else shape


@dataclass
class ModuleBinding:
    """A ``pyro.module`` network's parameter that is the param store's tensor ``name``."""

    name: str
    root: torch.nn.Module
    path: tuple[str, ...]
    tensor: torch.Tensor


class GraphAssumptions:
    """What one traced graph assumes about the world outside its inputs (module docstring).

    Parameters
    ----------
    names : list of str
        Param-store names of the graph's parameter inputs.
    params : list of Tensor
        The store's unconstrained tensors under those names, in input order.
    constants : list of Constant
        Tensors the graph holds as constants.
    bindings : list of ModuleBinding
        The ``pyro.module`` networks' parameters.
    """

    def __init__(self, names: list[str], params: list[torch.Tensor],
                 constants: list[Constant] = (), bindings: list[ModuleBinding] = (),
                 written: list[torch.Tensor] = ()):
        self.names = list(names)
        self.params = list(params)
        self.trainable = [bool(p.requires_grad) for p in self.params]
        self._param_checks = [(n, p, p.requires_grad, p.data_ptr())
                              for n, p in zip(self.names, self.params)]
        self.constants = list(constants)
        self.bindings = list(bindings)
        # the graph's own in-place writes (a network's buffers) change these as eagerly
        self.written = {id(t) for t in written}
        self._constant_checks = [(c.tensor, c.version) for c in self.constants
                                 if id(c.tensor) not in self.written]
        self._name_checks = [(namespace, name, c.tensor) for c in self.constants
                             for namespace, name in c.names]
        self._cell_checks = [(cell, name, c.tensor) for c in self.constants
                             for cell, name in c.cells]
        # one walk per submodule, then each of its parameters
        owners: dict = {}
        for b in self.bindings:
            owners.setdefault((id(b.root), b.path[:-1]), (b.root, b.path[:-1], []))[2].append(
                (b.path[-1], b.tensor, b.name))
        self._binding_checks = list(owners.values())

    def broken(self, store_params: dict) -> tuple[str, bool] | None:
        """``None`` while every assumption holds; else why not, and whether the rebuild counts
        as a retrace (:data:`COUNTED`: warn, and refuse after too many) or is silent
        (:data:`SILENT`: the user changed parameters on purpose)."""
        get = store_params.get
        for name, param, requires_grad, pointer in self._param_checks:
            if get(name) is not param:
                return f"the param store holds a new tensor for {name!r}", SILENT
            if param.requires_grad is not requires_grad:
                return f"parameter {name!r} was frozen or unfrozen (requires_grad)", SILENT
            if param.data_ptr() != pointer:
                return f"parameter {name!r} was given new storage (.data or .to())", SILENT
        for tensor, version in self._constant_checks:
            if tensor._version != version:
                return self._constant_changed(tensor), COUNTED
            if tensor.requires_grad:
                return "a tensor the graph holds as a constant now requires grad", SILENT
        for namespace, name, tensor in self._name_checks:
            if namespace.get(name) is not tensor:
                return (f"the global {name!r} read by the model or guide names another object "
                        "than when the graph was traced"), COUNTED
        for cell, name, tensor in self._cell_checks:
            if cell.cell_contents is not tensor:
                return (f"the variable {name!r} that the model or guide reads from an "
                        "enclosing function names another object than when traced"), COUNTED
        for root, path, held in self._binding_checks:
            module = root
            for part in path:
                module = module._modules.get(part)
                if module is None:
                    break
            own = module._parameters if module is not None else {}
            for attr, tensor, name in held:
                if own.get(attr) is not tensor:
                    return (f"the pyro.module network no longer holds the param store's "
                            f"{name!r}"), SILENT
        return None

    def _constant_changed(self, tensor: torch.Tensor) -> str:
        for constant in self.constants:
            if constant.tensor is tensor:
                return (f"{constant.describe()}, which the graph holds as a constant (it is not "
                        "an argument), was changed in place since the graph was traced")
        return "a tensor the graph holds as a constant was changed in place"

    def refresh_versions(self) -> None:
        """Take the constants' current versions as the traced ones (after a build's own runs,
        which may write into a network's buffers)."""
        for constant in self.constants:
            constant.version = constant.tensor._version
        self._constant_checks = [(c.tensor, c.version) for c in self.constants
                                 if id(c.tensor) not in self.written]


#: what to do about a constant that changes (the advice of the retrace warning and error)
CONSTANT_ADVICE = (
    "Pass the tensor to the model and guide as an argument (a graph input) instead of reading "
    "it from a global, a closure or an object"
)


def checked_data(data: list[torch.Tensor]) -> list[torch.Tensor]:
    """The call's tensors as the graph takes them: refused if one requires grad, copied to a
    contiguous layout where one is not contiguous (a transposed view, a column slice).

    Raises
    ------
    ValueError
        For a tensor that requires grad: a compiled step gives gradients for the param store's
        parameters only, so its gradient would be silently dropped.
    """
    for tensor in data:  # the common case: nothing to do
        if tensor.requires_grad or not tensor.is_contiguous():
            break
    else:
        return data
    copied = list(data)
    for index, tensor in enumerate(data):
        if tensor.requires_grad:
            raise ValueError(grad_message(index, tensor))
        if not tensor.is_contiguous():
            copied[index] = tensor.contiguous()
    return copied


def grad_message(index: int, tensor: torch.Tensor) -> str:
    return (
        f"argument tensor {index} (of shape {tuple(tensor.shape)}) requires grad: a compiled "
        "loss gives gradients for Pyro's parameters only, so its gradient would be dropped; "
        "pass it detached, or make it a pyro.param, or use jit=False / pyro.infer.SVI"
    )


# ---------------------------------------------------------------- finding constants' names
def _functions_of(fn) -> list[types.FunctionType]:
    """The Python functions behind a model or guide (bound methods, partials, callables)."""
    found = []
    for candidate in (fn, getattr(fn, "__func__", None), getattr(fn, "func", None),
                      vars(type(fn)).get("forward"), vars(type(fn)).get("__call__")):
        candidate = getattr(candidate, "__func__", candidate)
        if isinstance(candidate, types.FunctionType):
            found.append(candidate)
    return found


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):  # nested functions, lambdas, comprehensions
            names |= _code_names(const)
    return names


def _reachable_functions(roots, depth: int = 3) -> list[types.FunctionType]:
    """``roots`` and the global functions they call, ``depth`` calls deep."""
    seen: dict[int, types.FunctionType] = {}
    frontier = [f for root in roots for f in _functions_of(root)]
    for _ in range(depth + 1):
        next_frontier = []
        for fn in frontier:
            if id(fn) in seen or _in_library(fn):
                continue
            seen[id(fn)] = fn
            namespace = fn.__globals__
            for name in _code_names(fn.__code__):
                value = namespace.get(name)
                if isinstance(value, types.FunctionType):
                    next_frontier.append(value)
            for cell in fn.__closure__ or ():
                try:
                    value = cell.cell_contents
                except ValueError:  # an empty cell
                    continue
                if isinstance(value, types.FunctionType):
                    next_frontier.append(value)
        frontier = next_frontier
    return list(seen.values())


def _in_library(fn: types.FunctionType) -> bool:
    """Functions of torch, Pyro and this package: their names are not the user's to rebind."""
    return (fn.__module__ or "").split(".")[0] in ("torch", "pyro", "pyro_elbo_ext")


def name_constants(tensors: list[torch.Tensor], functions) -> list[Constant]:
    """A :class:`Constant` for each tensor, with the global and closure names through which
    ``functions`` (the model and guide, and the functions they call) read it."""
    constants = [Constant(t, t._version) for t in tensors]
    if not constants:
        return constants
    by_id = {id(c.tensor): c for c in constants}
    for fn in _reachable_functions(functions):
        namespace = fn.__globals__
        for name in _code_names(fn.__code__):
            constant = by_id.get(id(namespace.get(name)))
            if constant is not None and (namespace, name) not in constant.names:
                constant.names.append((namespace, name))
        for var, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
            try:
                constant = by_id.get(id(cell.cell_contents))
            except ValueError:
                continue
            if constant is not None:
                constant.cells.append((cell, var))
    return constants


# ---------------------------------------------------------------- pyro.module networks
_MODULE_CODE = pyro.primitives.module.__code__


class ModuleRecorder(Messenger):
    """Records, while the parameters are discovered, which ``pyro.module`` network holds each
    parameter, and refuses a network whose layer was replaced after registration.

    ``pyro.module(name, network)`` registers each parameter with ``pyro.param``; where the store
    already holds another tensor under that name (the layer was replaced), Pyro keeps the
    store's tensor and, unless ``update_module_params=True``, the network computes with its new
    layer, which is not in the store and which no optimizer steps.  The network is found in
    ``pyro.module``'s frame (its argument ``nn_module``); where it is not found, nothing is
    recorded.
    """

    def __init__(self) -> None:
        super().__init__()
        self.bindings: list[ModuleBinding] = []
        self._roots: set[int] = set()
        #: each network's buffers and their values before its first forward in the discovery
        #: run (a build runs the model several times; :func:`restore_buffers` undoes its
        #: updates of running statistics, so that a step updates them once, as eagerly)
        self.buffers: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _pyro_post_param(self, msg) -> None:
        frame = sys._getframe(1)
        while frame is not None and frame.f_code is not _MODULE_CODE:
            frame = frame.f_back
        if frame is None:
            return
        local = frame.f_locals
        root, path = local.get("nn_module"), local.get("param_name")
        own, module_name = local.get("param_value"), local.get("name")
        value = msg["value"]
        if not isinstance(root, torch.nn.Module) or not isinstance(path, str):
            return
        if id(root) not in self._roots:  # pyro.module runs before the network's forward
            self._roots.add(id(root))
            with torch.no_grad():
                self.buffers.extend((b, b.detach().clone()) for b in root.buffers())
        stored = value.unconstrained() if hasattr(value, "unconstrained") else value
        if own is not None and own is not stored and not local.get("update_module_params"):
            raise RuntimeError(
                f"pyro.module({module_name!r}, ...): the network's parameter {path!r} is not the "
                f"param store's {msg['name']!r}, a layer replaced after the network was "
                "registered. Pyro keeps the store's old tensor, which the optimizer steps, "
                "while the network computes with the new layer, which no optimizer steps. "
                f"Delete the old entries (del pyro.get_param_store()[{msg['name']!r}], and so "
                "on for the layer's other parameters) so that the new layer is registered, or "
                "pass update_module_params=True to put the store's tensors back into the "
                "network"
            )
        self.bindings.append(ModuleBinding(msg["name"], root, tuple(path.split(".")), stored))


def restore_buffers(buffers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Put the ``pyro.module`` networks' buffers back to their values before a build (see
    :attr:`ModuleRecorder.buffers`)."""
    with torch.no_grad():
        for buffer, value in buffers:
            if not torch.equal(buffer, value):
                buffer.copy_(value)
