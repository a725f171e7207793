#!/usr/bin/env python
# SPDX-License-Identifier: Apache-2.0
"""
Regenerates ``pyro_arm/sbn/datasets/mnist_subset.npz``, the embedded MNIST subset.

Usage::

    python scripts/make_embedded_mnist.py [--source MNIST_DIR] [--out PATH]

``--source`` is a folder with the four standard MNIST IDX files (raw or ``.gz``), or ``download``.
The rule (which images, 4-bit packing) is :data:`pyro_arm.sbn.data.EMBEDDED_RULE` and
:func:`pyro_arm.sbn.data.make_embedded_arrays`; the output is deterministic (fixed zip timestamps).
"""

from __future__ import annotations

import argparse
import io
import zipfile
from pathlib import Path

import numpy as np

from pyro_arm.sbn.data import EMBEDDED_PATH, download_mnist, make_embedded_arrays, read_idx_folder
from pyro_arm.sbn.files import atomic_write_bytes

ROOT = Path(__file__).resolve().parents[1]


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like ``np.savez_compressed`` but byte-for-byte reproducible (fixed member timestamps)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name in sorted(arrays):
            member = io.BytesIO()
            np.lib.format.write_array(
                member, np.ascontiguousarray(arrays[name]), allow_pickle=False
            )
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, member.getvalue(), compresslevel=9)
    atomic_write_bytes(path, buf.getvalue())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--source", required=True, help="MNIST_DIR, or download")
    parser.add_argument("--out", default=str(EMBEDDED_PATH))
    args = parser.parse_args(argv)
    folder = download_mnist() if args.source == "download" else args.source
    arrays = make_embedded_arrays(read_idx_folder(folder))
    out = Path(args.out)
    write_npz(out, arrays)
    sizes = {k: v.shape for k, v in arrays.items()}
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB): {sizes}")


if __name__ == "__main__":
    main()
