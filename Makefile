# The README's two commands are `make run` and `make test`; each installs what it needs first.
PYTHON ?= python3
# PyTorch's CPU wheel: an unpinned `torch` would pull the multi-gigabyte CUDA build.
TORCH_CPU ?= torch==2.13.0
PIP = $(PYTHON) -m pip install --quiet --disable-pip-version-check

.PHONY: install run test test-all bench lint

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || { echo "installing $(TORCH_CPU) (CPU wheel)"; $(PIP) "$(TORCH_CPU)"; }
	$(PIP) -e ".[dev]"

# the main job: compare the estimators on a built-in problem, table to the terminal, files to out/
run: install
	$(PYTHON) -m pyro_elbo_ext compare normal_normal --out out

# the test suite as CI runs it (tests marked `slow` are left out; `make test-all` runs them too)
test: install
	$(PYTHON) -m pytest

test-all: install
	$(PYTHON) -m pytest -m ""

bench: install
	$(PYTHON) -m benchmarks.speed

lint:
	$(PYTHON) -m ruff check .
