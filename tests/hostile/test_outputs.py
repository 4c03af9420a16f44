"""Items 4 and 5 of issue 12: outputs never overwrite the model or the command's inputs, and
unwritable targets are found before the work (one shared check: fileio.check_output_file)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from trt_exit.errors import OutputError
from trt_exit.fileio import atomic_write_json, check_output_file

from .conftest import assert_refused, cli

MODEL_FILES = ["manifest.json", "onnx/fp32/segment_0.onnx", "onnx/fp32/exit_1.onnx",
               "checkpoint.safetensors", "onnx/fp32/new_file.jsonl", ".manifest.json.lock"]


@pytest.mark.parametrize("rel", MODEL_FILES)
def test_run_output_into_the_model_is_refused(model, sample_file, rel, capsys):
    assert_refused(capsys, ["run", model, "--input", sample_file, "--output", model / rel],
                   "would overwrite", model, sample_file.parent)


def test_run_output_through_a_symlink_to_the_manifest(model, sample_file, tmp_path, capsys):
    link = tmp_path / "innocent.jsonl"
    link.symlink_to(model / "manifest.json")
    assert_refused(capsys, ["run", model, "--input", sample_file, "--output", link],
                   "would overwrite", model)


@pytest.mark.parametrize("how", ["same", "relative", "hardlink", "symlink"])
def test_output_equal_to_the_input_is_refused(model, sample_file, how, capsys, monkeypatch):
    target = sample_file
    if how == "relative":
        monkeypatch.chdir(sample_file.parent.parent)
        target = Path("inputs/../inputs/x.npy")
    elif how == "hardlink":
        target = sample_file.parent / "x_link.npy"
        os.link(sample_file, target)
    elif how == "symlink":
        target = sample_file.parent / "x_sym.npy"
        target.symlink_to(sample_file)
    assert_refused(capsys, ["run", model, "--input", sample_file, "--output", target],
                   "this command's input (--input)", model, sample_file.parent)


def test_eval_out_onto_a_stage_graph_is_refused(model, capsys):
    assert_refused(capsys, ["eval", model, "--out", model / "onnx/fp32/segment_0.onnx"],
                   "would overwrite", model)


@pytest.mark.parametrize("output", ["jsonl://{m}/manifest.json", "{m}/onnx/fp32/exit_0.onnx",
                                    "file://{m}/onnx/fp32/segment_1.onnx"])
def test_count_outputs_onto_the_model_are_refused(model, output, capsys):
    assert_refused(capsys, ["count", "synthetic://crowd", output.format(m=model), "--engines",
                            model, "--max-frames", "1"], "would overwrite", model)


@pytest.mark.parametrize("output", ["jsonl://{clip}", "file://{clip}", "--summary={clip}",
                                    "--summary={wav}"])
def test_count_outputs_onto_its_inputs_are_refused(model, tmp_path, output, capsys):
    clip, wav = tmp_path / "clip.mp4", tmp_path / "clip.wav"
    clip.write_bytes(b"not really a video")
    wav.write_bytes(b"not really audio")
    output = output.format(clip=clip, wav=wav)
    assert_refused(capsys, ["count", str(clip), output, "--audio", f"file://{wav}", "--engines",
                            model], "this command's input", model, tmp_path)


def test_count_summary_onto_the_manifest_is_refused(model, capsys):
    assert_refused(capsys, ["count", "synthetic://crowd", "--engines", model, "--summary",
                            model / "manifest.json"], "would overwrite", model)


def test_profile_out_into_the_onnx_folder_is_refused(model, capsys):
    assert_refused(capsys, ["profile", model, "--out", model / "onnx" / "fp32", "--samples", "1"],
                   "would overwrite", model)


# ------------------------------------------------------------------ item 5: before the work


def _read_only_dir(tmp_path) -> Path:
    """A folder this process cannot write: chmod 555 (as root, which ignores modes, /sys)."""
    if os.geteuid() == 0:
        return Path("/sys")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


@pytest.mark.parametrize("case", ["missing folder", "parent is a file", "read-only folder",
                                  "a folder", "/dev/null"])
def test_unwritable_outputs_fail_before_the_work(model, sample_file, tmp_path, case, capsys):
    target = {"missing folder": tmp_path / "nowhere" / "out.jsonl",
              "parent is a file": sample_file / "out.jsonl",
              "read-only folder": _read_only_dir(tmp_path) / "out.jsonl",
              "a folder": tmp_path,
              "/dev/null": Path("/dev/null")}[case]
    message = {"missing folder": "does not exist", "parent is a file": "is not a folder",
               "read-only folder": "cannot write in", "a folder": "is a folder; name a file",
               "/dev/null": "not a regular file"}[case]
    for args in (["run", model, "--input", sample_file, "--output", target],
                 ["eval", model, "--out", target],
                 ["count", "synthetic://crowd", "--engines", model, "--summary", target],
                 ["count", "synthetic://crowd", f"jsonl://{target}", "--engines", model]):
        assert_refused(capsys, args, message, model, sample_file.parent)
    assert not (tmp_path / "nowhere").exists()  # no folder created on the way


def test_tune_and_export_check_the_model_directory_first(model, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes into chmod-555 folders; the read-only check runs in "
                    "test_unwritable_outputs_fail_before_the_work via /sys")
    model.chmod(0o555)
    try:
        assert_refused(capsys, ["tune", model, "--repeats", "1"], "cannot write in", model)
        assert_refused(capsys, ["precision", model, "--precision", "fp16"], "cannot write in",
                       model)
    finally:
        model.chmod(0o755)


def test_export_into_an_unwritable_place(tmp_path, capsys, tiny_export):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_refused(capsys, ["export", "--out", blocker / "sub", "--checkpoint",
                            tiny_export / "checkpoint.safetensors"], "cannot create folder",
                   tiny_export)


def test_a_write_failure_is_one_line_and_leaves_the_target(tmp_path):
    target = tmp_path / "report.json"
    atomic_write_json(target, {"a": 1})
    with pytest.raises(OutputError, match=r"cannot write /proc/report.json"):
        atomic_write_json("/proc/report.json", {"a": 1})
    with pytest.raises(OutputError, match=r"at a\.b\[1\]"):
        atomic_write_json(target, {"a": {"b": [1.0, float("nan")]}})
    assert target.read_text() == '{\n  "a": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_the_check_accepts_ordinary_outputs(model, sample_file, tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    check_output_file(out, "--output", inputs=[("--input", sample_file)])
    status, err = cli(capsys, "run", model, "--input", sample_file, "--output", out)
    assert status == 0, err
    assert len(out.read_text().splitlines()) == 4
    report = model / "report.json"  # beside the model, not one of its files: allowed
    check_output_file(report, "--out")
    np.testing.assert_array_equal(np.load(sample_file).shape, (4, 1, 8, 8))


@pytest.mark.parametrize("experiment", [[], ["--dataset", "digits_c"],
                                        ["--dataset", "synthetic_av_crowd"]])
def test_experiment_checks_its_out_folder_before_training(tmp_path, experiment, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_refused(capsys, ["experiment", "--out", blocker / "sub", "--quick", *experiment],
                   "cannot create folder", tmp_path)
    assert_refused(capsys, ["experiment", "--out", blocker, "--quick", *experiment],
                   "is not a folder", tmp_path)
