#!/usr/bin/env bash
# Set up a virtual environment (CPU torch first, then the project) and run lint, tests and the
# docs build (warnings are errors). Extra arguments go to pytest (e.g. -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip >/dev/null
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test,docs,bench,lightning]"
ruff check .
ruff format --check .
CI=1 python -m pytest -q -x "$@"
sphinx-build -W --keep-going -q -b html docs docs/_build/html
