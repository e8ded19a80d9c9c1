"""How a traced step is handed to ``torch.compile``: one graph, no recompiles, a persistent cache.

Inductor keeps compiled graphs on disk (its FX graph cache and AOTAutograd cache, both on by
default in torch 2.13), so a second process that compiles the same graph loads it in a fraction
of the first compile's time.  Inductor's default cache directory lies under the system's
temporary directory; unless ``TORCHINDUCTOR_CACHE_DIR`` is set, :func:`compile_step` points it at
``~/.cache/pyro_elbo_ext/torchinductor`` (which survives a reboot) the first time it compiles.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

#: where Inductor's on-disk caches go unless ``TORCHINDUCTOR_CACHE_DIR`` says otherwise
DEFAULT_CACHE_DIR = Path("~/.cache/pyro_elbo_ext/torchinductor").expanduser()

#: the ``torch.compile`` backend; ``None`` runs the traced step uncompiled (the ATen graph as
#: Python), which tests use to check the trace without paying for Inductor
BACKEND: str | None = "inductor"


def ensure_cache_dir() -> str:
    """The directory of Inductor's on-disk caches, set to :data:`DEFAULT_CACHE_DIR` if unset."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(DEFAULT_CACHE_DIR)
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


def compile_options(device: torch.device, eager_random: bool = False) -> dict:
    """Inductor options for a step on ``device``.

    On CUDA the step runs as a CUDA graph (``triton.cudagraphs``, what ``mode="reduce-overhead"``
    sets), which removes the per-kernel launch cost.  ``eager_random`` makes Inductor call
    torch's own random kernels (``fallback_random``), so the compiled step draws exactly the
    numbers the eager loss would; by default Inductor draws its own (Philox) numbers, seeded
    from torch's generator, so the same ``pyro.set_rng_seed`` still gives the same trajectory.
    """
    options: dict = {}
    if device.type == "cuda":
        options["triton.cudagraphs"] = True
    if eager_random:
        options["fallback_random"] = True
    return options


def warm_up(compiled: Callable, *inputs, grad_enabled: bool = False) -> None:
    """Compile now by calling ``compiled`` once on ``inputs``, with torch's random state saved
    and restored around it: whether compilation consumes random numbers depends on what it
    finds in its caches, and it must not shift the trajectory of a seeded run.  ``compiled``
    must not write into its inputs.  ``grad_enabled`` is the grad mode of the calls to come
    (``torch.compile`` guards on it)."""
    devices = sorted({t.device.index or 0 for t in inputs
                      if isinstance(t, torch.Tensor) and t.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), torch.set_grad_enabled(grad_enabled):
        compiled(*inputs)


def compile_step(fn: Callable, device: torch.device, eager_random: bool = False) -> Callable:
    """``torch.compile`` of a traced step: one graph (``fullgraph``), static shapes.

    A :class:`torch.fx.GraphModule` is compiled through its ``forward`` (a plain function
    call at run time, without ``nn.Module.__call__``'s hook handling on every step).
    """
    if isinstance(fn, torch.nn.Module):
        fn = fn.forward
    if BACKEND is None:
        return fn
    if BACKEND != "inductor":
        return torch.compile(fn, backend=BACKEND, fullgraph=True, dynamic=False)
    ensure_cache_dir()
    options = compile_options(device, eager_random)
    if not options:  # options, even empty, patch Inductor's config around every call
        return torch.compile(fn, fullgraph=True, dynamic=False)
    return torch.compile(fn, fullgraph=True, dynamic=False, options=options)
