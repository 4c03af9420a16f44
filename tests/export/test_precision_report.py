"""The demo's ``precisions`` section: FP32, FP16 and INT8 tuned and evaluated in one run."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from trt_exit.manifest import Manifest
from trt_exit.workflow import evaluate_step, format_report
from trt_exit.workflow_precision import PrecisionDemoConfig, precision_report


@pytest.mark.slow
def test_precision_report_measures_every_precision(tiny_tuned, digits, tmp_path):
    root = tmp_path / "model"
    shutil.copytree(tiny_tuned, root)
    manifest = Manifest.load(root)
    fp32_profile = dict(manifest.latency_profile)
    fp32_thresholds = manifest.thresholds()
    # Smaller val/test splits keep it quick; the demo runs the full ones.
    splits = {"train": digits["train"], "val": digits["val"].subset(np.arange(120)),
              "test": digits["test"].subset(np.arange(120))}
    fp32 = evaluate_step(manifest, splits["test"], passes=1, warmup=5)
    report = precision_report(manifest, splits, fp32, max_loss=0.02,
                              config=PrecisionDemoConfig(calibration_samples=64,
                                                         profile_repeats=5, warmup=5))
    for precision in ("fp32", "fp16", "int8"):
        section = report[precision]
        assert len(section["exits"]) == manifest.num_exits
        assert 0.0 <= section["final_accuracy"] <= 1.0
        point = section["early_exit"]
        assert set(point) >= {"accuracy", "mean_latency_ms", "full_latency_ms", "speedup",
                              "thresholds"}
        assert point["mean_latency_ms"] > 0 and len(point["thresholds"]) == manifest.num_exits - 1
    assert report["fp32"]["final_accuracy"] == fp32["final_accuracy"]
    assert report["fp16"]["final_accuracy_drop_points"] == pytest.approx(
        100 * (fp32["final_accuracy"] - report["fp16"]["final_accuracy"]))
    assert report["calibration"]["samples"] == 64
    saved = Manifest.load(root, verify=True)
    assert saved.precisions() == ["fp32", "fp16", "int8"]
    assert set(saved.tuning) >= {"fp32", "fp16", "int8"}
    assert saved.tuning["int8"]["floor_confidence"] == 0.95  # the default, as for FP32
    # FP32 stays the default: its thresholds and latency profile are untouched.
    assert saved.thresholds() == fp32_thresholds
    assert saved.latency_profile["precision"] == fp32_profile["precision"] == "fp32"


def test_evaluate_step_can_skip_timing_each_exit(tiny_tuned, digits):
    """The precision report times only the early-exit policy and the baseline."""
    manifest = Manifest.load(tiny_tuned)
    test = digits["test"].subset(np.arange(20))
    report = evaluate_step(manifest, test, passes=1, warmup=2, time_each_exit=False)
    assert [e["latency_ms"] for e in report["exits"]] == [None] * manifest.num_exits
    assert report["early_exit"]["mean_latency_ms"] > 0 and report["early_exit"]["full_latency_ms"] > 0
    timed = evaluate_step(manifest, test, passes=1, warmup=2)
    assert all(e["latency_ms"] > 0 for e in timed["exits"])
    assert [e["accuracy"] for e in timed["exits"]] == [e["accuracy"] for e in report["exits"]]
    # the report still prints, with the untimed latencies as "-" and the rows aligned as before
    rows = format_report(report).splitlines()[3 : 3 + manifest.num_exits]
    timed_rows = format_report(timed).splitlines()[3 : 3 + manifest.num_exits]
    assert [r.split()[5] for r in rows] == ["-"] * manifest.num_exits
    assert [len(r) for r in rows] == [len(r) for r in timed_rows]


def test_the_single_graph_check_covers_the_split_or_the_subset_asked_for(tiny_tuned, digits):
    """The demo compares the single graph's decisions with the stages' on a subset (MNIST's
    10,000 test samples cost a minute); accuracy still covers the whole split."""
    manifest = Manifest.load(tiny_tuned)
    test = digits["test"].subset(np.arange(40))
    whole = evaluate_step(manifest, test, passes=1, warmup=2, time_each_exit=False)
    part = evaluate_step(manifest, test, passes=1, warmup=2, time_each_exit=False,
                         check_samples=7)
    assert whole["single_graph"]["same_exit_and_prediction"] == {
        "samples": 40, "batch_1": 40, "one_batch": 40}
    assert part["single_graph"]["same_exit_and_prediction"] == {
        "samples": 7, "batch_1": 7, "one_batch": 7}
    assert part["final_accuracy"] == whole["final_accuracy"] and part["samples"] == 40
