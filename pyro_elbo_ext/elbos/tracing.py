"""Running the guide and replaying the model against it, with less bookkeeping than Pyro's.

``poutine.trace`` copies every message into a new :class:`~pyro.poutine.Trace` node, records
parameter sites and input/return nodes, and hands back a copy of the whole trace; the losses
here only read the sample sites once.  :class:`SampleRecorder` keeps the sample messages
themselves, in order, in an ordinary ``Trace``'s ``nodes`` (so the traces look the same to
everything that reads them).  ``pyro.plate`` subsample sites are recorded too, because the model
must replay the guide's minibatch indices, and dropped from both traces once the model has run.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import pyro.poutine as poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
from pyro.poutine.trace_struct import Trace


class SampleRecorder(Messenger):
    """Record the sample sites of one run (the messages themselves; no param sites)."""

    def __init__(self) -> None:
        super().__init__()
        self.trace = Trace()
        self.has_subsample_sites = False

    def __enter__(self) -> SampleRecorder:
        self.trace = Trace()
        self.has_subsample_sites = False
        return super().__enter__()

    def _pyro_post_sample(self, msg) -> None:
        if msg["infer"].get("_do_not_trace"):
            return
        if isinstance(msg["fn"], _Subsample):
            self.has_subsample_sites = True
        nodes = self.trace.nodes
        name = msg["name"]
        if name in nodes:
            raise RuntimeError(
                f"Multiple sample sites named '{name}': give every pyro.sample a unique name"
            )
        nodes[name] = msg


def record_guide_and_model(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    wrap_model: Callable[[Callable, Trace], Callable] | None = None,
) -> tuple[Trace, Trace]:
    """One particle: the guide's sample sites, and the model's with the guide's values replayed.

    ``wrap_model(model, guide_trace)``, when given, returns the model to run (e.g. with the
    sites the guide does not sample configured for enumeration).

    Returns
    -------
    (model_trace, guide_trace)
        Traces holding only sample sites, in execution order, subsample sites dropped.
    """
    with SampleRecorder() as guide_recorder:
        guide(*args, **kwargs)
    guide_trace = guide_recorder.trace
    if wrap_model is not None:
        model = wrap_model(model, guide_trace)
    with SampleRecorder() as model_recorder:
        poutine.replay(model, trace=guide_trace)(*args, **kwargs)
    model_trace = model_recorder.trace
    for recorder, trace in ((guide_recorder, guide_trace), (model_recorder, model_trace)):
        if recorder.has_subsample_sites:
            trace.nodes = OrderedDict(
                (name, site) for name, site in trace.nodes.items()
                if not isinstance(site["fn"], _Subsample)
            )
    return model_trace, guide_trace
