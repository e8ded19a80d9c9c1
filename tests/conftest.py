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


def _devices():
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    return devices


@pytest.fixture(params=_devices())
def device(request):
    """Every available torch device; CUDA is skipped cleanly where there is none."""
    return torch.device(request.param)
