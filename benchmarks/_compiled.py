"""Contestants of the compiled path for ``benchmarks.speed``.

- :func:`compiled_svi_step`: :class:`pyro_elbo_ext.CompiledSVI` (loss, gradient and optimizer
  update in one Inductor graph);
- :func:`torchscript_jit`: a loss with ``jit=True`` as it was before the compiled path
  (``pyro.ops.jit.trace`` of the eager loss: TorchScript), to measure the new ``jit=True``
  against what it replaced;
- :func:`numpyro_run_step`: NumPyro's ``SVI.run`` loop (``lax.scan`` over ``svi.update``,
  compiled by XLA), ``steps_per_call`` steps per call.
"""

from __future__ import annotations

import types
import warnings
import weakref

import pyro
import pyro.ops.jit
from pyro.infer.util import torch_item

from ._common import StepFn

#: NumPyro steps per call of the ``SVI.run`` contestant (the time is reported per step)
RUN_STEPS = 200


def compiled_svi_step(elbo, model, guide, args, optim) -> StepFn:
    """One :class:`~pyro_elbo_ext.CompiledSVI` step as a closure."""
    from pyro_elbo_ext import CompiledSVI

    svi = CompiledSVI(model, guide, optim, elbo, compile_after=0)  # the compiled step's speed
    return lambda: svi.step(*args)


def _legacy_compiled_loss(self, model, guide, args, kwargs):
    """The body of ``SiteTreatmentELBO._compiled_loss`` before the compiled path (TorchScript)."""
    cache = self.__dict__.setdefault("_torchscript", {})
    key = (id(model), id(guide))
    compiled = cache.get(key)
    if compiled is None:
        weak_self = weakref.ref(self)

        def loss_fn(*args, **kwargs):
            return weak_self().eager_differentiable_loss(model, guide, args, kwargs)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            compiled = pyro.ops.jit.trace(loss_fn, ignore_warnings=True,
                                          jit_options=self.jit_options)
        cache[key] = compiled
    return compiled(*args, **kwargs)


def _legacy_loss_and_grads(self, model, guide, args, kwargs) -> float:
    """``loss_and_grads`` under ``jit=True`` before the compiled path: backward through the
    TorchScript graph."""
    loss = self.differentiable_loss(model, guide, *args, **kwargs)
    loss.backward(retain_graph=self.retain_graph)
    return torch_item(loss)


def torchscript_jit(elbo):
    """``elbo`` (built with ``jit=True``) compiled with TorchScript, as before this branch."""
    elbo._compiled_loss = types.MethodType(_legacy_compiled_loss, elbo)
    elbo._compiled_loss_and_grads = types.MethodType(_legacy_loss_and_grads, elbo)
    return elbo


def numpyro_run_step(make_svi_and_args, num_particles: int) -> StepFn:
    """``RUN_STEPS`` NumPyro steps per call: ``SVI.run``'s loop (``lax.scan`` of
    ``svi.update``), jitted once so that a call does not re-trace it."""
    import jax
    from jax import lax

    svi, args = make_svi_and_args(num_particles)
    state = svi.init(jax.random.PRNGKey(0), *args)

    @jax.jit
    def run(state):
        return lax.scan(lambda s, _: svi.update(s, *args), state, None, length=RUN_STEPS)

    holder = [state]

    def step() -> float:
        holder[0], losses = run(holder[0])
        return float(losses[-1])

    step.steps_per_call = RUN_STEPS
    return step
