# SPDX-License-Identifier: Apache-2.0
"""MNIST data: IDX parsing and validation, download with checksums, embedded subset, batches."""

import gzip
import hashlib
import io
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_arm.sbn import data
from pyro_arm.sbn.data import (
    EMBEDDED_PATH,
    DataError,
    MNISTData,
    download_mnist,
    load_mnist,
    make_embedded_arrays,
    parse_idx,
    read_embedded,
    read_idx_folder,
)


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def fake_mnist(n_train=10_012, n_test=7, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }


def write_folder(folder: Path, arrays: dict, gz=True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for key, (stem, _) in data.MNIST_FILES.items():
        raw = idx_bytes(arrays[key])
        if gz:
            (folder / (stem + ".gz")).write_bytes(gzip.compress(raw, mtime=0))
        else:
            (folder / stem).write_bytes(raw)
    return folder


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    arrays = fake_mnist()
    return arrays, write_folder(tmp_path_factory.mktemp("mnist"), arrays)


# ---------------------------------------------------------------------------------------------
# IDX files


def test_parse_idx_roundtrip():
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(parse_idx(idx_bytes(a)), a)


@pytest.mark.parametrize(
    "raw,match",
    [
        (b"\x00\x00", "not an IDX file"),
        (b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00", "not an IDX file of unsigned bytes"),
        (b"\x12\x34\x08\x01\x00\x00\x00\x01\x00", "not an IDX file"),
        (b"\x00\x00\x08\x02\x00\x00\x00\x01", "truncated IDX header"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x05abc", "truncated"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x02abc", "trailing data"),
    ],
)
def test_parse_idx_rejects_malformed(raw, match):
    with pytest.raises(DataError, match=match) as info:
        parse_idx(raw, name="some-file")
    assert "some-file" in str(info.value)


@pytest.mark.parametrize("gz", [True, False])
def test_read_folder_and_splits(tmp_path, gz):
    arrays = fake_mnist()
    folder = write_folder(tmp_path / "m", arrays, gz=gz)
    out = read_idx_folder(folder)
    np.testing.assert_array_equal(out["train_images"], arrays["train_images"].reshape(-1, 784))
    np.testing.assert_array_equal(out["test_labels"], arrays["test_labels"])
    d = load_mnist(folder)
    assert (d.num_examples("train"), d.num_examples("valid"), d.num_examples("test")) == (
        12,
        10_000,
        7,
    )
    # the validation split is the last 10,000 training images; threshold is byte >= 128
    flat = arrays["train_images"].reshape(-1, 784)
    expected = torch.from_numpy((flat[12:] >= 128).astype(np.float32))
    assert torch.equal(d.valid, expected)
    assert torch.equal(d.train, torch.from_numpy((flat[:12] > 127.5).astype(np.float32)))
    np.testing.assert_array_equal(d.labels["valid"], arrays["train_labels"][12:])


def test_truncated_file_names_the_file(tmp_path):
    folder = write_folder(tmp_path / "m", fake_mnist())
    path = folder / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(DataError, match="truncated") as info:
        load_mnist(folder)
    assert str(path) in str(info.value)


def test_corrupt_gzip_names_the_file(tmp_path):
    folder = write_folder(tmp_path / "m", fake_mnist())
    path = folder / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(DataError, match="corrupt") as info:
        load_mnist(folder)
    assert str(path) in str(info.value)


def test_wrong_shapes_and_counts(tmp_path):
    arrays = fake_mnist()
    arrays["test_labels"] = arrays["test_labels"][:3]
    with pytest.raises(DataError, match="7 test images but 3 labels"):
        read_idx_folder(write_folder(tmp_path / "a", arrays))
    arrays = fake_mnist()
    arrays["test_images"] = np.zeros((7, 20, 20), np.uint8)
    with pytest.raises(DataError, match="28x28"):
        read_idx_folder(write_folder(tmp_path / "b", arrays))
    with pytest.raises(DataError, match="more than 10000 training images"):
        read_idx_folder(write_folder(tmp_path / "c", fake_mnist(n_train=100)))


def test_missing_folder_and_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_mnist(tmp_path / "nowhere")
    folder = write_folder(tmp_path / "m", fake_mnist())
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="no file t10k-labels-idx1-ubyte"):
        load_mnist(folder)


def test_data_naming_a_file(tmp_path):
    path = tmp_path / "mnist.gz"
    path.write_bytes(b"x")
    with pytest.raises(DataError, match=r"--data .*mnist.gz is a file, not a folder"):
        load_mnist(path)


def test_unknown_binarization():
    with pytest.raises(DataError, match="unknown binarization"):
        load_mnist("embedded", "otsu")


# ---------------------------------------------------------------------------------------------
# Download


@pytest.fixture
def fake_remote(tmp_path, monkeypatch):
    """A folder of gzip files served by a fake mirror, with MNIST_FILES checksums patched."""
    arrays = fake_mnist(seed=1)
    remote = write_folder(tmp_path / "remote", arrays)
    files = {
        key: (stem, hashlib.md5(idx_bytes(arrays[key])).hexdigest())
        for key, (stem, _) in data.MNIST_FILES.items()
    }
    monkeypatch.setattr(data, "MNIST_FILES", files)
    return arrays, remote


def test_download_from_file_url(fake_remote, tmp_path):
    arrays, remote = fake_remote
    cache = tmp_path / "cache"
    folder = download_mnist(cache, mirrors=(remote.as_uri() + "/",))
    assert folder == cache
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        stem + ".gz" for stem, _ in data.MNIST_FILES.values()
    )
    out = read_idx_folder(cache)
    np.testing.assert_array_equal(out["train_labels"], arrays["train_labels"])


class FakeOpener:
    """urlopen stand-in: serves files from a folder for URLs under ``good/``, fails otherwise."""

    def __init__(self, remote: Path, corrupt: bool = False):
        self.remote, self.corrupt, self.calls = remote, corrupt, []

    def __call__(self, url, timeout=None):
        self.calls.append(url)
        if not url.startswith("https://good/"):
            raise OSError("connection refused")
        payload = (self.remote / url.rsplit("/", 1)[1]).read_bytes()
        if self.corrupt:
            payload = gzip.compress(gzip.decompress(payload)[:-1] + b"\x01")
        return io.BytesIO(payload)


def test_download_falls_back_to_next_mirror_and_caches(fake_remote, tmp_path):
    _, remote = fake_remote
    cache = tmp_path / "cache"
    opener = FakeOpener(remote)
    download_mnist(cache, mirrors=("https://bad/", "https://good/"), opener=opener)
    assert len(opener.calls) == 8  # each file: bad mirror, then good one
    assert not list(cache.glob("*.tmp"))
    again = FakeOpener(remote)
    download_mnist(cache, mirrors=("https://good/",), opener=again)
    assert again.calls == []  # valid cached files are not fetched again
    # a damaged cached file is fetched again
    damaged = cache / "t10k-labels-idx1-ubyte.gz"
    damaged.write_bytes(b"junk")
    download_mnist(cache, mirrors=("https://good/",), opener=again)
    assert again.calls == ["https://good/t10k-labels-idx1-ubyte.gz"]
    assert read_idx_folder(cache)["test_labels"].shape == (7,)


def test_download_checksum_mismatch(fake_remote, tmp_path):
    _, remote = fake_remote
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="checksum mismatch"):
        download_mnist(cache, mirrors=("https://good/",), opener=FakeOpener(remote, corrupt=True))
    assert not cache.exists() or not list(cache.iterdir())


def test_download_unreachable(fake_remote, tmp_path):
    _, remote = fake_remote
    with pytest.raises(DataError, match="could not download .*--data"):
        download_mnist(tmp_path / "c", mirrors=("https://bad/",), opener=FakeOpener(remote))


def test_load_download_uses_cache_dir(fake_remote, tmp_path, monkeypatch):
    _, remote = fake_remote
    mirror = remote.as_uri() + "/"
    monkeypatch.setattr(
        data, "download_mnist", lambda cache: download_mnist(cache, mirrors=(mirror,))
    )
    d = load_mnist("download", cache_dir=tmp_path / "cache")
    assert d.num_examples("test") == 7


def test_a_raw_file_in_the_cache_is_checksummed(fake_remote, tmp_path, monkeypatch):
    _, remote = fake_remote
    mirror = remote.as_uri() + "/"
    monkeypatch.setattr(
        data, "download_mnist", lambda cache: download_mnist(cache, mirrors=(mirror,))
    )
    cache = tmp_path / "cache"
    assert load_mnist("download", cache_dir=cache).num_examples("test") == 7
    # a valid IDX file, but not the published one: read before the .gz, so it must be checked
    stem = "t10k-labels-idx1-ubyte"
    (cache / stem).write_bytes(idx_bytes(np.zeros(7, dtype=np.uint8)))
    with pytest.raises(DataError, match=rf"{stem} fails its checksum .*delete it"):
        load_mnist("download", cache_dir=cache)
    # the same bytes in a --data folder are read unchecked (any dataset in the MNIST layout)
    assert read_idx_folder(cache)["test_labels"].tolist() == [0] * 7


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("PYRO_ARM_CACHE", str(tmp_path))
    assert data.default_cache_dir() == tmp_path / "mnist"
    monkeypatch.delenv("PYRO_ARM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.default_cache_dir() == tmp_path / "xdg" / "pyro-arm" / "mnist"


# ---------------------------------------------------------------------------------------------
# Embedded subset


def test_embedded_file_is_small_and_pickle_free():
    assert EMBEDDED_PATH.stat().st_size <= 3_000_000
    with np.load(EMBEDDED_PATH, allow_pickle=False) as npz:
        assert all(npz[k].dtype != object for k in npz.files)


def test_embedded_load():
    d = load_mnist()
    assert (d.num_examples("train"), d.num_examples("valid"), d.num_examples("test")) == (
        10_000,
        2_000,
        2_000,
    )
    for x in (d.train, d.valid, d.test):
        assert x.dtype == torch.float32 and x.shape[1] == 784
        assert ((x == 0) | (x == 1)).all() and x.any()
    mean = d.train_pixel_mean()
    assert mean.shape == (784,) and 0.1 < mean.mean() < 0.16
    assert torch.allclose(mean, d.train.mean(0))
    dyn = load_mnist(binarization="dynamic")
    assert dyn.train.min() == 0.0 and dyn.train.max() == 1.0
    q = dyn.valid * 15  # 4-bit intensities q / 15
    assert torch.allclose(q, q.round(), atol=1e-4) and len(q.round().unique()) == 16
    assert torch.equal((dyn.train >= 0.5).float(), d.train)


def test_embedded_matches_the_idx_files(mnist_dir):
    arrays = read_idx_folder(mnist_dir)
    expected = make_embedded_arrays(arrays)
    stored = read_embedded()
    for split in ("train", "valid", "test"):
        q = data._unpack_nibbles(expected[split + "_q4"])
        np.testing.assert_array_equal(stored[split][0], q * 17)
        np.testing.assert_array_equal(stored[split][1], expected[split + "_labels"])
    full, emb = load_mnist(mnist_dir), load_mnist()
    assert torch.equal(full.probs("train", np.arange(10_000)), emb.train)
    assert torch.equal(full.probs("valid", np.arange(2_000)), emb.valid)
    assert torch.equal(full.probs("test", np.arange(2_000)), emb.test)
    assert (full.num_examples("train"), full.num_examples("valid")) == (50_000, 10_000)


def test_mnist_files_have_the_published_checksums(mnist_dir):
    for stem, md5 in data.MNIST_FILES.values():
        content = gzip.decompress((mnist_dir / (stem + ".gz")).read_bytes())
        assert hashlib.md5(content).hexdigest() == md5


def test_bad_embedded_file(tmp_path):
    bad = tmp_path / "x.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="reinstall"):
        read_embedded(bad)
    np.savez(tmp_path / "y.npz", train_q4=np.zeros((2, 392), np.uint8))
    with pytest.raises(DataError, match="missing array"):
        read_embedded(tmp_path / "y.npz")


# ---------------------------------------------------------------------------------------------
# Batches


def small_data(binarization):
    rng = np.random.default_rng(0)
    images = {
        s: rng.integers(0, 256, (n, 784), dtype=np.uint8)
        for s, n in (("train", 23), ("valid", 5), ("test", 5))
    }
    labels = {s: np.zeros(len(a), np.uint8) for s, a in images.items()}
    return MNISTData(images, labels, binarization)


def test_batches_threshold():
    d = small_data("threshold")
    batches = list(d.batches("train", 10, generator=torch.Generator().manual_seed(0)))
    assert [b.shape for b in batches] == [(10, 784), (10, 784), (3, 784)]
    assert all(b.dtype == torch.float32 for b in batches)
    # a permutation of the training images
    rows = torch.cat(batches)
    assert torch.equal(rows.sum(0), d.train.sum(0))
    again = list(d.batches("train", 10, generator=torch.Generator().manual_seed(0)))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    ordered = list(d.batches("train", 10, shuffle=False, drop_last=True))
    assert len(ordered) == 2 and torch.equal(ordered[0], d.train[:10])


def test_batches_dynamic_redraws():
    d = small_data("dynamic")
    g = torch.Generator().manual_seed(0)
    a = next(d.batches("test", 5, shuffle=False, generator=g))
    b = next(d.batches("test", 5, shuffle=False, generator=g))
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(a, b)
    assert torch.equal(d.fixed("test"), d.fixed("test"))
    assert not torch.equal(d.fixed("test", seed=1), d.fixed("test"))
    # the draws follow the intensities
    many = torch.stack([d.batch("train", np.arange(23), generator=g) for _ in range(400)])
    assert (many.mean(0) - d.train).abs().max() < 0.15


def test_batches_device_and_bad_split():
    d = small_data("threshold")
    b = next(d.batches("valid", 4, device=torch.device("cpu")))
    assert b.device.type == "cpu"
    with pytest.raises(ValueError, match="unknown split"):
        d.num_examples("training")


# ---------------------------------------------------------------------------------------------
# Files read to their declared size

#: Zeros past the declared data in the bombs below (each a few KB of gzip per 16 MiB).
BOMB_BYTES = 512 * 2**20


def idx_header(*dims: int) -> bytes:
    return bytes([0, 0, 0x08, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)


def gzip_bomb(path: Path, header: bytes, zeros: int) -> None:
    """A gzip file of ``header`` and ``zeros`` zero bytes, in members of 16 MiB, each compressed
    once and repeated (a gzip file may hold several members)."""
    block = gzip.compress(bytes(16 * 2**20), mtime=0)
    with open(path, "wb") as f:
        f.write(gzip.compress(header, mtime=0))
        for _ in range(zeros // (16 * 2**20)):
            f.write(block)


def peak_memory(fn) -> int:
    """The peak of Python's allocations while ``fn()`` runs (numpy's included)."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def refused(folder: Path) -> str:
    with pytest.raises(DataError) as info:
        load_mnist(folder)
    return str(info.value)


@pytest.mark.parametrize(
    "count, message",
    [
        (60_000, "file has trailing data: the header declares (60000, 28, 28)"),
        (10**6, "its header declares 1000000 x 28 x 28, not at most 60,000 images of 28x28 pixels"),
    ],
    ids=["declared-size", "huge-count"],
)
def test_a_gzip_bomb_is_refused_without_being_read(tmp_path, count, message):
    """Gigabytes of zeros behind a header: refused, naming the file, decompressing no more than
    the header may declare (MNIST's 47 MB of training images at most)."""
    folder = write_folder(tmp_path / "m", fake_mnist())
    path = folder / "train-images-idx3-ubyte.gz"
    gzip_bomb(path, idx_header(count, 28, 28), BOMB_BYTES)
    errors = []
    peak = peak_memory(lambda: errors.append(refused(folder)))
    assert errors[0].startswith(f"{path}: ") and message in errors[0]
    assert "\n" not in errors[0]
    assert peak < 2 * 60_000 * 784, peak  # twice the most the header may declare, at most


def test_a_sparse_file_larger_than_its_header_is_refused_unread(tmp_path):
    folder = write_folder(tmp_path / "m", fake_mnist(), gz=False)
    path = folder / "train-images-idx3-ubyte"
    with open(path, "r+b") as f:
        f.truncate(BOMB_BYTES)  # a hole: reads as zeros, takes no disk
    errors = []
    peak = peak_memory(lambda: errors.append(refused(folder)))
    assert errors[0] == (
        f"{path}: file has trailing data: the header declares (10012, 28, 28) = 7849408 bytes of "
        "data, found more (download it again)"
    )
    assert peak < 2 * 10_012 * 784, peak


@pytest.mark.parametrize(
    "key, dims, what",
    [
        (
            "test_images",
            (10_001, 28, 28),
            "10001 x 28 x 28, not at most 10,000 images of 28x28 pixels",
        ),
        (
            "train_images",
            (12, 28, 28, 1),
            "12 x 28 x 28 x 1, not at most 60,000 images of 28x28 pixels",
        ),
        ("train_labels", (10_012, 1), "10012 x 1, not at most 60,000 labels"),
        ("test_labels", (10_001,), "10001, not at most 10,000 labels"),
    ],
)
def test_a_header_with_other_dims_is_refused_before_its_data(tmp_path, key, dims, what):
    """The header is checked first: the data it declares is never read (here it is missing)."""
    folder = write_folder(tmp_path / "m", fake_mnist())
    path = folder / (data.MNIST_FILES[key][0] + ".gz")
    path.write_bytes(gzip.compress(idx_header(*dims), mtime=0))
    assert refused(folder) == (
        f"{path}: its header declares {what}; it is not an MNIST file (download it again)"
    )
