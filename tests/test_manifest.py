"""The manifest: round trip, hashes, atomic writes, damaged and foreign files."""

from __future__ import annotations

import json
import os

import pytest

from trt_exit.errors import ArtifactError, ManifestError
from trt_exit.fileio import atomic_write_bytes, atomic_write_json
from trt_exit.manifest import FORMAT_VERSION, Manifest
from trt_exit.runtime.executor import Executor


def test_round_trip(tiny_export, tmp_path):
    manifest = Manifest.load(tiny_export)
    again = Manifest.from_dict(json.loads(json.dumps(manifest.to_dict())), manifest.root)
    assert again.to_dict() == manifest.to_dict()
    assert manifest.to_dict()["format_version"] == FORMAT_VERSION
    assert manifest.model["checkpoint"]["path"] == "checkpoint.safetensors"
    manifest.checkpoint_path()  # hash verified


def test_changed_onnx_file_is_refused_with_its_name(tiny_export, fresh_copy):
    copy = fresh_copy(tiny_export)
    path = copy / "onnx" / "fp32" / "exit_0.onnx"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"exit_0 \(fp32\): .*exit_0\.onnx does not match"):
        Executor(copy)
    with pytest.raises(ManifestError):
        Manifest.load(copy, verify=True)


def test_missing_onnx_file(tiny_export, fresh_copy):
    copy = fresh_copy(tiny_export)
    (copy / "onnx" / "fp32" / "segment_2.onnx").unlink()
    with pytest.raises(ArtifactError, match=r"segment_2\.onnx .* is missing"):
        Executor(copy)


@pytest.mark.parametrize("content,message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"format_version": 99}), "format version 99 is not supported"),
    (json.dumps({"format_version": FORMAT_VERSION, "model": {}}), "malformed manifest"),
])
def test_bad_manifest_files(tmp_path, content, message):
    (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(ManifestError, match=message):
        Manifest.load(tmp_path)


def test_no_manifest(tmp_path):
    with pytest.raises(ArtifactError, match="no manifest at"):
        Manifest.load(tmp_path)


def test_atomic_writes_leave_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "file.json"
    atomic_write_json(target, {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_json(target, {"a": object()})  # not serializable: fails mid-write
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["file.json"]
    mode = os.stat(atomic_write_bytes(tmp_path / "b.bin", b"x")).st_mode & 0o777
    assert mode & 0o044  # readable by others like a plain open() (umask permitting)
