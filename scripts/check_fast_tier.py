#!/usr/bin/env python
# SPDX-License-Identifier: Apache-2.0
"""
Checks that the fast test tier (``pytest -m "not slow"``) runs every estimator on every model
family at least once:

- ``TraceARM_ELBO``'s estimators (``arm``, ``disarm``, ``ar``, ``rloo``, ``arms``) on every case
  of ``tests/tiny_models.py``;
- ``IWELBO``'s estimators (``vimco``, ``disarm``, ``arms``) on every case of
  ``tests/iw_models.py``.

It collects the fast tier (nothing runs) and reads each test's parameters: a test covers
(estimator, case) when its ``case`` parameter names the case and one of its parameters names the
estimator (``estimator``, or the estimator inside a configuration tuple or options dict). Cases of
test modules that import ``tests.iw_models`` count for ``IWELBO``, the others for
``TraceARM_ELBO``. Prints the missing pairs and exits 1 when there are any.

    python scripts/check_fast_tier.py [-m "not slow"]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import iw_models, tiny_models  # noqa: E402

#: (family, its cases, its estimators)
REQUIRED = {
    "TraceARM_ELBO": (list(tiny_models.CASES), ["arm", "disarm", "ar", "rloo", "arms"]),
    "IWELBO": (list(iw_models.CASES), ["vimco", "disarm", "arms"]),
}
ESTIMATOR_NAMES = {name for _, names in REQUIRED.values() for name in names}


def estimators_of(params: dict) -> set[str]:
    """The estimator names among a test's parameters."""
    found = set()
    for key, value in params.items():
        if isinstance(value, dict):
            values = list(value.values())
        elif isinstance(value, (tuple, list)):
            values = list(value)
        elif key == "estimator":
            values = [value]
        else:
            continue
        found |= {v for v in values if isinstance(v, str) and v in ESTIMATOR_NAMES}
    return found


class Collector:
    """A pytest plugin that records (family, estimator, case) for each selected test."""

    def __init__(self):
        self.covered: dict[tuple[str, str, str], str] = {}
        self.count = 0

    def pytest_collection_finish(self, session):
        self.count = len(session.items)
        for item in session.items:
            params = getattr(getattr(item, "callspec", None), "params", {})
            case = params.get("case")
            if not isinstance(case, str):
                continue
            family = "IWELBO" if hasattr(item.module, "iw_models") else "TraceARM_ELBO"
            for estimator in estimators_of(params):
                self.covered.setdefault((family, estimator, case), item.nodeid)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-m", dest="marks", default="not slow", help='tier (default "not slow")')
    args = parser.parse_args(argv)
    collector = Collector()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        options = ["--collect-only", "-q", "-p", "no:cacheprovider", "-m", args.marks]
        status = pytest.main([*options, str(ROOT / "tests")], plugins=[collector])
    if status != 0 or not collector.count:
        print(out.getvalue()[-4000:])
        print(f"check_fast_tier: collection failed (pytest exit status {int(status)})")
        return 1
    missing = [
        (family, estimator, case)
        for family, (cases, estimators) in REQUIRED.items()
        for estimator in estimators
        for case in cases
        if (family, estimator, case) not in collector.covered
    ]
    total = sum(len(cases) * len(estimators) for cases, estimators in REQUIRED.values())
    for family, estimator, case in missing:
        print(f"check_fast_tier: no {family}(estimator={estimator!r}) test on {case!r}")
    print(
        f"check_fast_tier: {total - len(missing)} of {total} (estimator, model) pairs covered "
        f'by {collector.count} tests of -m "{args.marks}"'
    )
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
