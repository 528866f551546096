"""Data for the demos: scikit-learn's bundled digits (no download) and MNIST from IDX files.

Both loaders return a :class:`Dataset` of float32 images flattened to ``(n, pixels)`` in
``[0, 1]`` (binarized to ``{0, 1}`` by default) with int64 labels. :func:`batches` yields
shuffled minibatches as a pure function of ``(seed, step)``, so a resumed run sees the same
batches as an uninterrupted one.
"""

from __future__ import annotations

import gzip
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch

__all__ = ["Dataset", "batches", "load_dataset", "load_digits", "load_mnist", "read_idx"]

DATASETS = ("digits", "mnist")

# IDX type byte -> (torch dtype, bytes per value); values are stored big-endian
_IDX_TYPES = {
    0x08: (torch.uint8, 1),
    0x09: (torch.int8, 1),
    0x0B: (torch.int16, 2),
    0x0C: (torch.int32, 4),
    0x0D: (torch.float32, 4),
    0x0E: (torch.float64, 8),
}

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


class Dataset(NamedTuple):
    """Images flattened to ``(n, pixels)`` float32 and their int64 labels."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    image_shape: tuple[int, int]
    name: str


def read_idx(path: str | Path) -> torch.Tensor:
    """Read an IDX file (the MNIST format), plain or gzip-compressed, into a tensor.

    The format of the MNIST distribution (LeCun et al. 1998): two zero bytes, a type byte
    (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64), the number of
    dimensions, one big-endian uint32 size per dimension, then the values, big-endian.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not IDX, is truncated, has trailing bytes, or is a broken gzip;
            the message names the path.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "tiny-idx1-ubyte")
        >>> _ = open(path, "wb").write(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9]))
        >>> read_idx(path).tolist()
        [7, 8, 9]
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"{path}: cannot decompress ({err}); the .gz file is damaged, "
                         "download it again") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path}: not an IDX file (the first bytes are {raw[:4].hex(' ') or 'empty'}"
                         ", expected 00 00 <type> <ndim>)")
    dtype, size = _IDX_TYPES[raw[2]]
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header} for "
                         f"{ndim} dimensions)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    count = 1
    for s in shape:
        count *= s
    want = header + count * size
    if len(raw) != want:
        what = "truncated" if len(raw) < want else "has trailing bytes"
        raise ValueError(f"{path}: IDX file {what}: the header says shape {shape} "
                         f"({want} bytes in all) but the file holds {len(raw)} bytes")
    body = bytearray(raw[header:])
    data = torch.frombuffer(body, dtype=torch.uint8) if body else torch.empty(0, dtype=torch.uint8)
    if size > 1:
        data = data.view(-1, size)
        if sys.byteorder == "little":
            data = data.flip(-1)
        data = data.contiguous().view(dtype)
    else:
        data = data.view(dtype)
    return data.reshape(shape)


def _find(data_dir: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (data_dir / name).is_file():
            return data_dir / name
    raise FileNotFoundError(
        f"MNIST file missing: neither {data_dir / stem} nor {data_dir / (stem + '.gz')} exists; "
        f"put the four MNIST IDX files ({', '.join(MNIST_FILES.values())}, optionally .gz) "
        "in --data-dir")


def _images(path: Path, binarize: bool) -> tuple[torch.Tensor, tuple[int, int]]:
    images = read_idx(path)
    if images.dim() != 3 or images.dtype != torch.uint8:
        raise ValueError(f"{path}: expected uint8 images of shape (n, rows, cols), got "
                         f"{images.dtype} of shape {tuple(images.shape)}")
    x = images.flatten(1).float() / 255.0
    return ((x > 0.5).float() if binarize else x), (images.shape[1], images.shape[2])


def load_mnist(data_dir: str | Path, *, binarize: bool = True) -> Dataset:
    """MNIST from the four standard IDX files (plain or ``.gz``) in ``data_dir``.

    Pixels are scaled to ``[0, 1]`` and, with ``binarize``, thresholded at 0.5. Uses the
    standard 60 000 / 10 000 train/test split.

    Raises:
        FileNotFoundError: ``data_dir`` or one of the four files is missing.
        ValueError: a file is damaged or not IDX, labels and images disagree, the image sizes of
            the splits differ, or a split holds 0 images; the message names the file.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"MNIST directory not found: {data_dir}")
    paths = {key: _find(data_dir, stem) for key, stem in MNIST_FILES.items()}
    out, shapes = {}, {}
    for split in ("train", "test"):
        x, shapes[split] = _images(paths[f"{split}_images"], binarize)
        if x.shape[0] == 0:
            raise ValueError(f"{paths[f'{split}_images']}: holds 0 images; the demo needs at least one "
                             f"{'training' if split == 'train' else 'test'} image")
        y = read_idx(paths[f"{split}_labels"])
        if y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"{paths[f'{split}_labels']}: expected {x.shape[0]} labels (one per image "
                             f"in {paths[f'{split}_images']}), got shape {tuple(y.shape)}")
        out[split] = (x, y.long())
    if shapes["test"] != shapes["train"]:
        raise ValueError(f"{paths['test_images']}: images of shape {shapes['test']} do not match "
                         f"the {shapes['train']} images in {paths['train_images']}")
    return Dataset(*out["train"], *out["test"], image_shape=shapes["train"], name="mnist")


def load_digits(*, binarize: bool = True, test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
    """The 1797 8x8 handwritten digits bundled with scikit-learn (no download).

    Pixels (0..16) are scaled to ``[0, 1]`` and, with ``binarize``, thresholded at 0.5. The
    train/test split is a random permutation fixed by ``split_seed`` (the same for every run,
    whatever the training seed).

    Example:
        >>> ds = load_digits()
        >>> ds.train_x.shape, ds.test_x.shape, ds.image_shape
        (torch.Size([1438, 64]), torch.Size([359, 64]), (8, 8))
    """
    from sklearn.datasets import load_digits as sklearn_digits  # optional dependency

    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    bunch = sklearn_digits()
    x = torch.as_tensor(bunch.data, dtype=torch.float32) / 16.0
    x = (x > 0.5).float() if binarize else x
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(split_seed))
    n_test = round(len(x) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    return Dataset(x[train], y[train], x[test], y[test], image_shape=(8, 8), name="digits")


def load_dataset(name: str, data_dir: str | Path | None = None, *, binarize: bool = True) -> Dataset:
    """``"digits"`` (scikit-learn, default) or ``"mnist"`` (IDX files in ``data_dir``)."""
    if name == "digits":
        return load_digits(binarize=binarize)
    if name == "mnist":
        if data_dir is None:
            raise ValueError("--data mnist needs --data-dir DIR, the folder holding the MNIST IDX files")
        return load_mnist(data_dir, binarize=binarize)
    raise ValueError(f"unknown data set {name!r}; choose one of {DATASETS}")


def batches(x: torch.Tensor, batch_size: int, *, seed: int, start_step: int = 0
            ) -> Iterator[torch.Tensor]:
    """Endless shuffled minibatches of the rows of ``x``, starting at step ``start_step``.

    Epoch ``e`` is the permutation drawn from a generator seeded by ``(seed, e)``; the last
    partial batch of each epoch is dropped. The batch of a step depends on ``(seed, step)``
    only, so resuming at ``start_step`` continues exactly where a run stopped.

    Example:
        >>> it = batches(torch.arange(10.0).unsqueeze(1), 4, seed=0)
        >>> [tuple(next(it).shape) for _ in range(3)]
        [(4, 1), (4, 1), (4, 1)]
    """
    n = x.shape[0]
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be an int between 1 and the data set size {n}, "
                         f"got {batch_size!r}")
    per_epoch = n // batch_size
    epoch, i = divmod(start_step, per_epoch)
    while True:
        # torch's CPU generator keeps only 32 bits of a seed: mix (seed, epoch) into 32 bits
        gen = torch.Generator().manual_seed(zlib.crc32(f"batches {seed} {epoch}".encode()))
        perm = torch.randperm(n, generator=gen).to(x.device)
        for j in range(i, per_epoch):
            yield x[perm[j * batch_size:(j + 1) * batch_size]]
        epoch, i = epoch + 1, 0
