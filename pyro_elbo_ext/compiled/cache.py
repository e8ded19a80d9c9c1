"""A bounded, least-recently-used cache of compiled graphs that says when it thrashes."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Hashable


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


def count_retrace(count: int, limit: int, who: str, where: str, fallback: str,
                  stacklevel: int) -> int:
    """Account for one retrace forced by a changed tensor read; returns the new count.

    Warns naming ``where`` (the lines whose reads changed) while ``count`` stays within
    ``limit``; beyond it raises a RuntimeError that says what to change (``fallback``: the
    eager alternative to name).
    """
    count += 1
    if count > limit:
        raise RuntimeError(
            f"{who}: the model or guide reads tensor values into Python ({where}) and they "
            f"changed {count} times, so the compiled graph keeps going stale. Make that "
            "control flow independent of tensor values (e.g. torch.where), pass the deciding "
            f"value as a non-tensor argument, or use {fallback}"
        )
    warnings.warn(
        f"{who}: a tensor value read into Python at {where} changed since the graph was "
        f"traced; the stale result was not used, retracing and recompiling ({count} of at "
        f"most {limit})",
        RuntimeWarning,
        stacklevel=stacklevel + 1,
    )
    return count
