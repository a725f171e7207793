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
import os
from pathlib import Path
from typing import Sequence

from pyro_arm.sbn.config import ConfigError
from pyro_arm.sbn.files import atomic_write_text, open_regular

METRICS_FIELDS = ("step", "epoch", "train_loss", "valid_neg_elbo", "train_wall_s")


def _parse_row(path: Path, line: int, row: dict) -> dict:
    try:
        if None in row or any(row.get(k) in ("", None) for k in METRICS_FIELDS):
            raise ValueError
        out = {k: float(row[k]) for k in METRICS_FIELDS}
        out["step"] = int(row["step"])
    except ValueError:
        text = ",".join(str(v) for v in row.values() if v is not None)[:60]
        raise ConfigError(
            f"{path} line {line} is not a metrics row ({text!r}); delete that line and the ones "
            "after it, then --resume again"
        ) from None
    if not math.isfinite(out["step"]) or out["step"] < 0:
        raise ConfigError(f"{path} line {line}: bad step {row['step']!r}")
    return out


def read_metrics(path: Path, *, drop_torn: bool = False) -> list[dict]:
    """
    The rows of a ``metrics.csv`` as dicts of numbers.

    :param drop_torn: drop a last line without its newline: a row cut off by a killed run
        (always one after the last checkpoint, which is written after its row).
    :raises ConfigError: on a malformed row or header, naming the file and line.
    :raises UnsafeFile: if ``path`` is a link or not a regular file.
    """
    try:
        fd = open_regular(path, os.O_RDONLY)
    except FileNotFoundError:
        return []
    with open(fd, "rb") as f:
        text = f.read().decode("utf-8", errors="replace")
    if drop_torn and text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if text and tuple(reader.fieldnames or ()) != METRICS_FIELDS:
        raise ConfigError(f"{path} does not start with the header {','.join(METRICS_FIELDS)}")
    rows = [_parse_row(path, reader.line_num, row) for row in reader]
    return rows


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
    rows = read_metrics(path, drop_torn=True)
    write_metrics(path, [r for r in rows if r["step"] <= step])


def append_metrics(path: Path, row: dict) -> None:
    """Appends one row (with a header if the file is new); never through a link."""
    fd = open_regular(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    with open(fd, "ab") as f:
        f.write(_csv_text([row], header=os.fstat(fd).st_size == 0).encode("utf-8"))
