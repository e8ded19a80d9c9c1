"""The fused run: many SVI steps per compiled call (:meth:`CompiledSVI.run`).

A compiled step (:class:`~pyro_elbo_ext.compiled.svi._Step`) is one ATen graph
``(params, optimizer state, data, carried state) -> (loss, guard, new params, new state, new
carried state)``.  Calling it costs, besides the arithmetic, a fixed overhead of some tens of
microseconds (Python, the compiled graph's entry, writing the new values back), which on a
small model is most of a step.  The fused run removes it the way NumPyro's ``SVI.run`` does
with ``lax.scan``: the steps run inside one compiled loop.

* :func:`chain` joins ``unroll`` copies of the step graph, each copy's new parameters,
  optimizer state and carried state feeding the next (graph surgery, no second trace);
* :class:`FusedLoop` puts that chain in the body of torch's loop operator
  (``torch._higher_order_ops.while_loop``), the number of iterations a tensor argument, and
  compiles it with ``torch.compile`` (Inductor, the code that calls the kernels written in
  C++: ``cpp_wrapper``), so one compile serves every run length and a call takes up to
  ``steps_per_call`` steps without returning to Python.

The loop computes exactly what as many calls of the step compute: the same operations in
the same order, and the same random numbers (Inductor seeds its in-kernel Philox draws from
torch's generator, one seed per random operation, drawn per call of the step and per
iteration of the loop alike: ``unroll`` steps take the seeds that ``unroll`` calls would).
Steps that do not fit run as :meth:`CompiledSVI.step` calls: the first step (it builds the
step graph), the ``num_steps % unroll`` left after whole iterations, eager steps, steps whose
graph guards a Python read of a tensor (a loop cannot retrace in the middle), and a loss whose
inputs change every step (a scheduled KL weight).
"""

from __future__ import annotations

import time

import torch
from torch.fx import Graph, GraphModule

from .._extras import require
from .adapter import advance_step, step_inputs
from .backend import compile_loop, native_random
from .trace import structure_key

#: steps unrolled in the loop's body unless ``unroll`` says otherwise (the body's compile
#: grows with it; the loop's overhead per step shrinks)
DEFAULT_UNROLL = 4
#: steps per compiled call unless ``steps_per_call`` says otherwise (the length of the
#: buffer of losses; a progress bar moves once per call)
DEFAULT_STEPS_PER_CALL = 1024

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
        ``losses[k]`` the loss of step ``k`` (before its update).  A final value that is an
        input unchanged is returned as a copy (a loop's carried values must not alias).
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
    placeholders = set(current)
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
    finals = [new.call_function(_aten.clone.default, (value,)) if value in placeholders
              else value for value in finals]
    new.output((stacked, *finals))
    module = GraphModule(graph, new)
    module.graph.eliminate_dead_code()
    module.recompile()
    return module


class FusedLoop:
    """Up to ``capacity`` steps of one compiled step per call, ``unroll`` per loop iteration.

    ``self(data, num_steps)`` takes ``num_steps`` steps (a multiple of ``unroll``, at most
    ``capacity``), writes the new parameters, optimizer state and carried state back as the
    step does, and returns the ``num_steps`` losses.
    """

    def __init__(self, step, unroll: int, capacity: int):
        from torch._higher_order_ops.while_loop import while_loop

        self.step, self.unroll = step, unroll
        self.capacity = capacity - capacity % unroll
        body = chain(step.graph, unroll, len(step.inputs), step.n_data, step.target_positions)
        if not step.eager_random:
            body = native_random(body)
        targets = step.target_positions
        kept = [i for i in range(len(step.inputs)) if i not in set(targets)]
        n_targets, n_inputs = len(targets), len(step.inputs)
        offsets = torch.arange(unroll)
        loss_dtype = _loss_dtype(step)

        def loop(iterations, written, fixed, data, carried):
            def condition(i, losses, *state):
                return i < iterations

            def iteration(i, losses, *state):
                inputs = [None] * n_inputs
                for position, value in zip(targets, state[:n_targets]):
                    inputs[position] = value
                for position, value in zip(kept, fixed):
                    inputs[position] = value
                out = body(*inputs, *data, *state[n_targets:])
                index = i * unroll + offsets.to(i.device)
                losses = losses.index_copy(0, index, out[0].to(losses.dtype))
                return (i + 1, losses, *out[1:])

            start = torch.zeros((), dtype=torch.int64, device=step.device)
            buffer = torch.zeros(self.capacity, dtype=loss_dtype, device=step.device)
            return while_loop(condition, iteration, (start, buffer, *written, *carried))

        self.kept = kept
        self.compiled = compile_loop(loop, step.device, step.eager_random)
        #: seconds the first call took (Dynamo and Inductor compile the loop there)
        self.first_call_seconds: float | None = None

    def __call__(self, data: list[torch.Tensor], num_steps: int) -> torch.Tensor | None:
        step = self.step
        carried = step.traced.state_inputs(step.loss)
        if carried is None:
            return None
        iterations = torch.tensor(num_steps // self.unroll, device=step.device)
        written = [t.clone() for t in step.targets]  # the loop's carried values, not aliases
        fixed = [step.inputs[i] for i in self.kept]
        start = time.perf_counter()
        with torch.no_grad():
            _, losses, *new = self.compiled(iterations, written, fixed, list(data),
                                            [t.clone() for t in carried])
        if self.first_call_seconds is None:
            self.first_call_seconds = time.perf_counter() - start
        step.write_back(new, carried)
        return losses[:num_steps].clone()


def _loss_dtype(step) -> torch.dtype:
    for tensor in step.inputs:
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.get_default_dtype()


def _fusable(svi, key) -> object | None:
    """The compiled step a loop can be built from, or None (see the module)."""
    if svi._delegate is not None or step_inputs(svi.traced_loss):
        return None
    step = svi._steps.get(key)
    if step is None or step.traced.guarded:
        return None
    return step


def _check_count(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def run_steps(svi, num_steps: int, args: tuple, kwargs: dict, steps_per_call: int | None,
              unroll: int | None, progress_bar: bool) -> torch.Tensor:
    """:meth:`CompiledSVI.run`'s body (see there)."""
    _check_count("num_steps", num_steps, 0)
    unroll = DEFAULT_UNROLL if unroll is None else unroll
    _check_count("unroll", unroll, 1)
    steps_per_call = DEFAULT_STEPS_PER_CALL if steps_per_call is None else steps_per_call
    _check_count("steps_per_call", steps_per_call, 1)
    bar = None
    if progress_bar:
        tqdm = require("tqdm", "compare", "CompiledSVI.run's progress bar")
        bar = tqdm.tqdm(total=num_steps, desc="CompiledSVI.run")
    parts: list[torch.Tensor] = []
    done = 0

    def one_step(compile_now=False):
        nonlocal done
        parts.append(torch.tensor([svi._take_step(args, kwargs, compile_now)],
                                  dtype=torch.float64))
        done += 1
        if bar is not None:
            bar.update(1)

    try:
        if num_steps:
            one_step(compile_now=True)  # builds the step graph (a run is long: at once)
        key, data = structure_key(args, kwargs)
        step = _fusable(svi, key)
        capacity = max(unroll, min(steps_per_call, num_steps) // unroll * unroll)
        while step is not None and num_steps - done >= unroll:
            if not step.traced.params_current(_store()):
                break
            loop = svi._fused.get(key)
            fresh = loop is None or loop.step is not step or loop.unroll != unroll or (
                loop.capacity < capacity)
            if fresh:
                loop = svi._fused[key] = FusedLoop(step, unroll, capacity)
            count = min(loop.capacity, (num_steps - done) // unroll * unroll)
            losses = loop(data, count)
            if losses is None:
                break
            if fresh:
                svi.fused_compile_seconds.append(loop.first_call_seconds)
            for _ in range(count):
                advance_step(svi.traced_loss)
            parts.append(losses.to(torch.float64))
            done += count
            if bar is not None:
                bar.update(count)
                bar.set_postfix(loss=float(losses[-1]))
        while done < num_steps:
            one_step()
    finally:
        if bar is not None:
            bar.close()
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def _store() -> dict:
    import pyro

    return pyro.get_param_store()._params


__all__ = ["DEFAULT_STEPS_PER_CALL", "DEFAULT_UNROLL", "FusedLoop", "chain", "run_steps"]
