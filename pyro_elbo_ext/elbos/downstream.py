r"""Which terms of L each score-function site meets: Rao-Blackwellization by real dependency.

A site :math:`z_j` whose sample is not reparameterized contributes the score-function term
:math:`\nabla \log q(z_j)\, \mathrm{sg}(R_j)`.  Any term :math:`f` of L whose value does not
depend on :math:`z_j` can be left out of :math:`R_j`: given everything sampled before
:math:`z_j` it is a constant, and :math:`\mathbb{E}[\nabla \log q(z_j) \mid z_{<j}] = 0`
(Rao-Blackwellization of the score-function estimator: Ranganath, Gerrish & Blei 2014,
arXiv:1401.0118; Schulman et al. 2015, arXiv:1506.05254, "downstream costs").  The fewer
terms a reward holds, the smaller the variance of the estimate, at no bias.

This module decides, **once per plan**, which terms each score site meets:

1. The guide is replayed against its trace and the model against its own, every latent
   sample wrapped in a tensor that carries its site's name through every torch operation
   (provenance tracking, :class:`pyro.ops.provenance.ProvenanceTensor`; Wingate et al. 2011,
   "Nonstandard interpretations of probabilistic programs").  Each site's *inputs* are the
   names carried by its distribution's tensors, its log-density, its value (an observed
   value computed from latents), its mask and scale (:class:`Flow`).
2. The sites whose *values* depend on :math:`z_j`, :math:`D(j)`, are :math:`z_j` and, by
   closure, every latent whose sampler (the guide for the sites it samples; the model for
   latents it draws itself, as in hard attention) has an input in :math:`D(j)`.
3. A term of site :math:`s` depends on :math:`z_j` when one of the values it reads is in
   :math:`D(j)`: the site's own sample (unless the term is in closed form: an analytic
   entropy or KL does not read it) and its inputs on the side the term is computed from
   (the model for ``log_likelihood`` and ``log_prior``, the guide for ``entropy``, both for
   ``kl`` and any other kind).

Where the analysis cannot tell, the site falls back to the **plate rule** (every term not
separated from it by a :class:`pyro.plate`), never to anything smaller: when a value in
:math:`D(j)` is read into Python (``bool``, ``int``, ``.item()``, ``.tolist()``,
``.numpy()``, formatting), when provenance is written into a tensor that does not carry it
(``out[i] = z``, ``x.add_(z)``, ``out=``), when a replay fails, when the guide is
effect-based (a ``GuideMessenger``: its data flow is taken as its sample order), or when
sites are enumerated.  The factories that copy a tensor without dispatching
``__torch_function__`` (``torch.tensor``, ``torch.as_tensor``, ``torch.asarray``) are wrapped
during the replay so that they carry provenance; the legacy constructors
(``torch.Tensor(z)``, ``torch.FloatTensor(z)``) and names imported from torch before the
replay (``from torch import tensor``) are not: keep sampled values out of them.  Within
shared plates the rewards stay element by element, as before
(:func:`~pyro_elbo_ext.elbos.engine.sum_to_frames`).

The rule is at least as fine as ``TraceGraph_ELBO``'s (which also tracks provenance since
Pyro 1.8.2) and is never finer than the data flow allows: Pyro loses a dependency that goes
through a Python read (and then leaves a term out that the site's value changes); here that
site falls back to the plate rule.

Contents: :class:`Flow` and :func:`trace_flow` (one program's data flow),
:class:`Downstream` (the per-plan decision, and the per-step selection of terms),
:func:`downstream_rule` (the analysis a loss runs once per plan).
"""

from __future__ import annotations

import functools
import os
import traceback
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.util import is_validation_enabled
from pyro.ops.provenance import ProvenanceTensor, detach_provenance, get_provenance
from pyro.poutine.messenger import Messenger
from torch.utils._pytree import tree_flatten, tree_map

from .densities import PATHWISE
from .graphs import distribution_tensors
from .plan import OBSERVED, UNGUIDED, Plan, PlanFact, Planning
from .sites import is_subsample_site

#: term kinds computed from the model's densities alone (the rest read the guide, or both)
MODEL_KINDS = frozenset({"log_likelihood", "log_prior"})
#: term kinds computed from the guide's densities alone
GUIDE_KINDS = frozenset({"entropy"})

#: tensor methods whose Python result is metadata, not a value (shape, layout, identity)
_METADATA = frozenset({
    "__get__", "__hash__", "__len__", "dim", "ndimension", "size", "numel", "nelement",
    "stride", "storage_offset", "is_contiguous", "is_floating_point", "is_complex",
    "is_signed", "element_size", "get_device", "data_ptr", "is_inference", "has_names",
    "is_pinned", "is_shared", "untyped_storage",
})
#: in-place dunder methods (``x += z``); other in-place methods end in one underscore
_INPLACE_DUNDERS = frozenset({
    "__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
    "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__",
    "__irshift__", "__imatmul__",
})
_NOT_VALUES = (torch.Tensor, torch.Size, torch.dtype, torch.device, torch.layout, type(None))
_LIBRARY_DIRS = tuple(
    os.path.dirname(module.__file__) + os.sep for module in (torch, pyro)
) + (os.path.dirname(os.path.dirname(__file__)) + os.sep,)

#: the watch of the analysis in progress (a stack: one analysis at a time, re-entrant)
_WATCHES: list[_Watch] = []


# ---------------------------------------------------------------------------- tracking
class _Watch:
    """What a replay saw that provenance cannot follow: values read into Python and
    provenance written into a tensor that does not carry it (name -> where, first seen)."""

    def __init__(self) -> None:
        self.unsure: dict[str, str] = {}

    def note(self, names: Iterable[str], what: str) -> None:
        where = None
        for name in names:
            if name not in self.unsure:
                where = where or f"{what} at {_user_frame()}"
                self.unsure[name] = where


def _user_frame() -> str:
    """``file:line`` of the innermost frame outside torch, Pyro and this package."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if not frame.filename.startswith(_LIBRARY_DIRS):
            return f"{frame.filename}:{frame.lineno}"
    return "an unknown place"


def _is_inplace(name: str) -> bool:
    return name in _INPLACE_DUNDERS or (name.endswith("_") and not name.endswith("__"))


def _reads_value(name: str, result) -> bool:
    """A Python value computed from tensor values (a number, a list, a string, an array)."""
    if name in _METADATA or isinstance(result, _NOT_VALUES):
        return False
    return any(not isinstance(leaf, _NOT_VALUES) for leaf in tree_flatten(result)[0])


class _Tracked(ProvenanceTensor):
    """A :class:`~pyro.ops.provenance.ProvenanceTensor` that also reports, to the analysis
    in progress, every read of its value into Python and every in-place write of its
    provenance into a tensor that does not carry it (the two ways provenance is lost)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        sources = get_provenance([args, kwargs])
        plain_args, plain_kwargs = detach_provenance([args, kwargs])
        result = func(*plain_args, **plain_kwargs)
        name = getattr(func, "__name__", "")
        if name == "__iter__":  # the rows of a tracked tensor are tracked too
            return iter(_tag(list(result), sources))
        if sources and _WATCHES:
            if _reads_value(name, result):
                _WATCHES[-1].note(sources, f"its value is read into Python ({name})")
            else:
                target = kwargs.get("out")
                if target is None and _is_inplace(name) and args:
                    target = args[0]
                if target is not None:
                    rest = [a for a in args if a is not target]
                    incoming = get_provenance([rest, {k: v for k, v in kwargs.items()
                                                      if k != "out"}])
                    lost = incoming - get_provenance(target)
                    if lost:
                        _WATCHES[-1].note(lost, f"it is written in place into a tensor "
                                                f"({name})")
        return _tag(result, sources)


def _tag(value, names: frozenset):
    """``value`` with every tensor in it tracked as computed from ``names``."""
    if not names:
        return value
    return tree_map(lambda x: _Tracked(x, names) if type(x) is torch.Tensor
                    or isinstance(x, torch.nn.Parameter) else x, value)


#: tensor factories that copy a tensor argument without dispatching ``__torch_function__``
#: (so that provenance would be lost silently): wrapped during a replay to carry it
_FACTORIES = ("tensor", "as_tensor", "asarray")


@contextmanager
def _factories_carry_provenance():
    """``torch.tensor(z)``, ``torch.as_tensor(z, dtype=...)`` and ``torch.asarray(z)``
    return tensors tracked as computed from ``z`` while the context is active."""
    originals = {name: getattr(torch, name) for name in _FACTORIES}

    def carrying(factory):
        @functools.wraps(factory)
        def wrapper(data, *args, **kwargs):
            names = get_provenance(data)
            if not names:
                return factory(data, *args, **kwargs)
            return _tag(factory(detach_provenance(data), *args, **kwargs), names)
        return wrapper

    for name, factory in originals.items():
        setattr(torch, name, carrying(factory))
    try:
        yield
    finally:
        for name, factory in originals.items():
            setattr(torch, name, factory)


class _TagLatents(Messenger):
    """Wraps every latent sample in a :class:`_Tracked` tensor carrying its site's name."""

    def _pyro_post_sample(self, msg) -> None:
        if msg["is_observed"] or is_subsample_site(msg):
            return
        msg["value"] = _Tracked(detach_provenance(msg["value"]), frozenset({msg["name"]}))


# ---------------------------------------------------------------------------- one program
@dataclass
class Flow:
    """One program's data flow, read from a replay with provenance tracking.

    Attributes
    ----------
    inputs : dict
        For each sample site, the latent sites (other than itself) whose values its
        distribution, log-density, observed value, mask or scale are computed from.
    order : tuple of str
        The latent sites in the order the program sampled them.
    unsure : dict
        Latent sites whose provenance the replay could not follow, and why (see
        :class:`_Watch`).
    """

    inputs: dict[str, frozenset[str]]
    order: tuple[str, ...]
    unsure: dict[str, str] = field(default_factory=dict)


def trace_flow(fn: Callable, trace, args: tuple, kwargs: dict) -> Flow:
    """Replay ``fn`` against ``trace`` with every latent sample tracked; read its data flow.

    Runs without gradients, with validation off and with the random state restored (it
    consumes no randomness of the caller).
    """
    watch = _Watch()
    _WATCHES.append(watch)
    try:
        with torch.random.fork_rng(), torch.no_grad(), pyro.validation_enabled(False):
            with _TagLatents(), _factories_carry_provenance():
                replayed = poutine.trace(poutine.replay(fn, trace=trace)).get_trace(
                    *args, **kwargs)
            inputs, order = {}, []
            for name, site in replayed.nodes.items():
                if site["type"] != "sample" or is_subsample_site(site):
                    continue
                if not site["is_observed"]:
                    order.append(name)
                inputs[name] = _site_inputs(site) - {name}
    finally:
        _WATCHES.pop()
    return Flow(inputs, tuple(order), watch.unsure)


def _site_inputs(site: dict) -> frozenset[str]:
    """The names carried by a replayed site's distribution, density, value, mask, scale."""
    found = frozenset()
    for tensor in distribution_tensors(site["fn"]):
        found |= get_provenance(tensor)
    for key in ("value", "mask", "scale"):
        if torch.is_tensor(site[key]):
            found |= get_provenance(site[key])
    try:  # parameters a distribution computes lazily show up in its log-density
        found |= get_provenance(site["fn"].log_prob(site["value"]))
    except Exception:  # noqa: BLE001 - the tensors above are then all we know
        pass
    return found


def sample_order_flow(trace) -> Flow:
    """The conservative flow of a program whose data flow is not traced: each latent may be
    computed from every latent sampled before it (``TraceGraph_ELBO``'s sample-order rule)."""
    inputs, order = {}, []
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or is_subsample_site(site):
            continue
        inputs[name] = frozenset(order)
        if not site["is_observed"]:
            order.append(name)
    return Flow(inputs, tuple(order))


# ---------------------------------------------------------------------------- the decision
class Downstream:
    """The terms each score-function site meets, decided once per plan.

    Parameters
    ----------
    score_sites : sequence of str
        The sites with a score-function term.
    sampler_inputs : dict
        For each latent, the latents its *sampler* reads (the guide's inputs for the sites
        the guide samples, the model's for the latents the model draws).
    model_inputs, guide_inputs : dict
        For each site, the latents its model (guide) density reads.
    unsure : dict
        Latent sites whose data flow is not known, and why: a score site whose value reaches
        one of them keeps the plate rule.
    """

    def __init__(self, score_sites: Sequence[str], sampler_inputs: dict[str, frozenset[str]],
                 model_inputs: dict[str, frozenset[str]],
                 guide_inputs: dict[str, frozenset[str]], unsure: dict[str, str]):
        self.model_inputs = model_inputs
        self.guide_inputs = guide_inputs
        #: for each score site, the latents whose values depend on its sample (its own
        #: included), or ``None`` where that is not known (the plate rule)
        self.reach: dict[str, frozenset[str] | None] = {}
        #: for each score site kept on the plate rule, why
        self.reasons: dict[str, str] = {}
        for name in score_sites:
            reach = _closure(name, sampler_inputs)
            doubtful = sorted(reach & unsure.keys())
            if doubtful:
                self.reach[name] = None
                self.reasons[name] = (f"the value of '{doubtful[0]}' cannot be followed: "
                                      f"{unsure[doubtful[0]]}")
            else:
                self.reach[name] = reach
        self._met = {name: self._sites_met(name) for name in score_sites}
        self._selections: dict[tuple, dict[str, tuple[int, ...] | None]] = {}

    def meets(self, score_site: str, site: str, kind: str, analytic: bool) -> bool:
        """Whether the term ``(site, kind)`` may depend on ``score_site``'s sample."""
        reach = self.reach.get(score_site)
        if reach is None:
            return True
        if not analytic and site in reach:
            return True
        if site not in self.model_inputs and site not in self.guide_inputs:
            return True  # a site the replays did not see: not known
        if kind in MODEL_KINDS:
            reads = self.model_inputs.get(site, frozenset())
        elif kind in GUIDE_KINDS:
            reads = self.guide_inputs.get(site, frozenset())
        else:
            reads = self.model_inputs.get(site, frozenset()) | self.guide_inputs.get(
                site, frozenset())
        return not reads.isdisjoint(reach)

    def sites_met(self, score_site: str) -> frozenset[str] | None:
        """The sites any of whose terms the site's reward may hold; ``None``: every site not
        separated from it by plates."""
        return self._met.get(score_site)

    def _sites_met(self, score_site: str) -> frozenset[str] | None:
        reach = self.reach.get(score_site)
        if reach is None:
            return None
        names = set(self.model_inputs) | set(self.guide_inputs)
        return frozenset(
            s for s in names if s in reach
            or not (self.model_inputs.get(s, frozenset())
                    | self.guide_inputs.get(s, frozenset())).isdisjoint(reach))

    def select(self, terms: Sequence) -> dict[str, tuple[int, ...] | None]:
        """For each score site, the indices of the ``terms`` it meets (``None``: all).

        Memoized on the terms' (site, kind, analytic) layout, which a plan repeats at every
        step: the per-step cost is one tuple and one lookup.
        """
        key = tuple([(t.site, t.kind, t.analytic) for t in terms])
        selection = self._selections.get(key)
        if selection is None:
            selection = {
                name: None if reach is None else tuple(
                    i for i, (site, kind, analytic) in enumerate(key)
                    if self.meets(name, site, kind, analytic))
                for name, reach in self.reach.items()
            }
            if len(self._selections) < 16:
                self._selections[key] = selection
        return selection


def _closure(name: str, sampler_inputs: dict[str, frozenset[str]]) -> frozenset[str]:
    """``name`` and every latent whose sampler reads, directly or not, its value."""
    reach = {name}
    changed = True
    while changed:
        changed = False
        for site, reads in sampler_inputs.items():
            if site not in reach and not reads.isdisjoint(reach):
                reach.add(site)
                changed = True
    return frozenset(reach)


# ---------------------------------------------------------------------------- the analysis
def score_site_names(plan: Plan) -> list[str]:
    """The sites of a plan that carry a score-function term."""
    return [site.name for site in plan.sites if site.gradient != PATHWISE]


def downstream_rule(planning: Planning, plan: Plan,
                    as_traced: Callable[[Callable], Callable] | None = None,
                    owner: str = "the loss") -> Downstream | None:
    """The plan's :class:`Downstream` decision, or ``None`` for the plate rule everywhere.

    Parameters
    ----------
    planning : Planning
        The call and the trace pair the plan is made from.
    plan : Plan
        The plan (its sites' roles and estimators).
    as_traced : callable, optional
        Wraps the model and the guide as the traces were recorded (e.g. inside the
        vectorized particle plate).
    owner : str
        The loss's name, for the warning a failed replay gives.
    """
    score = score_site_names(plan)
    if not score or plan.enumerated:
        return None  # nothing to decide; enumerated terms are expectations: plate rule
    wrap = as_traced or (lambda fn: fn)
    args, kwargs = planning.args, planning.kwargs
    try:
        model_flow = trace_flow(wrap(planning.model), planning.model_trace, args, kwargs)
        if isinstance(poutine.unwrap(planning.guide), Messenger):
            guide_flow = sample_order_flow(planning.guide_trace)  # runs the model itself
        else:
            guide_flow = trace_flow(wrap(planning.guide), planning.guide_trace, args, kwargs)
    except Exception as error:  # noqa: BLE001 - any failure: the plate rule
        warnings.warn(
            f"{owner}: could not trace the data flow of the model and guide "
            f"({type(error).__name__}: {error}); the score-function terms of "
            f"{', '.join(map(repr, score))} meet every term not separated from them by "
            "plates (unbiased, noisier)",
            stacklevel=4,
        )
        return None
    sampled_by_model = {site.name for site in plan.sites if site.role == UNGUIDED}
    sampler_inputs = {}
    for site in plan.sites:
        if site.role == OBSERVED:
            continue
        flow = model_flow if site.name in sampled_by_model else guide_flow
        sampler_inputs[site.name] = flow.inputs.get(site.name, frozenset(flow.order))
    unsure = {**guide_flow.unsure, **model_flow.unsure}
    rule = Downstream(score, sampler_inputs, model_flow.inputs, guide_flow.inputs, unsure)
    if rule.reasons and is_validation_enabled():
        listing = "; ".join(f"'{name}' ({why})" for name, why in rule.reasons.items())
        warnings.warn(
            f"{owner}: the score-function terms of these sites meet every term not separated "
            f"from them by plates (unbiased, but noisier than their data flow allows): "
            f"{listing}. Keep sampled values in torch operations (no bool/int/.item(), no "
            "writes into other tensors) for a lower-variance gradient",
            stacklevel=4,
        )
    return rule


def score_downstream(elbo, model, guide, *args, **kwargs) -> dict[str, frozenset[str] | None]:
    """For each score-function site of ``elbo``'s plan for this call, the sites whose terms
    its reward may hold (``None``: every site not separated from it by plates).

    One particle is drawn (no gradient, no state update) to find the plan; e.g.
    ``score_downstream(JensenELBO(), model, guide, data)``.
    """
    call = elbo._begin(model, guide, args, kwargs, training=False)
    with torch.no_grad(), torch.random.fork_rng():
        plan = next(iter(elbo._batches(call))).plan
    rule = plan.fact(DOWNSTREAM)
    names = score_site_names(plan)
    return {name: None if rule is None else rule.sites_met(name) for name in names}


#: a plan's decision (:func:`downstream_rule`), read by the combination of every loss whose
#: estimate is a sum of terms; ``None``: the plate rule
DOWNSTREAM: PlanFact[Downstream | None] = PlanFact("the terms each score site meets")


__all__ = ["DOWNSTREAM", "GUIDE_KINDS", "MODEL_KINDS", "Downstream", "Flow", "downstream_rule",
           "sample_order_flow", "score_downstream", "score_site_names", "trace_flow"]
