"""The command line, as a user runs it: real processes, real files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


def trt_exit(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trt_exit", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=900)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    """A short demo run on digits (2 epochs): the report format, not the accuracy, is under test
    here (tests/training/test_mnist.py runs the MNIST demo on a subset)."""
    out = tmp_path_factory.mktemp("demo") / "run"
    result = trt_exit("demo", "--out", str(out), "--dataset", "digits", "--epochs", "2",
                      "--passes", "1", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "speedup" in result.stdout and "final exit accuracy" in result.stdout
    return out


def test_demo_report_has_every_field(demo_dir):
    report = json.loads((demo_dir / "report.json").read_text())
    assert report["backend"] == "onnxruntime" and report["precision"] == "fp32"
    assert len(report["exits"]) == 4
    for entry in report["exits"]:
        assert {"index", "block", "type", "accuracy", "exit_fraction", "latency_ms"} <= set(entry)
        assert entry["latency_ms"] > 0
    assert [e["block"] for e in report["exits"]] == [2, 4, 6, 8]
    assert sum(e["exit_fraction"] for e in report["exits"]) == pytest.approx(1.0)
    early = report["early_exit"]
    assert {"accuracy", "mean_latency_ms", "full_latency_ms", "speedup", "thresholds"} <= set(early)
    assert early["speedup"] == pytest.approx(early["full_latency_ms"] / early["mean_latency_ms"])
    assert 0.0 <= report["final_accuracy"] <= 1.0
    assert report["parity_max_abs_diff"] <= 1e-4
    # the files it evaluated are left beside it, and they verify
    from trt_exit.manifest import Manifest

    manifest = Manifest.load(demo_dir, verify=True)
    assert manifest.thresholds() == early["thresholds"]
    # tuned with the floor held at the 0.95 level, and recorded as such
    assert report["tuning"]["floor_confidence"] == 0.95
    assert manifest.tuning["fp32"]["floor_confidence"] == 0.95
    assert (demo_dir / "checkpoint.safetensors").is_file()
    assert manifest.latency_profile["stages"].keys() == {s.name for s in manifest.stages}


def test_demo_reuses_a_checkpoint_and_times_its_phases(demo_dir, tmp_path):
    checkpoint = demo_dir / "checkpoint.safetensors"
    first = json.loads((demo_dir / "report.json").read_text())
    assert set(first["phase_seconds"]) == {"train", "export", "tune", "evaluate", "fp16 and int8"}
    out = tmp_path / "again"
    result = trt_exit("demo", "--out", str(out), "--checkpoint", str(checkpoint), "--passes", "1")
    assert result.returncode == 0, result.stderr
    assert "[demo] load checkpoint:" in result.stdout and "[demo] train:" not in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["training"]["reused_checkpoint"] == str(checkpoint)
    assert report["training"]["epochs"] == 2
    # The same weights: the same per-exit test accuracy as the run that trained them.
    assert report["torch_test_metrics"] == first["torch_test_metrics"]
    assert (out / "checkpoint.safetensors").read_bytes() == checkpoint.read_bytes()
    wrong = trt_exit("demo", "--out", str(tmp_path / "x"), "--checkpoint", str(checkpoint),
                     "--seed", "1")
    _assert_clean_failure(wrong, "trained on dataset 'digits' with seed 0")


def test_run_eval_and_tune_steps_on_the_demo_output(demo_dir, digits, tmp_path):
    x = tmp_path / "x.npy"
    np.save(x, digits["test"].inputs["image"][:5])
    result = trt_exit("run", str(demo_dir), "--input", str(x), "--policy", "fixed:1")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["exit"] for line in lines] == [1] * 5
    out = tmp_path / "eval.json"
    result = trt_exit("eval", str(demo_dir), "--passes", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text())["samples"] == 360
    from trt_exit.manifest import Manifest

    copy = tmp_path / "retuned"
    shutil.copytree(demo_dir, copy)
    result = trt_exit("tune", str(copy), "--floor-confidence", "0", "--repeats", "5")
    assert result.returncode == 0, result.stderr
    retuned = Manifest.load(copy, verify=True).tuning["fp32"]
    assert retuned["floor_confidence"] is None  # 0: the floor checked on the split itself
    assert retuned["best"]["metric"] >= retuned["final_metric"] - 0.005 - 1e-9


def _assert_clean_failure(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_input_file_fails_cleanly(demo_dir, tmp_path):
    _assert_clean_failure(trt_exit("run", str(demo_dir), "--input", str(tmp_path / "no.npy")),
                          "does not exist")
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((2, 1, 8, 8), np.float64))
    _assert_clean_failure(trt_exit("run", str(demo_dir), "--input", str(wrong)),
                          "dtype float64")
    nan = tmp_path / "nan.npy"
    np.save(nan, np.full((2, 1, 8, 8), np.nan, np.float32))
    _assert_clean_failure(trt_exit("run", str(demo_dir), "--input", str(nan)), "NaN or Inf")
    _assert_clean_failure(trt_exit("run", str(demo_dir), "--input", str(wrong), "--policy", "fixed:x"),
                          "bad policy")


def test_damaged_artifacts_fail_cleanly(demo_dir, tmp_path, digits):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(demo_dir, copy)
    x = tmp_path / "x.npy"
    np.save(x, digits["test"].inputs["image"][:2])
    path = copy / "onnx" / "fp32" / "segment_1.onnx"
    path.write_bytes(path.read_bytes()[:-10])
    _assert_clean_failure(trt_exit("run", str(copy), "--input", str(x)), "segment_1.onnx does not match")
    _assert_clean_failure(trt_exit("eval", str(tmp_path / "nowhere")), "no manifest at")


def test_unknown_names_fail_cleanly(tmp_path):
    _assert_clean_failure(trt_exit("train", "--out", str(tmp_path), "--model", "nope"),
                          "unknown model 'nope'")
    _assert_clean_failure(trt_exit("train", "--out", str(tmp_path), "--dataset", "nope"),
                          "unknown dataset 'nope'")


def test_help_lists_the_commands():
    result = trt_exit("--help")
    assert result.returncode == 0
    for command in ("demo", "train", "export", "tune", "eval", "run"):
        assert command in result.stdout


def test_unknown_exit_type_fails_cleanly(tmp_path):
    _assert_clean_failure(trt_exit("train", "--out", str(tmp_path), "--exits", "2:mlp,4:bogus",
                                   "--epochs", "1"),
                          "unknown exit type 'bogus'; known exit types:")
    _assert_clean_failure(trt_exit("train", "--out", str(tmp_path), "--exits", "two:mlp"),
                          "bad exit 'two:mlp'")


def test_help_does_not_import_torch():
    code = ("import sys, contextlib, io\n"
            "from trt_exit.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "    main(['--help'])\n"
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_unset_training_flags_keep_the_recipe():
    import argparse

    from trt_exit.commands.spine import _add_train_options, _train_config
    from trt_exit.training.config import TrainConfig

    parser = argparse.ArgumentParser()
    _add_train_options(parser, "a recipe")
    recipe = TrainConfig(epochs=250, lr=3e-3, label_smoothing=0.1)
    kept = _train_config(parser.parse_args([]), recipe)
    assert (kept.epochs, kept.lr, kept.label_smoothing) == (250, 3e-3, 0.1)
    changed = _train_config(parser.parse_args(["--epochs", "7", "--threads", "2"]), recipe)
    assert (changed.epochs, changed.num_threads, changed.lr) == (7, 2, 3e-3)


def test_dataset_options_parse_and_reject_bad_items():
    from trt_exit.commands.spine import parse_dataset_options
    from trt_exit.errors import ConfigError

    assert parse_dataset_options(["root=/data/disco", "rate=16000"]) == {
        "root": "/data/disco", "rate": "16000"}
    assert parse_dataset_options(None) == {}
    with pytest.raises(ConfigError, match="use KEY=VALUE"):
        parse_dataset_options(["root"])
