#!/usr/bin/env bash
# Sets up a virtual environment (CPU torch first, then the project with every extra) and runs
# ruff, the check that the fast tier runs every estimator on every model family
# (scripts/check_fast_tier.py), the tests and the docs build (warnings are errors).
#   bash scripts/test.sh          the fast tier: pytest -m "not slow" on 2 processes (a budget of
#                                 3 minutes on 2 cores)
#   bash scripts/test.sh --full   every test, on 2 processes (pytest-xdist; the tests of one
#                                 xdist_group, such as the installed wheel's, share a process)
# Other arguments go to pytest. Which tests are slow is decided in tests/conftest.py.
set -euo pipefail
cd "$(dirname "$0")/.."
TIER=(-x -m "not slow" -n 2 --dist loadgroup)
ARGS=()
for arg in "$@"; do
    if [ "$arg" = --full ]; then TIER=(-n 2 --dist loadgroup); else ARGS+=("$arg"); fi
done
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip >/dev/null
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test,docs,bench,lightning,examples]"
ruff check .
ruff format --check .
python scripts/check_fast_tier.py
CI=1 python -m pytest -q "${TIER[@]}" ${ARGS[@]+"${ARGS[@]}"}
sphinx-build -W --keep-going -q -b html docs docs/_build/html
