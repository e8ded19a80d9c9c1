# The README's two commands are `make run` and `make test`; each installs what it needs first.
PYTHON ?= python3
# PyTorch's CPU wheel: an unpinned `torch` would pull the multi-gigabyte CUDA build.
TORCH_CPU ?= torch==2.13.0
# Where the commands install and run: PYTHON itself when it runs inside a virtual environment
# (or an activated conda environment); otherwise a project environment, VENV, made from PYTHON
# with --system-site-packages (so what PYTHON already has, torch included, is not installed
# again). A system Python marked externally managed (PEP 668: Debian's and Ubuntu's python3)
# refuses `pip install` outside an environment; `make VENV=` installs into PYTHON regardless.
VENV ?= .venv
IN_ENV := $(shell $(PYTHON) -c 'import os, sys; print(int(sys.prefix != sys.base_prefix or os.environ.get("CONDA_PREFIX") == sys.prefix))' 2>/dev/null)
ifeq ($(IN_ENV)$(if $(VENV),,none),0)
PY := $(VENV)/bin/python
else
PY := $(PYTHON)
endif
PIP = $(PY) -m pip install --quiet --disable-pip-version-check
# warnings are errors; no network is needed (no intersphinx, notebooks are not executed)
SPHINXOPTS ?= -W --keep-going -q
# evaluations per estimator of `make run` (CI's externally-managed check takes fewer)
RUN_REPEATS ?= 500
# more arguments for pytest (`make test PYTEST_ARGS="-k cli"`)
PYTEST_ARGS ?=

.PHONY: install venv run test test-all bench lint docs core-check

# the project environment (see VENV) where PYTHON is not inside one; nothing otherwise
venv:
ifneq ($(PY),$(PYTHON))
	@test -x $(PY) || { echo "creating the project environment $(VENV)/ (python -m venv --system-site-packages) from $(PYTHON)"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV) || { rm -rf $(VENV); echo "could not create $(VENV)/: install the venv module (Debian/Ubuntu: apt-get install python3-venv), or run make inside an environment" >&2; exit 1; }; }
endif

# torch's CPU wheel where no torch is present, then the package (editable) with every extra but
# `bench`: compare, diagnostics, dev (tests, ruff) and docs (Sphinx)
install: venv
	@$(PY) -c "import torch" 2>/dev/null || { echo "installing $(TORCH_CPU) (CPU wheel)"; $(PIP) "$(TORCH_CPU)"; }
	$(PIP) -e ".[all]"

# the main job: compare the estimators at the starting point and at the exact posterior, on a
# conjugate model and on a hard-attention model, and at K = 4 particles on a small sigmoid belief
# network (discrete sites, exact by enumeration); tables to the terminal, CSV/JSON/plots to out/
run: install
	$(PY) -m pyro_elbo_ext compare normal_normal -R $(RUN_REPEATS) --out out
	$(PY) -m pyro_elbo_ext compare random_attention -R $(RUN_REPEATS) --out out
	$(PY) -m pyro_elbo_ext compare sbn_digits -P latent_dim=6 -P num_data=10 -P num_test=0 \
		-P dtype=float64 --particles 4 -R $(RUN_REPEATS) --out out

# the test suite as CI runs it (tests marked `slow` are left out; `make test-all` runs them too)
test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest -m ""

# the documentation site, into docs/_build/html (open docs/_build/html/index.html)
docs: install
	$(PY) -m sphinx -b html $(SPHINXOPTS) docs docs/_build/html
	@echo "docs: docs/_build/html/index.html"

# the wheel, installed with only the core dependencies in a fresh environment, trains every loss
core-check: venv
	PYTHON=$(PY) TORCH_CPU=$(TORCH_CPU) bash .ci/core_install_check.sh

bench: install
	$(PY) -m benchmarks.speed

lint: venv
	$(PY) -m ruff check .
