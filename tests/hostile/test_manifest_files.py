"""Items 2 and 6 of issue 12: a manifest names only files inside its directory, and its
structure and types are checked on load with messages naming the field."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trt_exit.errors import ManifestError, TrtExitError
from trt_exit.fileio import sha256_file
from trt_exit.manifest import MANIFEST_NAME, Manifest

from .conftest import assert_refused, damage


def _edit(model: Path, change) -> None:
    path = model / MANIFEST_NAME
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _point_segment_at(model: Path, rel: str, secret: Path) -> None:
    """Makes stage segment_0's fp32 graph entry name ``rel`` with the hash of ``secret`` (what
    a hostile manifest would do to pass the sha check)."""
    def change(data):
        data["stages"][0]["onnx"]["fp32"] = {"path": rel, "sha256": sha256_file(secret),
                                             "bytes": secret.stat().st_size}
    _edit(model, change)


@pytest.fixture
def secret(tmp_path) -> Path:
    path = tmp_path / "secret.txt"
    path.write_text("private data outside the model directory\n")
    return path


ESCAPES = ["../secret.txt", "onnx/../../secret.txt", "ABSOLUTE", "LINK_OUT", "LINK_DIR_OUT",
           "LOOP"]


@pytest.mark.parametrize("kind", ESCAPES)
def test_paths_outside_the_directory_are_refused_naming_the_entry(model, secret, kind, capsys,
                                                                  sample_file):
    rel = kind
    if kind == "ABSOLUTE":
        rel = str(secret)
    elif kind == "LINK_OUT":
        os.symlink(secret, model / "onnx" / "fp32" / "escape.onnx")
        rel = "onnx/fp32/escape.onnx"
    elif kind == "LINK_DIR_OUT":
        os.symlink(secret.parent, model / "onnx" / "outside")
        rel = "onnx/outside/secret.txt"
    elif kind == "LOOP":
        os.symlink("loop_b", model / "onnx" / "loop_a")
        os.symlink("loop_a", model / "onnx" / "loop_b")
        rel = "onnx/loop_a"
    _point_segment_at(model, rel, secret)
    with pytest.raises(ManifestError) as info:
        Manifest.load(model)
    message = str(info.value)
    assert "stages[0].onnx.fp32" in message
    assert sha256_file(secret)[:12] not in message and "bytes" not in message.replace(
        "bytes.", "")
    line = assert_refused(capsys, ["run", model, "--input", sample_file], "stages[0].onnx.fp32",
                          model, secret.parent)
    assert sha256_file(secret)[:8] not in line


@pytest.mark.parametrize("where", ["checkpoint", "calibration", "engine"])
def test_every_file_reference_is_confined(model, secret, where):
    ref = {"path": "../secret.txt", "sha256": sha256_file(secret), "bytes": secret.stat().st_size}

    def change(data):
        if where == "checkpoint":
            data["model"]["checkpoint"] = ref
        elif where == "calibration":
            data["calibration"] = {"file": ref}
        else:
            data["stages"][1]["engines"] = {"k": {"precision": "fp16", "file": ref}}
    _edit(model, change)
    with pytest.raises(ManifestError, match="outside the model directory"):
        Manifest.load(model)


def test_symlinks_inside_the_directory_still_work(model):
    target = model / "onnx" / "fp32" / "segment_0.onnx"
    os.rename(target, model / "onnx" / "fp32" / "segment_0.real.onnx")
    os.symlink("segment_0.real.onnx", target)
    Manifest.load(model, verify=True)


# ------------------------------------------------------------------ item 6: types


def _set(path: str, value):
    def change(data):
        node = data
        keys = path.split("/")
        for key in keys[:-1]:
            node = node[int(key) if key.isdigit() else key]
        last = keys[-1]
        node[int(last) if last.isdigit() else last] = value
    return change


BAD = [
    ("top-level list", lambda d: d.clear() or None, "must be a JSON object"),
    ("format_version text", _set("format_version", "1"), "format version"),
    ("model null", _set("model", None), "model must be an object"),
    ("unknown task", _set("model/task", "segmentation"), "model.task"),
    ("stages not a list", _set("stages", {"a": 1}), "stages must be a list"),
    ("unknown dtype", _set("stages/0/outputs/0/dtype", "complex128"), "stages[0].outputs[0].dtype"),
    ("shape text", _set("inputs/0/shape", [-1, "1", 8, 8]), "inputs[0].shape[1]"),
    ("threshold text", _set("exits/0/threshold", "0.5"), "exits[0].threshold"),
    ("threshold above 1", _set("exits/0/threshold", 2.5), "exits[0].threshold"),
    ("enabled text", _set("exits/1/enabled", "yes"), "exits[1].enabled"),
    ("latency text", _set("latency_profile/stages/segment_0", "fast"),
     "latency_profile.stages.segment_0"),
    ("latency negative", _set("latency_profile/stages/exit_0", -3),
     "latency_profile.stages.exit_0"),
    ("tuned thresholds short", _set("tuning/fp32/best/thresholds", [0.5]),
     "tuning.fp32.best.thresholds"),
    ("sha not hex", _set("stages/0/onnx/fp32/sha256", "xyz"), "stages[0].onnx.fp32.sha256"),
    ("exit stage missing", lambda d: d["stages"].pop(), "lack"),
    ("stage renamed", _set("stages/0/name", "segment_7"), "stages[0].name"),
]


@pytest.mark.parametrize("label,change,field", BAD, ids=[b[0] for b in BAD])
def test_wrong_types_name_the_field(model, label, change, field, capsys, sample_file):
    path = model / MANIFEST_NAME
    data = json.loads(path.read_text())
    result = change(data)
    path.write_text(json.dumps([] if label == "top-level list" else data))
    with pytest.raises(ManifestError, match=__import__("re").escape(field)):
        Manifest.load(model)
    assert_refused(capsys, ["run", model, "--input", sample_file], field, model)
    del result


@pytest.mark.parametrize("text", ["null", "[]", "3", '"manifest"', '{"format_version": NaN}',
                                  '{"format_version": 1, "model": {"name": Infinity}}',
                                  "[" * 100000])
def test_valid_json_of_the_wrong_kind(tmp_path, text, capsys):
    (tmp_path / MANIFEST_NAME).write_text(text)
    with pytest.raises(ManifestError):
        Manifest.load(tmp_path)
    assert_refused(capsys, ["eval", tmp_path], str(tmp_path), tmp_path)


# ------------------------------------------------------------------ property-based


JSON = st.recursive(st.none() | st.booleans() | st.integers(-5, 5) | st.floats(-2, 2)
                    | st.text(max_size=4), lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=3), inner, max_size=3), max_leaves=5)


@pytest.fixture(scope="module")
def valid_manifest(tiny_tuned):
    return json.loads((tiny_tuned / MANIFEST_NAME).read_text())


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_manifests_give_manifest_errors_only(valid_manifest, tiny_tuned, data):
    damaged = damage(valid_manifest, data, JSON)
    try:
        manifest = Manifest.from_dict(damaged, tiny_tuned)
        manifest.check_files_inside()
    except TrtExitError:
        return
    # Accepted: then every query the runtime makes works.
    manifest.thresholds()
    for precision in ("fp32", "fp16"):
        manifest.thresholds(precision)
    manifest.precisions()
    for k in range(manifest.num_exits):
        manifest.segment(k), manifest.exit_stage(k)
    json.dumps(manifest.to_dict(), allow_nan=False)
