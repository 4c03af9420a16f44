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
    import typing

    parameters = {p.name: p for p in inspect.signature(loader).parameters.values()
                  if p.name != "seed" and p.kind is p.POSITIONAL_OR_KEYWORD}
    unknown = sorted(set(options) - set(parameters))
    if unknown:
        raise ConfigError(f"dataset {name!r} has no option {', '.join(map(repr, unknown))}; its "
                          f"options: {', '.join(parameters) or 'none'}")
    try:
        hints = typing.get_type_hints(loader)
    except (NameError, TypeError):  # an annotation that does not resolve: check by default
        hints = {}
    converted = {}
    for key, value in options.items():
        declared = hints.get(key)
        if declared is None:
            default = parameters[key].default
            declared = type(default) if default not in (None, inspect.Parameter.empty) else Any
        converted[key] = _option_value(name, key, value, declared)
    return converted


_WANTED = {bool: "true or false", int: "an integer", float: "a number", str: "text"}
_PLURAL = {bool: "true or false", int: "integers", float: "numbers", str: "text"}


def _plain(text: str) -> Any:
    """Text of an untyped option (a bare ``list``'s items): a number when it reads as one."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _option_value(dataset: str, key: str, value: Any, declared: Any) -> Any:
    """``value`` of a loader option as its declared type: text from ``--dataset-option
    KEY=VALUE`` is converted (``1``, ``0.5``, ``true``, ``a,b`` for lists); JSON values from a
    manifest or a checkpoint must already have the type.

    Raises:
        ConfigError: The value does not fit, or the option takes an object that text cannot
            give (a settings dataclass: set it from Python).
    """
    import dataclasses
    import math
    import types
    import typing

    origin, args = typing.get_origin(declared), typing.get_args(declared)
    union = origin in (typing.Union, types.UnionType)  # X | None, Optional[X]
    options = [a for a in args if a is not type(None)] if union else [declared]
    nullable = type(None) in args or declared is Any
    if nullable and (value is None or isinstance(value, str)
                     and value.strip().lower() in ("none", "null")):
        return None
    problems = []
    for option in options:
        if option is Any:
            return _plain(value) if isinstance(value, str) else value
        kind = typing.get_origin(option) or option
        if kind in (bool, int, float):
            if isinstance(value, str):
                text = value.strip().lower()
                try:
                    if kind is bool:
                        if text not in ("1", "0", "true", "false", "yes", "no"):
                            raise ValueError(value)
                        return text in ("1", "true", "yes")
                    number = kind(text)
                except ValueError:
                    problems.append(_WANTED[kind])
                    continue
                if kind is float and not math.isfinite(number):
                    problems.append("a finite number")
                    continue
                return number
            if kind is bool and isinstance(value, bool):
                return value
            if kind is int and isinstance(value, int) and not isinstance(value, bool):
                return value
            if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and math.isfinite(value):
                return float(value)
            problems.append(_WANTED[kind])
        elif kind is str:
            if isinstance(value, str):
                return value
            problems.append("text")
        elif kind in (list, tuple):
            items = [v.strip() for v in value.split(",")] if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)):
                problems.append("a list")
                continue
            item_types = typing.get_args(option)
            if len(item_types) == 2 and item_types[1] is Ellipsis or kind is list:
                item_types = (item_types[0] if item_types else Any,) * len(items)
            elif item_types and len(item_types) != len(items):
                problems.append(f"a list of {len(item_types)}")
                continue
            try:
                converted = [_option_value(dataset, key, item, item_type)
                             for item, item_type in zip(items, item_types or [Any] * len(items))]
            except ConfigError:
                kinds = dict.fromkeys(_PLURAL.get(t, getattr(t, "__name__", str(t)))
                                      for t in item_types)
                problems.append("a list of " + " and ".join(kinds))
                continue
            return tuple(converted) if kind is tuple else converted
        elif kind is dict:
            if isinstance(value, dict):
                return value
            problems.append("an object (set it from Python or a manifest, not as text)")
        elif isinstance(kind, type):
            if isinstance(value, kind):
                return value
            what = kind.__name__ + (" settings" if dataclasses.is_dataclass(kind) else "")
            problems.append(f"a {what} object (set it from Python; it cannot be given as text)")
        else:  # an annotation this check does not know: the loader checks it
            return value
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    raise ConfigError(f"dataset {dataset!r} option {key!r} takes {' or '.join(problems)}, "
                      f"got {shown}")

