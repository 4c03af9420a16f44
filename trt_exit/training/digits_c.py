"""digits-C: scikit-learn's real digits under common corruptions at five severities.

In the style of CIFAR-10-C / ImageNet-C (Hendrycks and Dietterich, "Benchmarking Neural Network
Robustness to Common Corruptions and Perturbations", ICLR 2019): the same documented
train / val / test split as ``digits`` (:func:`~trt_exit.training.datasets.load_digits`), with
corruptions applied to the 8x8 pixel images (values 0..16) before the usual preprocessing, so
inputs range from clean to hard and early exits have something to decide. Our choices:

Corruptions of the pixels (values 0..16; results clipped to 0..16), severity 1 .. 5:

* ``gaussian_noise``: adds independent N(0, sigma^2) noise to every pixel, sigma 2, 3, 4, 5.5, 7;
* ``gaussian_blur``: a Gaussian filter (``scipy.ndimage``, zero outside the image),
  sigma 0.5, 0.7, 0.9, 1.1, 1.4 px;
* ``occlusion``: a rectangle at a random place inside the image set to 0 (background),
  2x2, 2x3, 3x3, 3x4, 4x4 px;
* ``contrast``: pixels pulled towards the image's mean by a factor c 0.5, 0.35, 0.25, 0.15, 0.08;
* ``shift``: the digit translated, zeros coming in (no wrap-around), by 1 px, 1 px diagonally,
  2 px, 2 px diagonally, 3 px diagonally.

Shift directions (one of the four axis directions, or of the four diagonals for "diag"),
occlusion orientation and place, and the noise are drawn per sample.

Splits:

* ``val`` and ``test``: every clean image, then every image under every corruption at every
  severity (CIFAR-10-C's layout: 1 + 5 x 5 = 26 copies; 9,360 samples each for seed 0). The
  per-sample ``meta`` arrays ``corruption`` (index into :data:`CORRUPTIONS`, -1 = clean) and
  ``severity`` (0 = clean) say which is which; ``source_index`` is the clean image's row.
* ``train``: the 1,077 training images, of which a seeded half is replaced by a *mild* copy:
  a random corruption at severity 1 or 2 (training on clean plus mild corruptions, so severities
  3 to 5 stay unseen, as ImageNet-C's test corruptions are unseen in training). The training
  set keeps its size, so a recipe costs the same time on ``digits`` and ``digits_c``.

Everything is drawn from ``numpy.random.default_rng([seed, split, corruption, severity])``: the
same seed gives the same bytes on every machine.

The parameters above are digits-C's (8x8, pixel values 0..16); :class:`CorruptionScale` carries
them to other image families (:func:`corrupted_splits`): MNIST-C
(:mod:`trt_exit.training.mnist`) applies the same protocol to 28x28 MNIST.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from trt_exit import tensor_names as tn
from trt_exit.errors import ConfigError
from trt_exit.training.datasets import Dataset, digits_pixel_splits, digits_preprocess, register_dataset

#: Corruption names, in the order of the ``corruption`` meta index.
CORRUPTIONS = ("gaussian_noise", "gaussian_blur", "occlusion", "contrast", "shift")
SEVERITIES = (1, 2, 3, 4, 5)
#: Severities the training split draws from.
TRAIN_SEVERITIES = (1, 2)
PIXEL_MAX = 16.0

NOISE_SIGMA = (2.0, 3.0, 4.0, 5.5, 7.0)
BLUR_SIGMA_PX = (0.5, 0.7, 0.9, 1.1, 1.4)
OCCLUSION_PX = ((2, 2), (2, 3), (3, 3), (3, 4), (4, 4))
CONTRAST_FACTOR = (0.5, 0.35, 0.25, 0.15, 0.08)
SHIFT_PX = ((1, False), (1, True), (2, False), (2, True), (3, True))  # (distance, diagonal)

_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
#: Pixels (N, H, W) -> model inputs (N, 1, H, W) float32.
Preprocess = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class CorruptionScale:
    """How the corruption parameters above (defined on 8x8 images with pixel values 0..16) map
    to another image family: intensities scale with ``pixel_max``, lengths in pixels with
    ``px`` (rounded half up), so MNIST-C (28x28, values 0..1) is digits-C at 3.5x the size.

    Attributes:
        pixel_max: Largest pixel value (images are clipped to 0..pixel_max).
        px: Image side relative to 8 pixels.
    """

    pixel_max: float = PIXEL_MAX
    px: float = 1.0

    def length(self, pixels: float) -> int:
        """A length of ``pixels`` on 8x8 images, on this scale (rounded half up)."""
        return int(math.floor(pixels * self.px + 0.5))


#: digits-C's own scale.
DIGITS_SCALE = CorruptionScale()


def _noise(images: np.ndarray, severity: int, rng: np.random.Generator,
           scale: CorruptionScale) -> np.ndarray:
    sigma = NOISE_SIGMA[severity - 1] * scale.pixel_max / PIXEL_MAX
    return images + rng.normal(0.0, sigma, images.shape)


def _blur(images: np.ndarray, severity: int, rng: np.random.Generator,
          scale: CorruptionScale) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    sigma = BLUR_SIGMA_PX[severity - 1] * scale.px
    # Sigma 0 along the sample axis: each image is filtered on its own.
    return gaussian_filter(images, (0.0, sigma, sigma), mode="constant", cval=0.0)


def _occlusion(images: np.ndarray, severity: int, rng: np.random.Generator,
               scale: CorruptionScale) -> np.ndarray:
    out = images.copy()
    size = images.shape[-1]
    short, long = (scale.length(v) for v in OCCLUSION_PX[severity - 1])
    for image in out:
        height, width = (short, long) if rng.integers(2) else (long, short)
        top = rng.integers(0, size - height + 1)
        left = rng.integers(0, size - width + 1)
        image[top : top + height, left : left + width] = 0.0
    return out


def _contrast(images: np.ndarray, severity: int, rng: np.random.Generator,
              scale: CorruptionScale) -> np.ndarray:
    mean = images.mean(axis=(1, 2), keepdims=True)
    return mean + (images - mean) * CONTRAST_FACTOR[severity - 1]


def _shift(images: np.ndarray, severity: int, rng: np.random.Generator,
           scale: CorruptionScale) -> np.ndarray:
    steps, diagonal = SHIFT_PX[severity - 1]
    distance = scale.length(steps)
    if diagonal:
        directions = [(1, 1), (1, -1), (-1, 1), (-1, -1)]
    else:
        directions = [(1, 0), (-1, 0), (0, 1), (0, -1)]
    out = np.zeros_like(images)
    size = images.shape[-1]
    for image, target, pick in zip(images, out, rng.integers(0, 4, len(images))):
        dy, dx = (distance * d for d in directions[pick])
        target[max(dy, 0) : size + min(dy, 0), max(dx, 0) : size + min(dx, 0)] = \
            image[max(-dy, 0) : size + min(-dy, 0), max(-dx, 0) : size + min(-dx, 0)]
    return out


_APPLY: dict[str, Callable[[np.ndarray, int, np.random.Generator, CorruptionScale], np.ndarray]] = {
    "gaussian_noise": _noise, "gaussian_blur": _blur, "occlusion": _occlusion,
    "contrast": _contrast, "shift": _shift,
}


def corrupt(images: np.ndarray, corruption: str, severity: int, rng: np.random.Generator,
            scale: CorruptionScale = DIGITS_SCALE) -> np.ndarray:
    """``images`` (N, H, W) with pixel values 0..``scale.pixel_max`` (digits: 0..16) under one
    corruption, clipped to that range.

    Raises:
        ConfigError: Unknown corruption or a severity outside 1..5.
    """
    if corruption not in _APPLY:
        raise ConfigError(f"unknown corruption {corruption!r}; digits-C has {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ConfigError(f"severity must be 1..5, got {severity!r}")
    images = np.asarray(images, dtype=np.float64)
    return np.clip(_APPLY[corruption](images, severity, rng, scale), 0.0, scale.pixel_max)


def _rng(seed: int, split: str, corruption: int, severity: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLIT_CODES[split], corruption + 1, severity])


def parse_corruptions(corruptions: str, dataset: str = "digits_c") -> list[str]:
    """``"all"`` or a comma-separated subset of :data:`CORRUPTIONS` -> the names, in order given.

    Raises:
        ConfigError: An unknown name (the message names ``dataset``'s option).
    """
    if corruptions == "all":
        return list(CORRUPTIONS)
    names = [c.strip() for c in corruptions.split(",") if c.strip()]
    unknown = [c for c in names if c not in CORRUPTIONS]
    if unknown or not names:
        raise ConfigError(f"{dataset} option corruptions: unknown {unknown or corruptions!r}; use "
                          f"'all' or a comma-separated subset of {', '.join(CORRUPTIONS)}")
    return names


def _evaluation_split(pixels: np.ndarray, labels: np.ndarray, seed: int, split: str,
                      names: list[str], scale: CorruptionScale, preprocess: Preprocess
                      ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    # Preprocessed copy by copy: float32 inputs, never every copy in float64 at once.
    images, corruption, severity = [preprocess(pixels)], [np.full(len(pixels), -1)], \
        [np.zeros(len(pixels))]
    for name in names:
        index = CORRUPTIONS.index(name)
        for level in SEVERITIES:
            images.append(preprocess(corrupt(pixels, name, level, _rng(seed, split, index, level),
                                             scale)))
            corruption.append(np.full(len(pixels), index))
            severity.append(np.full(len(pixels), level))
    copies = len(images)
    meta = {"corruption": np.concatenate(corruption).astype(np.int64),
            "severity": np.concatenate(severity).astype(np.int64),
            "source_index": np.tile(np.arange(len(pixels)), copies).astype(np.int64)}
    return np.concatenate(images), np.tile(labels, copies), meta


def _training_split(pixels: np.ndarray, labels: np.ndarray, seed: int, names: list[str],
                    corrupted_fraction: float, scale: CorruptionScale, preprocess: Preprocess
                    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng([seed, _SPLIT_CODES["train"]])
    count = len(pixels)
    chosen = rng.permutation(count)[: int(round(corrupted_fraction * count))]
    kinds = rng.integers(0, len(names), len(chosen))
    levels = rng.choice(TRAIN_SEVERITIES, len(chosen))
    images = np.asarray(pixels, dtype=np.float64).copy()
    corruption = np.full(count, -1, dtype=np.int64)
    severity = np.zeros(count, dtype=np.int64)
    for k, name in enumerate(names):
        index = CORRUPTIONS.index(name)
        for level in TRAIN_SEVERITIES:
            rows = chosen[(kinds == k) & (levels == level)]
            images[rows] = corrupt(pixels[rows], name, level, _rng(seed, "train", index, level),
                                   scale)
            corruption[rows] = index
            severity[rows] = level
    meta = {"corruption": corruption, "severity": severity,
            "source_index": np.arange(count, dtype=np.int64)}
    return preprocess(images), labels, meta


def corrupted_splits(pixels: dict[str, np.ndarray], labels: dict[str, np.ndarray], seed: int,
                     corruptions: str, train_corrupted_fraction: float, scale: CorruptionScale,
                     preprocess: Preprocess, dataset: str, info: dict) -> dict[str, Dataset]:
    """The corrupted train / val / test splits of clean pixel splits (the module docstring's
    protocol), for any image family.

    Args:
        pixels: Clean images by split, (N, H, W), values 0..``scale.pixel_max``.
        labels: Class indices by split.
        seed: Seed of every corruption draw.
        corruptions: ``"all"`` or a comma-separated subset of :data:`CORRUPTIONS`.
        train_corrupted_fraction: Share of training images replaced by a mild corruption.
        scale: The corruption parameters' scale for this image family.
        preprocess: Pixels -> model inputs (N, 1, H, W) float32.
        dataset: Dataset name (split names and messages).
        info: Provenance recorded with every split (the corruption protocol is added).
    """
    if not 0.0 <= train_corrupted_fraction <= 1.0:
        raise ConfigError(f"train_corrupted_fraction must be in [0, 1], got {train_corrupted_fraction}")
    names = parse_corruptions(corruptions, dataset)
    info = {
        **info, "seed": seed, "corruptions": names, "severities": list(SEVERITIES),
        "train": (f"{train_corrupted_fraction:g} of the images replaced by one random corruption "
                  f"at severity {' or '.join(map(str, TRAIN_SEVERITIES))}"),
        "val_test": "every image clean, then under every corruption at every severity",
    }
    splits = {"train": _training_split(pixels["train"], labels["train"], seed, names,
                                       train_corrupted_fraction, scale, preprocess)}
    for split in ("val", "test"):
        splits[split] = _evaluation_split(pixels[split], labels[split], seed, split, names, scale,
                                          preprocess)
    return {
        split: Dataset({tn.IMAGE: images}, targets, "classification", f"{dataset}/{split}",
                       dict(info), meta=meta)
        for split, (images, targets, meta) in splits.items()
    }


def load_digits_c(seed: int = 0, corruptions: str = "all",
                  train_corrupted_fraction: float = 0.5) -> dict[str, Dataset]:
    """The digits-C splits (see the module docstring).

    Args:
        seed: Seed of the digits split and of every corruption draw.
        corruptions: ``"all"`` or a comma-separated subset of :data:`CORRUPTIONS`.
        train_corrupted_fraction: Share of training images replaced by a mild corruption.

    Returns:
        ``{"train": ..., "val": ..., "test": ...}``; each split has ``meta`` arrays
        ``corruption``, ``severity`` and ``source_index``.
    """
    if not 0.0 <= train_corrupted_fraction <= 1.0:
        raise ConfigError(f"train_corrupted_fraction must be in [0, 1], got {train_corrupted_fraction}")
    parse_corruptions(corruptions)  # a bad name fails before the digits are loaded
    pixels, labels = digits_pixel_splits(seed)
    info = {"source": "sklearn.datasets.load_digits, corrupted (digits-C, "
                      "trt_exit.training.digits_c)"}
    return corrupted_splits(pixels, labels, seed, corruptions, train_corrupted_fraction,
                            DIGITS_SCALE, digits_preprocess, "digits_c", info)


register_dataset("digits_c", load_digits_c)
