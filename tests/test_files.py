# SPDX-License-Identifier: Apache-2.0
"""Atomic writes: the old file survives a failed write, and no temporary file is left."""

import errno
import os
import stat

import pytest

from pyro_arm.sbn import files
from pyro_arm.sbn.files import atomic_write, atomic_write_bytes, atomic_write_text
from tests.process_state import process_state_fixture  # noqa: F401  (autouse)


def test_writes_and_replaces(tmp_path):
    path = tmp_path / "sub" / "f.txt"
    assert atomic_write_text(path, "one") == path
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two"
    assert [p.name for p in path.parent.iterdir()] == ["f.txt"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failure_keeps_the_old_file_and_removes_the_temporary(tmp_path, error):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")

    def write(f):
        f.write(b"half")
        raise error

    with pytest.raises(error):
        atomic_write(path, write)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_full_disk_names_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"old")

    def write(f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError, match="No space left on device") as info:
        atomic_write(path, write)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_fsyncs_the_file_and_its_folder(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.stat(fd).st_mode)
        real(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    atomic_write_text(tmp_path / "f.txt", "x")
    assert [stat.S_ISREG(m) for m in synced] == [True, False]  # the file, then the folder
    assert stat.S_ISDIR(synced[1])
