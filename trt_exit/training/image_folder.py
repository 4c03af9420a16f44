"""Users' own images: class-per-subfolder trees or a CSV/JSONL list, decoded in DataLoader workers
through timm's data pipeline.

Where the images are (``--data imagefolder://PATH``):

* a folder of class folders, ``PATH/<class>/<image>`` (torchvision ``ImageFolder`` / timm
  layout): split into train / val / test by seed, stratified by class;
* a folder with ``train/`` (and optionally ``val/`` or ``validation/``, ``test/``), each a folder
  of class folders: those splits as they are; a missing val or test split is carved out of
  train by seed, stratified;
* a ``.csv`` file (header ``path,label`` for classes or ``path,count`` / ``path,value`` for
  regression, an optional ``split`` column with train/val/test) or a ``.jsonl`` file with the same
  keys per line; paths are relative to the file's folder.

Class indices follow the sorted class names (folder names or labels), as in ``ImageFolder``.

Preprocessing is the backbone's: ``timm.data.resolve_data_config`` of the model gives the input
size, mean, std, interpolation and crop, and ``timm.data.create_transform`` builds the training
(random resized crop, flip) and evaluation (resize, center crop) transforms, so images of any size
and mode (grayscale, RGBA) become (3, H, W) float32 inputs normalized like the pretrained weights.

Training streams: images are decoded and augmented by ``torch.utils.data.DataLoader`` workers,
batch by batch; nothing is loaded whole. The validation and test splits, which threshold tuning
and evaluation run through the stage graphs, are decoded once into arrays (N x 3 x H x W float32:
1,000 images at 224x224 take 600 MB).

Bad input: an empty class folder or a folder without images is an error (class indices would
shift silently); an unreadable or truncated image is *skipped and counted* (the count is in the
split's ``info["skipped_images"]`` and in training's history), and a split that loses every image
is an error.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from trt_exit import tensor_names as tn
from trt_exit.errors import ConfigError, InputError, require
from trt_exit.fileio import path_text_problem, shown_path
from trt_exit.training.datasets import Dataset, register_dataset

SCHEME = "imagefolder://"
SPLITS = ("train", "val", "test")
_SPLIT_DIRS = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}
#: The data-config keys recorded with a run (what make the transforms).
DATA_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")


def data_path(uri: str) -> Path:
    """``imagefolder://DIR`` (or ``imagefolder://FILE.csv``) -> the path, which must exist."""
    if not uri.startswith(SCHEME):
        raise ConfigError(f"bad data location {uri!r}; use imagefolder://DIR (class folders) or "
                          f"imagefolder://FILE.csv / .jsonl")
    path = Path(uri[len(SCHEME):]).expanduser()
    if not path.exists():
        raise ConfigError(f"{path} does not exist (from {uri})")
    return path.resolve()


def data_config(model: Any, input_size: Sequence[int] | None = None) -> dict[str, Any]:
    """The backbone's preprocessing, from ``timm.data.resolve_data_config``: JSON values."""
    timm = require("timm", "timm", "Image folders")
    args = {"input_size": tuple(input_size)} if input_size else {}
    cfg = timm.data.resolve_data_config(args, model=model)
    return {"input_size": [int(v) for v in cfg["input_size"]],
            "mean": [float(v) for v in cfg["mean"]], "std": [float(v) for v in cfg["std"]],
            "interpolation": str(cfg.get("interpolation", "bilinear")),
            "crop_pct": float(cfg.get("crop_pct", 0.875)),
            "crop_mode": str(cfg.get("crop_mode", "center"))}


def create_transform(config: dict[str, Any], training: bool):
    """timm's transform for ``config`` (see :func:`data_config`)."""
    timm = require("timm", "timm", "Image folders")
    return timm.data.create_transform(
        input_size=tuple(config["input_size"]), is_training=training,
        mean=tuple(config["mean"]), std=tuple(config["std"]),
        interpolation=config["interpolation"], crop_pct=config["crop_pct"],
        crop_mode=config["crop_mode"])


# --------------------------------------------------------------------------- finding the images


@dataclass
class ImageList:
    """Image files and their targets (class indices, or (N, 1) float32 regression targets)."""

    paths: list[str]
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)

    def take(self, indices: np.ndarray) -> "ImageList":
        return ImageList([self.paths[i] for i in indices], self.targets[indices])


def _extensions() -> set[str]:
    from timm.data.readers.img_extensions import get_img_extensions

    return set(get_img_extensions(as_set=True))


def _class_tree(folder: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Class names and (path, class) pairs of a folder of class folders."""
    extensions = _extensions()
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ConfigError(f"{folder} has no class folders; put each class's images in "
                          f"{folder}/<class name>/")
    items = []
    for name in classes:
        files = sorted(str(p) for p in (folder / name).rglob("*")
                       if p.is_file() and p.suffix.lower() in extensions)
        if not files:
            raise ConfigError(f"class folder {folder / name} has no images "
                              f"({', '.join(sorted(extensions))}); remove it or add images")
        items.extend((f, name) for f in files)
    return classes, items


def _stratified_split(targets: np.ndarray, fractions: Sequence[float], seed: int,
                      stratify: bool) -> list[np.ndarray]:
    """Index sets carved out by ``fractions`` (the rest is the last set), per class when
    ``stratify``; deterministic for a seed (numpy PCG64)."""
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(targets == c) for c in np.unique(targets)] if stratify else [
        np.arange(len(targets))]
    parts: list[list[int]] = [[] for _ in range(len(fractions) + 1)]
    for group in groups:
        group = rng.permutation(group)
        start = 0
        for k, fraction in enumerate(fractions):
            count = int(round(fraction * len(group)))
            parts[k].extend(group[start : start + count])
            start += count
        parts[-1].extend(group[start:])
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _read_table(path: Path) -> list[dict[str, str]]:
    try:
        if path.suffix.lower() == ".jsonl":
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        else:
            with path.open(newline="") as handle:
                rows = list(csv.DictReader(handle))
    except (OSError, ValueError, RecursionError, csv.Error) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    if not rows:
        raise ConfigError(f"{path} lists no images")
    for number, row in enumerate(rows, start=2):
        if not isinstance(row, dict):
            raise ConfigError(f"{path}:{number}: each line must be a JSON object with a 'path', "
                              f"not {type(row).__name__}")
    return rows


def find_images(root: Path, seed: int = 0, val_fraction: float = 0.2,
                test_fraction: float = 0.2) -> tuple[dict[str, ImageList], str, list[str] | None,
                                                     str]:
    """The images of every split under ``root`` (see the module docstring).

    Returns:
        ``(splits, task, class_names, split_rule)``.
    """
    if not 0 < val_fraction < 1 or not 0 < test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ConfigError(f"val_fraction {val_fraction} and test_fraction {test_fraction} must be "
                          f"in (0, 1) with a sum below 1")
    if root.is_file():
        return _find_in_table(root, seed, val_fraction, test_fraction)
    given = {split: next((root / d for d in dirs if (root / d).is_dir()), None)
             for split, dirs in _SPLIT_DIRS.items()}
    if given["train"] is None:
        classes, items = _class_tree(root)
        given_items = {"train": items}
    else:
        classes, items = _class_tree(given["train"])
        given_items = {"train": items}
        for split in ("val", "test"):
            if given[split] is not None:
                names, split_items = _class_tree(given[split])
                unknown = sorted(set(names) - set(classes))
                if unknown:
                    raise ConfigError(f"{given[split]} has classes {unknown} that train does not")
                given_items[split] = split_items
    index = {name: i for i, name in enumerate(classes)}
    lists = {s: ImageList([p for p, _ in it], np.array([index[c] for _, c in it], dtype=np.int64))
             for s, it in given_items.items()}
    missing = [s for s in ("val", "test") if s not in lists]
    rule = f"given as folders: {', '.join(sorted(lists))}"
    if missing:
        lists, carved = _carve(lists, missing, seed, val_fraction, test_fraction, stratify=True)
        rule += f"; {carved}"
    return lists, "classification", classes, rule


def _carve(lists: dict[str, ImageList], missing: list[str], seed: int, val_fraction: float,
           test_fraction: float, stratify: bool) -> tuple[dict[str, ImageList], str]:
    fractions = [val_fraction if s == "val" else test_fraction for s in missing]
    train = lists["train"]
    parts = _stratified_split(train.targets if stratify else np.zeros(len(train.paths)),
                              fractions, seed, stratify)
    out = dict(lists)
    for split, indices in zip(missing, parts[:-1]):
        out[split] = train.take(indices)
    out["train"] = train.take(parts[-1])
    rule = (f"{' and '.join(missing)} carved out of train by seed {seed} "
            f"({', '.join(f'{s} {f:g}' for s, f in zip(missing, fractions))}"
            f"{', stratified by class' if stratify else ''}; numpy default_rng permutation)")
    return out, rule


def _find_in_table(path: Path, seed: int, val_fraction: float, test_fraction: float):
    rows = _read_table(path)
    keys = set(rows[0])
    value_key = next((k for k in ("label", "count", "value") if k in keys), None)
    if "path" not in keys or value_key is None:
        raise ConfigError(f"{path} needs a 'path' column and a 'label' (classes) or 'count' / "
                          f"'value' (regression) column; it has {sorted(keys)}")
    extensions = _extensions()
    paths, values, splits = [], [], []
    for number, row in enumerate(rows, start=2):
        problem = path_text_problem(str(row["path"]))
        if problem:
            raise ConfigError(f"{path}:{number}: the image path {shown_path(str(row['path']))} "
                              f"cannot name a file: {problem}")
        image = (path.parent / str(row["path"])).resolve()
        if image.suffix.lower() not in extensions:
            raise ConfigError(f"{path}:{number}: {row['path']} is not an image "
                              f"({', '.join(sorted(extensions))})")
        split = str(row.get("split") or "train")
        if split not in SPLITS:
            raise ConfigError(f"{path}:{number}: split {split!r} is not one of {SPLITS}")
        paths.append(str(image))
        values.append(row[value_key])
        splits.append(split)
    if value_key == "label":
        classes = sorted({str(v) for v in values})
        index = {c: i for i, c in enumerate(classes)}
        targets = np.array([index[str(v)] for v in values], dtype=np.int64)
        task = "classification"
    else:
        classes = None
        try:
            targets = np.array([float(v) for v in values], dtype=np.float32).reshape(-1, 1)
        except ValueError as exc:
            raise ConfigError(f"{path}: the {value_key!r} column must hold numbers "
                              f"({exc})") from exc
        task = "regression"
    split_array = np.array(splits)
    lists = {s: ImageList([paths[i] for i in np.flatnonzero(split_array == s)],
                          targets[split_array == s]) for s in SPLITS if (split_array == s).any()}
    if "train" not in lists:
        raise ConfigError(f"{path} has no training images (split column all val/test?)")
    missing = [s for s in ("val", "test") if s not in lists]
    rule = f"listed in {path.name}"
    if missing:
        lists, carved = _carve(lists, missing, seed, val_fraction, test_fraction,
                               stratify=task == "classification")
        rule += f"; {carved}"
    return lists, task, classes, rule


# --------------------------------------------------------------------------- decoding


class ImageFiles:
    """A map-style torch dataset: ``[i] -> (image (3, H, W) float32, target, failed path)``; an
    image that cannot be decoded gives ``(None, target, its path)`` (the batch loop drops it and
    counts it)."""

    def __init__(self, images: ImageList, transform):
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images.paths)

    def __getitem__(self, index: int):
        import torch
        from PIL import Image

        target = torch.as_tensor(self.images.targets[index])
        try:
            with Image.open(self.images.paths[index]) as image:
                tensor = self.transform(image.convert("RGB"))
            return tensor, target, None
        except (OSError, ValueError, Image.DecompressionBombError):
            # OSError covers missing, unreadable and truncated files (PIL raises it for each).
            return None, target, self.images.paths[index]


def _collate(batch):
    """Stacks the decodable samples; returns (images or None, targets, failed paths)."""
    import torch

    good = [(x, t) for x, t, failed in batch if failed is None]
    failed = [path for _, _, path in batch if path is not None]
    if not good:
        return None, None, failed
    return torch.stack([x for x, _ in good]), torch.stack([t for _, t in good]), failed


@dataclass
class ImageFolderSplit:
    """One split streamed from image files (the trainer's streaming input).

    Attributes:
        images: The files and their targets.
        config: The data config (see :func:`data_config`).
        task: ``"classification"`` or ``"regression"``.
        name: e.g. ``"imagefolder/train"``.
        info: Provenance recorded in checkpoints and manifests.
        training: Use the training transform (augmentation) instead of the evaluation one.
        num_workers: DataLoader worker processes.
    """

    images: ImageList
    config: dict[str, Any]
    task: str
    name: str
    info: dict[str, Any] = field(default_factory=dict)
    training: bool = True
    num_workers: int = 2
    skipped: set = field(default_factory=set)

    def __len__(self) -> int:
        return len(self.images.paths)

    @property
    def targets(self) -> np.ndarray:
        return self.images.targets

    @property
    def skipped_images(self) -> int:
        """Images that could not be decoded so far (each counted once)."""
        return len(self.skipped)

    def subset(self, indices: np.ndarray) -> "ImageFolderSplit":
        """The images at ``indices`` (same transform and provenance)."""
        return ImageFolderSplit(self.images.take(np.asarray(indices)), self.config, self.task,
                                self.name, dict(self.info), self.training, self.num_workers)

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0,
                training: bool | None = None) -> Iterator[tuple[dict[str, Any], Any]]:
        """Yields ``({"image": (B, 3, H, W)}, targets)`` decoded by DataLoader workers; images
        that cannot be decoded are left out and added to ``skipped``."""
        import torch

        training = self.training if training is None else training
        files = ImageFiles(self.images, create_transform(self.config, training))
        loader = torch.utils.data.DataLoader(
            files, batch_size=batch_size, shuffle=shuffle, num_workers=self.num_workers,
            collate_fn=_collate, generator=torch.Generator().manual_seed(seed),
            persistent_workers=False)
        for images, targets, failed in loader:
            self.skipped.update(failed)
            if images is not None:
                yield {tn.IMAGE: images}, targets

    def materialize(self) -> Dataset:
        """The split decoded with the evaluation transform into arrays (for tuning, evaluation,
        export parity and calibration)."""
        chunks, targets = [], []
        for inputs, batch_targets in self.batches(64, training=False):
            chunks.append(inputs[tn.IMAGE].numpy())
            targets.append(batch_targets.numpy())
        skipped = self.skipped_images
        if not chunks:
            raise InputError(f"{self.name}: none of its {len(self)} images could be decoded")
        return Dataset({tn.IMAGE: np.concatenate(chunks).astype(np.float32)},
                       np.concatenate(targets), self.task, self.name,
                       {**self.info, "skipped_images": skipped})


def load_image_folder(seed: int = 0, root: str = "", input_size: list | None = None,
                      mean: list | None = None, std: list | None = None,
                      interpolation: str = "bicubic", crop_pct: float = 0.875,
                      crop_mode: str = "center", num_workers: int = 2,
                      val_fraction: float = 0.2, test_fraction: float = 0.2) -> dict[str, Any]:
    """The registered ``imagefolder`` dataset: a streaming train split, val and test as arrays.

    Args:
        seed: Seed of any split carved out by fraction.
        root: ``imagefolder://PATH`` or the path itself (see the module docstring).
        input_size, mean, std, interpolation, crop_pct, crop_mode: The backbone's data config
            (:func:`data_config`; recorded in the run so later steps decode alike).
        num_workers: DataLoader worker processes.
        val_fraction, test_fraction: Fractions carved out of train when a split is not given.
    """
    if not root:
        raise ConfigError("the imagefolder dataset needs root=imagefolder://DIR")
    path = data_path(root if root.startswith(SCHEME) else SCHEME + root)
    if input_size is None or mean is None or std is None:
        raise ConfigError("the imagefolder dataset needs the backbone's data config (input_size, "
                          "mean, std); trt-exit train --timm records it")
    config = {"input_size": list(input_size), "mean": list(mean), "std": list(std),
              "interpolation": interpolation, "crop_pct": crop_pct, "crop_mode": crop_mode}
    lists, task, classes, rule = find_images(path, seed, val_fraction, test_fraction)
    info = {"source": str(path), "split": rule, "seed": seed, "class_names": classes,
            "preprocessing": "timm.data.create_transform of the backbone's data config",
            "data_config": config}
    splits: dict[str, Any] = {}
    for split in SPLITS:
        images = lists.get(split)
        if images is None or not images.paths:
            raise ConfigError(f"{path}: the {split} split has no images; add some or change "
                              f"val_fraction / test_fraction")
        stream = ImageFolderSplit(images, config, task, f"imagefolder/{split}",
                                  {**info, "images": len(images.paths)},
                                  training=split == "train", num_workers=num_workers)
        splits[split] = stream if split == "train" else stream.materialize()
    return splits


def sample_stratified(split: Dataset | ImageFolderSplit, size: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of exactly ``min(size, N)`` samples, drawn per class in proportion to the
    class sizes (largest remainders get the rounding); regression targets: uniformly."""
    targets = np.asarray(split.targets)
    n = len(targets)
    size = min(size, n)
    rng = np.random.default_rng(seed)
    if targets.ndim != 1 or not np.issubdtype(targets.dtype, np.integer):
        return np.sort(rng.choice(n, size=size, replace=False))
    classes, counts = np.unique(targets, return_counts=True)
    share = counts * size / n
    take = np.floor(share).astype(int)
    for k in np.argsort(-(share - take), kind="stable")[: size - take.sum()]:
        take[k] += 1
    picked = [rng.permutation(np.flatnonzero(targets == c))[:t] for c, t in zip(classes, take)]
    return np.sort(np.concatenate(picked))


def calibration_from_folder(manifest: Any, uri: str, size: int, seed: int = 0
                            ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``trt-exit calibrate RUN --from imagefolder://DIR``: a class-stratified sample of DIR's
    images (all of its splits, if it has split folders) decoded with the evaluation transform of
    the model's data config. Returns ``(inputs by name, origin)`` for a calibration set."""
    if size < 1:
        raise InputError(f"calibration size must be positive, got {size}")
    recorded = (manifest.model.get("dataset") or {}).get("options") or {}
    config = {k: recorded[k] for k in DATA_KEYS if k in recorded}
    if len(config) < len(DATA_KEYS):
        config = {k: manifest.preprocessing[k] for k in DATA_KEYS if k in manifest.preprocessing}
    if len(config) < len(DATA_KEYS):
        raise ConfigError(f"{manifest.path} records no timm data config (input size, mean, std, "
                          f"crop): calibrate from an .npz of preprocessed inputs instead")
    path = data_path(uri)
    lists, task, classes, _ = find_images(path, seed)
    every = ImageList([p for s in SPLITS if s in lists for p in lists[s].paths],
                      np.concatenate([lists[s].targets for s in SPLITS if s in lists]))
    stream = ImageFolderSplit(every, config, task, f"calibration:{path.name}", training=False)
    indices = sample_stratified(stream, size, seed)
    data = stream.subset(indices).materialize()
    origin = {"kind": "imagefolder", "path": str(path), "images_in_folder": len(every.paths),
              "seed": seed, "skipped_images": data.info.get("skipped_images", 0),
              "selection": ("per class in proportion, numpy default_rng permutation"
                            if task == "classification" else "uniform, numpy default_rng"),
              "preprocessing": "timm.data.create_transform (evaluation) of the model's data "
                               "config", "data_config": config}
    return dict(data.inputs), origin


register_dataset("imagefolder", load_image_folder)

