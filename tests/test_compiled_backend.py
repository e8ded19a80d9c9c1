"""The compile step's surroundings: torch's internal warnings, random draws, the ISA probe."""

import platform
import warnings

import pyro
import pyro.distributions as dist
import pyro.optim
import pytest
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoLowRankMultivariateNormal, AutoMultivariateNormal
from torch._inductor import config as inductor_config
from torch.fx.experimental.proxy_tensor import make_fx

from pyro_elbo_ext import CompiledSVI
from pyro_elbo_ext.compiled import backend, vec_isa

INTERNAL = "`torch._prims_common.check` is deprecated and will be removed in the future."


def test_torch_internal_warnings_are_filtered_only_while_compiling():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with backend.quiet_compilation():
            warnings.warn(INTERNAL, FutureWarning, stacklevel=1)  # filtered
            with pytest.raises(FutureWarning, match="a user's"):
                warnings.warn("a user's own FutureWarning", FutureWarning, stacklevel=1)
        with pytest.raises(FutureWarning):
            # outside compilation: not ours to hide
            warnings.warn(INTERNAL, FutureWarning, stacklevel=1)


def _correlated_model(data):
    a = pyro.sample("a", dist.Normal(0.0, 1.0))
    b = pyro.sample("b", dist.Normal(a, 1.0))
    with pyro.plate("data", data.shape[0]):
        pyro.sample("x", dist.Normal(a + b, 1.0), obs=data)


@pytest.mark.parametrize("guide_class", [
    AutoMultivariateNormal,
    pytest.param(AutoLowRankMultivariateNormal, marks=pytest.mark.slow),
])
def test_cholesky_guides_compile_under_warnings_as_errors(guide_class):
    """Inductor's lowering of these guides warns from inside torch (a deprecated check): with
    warnings as errors the step still compiles (no eager fallback) and steps."""
    svi = CompiledSVI(_correlated_model, guide_class(_correlated_model),
                      pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        losses = [svi.step(torch.linspace(-1.0, 1.0, 10)) for _ in range(3)]
    assert len(svi._steps) == 1 and not svi._eager_structures
    assert all(torch.isfinite(torch.tensor(losses)))


def test_native_random_draws_the_same_numbers_as_aten():
    def draw(x):
        return x + torch.empty(3, dtype=x.dtype).normal_()

    graph = make_fx(draw)(torch.zeros(3))
    rewritten = backend.native_random(graph)
    targets = [node.target for node in rewritten.graph.nodes]
    assert torch.ops.aten.randn.default in targets
    assert torch.ops.aten.normal_.default not in targets
    assert torch.ops.aten.normal_.default in [node.target for node in graph.graph.nodes]
    torch.manual_seed(4)
    expected = graph(torch.zeros(3))
    torch.manual_seed(4)
    torch.testing.assert_close(rewritten(torch.zeros(3)), expected, rtol=0, atol=0)


# ---------------------------------------------------------------- the vector-ISA probe
@pytest.fixture
def isa_checks(tmp_path, monkeypatch):
    """The record in a scratch file; Inductor's check replaced by one that counts its calls
    (passes unless the program is "bad")."""
    from torch._inductor.cpu_vec_isa import VecISA

    monkeypatch.setattr(vec_isa, "CACHE_FILE", tmp_path / "vec_isa.json")
    monkeypatch.setattr(inductor_config.cpp, "vec_isa_ok", None)
    monkeypatch.delenv(vec_isa.ENVIRONMENT_SWITCH, raising=False)
    calls = []

    def check_build(isa, code):
        calls.append(code)
        return code != "bad"

    monkeypatch.setattr(VecISA, "check_build", check_build)
    return calls


def _checks():
    from torch._inductor.cpu_vec_isa import VecAVX2

    isa = VecAVX2()
    return isa.check_build("good"), isa.check_build("bad")


def test_passed_checks_are_recorded_and_answered_from_the_record(isa_checks):
    from torch._inductor.cpu_vec_isa import VecISA

    fake = VecISA.check_build
    with backend.quiet_compilation(), vec_isa.probe_cached():
        assert _checks() == (True, False)
    assert isa_checks == ["good", "bad"] and len(vec_isa.recorded_checks()) == 1
    with vec_isa.probe_cached():  # a new process would read the same record
        assert _checks() == (True, False)
    assert isa_checks == ["good", "bad", "bad"]  # the failed check is tried again
    assert VecISA.check_build is fake  # Inductor's own check outside compilation


def test_the_users_setting_and_the_switch_turn_the_record_off(isa_checks, monkeypatch):
    with vec_isa.probe_cached():
        _checks()
    monkeypatch.setattr(inductor_config.cpp, "vec_isa_ok", True)
    with vec_isa.probe_cached():
        _checks()
    monkeypatch.setattr(inductor_config.cpp, "vec_isa_ok", None)
    monkeypatch.setenv(vec_isa.ENVIRONMENT_SWITCH, "0")
    with vec_isa.probe_cached():
        _checks()
    assert isa_checks.count("good") == 3  # checked every time: the record was not used


def test_the_record_key_names_the_cpu_compiler_and_torch():
    key = vec_isa._key()
    assert torch.__version__ in key and platform.machine() in key
