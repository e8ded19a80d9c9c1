"""The compiled path: loss, gradient and optimizer update traced into one graph (Inductor).

* :class:`CompiledSVI` (:mod:`.svi`): :class:`pyro.infer.SVI`'s interface, the whole step
  compiled.
* ``jit=True`` on every loss (:mod:`.jit`): the loss and its gradient compiled, under plain SVI.
* :mod:`.trace`: the ATen trace of loss and gradient, parameters as inputs, with guards.
* :mod:`.assumptions`: what a traced graph assumes beyond its inputs, checked before each call.
* :mod:`.rng`: graph building off the user's random stream.
* :mod:`.checkpoint`: Pyro's checkpoint recipe on the optimizer a ``CompiledSVI`` steps with.
* :mod:`.optimizers`: Pyro's optimizers as pure functions.
* :mod:`.backend`: Inductor (torch.compile's compiler) on the ATen graph; its on-disk cache.
"""

from .svi import CompiledSVI

__all__ = ["CompiledSVI"]
