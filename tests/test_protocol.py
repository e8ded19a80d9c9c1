"""The compile protocol (``elbos/protocol.py``): the one surface between the losses and the
compiled path, which sits on top of them."""

from __future__ import annotations

import ast
from pathlib import Path

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO

import pyro_elbo_ext
from pyro_elbo_ext import (
    AnalyticKLELBO,
    HardAttentionELBO,
    ImportanceWeightedELBO,
    JensenELBO,
)
from pyro_elbo_ext.compiled import backend
from pyro_elbo_ext.compiled.jit import CompiledLosses
from pyro_elbo_ext.elbos import protocol
from pyro_elbo_ext.elbos.protocol import PROTOCOL_METHODS, CompilableLoss, is_compilable
from pyro_elbo_ext.problems import get_problem

PACKAGE = Path(pyro_elbo_ext.__file__).parent
LOSSES = [JensenELBO, AnalyticKLELBO, HardAttentionELBO, ImportanceWeightedELBO]


def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports (relative imports resolved against its package)."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.add(".".join(base + ([node.module] if node.module else [])))
            else:
                found.add(node.module)
    return found


def test_the_losses_import_nothing_of_the_compiled_path():
    for path in sorted((PACKAGE / "elbos").glob("*.py")):
        imported = _imported_modules(path)
        assert not any(m.startswith(("pyro_elbo_ext.compiled", "pyro_elbo_ext.compare",
                                     "pyro_elbo_ext.diagnostics", "pyro_elbo_ext.problems"))
                       for m in imported), path.name


def test_the_compiled_path_reaches_a_loss_only_through_the_adapter():
    """compiled/ calls no private method of a loss (``loss._x``) and writes nothing onto it."""
    for path in sorted((PACKAGE / "compiled").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if node.value.id in ("loss", "carrier") and node.attr.startswith("_"):
                    pytest.fail(f"{path.name}: {node.value.id}.{node.attr}")
            if isinstance(node, (ast.Assign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
                            and target.value.id == "loss"):
                        pytest.fail(f"{path.name} writes loss.{target.attr}")


@pytest.mark.parametrize("loss", LOSSES, ids=lambda c: c.__name__)
def test_every_loss_implements_the_protocol(loss):
    instance = loss()
    assert is_compilable(instance) and isinstance(instance, CompilableLoss)
    before = instance.step_count
    instance.advance_step()
    assert instance.step_count == before + 1
    assert instance.compile_refusal(None, None) is None


def test_pyros_own_elbos_do_not():
    assert not is_compilable(Trace_ELBO())
    assert set(PROTOCOL_METHODS) >= {"eager_differentiable_loss", "advance_step",
                                     "compile_refusal"}


def test_dreg_says_why_it_cannot_be_compiled():
    reason = ImportanceWeightedELBO(estimator="dreg").compile_refusal(None, None)
    assert "tensor hook" in reason and "estimator='iwae'" in reason


def test_jit_reaches_the_compiled_path_through_the_registry(monkeypatch):
    assert protocol.jit_backend() is CompiledLosses
    monkeypatch.setattr(backend, "BACKEND", None)
    problem = get_problem("normal_normal", dtype=torch.float64)
    problem.set_params()
    calls = []

    def factory(loss):
        calls.append(loss)
        return CompiledLosses(loss)

    monkeypatch.setattr(protocol, "_JIT_FACTORY", factory)
    elbo = JensenELBO(jit=True)
    elbo.loss_and_grads(problem.model, problem.guide, *problem.args)
    elbo.loss_and_grads(problem.model, problem.guide, *problem.args)
    assert calls == [elbo]  # one backend per loss, kept by the loss
    assert elbo.step_count == 2


def test_without_a_registered_backend_jit_says_what_to_import(monkeypatch):
    monkeypatch.setattr(protocol, "_JIT_FACTORY", None)
    with pytest.raises(RuntimeError, match="import pyro_elbo_ext.*jit=False"):
        JensenELBO(jit=True).differentiable_loss(lambda: None, lambda: None)
    pyro.clear_param_store()
