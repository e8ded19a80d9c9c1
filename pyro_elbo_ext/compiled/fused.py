"""The fused run: many SVI steps per compiled call (:meth:`CompiledSVI.run`).

A compiled step (:class:`~pyro_elbo_ext.compiled.svi._Step`) is one ATen graph
``(params, optimizer state, data, carried state) -> (loss, guard, new params, new state, new
carried state)``.  :func:`chain` joins ``K`` copies of that graph, each copy's new parameters,
optimizer state and carried state feeding the next, into one graph that returns the ``K``
losses and the final values; Inductor compiles it once, and a call takes ``K`` steps.  What a
call saves is the per-call overhead of a step (Python, the graph's entry, writing the new
values back), which on small models is most of a step's time: NumPyro's ``SVI.run`` saves it
the same way, with ``lax.scan`` over its jitted update.

The chained graph is built from the step's graph by graph surgery (no second trace), and
computes exactly what ``K`` calls of the step compute: the same operations in the same order,
with the random draws in the same order (as ATen: from torch's generator in sequence; under
Inductor, whose Philox draws are seeded from torch's generator once per call, ``K`` steps
take the ``K`` seeds that ``K`` calls of the step would).  The kernels that call the chained
graph's code are C++ (Inductor's ``cpp_wrapper``), which keeps the cost per step of a long
chain to the arithmetic.  Steps that do not fit a chain run as :meth:`CompiledSVI.step` calls:
the first step (it builds the step graph), the remainder of ``num_steps`` after whole
chains, eager steps, steps whose graph guards a Python read of a tensor (a chain cannot
retrace in the middle), and a loss whose inputs change every step (a scheduled KL weight).
"""

from __future__ import annotations

import time

import torch
from torch.fx import Graph, GraphModule

from .._extras import require
from .adapter import advance_step, step_inputs
from .backend import compile_step
from .trace import structure_key

#: steps per compiled call unless ``steps_per_call`` says otherwise
DEFAULT_STEPS_PER_CALL = 16
#: have Inductor write the code that calls a chain's kernels in C++ (see the module)
CPP_WRAPPER = True

_aten = torch.ops.aten


def chain(graph: GraphModule, steps: int, n_inputs: int, n_data: int,
          target_positions: list[int]) -> GraphModule:
    """``steps`` copies of a whole-step graph, each feeding the next.

    Parameters
    ----------
    graph : GraphModule
        ``(*inputs, *data, *carried) -> (loss, guard, *new_targets, *new_carried)``, where
        ``new_targets[j]`` is the new value of ``inputs[target_positions[j]]``.
    steps : int
        How many copies (>= 1).
    n_inputs, n_data : int
        How many of the graph's inputs are parameters and optimizer state, and data; the rest
        are carried state.
    target_positions : list of int
        The position among ``inputs`` of each value a step writes.

    Returns
    -------
    GraphModule
        ``(*inputs, *data, *carried) -> (losses, *final_targets, *final_carried)``:
        ``losses[k]`` the loss of step ``k`` (before its update).
    """
    if steps < 1:
        raise ValueError(f"a chain needs at least one step, got {steps}")
    new = Graph()
    old_placeholders = [node for node in graph.graph.nodes if node.op == "placeholder"]
    current = []
    for node in old_placeholders:
        placeholder = new.placeholder(node.name)
        placeholder.meta.update(node.meta)
        current.append(placeholder)
    first_carried = n_inputs + n_data
    losses = []
    for _ in range(steps):
        outputs = new.graph_copy(graph.graph, dict(zip(old_placeholders, current)))
        loss, _guard, *rest = outputs
        losses.append(loss)
        for position, value in zip(target_positions, rest):
            current[position] = value
        current[first_carried:] = rest[len(target_positions):]
    stacked = new.call_function(_aten.stack.default, (losses,))
    finals = [current[position] for position in target_positions] + current[first_carried:]
    new.output((stacked, *finals))
    module = GraphModule(graph, new)
    module.graph.eliminate_dead_code()
    module.recompile()
    return module


class Chain:
    """A compiled chain of ``steps`` steps of one compiled step (see :func:`chain`)."""

    def __init__(self, step, steps: int, data: list[torch.Tensor]):
        self.step, self.steps = step, steps
        start = time.perf_counter()
        graph = chain(step.graph, steps, len(step.inputs), step.n_data, step.target_positions)
        carried = step.traced.state_inputs(step.loss) or []
        self.compiled = compile_step(graph, step.inputs + list(data) + carried, step.device,
                                     step.eager_random, cpp_wrapper=CPP_WRAPPER)
        #: seconds the chain took to build and compile
        self.compile_seconds = time.perf_counter() - start

    def __call__(self, data: list[torch.Tensor]) -> torch.Tensor | None:
        """Take ``steps`` steps; their losses, or ``None`` when the loss's carried state no
        longer has the traced keys."""
        step = self.step
        carried = step.traced.state_inputs(step.loss)
        if carried is None:
            return None
        losses, *new = self.compiled(*step.inputs, *data, *carried)
        step.write_back(new, carried)
        return losses


def default_steps_per_call(num_steps: int) -> int:
    """:data:`DEFAULT_STEPS_PER_CALL`, or fewer for a short run (a chain's compile grows with
    its length)."""
    return max(1, min(DEFAULT_STEPS_PER_CALL, num_steps // 4))


def _fusable(svi, key) -> object | None:
    """The compiled step a chain can be built from, or None (see the module)."""
    if svi._delegate is not None or step_inputs(svi.traced_loss):
        return None
    step = svi._steps.get(key)
    if step is None or step.traced.guarded:
        return None
    return step


def run_steps(svi, num_steps: int, args: tuple, kwargs: dict, steps_per_call: int | None,
              progress_bar: bool) -> torch.Tensor:
    """:meth:`CompiledSVI.run`'s body (see there)."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"num_steps must be an integer >= 0, got {num_steps!r}")
    if steps_per_call is not None and (isinstance(steps_per_call, bool) or not isinstance(
            steps_per_call, int) or steps_per_call < 1):
        raise ValueError(f"steps_per_call must be an integer >= 1, got {steps_per_call!r}")
    bar = None
    if progress_bar:
        tqdm = require("tqdm", "compare", "CompiledSVI.run's progress bar")
        bar = tqdm.tqdm(total=num_steps, desc="CompiledSVI.run")
    parts: list[torch.Tensor] = []
    done = 0
    try:
        if num_steps:
            parts.append(torch.tensor([svi.step(*args, **kwargs)]))  # builds the step
            done = 1
            if bar is not None:
                bar.update(1)
        key, data = structure_key(args, kwargs)
        steps = steps_per_call or default_steps_per_call(num_steps)
        step = _fusable(svi, key) if steps > 1 else None
        while step is not None and num_steps - done >= steps:
            if not step.traced.params_current(_store()):
                break
            fused = svi._fused.get((key, steps))
            if fused is None or fused.step is not step:
                fused = svi._fused[(key, steps)] = Chain(step, steps, data)
                svi.compile_seconds.append(fused.compile_seconds)
            losses = fused(data)
            if losses is None:
                break
            for _ in range(steps):
                advance_step(svi.traced_loss)
            parts.append(losses.detach().clone())
            done += steps
            if bar is not None:
                bar.update(steps)
                bar.set_postfix(loss=float(losses[-1]))
        while done < num_steps:
            parts.append(torch.tensor([svi.step(*args, **kwargs)]))
            done += 1
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if not parts:
        return torch.zeros(0)
    dtype = next((p.dtype for p in parts if p.is_floating_point() and p.numel() > 1),
                 torch.get_default_dtype())
    return torch.cat([p.to(dtype=dtype, device="cpu") for p in parts])


def _store() -> dict:
    import pyro

    return pyro.get_param_store()._params


__all__ = ["CPP_WRAPPER", "Chain", "DEFAULT_STEPS_PER_CALL", "chain",
           "default_steps_per_call", "run_steps"]
