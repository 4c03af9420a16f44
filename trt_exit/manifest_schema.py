"""Structure and types of ``manifest.json``, checked on load.

A model directory may come from someone else, and manifests get edited by hand: every field the
code reads is checked here before any of it is used, and a bad one is a
:class:`~trt_exit.errors.ManifestError` that names the field (``stages[2].outputs[0].dtype``).
Unknown top-level fields are ignored (later format additions); unknown fields inside the
structured entries (tensors, file references, stages, exits) are errors, as they would be
silently dropped otherwise.

Every file reference (a dict with exactly ``path``, ``sha256`` and ``bytes``, wherever it
appears: ONNX graphs, engines, the checkpoint, the calibration set) must name a relative path
that stays inside the directory; :meth:`trt_exit.manifest.Manifest.resolve` also refuses
symlinks that lead out.
"""

from __future__ import annotations

import math
import re
from pathlib import PurePosixPath
from typing import Any, Iterator

from trt_exit.errors import ManifestError

TASKS = ("classification", "regression")
STAGE_KINDS = ("segment", "exit")
PRECISIONS = ("fp32", "fp16", "int8")
#: Tensor element types a manifest may declare (numpy names).
DTYPES = ("float32", "float16", "float64", "int8", "uint8", "int32", "int64", "bool")
FILE_REF_KEYS = {"path", "sha256", "bytes"}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class _Checker:
    """Raises :class:`ManifestError` naming the manifest and the field."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, field: str, problem: str) -> None:
        raise ManifestError(f"{self.where}: malformed manifest: {field} {problem}; fix the "
                            f"field or re-export the model (trt-exit export)")

    def dict(self, value: Any, field: str) -> dict:
        if not isinstance(value, dict):
            self.fail(field, f"must be an object, not {_kind(value)}")
        return value

    def list(self, value: Any, field: str, nonempty: bool = False) -> list:
        if not isinstance(value, list):
            self.fail(field, f"must be a list, not {_kind(value)}")
        if nonempty and not value:
            self.fail(field, "must not be empty")
        return value

    def str(self, value: Any, field: str) -> str:
        if not isinstance(value, str) or not value:
            self.fail(field, f"must be a non-empty string, not {_kind(value)}")
        return value

    def int(self, value: Any, field: str, minimum: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(field, f"must be an integer, not {_kind(value)}")
        if minimum is not None and value < minimum:
            self.fail(field, f"must be >= {minimum}, not {value}")
        return value

    def number(self, value: Any, field: str, low: float | None = None,
               high: float | None = None) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(field, f"must be a number, not {_kind(value)}")
        if not math.isfinite(value):
            self.fail(field, f"must be a finite number, not {value}")
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"[{low}, {high}]" if high is not None else f">= {low}"
            self.fail(field, f"must be in {bounds}, not {value}")
        return value

    def choice(self, value: Any, field: str, choices: tuple[str, ...]) -> str:
        if value not in choices:
            self.fail(field, f"must be one of {', '.join(choices)}, not {value!r}")
        return value

    def keys(self, value: dict, field: str, required: set[str], optional: set[str]) -> None:
        missing = required - set(value)
        if missing:
            self.fail(field, f"lacks {', '.join(sorted(missing))}")
        unknown = set(value) - required - optional
        if unknown:
            self.fail(field, f"has unknown fields {', '.join(sorted(map(str, unknown)))}")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def is_file_ref(value: Any) -> bool:
    """Whether ``value`` is shaped like a file reference (``path``, ``sha256``, ``bytes``)."""
    return isinstance(value, dict) and set(value) == FILE_REF_KEYS


def file_refs(data: Any, field: str = "") -> Iterator[tuple[str, dict]]:
    """Every file reference in a manifest dict, with the field it sits at."""
    if is_file_ref(data):
        yield field, data
    elif isinstance(data, dict):
        for key, value in data.items():
            yield from file_refs(value, f"{field}.{key}" if field else str(key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from file_refs(value, f"{field}[{i}]")


def check_relative_path(check: _Checker, path: Any, field: str) -> None:
    """A file path of the manifest: relative, inside the directory (no ``..`` out of it)."""
    check.str(path, f"{field}.path")
    pure = PurePosixPath(path)
    if pure.is_absolute() or "\\" in path or (len(path) > 1 and path[1] == ":"):
        check.fail(f"{field}.path", f"{path!r} is absolute; a manifest may name only files "
                                    f"inside its directory")
    depth = 0
    for part in pure.parts:
        depth += -1 if part == ".." else (0 if part == "." else 1)
        if depth < 0:
            check.fail(f"{field}.path", f"{path!r} leads outside the model directory; a manifest "
                                        f"may name only files inside its directory")
    if depth == 0:
        check.fail(f"{field}.path", f"{path!r} names the model directory itself, not a file")


def _file_ref(check: _Checker, value: Any, field: str) -> None:
    check.dict(value, field)
    check.keys(value, field, FILE_REF_KEYS, set())
    check_relative_path(check, value["path"], field)
    if not isinstance(value["sha256"], str) or not _SHA256.match(value["sha256"]):
        check.fail(f"{field}.sha256", "must be 64 lower-case hex digits")
    check.int(value["bytes"], f"{field}.bytes", 0)


def _tensor(check: _Checker, value: Any, field: str) -> None:
    check.dict(value, field)
    check.keys(value, field, {"name", "shape"}, {"dtype"})
    check.str(value["name"], f"{field}.name")
    shape = check.list(value["shape"], f"{field}.shape", nonempty=True)
    for i, dim in enumerate(shape):
        check.int(dim, f"{field}.shape[{i}]", -1 if i == 0 else 1)
        if dim == 0:
            check.fail(f"{field}.shape[{i}]", "must be -1 (dynamic batch) or >= 1")
    check.choice(value.get("dtype", "float32"), f"{field}.dtype", DTYPES)


def _tensors(check: _Checker, value: Any, field: str) -> None:
    names = set()
    for i, tensor in enumerate(check.list(value, field, nonempty=True)):
        _tensor(check, tensor, f"{field}[{i}]")
        if tensor["name"] in names:
            check.fail(f"{field}[{i}].name", f"repeats {tensor['name']!r}")
        names.add(tensor["name"])


def _graphs(check: _Checker, value: Any, field: str) -> None:
    for precision, ref in check.dict(value, field).items():
        check.choice(precision, f"{field} key", PRECISIONS)
        _file_ref(check, ref, f"{field}.{precision}")


def _stage(check: _Checker, value: Any, field: str) -> None:
    check.dict(value, field)
    check.keys(value, field, {"name", "kind", "index", "blocks", "inputs", "outputs"},
               {"exit_type", "onnx", "engines"})
    kind = check.choice(value["kind"], f"{field}.kind", STAGE_KINDS)
    index = check.int(value["index"], f"{field}.index", 0)
    if value["name"] != f"{kind}_{index}":
        check.fail(f"{field}.name", f"must be {kind}_{index} (its kind and index), not "
                                    f"{value['name']!r}")
    blocks = check.list(value["blocks"], f"{field}.blocks")
    if len(blocks) != 2:
        check.fail(f"{field}.blocks", "must be [start, end]")
    for i, block in enumerate(blocks):
        check.int(block, f"{field}.blocks[{i}]", 0)
    _tensors(check, value["inputs"], f"{field}.inputs")
    _tensors(check, value["outputs"], f"{field}.outputs")
    if value.get("exit_type") is not None:
        check.str(value["exit_type"], f"{field}.exit_type")
    _graphs(check, value.get("onnx", {}), f"{field}.onnx")
    for key, record in check.dict(value.get("engines", {}), f"{field}.engines").items():
        check.dict(record, f"{field}.engines.{key}")
        if "file" in record:
            _file_ref(check, record["file"], f"{field}.engines.{key}.file")


def _exit(check: _Checker, value: Any, field: str, position: int, final: bool) -> None:
    check.dict(value, field)
    check.keys(value, field, {"index", "after_block", "type", "confidence"},
               {"threshold", "enabled", "options"})
    if check.int(value["index"], f"{field}.index", 0) != position:
        check.fail(f"{field}.index", f"must be {position} (its position)")
    check.int(value["after_block"], f"{field}.after_block", 0)
    check.str(value["type"], f"{field}.type")
    check.str(value["confidence"], f"{field}.confidence")
    threshold = value.get("threshold")
    if threshold is not None:
        check.number(threshold, f"{field}.threshold", 0.0, 1.0)
    if not isinstance(value.get("enabled", True), bool):
        check.fail(f"{field}.enabled", f"must be true or false, not {_kind(value['enabled'])}")
    check.dict(value.get("options", {}), f"{field}.options")


def _thresholds(check: _Checker, value: Any, field: str, early_exits: int) -> None:
    values = check.list(value, field)
    if len(values) != early_exits:
        check.fail(field, f"must have {early_exits} entries (one per early exit), not "
                          f"{len(values)}")
    for i, threshold in enumerate(values):
        if threshold is not None:
            check.number(threshold, f"{field}[{i}]", 0.0, 1.0)


def _latencies(check: _Checker, value: Any, field: str) -> None:
    for name, ms in check.dict(value, field).items():
        check.number(ms, f"{field}.{name}", 0.0)


#: The most steps a recorded image transform may have (timm's have four).
MAX_TRANSFORM_STEPS = 64


def _eval_transform(check: _Checker, value: Any, field: str) -> None:
    """``preprocessing.eval_transform``: the evaluation transform's steps as recorded by
    :func:`trt_exit.training.image_folder.describe_transform` (``run`` compares them with the
    transform timm builds)."""
    steps = check.list(value, field, nonempty=True)
    if len(steps) > MAX_TRANSFORM_STEPS:
        check.fail(field, f"must have at most {MAX_TRANSFORM_STEPS} steps, not {len(steps)}")
    for i, step in enumerate(steps):
        check.str(check.dict(step, f"{field}[{i}]").get("op"), f"{field}[{i}].op")


def check_manifest_data(data: Any, where: str) -> None:
    """Checks the structure and types of a manifest's JSON (after its format version).

    Raises:
        ManifestError: The first problem, naming the field.
    """
    check = _Checker(where)
    check.dict(data, "the manifest")
    check.keys(data, "the manifest", {"model", "inputs", "stages", "exits"}, set(data))
    model = check.dict(data["model"], "model")
    check.str(model.get("name"), "model.name")
    check.choice(model.get("task"), "model.task", TASKS)
    if model.get("value_columns") is not None:
        check.int(model["value_columns"], "model.value_columns", 1)
    if model.get("checkpoint") is not None:
        _file_ref(check, model["checkpoint"], "model.checkpoint")
    _tensors(check, data["inputs"], "inputs")
    stages = check.list(data["stages"], "stages", nonempty=True)
    names = set()
    for i, stage in enumerate(stages):
        _stage(check, stage, f"stages[{i}]")
        if stage["name"] in names:
            check.fail(f"stages[{i}].name", f"repeats {stage['name']!r}")
        names.add(stage["name"])
    exits = check.list(data["exits"], "exits", nonempty=True)
    for i, entry in enumerate(exits):
        _exit(check, entry, f"exits[{i}]", i, i == len(exits) - 1)
        for kind in STAGE_KINDS:
            if f"{kind}_{i}" not in names:
                check.fail("stages", f"lack {kind}_{i} (the manifest has {len(exits)} exits)")
    full = check.dict(data.get("full_model", {}), "full_model")
    if "onnx" in full:
        _graphs(check, full["onnx"], "full_model.onnx")
    for key in ("inputs", "outputs"):
        if key in full:
            _tensors(check, full[key], f"full_model.{key}")
    for key in ("preprocessing", "tuning", "latency_profile", "parity", "calibration", "build",
                "export"):
        check.dict(data.get(key, {}), key)
    if data.get("preprocessing", {}).get("eval_transform") is not None:
        _eval_transform(check, data["preprocessing"]["eval_transform"],
                        "preprocessing.eval_transform")
    for i, point in enumerate(check.list(data.get("operating_points", []), "operating_points")):
        check.dict(point, f"operating_points[{i}]")
        if "thresholds" in point:
            _thresholds(check, point["thresholds"], f"operating_points[{i}].thresholds",
                        len(exits) - 1)
    for precision, tuning in data.get("tuning", {}).items():
        check.choice(precision, "tuning key", PRECISIONS)
        field = f"tuning.{precision}"
        best = check.dict(check.dict(tuning, field).get("best"), f"{field}.best")
        _thresholds(check, best.get("thresholds"), f"{field}.best.thresholds", len(exits) - 1)
        if "stage_latency_ms" in tuning:
            _latencies(check, tuning["stage_latency_ms"], f"{field}.stage_latency_ms")
    if "stages" in data.get("latency_profile", {}):
        _latencies(check, data["latency_profile"]["stages"], "latency_profile.stages")
    calibration = data.get("calibration", {})
    if "file" in calibration:
        _file_ref(check, calibration["file"], "calibration.file")
    # File references anywhere else (engines of the baseline, future fields): inside only.
    for field, ref in file_refs(data):
        check_relative_path(check, ref["path"], field)
