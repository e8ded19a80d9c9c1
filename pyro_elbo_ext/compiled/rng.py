"""Graph building off the user's random stream.

Building a compiled step runs the model and guide several times (the eager run that finds the
parameters, the trace of loss and gradient, the trace of the whole step), and each run draws
random numbers.  If those draws came from the user's generators, a run restored from a
checkpoint (parameters, optimizer state, ``pyro.set_rng_seed`` or
``torch.set_rng_state``) would rebuild its step and so continue on a shifted stream: right in
distribution, but not the uninterrupted run's trajectory.  :func:`rng_preserved` puts the
generators back after a build, so that only the compiled calls consume the user's stream, as
an uninterrupted run's do.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch


def cuda_devices(tensors: Iterable[torch.Tensor]) -> list[int]:
    """The CUDA device indices among ``tensors`` (whose generators a build may draw from)."""
    return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})


class RngSnapshot:
    """The states of the generators :func:`pyro.set_rng_seed` seeds: torch's (CPU and the
    given CUDA devices), Python's :mod:`random` and, when NumPy is loaded, NumPy's global one.
    """

    def __init__(self, devices: Iterable[int] = ()):
        self.devices = list(devices)
        self.torch = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in self.devices]
        self.python = random.getstate()
        numpy = sys.modules.get("numpy")
        self.numpy = numpy.random.get_state() if numpy is not None else None

    def restore(self) -> None:
        """Put every generator back to the snapshot's state."""
        torch.set_rng_state(self.torch)
        for device, state in zip(self.devices, self.cuda):
            torch.cuda.set_rng_state(state, device)
        random.setstate(self.python)
        if self.numpy is not None:
            sys.modules["numpy"].random.set_state(self.numpy)


@contextmanager
def rng_preserved(devices: Iterable[int] = ()) -> Iterator[None]:
    """Run the body, then put the user's random generators back (:class:`RngSnapshot`)."""
    snapshot = RngSnapshot(devices)
    try:
        yield
    finally:
        snapshot.restore()
