# SPDX-License-Identifier: Apache-2.0
"""``examples/svi_lightning_arm.py`` in smoke mode: 3 DDP steps on 2 CPU processes (Lightning)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lightning", reason="the optional extra: pip install -e '.[lightning]'")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "svi_lightning_arm.py"


def test_lightning_example_smoke(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--smoke"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "3 steps on 2 process(es)" in done.stdout
