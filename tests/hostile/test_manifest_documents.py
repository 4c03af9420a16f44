"""Item 2 of issue 20: manifest fields the schema did not check (the dataset record,
preprocessing, deep nesting, numbers out of range) gave tracebacks in eval / tune / count, or
were found only after all the work. The whole document is checked on load: every command that
reads a manifest refuses a bad one at once, in one line naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trt_exit.errors import ManifestError
from trt_exit.manifest import MANIFEST_NAME, Manifest
from trt_exit.manifest_schema import MAX_MANIFEST_BYTES

from .conftest import assert_refused, cli, damage, snapshot

DEEP = "[" * 600 + "]" * 600


def _write(model: Path, change) -> None:
    """Applies ``change`` to the manifest's JSON (a dict; or text, when it returns a str)."""
    path = model / MANIFEST_NAME
    data = json.loads(path.read_text())
    text = change(data)
    path.write_text(text if isinstance(text, str) else json.dumps(data))


def _set(path: str, value):
    def change(data):
        node, keys = data, path.split("/")
        for key in keys[:-1]:
            node = node[int(key) if key.isdigit() else key]
        node[int(keys[-1]) if keys[-1].isdigit() else keys[-1]] = value
    return change


def _text(old: str, new: str):
    def change(data):
        text = json.dumps(data)
        assert old in text
        return text.replace(old, new, 1)
    return change


COUNT = ["count", "synthetic://crowd", "--engines", "{model}", "--max-frames", "1", "--no-status"]
IMAGE = {"size": [8, 8], "mean": [0.5], "std": [0.5], "scale": 0.0625}

#: (label, change, command, field named in the error)
CASES = [
    ("dataset as a string", _set("model/dataset", "digits"), ["eval", "{model}"],
     "model.dataset must be an object"),
    ("dataset without seed", _set("model/dataset", {"name": "digits"}), ["tune", "{model}"],
     "model.dataset lacks seed"),
    ("dataset seed as text", _set("model/dataset/seed", "0"), ["eval", "{model}"],
     "model.dataset.seed must be an integer"),
    ("dataset name a number", _set("model/dataset/name", 7), ["calibrate", "{model}"],
     "model.dataset.name"),
    ("dataset options a list", _set("model/dataset/options", [1]), ["tune", "{model}"],
     "model.dataset.options must be an object"),
    ("dataset option of the wrong type",
     _set("model/dataset", {"name": "digits_c", "seed": 0, "options": {"corruptions": 5}}),
     ["eval", "{model}"], "option 'corruptions' takes text, got 5"),
    ("image size as text", _set("preprocessing/image", {**IMAGE, "size": "8x8"}), COUNT,
     "preprocessing.image.size must be a list"),
    ("image size absurd", _set("preprocessing/image", {**IMAGE, "size": [100000, 100000]}),
     COUNT, "preprocessing.image.size[0] must be <= 8192"),
    ("image mean as text", _set("preprocessing/image", {**IMAGE, "mean": "0.5"}), COUNT,
     "preprocessing.image.mean must be a number"),
    ("image std zero", _set("preprocessing/image", {**IMAGE, "std": [0.0]}), COUNT,
     "preprocessing.image.std[0] must be > 0"),
    ("image mean of 65 channels", _set("preprocessing/image", {**IMAGE, "mean": [0.5] * 65}),
     COUNT, "preprocessing.image.mean must be a number or a list of 1 to 64"),
    ("image without std", _set("preprocessing/image", {"size": [8, 8], "mean": [0.5]}), COUNT,
     "preprocessing.image lacks std"),
    ("audio mel bands as text", _set("preprocessing/audio", {"n_mels": "x"}), COUNT,
     "preprocessing.audio.n_mels must be an integer"),
    ("audio unknown field", _set("preprocessing/audio", {"n_mel": 32}), COUNT,
     "preprocessing.audio has unknown fields n_mel"),
    ("crop_pct zero", _set("preprocessing/crop_pct", 0), ["run", "{model}", "--input", "{x}"],
     "preprocessing.crop_pct must be in [0.1, 2.0]"),
    ("scale a list", _set("preprocessing/scale", [1]), ["run", "{model}", "--input", "{x}"],
     "preprocessing.scale must be a number"),
    ("nested 600 deep at the top", lambda d: json.dumps(d)[:-1] + f', "notes": {DEEP}}}',
     ["run", "{model}", "--input", "{x}"], "notes[0][0]"),
    ("nested 600 deep in exit options", _text('"options": {"hidden_dim": 16}',
                                              f'"options": {{"hidden_dim": {DEEP}}}'),
     ["eval", "{model}"], "exits[0].options.hidden_dim[0]"),
    ("nested 600 deep in the model config", _text('"backbone_options": {',
                                                  f'"backbone_options": {{"x": {DEEP}, '),
     ["tune", "{model}"], "model.config.backbone_options.x[0]"),
    ("nested 600 deep in preprocessing", _text('"layout": "NCHW float32"}',
                                               f'"layout": "NCHW float32", "more": {DEEP}}}'),
     COUNT, "preprocessing.more[0]"),
    ("1e400 in exit options", _text('"hidden_dim": 16', '"hidden_dim": 1e400'),
     ["tune", "{model}"], "exits[0].options.hidden_dim must be a finite number, not inf"),
    ("-1e400 in parity", _text('"max_output_diff": ', '"max_output_diff": -1e400, "x": '),
     ["run", "{model}", "--input", "{x}"], "parity.fp32.max_output_diff must be a finite"),
    ("an integer beyond 64 bits", _text('"num_outputs": 10', '"num_outputs": ' + "9" * 30),
     ["eval", "{model}"], "beyond 64 bits"),
    ("num_outputs zero", _set("model/num_outputs", 0), ["run", "{model}", "--input", "{x}"],
     "model.num_outputs must be >= 1"),
    ("a name with an escape code", _set("model/name", "tiny\u001b[2J"), ["eval", "{model}"],
     "model.name holds a control character"),
    ("a name leading out of a folder", _set("model/name", "../../x"),
     ["triton-repo", "{model}", "--out", "{tmp}/repo"], "model.name '../../x' is not a model name"),
    ("a lone surrogate in a key", lambda d: json.dumps(d)[:-1] + ', "\\udcff": 1}',
     ["run", "{model}", "--input", "{x}"], "not valid Unicode"),
    ("a tensor of 2^40 elements per sample", _set("inputs/0/shape", [-1, 1, 2**20, 2**20]),
     ["run", "{model}", "--input", "{x}"], "inputs[0].shape"),
    ("latency backend a string", _set("latency_profile/backend", "onnxruntime"),
     ["run", "{model}", "--input", "{x}", "--policy", "deadline:5"],
     "latency_profile.backend must be an object"),
    ("class names of the wrong count", _set("model/class_names", ["a", "b"]),
     ["eval", "{model}"], "model.class_names must have 10 names"),
    ("target_transform unknown", _set("model/target_transform", "sqrt"), COUNT,
     "model.target_transform must be one of null, log1p"),
    ("operating point fractions", _set("operating_points/0/exit_fractions", [2, 0, 0]),
     ["run", "{model}", "--input", "{x}"], "operating_points[0].exit_fractions[0]"),
    ("engine record without profile batch", _set("stages/0/engines", {
        "fp16-00ff": {"precision": "fp16", "profile": {"max_batch": "8"}, "file": {
            "path": "engines/x.engine", "sha256": "0" * 64, "bytes": 1}}}),
     ["run", "{model}", "--input", "{x}"], "stages[0].engines.fp16-00ff.profile.max_batch"),
]


@pytest.mark.parametrize("label,change,command,field", CASES, ids=[c[0] for c in CASES])
def test_bad_fields_are_refused_on_load(model, sample_file, tmp_path, label, change, command,
                                        field, capsys):
    _write(model, change)
    args = [a.format(model=model, x=sample_file, tmp=tmp_path) for a in command]
    assert_refused(capsys, args, field, model, tmp_path)
    assert not (tmp_path / "repo").exists()


def test_infinity_in_the_options_is_found_before_tuning(model, capsys):
    """tune did all its work, then refused to save: "a computation went wrong"."""
    import time

    _write(model, _text('"hidden_dim": 16', '"hidden_dim": 1e400'))
    began = time.perf_counter()
    line = assert_refused(capsys, ["tune", model, "--repeats", "200"], "1e400", model)
    assert "computation went wrong" not in line
    assert time.perf_counter() - began < 5


def test_a_manifest_larger_than_the_limit(model, capsys):
    _write(model, lambda d: json.dumps(d)[:-1] + ', "padding": "' + "x" * MAX_MANIFEST_BYTES
           + '"}')
    assert_refused(capsys, ["eval", model], "more than 32 MiB", model)


def test_a_deep_document_is_refused_by_the_save_merge_too(model):
    """Another writer's deep manifest on disk is refused under the lock, not merged by
    recursion."""
    manifest = Manifest.load(model)
    _write(model, lambda d: json.dumps(d)[:-1] + f', "notes": {DEEP}}}')
    manifest.latency_profile["note"] = "changed"
    with pytest.raises(ManifestError, match="more than 32 deep"):
        manifest.save()


def test_preprocessing_fields_users_add_are_kept(model, sample_file, capsys):
    """Fields the schema does not know stay allowed in open records (later additions, notes)."""
    _write(model, _set("preprocessing/notes", {"camera": "lab, 30 fps"}))
    _write(model, _set("model/owner", "ops team"))
    status, err = cli(capsys, "run", model, "--input", sample_file)
    assert status == 0, err


# ------------------------------------------------------------------ property-based: the CLI

#: Values the sweep puts in place of a field: other types and edge sizes, or (as often) what
#: only a hostile edit makes: nesting 600 deep, 1e400, 30-digit integers, control characters,
#: lone surrogates, names over 255 bytes.
ODD = st.one_of(
    st.sampled_from([None, True, 0, -1, 1, 2**31, 2**63, -2**63, 0.5, 1e308, -1e-308, "", "x",
                     "fp16", "../x", [], [1, 2], [-1, 1, 8, 8], [100000, 100000], {}, {"a": 1},
                     {"path": "../x", "sha256": "0" * 64, "bytes": 1}]),
    st.sampled_from(["__INF__", "__DEEP__", "__BIG__", "a\u0000b", "\udcff", "\u001b[2J",
                     "x" * 300]))


@pytest.fixture(scope="module")
def valid_manifest(tiny_tuned):
    data = json.loads((tiny_tuned / MANIFEST_NAME).read_text())
    data["preprocessing"]["image"] = dict(IMAGE)  # count then reaches the image spec
    return data


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_damaged_manifest_is_exit_0_or_one_line(valid_manifest, model, sample_file, capsys,
                                                    data):
    """What a careless or hostile edit can do to a manifest, through the commands that read
    one: they run (0) or refuse in one line (2), never a traceback."""
    damaged = damage(valid_manifest, data, ODD)
    text = (json.dumps(damaged).replace('"__INF__"', "1e400")
            .replace('"__DEEP__"', DEEP).replace('"__BIG__"', "9" * 30))
    (model / MANIFEST_NAME).write_text(text)
    command = data.draw(st.sampled_from([
        ["run", model, "--input", sample_file], ["run", model, "--input", sample_file,
                                                 "--policy", "deadline:5"],
        ["count", "synthetic://crowd", "--engines", model, "--max-frames", "1", "--no-status"],
        ["eval", model, "--passes", "1"],
        ["profile", model, "--samples", "1", "--stage-repeats", "1", "--warmup", "0",
         "--inputs", "random", "--input-samples", "2", "--out", model.parent / "profile"]]))
    before = snapshot(model)
    status, err = cli(capsys, *command)
    lines = [line for line in err.splitlines() if line.strip()
             and not line.startswith("trt-exit: ")]  # warnings from logging
    assert "Traceback" not in err
    assert status in (0, 2), err
    if status == 2:
        assert len(lines) == 1, err
        assert snapshot(model) == before
