# SPDX-License-Identifier: Apache-2.0
"""
The package as a user installs it: the sdist and the wheel built with ``python -m build``, their
metadata checked with ``twine check``, the wheel installed (not editable) into a fresh virtual
environment with the lowest supported versions of torch and pyro-ppl, and the README's quick
start and ``pyro-arm train`` run there from a folder outside the checkout (full tier: a build,
a venv and a few installs take minutes). The version lives in ``pyro_arm/__init__.py`` alone; the
release files that repeat it are checked against it (fast tier).
"""

import importlib.metadata
import os
import re
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

import pyro_arm
from tests.process_state import process_state_fixture  # noqa: F401  (autouse)
from tests.test_tutorials import quick_start

# one build and one venv for the module, also under pytest-xdist (--dist loadgroup)
pytestmark = pytest.mark.xdist_group("wheel")

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pyro_arm"
DATA = "pyro_arm/sbn/datasets/mnist_subset.npz"
#: The lowest versions that pyproject.toml allows, installed into the wheel's environment.
LOWEST = ["torch==2.13.0", "pyro-ppl==1.9.1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def run(*args, **kwargs) -> subprocess.CompletedProcess:
    """Runs a command, failing the test with its output when it fails."""
    done = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, env=ENV, check=False, **kwargs
    )
    assert done.returncode == 0, f"{args}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done


def package_files() -> set[str]:
    """Every file of the package in the checkout (caches left out), relative to the root."""
    return {
        p.relative_to(ROOT).as_posix()
        for p in PACKAGE.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path]:
    """The sdist and the wheel, built from the checkout (the wheel from the sdist)."""
    out = tmp_path_factory.mktemp("dist")
    done = run(sys.executable, "-m", "build", "--outdir", out, ROOT)
    output = (done.stdout + done.stderr).splitlines()
    warnings = [line for line in output if "deprecat" in line.lower()]
    assert not warnings, "\n".join(warnings)
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return {"sdist": sdist, "wheel": wheel}


@pytest.fixture(scope="module")
def venv(dist, tmp_path_factory) -> Path:
    """A fresh virtual environment holding the wheel, torch 2.13.0 and pyro-ppl 1.9.1."""
    env = tmp_path_factory.mktemp("venv")
    run(sys.executable, "-m", "venv", env)
    python = env / "bin" / "python"
    run(python, "-m", "pip", "install", "-q", "torch==2.13.0")  # the CPU build, first
    run(python, "-m", "pip", "install", "-q", dist["wheel"], *LOWEST)
    return env


def test_release_files_name_the_version_of_the_package():
    version = pyro_arm.__version__
    assert importlib.metadata.version("pyro-arm") == version  # the build read the module
    citation = (ROOT / "CITATION.cff").read_text()
    assert re.search(r"^version: (\S+)$", citation, re.M).group(1) == version
    changelog = (ROOT / "CHANGELOG.md").read_text()
    released = re.findall(r"^## \[(\d[^]]*)\]", changelog, re.M)
    assert released[0] == version, "the newest CHANGELOG.md entry is not this version"
    assert f"[{version}]: " in changelog
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]


@pytest.mark.slow
def test_metadata_passes_twine_check(dist):
    done = run(sys.executable, "-m", "twine", "check", "--strict", dist["sdist"], dist["wheel"])
    assert done.stdout.count("PASSED") == 2


@pytest.mark.slow
def test_wheel_and_sdist_hold_every_package_file(dist):
    with zipfile.ZipFile(dist["wheel"]) as wheel:
        in_wheel = set(wheel.namelist())
        metadata = next(n for n in in_wheel if n.endswith(".dist-info/METADATA"))
        meta = wheel.read(metadata).decode()
    assert DATA in in_wheel, "the embedded MNIST subset is missing from the wheel"
    assert package_files() <= in_wheel, sorted(package_files() - in_wheel)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in in_wheel)
    assert f"Version: {pyro_arm.__version__}\n" in meta
    assert "License-Expression: Apache-2.0\n" in meta
    with tarfile.open(dist["sdist"]) as sdist:
        top = sdist.getnames()[0].split("/")[0]
        in_sdist = {name.removeprefix(top + "/") for name in sdist.getnames()}
    assert {DATA, "LICENSE", "README.md", "pyproject.toml"} <= in_sdist
    assert package_files() <= in_sdist, sorted(package_files() - in_sdist)


@pytest.mark.slow
def test_installed_wheel_runs_the_quick_start_outside_the_checkout(venv, tmp_path):
    python = venv / "bin" / "python"
    where = run(
        python, "-c",
        "import importlib.metadata as m, pyro, torch, pyro_arm; "
        "print(pyro_arm.__file__, pyro_arm.__version__, m.version('pyro-arm'), "
        "pyro.__version__, torch.__version__.split('+')[0])",
        cwd=tmp_path,
    ).stdout.split()  # fmt: skip
    assert Path(where[0]).is_relative_to(venv), where  # the installed copy, not the checkout
    assert where[1:] == [pyro_arm.__version__, pyro_arm.__version__, "1.9.1", "2.13.0"]
    code = quick_start((ROOT / "README.md").read_text(), "## Quick start")
    (tmp_path / "quick_start.py").write_text(code)
    done = run(python, "quick_start.py", cwd=tmp_path)
    assert "-ELBO per datapoint after 300 steps:" in done.stdout


@pytest.mark.slow
def test_installed_wheel_trains_on_the_embedded_data(venv, tmp_path):
    run_dir = tmp_path / "run"
    run(venv / "bin" / "pyro-arm", "train", "--steps", "50", "--run-dir", run_dir, cwd=tmp_path)
    assert {"summary.json", "metrics.csv", "checkpoint.pt"} <= {p.name for p in run_dir.iterdir()}
