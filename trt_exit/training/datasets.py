"""Datasets as in-memory arrays with fixed, documented splits.

A :class:`Dataset` holds the model inputs by tensor name (already preprocessed, float32) and the
targets. Splits are deterministic: the same seed gives the same samples on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from trt_exit import tensor_names as tn
from trt_exit.errors import ConfigError


@dataclass
class Dataset:
    """One split of a dataset.

    Attributes:
        inputs: Model inputs by tensor name, each (N, ...) float32, preprocessed.
        targets: (N,) int64 class indices, or (N, K) float32 regression targets.
        task: ``"classification"`` or ``"regression"``.
        name: Dataset and split, e.g. ``"digits/test"``.
        info: Provenance (source, split rule, seed) recorded in manifests and reports.
        meta: Per-sample annotations by name, each (N,), e.g. digits-C's ``severity``
            (sliced with the samples, not recorded in manifests).
    """

    inputs: dict[str, np.ndarray]
    targets: np.ndarray
    task: str
    name: str
    info: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for kind, arrays in (("input", self.inputs), ("meta", self.meta)):
            for key, value in arrays.items():
                if len(value) != len(self.targets):
                    raise ConfigError(
                        f"{self.name}: {kind} {key!r} has {len(value)} samples but there are "
                        f"{len(self.targets)} targets"
                    )

    def __len__(self) -> int:
        return len(self.targets)

    def subset(self, indices: np.ndarray, name: str | None = None) -> "Dataset":
        """The samples at ``indices``."""
        return Dataset(
            inputs={k: v[indices] for k, v in self.inputs.items()},
            targets=self.targets[indices],
            task=self.task,
            name=name or self.name,
            info=dict(self.info),
            meta={k: v[indices] for k, v in self.meta.items()},
        )


DIGITS_SPLIT_RULE = (
    "sklearn.model_selection.train_test_split, stratified by label: 20% test, then 25% of the "
    "rest as validation (60/20/20 overall)"
)


def digits_preprocess(pixels: np.ndarray) -> np.ndarray:
    """Maps digits pixels (values 0..16) to model inputs in [-1, 1], (N, 1, 8, 8) float32."""
    x = np.asarray(pixels, dtype=np.float32).reshape(-1, 1, 8, 8)
    return (x / 16.0 - 0.5) / 0.5


def digits_pixel_splits(seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The raw digits split as for :func:`load_digits`: ``(pixels, labels)`` by split name,
    pixels (N, 8, 8) float64 with values 0..16, labels (N,) int64, rows in dataset order."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    digits = sk_load_digits()
    labels = digits.target.astype(np.int64)
    indices = np.arange(len(labels))
    rest, test = train_test_split(indices, test_size=0.2, stratify=labels, random_state=seed)
    train, val = train_test_split(rest, test_size=0.25, stratify=labels[rest], random_state=seed)
    rows = {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}
    return ({name: digits.images[idx] for name, idx in rows.items()},
            {name: labels[idx] for name, idx in rows.items()})


def load_digits(seed: int = 0) -> dict[str, Dataset]:
    """scikit-learn's 1,797 real 8x8 handwritten digits, split into train / val / test.

    Args:
        seed: ``random_state`` of both stratified splits (default 0 is the documented split).

    Returns:
        ``{"train": ..., "val": ..., "test": ...}`` with 1,077 / 360 / 360 samples for seed 0.
    """
    pixels, labels = digits_pixel_splits(seed)
    info = {"source": "sklearn.datasets.load_digits", "split": DIGITS_SPLIT_RULE, "seed": seed}
    return {
        name: Dataset({tn.IMAGE: digits_preprocess(pixels[name])}, labels[name], "classification",
                      f"digits/{name}", dict(info))
        for name in ("train", "val", "test")
    }


_LOADERS = {"digits": load_digits}


def register_dataset(name: str, loader) -> None:
    """Registers ``loader(seed=..., **kwargs) -> {split: Dataset}`` under ``name``.

    A dataset family's module calls this at its end; :mod:`trt_exit.training` (the package)
    imports every built-in family, so importing anything from the package fills the registry,
    and this module never imports a family back.
    """
    _LOADERS[name] = loader


def dataset_names() -> list[str]:
    """Names of registered datasets."""
    return sorted(_LOADERS)


def load_dataset(name: str, seed: int = 0, **kwargs: Any) -> dict[str, Dataset]:
    """Loads a registered dataset's splits.

    ``kwargs`` are the loader's options; text values (from the command line's
    ``--dataset-option KEY=VALUE``) are converted to the type of the option's default.

    Raises:
        ConfigError: Unknown dataset, unknown option, or a value of the wrong type.
    """
    if name not in _LOADERS:
        raise ConfigError(f"unknown dataset {name!r}; known datasets: {', '.join(dataset_names())}")
    loader = _LOADERS[name]
    return loader(seed=seed, **_loader_options(name, loader, kwargs))


def _loader_options(name: str, loader: Callable, options: dict[str, Any]) -> dict[str, Any]:
    import inspect

    parameters = {p.name: p for p in inspect.signature(loader).parameters.values()
                  if p.name != "seed" and p.kind is p.POSITIONAL_OR_KEYWORD}
    unknown = sorted(set(options) - set(parameters))
    if unknown:
        raise ConfigError(f"dataset {name!r} has no option {', '.join(map(repr, unknown))}; its "
                          f"options: {', '.join(parameters) or 'none'}")
    converted = {}
    for key, value in options.items():
        default = parameters[key].default
        kind = type(default)
        if isinstance(value, str) and kind in (bool, int, float):
            try:
                if kind is bool:
                    if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                        raise ValueError(value)
                    value = value.lower() in ("1", "true", "yes")
                else:
                    value = kind(value)
            except ValueError:
                wanted = {bool: "true or false", int: "an integer", float: "a number"}[kind]
                raise ConfigError(f"dataset {name!r} option {key!r} takes {wanted}, "
                                  f"got {value!r}") from None
        converted[key] = value
    return converted

