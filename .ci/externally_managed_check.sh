#!/usr/bin/env bash
# The README's two commands with a system Python marked externally managed (PEP 668, as
# Debian's and Ubuntu's python3 are): a copy of this checkout in a scratch directory, then
# `make run` and `make test` there with PYTHON set to that interpreter. pip refuses to install
# into such a Python, so the Makefile must make and use the project environment .venv/.
# To keep it short, `make run` compares with 20 evaluations instead of 500 and `make test` runs
# the README's example and the command-line tests that spawn a Python subprocess (they must run
# the environment's interpreter); the whole suite runs in CI's main stage.
# EXTERNALLY_MANAGED_PYTHON picks the interpreter (default: /usr/bin/python3 where it is marked
# externally managed); without one the check is skipped with a message.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

managed() {  # is "$1" a Python whose standard library carries the EXTERNALLY-MANAGED marker?
    "$1" -c 'import os, sys, sysconfig
sys.exit(not (sys.prefix == sys.base_prefix and os.path.isfile(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))))' 2>/dev/null
}

python=${EXTERNALLY_MANAGED_PYTHON:-/usr/bin/python3}
if ! command -v "$python" >/dev/null || ! managed "$python"; then
    if [[ -n ${EXTERNALLY_MANAGED_PYTHON:-} ]]; then
        echo "externally managed check: $python is not a Python marked externally managed" >&2
        exit 1
    fi
    echo "externally managed check: skipped (no externally managed $python on this machine;" \
         "Debian/Ubuntu: apt-get install python3 python3-venv)"
    exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# the checkout as a fresh clone would have it: tracked files and untracked ones git does not ignore
git ls-files -z --cached --others --exclude-standard | tar --null -cf - -T - | tar -xf - -C "$work"
echo "externally managed check: $("$python" --version) at $python, in $work"
cd "$work"
make run PYTHON="$python" RUN_REPEATS=20
test -x .venv/bin/python || { echo "externally managed check: no .venv/ was made" >&2; exit 1; }
make test PYTHON="$python" PYTEST_ARGS="-q -p no:cacheprovider tests/test_readme.py tests/test_cli.py -k 'readme_example or console_script'"
echo "externally managed check: make run and make test passed with $python (in .venv/)"
