"""Structure and types of ``manifest.json``, checked on load.

A model directory may come from someone else, and manifests get edited by hand: the whole
document is checked here before any of it is used, and a bad field is a
:class:`~trt_exit.errors.ManifestError` that names it (``stages[2].outputs[0].dtype``).

Two layers:

* **The whole document** (:func:`check_document`): nesting at most :data:`MAX_DEPTH` deep,
  finite numbers only (JSON's ``NaN`` / ``Infinity`` and numbers such as ``1e400``, which
  parse as infinity, are refused), integers within 64 bits, text that is valid Unicode
  without control characters. Every later check, and every reader, can then walk the
  document without running out of stack, memory or meaning.
* **Each section** (:data:`SECTIONS`): one check function per top-level key, run in that
  order. Fields the code reads are type- and range-checked (sizes within
  :data:`MAX_IMAGE_SIDE`, :data:`MAX_SAMPLE_ELEMENTS`, ...). Structured entries the code
  binds by field (tensors, file references, stages, exits, log-mel settings) refuse unknown
  fields, which would be silently dropped otherwise; open records (the model's description,
  its dataset, preprocessing, tuning and build records) allow fields they do not know (later
  additions, users' own notes), which get the document-wide checks only. A top-level key
  without an entry is allowed the same way.

To add a section: write ``def _my_section(check, value, field, data)`` and add it to
:data:`SECTIONS`; to add a field to preprocessing: one line in :data:`PREPROCESSING_FIELDS`.

Every file reference (a dict with exactly ``path``, ``sha256`` and ``bytes``, wherever it
appears: ONNX graphs, engines, the checkpoint, the calibration set) must name a relative path
that stays inside the directory; :meth:`trt_exit.manifest.Manifest.resolve` also refuses
symlinks that lead out.
"""

from __future__ import annotations

import math
import re
from pathlib import PurePosixPath
from typing import Any, Callable, Iterator

from trt_exit.errors import ManifestError

TASKS = ("classification", "regression")
STAGE_KINDS = ("segment", "exit")
PRECISIONS = ("fp32", "fp16", "int8")
#: Tensor element types a manifest may declare (numpy names).
DTYPES = ("float32", "float16", "float64", "int8", "uint8", "int32", "int64", "bool")
FILE_REF_KEYS = {"path", "sha256", "bytes"}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

#: The deepest nesting of objects and lists (trt_exit writes at most ~8 levels).
MAX_DEPTH = 32
#: The largest manifest read (a manifest is some hundred kilobytes).
MAX_MANIFEST_BYTES = 32 * 2**20
#: Integers beyond 64 bits mean nothing anywhere in a manifest.
MAX_INT = 2**63 - 1
#: The largest image side (height or width) of an input or a preprocessing size.
MAX_IMAGE_SIDE = 8192
#: The most channels of an image (RGB 3; multispectral images have a dozen or more).
MAX_CHANNELS = 64
#: The most elements one sample of one tensor may have (4 GiB of float32).
MAX_SAMPLE_ELEMENTS = 2**30
#: The most classes / output values of a model.
MAX_OUTPUTS = 1_000_000
#: Model names become directory names (triton-repo) and URL parts (serve): letters, digits,
#: ``_ . : -``, at most 200 characters, not ``.`` or ``..``.
MODEL_NAME = re.compile(r"^(?!\.\.?$)[A-Za-z0-9_.:-]{1,200}$")
#: C0 control characters and DEL; tab and newline are allowed in text.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


class _Checker:
    """Raises :class:`ManifestError` naming the manifest (or another JSON document: ``what``)
    and the field, with ``advice`` on what to do."""

    def __init__(self, where: str, what: str = "manifest",
                 advice: str = "fix the field or re-export the model (trt-exit export)"):
        self.where, self.what, self.advice = where, what, advice

    def fail(self, field: str, problem: str) -> None:
        raise ManifestError(f"{self.where}: malformed {self.what}: {field} {problem}; "
                            f"{self.advice}")

    def dict(self, value: Any, field: str) -> dict:
        if not isinstance(value, dict):
            self.fail(field, f"must be an object, not {_kind(value)}")
        return value

    def list(self, value: Any, field: str, nonempty: bool = False,
             length: int | None = None) -> list:
        if not isinstance(value, list):
            self.fail(field, f"must be a list, not {_kind(value)}")
        if nonempty and not value:
            self.fail(field, "must not be empty")
        if length is not None and len(value) != length:
            self.fail(field, f"must have {length} entries, not {len(value)}")
        return value

    def str(self, value: Any, field: str, maximum: int | None = None) -> str:
        if not isinstance(value, str) or not value:
            self.fail(field, f"must be a non-empty string, not {_kind(value)}")
        if maximum is not None and len(value) > maximum:
            self.fail(field, f"must be at most {maximum} characters, not {len(value)}")
        return value

    def int(self, value: Any, field: str, minimum: int | None = None,
            maximum: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(field, f"must be an integer, not {_kind(value)}")
        if minimum is not None and value < minimum:
            self.fail(field, f"must be >= {minimum}, not {value}")
        if maximum is not None and value > maximum:
            self.fail(field, f"must be <= {maximum}, not {value}")
        return value

    def number(self, value: Any, field: str, low: float | None = None,
               high: float | None = None, above: bool = False) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(field, f"must be a number, not {_kind(value)}")
        if not math.isfinite(value):
            self.fail(field, f"must be a finite number, not {value}")
        if (low is not None and (value <= low if above else value < low)) or \
                (high is not None and value > high):
            lower = f"> {low}" if above else f">= {low}"
            bounds = (f"in [{low}, {high}]" if low is not None and high is not None and not above
                      else " and ".join(b for b in (lower if low is not None else "",
                                                    f"<= {high}" if high is not None else "")
                                        if b))
            self.fail(field, f"must be {bounds}, not {value}")
        return value

    def bool(self, value: Any, field: str) -> bool:
        if not isinstance(value, bool):
            self.fail(field, f"must be true or false, not {_kind(value)}")
        return value

    def choice(self, value: Any, field: str, choices: tuple) -> Any:
        if isinstance(value, (dict, list)) or value not in choices:
            shown = ", ".join("null" if c is None else str(c) for c in choices)
            self.fail(field, f"must be one of {shown}, not {_short(value)}")
        return value

    def keys(self, value: dict, field: str, required: set[str], optional: set[str],
             others: bool = False) -> None:
        """``value`` has every ``required`` key; with ``others`` False, no key outside
        ``required`` and ``optional``."""
        missing = required - set(value)
        if missing:
            self.fail(field, f"lacks {', '.join(sorted(missing))}")
        unknown = set(value) - required - optional
        if unknown and not others:
            self.fail(field, f"has unknown fields {', '.join(sorted(map(str, unknown)))}")


def _checker(where: str, what: str, advice: str | None) -> _Checker:
    return _Checker(where, what, advice) if advice else _Checker(where, what)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _field(parent: str, key: Any) -> str:
    return f"{parent}.{key}" if parent else str(key)


# --------------------------------------------------------------------------- the whole document


def check_document(data: Any, where: str, what: str = "manifest",
                   advice: str | None = None) -> None:
    """The document-wide limits (see the module docstring), without recursion: a document
    nested thousands deep is refused here, not by a ``RecursionError`` later.

    Args:
        where: The file, for the message.
        what / advice: Word the error for another kind of JSON document (checkpoint metadata).

    Raises:
        ManifestError: The first problem, naming the field.
    """
    check = _checker(where, what, advice)
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        value, field, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth >= MAX_DEPTH:
                check.fail(_shown_field(field) or "the manifest",
                           f"nests objects and lists more than {MAX_DEPTH} deep")
            if isinstance(value, dict):
                for key, item in value.items():
                    if not isinstance(key, str):
                        check.fail(_shown_field(field) or "the manifest",
                                   f"has a key that is not text ({_kind(key)})")
                    _check_text(check, key, f"{_shown_field(field)} key {_short(key, 40)}")
                    stack.append((item, _field(field, key), depth + 1))
            else:
                stack.extend((item, f"{field}[{i}]", depth + 1) for i, item in enumerate(value))
        elif isinstance(value, str):
            _check_text(check, value, _shown_field(field))
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, int):
            if abs(value) > MAX_INT:
                check.fail(_shown_field(field), "is an integer beyond 64 bits")
        elif isinstance(value, float):
            if not math.isfinite(value):
                check.fail(_shown_field(field), f"must be a finite number, not {value} (a number "
                                                f"beyond 1.8e308, such as 1e400, reads as "
                                                f"infinity)")
        else:
            check.fail(_shown_field(field), f"is {_kind(value)}, which JSON does not have")


def _shown_field(field: str, limit: int = 120) -> str:
    return field if len(field) <= limit else f"{field[:60]}...{field[-50:]}"


def _check_text(check: _Checker, text: str, field: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        check.fail(field or "the manifest", "holds text that is not valid Unicode (a lone "
                                            "surrogate escape such as \\udcff)")
    if _CONTROL.search(text):
        check.fail(field or "the manifest", "holds a control character (a NUL byte, an escape "
                                            "code)")


# --------------------------------------------------------------------------- files


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


#: Longest file name and path (bytes) a manifest may name (Linux's NAME_MAX and PATH_MAX).
_NAME_MAX, _PATH_MAX = 255, 4095


def check_relative_path(check: _Checker, path: Any, field: str) -> None:
    """A file path of the manifest: relative, inside the directory (no ``..`` out of it), a
    path the operating system can take (no NUL byte, valid UTF-8, names of at most 255 bytes)."""
    check.str(path, f"{field}.path")
    _check_text(check, path, f"{field}.path")
    encoded = path.encode("utf-8")
    if len(encoded) > _PATH_MAX or any(len(p) > _NAME_MAX for p in encoded.split(b"/")):
        check.fail(f"{field}.path", f"names a file with a name over {_NAME_MAX} bytes or a path "
                                    f"over {_PATH_MAX}, which no file system holds")
    pure = PurePosixPath(path)
    if pure.is_absolute() or "\\" in path or (len(path) > 1 and path[1] == ":"):
        check.fail(f"{field}.path", f"{_short(path)} is absolute; a manifest may name only files "
                                    f"inside its directory")
    depth = 0
    for part in pure.parts:
        depth += -1 if part == ".." else (0 if part == "." else 1)
        if depth < 0:
            check.fail(f"{field}.path", f"{_short(path)} leads outside the model directory; a "
                                        f"manifest may name only files inside its directory")
    if depth == 0:
        check.fail(f"{field}.path", f"{_short(path)} names the model directory itself, not a "
                                    f"file")


def _file_ref(check: _Checker, value: Any, field: str) -> None:
    check.dict(value, field)
    check.keys(value, field, FILE_REF_KEYS, set())
    check_relative_path(check, value["path"], field)
    _sha256(check, value["sha256"], f"{field}.sha256")
    check.int(value["bytes"], f"{field}.bytes", 0)


def _sha256(check: _Checker, value: Any, field: str) -> None:
    if not isinstance(value, str) or not _SHA256.match(value):
        check.fail(field, "must be 64 lower-case hex digits")


# --------------------------------------------------------------------------- building blocks


def check_model_name(check: _Checker, value: Any, field: str) -> str:
    """A model name: it becomes a directory (triton-repo) and a URL part (serve)."""
    check.str(value, field)
    if not MODEL_NAME.match(value):
        check.fail(field, f"{_short(value)} is not a model name: use letters, digits and "
                          f"_ . : - (at most 200 characters)")
    return value


def _tensor(check: _Checker, value: Any, field: str) -> None:
    check.dict(value, field)
    check.keys(value, field, {"name", "shape"}, {"dtype"})
    check.str(value["name"], f"{field}.name", 256)
    shape = check.list(value["shape"], f"{field}.shape", nonempty=True)
    if len(shape) > 8:
        check.fail(f"{field}.shape", f"must have at most 8 dimensions, not {len(shape)}")
    for i, dim in enumerate(shape):
        check.int(dim, f"{field}.shape[{i}]", -1 if i == 0 else 1, MAX_SAMPLE_ELEMENTS)
        if dim == 0:
            check.fail(f"{field}.shape[{i}]", "must be -1 (dynamic batch) or >= 1")
    if math.prod(shape[1:]) > MAX_SAMPLE_ELEMENTS:
        check.fail(f"{field}.shape", f"{shape} has more than {MAX_SAMPLE_ELEMENTS} elements per "
                                     f"sample")
    check.choice(value.get("dtype", "float32"), f"{field}.dtype", DTYPES)


def _named_entries(check: _Checker, value: Any, field: str,
                   entry: Callable[[_Checker, Any, str], None]) -> None:
    """A non-empty list of entries with a ``name`` each, checked by ``entry``, no name twice."""
    names = set()
    for i, item in enumerate(check.list(value, field, nonempty=True)):
        entry(check, item, f"{field}[{i}]")
        if item["name"] in names:
            check.fail(f"{field}[{i}].name", f"repeats {item['name']!r}")
        names.add(item["name"])


def _tensors(check: _Checker, value: Any, field: str) -> None:
    _named_entries(check, value, field, _tensor)


def _graphs(check: _Checker, value: Any, field: str) -> None:
    for precision, ref in check.dict(value, field).items():
        check.choice(precision, f"{field} key", PRECISIONS)
        _file_ref(check, ref, f"{field}.{precision}")


_ENGINE_KEY = re.compile(r"^(fp32|fp16|int8)-[0-9a-f]{1,64}$")


def _engines(check: _Checker, value: Any, field: str) -> None:
    """Engine records by cache key (see :mod:`trt_exit.build.target`)."""
    for key, record in check.dict(value, field).items():
        where = f"{field}.{key}"
        check.dict(record, where)
        check.keys(record, where, {"precision", "file"}, set(), others=True)
        _file_ref(check, record["file"], f"{where}.file")
        if not _ENGINE_KEY.match(key):
            check.fail(f"{field} key", f"{_short(key)} is not an engine key (precision-hex)")
        check.choice(record["precision"], f"{where}.precision", PRECISIONS)
        if "onnx_sha256" in record:
            _sha256(check, record["onnx_sha256"], f"{where}.onnx_sha256")
        target = check.dict(record.get("target", {}), f"{where}.target")
        for name in ("tensorrt", "device_name", "compute_capability"):
            if name in target:
                check.str(target[name], f"{where}.target.{name}", 200)
        if "profile" in record:
            profile = check.dict(record["profile"], f"{where}.profile")
            check.keys(profile, f"{where}.profile", {"max_batch"}, {"min_batch", "opt_batch"},
                       others=True)
            for name, batch in profile.items():
                if name.endswith("_batch"):
                    check.int(batch, f"{where}.profile.{name}", 1, 1 << 20)
        for name in ("version_compatible", "gpu_fallback"):
            if record.get(name) is not None:
                check.bool(record[name], f"{where}.{name}")


def _latencies(check: _Checker, value: Any, field: str) -> None:
    for name, ms in check.dict(value, field).items():
        check.number(ms, f"{field}.{name}", 0.0)


def _thresholds(check: _Checker, value: Any, field: str, early_exits: int) -> None:
    values = check.list(value, field)
    if len(values) != early_exits:
        check.fail(field, f"must have {early_exits} entries (one per early exit), not "
                          f"{len(values)}")
    for i, threshold in enumerate(values):
        if threshold is not None:
            check.number(threshold, f"{field}[{i}]", 0.0, 1.0)


def _operating_point(check: _Checker, value: Any, field: str, num_exits: int) -> None:
    check.dict(value, field)
    if "thresholds" in value:
        _thresholds(check, value["thresholds"], f"{field}.thresholds", num_exits - 1)
    for name in ("metric", "allowed_loss", "expected_latency_ms"):
        if value.get(name) is not None:
            check.number(value[name], f"{field}.{name}",
                         0.0 if name != "metric" else None)
    if "exit_fractions" in value:
        for i, share in enumerate(check.list(value["exit_fractions"], f"{field}.exit_fractions",
                                             length=num_exits)):
            check.number(share, f"{field}.exit_fractions[{i}]", 0.0, 1.0)


def _num_exits(data: dict) -> int:
    return len(data["exits"])


# --------------------------------------------------------------------------- sections
# Each takes (check, the section's value, its field name, the whole document).


def _model(check: _Checker, value: Any, field: str, data: dict) -> None:
    model = check.dict(value, field)
    check_model_name(check, model.get("name"), f"{field}.name")
    check.choice(model.get("task"), f"{field}.task", TASKS)
    outputs = None
    if model.get("num_outputs") is not None:
        outputs = check.int(model["num_outputs"], f"{field}.num_outputs", 1, MAX_OUTPUTS)
    if model.get("value_columns") is not None:
        check.int(model["value_columns"], f"{field}.value_columns", 1, outputs or MAX_OUTPUTS)
    if model.get("class_names") is not None:
        names = check.list(model["class_names"], f"{field}.class_names")
        for i, name in enumerate(names):
            check.str(name, f"{field}.class_names[{i}]", 1000)
        if outputs is not None and model["task"] == "classification" and len(names) != outputs:
            check.fail(f"{field}.class_names", f"must have {outputs} names (num_outputs), not "
                                               f"{len(names)}")
    if model.get("config") is not None:
        check.dict(model["config"], f"{field}.config")
    if model.get("checkpoint") is not None:
        _file_ref(check, model["checkpoint"], f"{field}.checkpoint")
    if model.get("dataset") is not None:
        _dataset(check, model["dataset"], f"{field}.dataset")
    if "target_transform" in model:
        check.choice(model["target_transform"], f"{field}.target_transform", (None, "log1p"))


def _dataset(check: _Checker, value: Any, field: str) -> None:
    """The dataset the model was trained on: ``eval`` / ``tune`` / ``calibrate`` load it.
    The options' types are checked against the dataset's loader when it is loaded
    (:func:`trt_exit.training.datasets.load_dataset`)."""
    dataset = check.dict(value, field)
    check.keys(dataset, field, {"name", "seed"}, {"options"}, others=True)
    check.str(dataset["name"], f"{field}.name", 200)
    check.int(dataset["seed"], f"{field}.seed", 0, 2**32 - 1)
    check.dict(dataset.get("options", {}), f"{field}.options")


def check_dataset_record(value: Any, where: str, field: str = "dataset",
                         what: str = "manifest", advice: str | None = None) -> dict:
    """A dataset record (``{"name", "seed", "options"}``) outside a manifest: a checkpoint's.

    Raises:
        ManifestError: Naming the field.
    """
    check_document(value, where, what, advice)
    _dataset(_checker(where, what, advice), value, field)
    return value


def check_model_config(value: Any, where: str, field: str = "model_config",
                       what: str = "checkpoint metadata", advice: str | None = None) -> dict:
    """The fields of a checkpoint's model config that export copies into the manifest (name,
    task, outputs, class names, preprocessing), checked as the manifest's; the rest is the
    model's constructors' to check.

    Raises:
        ManifestError: Naming the field.
    """
    check = _checker(where, what, advice)
    config = check.dict(value, field)
    check_model_name(check, config.get("name"), f"{field}.name")
    check.choice(config.get("task", "classification"), f"{field}.task", TASKS)
    if "num_outputs" in config:
        check.int(config["num_outputs"], f"{field}.num_outputs", 1, MAX_OUTPUTS)
    if config.get("class_names") is not None:
        for i, name in enumerate(check.list(config["class_names"], f"{field}.class_names")):
            check.str(name, f"{field}.class_names[{i}]", 1000)
    for key in ("backbone_options", "preprocessing"):
        check.dict(config.get(key, {}), f"{field}.{key}")
    check_preprocessing_fields(check, config.get("preprocessing", {}), f"{field}.preprocessing")
    exits = check.list(config.get("exits", []), f"{field}.exits")
    if len(exits) > MAX_DEPTH_BLOCKS:
        check.fail(f"{field}.exits", f"must have at most {MAX_DEPTH_BLOCKS} exits")
    for i, spec in enumerate(exits):
        check.dict(spec, f"{field}.exits[{i}]")
    _block_counts(check, config.get("backbone_options", {}), f"{field}.backbone_options")
    return config


#: The most blocks a backbone's config may ask for: every block is Python objects even on
#: PyTorch's meta device, so a depth of 2^31 exhausts memory before any size check can run.
MAX_DEPTH_BLOCKS = 1000


def _block_counts(check: _Checker, options: dict, field: str) -> None:
    """``depth`` / ``depths`` options anywhere in a backbone's options (timm's creation
    arguments included) within :data:`MAX_DEPTH_BLOCKS` blocks in all."""
    stack = [(options, field)]
    while stack:
        node, where = stack.pop()
        for key, value in node.items():
            if key in ("depth", "depths", "num_blocks", "layers"):
                counts = value if isinstance(value, list) else [value]
                total = 0
                for i, count in enumerate(counts):
                    total += check.int(count, f"{where}.{key}" + (f"[{i}]" if isinstance(
                        value, list) else ""), 0, MAX_DEPTH_BLOCKS)
                if total > MAX_DEPTH_BLOCKS:
                    check.fail(f"{where}.{key}", f"asks for {total} blocks, more than "
                                                 f"{MAX_DEPTH_BLOCKS}")
            elif isinstance(value, dict):
                stack.append((value, f"{where}.{key}"))


def _inputs(check: _Checker, value: Any, field: str, data: dict) -> None:
    _tensors(check, value, field)


def _stage(check: _Checker, value: Any, field: str) -> None:
    check.dict(value, field)
    check.keys(value, field, {"name", "kind", "index", "blocks", "inputs", "outputs"},
               {"exit_type", "onnx", "engines"})
    kind = check.choice(value["kind"], f"{field}.kind", STAGE_KINDS)
    index = check.int(value["index"], f"{field}.index", 0, 10_000)
    if value["name"] != f"{kind}_{index}":
        check.fail(f"{field}.name", f"must be {kind}_{index} (its kind and index), not "
                                    f"{_short(value['name'])}")
    blocks = check.list(value["blocks"], f"{field}.blocks")
    if len(blocks) != 2:
        check.fail(f"{field}.blocks", "must be [start, end]")
    for i, block in enumerate(blocks):
        check.int(block, f"{field}.blocks[{i}]", 0, 100_000)
    _tensors(check, value["inputs"], f"{field}.inputs")
    _tensors(check, value["outputs"], f"{field}.outputs")
    if value.get("exit_type") is not None:
        check.str(value["exit_type"], f"{field}.exit_type", 200)
    _graphs(check, value.get("onnx", {}), f"{field}.onnx")
    _engines(check, value.get("engines", {}), f"{field}.engines")


def _stages(check: _Checker, value: Any, field: str, data: dict) -> None:
    _named_entries(check, value, field, _stage)


def _exit(check: _Checker, value: Any, field: str, position: int) -> None:
    check.dict(value, field)
    check.keys(value, field, {"index", "after_block", "type", "confidence"},
               {"threshold", "enabled", "options"})
    if check.int(value["index"], f"{field}.index", 0) != position:
        check.fail(f"{field}.index", f"must be {position} (its position)")
    check.int(value["after_block"], f"{field}.after_block", 0, 100_000)
    check.str(value["type"], f"{field}.type", 200)
    check.str(value["confidence"], f"{field}.confidence", 200)
    threshold = value.get("threshold")
    if threshold is not None:
        check.number(threshold, f"{field}.threshold", 0.0, 1.0)
    check.bool(value.get("enabled", True), f"{field}.enabled")
    check.dict(value.get("options", {}), f"{field}.options")


def _exits(check: _Checker, value: Any, field: str, data: dict) -> None:
    exits = check.list(value, field, nonempty=True)
    names = {stage["name"] for stage in data["stages"]}
    for i, entry in enumerate(exits):
        _exit(check, entry, f"{field}[{i}]", i)
        for kind in STAGE_KINDS:
            if f"{kind}_{i}" not in names:
                check.fail("stages", f"lack {kind}_{i} (the manifest has {len(exits)} exits)")


def _full_model(check: _Checker, value: Any, field: str, data: dict) -> None:
    full = check.dict(value, field)
    if "onnx" in full:
        _graphs(check, full["onnx"], f"{field}.onnx")
        for key in ("inputs", "outputs"):
            if key not in full:
                check.fail(field, f"lacks {key} (it has ONNX graphs)")
    for key in ("inputs", "outputs"):
        if key in full:
            _tensors(check, full[key], f"{field}.{key}")
    _engines(check, full.get("engines", {}), f"{field}.engines")


def _mean_std(check: _Checker, value: Any, field: str, positive: bool) -> None:
    """A per-channel mean or std: one number or a list of one per channel."""
    values = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not 1 <= len(value) <= MAX_CHANNELS:
        check.fail(field, f"must be a number or a list of 1 to {MAX_CHANNELS} (one per "
                          f"channel), not {len(value)} numbers")
    for i, v in enumerate(values):
        where = f"{field}[{i}]" if isinstance(value, list) else field
        check.number(v, where, 0.0 if positive else -1e6, 1e6, above=positive)


def _size(check: _Checker, value: Any, field: str, channels: bool) -> None:
    """``[H, W]`` or, with ``channels``, ``[C, H, W]``: image sides in [1, MAX_IMAGE_SIDE],
    channels in [1, MAX_CHANNELS]."""
    sizes = check.list(value, field, length=3 if channels else 2)
    for i, size in enumerate(sizes):
        limit = MAX_CHANNELS if channels and i == 0 else MAX_IMAGE_SIDE
        check.int(size, f"{field}[{i}]", 1, limit)


def _image_spec(check: _Checker, value: Any, field: str) -> None:
    """A camera image spec (:mod:`trt_exit.pipelines.preprocess`): ``size``, ``mean`` and
    ``std`` required, every known field checked."""
    spec = check.dict(value, field)
    check.keys(spec, field, {"size", "mean", "std"}, set(), others=True)
    _size(check, spec["size"], f"{field}.size", channels=False)
    for name in ("mean", "std"):
        _mean_std(check, spec[name], f"{field}.{name}", positive=name == "std")
    check_preprocessing_fields(check, spec, field)


def _log_mel(check: _Checker, value: Any, field: str) -> None:
    """Log-mel settings (:class:`trt_exit.pipelines.audio_features.LogMelConfig`): exactly
    its fields, each in range."""
    spec = check.dict(value, field)
    ranges = {"sample_rate": (1, 384_000), "n_fft": (1, 1 << 16), "win_length": (1, 1 << 16),
              "hop_length": (1, 1 << 16), "n_mels": (1, 1024)}
    numbers = {"window_s": (0.0, 60.0, True), "f_min_hz": (0.0, 192_000.0, False),
               "log_offset": (0.0, 1.0, True), "mean": (-1e6, 1e6, False),
               "std": (0.0, 1e6, True)}
    check.keys(spec, field, set(), {"features", "f_max_hz", *ranges, *numbers})
    if "features" in spec:
        check.choice(spec["features"], f"{field}.features", ("log_mel",))
    for name, (low, high) in ranges.items():
        if name in spec:
            check.int(spec[name], f"{field}.{name}", low, high)
    for name, (low, high, above) in numbers.items():
        if name in spec:
            check.number(spec[name], f"{field}.{name}", low, high, above=above)
    if spec.get("f_max_hz") is not None:
        check.number(spec["f_max_hz"], f"{field}.f_max_hz", spec.get("f_min_hz", 0.0), 192_000.0,
                     above=True)
    if spec.get("win_length", 0) > spec.get("n_fft", 1 << 16):
        check.fail(f"{field}.win_length", "must be <= n_fft")


#: The most steps a recorded image transform may have (timm's have four).
MAX_TRANSFORM_STEPS = 64


def _eval_transform(check: _Checker, value: Any, field: str) -> None:
    """``preprocessing.eval_transform``: the evaluation transform's steps as recorded by
    :func:`trt_exit.training.image_folder.describe_transform` (``run`` compares them with the
    transform timm builds). (Issue 20 item 17's check, kept here as one entry of the table.)"""
    steps = check.list(value, field, nonempty=True)
    if len(steps) > MAX_TRANSFORM_STEPS:
        check.fail(field, f"must have at most {MAX_TRANSFORM_STEPS} steps, not {len(steps)}")
    for i, step in enumerate(steps):
        check.str(check.dict(step, f"{field}[{i}]").get("op"), f"{field}[{i}].op")


#: Known fields of ``preprocessing`` (and of its ``image`` spec): name -> check(check, value,
#: field). Fields not listed are kept and get the document-wide checks only.
PREPROCESSING_FIELDS: dict[str, Callable[[_Checker, Any, str], None]] = {
    "scale": lambda c, v, f: c.number(v, f, 0.0, 1e6, above=True),
    "mean": lambda c, v, f: _mean_std(c, v, f, positive=False),
    "std": lambda c, v, f: _mean_std(c, v, f, positive=True),
    "input_size": lambda c, v, f: _size(c, v, f, channels=True),
    "interpolation": lambda c, v, f: c.str(v, f, 40),
    "crop_pct": lambda c, v, f: c.number(v, f, 0.1, 2.0),  # timm's go up to 1.15
    "crop_mode": lambda c, v, f: c.choice(v, f, ("center", "squash", "border")),
    "color": lambda c, v, f: c.choice(v, f, ("RGB", "BGR")),
    "image": _image_spec,
    "audio": _log_mel,
    "eval_transform": _eval_transform,
}


def check_preprocessing_fields(check: _Checker, value: dict, field: str) -> None:
    """Checks the fields of ``value`` that :data:`PREPROCESSING_FIELDS` knows (null: unset)."""
    for name, value_check in PREPROCESSING_FIELDS.items():
        if value.get(name) is not None:
            value_check(check, value[name], f"{field}.{name}")


def _preprocessing(check: _Checker, value: Any, field: str, data: dict) -> None:
    check_preprocessing_fields(check, check.dict(value, field), field)


def _operating_points(check: _Checker, value: Any, field: str, data: dict) -> None:
    for i, point in enumerate(check.list(value, field)):
        _operating_point(check, point, f"{field}[{i}]", _num_exits(data))


def _tuning(check: _Checker, value: Any, field: str, data: dict) -> None:
    for precision, tuning in check.dict(value, field).items():
        check.choice(precision, f"{field} key", PRECISIONS)
        where = f"{field}.{precision}"
        check.dict(tuning, where)
        _operating_point(check, check.dict(tuning.get("best"), f"{where}.best"), f"{where}.best",
                         _num_exits(data))
        _thresholds(check, tuning["best"].get("thresholds"), f"{where}.best.thresholds",
                    _num_exits(data) - 1)
        for i, point in enumerate(check.list(tuning.get("points", []), f"{where}.points")):
            _operating_point(check, point, f"{where}.points[{i}]", _num_exits(data))
        for name in ("final_metric", "full_chain_latency_ms"):
            if tuning.get(name) is not None:
                check.number(tuning[name], f"{where}.{name}",
                             0.0 if name.endswith("_ms") else None)
        if "metric" in tuning:
            check.str(tuning["metric"], f"{where}.metric", 100)
        if "stage_latency_ms" in tuning:
            _latencies(check, tuning["stage_latency_ms"], f"{where}.stage_latency_ms")
        if "strategy" in tuning:
            _strategy_choice(check, tuning["strategy"], f"{where}.strategy")


def _latency_profile(check: _Checker, value: Any, field: str, data: dict) -> None:
    profile = check.dict(value, field)
    if "stages" in profile:
        _latencies(check, profile["stages"], f"{field}.stages")
    if profile.get("backend") is not None:
        backend = check.dict(profile["backend"], f"{field}.backend")
        if "backend" in backend:
            check.str(backend["backend"], f"{field}.backend.backend", 100)
    if profile.get("batch") is not None:
        check.int(profile["batch"], f"{field}.batch", 1)


def _calibration(check: _Checker, value: Any, field: str, data: dict) -> None:
    calibration = check.dict(value, field)
    if "file" in calibration:
        _file_ref(check, calibration["file"], f"{field}.file")
    if "samples" in calibration:
        check.int(calibration["samples"], f"{field}.samples", 1)
    for key in ("origin", "inputs"):
        if key in calibration:
            check.dict(calibration[key], f"{field}.{key}")


def _record(check: _Checker, value: Any, field: str, data: dict) -> None:
    """An open record (parity results, build and export details): an object."""
    check.dict(value, field)


#: Top-level sections and their checks, run in this order (later ones may rely on earlier
#: ones: exits on stages). The first four are required.
def _early_exit_graph(check: _Checker, value: Any, field: str, data: dict) -> None:
    """The whole exit chain as one ONNX graph: one file per precision (issue 21)."""
    _graphs(check, value, field)


def _strategy_choice(check: _Checker, value: Any, field: str) -> None:
    """``tuning.<precision>.strategy``: the tuner's choice between the stages and the single
    graph (issue 21), read by the host executor's ``auto``."""
    choice = check.dict(value, field)
    if "default" in choice:
        check.choice(choice["default"], f"{field}.default", ("stages", "single_graph"))
    if "single_graph_max_batch" in choice:
        check.int(choice["single_graph_max_batch"], f"{field}.single_graph_max_batch", 0)


SECTIONS: dict[str, Callable[[_Checker, Any, str, dict], None]] = {
    "model": _model,
    "inputs": _inputs,
    "stages": _stages,
    "exits": _exits,
    "full_model": _full_model,
    "preprocessing": _preprocessing,
    "operating_points": _operating_points,
    "tuning": _tuning,
    "latency_profile": _latency_profile,
    "calibration": _calibration,
    "parity": _record,
    "build": _record,
    "export": _record,
    "early_exit_graph": _early_exit_graph,
}
REQUIRED_SECTIONS = ("model", "inputs", "stages", "exits")


def check_manifest_data(data: Any, where: str) -> None:
    """Checks a manifest's JSON (after its format version): the whole document, then each
    section (see the module docstring).

    Raises:
        ManifestError: The first problem, naming the field.
    """
    check = _Checker(where)
    check.dict(data, "the manifest")
    check_document(data, where)
    check.keys(data, "the manifest", set(REQUIRED_SECTIONS), set(), others=True)
    for key, section in SECTIONS.items():
        if key in data:
            section(check, data[key], key, data)
    # File references anywhere else (engines of the baseline, future fields): inside only.
    for field, ref in file_refs(data):
        _file_ref(check, ref, field)
