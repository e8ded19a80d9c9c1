"""A bounded, least-recently-used cache of compiled graphs that says when it thrashes, and the
warnings and errors of a graph that keeps going stale (pointing at the user's line)."""

from __future__ import annotations

import os
import sys
import warnings
from collections import OrderedDict
from collections.abc import Hashable, Iterable

import pyro
import torch

from .trace import changed_numbers, number_hint


class BoundedCache(OrderedDict):
    """An LRU mapping that holds at most ``maxsize`` entries.

    Adding an entry to a full cache drops the least recently used one and warns with
    ``message`` (formatted with ``maxsize`` and ``evictions``, the count so far): a cache of
    compiled graphs that evicts is recompiling, usually because something that should stay the
    same from call to call (a callable, a shape, a non-tensor argument) does not.

    Parameters
    ----------
    maxsize : int
        Largest number of entries (>= 1).
    message : str
        The warning to give on each eviction.
    """

    def __init__(self, maxsize: int, message: str):
        super().__init__()
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError(f"the cache size must be an integer >= 1, got {maxsize!r}")
        self.maxsize = maxsize
        self.message = message
        self.evictions = 0

    def lookup(self, key: Hashable):
        """The entry for ``key`` (now the most recently used), or ``None``."""
        entry = self.get(key)
        if entry is not None:
            self.move_to_end(key)
        return entry

    def insert(self, key: Hashable, entry) -> None:
        """Add ``entry``, dropping the least recently used one (with a warning) if full."""
        self[key] = entry
        self.move_to_end(key)
        while len(self) > self.maxsize:
            self.popitem(last=False)
            self.evictions += 1
            warnings.warn(
                self.message.format(maxsize=self.maxsize, evictions=self.evictions),
                RuntimeWarning,
                stacklevel=3,
            )


def callable_key(*fns) -> tuple:
    """A cache key for callables: the callables themselves where hashable (bound methods of
    one object compare equal), else their ids (the cache entry keeps the callable alive, so an
    id is not reused while the entry exists)."""
    key = []
    for fn in fns:
        try:
            hash(fn)
            key.append(fn)
        except TypeError:
            key.append(("id", id(fn)))
    return tuple(key)


#: what to do about a read that keeps changing (the retrace warning's and error's advice)
READ_ADVICE = (
    "The model or guide reads tensor values into Python: make that control flow independent "
    "of tensor values (e.g. torch.where), or pass the deciding value as a non-tensor argument"
)


def read_changed(traced) -> str:
    """Why a graph with guarded reads (:mod:`.trace`) went stale."""
    return (f"a tensor value read into Python at {traced.where_read()} changed since the "
            "graph was traced")


def count_retrace(count: int, limit: int, who: str, reason: str, advice: str,
                  fallback: str) -> int:
    """Account for one retrace forced by something the graph assumed; returns the new count.

    Warns with ``reason`` (what changed) while ``count`` stays within ``limit``; beyond it
    raises a RuntimeError with ``advice`` (what to change) and ``fallback`` (the eager
    alternative to name).
    """
    count += 1
    if count > limit:
        raise RuntimeError(
            f"{who}: {reason} ({count} times), so the compiled graph keeps going stale. "
            f"{advice}, or use {fallback}"
        )
    warnings.warn(
        f"{who}: {reason}; the stale result was not used, retracing and recompiling ({count} "
        f"of at most {limit})",
        RuntimeWarning,
        stacklevel=user_stacklevel(),
    )
    return count


def random_read_error(who: str, traced, fallback: str) -> RuntimeError:
    """The error for a read that differs between a trace and the first call of its graph with
    the same arguments, parameters and state: it depends on random draws."""
    return RuntimeError(
        f"{who}: the tensor value read into Python at {traced.where_read()} differs between "
        "the trace and the first call of the compiled graph with the same arguments, "
        "parameters and state: it depends on random draws (e.g. subsample indices read with "
        ".tolist()), which no graph can freeze. Use the tensor itself instead of its values "
        f"in Python (index with it: data[idx], torch.index_select), or use {fallback}"
    )


def warn_changed_numbers(key, keys: Iterable, who: str) -> None:
    """Warn, at the first sight of ``key``, where only Python numbers tell it from one of
    ``keys`` (those seen before): say to pass them as 0-dim tensors."""
    changes = changed_numbers(key, keys)
    if changes:
        warnings.warn(f"{who}: {number_hint(changes)}", RuntimeWarning,
                      stacklevel=user_stacklevel())


_PACKAGE_DIRS = tuple(os.path.dirname(module.__file__) + os.sep for module in (torch, pyro)) + (
    os.path.dirname(os.path.dirname(__file__)) + os.sep,)


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning issued by this function's caller point at the
    first frame outside torch, Pyro and this package (the user's ``svi.step`` line)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIRS):
        frame, level = frame.f_back, level + 1
    return level
