"""The demo's precision comparison: the FP32, FP16 and INT8 graphs of one model, measured alike.

After the demo has tuned and evaluated the FP32 graphs, :func:`precision_report` draws a
calibration set from the training split, writes the FP16 and INT8 graphs
(:mod:`trt_exit.export.precision`), tunes thresholds for each on the validation split
(``manifest.tuning[precision]``, the FP32 thresholds stay the default) and evaluates each on the
test split, all with the same backend (ONNX Runtime on the CPU) in the same run. Latency is
timed with fewer passes than FP32's (it is the accuracy that this comparison is for: on a CPU
ONNX Runtime computes most FP16 operators in FP32 between FP16 tensors, and INT8 speed depends
on the CPU's integer instructions, so CPU latency says little about a GPU).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from trt_exit.manifest import Manifest
from trt_exit.runtime import DEFAULT_FLOOR_CONFIDENCE


@dataclass
class PrecisionDemoConfig:
    """How the demo measures the low-precision graphs.

    Attributes:
        calibration_samples: INT8 calibration set size (from the training split).
        profile_repeats: Timed runs per stage when tuning each precision.
        latency_passes: Timed passes over the test split per precision.
        warmup: Untimed samples per policy before timing.
        timing_samples: Time latency on this many evenly spaced test samples (None: all);
            accuracy covers the whole split.
        check_samples: Compare the single graph's decisions with the stages' on this many
            evenly spaced test samples (None: all).
    """

    calibration_samples: int = 256
    profile_repeats: int = 50
    latency_passes: int = 1
    warmup: int = 20
    timing_samples: int | None = None
    check_samples: int | None = None


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    metric = report["metric"]
    ee = report["early_exit"]
    return {
        "exits": [e[metric] for e in report["exits"]],
        f"final_{metric}": report[f"final_{metric}"],
        "early_exit": {metric: ee[metric], "mean_latency_ms": ee["mean_latency_ms"],
                       "full_latency_ms": ee["full_latency_ms"], "speedup": ee["speedup"],
                       "thresholds": ee["thresholds"], "exit_fractions": ee["exit_fractions"]},
        "latency_passes": report["latency"]["passes"],
        "single_graph": report.get("single_graph"),
    }


def precision_report(manifest: Manifest, splits: dict, fp32_report: dict[str, Any],
                     backend: str = "onnxruntime", max_loss: float | None = None, seed: int = 0,
                     config: PrecisionDemoConfig | None = None,
                     floor_confidence: float | None = DEFAULT_FLOOR_CONFIDENCE) -> dict[str, Any]:
    """FP16 and INT8 graphs of ``manifest``, tuned and evaluated like the FP32 ones.

    Args:
        manifest: The exported, FP32-tuned model (updated: new graphs, calibration set, tuning).
        splits: ``train`` (calibration), ``val`` (tuning) and ``test`` (evaluation) datasets.
        fp32_report: The demo's FP32 evaluation (:func:`trt_exit.workflow.evaluate_step`).
        backend: Backend that runs every precision.
        max_loss: Tuning floor, as for FP32.
        seed: Seed of the calibration draw.
        config: Calibration size and timing effort.
        floor_confidence: As for FP32 (see :func:`trt_exit.workflow.tune_step`).

    Returns:
        ``{"fp32": ..., "fp16": ..., "int8": ...}`` each with per-exit metrics, the final exit's
        and the tuned early-exit point (metric, mean and baseline latency, speedup,
        thresholds), plus how it was measured.
    """
    from trt_exit.export import calibration as calib
    from trt_exit.export.precision import create_precision_graphs
    from trt_exit.workflow import evaluate_step, tune_step

    config = config or PrecisionDemoConfig()
    began = time.perf_counter()
    metric = fp32_report["metric"]
    calibration = calib.from_dataset(splits["train"], config.calibration_samples, seed)
    create_precision_graphs(manifest, ("fp16", "int8"), calibration)
    results: dict[str, Any] = {"fp32": _summary(fp32_report)}
    final = f"final_{metric}"
    try:
        for precision in ("fp16", "int8"):
            tune_step(manifest, splits["val"], backend, precision, max_loss,
                      config.profile_repeats, apply=False, floor_confidence=floor_confidence)
            # The summary keeps the early-exit and baseline latencies: only those are timed.
            report = evaluate_step(manifest, splits["test"], backend, precision,
                                   config.latency_passes, config.warmup, time_each_exit=False,
                                   timing_samples=config.timing_samples,
                                   check_samples=config.check_samples)
            results[precision] = _summary(report)
            change = report[final] - fp32_report[final]
            results[precision][f"{final}_change_vs_fp32"] = change
            if metric == "accuracy":
                results[precision]["final_accuracy_drop_points"] = round(-100.0 * change, 6) + 0.0
    finally:
        manifest.save()
    results["int8"]["settings"] = manifest.export["precisions"]["int8"]["settings"]
    return {
        **results,
        "backend": fp32_report["backend"],
        "split": fp32_report["split"],
        "calibration": {k: manifest.calibration[k] for k in ("samples", "origin")},
        "note": ("all precisions measured with the same backend in the same run; FP16/INT8 "
                 "latency on a CPU is no guide to a GPU (ONNX Runtime runs most FP16 operators "
                 "in FP32 on the CPU)"),
        "seconds": time.perf_counter() - began,
    }
