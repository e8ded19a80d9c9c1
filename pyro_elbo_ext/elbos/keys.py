"""The keys of plans: a call's argument signature and its traces' structure.

A plan (:mod:`.plan`) is reused only where everything its decisions may depend on is the
same: the model and guide objects, :func:`argument_signature` of the call's arguments, and
:func:`trace_structure_key` of its traces.  Neither ever holds an object's ``id``: an argument
is summarized by its contents (or, where it cannot be, the call's plan is not kept).
"""

from __future__ import annotations

import dataclasses
import enum
import types
from typing import Any

import torch


def trace_structure_key(model_trace, guide_trace) -> tuple:
    """The trace structure: each sample site's name, observedness, distribution types
    (wrappers, then their base distributions), whether it is reparameterized, batch and event
    shapes, and plates (name, dimension, size), model sites then guide sites: everything the
    treatments and the structural validation checks depend on.

    Built at every step, in one flat tuple (``None`` closes each trace), with no call per
    site.  (Not to be confused with the compiled path's key of a call's arguments.)
    """
    key = []
    append = key.append
    for trace in (model_trace, guide_trace):
        for site in trace.nodes.values():
            if site["type"] != "sample":
                continue
            fn = site["fn"]
            types_ = [type(fn)]
            base = getattr(fn, "base_dist", None)
            while base is not None:
                types_.append(type(base))
                base = getattr(base, "base_dist", None)
            stack = site["cond_indep_stack"]
            append((site["name"], site["is_observed"], tuple(types_),
                    getattr(fn, "has_rsample", None),  # has_rsample_(False) is per instance
                    getattr(fn, "batch_shape", None),  # a _Subsample has no shapes
                    getattr(fn, "event_shape", None),
                    tuple([frame[:3] for frame in stack]) if stack else ()))  # name, dim, size
        append(None)
    return tuple(key)


class Unsummarizable(Exception):
    """An argument whose contents cannot be summarized for a plan key (see
    :func:`argument_signature`)."""


#: values that are their own signature (immutable, hashable by value)
_PLAIN = (bool, int, float, str, complex, bytes, type(None), torch.dtype, torch.device,
          enum.Enum)
#: objects keyed by identity: their behaviour is their code (kept alive by the plan cache)
_BY_IDENTITY = (types.FunctionType, types.BuiltinFunctionType, types.MethodType, type,
                types.ModuleType)
#: the most leaves a signature walks before the argument counts as unsummarizable
MAX_SIGNATURE_LEAVES = 256


def argument_signature(value) -> Any:
    """A hashable summary of a call's arguments, for the plan key; ``None`` if some argument
    cannot be summarized (the call then gets a plan that is not kept).

    Tensors by shape, dtype and device (their values may change from step to step without
    changing the structure); plain values by value; containers, dataclasses and plain objects
    by type and the signatures of their contents (so a mutated configuration object is a new
    key, and an object's id is never part of it); frozen values with their own hash
    (a frozen dataclass, a named tuple) by themselves; functions, classes and modules by
    identity.  An object whose contents cannot be read (no ``__dict__``, unhashable), or that
    holds more than :data:`MAX_SIGNATURE_LEAVES` values or itself, cannot be summarized.
    """
    if type(value) is tuple:  # the common case, a call's positional tensors: no walk
        signature = [tuple]
        for v in value:
            if type(v) is not torch.Tensor:
                break
            signature.append((v.shape, v.dtype, v.device))
        else:
            return tuple(signature)
    try:
        return _signature(value, [0], set())
    except Unsummarizable:
        return None


def _signature(value, count: list, active: set) -> Any:
    count[0] += 1
    if count[0] > MAX_SIGNATURE_LEAVES:
        raise Unsummarizable
    if isinstance(value, torch.Tensor):
        return (value.shape, value.dtype, value.device)  # torch.Size is hashable
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, _BY_IDENTITY):
        return value
    marker = id(value)
    if marker in active:  # a cycle
        raise Unsummarizable
    active.add(marker)
    try:
        if isinstance(value, (tuple, list)):
            return (type(value), *[_signature(v, count, active) for v in value])
        if isinstance(value, dict):
            return (type(value), tuple((_signature(k, count, active),
                                        _signature(v, count, active))
                                       for k, v in value.items()))
        if isinstance(value, (set, frozenset)):
            return (type(value), frozenset(_signature(v, count, active) for v in value))
        shape = getattr(value, "shape", None)  # an array: like a tensor
        if isinstance(shape, tuple) and hasattr(value, "dtype"):
            return (type(value), shape, str(value.dtype))
        if dataclasses.is_dataclass(value):
            return (type(value), tuple((f.name, _signature(getattr(value, f.name), count,
                                                           active))
                                       for f in dataclasses.fields(value)))
        own_hash = type(value).__hash__
        if own_hash is not None and own_hash is not object.__hash__:
            try:
                hash(value)
                return value  # a value with its own hash (e.g. a named tuple): itself
            except TypeError:
                pass
        state = getattr(value, "__dict__", None)
        if state is None:
            raise Unsummarizable
        return (type(value), _signature(state, count, active))
    finally:
        active.discard(marker)


__all__ = ["MAX_SIGNATURE_LEAVES", "Unsummarizable", "argument_signature",
           "trace_structure_key"]
