# SPDX-License-Identifier: Apache-2.0
"""
Atomic writes: the old file survives a failed write, and no temporary file is left. Files of a
run folder are never opened through a link, nor when they are not regular files.
"""

import errno
import os
import stat

import pytest

from pyro_arm.sbn import files
from pyro_arm.sbn.checkpoint import load_checkpoint
from pyro_arm.sbn.files import atomic_write, atomic_write_bytes, atomic_write_text
from pyro_arm.sbn.metrics import append_metrics, read_metrics
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


def planted(tmp_path, kind: str):
    """A ``kind`` entry named ``entry`` beside a file of the user's: a link to it, a folder, a
    FIFO (opened for writing without a reader, it would block)."""
    victim = tmp_path / "victim"
    victim.write_text("precious")
    path = tmp_path / "entry"
    {
        "link": lambda: path.symlink_to(victim),
        "folder": path.mkdir,
        "fifo": lambda: os.mkfifo(path),
    }[kind]()
    return path, victim


KINDS = {"link": "a symbolic link", "folder": "a folder", "fifo": "a FIFO"}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize(
    "flags", [os.O_RDONLY, os.O_WRONLY | os.O_APPEND | os.O_CREAT, os.O_RDWR | os.O_CREAT]
)
def test_open_regular_refuses_what_is_not_a_regular_file(tmp_path, kind, flags):
    path, victim = planted(tmp_path, kind)
    with pytest.raises(files.UnsafeFile, match=f"entry is {KINDS[kind]}, not a regular file"):
        files.open_regular(path, flags)
    assert victim.read_text() == "precious"
    fd = files.open_regular(tmp_path / "new", flags | os.O_CREAT)
    os.close(fd)
    with pytest.raises(FileNotFoundError):
        files.open_regular(tmp_path / "missing", os.O_RDONLY)


@pytest.mark.parametrize("kind", list(KINDS))
def test_metrics_and_checkpoints_are_not_read_or_written_through_a_link(tmp_path, kind):
    path, victim = planted(tmp_path, kind)
    row = dict(step=1, epoch=0.1, train_loss=1.0, valid_neg_elbo=2.0, train_wall_s=0.5)
    for use in (append_metrics, read_metrics, load_checkpoint):
        args = (path, row) if use is append_metrics else (path,)
        with pytest.raises(files.UnsafeFile, match=KINDS[kind]):
            use(*args)
    assert victim.read_text() == "precious"


def test_an_atomic_write_replaces_a_link_not_its_target(tmp_path):
    path, victim = planted(tmp_path, "link")
    atomic_write_text(path, "new")
    assert victim.read_text() == "precious"
    assert path.read_text() == "new" and not path.is_symlink()
