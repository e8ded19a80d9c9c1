"""What a compiled graph assumes, broken one at a time (``jit=True`` and ``CompiledSVI``).

Each case is one a user hits (issue 27): the reference is eager ``pyro.infer.SVI`` with the
same loss on a deterministic model (no latent sites, so the loss and the trajectory are exact
to float rounding), and the compiled path must give the same numbers, retrace, or refuse with
an error that names the cause and the fix: never a stale graph.  Most tests run the traced
graph uncompiled (``backend.BACKEND = None``); the cases where only Inductor's compiled code
went wrong (strides) or where its code must be tested (resuming bit for bit) compile.
"""

import copy
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI

from pyro_elbo_ext import CompiledSVI, JensenELBO, empty_guide
from pyro_elbo_ext.compiled import backend, cache, jit
from pyro_elbo_ext.compiled import svi as svi_module
from pyro_elbo_ext.compiled.trace import DataDependentShapeError
from pyro_elbo_ext.problems import get_problem
from tests.test_compiled_svi import _data, _map_model

COMPILED = ["jit", "CompiledSVI"]


@pytest.fixture
def traced_only(monkeypatch):
    """Run the traced graphs uncompiled: the tracing and the checks are under test."""
    monkeypatch.setattr(backend, "BACKEND", None)


def _svi(path, model, optim, guide=empty_guide, **options):
    loss = JensenELBO(jit=path == "jit", **options)
    if path == "CompiledSVI":
        return CompiledSVI(model, guide, optim, loss)
    return SVI(model, guide, optim, loss)


def _eager_loss(model, *args):
    """The eager loss at the current parameters (a deterministic model: exact)."""
    return JensenELBO().loss(model, empty_guide, *args)


# ---------------------------------------------------------------- parameters (rows 1, 2)
def _network_run(path, toggle_at, start_frozen, steps=8):
    """A pyro.module regression whose first layer is frozen (or unfrozen) after
    ``toggle_at`` steps; returns how far that layer moved after the toggle, and the store."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    x, y = torch.randn(20, 3), torch.randn(20)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    net[0].requires_grad_(not start_frozen)

    def model(x, y):
        pyro.module("net", net)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(net(x).squeeze(-1), 1.0), obs=y)

    svi = _svi(path, model, pyro.optim.Adam({"lr": 0.05}))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "0.weight was not registered|0.bias was not")
        for step in range(steps):
            if step == toggle_at:
                net[0].requires_grad_(start_frozen)
                before = net[0].weight.detach().clone()
            svi.step(x, y)
    moved = (net[0].weight.detach() - before).norm().item()
    final = {name: p.detach().clone() for name, p in net.named_parameters()}
    return moved, final


@pytest.mark.parametrize("path", COMPILED)
def test_a_layer_frozen_mid_run_stops_moving(traced_only, path):
    """Row 1: frozen after 3 steps, 5 more Adam steps: eagerly it moves 0; the compiled graph
    used to keep computing (and applying) its gradient."""
    moved, final = _network_run(path, toggle_at=3, start_frozen=False)
    eager_moved, eager_final = _network_run("eager", toggle_at=3, start_frozen=False)
    assert eager_moved == 0.0 and moved == 0.0
    for name, value in eager_final.items():  # and the rest trained as eagerly
        torch.testing.assert_close(final[name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", COMPILED)
def test_a_layer_unfrozen_mid_run_trains(traced_only, path):
    """Row 2: frozen when the step compiled, unfrozen after step 3: eagerly it then trains;
    the graph used to keep it as a constant, frozen for good."""
    moved, final = _network_run(path, toggle_at=3, start_frozen=True)
    eager_moved, eager_final = _network_run("eager", toggle_at=3, start_frozen=True)
    assert eager_moved > 0.1
    assert moved == pytest.approx(eager_moved, rel=1e-5)
    for name, value in eager_final.items():
        torch.testing.assert_close(final[name], value, rtol=1e-5, atol=1e-6)


def _scale_model(data):
    loc = pyro.param("loc", torch.tensor(0.0))
    scale = pyro.param("scale", torch.tensor(1.5), constraint=dist.constraints.positive)
    with pyro.plate("data", data.shape[0]):
        pyro.sample("x", dist.Normal(loc, scale), obs=data)


def test_a_frozen_parameter_is_read_live_and_not_updated(traced_only):
    """A pyro.param that does not require grad is a graph input without a gradient: the
    step leaves it (and its optimizer state) alone, and reads a value set in place."""
    data = torch.tensor([1.0, 2.0, 4.0])
    svi = CompiledSVI(_scale_model, empty_guide, pyro.optim.Adam({"lr": 0.1}), JensenELBO())
    svi.step(data)
    scale = pyro.get_param_store()._params["scale"]
    scale.requires_grad_(False)
    with torch.no_grad():
        scale.fill_(0.0)  # log-scale 0: scale 1
    before = svi.get_state()["scale"]["state"][0]["step"].item()
    for _ in range(3):
        expected = _eager_loss(_scale_model, data)  # at the parameters before the step
        assert svi.step(data) == pytest.approx(expected, rel=1e-6)
    assert scale.item() == 0.0
    assert svi.get_state()["scale"]["state"][0]["step"].item() == before


# ---------------------------------------------------------------- checkpoints (rows 8, 18)
_DATA = _data()


def _store():
    return {n: p.detach().clone() for n, p in pyro.get_param_store().named_parameters()}


@pytest.mark.parametrize("store_first", [True, False], ids=["store-then-optim", "optim-then-store"])
def test_a_rollback_into_the_running_compiled_svi_continues_exactly(traced_only, store_first):
    """Row 8: restore the param store and ``svi.set_state`` into the same CompiledSVI (an
    early-stopping rollback): the run continues as the uninterrupted one; Adam's step count
    used to restart at 1."""
    svi = CompiledSVI(_map_model, empty_guide, pyro.optim.Adam({"lr": 0.1}), JensenELBO())
    for _ in range(5):
        svi.step(_DATA)
    params_state = copy.deepcopy(pyro.get_param_store().get_state())
    optim_state = copy.deepcopy(svi.get_state())
    for _ in range(5):
        svi.step(_DATA)
    expected = _store()
    for _ in range(3):  # wander off, then roll back
        svi.step(_DATA)
    restores = [lambda: pyro.get_param_store().set_state(copy.deepcopy(params_state)),
                lambda: svi.set_state(copy.deepcopy(optim_state))]
    for restore in restores if store_first else restores[::-1]:
        restore()
    for _ in range(5):
        svi.step(_DATA)
    for name, value in expected.items():
        torch.testing.assert_close(_store()[name], value, rtol=1e-12, atol=1e-12)


def test_pyros_checkpoint_recipe_on_the_optimizer_reaches_compiled_svi(traced_only, tmp_path):
    """Row 18: ``optim.get_state()`` / ``optim.save()`` on the pyro.optim object passed to
    CompiledSVI hold the Adam moments (they used to be ``{}``), and ``optim.load()`` into a
    new CompiledSVI continues the run as SVI does."""
    _, _, expected = _steps_under(SVI, 10)
    optim = pyro.optim.Adam({"lr": 0.1})
    pyro.clear_param_store()
    svi = CompiledSVI(_map_model, empty_guide, optim, JensenELBO())
    for _ in range(5):
        svi.step(_DATA)
    state = optim.get_state()
    assert state.keys() == {"loc", "scale"}
    assert state["loc"]["state"][0]["step"] == 5
    torch.testing.assert_close(state["loc"]["state"][0]["exp_avg"],
                               svi.get_state()["loc"]["state"][0]["exp_avg"])
    optim.save(tmp_path / "optim.pt")
    pyro.get_param_store().save(tmp_path / "params.pt")

    pyro.clear_param_store()
    pyro.get_param_store().load(tmp_path / "params.pt")
    fresh = pyro.optim.Adam({"lr": 0.1})
    resumed = CompiledSVI(_map_model, empty_guide, fresh, JensenELBO())
    fresh.load(tmp_path / "optim.pt")
    for _ in range(5):
        resumed.step(_DATA)
    for name, value in expected.items():
        torch.testing.assert_close(_store()[name], value, rtol=1e-11, atol=1e-12)


def _steps_under(svi_class, steps):
    pyro.clear_param_store()
    svi = svi_class(_map_model, empty_guide, pyro.optim.Adam({"lr": 0.1}), JensenELBO())
    losses = [svi.step(_DATA) for _ in range(steps)]
    return svi, losses, _store()


# ---------------------------------------------------------------- the call's tensors (9, 12, 13)
def _two_inputs(a, b):
    loc = pyro.param("loc", torch.tensor(0.0))
    with pyro.plate("data", a.shape[0]):
        pyro.sample("a", dist.Normal(loc, 1.0), obs=a)
        pyro.sample("b", dist.Normal(loc + 1.0, 1.0), obs=b)


@pytest.mark.parametrize("path", COMPILED)
def test_the_same_tensor_passed_twice_is_two_inputs(traced_only, path):
    """Row 9: ``step(x, x)`` first, then ``step(x, y)``: the graph used to read one input for
    both arguments."""
    x, y = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, -1.0, 2.0])
    svi = _svi(path, _two_inputs, pyro.optim.SGD({"lr": 0.0}))
    assert svi.step(x, x) == pytest.approx(_eager_loss(_two_inputs, x, x), rel=1e-6)
    assert svi.step(x, y) == pytest.approx(_eager_loss(_two_inputs, x, y), rel=1e-6)


@pytest.mark.parametrize("path", COMPILED)
def test_an_argument_that_requires_grad_is_refused_on_every_call(traced_only, path):
    """Row 12: the first call with data that requires grad was refused, a later one (a cache
    hit) was accepted and its gradient silently dropped."""
    weights = torch.tensor([1.0, 2.0])
    svi = _svi(path, _scale_model, pyro.optim.SGD({"lr": 0.0}))
    svi.step(weights)
    with pytest.raises(ValueError, match=r"argument tensor 0 \(of shape \(2,\)\) requires grad"):
        svi.step(weights.clone().requires_grad_())


def _five_columns(data):
    loc = pyro.param("loc", torch.zeros(5))
    with pyro.plate("data", data.shape[0]):
        pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=data)


@pytest.mark.parametrize("path", COMPILED)
def test_other_strides_are_copied_to_the_compiled_layout(path):
    """Row 13 (Inductor): the same shape with other strides (a transposed view, a column
    slice) used to fail inside Inductor's code with a fake-kernel AssertionError."""
    torch.manual_seed(0)
    square, wide = torch.randn(5, 5), torch.randn(5, 8)
    svi = _svi(path, _five_columns, pyro.optim.SGD({"lr": 0.0}))
    for data in (square, square.t(), wide[:, 2:7]):
        assert not data.is_contiguous() or data is square
        assert svi.step(data) == pytest.approx(_eager_loss(_five_columns, data), rel=1e-5)


# ---------------------------------------------------------------- tensors read otherwise (10)
TRAIN = torch.tensor([1.0, 5.0, 9.0])


def _reads_a_global(data):
    loc = pyro.param("loc", torch.tensor(0.0))
    with pyro.plate("data", data.shape[0]):
        pyro.sample("x", dist.Normal(loc, TRAIN.std()), obs=data)


@pytest.mark.parametrize("path", COMPILED)
def test_a_global_that_is_the_first_argument_stays_a_global(traced_only, path):
    """Row 10: the model reads a global, and the first call passes that global itself: the
    graph used to wire the global to the argument, so other data changed the global's std."""
    other = torch.tensor([0.5, -1.0, 2.0])
    svi = _svi(path, _reads_a_global, pyro.optim.SGD({"lr": 0.0}))
    assert svi.step(TRAIN) == pytest.approx(_eager_loss(_reads_a_global, TRAIN), rel=1e-6)
    assert svi.step(other) == pytest.approx(_eager_loss(_reads_a_global, other), rel=1e-6)


@pytest.mark.parametrize("path", COMPILED)
def test_a_global_changed_in_place_or_rebound_retraces(traced_only, path, monkeypatch):
    """A global the graph holds as a constant: changed in place, or the name bound to another
    tensor, the step retraces with a warning naming it (eagerly the model reads the new one),
    and refuses, saying to pass it as an argument, when it keeps changing."""
    monkeypatch.setattr(svi_module, "MAX_RETRACES", 2)
    monkeypatch.setattr(jit, "MAX_RETRACES", 2)
    monkeypatch.setitem(globals(), "TRAIN", TRAIN.clone())
    data = torch.tensor([0.5, -1.0, 2.0])
    svi = _svi(path, _reads_a_global, pyro.optim.SGD({"lr": 0.0}))
    svi.step(data)
    with torch.no_grad():
        globals()["TRAIN"].mul_(3.0)
    with pytest.warns(RuntimeWarning, match="changed in place"):
        assert svi.step(data) == pytest.approx(_eager_loss(_reads_a_global, data), rel=1e-6)
    monkeypatch.setitem(globals(), "TRAIN", torch.tensor([2.0, 2.5, 3.0]))
    with pytest.warns(RuntimeWarning, match="the global 'TRAIN'"):
        assert svi.step(data) == pytest.approx(_eager_loss(_reads_a_global, data), rel=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert svi.step(data) == pytest.approx(_eager_loss(_reads_a_global, data), rel=1e-6)
    monkeypatch.setitem(globals(), "TRAIN", torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(RuntimeError, match="Pass the tensor to the model and guide as an "
                                           "argument"):
        svi.step(data)


# ---------------------------------------------------------------- Python reads of values (11)
ITEMS = torch.arange(10.0)


def _minibatch_by_tolist(data):
    loc = pyro.param("loc", torch.tensor(0.0))
    idx = torch.randperm(10)[:3]
    batch = torch.stack([ITEMS[i] for i in idx.tolist()])  # indices read into Python
    with pyro.plate("data", 3):
        pyro.sample("x", dist.Normal(loc, 1.0), obs=batch)


@pytest.mark.parametrize("path", COMPILED)
def test_indices_read_with_tolist_are_never_frozen(traced_only, path, monkeypatch):
    """Row 11: subsample indices read into Python with ``tolist()`` used to be frozen into the
    graph (one minibatch for good, silently); now each changed read retraces, and a read
    that keeps changing is refused, naming the line."""
    monkeypatch.setattr(svi_module, "MAX_RETRACES", 3)
    monkeypatch.setattr(jit, "MAX_RETRACES", 3)
    svi = _svi(path, _minibatch_by_tolist, pyro.optim.SGD({"lr": 0.0}))
    losses = set()
    with pytest.raises(RuntimeError, match="reads tensor values into Python"), \
            pytest.warns(RuntimeWarning, match=r"test_compiled_assumptions\.py:\d+ "
                                               r"\(_minibatch_by_tolist\)"):
        for _ in range(20):
            losses.add(svi.step(torch.zeros(1)))
    assert len(losses) > 1  # every step it took used its own minibatch


def _counts_as_list(counts):
    loc = pyro.param("loc", torch.tensor(0.0))
    for i, n in enumerate(counts.tolist()):  # the structure follows the values
        with pyro.plate(f"group_{i}", int(n)):
            pyro.sample(f"x_{i}", dist.Normal(loc + i, 1.0), obs=torch.zeros(int(n)))


@pytest.mark.parametrize("path", COMPILED)
def test_a_changed_tolist_read_retraces_to_the_eager_value(traced_only, path):
    counts = torch.tensor([2, 3])
    svi = _svi(path, _counts_as_list, pyro.optim.SGD({"lr": 0.0}))
    assert svi.step(counts) == pytest.approx(_eager_loss(_counts_as_list, counts), rel=1e-6)
    other = torch.tensor([4, 1])
    with pytest.warns(RuntimeWarning, match="read into Python"):
        assert svi.step(other) == pytest.approx(_eager_loss(_counts_as_list, other), rel=1e-6)


def test_a_random_read_is_refused_at_once_when_the_graph_draws_its_own_numbers():
    """Under Inductor the graph draws other numbers than its trace; a read that differs
    between the trace and the first call with the same inputs depends on random draws, and
    is refused at once (not after a string of recompiles)."""

    def model(data):
        loc = pyro.param("loc", torch.tensor(0.0))
        if torch.rand(()).item() > 0.5:  # a random number read into Python
            loc = loc + 1.0
        pyro.sample("x", dist.Normal(loc, 1.0), obs=data)

    svi = CompiledSVI(model, empty_guide, pyro.optim.SGD({"lr": 0.0}), JensenELBO())
    with pytest.raises(RuntimeError, match=r"test_compiled_assumptions\.py:\d+ \(model\) "
                                           r"differs .* depends on random draws"):
        svi.step(torch.tensor(0.3))


# ---------------------------------------------------------------- value-dependent shapes (14)
def _drops_missing(data):
    loc = pyro.param("loc", torch.tensor(0.0))
    data = data[~torch.isnan(data)]
    with pyro.plate("data", data.shape[0]):
        pyro.sample("x", dist.Normal(loc, 1.0), obs=data)


@pytest.mark.parametrize("path", COMPILED)
def test_a_value_dependent_shape_is_refused_naming_the_op_and_the_fix(traced_only, path):
    """Row 14: ``data[~torch.isnan(data)]`` is fine eagerly; compiled it used to fail inside
    Inductor with DynamicOutputShapeException."""
    svi = _svi(path, _drops_missing, pyro.optim.SGD({"lr": 0.0}))
    with pytest.raises(DataDependentShapeError,
                       match=r"aten\.index\.Tensor at .*test_compiled_assumptions\.py:\d+ "
                             r"\(_drops_missing\).*pyro\.poutine\.mask"):
        svi.step(torch.tensor([1.0, float("nan"), 2.0]))


# ---------------------------------------------------------------- also seen
def _tempered(data, temperature):
    loc = pyro.param("loc", torch.tensor(0.0))
    with pyro.plate("data", data.shape[0]):
        pyro.sample("x", dist.Normal(loc, temperature), obs=data)


@pytest.mark.parametrize("path", COMPILED)
def test_a_changing_python_float_says_to_pass_a_0_dim_tensor(traced_only, path):
    data = torch.tensor([1.0, 2.0])
    svi = _svi(path, _tempered, pyro.optim.SGD({"lr": 0.0}))
    svi.step(data, 1.0)
    with pytest.warns(RuntimeWarning, match=r"1\.0 -> 1\.5.*0-dim tensor") as record:
        svi.step(data, 1.5)
    assert record[0].filename == __file__  # the warning points at the user's line
    with warnings.catch_warnings():  # a 0-dim tensor: one graph for every value, silently
        warnings.simplefilter("error")
        for t in (1.0, 1.5, 2.0):
            svi.step(data, torch.tensor(t))


@pytest.mark.parametrize("path", COMPILED)
def test_a_replaced_pyro_module_layer_is_refused_by_name(traced_only, path):
    """Replacing a layer of a registered network: eagerly Pyro keeps stepping the store's old
    tensors (by their momentum) while the network computes with the new, untrained layer; the
    compiled graph used to keep computing with the old layer, silently."""
    torch.manual_seed(0)
    x, y = torch.randn(20, 3), torch.randn(20)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))

    def model(x, y):
        pyro.module("net", net)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(net(x).squeeze(-1), 1.0), obs=y)

    svi = _svi(path, model, pyro.optim.Adam({"lr": 0.05}))
    for _ in range(3):
        svi.step(x, y)
    net[2] = torch.nn.Linear(4, 1)
    with pytest.raises(RuntimeError, match=r"pyro\.module\('net', \.\.\.\): the network's "
                                           r"parameter '2\.weight'.*update_module_params=True"):
        svi.step(x, y)
    # following the advice: the new layer is registered and trains
    for name in ("net$$$2.weight", "net$$$2.bias"):
        del pyro.get_param_store()[name]
    before = net[2].weight.detach().clone()
    svi.step(x, y)
    svi.step(x, y)
    assert not torch.equal(net[2].weight, before)


def _network_with_batch_norm():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4),
                               torch.nn.Linear(4, 1))


@pytest.mark.parametrize("path", COMPILED)
def test_running_statistics_are_updated_once_per_step(traced_only, path):
    """A network's buffers written by the graph (BatchNorm's running statistics) change as
    eagerly: once per step (a build's own runs used to add three updates), and without a
    retrace."""
    torch.manual_seed(0)
    x, y = torch.randn(20, 3), torch.randn(20)
    results = {}
    for which in ("eager", path):
        pyro.clear_param_store()
        net = _network_with_batch_norm()

        def model(x, y, net=net):
            pyro.module("net", net)
            with pyro.plate("data", x.shape[0]):
                pyro.sample("y", dist.Normal(net(x).squeeze(-1), 1.0), obs=y)

        svi = _svi(which, model, pyro.optim.SGD({"lr": 0.0}))
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            for _ in range(3):
                svi.step(x, y)
        results[which] = {k: v.clone() for k, v in net[1].state_dict().items()}
    assert results[path]["num_batches_tracked"] == 3
    for key, value in results["eager"].items():
        torch.testing.assert_close(results[path][key], value, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- resuming bit for bit
def _resumed(path, problem, steps=4):
    """Losses of ``steps`` steps after a checkpoint, run on, then restored (param store,
    optimizer state, torch's random state) into a new SVI object, as a new process would."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    problem.set_params()

    def make():
        return _svi(path, problem.model, pyro.optim.Adam({"lr": 0.05}), guide=problem.guide)

    svi = make()
    for _ in range(3):
        svi.step(*problem.args)
    checkpoint = (copy.deepcopy(pyro.get_param_store().get_state()),
                  copy.deepcopy(svi.optim.get_state()), torch.get_rng_state())
    first = [svi.step(*problem.args) for _ in range(steps)]
    pyro.clear_param_store()
    pyro.get_param_store().set_state(copy.deepcopy(checkpoint[0]))
    resumed = make()
    resumed.optim.set_state(copy.deepcopy(checkpoint[1]))
    torch.set_rng_state(checkpoint[2])
    second = [resumed.step(*problem.args) for _ in range(steps)]
    return first, second


@pytest.mark.parametrize("path", COMPILED)
def test_a_restored_run_continues_bit_for_bit(traced_only, path):
    """Rebuilding the step after a restore used to draw from the user's random stream (the
    discovery run and the traces), so the resumed run was right in distribution only."""
    first, second = _resumed(path, get_problem("normal_normal"))
    assert first == second
    assert len(set(first)) == len(first)  # the steps drew fresh noise: not vacuous


def test_inductor_restored_run_continues_bit_for_bit():
    first, second = _resumed("CompiledSVI", get_problem("normal_normal"))
    assert first == second and len(set(first)) == len(first)


def test_messages_name_the_fallback():
    """The retrace error says what to change and the eager alternative."""
    with pytest.raises(RuntimeError, match=r"X changed \(2 times\).*Do Y, or use Z"):
        cache.count_retrace(1, 1, "who", "X changed", "Do Y", "Z")
