"""The manifest: one ``manifest.json`` next to the artifacts, read by everything after export.

It records the model (name, task, config), its inputs and preprocessing, the ordered stages
(kind, index, backbone block range, tensor names/shapes/dtypes, ONNX file per precision with its
sha256, engines per precision with their build info), exit metadata (confidence measure,
thresholds, tuned operating points), the calibration set, and the measured latency profile.

Paths inside the manifest are relative to its directory, so a directory can be moved or copied
to a Jetson as a whole, and a manifest may name only files inside it (see docs/trust.md).
Its structure and types are checked on load (:mod:`trt_exit.manifest_schema`). Files are
written atomically; writers hold the directory's lock and merge their changes into the file as
it is then; every file is checked against its sha256 before it is used, and a mismatch is a
:class:`ManifestError` naming the file.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from trt_exit import tensor_names as tn
from trt_exit.errors import ArtifactError, ManifestError, OutputError
from trt_exit.fileio import (
    atomic_write_json,
    json_text,
    path_problem,
    path_text_problem,
    remove_stale_temporaries,
    sha256_file,
    shown_path,
)
from trt_exit.manifest_schema import (
    MAX_MANIFEST_BYTES,
    _Checker,
    check_document,
    check_manifest_data,
    check_relative_path,
    file_refs,
)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass
class TensorSpec:
    """A named tensor; ``-1`` in ``shape`` marks the dynamic batch dimension."""

    name: str
    shape: list[int]
    dtype: str = "float32"

    def per_sample_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[1:])


@dataclass
class FileRef:
    """A file of the manifest's directory: relative path, sha256 and size."""

    path: str
    sha256: str
    bytes: int

    @classmethod
    def of(cls, path: str | os.PathLike, root: str | os.PathLike) -> "FileRef":
        """Hashes ``path`` and records it relative to ``root``."""
        path = Path(path)
        return cls(
            path=Path(os.path.relpath(path, root)).as_posix(),
            sha256=sha256_file(path),
            bytes=path.stat().st_size,
        )


@dataclass
class StageEntry:
    """One stage: a backbone segment or an exit head.

    Attributes:
        name: ``segment_k`` or ``exit_k``.
        kind: ``"segment"`` or ``"exit"``.
        index: ``k``.
        blocks: Segments: backbone block range [start, end). Exits: [b, b], b = blocks run.
        inputs: Tensors the stage reads, by name.
        outputs: Tensors the stage writes, by name.
        exit_type: Exits only: the registered exit family.
        onnx: ONNX graph per precision (``fp32``, ``fp16``, ``int8``).
        engines: TensorRT engines by cache key (see :mod:`trt_exit.build`).
    """

    name: str
    kind: str
    index: int
    blocks: list[int]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    exit_type: str | None = None
    onnx: dict[str, FileRef] = field(default_factory=dict)
    engines: dict[str, dict[str, Any]] = field(default_factory=dict)

    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


@dataclass
class ExitEntry:
    """Metadata of one exit (the final head is the last).

    Attributes:
        index: Exit index ``k`` (the stage ``exit_k``).
        after_block: Backbone blocks run before the exit.
        type: Registered exit family.
        confidence: Confidence measure computed in the exit graph.
        threshold: Tuned confidence threshold in [0, 1]; None until tuned. The final head's is
            always 0 (it always exits).
        enabled: False when tuning found the exit not worth its cost: its head is not run.
        options: Constructor options of the exit head.
    """

    index: int
    after_block: int
    type: str
    confidence: str
    threshold: float | None = None
    enabled: bool = True
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Manifest:
    """The contract between export, build and run. See the module docstring."""

    model: dict[str, Any]
    inputs: list[TensorSpec]
    stages: list[StageEntry]
    exits: list[ExitEntry]
    full_model: dict[str, Any] = field(default_factory=dict)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    operating_points: list[dict[str, Any]] = field(default_factory=list)
    tuning: dict[str, Any] = field(default_factory=dict)
    latency_profile: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    build: dict[str, Any] = field(default_factory=dict)
    export: dict[str, Any] = field(default_factory=dict)
    #: The whole exit chain as one ONNX graph per precision (``onnx/<p>/early_exit.onnx``, see
    #: :mod:`trt_exit.export.early_exit_graph`).
    early_exit_graph: dict[str, FileRef] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    #: Directory the manifest lives in (not serialized).
    root: Path = field(default=Path("."), repr=False, compare=False)
    #: The JSON this object was loaded as or last saved as (not a field): what :meth:`save`
    #: compares with to find this object's own changes. None: a new manifest.
    _base = None

    # ------------------------------------------------------------------ queries

    @property
    def name(self) -> str:
        return self.model["name"]

    @property
    def task(self) -> str:
        return self.model["task"]

    @property
    def value_columns(self) -> int | None:
        """Regression: leading output columns that are predicted values (None: all)."""
        return self.model.get("value_columns")

    @property
    def num_exits(self) -> int:
        return len(self.exits)

    def stage(self, name: str) -> StageEntry:
        """The stage called ``name``."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise ManifestError(f"{self.path}: no stage named {name!r}")

    def segment(self, index: int) -> StageEntry:
        return self.stage(tn.stage_name(tn.SEGMENT, index))

    def exit_stage(self, index: int) -> StageEntry:
        return self.stage(tn.stage_name(tn.EXIT, index))

    def input_spec(self, name: str) -> TensorSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise ManifestError(f"{self.path}: the model has no input {name!r}")

    def thresholds(self, precision: str | None = None) -> list[float | None] | None:
        """Tuned threshold per early exit (None where the exit is disabled), or None if the
        model is not tuned yet.

        Args:
            precision: If thresholds were tuned for this precision's graphs, those; otherwise
                the thresholds stored with the exits.
        """
        if precision is not None and precision in self.tuning:
            return list(self.tuning[precision]["best"]["thresholds"])
        early = self.exits[:-1]
        if any(e.threshold is None and e.enabled for e in early):
            return None
        return [float(e.threshold) if e.enabled else None for e in early]

    def precisions(self) -> list[str]:
        """Precisions for which every stage has an ONNX graph."""
        return [p for p in PRECISIONS if all(p in s.onnx for s in self.stages)]

    @property
    def path(self) -> Path:
        return self.root / MANIFEST_NAME

    # ------------------------------------------------------------------ files

    def resolve(self, ref: FileRef, what: str = "file") -> Path:
        """Absolute path of a file of this manifest, refused when it is not inside the
        manifest's directory (absolute, ``..``, or a symlink that leads out or loops).

        Raises:
            ManifestError: The entry names a file outside the directory; the message names the
                entry, never anything about the file it points at.
        """
        check_relative_path(_Checker(f"{self.path}: {what}"), ref.path, "file")
        root = self.root.resolve()
        try:
            path = (root / ref.path).resolve()
        except (OSError, RuntimeError):  # RuntimeError: symlink loop (Python < 3.13)
            raise ManifestError(f"{self.path}: {what}: {ref.path!r} is a symlink loop; replace it "
                                f"with the file") from None
        if not path.is_relative_to(root):
            raise ManifestError(f"{self.path}: {what}: {ref.path!r} is a symlink that leads "
                                f"outside the model directory; a manifest may name only files "
                                f"inside its directory")
        return path

    def verified_path(self, ref: FileRef, what: str) -> Path:
        """Path of ``ref`` after checking that it is inside the directory, exists and matches
        its sha256."""
        path = self.resolve(ref, what)
        if not path.is_file():
            raise ArtifactError(
                f"{what}: file {path} listed in {self.path} is missing; re-run the step that "
                f"writes it (trt-exit export / build)"
            )
        size = path.stat().st_size
        if size != ref.bytes:
            raise ManifestError(
                f"{what}: {path} does not match {self.path} (expected {ref.bytes} bytes, found "
                f"{size}); the file was changed or truncated after export: re-export the model"
            )
        found = sha256_file(path)
        if found != ref.sha256:
            raise ManifestError(
                f"{what}: {path} does not match {self.path} (expected sha256 {ref.sha256[:12]}..., "
                f"found {found[:12]}...); the file was changed after export: re-export the model"
            )
        return path

    def onnx_path(self, stage: StageEntry, precision: str = "fp32", verify: bool = True) -> Path:
        """Path of ``stage``'s ONNX graph in ``precision``, verified against its hash."""
        if precision not in stage.onnx:
            have = ", ".join(sorted(stage.onnx)) or "none"
            raise ManifestError(
                f"{self.path}: stage {stage.name} has no {precision} ONNX graph (has: {have}); "
                f"create it with trt-exit precision {self.root} --precision {precision}"
            )
        ref = stage.onnx[precision]
        what = f"{stage.name} ({precision})"
        return self.verified_path(ref, what) if verify else self.resolve(ref, what)

    def full_model_path(self, precision: str = "fp32", verify: bool = True) -> Path:
        """Path of the no-exit baseline graph in ``precision``."""
        graphs = self.full_model.get("onnx", {})
        if precision not in graphs:
            raise ManifestError(f"{self.path}: no {precision} full-model graph")
        ref = graphs[precision]
        what = f"full model ({precision})"
        return self.verified_path(ref, what) if verify else self.resolve(ref, what)

    def early_exit_graph_path(self, precision: str = "fp32", verify: bool = True) -> Path:
        """Path of the single early-exit graph of ``precision``, verified against its hash."""
        if precision not in self.early_exit_graph:
            have = ", ".join(sorted(self.early_exit_graph)) or "none"
            raise ManifestError(
                f"{self.path}: no {precision} early-exit graph (has: {have}); write it with "
                f"trt-exit export (fp32) or trt-exit precision {self.root} --precision {precision}")
        ref = self.early_exit_graph[precision]
        what = f"early-exit graph ({precision})"
        return self.verified_path(ref, what) if verify else self.resolve(ref, what)

    def early_exit_graph_io(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        """The tensors the single early-exit graph declares (its thresholds input, which has a
        default, is not among the inputs), as the manifest expects them."""
        final = self.exit_stage(self.num_exits - 1)
        output = next(t for t in final.outputs if t.name == tn.exit_output(self.num_exits - 1))
        return list(self.inputs), [
            TensorSpec(tn.EARLY_EXIT_OUTPUT, list(output.shape), output.dtype),
            TensorSpec(tn.EARLY_EXIT_CONFIDENCE, [-1], "float32"),
            TensorSpec(tn.EARLY_EXIT_INDEX, [-1], "int64")]

    def checkpoint_path(self, verify: bool = True) -> Path:
        """Path of the PyTorch checkpoint the graphs were exported from (torch backend)."""
        ref = self.model.get("checkpoint")
        if not ref:
            raise ManifestError(f"{self.path} records no checkpoint; re-export with trt-exit export")
        ref = FileRef(**ref)
        return self.verified_path(ref, "checkpoint") if verify else self.resolve(ref, "checkpoint")

    def verify(self, precisions: Iterable[str] | None = None) -> None:
        """Checks every ONNX file (of ``precisions``, default all) against its sha256, and its
        graph's input and output names, dtypes and shapes against the manifest."""
        for stage in self.stages:
            for precision in stage.onnx:
                if precisions is None or precision in precisions:
                    path = self.onnx_path(stage, precision)
                    check_onnx_io(f"{stage.name} ({precision})", path, stage.inputs,
                                  stage.outputs)
        for precision in self.full_model.get("onnx", {}):
            if precisions is None or precision in precisions:
                path = self.full_model_path(precision)
                check_onnx_io(f"full model ({precision})", path, self.full_model["inputs"],
                              self.full_model["outputs"])
        for precision in self.early_exit_graph:
            if precisions is None or precision in precisions:
                path = self.early_exit_graph_path(precision)
                check_onnx_io(f"early-exit graph ({precision})", path, *self.early_exit_graph_io())

    def owned_file(self, path: str | os.PathLike) -> str | None:
        """Why ``path`` is one of this model's files (the manifest, a file it lists, or a file
        in the folders it keeps: onnx/, engines/, calibration/), or None; outputs of commands
        must not go there (see :func:`trt_exit.fileio.check_output_file`)."""
        try:
            target = Path(path).expanduser().resolve()
            root = self.root.resolve()
        except (OSError, RuntimeError):
            return None
        if not target.is_relative_to(root):
            return None
        rel = target.relative_to(root)
        if rel == Path(MANIFEST_NAME):
            return f"the model's manifest {self.path}"
        if rel == Path(LOCK_NAME) or rel.name.startswith(".") and rel.name.endswith(".tmp"):
            return f"a file trt-exit keeps in the model directory {root}"
        for field, ref in file_refs(self.to_dict()):
            with contextlib.suppress(ManifestError):
                if self.resolve(FileRef(**ref), field) == target:
                    return f"the model's file {ref['path']} ({field}) in {root}"
        if len(rel.parts) > 1 and rel.parts[0] in MODEL_FOLDERS:
            return f"the model's {rel.parts[0]}/ folder in {root}"
        return None

    # ------------------------------------------------------------------ (de)serialization

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("root")
        return {"format_version": data.pop("format_version"), **data}

    def save(self, root: str | os.PathLike | None = None, lock_held: bool = False) -> Path:
        """Writes ``manifest.json`` atomically into ``root`` (default: its own directory).

        Safe against other processes writing the same manifest: under the directory's lock
        (:func:`manifest_lock`) the file is read again, and only what changed in this object
        since it was loaded (or last saved) is applied to it, so another command's changes
        made meanwhile are kept (where both changed one field, this save's value wins). A new
        manifest (made in memory, not loaded) replaces the file. Stale temporaries of killed
        writers are removed under the same lock. ``lock_held``: the caller holds
        :func:`manifest_lock` of this directory already (it wrote a file the manifest lists
        under the same lock, so readers see both changes or neither).
        """
        if root is not None and Path(root).resolve() != Path(self.root).resolve():
            self.root = Path(root)
            self._base = None
        ours = self.to_dict()
        # Refused before anything is touched: NaN / Infinity, and whatever load would refuse
        # (checked as JSON reads it back: tuples become lists).
        check_manifest_data(json.loads(json_text(ours)), f"{self.path} (not written)")
        with contextlib.nullcontext() if lock_held else manifest_lock(self.root):
            remove_stale_temporaries(self.root)
            merged = ours
            if self._base is not None:
                disk = _read_json(self.path, missing_ok=True)
                if disk is not None and disk != self._base:
                    merged = merge_changes(self._base, disk, ours)
                    check_manifest_data(merged, f"{self.path} (merged with another writer's "
                                                f"changes)")
            atomic_write_json(self.path, merged)
        self._base = copy.deepcopy(ours)
        return self.path

    @classmethod
    def from_dict(cls, data: dict[str, Any], root: Path) -> "Manifest":
        """A manifest from its JSON form, after checking its structure and types.

        Raises:
            ManifestError: An unsupported format version, or a field of the wrong type or
                value (the message names it).
        """
        where = str(Path(root) / MANIFEST_NAME)
        if not isinstance(data, dict):
            raise ManifestError(f"{where}: the manifest must be a JSON object, not "
                                f"{type(data).__name__ if data is not None else 'null'}; "
                                f"re-export the model")
        version = data.get("format_version")
        if version != FORMAT_VERSION or isinstance(version, bool):
            raise ManifestError(
                f"{where}: manifest format version {version!r} is not supported "
                f"(this trt_exit reads version {FORMAT_VERSION}); re-export with this version"
            )
        check_manifest_data(data, where)
        data = copy.deepcopy(data)
        stages = []
        for s in data["stages"]:
            s = dict(s)
            s["inputs"] = [TensorSpec(**t) for t in s["inputs"]]
            s["outputs"] = [TensorSpec(**t) for t in s["outputs"]]
            s["onnx"] = {p: FileRef(**ref) for p, ref in s.get("onnx", {}).items()}
            stages.append(StageEntry(**s))
        graphs = {p: FileRef(**ref) for p, ref in data.get("early_exit_graph", {}).items()}
        full = dict(data.get("full_model", {}))
        if "onnx" in full:
            full["onnx"] = {p: FileRef(**ref) for p, ref in full["onnx"].items()}
        for key in ("inputs", "outputs"):
            if key in full:
                full[key] = [TensorSpec(**t) for t in full[key]]
        fields = {f.name for f in dataclasses.fields(cls)} - {"root"}
        rest = {k: v for k, v in data.items() if k in fields}
        rest.update(
            inputs=[TensorSpec(**t) for t in data["inputs"]],
            stages=stages,
            exits=[ExitEntry(**e) for e in data["exits"]],
            full_model=full,
            early_exit_graph=graphs,
        )
        return cls(**rest, root=root)

    @classmethod
    def load(cls, path: str | os.PathLike, verify: bool = False) -> "Manifest":
        """Reads a manifest from ``path`` (the JSON file or its directory).

        Args:
            path: ``manifest.json`` or the directory holding it.
            verify: Check every ONNX file against its sha256 and its graph's tensors against
                the manifest now (backends always check the files they load).
        """
        path = Path(path)
        problem = path_text_problem(path)
        if problem:
            raise ArtifactError(f"model directory {shown_path(path)}: {problem}")
        try:
            if path.is_dir():
                path = path / MANIFEST_NAME
            is_file = path.is_file()
        except (OSError, ValueError) as exc:  # a part of the path cannot be read
            raise ArtifactError(f"model directory {shown_path(path)} cannot be read "
                                f"({path_problem(exc)})") from None
        if not is_file:
            if path.is_symlink():
                raise ArtifactError(f"{path} is a dangling symlink or a symlink loop; replace it "
                                    f"with the manifest file")
            if path.exists():
                raise ArtifactError(f"{path} is not a regular file; name a model directory")
            raise ArtifactError(
                f"no manifest at {path}; create one with trt-exit export (or trt-exit demo)"
            )
        data = _read_json(path)
        manifest = cls.from_dict(data, path.parent.resolve())
        manifest._base = data
        manifest.check_files_inside()
        if verify:
            manifest.verify()
        return manifest

    def check_files_inside(self) -> None:
        """Refuses a manifest naming a file outside its directory (symlinks included)."""
        for field, ref in file_refs(self.to_dict()):
            self.resolve(FileRef(**ref), field)


#: Folders of a model directory that hold its files (graphs, engines, calibration set).
MODEL_FOLDERS = ("onnx", "engines", "calibration")
#: Lock file every writer of a directory's manifest holds (see :func:`manifest_lock`).
LOCK_NAME = ".manifest.json.lock"
#: How long a writer waits for another to finish with the manifest.
LOCK_TIMEOUT_S = 300.0


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _read_json(path: Path, missing_ok: bool = False) -> Any:
    """A manifest file's JSON: strict (no NaN / Infinity; a number out of range such as 1e400,
    which parses as infinity, is refused by the document-wide checks), at most
    :data:`~trt_exit.manifest_schema.MAX_MANIFEST_BYTES`, within the document-wide limits
    (:func:`~trt_exit.manifest_schema.check_document`: nesting depth, text, numbers)."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise ArtifactError(f"no manifest at {path}; create one with trt-exit export") from None
    except OSError as exc:
        raise ArtifactError(f"{path} cannot be read ({path_problem(exc)})") from exc
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{path}: more than {MAX_MANIFEST_BYTES // 2**20} MiB; a manifest is "
                            f"a few hundred KiB: the file is not a manifest or is damaged; "
                            f"re-export the model")
    try:
        text = raw.decode("utf-8")
        data = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ManifestError(f"{path}: not valid JSON ({reason}); re-export the model") from exc
    check_document(data, str(path))
    return data


@contextlib.contextmanager
def manifest_lock(root: str | os.PathLike, timeout_s: float | None = None) -> Iterator[None]:
    """Holds the lock of the manifest in ``root`` (``.manifest.json.lock``, with ``filelock``).

    Every read-modify-write of a manifest holds it (:meth:`Manifest.save`). The lock is an
    ``flock`` on the lock file: the kernel releases it when its holder dies, so a killed writer
    never leaves it held. On NFS, Linux emulates ``flock`` with byte-range locks that the server
    arbitrates (NFSv4, or NFSv3 with lockd), so writers on different machines exclude each
    other; on a mount with ``nolock`` or ``local_lock=flock``/``all`` they exclude each other
    only on the same machine (see docs/trust.md).

    Raises:
        ManifestError: Another writer held it for ``timeout_s`` (default
            :data:`LOCK_TIMEOUT_S`).
        OutputError: The lock file cannot be created (a read-only directory).
    """
    from filelock import FileLock, Timeout

    timeout_s = LOCK_TIMEOUT_S if timeout_s is None else timeout_s
    lock = FileLock(str(Path(root) / LOCK_NAME), timeout=timeout_s)
    try:
        lock.acquire()
    except Timeout:
        raise ManifestError(f"another trt-exit command has been writing "
                            f"{Path(root) / MANIFEST_NAME} for {timeout_s:g} s (lock "
                            f"{Path(root) / LOCK_NAME}); wait for it to finish and try "
                            f"again") from None
    except OSError as exc:
        raise OutputError(f"cannot lock {Path(root) / MANIFEST_NAME} for writing ({exc.strerror}); "
                          f"the model directory must be writable") from exc
    try:
        yield
    finally:
        lock.release()


_MISSING = object()


def merge_changes(base: Any, theirs: Any, ours: Any) -> Any:
    """Three-way merge of JSON values: ``ours``' changes from ``base`` applied to ``theirs``.

    Objects merge key by key, lists of one length element by element; where both sides
    changed one value differently, ``ours`` wins.
    """
    if _same(ours, base):
        return theirs
    if _same(theirs, base) or _same(theirs, ours):
        return ours
    if base is _MISSING and isinstance(theirs, dict) and isinstance(ours, dict):
        base = {}  # both added an object here: merge what each put in it
    if all(isinstance(v, dict) for v in (base, theirs, ours)):
        merged = {}
        for key in dict.fromkeys([*ours, *theirs]):
            value = merge_changes(base.get(key, _MISSING), theirs.get(key, _MISSING),
                                  ours.get(key, _MISSING))
            if value is not _MISSING:
                merged[key] = value
        return merged
    if all(isinstance(v, list) for v in (base, theirs, ours)) and \
            len(base) == len(theirs) == len(ours):
        return [merge_changes(b, t, o) for b, t, o in zip(base, theirs, ours)]
    return ours


def _same(a: Any, b: Any) -> bool:
    if a is _MISSING or b is _MISSING:
        return a is b
    return type(a) is type(b) and a == b


#: ONNX Runtime / ONNX element types by the numpy names the manifest uses.
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int32)": "int32",
              "tensor(int64)": "int64", "tensor(bool)": "bool"}


def ort_type_name(ort_type: str) -> str:
    """``"tensor(float)"`` -> ``"float32"`` (other types are returned as they are)."""
    return _ORT_TYPES.get(ort_type, ort_type)


def check_graph_io(what: str, path: str | os.PathLike,
                   expected_inputs: list[TensorSpec], expected_outputs: list[TensorSpec],
                   graph_inputs: dict[str, tuple[str | None, list | None]],
                   graph_outputs: dict[str, tuple[str | None, list | None]]) -> None:
    """Checks a stage graph's tensors against the manifest's entry for it.

    Args:
        what: The stage, for the message.
        path: The graph or engine file, for the message.
        expected_inputs: The manifest's inputs of the stage (exactly these).
        expected_outputs: The manifest's outputs of the stage (at least these).
        graph_inputs: What the graph declares: name -> (dtype name or None if unknown, dims or
            None if unknown); a dim is an int (-1 or None: symbolic).
        graph_outputs: The same for its outputs.

    Raises:
        ArtifactError: Names differ, or a dtype, a rank or a fixed dimension differs (a
            symbolic dimension matches anything; the manifest's dynamic batch needs one).
    """
    problems = []
    want_in = {t.name for t in expected_inputs}
    if set(graph_inputs) != want_in:
        problems.append(f"inputs {sorted(graph_inputs)}, the manifest says {sorted(want_in)}")
    missing = [t.name for t in expected_outputs if t.name not in graph_outputs]
    if missing:
        problems.append(f"outputs {sorted(graph_outputs)} lack {missing}")
    for specs, declared in ((expected_inputs, graph_inputs), (expected_outputs, graph_outputs)):
        for spec in specs:
            if spec.name not in declared:
                continue
            dtype, dims = declared[spec.name]
            if dtype is not None and dtype != spec.dtype:
                problems.append(f"{spec.name} is {dtype}, the manifest says {spec.dtype}")
            if dims is None:
                continue
            shown = [d if isinstance(d, int) and d >= 0 else "?" for d in dims]
            if len(dims) != len(spec.shape):
                problems.append(f"{spec.name} has shape {shown}, the manifest says {spec.shape}")
                continue
            for i, (have, want) in enumerate(zip(dims, spec.shape)):
                fixed = isinstance(have, int) and have >= 0
                if (want == -1 and fixed) or (want != -1 and fixed and have != want):
                    problems.append(f"{spec.name} has shape {shown}, the manifest says "
                                    f"{spec.shape}")
                    break
    if problems:
        raise ArtifactError(f"{what}: the tensors of graph {path} do not match the manifest: "
                            f"{'; '.join(problems)}. The graph was replaced or the manifest "
                            f"edited: re-export the model")


def check_onnx_io(what: str, path: str | os.PathLike, inputs: list[TensorSpec],
                  outputs: list[TensorSpec]) -> None:
    """:func:`check_graph_io` for an ONNX file (read with ``onnx``, weights not loaded)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ArtifactError(f"{what}: {path} is not a readable ONNX graph ({exc}); re-export "
                            f"the model") from exc
    graph = model.graph
    initializers = {t.name for t in graph.initializer}

    def declared(values) -> dict[str, tuple[str | None, list | None]]:
        out = {}
        for value in values:
            if value.name in initializers:
                continue
            tensor = value.type.tensor_type
            dtype = None
            if tensor.elem_type:
                dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
            dims = None
            if tensor.HasField("shape"):
                dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
            out[value.name] = (dtype, dims)
        return out

    check_graph_io(what, path, inputs, outputs, declared(graph.input), declared(graph.output))
