"""Calibration sets: the real model inputs INT8 ranges are measured on.

A calibration set is a few hundred preprocessed model inputs, stored next to the manifest as
``calibration/calibration.npz`` (one array per model input, by tensor name) and recorded in
``manifest.calibration`` with its size, its origin (dataset, split, seed and selection rule, or
the user's file and its sha256) and the file's hash. ``trt-exit calibrate`` writes it; the INT8
pass (:mod:`trt_exit.export.precision`) reads it and calibrates each stage on the activations the
stages before it produce from these inputs.

Samples come from the *training* split by default: the validation split tunes the exit
thresholds and the test split measures accuracy, so neither should shape the quantization.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trt_exit.errors import ArtifactError, InputError
from trt_exit.fileio import atomic_path, load_arrays, sha256_file
from trt_exit.manifest import FileRef, Manifest

#: Where a manifest directory keeps its calibration set.
CALIBRATION_PATH = Path("calibration") / "calibration.npz"
#: Default number of samples (enough for stable max / percentile ranges on small ViTs).
DEFAULT_SAMPLES = 256
#: Fewer samples than this give ranges that depend on which samples were drawn: refused.
MIN_SAMPLES = 32


@dataclass
class CalibrationSet:
    """Model inputs for INT8 calibration.

    Attributes:
        inputs: (N, ...) float32 arrays by model input name.
        origin: Where the samples came from (recorded in the manifest).
    """

    inputs: dict[str, np.ndarray]
    origin: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values()))) if self.inputs else 0

    def batches(self, batch_size: int):
        """Yields dicts of (b, ...) slices, ``b <= batch_size``."""
        for start in range(0, len(self), batch_size):
            yield {name: v[start : start + batch_size] for name, v in self.inputs.items()}


def from_dataset(split, size: int = DEFAULT_SAMPLES, seed: int = 0) -> CalibrationSet:
    """``size`` samples drawn without replacement from a dataset split (all if it is smaller).

    Args:
        split: A :class:`trt_exit.training.datasets.Dataset` (one split).
        size: Number of samples.
        seed: Seed of the draw.
    """
    if size < 1:
        raise InputError(f"calibration size must be positive, got {size}")
    n = len(split)
    indices = np.sort(np.random.default_rng(seed).choice(n, size=min(size, n), replace=False))
    origin = {"kind": "dataset", "split": split.name, "samples_in_split": n, "seed": seed,
              "selection": "numpy.random.default_rng(seed).choice(N, size, replace=False), sorted",
              **{f"dataset_{k}": v for k, v in split.info.items()}}
    return CalibrationSet({k: np.ascontiguousarray(v[indices], dtype=np.float32)
                           for k, v in split.inputs.items()}, origin)


def from_file(path: str | os.PathLike) -> CalibrationSet:
    """A calibration set from a user's ``.npz`` (arrays named like the model inputs) or ``.npy``
    (models with one input)."""
    path = Path(path)
    loaded = load_arrays(path, "calibration file")
    # A bare array is named after the model's single input in check().
    inputs = loaded if isinstance(loaded, dict) else {"": loaded}
    return CalibrationSet(inputs, {"kind": "file", "path": str(path.resolve()),
                                   "sha256": sha256_file(path)})


def check(manifest: Manifest, calibration: CalibrationSet,
          min_samples: int = MIN_SAMPLES) -> CalibrationSet:
    """Checks a calibration set against the model's inputs; returns it with inputs by name.

    Raises:
        InputError: Missing or unknown inputs, a wrong shape or dtype, NaN/Inf, different sample
            counts, or fewer than ``min_samples`` samples; the message names the tensor.
    """
    specs = {s.name: s for s in manifest.inputs}
    inputs = dict(calibration.inputs)
    if set(inputs) == {""}:
        if len(specs) != 1:
            raise InputError(f"this model takes {sorted(specs)}: give the calibration set as an "
                             f".npz with one array per input name")
        inputs = {next(iter(specs)): inputs[""]}
    if set(inputs) != set(specs):
        raise InputError(f"calibration arrays {sorted(inputs)} do not match the model's inputs "
                         f"{sorted(specs)}")
    counts = set()
    for name, spec in specs.items():
        array = np.asarray(inputs[name])
        expected = f"(N, {', '.join(str(d) for d in spec.shape[1:])})"
        if array.ndim != len(spec.shape) or tuple(array.shape[1:]) != tuple(spec.shape[1:]):
            raise InputError(f"calibration input {name!r} has shape {array.shape}, expected "
                             f"{expected} preprocessed like the model's inputs "
                             f"(see the manifest's preprocessing)")
        if not np.issubdtype(array.dtype, np.floating):
            raise InputError(f"calibration input {name!r} has dtype {array.dtype}; expected "
                             f"float32 model inputs, already preprocessed")
        if not np.isfinite(array).all():
            raise InputError(f"calibration input {name!r} contains NaN or Inf values")
        inputs[name] = np.ascontiguousarray(array, dtype=np.float32)
        counts.add(len(array))
    if len(counts) != 1:
        raise InputError(f"calibration inputs have different sample counts: {sorted(counts)}")
    (count,) = counts
    if count < min_samples:
        raise InputError(f"the calibration set has {count} samples; INT8 ranges need at least "
                         f"{min_samples} (default {DEFAULT_SAMPLES}): use a larger split or "
                         f"--size")
    return CalibrationSet(inputs, dict(calibration.origin))


def save(manifest: Manifest, calibration: CalibrationSet) -> Manifest:
    """Checks ``calibration``, writes it to ``calibration/calibration.npz`` atomically and
    records it in the manifest (saved)."""
    calibration = check(manifest, calibration)
    target = manifest.root / CALIBRATION_PATH
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **calibration.inputs)
    manifest.calibration = {
        "file": FileRef.of(target, manifest.root).__dict__,
        "samples": len(calibration),
        "inputs": {name: list(v.shape[1:]) for name, v in calibration.inputs.items()},
        "origin": calibration.origin,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    manifest.save()
    return manifest


def load(manifest: Manifest) -> CalibrationSet:
    """The manifest's calibration set, checked against its sha256 and the model's inputs."""
    record = manifest.calibration
    if not record or "file" not in record:
        raise ArtifactError(f"{manifest.path} has no calibration set; create one with "
                            f"trt-exit calibrate {manifest.root}")
    path = manifest.verified_path(FileRef(**record["file"]), "calibration set")
    loaded = load_arrays(path, f"calibration set (calibration.file in {manifest.path})")
    inputs = loaded if isinstance(loaded, dict) else {"": loaded}
    return check(manifest, CalibrationSet(inputs, dict(record.get("origin", {}))))
