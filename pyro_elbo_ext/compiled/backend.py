"""How a traced step is compiled: Inductor on the ATen graph, and a persistent cache.

Inductor keeps compiled graphs on disk (its FX graph cache and AOTAutograd cache, both on by
default in torch 2.13), so a second process that compiles the same graph loads it in a fraction
of the first compile's time.  Inductor's default cache directory lies under the system's
temporary directory; unless ``TORCHINDUCTOR_CACHE_DIR`` is set, :func:`compile_step` points it at
``~/.cache/pyro_elbo_ext/torchinductor`` (which survives a reboot) before the first trace
(importing ``make_fx`` makes Inductor fix its directory).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

#: where Inductor's on-disk caches go unless ``TORCHINDUCTOR_CACHE_DIR`` says otherwise
DEFAULT_CACHE_DIR = Path("~/.cache/pyro_elbo_ext/torchinductor").expanduser()

#: ``"inductor"``; ``None`` runs the traced step uncompiled (the ATen graph as Python), which
#: tests use to check the trace without paying for Inductor; any other ``torch.compile``
#: backend name (e.g. ``"aot_eager"``) compiles through Dynamo with that backend
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


def compile_step(graph: torch.fx.GraphModule, example_inputs: list, device: torch.device,
                 eager_random: bool = False) -> Callable:
    """Compile a traced step (an ATen graph) for inputs like ``example_inputs``.

    Inductor compiles the graph directly (``compile_fx``, what ``torch.compile`` calls after
    Dynamo): the graph is already a flat ATen trace, and the callers key their graphs on shapes,
    dtypes and parameters themselves, so Dynamo's bytecode tracing and its per-call guards
    (about half the cost of a small step) are not needed.  Compilation happens here, with
    torch's random state saved and restored around it and gradients off (the graph computes
    its own gradients).
    """
    if BACKEND is None:
        return graph
    if BACKEND != "inductor":
        return torch.compile(graph.forward, backend=BACKEND, fullgraph=True, dynamic=False)
    ensure_cache_dir()
    from torch._inductor.compile_fx import compile_fx

    devices = sorted({t.device.index or 0 for t in example_inputs if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        return compile_fx(graph, list(example_inputs),
                          config_patches=compile_options(device, eager_random))
