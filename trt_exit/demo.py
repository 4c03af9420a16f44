"""``trt-exit demo``: train, export, tune and evaluate one model end to end, in one directory.

It chains the steps of :mod:`trt_exit.workflow` and adds the FP16 / INT8 comparison of
:mod:`trt_exit.workflow_precision`; both are imported from here, neither imports this module.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trt_exit.fileio import atomic_write_json
from trt_exit.training.config import DEMO_TRAIN, TrainConfig
from trt_exit.workflow import CHECKPOINT_NAME, REPORT_NAME, evaluate_step, export_step, train_step, tune_step
from trt_exit.workflow_precision import precision_report


@dataclass
class DemoConfig:
    """What ``trt-exit demo`` does.

    Attributes:
        model: Registered model config.
        exits: Early exits replacing the model's (:class:`~trt_exit.models.ExitSpec` list).
        dataset: Registered dataset.
        dataset_options: Keyword options of the dataset loader (e.g. a directory).
        seed: Seed of the split, the initialization and training.
        train: Training recipe.
        backend: Backend that runs the stages.
        precision: Precision of the evaluated graphs.
        max_accuracy_drop_points: Tuning floor: accuracy points allowed below the final exit.
        latency_passes: Passes over the test split when timing (batch 1).
        profile_repeats: Timed runs per stage for the latency profile.
    """

    model: str = "multi_exit_vit_digits"
    exits: list | None = None
    dataset: str = "digits"
    dataset_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    train: TrainConfig = field(default_factory=lambda: dataclasses.replace(DEMO_TRAIN))
    backend: str = "onnxruntime"
    precision: str = "fp32"
    max_accuracy_drop_points: float = 0.5
    latency_passes: int = 3
    profile_repeats: int = 200



def run_demo(out_dir: str | os.PathLike, config: DemoConfig | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Trains, exports, tunes and evaluates; writes ``report.json`` and returns the report."""
    import time

    from trt_exit.profiling.environment import machine_info
    from trt_exit.training.trainer import evaluate

    config = config or DemoConfig()
    config.train = dataclasses.replace(config.train, seed=config.seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    net, splits, history = train_step(out_dir, config.model, config.dataset, config.train,
                                      config.dataset_options, progress, config.exits)
    torch_metrics = evaluate(net, splits["test"])
    dataset_info = {"name": config.dataset, "seed": config.seed, "options": config.dataset_options,
                    **splits["test"].info}
    manifest = export_step(net, out_dir, splits, dataset_info)
    task = manifest.task
    max_loss = config.max_accuracy_drop_points / 100 if task == "classification" else None
    manifest = tune_step(manifest, splits["val"], config.backend, config.precision, max_loss,
                         config.profile_repeats)
    report = evaluate_step(manifest, splits["test"], config.backend, config.precision,
                           config.latency_passes)
    report["precisions"] = precision_report(manifest, splits, report, config.backend, max_loss,
                                            config.seed)
    report.update({
        "torch_test_metrics": torch_metrics,
        "parity_max_abs_diff": manifest.parity["fp32"]["max_output_diff"],
        "training": {"regime": config.train.regime, "epochs": config.train.epochs,
                     "seconds": history.seconds, "seed": config.seed},
        "dataset": dataset_info,
        "tuning": {"split": splits["val"].name,
                   "max_accuracy_drop_points": config.max_accuracy_drop_points,
                   "val_metric": manifest.tuning[config.precision]["best"]["metric"],
                   "val_final_metric": manifest.tuning[config.precision]["final_metric"]},
        "artifacts": {"manifest": "manifest.json", "checkpoint": CHECKPOINT_NAME,
                      "onnx": sorted(str(Path(s.onnx["fp32"].path)) for s in manifest.stages)},
        "machine": machine_info(),
        "seconds": time.perf_counter() - began,
    })
    atomic_write_json(out_dir / REPORT_NAME, report)
    return report
