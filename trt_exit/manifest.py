"""The manifest: one ``manifest.json`` next to the artifacts, read by everything after export.

It records the model (name, task, config), its inputs and preprocessing, the ordered stages
(kind, index, backbone block range, tensor names/shapes/dtypes, ONNX file per precision with its
sha256, engines per precision with their build info), exit metadata (confidence measure,
thresholds, tuned operating points), the calibration set, and the measured latency profile.

Paths inside the manifest are relative to its directory, so a directory can be moved or copied
to a Jetson as a whole. Files are written atomically; every file is checked against its sha256
before it is used, and a mismatch is a :class:`ManifestError` naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from trt_exit import tensor_names as tn
from trt_exit.errors import ArtifactError, ManifestError
from trt_exit.fileio import atomic_write_json, sha256_file

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
    format_version: int = FORMAT_VERSION
    #: Directory the manifest lives in (not serialized).
    root: Path = field(default=Path("."), repr=False, compare=False)

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

    def resolve(self, ref: FileRef) -> Path:
        """Absolute path of a file of this manifest."""
        return (self.root / ref.path).resolve()

    def verified_path(self, ref: FileRef, what: str) -> Path:
        """Path of ``ref`` after checking that it exists and matches its sha256."""
        path = self.resolve(ref)
        if not path.is_file():
            raise ArtifactError(
                f"{what}: file {path} listed in {self.path} is missing; re-run the step that "
                f"writes it (trt-exit export / build)"
            )
        size = path.stat().st_size
        if size != ref.bytes or sha256_file(path) != ref.sha256:
            raise ManifestError(
                f"{what}: {path} does not match {self.path} (expected {ref.bytes} bytes with "
                f"sha256 {ref.sha256[:12]}..., found {size} bytes with sha256 "
                f"{sha256_file(path)[:12]}...); the file was changed or truncated after export: "
                f"re-export the model"
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
        return self.verified_path(ref, f"{stage.name} ({precision})") if verify else self.resolve(ref)

    def full_model_path(self, precision: str = "fp32", verify: bool = True) -> Path:
        """Path of the no-exit baseline graph in ``precision``."""
        graphs = self.full_model.get("onnx", {})
        if precision not in graphs:
            raise ManifestError(f"{self.path}: no {precision} full-model graph")
        ref = graphs[precision]
        return self.verified_path(ref, f"full model ({precision})") if verify else self.resolve(ref)

    def checkpoint_path(self, verify: bool = True) -> Path:
        """Path of the PyTorch checkpoint the graphs were exported from (torch backend)."""
        ref = self.model.get("checkpoint")
        if not ref:
            raise ManifestError(f"{self.path} records no checkpoint; re-export with trt-exit export")
        ref = FileRef(**ref)
        return self.verified_path(ref, "checkpoint") if verify else self.resolve(ref)

    def verify(self, precisions: Iterable[str] | None = None) -> None:
        """Checks every ONNX file (of ``precisions``, default all) against its sha256."""
        for stage in self.stages:
            for precision in stage.onnx:
                if precisions is None or precision in precisions:
                    self.onnx_path(stage, precision)
        for precision in self.full_model.get("onnx", {}):
            if precisions is None or precision in precisions:
                self.full_model_path(precision)

    # ------------------------------------------------------------------ (de)serialization

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("root")
        return {"format_version": data.pop("format_version"), **data}

    def save(self, root: str | os.PathLike | None = None) -> Path:
        """Writes ``manifest.json`` atomically into ``root`` (default: its own directory)."""
        if root is not None:
            self.root = Path(root)
        return atomic_write_json(self.path, self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any], root: Path) -> "Manifest":
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ManifestError(
                f"{root / MANIFEST_NAME}: manifest format version {version!r} is not supported "
                f"(this trt_exit reads version {FORMAT_VERSION}); re-export with this version"
            )
        try:
            stages = []
            for s in data["stages"]:
                s = dict(s)
                s["inputs"] = [TensorSpec(**t) for t in s["inputs"]]
                s["outputs"] = [TensorSpec(**t) for t in s["outputs"]]
                s["onnx"] = {p: FileRef(**ref) for p, ref in s.get("onnx", {}).items()}
                stages.append(StageEntry(**s))
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
            )
            return cls(**rest, root=root)
        except (KeyError, TypeError) as exc:
            raise ManifestError(
                f"{root / MANIFEST_NAME}: malformed manifest ({type(exc).__name__}: {exc}); "
                f"re-export the model"
            ) from exc

    @classmethod
    def load(cls, path: str | os.PathLike, verify: bool = False) -> "Manifest":
        """Reads a manifest from ``path`` (the JSON file or its directory).

        Args:
            path: ``manifest.json`` or the directory holding it.
            verify: Check every ONNX file against its sha256 now (backends always check the
                files they load).
        """
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_NAME
        if not path.is_file():
            raise ArtifactError(
                f"no manifest at {path}; create one with trt-exit export (or trt-exit demo)"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ManifestError(f"{path}: not valid JSON ({exc}); re-export the model") from exc
        manifest = cls.from_dict(data, path.parent.resolve())
        if verify:
            manifest.verify()
        return manifest
