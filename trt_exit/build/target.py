"""What an engine is built for, the engine cache key, and choosing a usable engine.

A serialized TensorRT engine runs only with the TensorRT version that built it (or a later one
of the same major, for version-compatible engines) and only on the GPU model it was built on
(same name and compute capability). Each engine's manifest record says what it was built for;
the cache key hashes that together with the ONNX graph's sha256, the precision and the build
options, so an unchanged model on an unchanged machine is never rebuilt, and an engine is never
used where it would fail or silently misbehave.

Engine records live in ``StageEntry.engines`` (and ``manifest.full_model["engines"]`` for the
no-exit baseline), keyed by cache key ``<precision>-<16 hex digits>``::

    "fp16-3fa2c1d09b7e44aa": {
        "precision": "fp16",
        "file": {"path": "engines/segment_0.fp16.3fa2c1d09b7e44aa.engine", "sha256": ..., "bytes": ...},
        "onnx_sha256": ...,
        "target": {"tensorrt": "10.3.0", "device_name": "Orin", "compute_capability": "8.7"},
        "profile": {"min_batch": 1, "opt_batch": 1, "max_batch": 8},
        "dla_core": null, "gpu_fallback": null, "version_compatible": false,
        "optimization_level": null, "workspace_mib": 1024, "build_seconds": 4.2, "built": ...}

Version-compatible records add ``"lean_runtime": "embedded"`` (part of the key): the plan
carries TensorRT's lean runtime, so a later TensorRT of the same major loads it. DLA records add
``"dla_layers"`` (layers the engine inspector places on the DLA; 0 is warned about).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from dataclasses import dataclass
from typing import Any

from trt_exit.build.config import LEAN_RUNTIME_EMBEDDED
from trt_exit.build.errors import EngineMismatchError
from trt_exit.errors import ArtifactError

#: Engines live here, relative to the manifest.
ENGINE_DIR = "engines"
#: Version of the key's recipe: bump when the key's meaning changes.
KEY_VERSION = 1


@dataclass(frozen=True)
class Target:
    """The TensorRT version and GPU engines are built for (or run on).

    Attributes:
        tensorrt: TensorRT version, e.g. ``10.3.0``.
        device_name: GPU name as CUDA reports it, e.g. ``Orin``.
        compute_capability: ``"8.7"``.
    """

    tensorrt: str
    device_name: str
    compute_capability: str

    @property
    def tensorrt_major(self) -> int:
        return int(self.tensorrt.split(".")[0])

    def slug(self) -> str:
        """File-name-safe description, e.g. ``trt10.3.0-orin-sm87``."""
        device = re.sub(r"[^a-z0-9]+", "-", self.device_name.lower()).strip("-")
        return f"trt{self.tensorrt}-{device}-sm{self.compute_capability.replace('.', '')}"

    def to_dict(self) -> dict[str, str]:
        return {"tensorrt": self.tensorrt, "device_name": self.device_name,
                "compute_capability": self.compute_capability}


def engine_key(onnx_sha256: str, precision: str, target: Target, options: dict[str, Any]) -> str:
    """Cache key of an engine: ``<precision>-<16 hex digits>``.

    It hashes the ONNX graph's sha256, the precision, the TensorRT version, the GPU name and
    compute capability, and the engine-shaping build options (batch profile, DLA core, version
    compatibility, optimization level). The workspace limit is not part of it: it bounds the
    tactics tried, not what the engine computes.
    """
    material = json.dumps({"v": KEY_VERSION, "onnx": onnx_sha256, "precision": precision,
                           "target": target.to_dict(), "options": options}, sort_keys=True)
    return f"{precision}-{hashlib.sha256(material.encode()).hexdigest()[:16]}"


def engine_filename(stage_name: str, key: str) -> str:
    """``engines/<stage>.<precision>.<hash>.engine`` for a key ``<precision>-<hash>``."""
    precision, digest = key.split("-", 1)
    return f"{ENGINE_DIR}/{stage_name}.{precision}.{digest}.engine"


def runs_on(record: dict[str, Any], target: Target) -> bool:
    """Whether an engine record can be deserialized and run on ``target``."""
    built = record.get("target", {})
    if built.get("device_name") != target.device_name or \
            built.get("compute_capability") != target.compute_capability:
        return False
    if built.get("tensorrt") == target.tensorrt:
        return True
    if record.get("version_compatible") and record.get("lean_runtime") == LEAN_RUNTIME_EMBEDDED:
        # Without the lean runtime in the plan (engines built before it was), a newer TensorRT
        # would need IRuntime.load_runtime with the building version's library: rebuild those.
        built_version = _version_tuple(built.get("tensorrt", "0"))
        return built_version[0] == target.tensorrt_major and \
            built_version <= _version_tuple(target.tensorrt)
    return False


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:4])


def select_engine(records: dict[str, dict[str, Any]], what: str, precision: str, target: Target,
                  manifest_dir: str, onnx_sha256: str | None = None) -> tuple[str, dict[str, Any]]:
    """The newest engine of ``precision`` that runs on ``target``.

    Args:
        records: A stage's engine records by key.
        what: Stage name, for messages.
        precision: ``fp32``, ``fp16`` or ``int8``.
        target: This machine.
        manifest_dir: For the rebuild command in messages.
        onnx_sha256: The stage's current ONNX graph: engines built from another are ignored.

    Raises:
        ArtifactError: No engine of this precision was built (from the current graph).
        EngineMismatchError: Engines exist, but for another TensorRT version or GPU.
    """
    rebuild = f"trt-exit build {manifest_dir} --precision {precision}"
    candidates = {k: r for k, r in records.items() if r.get("precision") == precision}
    stale = {k for k, r in candidates.items()
             if onnx_sha256 is not None and r.get("onnx_sha256") != onnx_sha256}
    candidates = {k: r for k, r in candidates.items() if k not in stale}
    if not candidates:
        what_happened = ("was built from an older version of the graph" if stale else
                         "has been built")
        raise ArtifactError(f"{what}: no {precision} TensorRT engine {what_happened}; build it on "
                            f"this device with: {rebuild}")
    usable = {k: r for k, r in candidates.items() if runs_on(r, target)}
    if not usable:
        built = "; ".join(sorted({
            f"TensorRT {r.get('target', {}).get('tensorrt')} on "
            f"{r.get('target', {}).get('device_name')} "
            f"(sm {r.get('target', {}).get('compute_capability')})" for r in candidates.values()}))
        raise EngineMismatchError(
            f"{what}: the {precision} engine was built for {built}, but this machine has "
            f"TensorRT {target.tensorrt} on {target.device_name} (sm {target.compute_capability});"
            f" engines only run where they were built: rebuild here with: {rebuild}")
    key = max(usable, key=lambda k: usable[k].get("built", ""))
    return key, usable[key]


def engine_for(manifest, what: str, records: dict[str, dict[str, Any]], precision: str,
               target: Target, onnx_sha256: str | None = None) -> tuple[dict[str, Any], Path]:
    """The engine record and verified file a runner on ``target`` should load.

    Args:
        manifest: The :class:`~trt_exit.manifest.Manifest` the records belong to.
        what: Stage name, for messages.
        records: The stage's engine records by key.
        precision: ``fp32``, ``fp16`` or ``int8``.
        target: This machine.
        onnx_sha256: The graph the engine must have been built from.

    Raises:
        ArtifactError: No engine of this precision (from this graph), or its file is missing,
            truncated or changed since the build (sha256 mismatch).
        EngineMismatchError: Only engines for another TensorRT version or GPU exist.
    """
    from trt_exit.fileio import sha256_file
    from trt_exit.manifest import FileRef

    _, record = select_engine(records, what, precision, target, str(manifest.root), onnx_sha256)
    ref = record["file"]
    path = manifest.resolve(FileRef(**ref), f"{what} engine")  # inside the model directory
    rebuild = f"trt-exit build {manifest.root} --precision {precision} --rebuild"
    if not path.is_file():
        raise ArtifactError(f"{what}: engine file {path} listed in {manifest.path} is missing; "
                            f"rebuild: {rebuild}")
    size = path.stat().st_size
    if size != ref["bytes"] or sha256_file(path) != ref["sha256"]:
        raise ArtifactError(f"{what}: engine {path} has {size} bytes and does not match its "
                            f"sha256 in {manifest.path} ({ref['bytes']} bytes when built): it "
                            f"was truncated or changed after the build; rebuild: {rebuild}")
    return record, path
