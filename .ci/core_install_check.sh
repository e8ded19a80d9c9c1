#!/usr/bin/env bash
# Build the wheel, install it (not editable) with only its core dependencies in a fresh virtual
# environment, and run .ci/core_install_check.py there: one SVI step with every exported loss,
# and an ImportError naming the extra for the modules that need one.
# PYTHON picks the interpreter that builds the wheel and the environment (default python3);
# TORCH_CPU the torch requirement installed first (PyTorch's CPU wheel: an unpinned torch pulls
# the multi-gigabyte CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
PYTHON=${PYTHON:-python3}
TORCH_CPU=${TORCH_CPU:-torch==2.13.0}
PIP=(-m pip --disable-pip-version-check)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "core install check: building the wheel"
"$PYTHON" "${PIP[@]}" wheel --quiet --no-deps --wheel-dir "$work/dist" .
wheel=$(ls "$work"/dist/pyro_elbo_ext-*.whl)
echo "core install check: $(basename "$wheel") into a fresh environment with $TORCH_CPU"
"$PYTHON" -m venv "$work/venv"
venv_python="$work/venv/bin/python"
"$venv_python" "${PIP[@]}" install --quiet "$TORCH_CPU"
"$venv_python" "${PIP[@]}" install --quiet "$wheel"
# run from outside the checkout so that `import pyro_elbo_ext` finds the installed wheel
cd "$work"
"$venv_python" "$root/.ci/core_install_check.py"
