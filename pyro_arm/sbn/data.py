# SPDX-License-Identifier: Apache-2.0
"""
Binarized MNIST for sigmoid belief networks: readers, a checked download and an embedded subset.

Three sources, one API (:func:`load_mnist` returns an :class:`MNISTData`):

- ``"embedded"`` (the default): a 14,000-image subset shipped in the package as
  ``pyro_arm/sbn/datasets/mnist_subset.npz`` (about 1.3 MB), so that everything runs offline.
  The exact rule (see ``scripts/make_embedded_mnist.py``, which regenerates it bit for bit):

  * ``train``: training images 0 .. 9,999 (the first 10,000 of the 60,000);
  * ``valid``: training images 50,000 .. 51,999 (the first 2,000 of the standard validation
    split, the last 10,000 training images);
  * ``test``: test images 0 .. 1,999 (the first 2,000 of the 10,000).

  Pixels are stored as 4-bit intensities ``q = byte >> 4`` (two per byte, high nibble first) and
  read back as ``q * 17``, i.e. intensity ``q / 15``. ``q >= 8`` exactly when ``byte >= 128``, so
  the ``"threshold"`` binarization of the embedded subset equals that of the original images;
  ``"dynamic"`` binarization draws from intensities within 15/255 of the originals.
  Labels are kept too.
- a folder holding the four standard IDX files (``train-images-idx3-ubyte`` etc., raw or ``.gz``),
  e.g. ``~/data/mnist``. Each file is read to the size its header declares and no further (a
  ``.gz`` file is decompressed no further), after its header's dims are checked against MNIST's
  (:data:`IDX_SHAPES`: images of 28x28 pixels, at most 60,000 training and 10,000 test items);
  a malformed, truncated or undecompressable file, one whose header declares other dims, or one
  longer than its header says (a gzip bomb, a sparse file) raises :class:`DataError` naming it,
  without reading it all into memory. Any dataset in the MNIST layout (e.g. Fashion-MNIST)
  reads the same way.
- ``"download"``: fetches the gzip files into a cache folder (``$PYRO_ARM_CACHE/mnist``, else
  ``$XDG_CACHE_HOME/pyro-arm/mnist``, else ``~/.cache/pyro-arm/mnist``), checks the MD5 of the
  decompressed content against the published values, and writes each file atomically. The files
  read back from the cache are checked again, a raw (uncompressed) file put there included.

Splits: ``train`` is the first 50,000 training images, ``valid`` the last 10,000, ``test`` the
10,000 test images (the embedded subset follows the same rule on fewer images).

Binarizations (the ARM paper's two MNIST variants):

- ``"threshold"``: pixel intensity ``> 0.5`` (``byte >= 128``), fixed once;
- ``"dynamic"``: a fresh Bernoulli draw of the intensities every time a batch is drawn. For
  evaluation, :meth:`MNISTData.fixed` gives one draw with a fixed seed, the same on every call.

Nothing here loads a pickle: the embedded file is read with ``np.load(..., allow_pickle=False)``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Callable, Optional, Union

import numpy as np
import torch
from torch import Tensor

from pyro_arm.sbn.files import atomic_write_bytes

#: The splits of an :class:`MNISTData`.
SPLITS = ("train", "valid", "test")
#: The binarizations :func:`load_mnist` knows.
BINARIZATIONS = ("threshold", "dynamic")
#: Number of pixels of one image.
NUM_PIXELS = 784
#: Size of the standard validation split (the last training images).
NUM_VALID = 10_000

#: The standard file names and the MD5 of their *decompressed* content.
MNIST_FILES: dict[str, tuple[str, str]] = {
    "train_images": ("train-images-idx3-ubyte", "6bbc9ace898e44ae57da46a324031adb"),
    "train_labels": ("train-labels-idx1-ubyte", "a25bea736e30d166cdddb491f175f624"),
    "test_images": ("t10k-images-idx3-ubyte", "2646ac647ad5339dbf082846283269ea"),
    "test_labels": ("t10k-labels-idx1-ubyte", "27ae3e4e09519cfbb04c329615203637"),
}

#: Mirrors tried in turn by :func:`download_mnist` (each holds ``<name>.gz``).
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

#: The embedded subset, relative to the package.
EMBEDDED_PATH = Path(__file__).resolve().parent / "datasets" / "mnist_subset.npz"
#: Which original images the embedded subset holds: ``split -> (file, start, stop)``.
EMBEDDED_RULE: dict[str, tuple[str, int, int]] = {
    "train": ("train", 0, 10_000),
    "valid": ("train", 50_000, 52_000),
    "test": ("test", 0, 2_000),
}

#: The dims each MNIST file may declare: ``(max_count, item_dims)``, the largest count being the
#: standard file's (a file of fewer images, a subset, reads too).
IDX_SHAPES: dict[str, tuple[int, tuple[int, ...]]] = {
    "train_images": (60_000, (28, 28)),
    "train_labels": (60_000, ()),
    "test_images": (10_000, (28, 28)),
    "test_labels": (10_000, ()),
}

_IDX_DTYPES = {0x08: np.uint8}


class DataError(ValueError):
    """A data source is missing, malformed or fails its checksum; the message says what to do."""


# ----------------------------------------------------------------------------------------------
# IDX files


def _read_header(f: BinaryIO, name: str) -> tuple[bytes, tuple[int, ...]]:
    """The header of an IDX file (magic number and dims) and its dims, read from ``f``."""
    magic = f.read(4)
    if len(magic) < 4:
        raise DataError(f"{name}: not an IDX file (only {len(magic)} bytes)")
    zero, dtype_code, ndim = int.from_bytes(magic[:2], "big"), magic[2], magic[3]
    if zero != 0 or dtype_code not in _IDX_DTYPES or not 1 <= ndim <= 4:
        raise DataError(f"{name}: not an IDX file of unsigned bytes (magic {magic.hex()})")
    raw_dims = f.read(4 * ndim)
    if len(raw_dims) < 4 * ndim:
        raise DataError(f"{name}: truncated IDX header")
    dims = tuple(int.from_bytes(raw_dims[4 * i : 4 * i + 4], "big") for i in range(ndim))
    return magic + raw_dims, dims


def _check_dims(name: str, dims: tuple[int, ...], expected: tuple[int, tuple[int, ...]]) -> None:
    """:raises DataError: if ``dims`` are not ``(count, *item)`` with ``count <= max_count``, for
    ``expected = (max_count, item)``."""
    max_count, item = expected
    if len(dims) == 1 + len(item) and dims[1:] == item and dims[0] <= max_count:
        return
    what = f"images of {'x'.join(map(str, item))} pixels" if item else "labels"
    declared = " x ".join(map(str, dims))
    raise DataError(
        f"{name}: its header declares {declared}, not at most {max_count:,} {what}; it is not "
        "an MNIST file (download it again)"
    )


def read_idx(
    f: BinaryIO,
    *,
    name: str = "<bytes>",
    expected: Optional[tuple[int, tuple[int, ...]]] = None,
    update: Optional[Callable[[bytes], object]] = None,
) -> np.ndarray:
    """
    Reads an IDX file (unsigned-byte data only, as MNIST uses) from the binary stream ``f`` (a
    file, or a :class:`gzip.GzipFile`, which then decompresses no further than the header
    declares): the header, then exactly the bytes it declares, then one more byte to make sure
    there is none.

    :param name: the file's name, for error messages.
    :param expected: ``(max_count, item_dims)``: the dims the header must declare, checked before
        the data is read (:data:`IDX_SHAPES`); None takes any dims.
    :param update: called with the content, header then data (a checksum's ``update``).
    :returns: a ``uint8`` array of the shape the header declares.
    :raises DataError: on a bad magic number, an unsupported type, unexpected dims, or a file
        shorter or longer than its header says.
    """
    header, dims = _read_header(f, name)
    if expected is not None:
        _check_dims(name, dims, expected)
    size = math.prod(dims)
    data = f.read(size)
    if len(data) < size or f.read(1):
        what = "truncated" if len(data) < size else "has trailing data"
        found = str(len(data)) if len(data) < size else "more"
        raise DataError(
            f"{name}: file {what}: the header declares {dims} = {size} bytes of data, "
            f"found {found} (download it again)"
        )
    if update is not None:
        update(header)
        update(data)
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def parse_idx(raw: bytes, *, name: str = "<bytes>") -> np.ndarray:
    """
    Parses the content of an IDX file (:func:`read_idx` on bytes in memory).

    :param raw: the decompressed file content.
    :param name: the file's name, for error messages.
    :returns: a ``uint8`` array of the shape the header declares.
    :raises DataError: on a bad magic number, an unsupported type or a size mismatch.
    """
    return read_idx(io.BytesIO(raw), name=name)


def read_idx_file(
    path: Path,
    expected: Optional[tuple[int, tuple[int, ...]]] = None,
    update: Optional[Callable[[bytes], object]] = None,
) -> np.ndarray:
    """
    :func:`read_idx` of the file ``path`` (raw, or gzip if its name ends in ``.gz``): nothing
    past the size its header declares is read or decompressed.

    :raises DataError: naming ``path``, also if it cannot be read or decompressed, or if memory
        runs out.
    """
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            return read_idx(f, name=str(path), expected=expected, update=update)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read {path}: {e} (the file is corrupt; download it again)") from e
    except MemoryError:
        raise DataError(
            f"out of memory reading {path}; give the process more memory (the file holds "
            "MNIST's sizes at most)"
        ) from None


def _find(folder: Path, stem: str) -> Path:
    for candidate in (folder / stem, folder / (stem + ".gz")):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"{folder}: no file {stem} or {stem}.gz; point --data at a folder holding the four "
        "standard MNIST IDX files, or use --data download"
    )


def _check_md5(path: Path, found: str, md5: str) -> None:
    if found != md5:
        raise DataError(
            f"{path} fails its checksum (MD5 {found}, expected {md5}); delete it and run "
            "again to download it anew"
        )


def read_idx_folder(
    folder: Union[str, os.PathLike], *, verify: bool = False
) -> dict[str, np.ndarray]:
    """
    Reads the four standard MNIST IDX files (raw or ``.gz``) from ``folder``.

    :param verify: check the MD5 of each file's (decompressed) content against
        :data:`MNIST_FILES`, raw files included (the download cache is read so).
    :returns: ``{"train_images": (60000, 784) uint8, "train_labels": (60000,) uint8,
        "test_images": ..., "test_labels": ...}`` (the counts the headers declare, at most
        MNIST's: :data:`IDX_SHAPES`).
    :raises DataError: if the folder or a file is missing, malformed, declares other dims than
        :data:`IDX_SHAPES`, is longer than its header says, or (``verify``) has the wrong
        checksum. Each file is read no further than its header declares.
    """
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise DataError(
            f"--data {folder} is a file, not a folder; pass the folder holding the MNIST IDX "
            "files, 'embedded' or 'download'"
        )
    if not folder.is_dir():
        raise DataError(
            f"data folder {folder} does not exist; pass a folder holding the MNIST IDX files, "
            "'embedded' or 'download'"
        )
    out = {}
    for key, (stem, md5) in MNIST_FILES.items():
        path = _find(folder, stem)
        digest = _md5()
        array = read_idx_file(path, IDX_SHAPES[key], digest.update if verify else None)
        if verify:
            _check_md5(path, digest.hexdigest(), md5)
        if key.endswith("images"):
            array = array.reshape(len(array), NUM_PIXELS)
        out[key] = array
    for part in ("train", "test"):
        n_img, n_lab = len(out[part + "_images"]), len(out[part + "_labels"])
        if n_img != n_lab:
            raise DataError(f"{folder}: {n_img} {part} images but {n_lab} labels")
    if len(out["train_images"]) <= NUM_VALID:
        raise DataError(f"{folder}: need more than {NUM_VALID} training images for a valid split")
    return out


# ----------------------------------------------------------------------------------------------
# Download


def default_cache_dir() -> Path:
    """``$PYRO_ARM_CACHE/mnist``, else ``$XDG_CACHE_HOME/pyro-arm/mnist``, else ``~/.cache/...``."""
    if os.environ.get("PYRO_ARM_CACHE"):
        return Path(os.environ["PYRO_ARM_CACHE"]).expanduser() / "mnist"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "pyro-arm" / "mnist"


def _md5():
    """An empty MD5 checksum (a :mod:`hashlib` object)."""
    return hashlib.md5(usedforsecurity=False)


def _cached_ok(path: Path, md5: str, expected: tuple[int, tuple[int, ...]]) -> bool:
    digest = _md5()
    try:
        read_idx_file(path, expected, digest.update)
    except DataError:
        return False
    return digest.hexdigest() == md5


def download_mnist(
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    *,
    mirrors: tuple[str, ...] = MNIST_MIRRORS,
    opener: Callable[..., object] = urllib.request.urlopen,
    timeout: float = 60.0,
) -> Path:
    """
    Downloads the four MNIST gzip files into ``cache_dir`` unless they are already there and valid.

    Each file is tried at each mirror in turn; its decompressed content must match the published
    MD5 (:data:`MNIST_FILES`), then it is written atomically (temporary file + rename), so an
    interrupted download never leaves a half-written file under the final name.

    :param cache_dir: destination folder (default :func:`default_cache_dir`).
    :param mirrors: base URLs ending in ``/`` (``file://`` URLs work too).
    :param opener: ``opener(url, timeout=...)`` returning a readable response (for tests).
    :returns: the folder, ready for :func:`read_idx_folder`.
    :raises DataError: if a file cannot be fetched from any mirror with the right checksum.
    """
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    for key, (stem, md5) in MNIST_FILES.items():
        target = folder / (stem + ".gz")
        if target.is_file() and _cached_ok(target, md5, IDX_SHAPES[key]):
            continue
        errors = []
        for base in mirrors:
            url = base + stem + ".gz"
            try:
                with opener(url, timeout=timeout) as response:
                    payload = response.read()
                digest = _md5()
                with gzip.GzipFile(fileobj=io.BytesIO(payload)) as f:
                    read_idx(f, name=url, expected=IDX_SHAPES[key], update=digest.update)
            except (OSError, EOFError, zlib.error, urllib.error.URLError, ValueError) as e:
                errors.append(f"{url}: {e}")
                continue
            if digest.hexdigest() != md5:
                errors.append(
                    f"{url}: checksum mismatch (MD5 {digest.hexdigest()}, expected {md5})"
                )
                continue
            atomic_write_bytes(target, payload)
            break
        else:
            raise DataError(
                f"could not download {stem}.gz ({'; '.join(errors)}); check the connection or "
                f"put the MNIST files in a folder and pass it with --data"
            )
    return folder


# ----------------------------------------------------------------------------------------------
# Embedded subset


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    return ((q[:, 0::2] << 4) | q[:, 1::2]).astype(np.uint8)


def _unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    q = np.empty((packed.shape[0], packed.shape[1] * 2), dtype=np.uint8)
    q[:, 0::2] = packed >> 4
    q[:, 1::2] = packed & 0x0F
    return q


def make_embedded_arrays(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """
    The content of the embedded file, made from :func:`read_idx_folder`'s output by
    :data:`EMBEDDED_RULE` (used by ``scripts/make_embedded_mnist.py``).
    """
    out = {"format_version": np.array(1, dtype=np.int64)}
    for split, (part, start, stop) in EMBEDDED_RULE.items():
        images = arrays[part + "_images"][start:stop]
        out[split + "_q4"] = _pack_nibbles(images >> 4)
        out[split + "_labels"] = arrays[part + "_labels"][start:stop].astype(np.uint8)
    return out


def read_embedded(path: Union[str, os.PathLike] = EMBEDDED_PATH) -> dict[str, np.ndarray]:
    """Reads the embedded subset: ``{split: (images uint8 (N, 784) in q*17, labels)}``."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read the embedded data {path}: {e}; reinstall pyro-arm") from e
    out = {}
    for split in SPLITS:
        try:
            q, labels = _unpack_nibbles(arrays[split + "_q4"]), arrays[split + "_labels"]
        except KeyError as e:
            raise DataError(f"{path}: missing array {e}; reinstall pyro-arm") from None
        if q.shape[1] != NUM_PIXELS or len(q) != len(labels):
            raise DataError(f"{path}: bad array shapes for split {split!r}; reinstall pyro-arm")
        out[split] = (q * np.uint8(17), labels)
    return out


# ----------------------------------------------------------------------------------------------
# The dataset


class MNISTData:
    """
    Binarized MNIST splits.

    :param images: ``{split: uint8 (N, 784) grey levels 0..255}`` for ``train``, ``valid``,
        ``test``.
    :param labels: ``{split: (N,) labels}``.
    :param binarization: ``"threshold"`` or ``"dynamic"``.
    :param source: a description of where the data came from.

    ``.train``, ``.valid`` and ``.test`` are float tensors ``(N, 784)`` of per-pixel probabilities
    of a 1: in ``{0, 1}`` for ``"threshold"``, the grey levels in ``[0, 1]`` for ``"dynamic"``.
    """

    def __init__(
        self,
        images: dict[str, np.ndarray],
        labels: dict[str, np.ndarray],
        binarization: str = "threshold",
        source: str = "",
    ):
        if binarization not in BINARIZATIONS:
            raise DataError(
                f"unknown binarization {binarization!r}; expected one of {', '.join(BINARIZATIONS)}"
            )
        self.binarization = binarization
        self.source = source
        self.labels = {s: np.asarray(labels[s]) for s in SPLITS}
        if binarization == "threshold":
            self._pixels = {s: (np.asarray(images[s]) >= 128).astype(np.uint8) for s in SPLITS}
            self._scale = 1.0
        else:
            self._pixels = {s: np.array(images[s], dtype=np.uint8) for s in SPLITS}
            self._scale = 255.0

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={self.num_examples(s)}" for s in SPLITS)
        return f"MNISTData({sizes}, binarization={self.binarization!r}, source={self.source!r})"

    def num_examples(self, split: str) -> int:
        """Number of images in ``split``."""
        return len(self._split(split))

    def _split(self, split: str) -> np.ndarray:
        try:
            return self._pixels[split]
        except KeyError:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}") from None

    def probs(self, split: str, index: Optional[Union[Tensor, np.ndarray]] = None) -> Tensor:
        """Float tensor ``(N, 784)`` of per-pixel probabilities of a 1, optionally of some rows."""
        pixels = self._split(split)
        if index is not None:
            pixels = pixels[np.asarray(index)]
        return torch.from_numpy(np.ascontiguousarray(pixels)).float().div_(self._scale)

    @property
    def train(self) -> Tensor:
        return self.probs("train")

    @property
    def valid(self) -> Tensor:
        return self.probs("valid")

    @property
    def test(self) -> Tensor:
        return self.probs("test")

    def binarize(self, probs: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """``probs`` as ``{0, 1}`` values: unchanged for threshold, a Bernoulli draw for dynamic."""
        if self.binarization == "threshold":
            return probs
        return torch.bernoulli(probs, generator=generator)

    def batch(
        self,
        split: str,
        index: Union[Tensor, np.ndarray],
        *,
        device: Union[str, torch.device] = "cpu",
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        """The images ``index`` of ``split``, binarized, as a float ``(B, 784)`` tensor."""
        index = index.cpu().numpy() if isinstance(index, Tensor) else np.asarray(index)
        return self.binarize(self.probs(split, index), generator).to(device)

    def batches(
        self,
        split: str,
        batch_size: int,
        *,
        device: Union[str, torch.device] = "cpu",
        generator: Optional[torch.Generator] = None,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> Iterator[Tensor]:
        """
        One pass over ``split`` in float ``(B, 784)`` batches in ``{0, 1}`` on ``device``.

        :param generator: a CPU generator for the order and the dynamic binarization draws
            (default: the global torch RNG).
        :param shuffle: visit the images in a random order.
        :param drop_last: skip a last, smaller batch.
        """
        n = self.num_examples(split)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            index = order[start : start + batch_size]
            if drop_last and len(index) < batch_size:
                break
            yield self.batch(split, index, device=device, generator=generator)

    def fixed(self, split: str, *, seed: int = 0) -> Tensor:
        """
        The whole ``split`` binarized once, the same on every call: the thresholded images, or
        for ``"dynamic"`` one Bernoulli draw from a generator seeded with ``seed``.
        """
        generator = torch.Generator().manual_seed(seed)
        return self.binarize(self.probs(split), generator)

    def train_pixel_mean(self) -> Tensor:
        """Mean of each pixel over the training split (the probability of a 1), shape ``(784,)``."""
        pixels = self._pixels["train"]
        return torch.from_numpy(pixels.mean(axis=0, dtype=np.float64) / self._scale).float()


def load_mnist(
    source: Union[str, os.PathLike] = "embedded",
    binarization: str = "threshold",
    *,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
) -> MNISTData:
    """
    Loads binarized MNIST.

    :param source: ``"embedded"`` (the packaged 10k/2k/2k subset), ``"download"`` (the full data,
        fetched into ``cache_dir`` once) or a folder holding the standard IDX files.
    :param binarization: ``"threshold"`` (pixel > 0.5) or ``"dynamic"`` (a Bernoulli draw per
        batch).
    :param cache_dir: where ``"download"`` keeps the files (default :func:`default_cache_dir`).
    :raises DataError: with a message saying what to do, on any problem with the data.
    """
    if isinstance(source, str) and source == "embedded":
        embedded = read_embedded()
        images = {s: embedded[s][0] for s in SPLITS}
        labels = {s: embedded[s][1] for s in SPLITS}
        return MNISTData(images, labels, binarization, source="embedded")
    download = isinstance(source, str) and source == "download"
    folder = download_mnist(cache_dir) if download else Path(source).expanduser()
    arrays = read_idx_folder(folder, verify=download)
    n_train = len(arrays["train_images"]) - NUM_VALID
    images = {
        "train": arrays["train_images"][:n_train],
        "valid": arrays["train_images"][n_train:],
        "test": arrays["test_images"],
    }
    labels = {
        "train": arrays["train_labels"][:n_train],
        "valid": arrays["train_labels"][n_train:],
        "test": arrays["test_labels"],
    }
    return MNISTData(images, labels, binarization, source=str(folder))
