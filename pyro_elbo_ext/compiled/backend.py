"""How a traced step is compiled: Inductor on the ATen graph, its caches, and its warnings.

* **Inductor's on-disk caches.**  Inductor keeps compiled graphs on disk (its FX graph cache
  and AOTAutograd cache, both on by default in torch 2.13), so a second process that compiles
  the same graph loads it in a fraction of the first compile's time.  Inductor's default cache
  directory lies under the system's temporary directory; unless ``TORCHINDUCTOR_CACHE_DIR`` is
  set, :func:`compile_step` points it at ``~/.cache/pyro_elbo_ext/torchinductor`` (which
  survives a reboot) before the first trace (importing ``make_fx`` makes Inductor fix its
  directory).
* **The vector-ISA probe** (:mod:`.vec_isa`): Inductor's first compile in a process with an
  empty cache spends seconds compiling test programs to learn which vector instructions the
  compiler and CPU support; the answer is kept in ``~/.cache/pyro_elbo_ext/vec_isa.json`` and
  reused while the machine, compiler and torch are the same.
* **Random numbers** (:func:`native_random`): a standard-normal draw traced from Pyro
  (``torch.empty(shape).normal_()``) is rewritten as ``torch.randn(shape)``, the same numbers
  when run as ATen, which Inductor generates inside its kernels (Philox, seeded from torch's
  generator once per call) instead of calling torch's kernel from Python per draw.
* **Warnings**: Inductor's lowering of some operations warns from inside torch (a
  ``FutureWarning`` that ``torch._prims_common.check`` is deprecated, for the Cholesky-based
  guides); such warnings of torch's own are not the user's concern and are filtered while
  compiling, and only there (:func:`quiet_compilation`).
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from . import vec_isa

#: where Inductor's on-disk caches go unless ``TORCHINDUCTOR_CACHE_DIR`` says otherwise
DEFAULT_CACHE_DIR = Path("~/.cache/pyro_elbo_ext/torchinductor").expanduser()

#: ``"inductor"``; ``None`` runs the traced step uncompiled (the ATen graph as Python), which
#: tests use to check the trace without paying for Inductor; any other ``torch.compile``
#: backend name (e.g. ``"aot_eager"``) compiles through Dynamo with that backend
BACKEND: str | None = "inductor"

#: warnings that torch's own compilation machinery gives and a user cannot act on:
#: ``(category, message regex, module regex)``, filtered while (and only while) a graph is
#: compiled: Inductor's lowering calls a deprecated check (the Cholesky-based guides), and
#: importing Inductor defines TorchScript methods (``torch.utils.mkldnn``)
TORCH_INTERNAL_WARNINGS = (
    (FutureWarning, r".*torch\._prims_common\.check\W* is deprecated", ""),
    (DeprecationWarning, "", r"torch\."),
)

_aten = torch.ops.aten


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


@contextmanager
def quiet_compilation() -> Iterator[None]:
    """Filter :data:`TORCH_INTERNAL_WARNINGS` while a graph compiles (a user running with
    warnings as errors never sees torch's internal deprecations), nothing else."""
    with warnings.catch_warnings():
        for category, message, module in TORCH_INTERNAL_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category,
                                    module=module)
        yield


def native_random(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``graph`` whose standard-normal draws are ``aten.randn`` (see the module).

    ``x = aten.empty(shape, ...); aten.normal_(x)`` with no other use of ``x`` becomes
    ``aten.randn(shape, ...)``: as ATen the same numbers from the same generator; under
    Inductor a draw it generates inside the kernel that uses it.
    """
    graph = copy.deepcopy(graph)
    changed = False
    for node in list(graph.graph.nodes):
        if node.target is not _aten.normal_.default or node.kwargs or len(node.args) != 1:
            continue
        source = node.args[0]
        if (getattr(source, "target", None) is not _aten.empty.memory_format
                or len(source.users) != 1 or source.kwargs.get("memory_format") not in (
                    None, torch.contiguous_format)):
            continue
        options = {key: source.kwargs[key] for key in ("dtype", "device")
                   if key in source.kwargs}
        with graph.graph.inserting_before(node):
            draw = graph.graph.call_function(_aten.randn.default, (source.args[0],), options)
        draw.meta.update(node.meta)
        node.replace_all_uses_with(draw)
        graph.graph.erase_node(node)
        graph.graph.erase_node(source)
        changed = True
    if changed:
        graph.recompile()
    return graph


def compile_step(graph: torch.fx.GraphModule, example_inputs: list, device: torch.device,
                 eager_random: bool = False, cpp_wrapper: bool = False) -> Callable:
    """Compile a traced step (an ATen graph) for inputs like ``example_inputs``.

    Inductor compiles the graph directly (``compile_fx``, what ``torch.compile`` calls after
    Dynamo): the graph is already a flat ATen trace, and the callers key their graphs on shapes,
    dtypes and parameters themselves, so Dynamo's bytecode tracing and its per-call guards
    (about half the cost of a small step) are not needed.  Compilation happens here, with
    torch's random state saved and restored around it, gradients off (the graph computes
    its own gradients) and torch's internal warnings filtered (:func:`quiet_compilation`).
    ``cpp_wrapper`` has Inductor write the code that calls the kernels in C++ rather than
    Python (less overhead per call and per kernel, a longer compile: the fused run uses it).
    """
    if BACKEND is None:
        return graph
    if BACKEND != "inductor":
        return torch.compile(graph.forward, backend=BACKEND, fullgraph=True, dynamic=False)
    ensure_cache_dir()
    with quiet_compilation():  # importing Inductor defines deprecated TorchScript methods
        from torch._inductor.compile_fx import compile_fx

    options = compile_options(device, eager_random)
    if not eager_random:
        graph = native_random(graph)
    if cpp_wrapper:
        options["cpp_wrapper"] = True
        for node in graph.graph.nodes:  # Inductor takes the example inputs, not the trace's
            if node.op == "placeholder":  # own fake values, for the C++ wrapper's signature
                node.meta.pop("val", None)
    devices = sorted({t.device.index or 0 for t in example_inputs if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), torch.no_grad(), quiet_compilation(), \
            vec_isa.probe_cached():
        return compile_fx(graph, list(example_inputs), config_patches=options)


def compile_loop(loop: Callable, device: torch.device, eager_random: bool = False) -> Callable:
    """Compile a function that runs a step graph inside torch's ``while_loop`` (the fused run).

    ``torch.compile`` (Dynamo, then Inductor with the kernel-calling code in C++, so the loop
    itself runs in C++) compiles on the first call; torch's internal warnings are filtered and
    the vector-ISA probe is answered from its record as in :func:`compile_step`.  Random state
    is not forked: the first call runs the loop, whose draws are the user's.
    """
    if BACKEND is None:
        return loop
    if BACKEND != "inductor":
        return torch.compile(loop, backend=BACKEND, fullgraph=True, dynamic=False)
    ensure_cache_dir()
    options = compile_options(device, eager_random)
    options.pop("triton.cudagraphs", None)  # a loop's graph is not captured as a CUDA graph
    if device.type == "cpu":
        options["cpp_wrapper"] = True
    compiled = torch.compile(loop, backend="inductor", fullgraph=True, dynamic=False,
                             options=options)

    def call(*args):
        with quiet_compilation(), vec_isa.probe_cached():
            return compiled(*args)

    return call
