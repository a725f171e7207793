# SPDX-License-Identifier: Apache-2.0
"""Sphinx configuration of the pyro-arm docs (``sphinx-build -W -b html docs docs/_build/html``)."""

import contextlib
import io
import os
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # document the checkout, installed or not

import pyro_arm  # noqa: E402

project = "pyro-arm"
author = "pyro-arm contributors"
copyright = "pyro-arm contributors, Apache-2.0"
version = release = pyro_arm.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_nb",
]

# The tutorials are rendered from the outputs committed in tutorials/*.ipynb, never executed.
# Sphinx reads sources under docs/ only, so they are copied into docs/tutorials/ (git-ignored).
nb_execution_mode = "off"
_TUTORIALS = DOCS / "tutorials"
_TUTORIALS.mkdir(exist_ok=True)
for _nb in sorted((ROOT / "tutorials").glob("*.ipynb")):
    shutil.copy2(_nb, _TUTORIALS / _nb.name)  # keeps the mtime: unchanged files are not re-read
myst_enable_extensions = ["dollarmath", "amsmath"]


def _write_train_help(path: Path) -> None:
    """``pyro-arm train --help`` as the command prints it, for training.rst (git-ignored)."""
    from pyro_arm.sbn.cli import main

    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps at $COLUMNS
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            main(["train", "--help"])
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns
    path.parent.mkdir(exist_ok=True)
    if not path.exists() or path.read_text() != out.getvalue():  # unchanged: not re-read
        path.write_text(out.getvalue())


_write_train_help(DOCS / "_generated" / "pyro-arm-train-help.txt")

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
master_doc = "index"
exclude_patterns = ["_build", "_generated", "**.ipynb_checkpoints"]

autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_typehints = "description"
add_module_names = False

html_theme = "sphinx_rtd_theme"
html_title = f"pyro-arm {release}"
