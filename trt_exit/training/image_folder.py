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


#: How every image file is decoded before the transform (training, evaluation, run).
DECODE = "PIL.Image.open(file).convert('RGB')"


def describe_transform(transform) -> list[dict[str, Any]]:
    """The steps of a (composed) timm / torchvision transform as JSON:
    ``[{"op": class name, setting: value, ...}, ...]``."""
    steps = []
    for step in getattr(transform, "transforms", [transform]):
        settings = {key: _json_value(value) for key, value in vars(step).items()
                    if not key.startswith("_") and key not in ("training", "inplace")}
        steps.append({"op": type(step).__name__, **settings})
    return steps


def _json_value(value: Any) -> Any:
    import enum

    if hasattr(value, "tolist"):  # a tensor (Normalize's mean and std): float32 values
        return [float(f"{v:.7g}") for v in value.tolist()]
    if isinstance(value, enum.Enum):  # torchvision's InterpolationMode
        return value.value
    if isinstance(value, (tuple, list)):
        return [_json_value(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)


def transform_formula(steps: list[dict[str, Any]], config: dict[str, Any]) -> str:
    """The evaluation transform in words, step by step (what :func:`describe_transform`
    records), so that anyone can make the model's inputs without timm."""
    height, width = config["input_size"][1:]
    parts = [f"rgb = {DECODE}"]
    for step in steps:
        op = step["op"]
        size = step.get("size")
        how = f"{step.get('interpolation')}{', antialiased' if step.get('antialias') else ''}"
        if op == "Resize" and isinstance(size, int):
            parts.append(f"resize the shorter side to {size} px = floor({height} / crop_pct "
                         f"{config['crop_pct']:g}) and the longer side in proportion, rounded "
                         f"down ({how})")
        elif op == "Resize":
            parts.append(f"resize to {size[0]}x{size[1]} px (height x width, {how})")
        elif op in ("CenterCrop", "CenterCropOrPad"):
            pad = (f", padded with {step.get('fill')} where smaller"
                   if op == "CenterCropOrPad" else "")
            parts.append(f"crop the centre {size[0]}x{size[1]} px{pad}")
        elif op in ("ToTensor", "MaybeToTensor"):
            parts.append("x = rgb / 255 as (3, H, W) float32")
        elif op == "Normalize":
            parts.append(f"x = (x - mean) / std per channel, mean {step['mean']}, std "
                         f"{step['std']}")
        else:
            parts.append(f"{op}({', '.join(f'{k}={v}' for k, v in step.items() if k != 'op')})")
    return "; ".join(parts)


def eval_transform_record(config: dict[str, Any]) -> dict[str, Any]:
    """The manifest's preprocessing record of a timm backbone: its data config, the evaluation
    transform timm builds from it (each step and its settings), and that transform in words."""
    timm = require("timm", "timm", "Image folders")
    steps = describe_transform(create_transform(config, training=False))
    return {**config, "decode": DECODE, "eval_transform": steps,
            "formula": transform_formula(steps, config), "layout": "NCHW float32",
            "source": "timm.data.resolve_data_config of the backbone (its pretrained config), "
                      "timm.data.create_transform(is_training=False)",
            "timm": timm.__version__}


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


def image_extensions() -> set[str]:
    """File suffixes of images (timm's list: .png, .jpg, .jpeg, .webp, ...)."""
    require("timm", "timm", "Image files")
    from timm.data.readers.img_extensions import get_img_extensions

    return set(get_img_extensions(as_set=True))


def _class_tree(folder: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Class names and (path, class) pairs of a folder of class folders."""
    extensions = image_extensions()
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


def _read_table(path: Path) -> list[tuple[int, Any]]:
    """``(line number, row)`` of a CSV (rows as dicts) or JSONL file (rows as parsed)."""
    try:
        if path.suffix.lower() == ".jsonl":
            rows = [(number, json.loads(line)) for number, line in
                    enumerate(path.read_text().splitlines(), start=1) if line.strip()]
        else:
            with path.open(newline="") as handle:
                rows = list(enumerate(csv.DictReader(handle), start=2))
    except (OSError, ValueError, RecursionError, csv.Error) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    if not rows:
        raise ConfigError(f"{path} lists no images")
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
        rule, pool = "one folder per class, no split folders", "all images"
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
        rule = "given as folders: " + ", ".join(
            f"{split} ({given[split].name}/)" for split in SPLITS if split in given_items)
        pool = "train"
    index = {name: i for i, name in enumerate(classes)}
    lists = {s: ImageList([p for p, _ in it], np.array([index[c] for _, c in it], dtype=np.int64))
             for s, it in given_items.items()}
    missing = [s for s in ("val", "test") if s not in lists]
    if missing:
        lists, carved = _carve(lists, missing, seed, val_fraction, test_fraction, stratify=True,
                               pool=pool)
        rule += f"; {carved}"
    return lists, "classification", classes, rule


def _carve(lists: dict[str, ImageList], missing: list[str], seed: int, val_fraction: float,
           test_fraction: float, stratify: bool, pool: str = "train"
           ) -> tuple[dict[str, ImageList], str]:
    """Carves the ``missing`` splits out of ``lists["train"]`` (``pool`` names what that holds,
    for the recorded rule)."""
    fractions = [val_fraction if s == "val" else test_fraction for s in missing]
    train = lists["train"]
    parts = _stratified_split(train.targets if stratify else np.zeros(len(train.paths)),
                              fractions, seed, stratify)
    out = dict(lists)
    for split, indices in zip(missing, parts[:-1]):
        out[split] = train.take(indices)
    out["train"] = train.take(parts[-1])
    rule = (f"{' and '.join(missing)} carved out of {pool} by seed {seed} "
            f"({', '.join(f'{s} {f:g}' for s, f in zip(missing, fractions))}"
            f"{', stratified by class' if stratify else ''}; numpy default_rng permutation)")
    return out, rule


def _table_value(value: Any, key: str, where: str) -> str | float:
    """A row's label (a non-empty name) or count / value (a finite float32 number; counts are
    not negative)."""
    if key == "label":
        if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
            raise ConfigError(f"{where}: label {value!r} is not a class name; give every row a "
                              f"non-empty label")
        return str(value)
    number = None
    if not isinstance(value, bool) and isinstance(value, (str, int, float)):
        try:
            with np.errstate(over="ignore"):  # beyond float32: inf, refused below
                number = float(np.float32(value))
        except (ValueError, OverflowError):
            pass
    if number is None or not np.isfinite(number):
        raise ConfigError(f"{where}: {key} {value!r} is not a finite number; give every row a "
                          f"number")
    if key == "count" and number < 0:
        raise ConfigError(f"{where}: count {value!r} is negative; counts are >= 0 (use a "
                          f"'value' column for signed targets)")
    return number


def _find_in_table(path: Path, seed: int, val_fraction: float, test_fraction: float):
    rows = _read_table(path)
    first = rows[0][1]
    keys = set(first) if isinstance(first, dict) else set()
    value_key = next((k for k in ("label", "count", "value") if k in keys), None)
    if "path" not in keys or value_key is None:
        raise ConfigError(f"{path} needs a 'path' column and a 'label' (classes) or 'count' / "
                          f"'value' (regression) column; it has {sorted(map(str, keys))}")
    extensions = image_extensions()
    paths, values, splits = [], [], []
    for number, row in rows:
        where = f"{path}:{number}"
        if not isinstance(row, dict) or not isinstance(row.get("path"), str) or not row["path"]:
            raise ConfigError(f"{where}: every row needs a 'path' (an image file relative to "
                              f"{path.name}) and a {value_key!r}")
        problem = path_text_problem(row["path"])
        if problem:
            raise ConfigError(f"{where}: the image path {shown_path(row['path'])} "
                              f"cannot name a file: {problem}")
        image = (path.parent / row["path"]).resolve()
        if image.suffix.lower() not in extensions:
            raise ConfigError(f"{where}: {row['path']} is not an image "
                              f"({', '.join(sorted(extensions))})")
        split = str(row.get("split") or "train")
        if split not in SPLITS:
            raise ConfigError(f"{where}: split {split!r} is not one of {SPLITS}")
        paths.append(str(image))
        values.append(_table_value(row.get(value_key), value_key, where))
        splits.append(split)
    if value_key == "label":
        classes = sorted(set(values))
        index = {c: i for i, c in enumerate(classes)}
        targets = np.array([index[v] for v in values], dtype=np.int64)
        task = "classification"
    else:
        classes = None
        targets = np.array(values, dtype=np.float32).reshape(-1, 1)
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
                               stratify=task == "classification",
                               pool="train" if "split" in keys else "all listed images")
        rule += f"; {carved}"
    return lists, task, classes, rule


# --------------------------------------------------------------------------- decoding


class ImageFiles:
    """A map-style torch dataset: ``[i] -> (image (3, H, W) float32, target, i, failed path)``;
    an image that cannot be decoded gives ``(None, target, i, its path)`` (the batch loop drops
    it and counts it)."""

    def __init__(self, images: ImageList, transform):
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images.paths)

    def __getitem__(self, index: int):
        import torch

        target = torch.as_tensor(self.images.targets[index])
        try:
            return decode_image(self.images.paths[index], self.transform), target, index, None
        except (OSError, ValueError, EOFError, SyntaxError):  # Pillow's ways to fail on a file
            return None, target, index, self.images.paths[index]


def decode_image(path: str | Path, transform):
    """One image file through ``transform``: decoded with Pillow and converted to RGB first, as
    in training and evaluation. OSError (missing, unreadable, truncated, not an image) or
    ValueError when it cannot be decoded."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return transform(image.convert("RGB"))
    except Image.DecompressionBombError as exc:  # not an OSError: one more way to be unreadable
        raise ValueError(str(exc)) from exc


def _collate(batch):
    """Stacks the decodable samples; returns (images or None, targets, their indices, failed
    paths)."""
    import torch

    good = [(x, t, i) for x, t, i, failed in batch if failed is None]
    failed = [path for _, _, _, path in batch if path is not None]
    if not good:
        return None, None, [], failed
    return (torch.stack([x for x, _, _ in good]), torch.stack([t for _, t, _ in good]),
            [i for _, _, i in good], failed)


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
        every_class: A full pass in which every image of a class fails to decode is an error
            (the model would never see the class); set for the splits a model is trained and
            evaluated on.
    """

    images: ImageList
    config: dict[str, Any]
    task: str
    name: str
    info: dict[str, Any] = field(default_factory=dict)
    training: bool = True
    num_workers: int = 2
    skipped: set = field(default_factory=set)
    every_class: bool = False

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
        return ImageFolderSplit(self.images.take(np.asarray(indices, dtype=np.int64)),
                                self.config, self.task, self.name, dict(self.info),
                                self.training, self.num_workers)

    def decoded(self, batch_size: int, shuffle: bool = False, seed: int = 0,
                training: bool | None = None, strict: bool = True
                ) -> Iterator[tuple[Any, Any, list[int]]]:
        """Yields ``(images (B, 3, H, W), targets, their indices in this split)`` decoded by
        DataLoader workers; images that cannot be decoded are left out and added to
        ``skipped``. When ``strict``, a full pass in which no image decoded (or, with
        ``every_class``, none of a class's images) is an InputError."""
        import torch

        training = self.training if training is None else training
        files = ImageFiles(self.images, create_transform(self.config, training))
        loader = torch.utils.data.DataLoader(
            files, batch_size=batch_size, shuffle=shuffle, num_workers=self.num_workers,
            collate_fn=_collate, generator=torch.Generator().manual_seed(seed),
            persistent_workers=False)
        seen: set[int] = set()
        for images, targets, indices, failed in loader:
            self.skipped.update(failed)
            if images is not None:
                seen.update(indices)
                yield images, targets, indices
        if strict:
            self._check_pass(seen)

    def _check_pass(self, seen: set[int]) -> None:
        """Raises when a full pass decoded no image at all, or none of a class's images."""
        if not len(self):
            return
        if not seen:
            raise InputError(f"{self.name}: none of its {len(self)} images could be decoded "
                             f"(e.g. {self.images.paths[0]}); are they image files?")
        if not self.every_class or self.task != "classification":
            return
        targets = self.images.targets
        lost = sorted(set(targets.tolist()) - {int(targets[i]) for i in seen})
        if lost:
            names = self.info.get("class_names") or []
            c = lost[0]
            label = repr(names[c]) if c < len(names) else str(c)
            members = np.flatnonzero(targets == c)
            raise InputError(
                f"{self.name}: none of the {len(members)} images of class {label} could be "
                f"decoded (e.g. {self.images.paths[members[0]]}"
                f"{f'; {len(lost) - 1} more classes alike' if len(lost) > 1 else ''}); the "
                f"model would never see it: replace the images or remove the class")

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0,
                training: bool | None = None) -> Iterator[tuple[dict[str, Any], Any]]:
        """Yields ``({"image": (B, 3, H, W)}, targets)`` (see :meth:`decoded`)."""
        for images, targets, _ in self.decoded(batch_size, shuffle, seed, training):
            yield {tn.IMAGE: images}, targets

    def materialize(self) -> Dataset:
        """The split decoded with the evaluation transform into arrays (for tuning, evaluation,
        export parity and calibration)."""
        chunks, targets = [], []
        for inputs, batch_targets in self.batches(64, training=False):
            chunks.append(inputs[tn.IMAGE].numpy())
            targets.append(batch_targets.numpy())
        if not chunks:
            raise InputError(f"{self.name} has no images to decode")
        return Dataset({tn.IMAGE: np.concatenate(chunks).astype(np.float32)},
                       np.concatenate(targets), self.task, self.name,
                       {**self.info, "skipped_images": self.skipped_images})


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
    if task == "classification" and len(classes) < 2:
        raise ConfigError(f"{path} holds one class ({classes[0]!r}); a classifier needs at least "
                          f"two: add a folder (or label) per class")
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
                                  training=split == "train", num_workers=num_workers,
                                  every_class=True)
        splits[split] = stream if split == "train" else stream.materialize()
    return splits


def _draw_plan(targets: Any, size: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Per group (each class; all samples for regression targets) its indices in draw order
    (numpy default_rng permutations) and how many to take: ``min(size, N)`` in all, in
    proportion to the class sizes (largest remainders get the rounding)."""
    targets = np.asarray(targets)
    n = len(targets)
    size = min(size, n)
    rng = np.random.default_rng(seed)
    if targets.ndim != 1 or not np.issubdtype(targets.dtype, np.integer):
        return [rng.permutation(n)], np.array([size])
    classes, counts = np.unique(targets, return_counts=True)
    share = counts * size / n
    take = np.floor(share).astype(int)
    for k in np.argsort(-(share - take), kind="stable")[: size - take.sum()]:
        take[k] += 1
    return [rng.permutation(np.flatnonzero(targets == c)) for c in classes], take


def sample_stratified(split: Dataset | ImageFolderSplit, size: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of exactly ``min(size, N)`` samples, drawn per class in proportion to the
    class sizes (largest remainders get the rounding); regression targets: uniformly."""
    orders, take = _draw_plan(split.targets, size, seed)
    return np.sort(np.concatenate([order[:t] for order, t in zip(orders, take)]))


def sample_decodable(split: ImageFolderSplit, size: int, seed: int = 0) -> Dataset:
    """:func:`sample_stratified` decoded with the evaluation transform, holding exactly
    ``min(size, decodable images)`` samples: an image that cannot be decoded is replaced by the
    next one of its class in the draw order, or, once its class has none left, of the class with
    the most images left. The count of undecodable images drawn is in ``info``."""
    orders, quota = _draw_plan(split.targets, size, seed)
    quota = quota.copy()
    used = np.zeros(len(orders), dtype=int)  # drawn so far, per group
    got = np.zeros(len(orders), dtype=int)   # decoded so far, per group
    chosen: dict[int, np.ndarray] = {}
    failed = 0
    while True:
        # A group with fewer undrawn images than it still needs hands the rest of its quota to
        # the group with the most to spare (the total shrinks only when no group has any).
        spare = [len(o) - used[g] - (quota[g] - got[g]) for g, o in enumerate(orders)]
        for g in range(len(orders)):
            while spare[g] < 0:
                k = int(np.argmax(spare))
                if spare[k] <= 0:
                    quota[g] += spare[g]
                    spare[g] = 0
                    break
                quota[g] -= 1
                quota[k] += 1
                spare[g] += 1
                spare[k] -= 1
        want: dict[int, int] = {}  # index -> group
        for g, order in enumerate(orders):
            take = order[used[g] : used[g] + quota[g] - got[g]]
            used[g] += len(take)
            want.update((int(i), g) for i in take)
        if not want:
            break
        indices = np.array(sorted(want), dtype=np.int64)
        for images, _, positions in split.subset(indices).decoded(64, training=False,
                                                                  strict=False):
            for image, position in zip(images.numpy(), positions):
                chosen[int(indices[position])] = image
        for index, g in want.items():
            if index in chosen:
                got[g] += 1
            else:
                failed += 1
    if not chosen:
        raise InputError(f"{split.name}: none of its {len(split)} images could be decoded "
                         f"(e.g. {split.images.paths[0]}); are they image files?")
    picked = np.array(sorted(chosen), dtype=np.int64)
    return Dataset({tn.IMAGE: np.stack([chosen[i] for i in picked]).astype(np.float32)},
                   np.asarray(split.targets)[picked], split.task, split.name,
                   {**split.info, "skipped_images": failed})


def recorded_data_config(manifest: Any) -> dict[str, Any]:
    """The timm data config a model's images are preprocessed with (its run's dataset options,
    else its preprocessing record); ConfigError when the manifest records none."""
    recorded = (manifest.model.get("dataset") or {}).get("options") or {}
    config = {k: recorded[k] for k in DATA_KEYS if k in recorded}
    if len(config) < len(DATA_KEYS):
        config = {k: manifest.preprocessing[k] for k in DATA_KEYS if k in manifest.preprocessing}
    if len(config) < len(DATA_KEYS):
        raise ConfigError(f"{manifest.path} records no image transform (a timm data config: "
                          f"input size, mean, std, crop), so it cannot take image files; give "
                          f"preprocessed arrays (.npy / .npz) instead")
    try:
        channels = [float(v) for v in config["mean"]], [float(v) for v in config["std"]]
        config = {**config, "input_size": [int(v) for v in config["input_size"]],
                  "mean": channels[0], "std": channels[1],
                  "interpolation": str(config["interpolation"]),
                  "crop_pct": float(config["crop_pct"]), "crop_mode": str(config["crop_mode"])}
        valid = (len(config["input_size"]) == 3 and min(config["input_size"]) >= 1
                 and max(config["input_size"][1:]) <= 8192  # a camera image is smaller
                 and len(channels[0]) == len(channels[1]) == config["input_size"][0]
                 and min(channels[1]) > 0 and 0 < config["crop_pct"] <= 1)
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ConfigError(f"{manifest.path}: the recorded data config {config} is malformed "
                          f"(input_size [C, H, W] with sides up to 8192, one mean and std > 0 "
                          f"per channel, crop_pct in (0, 1]); re-export the model (trt-exit "
                          f"export)")
    return config


def calibration_from_folder(manifest: Any, uri: str, size: int, seed: int = 0
                            ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``trt-exit calibrate RUN --from imagefolder://DIR``: a class-stratified sample of DIR's
    images (all of its splits, if it has split folders) decoded with the evaluation transform of
    the model's data config; undecodable images drawn are replaced (see
    :func:`sample_decodable`). Returns ``(inputs by name, origin)`` for a calibration set."""
    if size < 1:
        raise InputError(f"calibration size must be positive, got {size}")
    config = recorded_data_config(manifest)
    path = data_path(uri)
    lists, task, classes, _ = find_images(path, seed)
    every = ImageList([p for s in SPLITS if s in lists for p in lists[s].paths],
                      np.concatenate([lists[s].targets for s in SPLITS if s in lists]))
    stream = ImageFolderSplit(every, config, task, f"calibration:{path.name}", training=False)
    data = sample_decodable(stream, size, seed)
    origin = {"kind": "imagefolder", "path": str(path), "images_in_folder": len(every.paths),
              "seed": seed, "skipped_images": data.info["skipped_images"],
              "selection": SAMPLE_RULE if task == "classification" else
                           "uniform, numpy default_rng permutation; " + REPLACE_RULE,
              "preprocessing": "timm.data.create_transform (evaluation) of the model's data "
                               "config", "data_config": config}
    return dict(data.inputs), origin


#: How :func:`sample_decodable` draws (recorded with calibration sets).
REPLACE_RULE = "an undecodable image is replaced by the next of its class in the draw order"
SAMPLE_RULE = "per class in proportion, numpy default_rng permutation; " + REPLACE_RULE


register_dataset("imagefolder", load_image_folder)

