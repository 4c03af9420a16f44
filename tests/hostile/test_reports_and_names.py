"""Item 6 of issue 20: misleading reports and messages. `profile --batch 1000000000` recorded
that batch although 360 samples ran; a stage file under a name that is not valid UTF-8 gave a
multi-line pybind constructor dump."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from .conftest import assert_refused, cli


@pytest.mark.parametrize("batch", ["361", "1000000000"])
def test_profile_refuses_a_batch_larger_than_its_inputs(model, tmp_path, batch, capsys):
    line = assert_refused(capsys, ["profile", model, "--batch", batch, "--out", tmp_path / "p",
                                   "--samples", "2"], f"batch {batch} (--batch) is more than the "
                                                      f"360 input samples", model, tmp_path)
    assert "--input-samples" in line
    assert not (tmp_path / "p" / "profile.json").exists()


def test_profile_random_inputs_within_memory(model, tmp_path, capsys):
    """`--inputs random --input-samples 1000000000` asked numpy for 477 GiB (a traceback)."""
    assert_refused(capsys, ["profile", model, "--inputs", "random", "--input-samples",
                            "1000000000", "--out", tmp_path / "p"], "would take 238.4 GiB",
                   model, tmp_path)


def test_profile_records_the_batch_that_ran(model, tmp_path, capsys):
    status, err = cli(capsys, "profile", model, "--batch", "360", "--out", tmp_path / "p",
                      "--samples", "2", "--stage-repeats", "2", "--warmup", "0")
    assert status == 0, err
    report = json.loads((tmp_path / "p" / "profile.json").read_text())
    assert report["end_to_end"]["batch"] == 360
    assert sum(report["end_to_end"]["exit_histogram"]) == 2 * 360


def test_a_model_directory_whose_name_is_not_utf8(model, sample_file, tmp_path, capsys):
    """ONNX Runtime takes UTF-8 file names only; a Latin-1 folder name on a Linux disk gave a
    pybind11 'incompatible constructor arguments' dump. The graphs are read and handed over."""
    latin = os.fsdecode(os.fsencode(str(tmp_path)) + b"/mod\xe8le")
    shutil.copytree(model, latin)
    for where, name in ((latin, "latin.jsonl"), (model, "plain.jsonl")):
        status, err = cli(capsys, "run", where, "--input", sample_file, "--output",
                          tmp_path / name)
        assert status == 0, err
    assert (tmp_path / "latin.jsonl").read_text() == (tmp_path / "plain.jsonl").read_text()


def test_a_damaged_graph_is_one_short_line(model, sample_file, capsys):
    graph = model / "onnx" / "fp32" / "segment_0.onnx"
    graph.write_bytes(b"\x08\x07" + os.urandom(64))
    data = json.loads((model / "manifest.json").read_text())
    from trt_exit.fileio import sha256_file

    ref = data["stages"][0]["onnx"]["fp32"]
    ref.update(sha256=sha256_file(graph), bytes=graph.stat().st_size)
    (model / "manifest.json").write_text(json.dumps(data))
    line = assert_refused(capsys, ["run", model, "--input", sample_file], "segment_0", model)
    assert len(line) < 700
