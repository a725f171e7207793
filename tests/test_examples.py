# SPDX-License-Identifier: Apache-2.0
"""The gallery's examples in smoke mode (a few steps each), run as their users run them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn", reason="the optional extra: pip install -e '.[examples]'")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name, tmp_path, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    figure = tmp_path / "fig.png"
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--smoke", "--out", str(figure), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert figure.stat().st_size > 0
    return done.stdout


def test_variable_selection_smoke(tmp_path):
    out = run_example("variable_selection.py", tmp_path)
    assert "collapsed: mean-field optimum" in out
    assert "TraceGraph_ELBO" in out


def test_noisy_or_smoke(tmp_path):
    out = run_example("noisy_or.py", tmp_path)
    assert "20 steps in" in out


def test_mixture_smoke(tmp_path):
    out = run_example("mixture.py", tmp_path)
    assert "TraceEnum_ELBO with the indicator enumerated" in out
    assert "best ELBO found" in out
