"""The compiled path: loss, gradient and optimizer update traced into one graph (Inductor).

It sits on top of the losses: it drives them through
:class:`~pyro_elbo_ext.elbos.protocol.CompilableLoss` (every call in :mod:`.adapter`), and
registers ``jit=True``'s backend (:class:`.jit.CompiledLosses`) with
:func:`~pyro_elbo_ext.elbos.protocol.register_jit_backend` when imported.

* :class:`CompiledSVI` (:mod:`.svi`): :class:`pyro.infer.SVI`'s interface, the whole step
  compiled.
* ``jit=True`` on every loss (:mod:`.jit`): the loss and its gradient compiled, under plain SVI.
* :mod:`.trace`: the ATen trace of loss and gradient, parameters as inputs, with guards.
* :mod:`.assumptions`: what a traced graph assumes beyond its inputs, checked before each call.
* :mod:`.rng`: graph building off the user's random stream.
* :mod:`.checkpoint`: Pyro's checkpoint recipe on the optimizer a ``CompiledSVI`` steps with.
* :mod:`.optimizers`: Pyro's optimizers as pure functions
  (:mod:`pyro_elbo_ext.functional_optim`).
* :mod:`.backend`: Inductor (torch.compile's compiler) on the ATen graph; its on-disk cache.
"""

from ..elbos.protocol import register_jit_backend
from .jit import CompiledLosses
from .svi import CompiledSVI

register_jit_backend(CompiledLosses)

__all__ = ["CompiledSVI"]
