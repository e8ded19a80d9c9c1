"""Run inside an environment that has the wheel installed with only its core dependencies.

1. The package is the installed wheel (not this checkout) and none of the extras' packages is
   present, so the check proves the core install is enough.
2. One SVI step with every loss that ``pyro_elbo_ext.__all__`` exports (every subclass of
   ``pyro.infer.elbo.ELBO``, in each configuration listed in CONFIGS; a loss added later with no
   entry is run with its default arguments), on a small continuous model and, for the losses of
   latents drawn from the model, a small hard-attention model. Each step must give a finite loss
   and move the parameters.
3. Importing a module that needs an extra fails with an ImportError that names the
   ``pip install`` command (enforced once the package has its extras guard,
   ``pyro_elbo_ext/_extras.py``).

Exits non-zero, with one line per failure, if anything does not hold.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import sys
import sysconfig
import traceback
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI
from pyro.infer.elbo import ELBO

import pyro_elbo_ext

#: packages that only the extras bring; none may be importable in a core install
EXTRA_PACKAGES = {"pandas": "compare", "matplotlib": "compare", "sklearn": "compare",
                  "arviz": "diagnostics", "xarray": "diagnostics"}
#: modules that need an extra, and the extra their ImportError must name
EXTRA_MODULES = {"pyro_elbo_ext.compare": "compare", "pyro_elbo_ext.diagnostics": "diagnostics"}
#: exported ELBO subclasses that are not losses of their own
NOT_A_LOSS = {"SiteTreatmentELBO": "the abstract base class of the losses"}
#: (label, constructor arguments, model kind) per loss; kind "attention" for latents drawn from
#: the model (with empty_guide), "continuous" otherwise
CONFIGS = {
    "JensenELBO": [
        (f"entropy={e!r}", {"entropy": e}, "continuous") for e in ("analytic", "sampled", "path")
    ],
    "AnalyticKLELBO": [("", {}, "continuous")],
    "HardAttentionELBO": [
        ("estimator='enum'", {"estimator": "enum"}, "attention"),
        ("estimator='reinforce'", {"estimator": "reinforce"}, "attention"),
        ("estimator='reinforce', baseline='moving_average'",
         {"estimator": "reinforce", "baseline": "moving_average"}, "attention"),
        ("estimator='reinforce', baseline='learned'",
         {"estimator": "reinforce", "baseline": "learned"}, "attention"),
        ("estimator='reinforce', baseline='leave_one_out'",
         {"estimator": "reinforce", "baseline": "leave_one_out", "num_particles": 2,
          "vectorize_particles": True}, "attention"),
    ],
}

failures: list[str] = []
passes: list[str] = []


def fail(message: str) -> None:
    failures.append(message)
    print(f"FAIL {message}")


def ok(message: str) -> None:
    passes.append(message)
    print(f"ok   {message}")


# --- the continuous model: z ~ N(0, 2), x_i ~ N(z, 1) -------------------------------------------
DATA = 1.3 + torch.randn(50, generator=torch.Generator().manual_seed(0))


def model(data):
    z = pyro.sample("z", dist.Normal(0.0, 2.0))
    with pyro.plate("data", len(data)):
        pyro.sample("obs", dist.Normal(z, 1.0), obs=data)


def guide(data):
    loc = pyro.param("loc", torch.tensor(0.0))
    scale = pyro.param("scale", torch.tensor(1.0), constraint=dist.constraints.positive)
    pyro.sample("z", dist.Normal(loc, scale))


# --- the attention model: l ~ p(l) (3 locations), y | l ~ Bernoulli(sigmoid(w_l . x)) ----------
X = torch.randn(20, 2, generator=torch.Generator().manual_seed(1))
Y = (X[:, 0] > 0).float()


def attention_model(x, y):
    logits_l = pyro.param("logits_l", torch.zeros(3))
    w = pyro.param("w", torch.zeros(3, 2))
    with pyro.plate("data", len(y)):
        where = pyro.sample("l", dist.Categorical(logits=logits_l.expand(len(y), 3)),
                        infer={"baseline_input": x})
        pyro.sample("y", dist.Bernoulli(logits=(w[where] * x).sum(-1)), obs=y)


def one_step(name: str, label: str, cls, kwargs: dict, kind: str) -> None:
    what = f"{name}({label})"
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    try:
        if kind == "attention":
            elbo = cls(max_plate_nesting=1, **kwargs)
            run_model, run_guide, args = attention_model, pyro_elbo_ext.empty_guide, (X, Y)
        else:
            elbo = cls(**kwargs)
            run_model, run_guide, args = model, guide, (DATA,)
        svi = SVI(run_model, run_guide, pyro.optim.Adam({"lr": 0.1}), loss=elbo)
        svi.loss(run_model, run_guide, *args)  # creates the parameters
        before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
        loss = svi.step(*args)
        after = dict(pyro.get_param_store().items())
    except Exception:
        fail(f"{what}: the SVI step raised\n{traceback.format_exc()}")
        return
    if not math.isfinite(loss):
        fail(f"{what}: loss {loss} is not finite")
        return
    moved = [k for k in before if not torch.equal(before[k], after[k].detach())]
    if not moved:
        fail(f"{what}: the step changed no parameter")
        return
    ok(f"{what}: loss {loss:.4g}, moved {', '.join(sorted(moved))}")


def main() -> int:
    here = Path(pyro_elbo_ext.__file__).resolve()
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    print(f"pyro_elbo_ext {pyro_elbo_ext.__version__} from {here.parent}; "
          f"torch {torch.__version__}, pyro {pyro.__version__}")
    if site not in here.parents:
        fail(f"pyro_elbo_ext was imported from {here}, not from the wheel in {site}")
    else:
        ok("imported from the installed wheel")
    if not (here.parent / "py.typed").is_file():
        fail("the installed package has no py.typed")
    else:
        ok("py.typed ships")
    present = [p for p in EXTRA_PACKAGES if importlib.util.find_spec(p) is not None]
    for package in present:
        fail(f"{package} (extra {EXTRA_PACKAGES[package]!r}) is installed: this is not a "
             "core-only environment")
    if not present:
        ok(f"none of the extras' packages is installed ({', '.join(EXTRA_PACKAGES)})")

    losses = []
    for name in pyro_elbo_ext.__all__:
        obj = getattr(pyro_elbo_ext, name)
        if inspect.isclass(obj) and issubclass(obj, ELBO):
            if name in NOT_A_LOSS:
                print(f"skip {name}: {NOT_A_LOSS[name]}")
            else:
                losses.append((name, obj))
    if not losses:
        fail("pyro_elbo_ext.__all__ exports no ELBO subclass")
    for name, cls in losses:
        for label, kwargs, kind in CONFIGS.get(name, [("default arguments", {}, "continuous")]):
            one_step(name, label, cls, kwargs, kind)

    guarded = (here.parent / "_extras.py").is_file()
    for module, extra in EXTRA_MODULES.items():
        try:
            importlib.import_module(module)
        except ImportError as error:
            message = str(error)
            if "pip install" in message and f"[{extra}]" in message:
                ok(f"import {module}: {message}")
            elif guarded:
                fail(f"import {module}: the ImportError does not name "
                     f"\"pip install ...[{extra}]\": {message}")
            else:
                print(f"note import {module}: {message} (not checked: the package has no "
                      "extras guard, pyro_elbo_ext/_extras.py, yet)")
        else:
            fail(f"import {module} succeeded without the {extra!r} extra")

    # the plain closing line CI reads: checks passed and failed
    print(f"core-install: {len(passes)} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
