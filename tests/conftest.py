"""Shared test set-up: a fixed seed, Pyro validation on, a clean param store per test."""

import pyro
import pytest
import torch

# The suite's tensors are tiny: thread start-up costs more than it saves, and on a busy 2-core
# machine two threads per step made steps several times slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _clean_pyro_state():
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    with pyro.validation_enabled(True):
        yield
    pyro.clear_param_store()


@pytest.fixture(autouse=True)
def _compile_at_once(monkeypatch):
    """CompiledSVI compiles at its first step in the suite (``compile_after=0``): its tests
    check the compiled step, and take far fewer steps than the default deferral of 1,000.  The
    deferral itself is tested with explicit values (``tests/test_compiled_fused.py``)."""
    from pyro_elbo_ext.compiled import svi

    monkeypatch.setattr(svi, "DEFAULT_COMPILE_AFTER", 0)


def _devices():
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    return devices


@pytest.fixture(params=_devices())
def device(request):
    """Every available torch device; CUDA is skipped cleanly where there is none."""
    return torch.device(request.param)
