# SPDX-License-Identifier: Apache-2.0
"""
The ``metrics.csv`` of a run: one row per evaluation, with the columns :data:`METRICS_FIELDS`
(step, epoch, mean training ``-ELBO`` since the previous row, validation ``-ELBO``, training
seconds so far).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Sequence

from pyro_arm.sbn.files import atomic_write_text

METRICS_FIELDS = ("step", "epoch", "train_loss", "valid_neg_elbo", "train_wall_s")


def read_metrics(path: Path) -> list[dict]:
    """The rows of a ``metrics.csv`` as dicts of numbers (missing values as ``nan``)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for row in rows:
        out.append({k: float(v) if v not in ("", None) else math.nan for k, v in row.items()})
        out[-1]["step"] = int(out[-1]["step"])
    return out


def _csv_text(rows: Sequence[dict], header: bool) -> str:
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=METRICS_FIELDS)
    if header:
        writer.writeheader()
    writer.writerows({k: row[k] for k in METRICS_FIELDS} for row in rows)
    return buf.getvalue()


def write_metrics(path: Path, rows: Sequence[dict]) -> None:
    """Replaces ``path`` atomically by a header and ``rows``."""
    atomic_write_text(path, _csv_text(rows, header=True))


def truncate_metrics(path: Path, step: int) -> None:
    """Keeps the rows up to ``step``: those written after a checkpoint are redone on resume."""
    write_metrics(path, [r for r in read_metrics(path) if r["step"] <= step])


def append_metrics(path: Path, row: dict) -> None:
    """Appends one row (with a header if the file is new)."""
    text = _csv_text([row], header=not path.is_file())
    with open(path, "a", newline="") as f:
        f.write(text)
