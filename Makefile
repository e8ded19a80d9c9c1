# The README's two commands are `make run` and `make test`; each installs what it needs first.
PYTHON ?= python3
# PyTorch's CPU wheel: an unpinned `torch` would pull the multi-gigabyte CUDA build.
TORCH_CPU ?= torch==2.13.0
PIP = $(PYTHON) -m pip install --quiet --disable-pip-version-check
# warnings are errors; no network is needed (no intersphinx, notebooks are not executed)
SPHINXOPTS ?= -W --keep-going -q

.PHONY: install run test test-all bench lint docs core-check

# torch's CPU wheel where no torch is present, then the package (editable) with every extra but
# `bench`: compare, diagnostics, dev (tests, ruff) and docs (Sphinx)
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || { echo "installing $(TORCH_CPU) (CPU wheel)"; $(PIP) "$(TORCH_CPU)"; }
	$(PIP) -e ".[all]"

# the main job: compare the estimators at the starting point and at the exact posterior, on a
# conjugate model and on a hard-attention model; tables to the terminal, CSV/JSON/plots to out/
run: install
	$(PYTHON) -m pyro_elbo_ext compare normal_normal -R 500 --out out
	$(PYTHON) -m pyro_elbo_ext compare random_attention -R 500 --out out

# the test suite as CI runs it (tests marked `slow` are left out; `make test-all` runs them too)
test: install
	$(PYTHON) -m pytest

test-all: install
	$(PYTHON) -m pytest -m ""

# the documentation site, into docs/_build/html (open docs/_build/html/index.html)
docs: install
	$(PYTHON) -m sphinx -b html $(SPHINXOPTS) docs docs/_build/html
	@echo "docs: docs/_build/html/index.html"

# the wheel, installed with only the core dependencies in a fresh environment, trains every loss
core-check:
	PYTHON=$(PYTHON) TORCH_CPU=$(TORCH_CPU) bash .ci/core_install_check.sh

bench: install
	$(PYTHON) -m benchmarks.speed

lint:
	$(PYTHON) -m ruff check .
