# SPDX-License-Identifier: Apache-2.0
"""
Runs each tutorial notebook in smoke mode (``CI=1``: few steps, tiny data) and fails on any cell
error. The notebooks are executed as in-memory copies; the committed files are never rewritten.
The README's quick start runs too, as the docs show it.
"""

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = ROOT / "tutorials"
NOTEBOOKS = ["sbn_with_arm.ipynb", "arm_for_your_own_model.ipynb"]
CELL_TIMEOUT_S = 300


def quick_start(text: str, heading: str) -> str:
    """The first Python code block after ``heading``."""
    after = text[text.index(heading) :]
    block = re.search(r"```python\n(.*?)```|\.\. code-block:: python\n\n(.*?)\n\S", after, re.S)
    code = block.group(1) or block.group(2)
    return "\n".join(line[4:] if block.group(2) else line for line in code.splitlines())


def test_readme_quick_start_runs(capsys):
    code = quick_start((ROOT / "README.md").read_text(), "## Quick start")
    docs = quick_start((ROOT / "docs" / "getting_started.rst").read_text(), "Quick start\n")
    assert code.strip() == docs.strip(), "README and docs/getting_started.rst differ"
    exec(compile(code, "README.md", "exec"), {"__name__": "quick_start"})
    assert re.search(r"-ELBO per datapoint after 300 steps: \d+\.\d+ nats", capsys.readouterr().out)


def test_notebooks_are_listed():
    assert sorted(NOTEBOOKS) == sorted(p.name for p in TUTORIALS.glob("*.ipynb"))


def notebook_modules():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    return nbformat, nbclient


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_smoke_mode(name, monkeypatch):
    nbformat, nbclient = notebook_modules()
    path = TUTORIALS / name
    original = path.read_bytes()
    nb = nbformat.read(path, as_version=4)
    # First, a cell that reports the kernel's interpreter: it must be this test's environment
    # (jupyter_client starts a "python" kernelspec with sys.executable).
    check = "import os, sys\nprint(sys.prefix)\nos.environ['CI']"
    nb.cells.insert(0, nbformat.v4.new_code_cell(check))
    monkeypatch.setenv("CI", "1")  # inherited by the kernel: smoke_test = True
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(TUTORIALS)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    first = nb.cells[0].outputs
    printed = "".join(o.get("text", "") for o in first if o.output_type == "stream").strip()
    assert Path(printed).resolve() == Path(sys.prefix).resolve()
    assert nb.cells[1].cell_type == "markdown"
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
    ]
    assert not errors
    assert path.read_bytes() == original


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_has_outputs_and_is_small(name):
    nbformat, _ = notebook_modules()
    path = TUTORIALS / name
    assert path.stat().st_size < 1.5e6
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "commit the executed notebook"
    assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs), (
        "the committed notebook should show its plots"
    )
    assert not any(o.output_type == "error" for c in code for o in c.outputs)
    assert 'smoke_test = "CI" in os.environ' in "".join(c.source for c in code)
