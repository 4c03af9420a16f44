"""``trt-exit demo``: train, export, tune and evaluate one model end to end, in one directory.

It chains the steps of :mod:`trt_exit.workflow` and adds the FP16 / INT8 comparison of
:mod:`trt_exit.workflow_precision`; both are imported from here, neither imports this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from trt_exit.errors import ConfigError
from trt_exit.fileio import atomic_write_json
from trt_exit.runtime import DEFAULT_FLOOR_CONFIDENCE
from trt_exit.training.config import DEMO_TRAIN, MNIST_DEMO_TRAIN, TrainConfig
from trt_exit.workflow import (
    CHECKPOINT_NAME,
    REPORT_NAME,
    evaluate_step,
    evenly_spaced,
    export_step,
    train_step,
    tune_step,
)
from trt_exit.workflow_precision import PrecisionDemoConfig, precision_report


@dataclass(frozen=True)
class DemoPreset:
    """What the demo runs on one dataset.

    Attributes:
        model: Registered model config.
        train: Training budget (epochs, learning rate, batch size, augmentation).
        recipe: Training recipe on that budget (:mod:`trt_exit.training.recipes`): it sets the
            training phases and options and may replace the model's exits (ensembles).
        max_accuracy_drop_points: Tuning floor: accuracy points allowed below the final exit.
        tuning_samples: Tune thresholds on this many evenly spaced validation samples (None:
            all; the tuner's search grows faster than linearly with the samples).
        timing_samples: Time latency on this many evenly spaced test samples (None: all);
            accuracy always covers the whole test split.
        check_samples: Compare the single early-exit graph's decisions with the stages' (at
            batch 1 and as one batch) on this many evenly spaced test samples (None: all; on
            MNIST's 10,000 the check took about a minute of the demo for three precisions).
    """

    model: str
    train: TrainConfig
    recipe: str = "end_to_end"
    max_accuracy_drop_points: float = 0.5
    tuning_samples: int | None = None
    timing_samples: int | None = None
    check_samples: int | None = None


#: The demo's datasets: MNIST (the default; the README says why) and scikit-learn's digits.
DEMO_PRESETS = {
    "mnist": DemoPreset("multi_exit_vit_mnist", MNIST_DEMO_TRAIN,
                        recipe="end_to_end+distill+ensemble+calibrate",
                        max_accuracy_drop_points=0.25, tuning_samples=5000, timing_samples=500,
                        check_samples=2000),
    "digits": DemoPreset("multi_exit_vit_digits", DEMO_TRAIN),
}
DEMO_DATASET = "mnist"


@dataclass
class DemoConfig:
    """What ``trt-exit demo`` does (:meth:`for_dataset` fills in a dataset's preset; the plain
    constructor's defaults are the digits demo without a preset's subsets).

    Attributes:
        model: Registered model config.
        exits: Early exits replacing the model's (:class:`~trt_exit.models.ExitSpec` list).
        dataset: Registered dataset.
        dataset_options: Keyword options of the dataset loader (e.g. a directory).
        seed: Seed of the split, the initialization and training.
        train: Training recipe.
        checkpoint: A trained checkpoint to evaluate instead of training (e.g. an earlier demo's
            ``checkpoint.safetensors``); it must record the same dataset and seed.
        backend: Backend that runs the stages.
        precision: Precision of the evaluated graphs.
        max_accuracy_drop_points: Tuning floor: accuracy points allowed below the final exit.
        floor_confidence: Confidence level at which the floor must hold over the validation
            split's sampling noise (None: on the split itself); see
            :mod:`trt_exit.runtime.tuning`.
        latency_passes: Passes over the test split when timing (batch 1).
        profile_repeats: Timed runs per stage for the latency profile.
        tuning_samples: See :class:`DemoPreset`.
        timing_samples: See :class:`DemoPreset`.
        check_samples: See :class:`DemoPreset`.
        recipe: The recipe ``train`` and ``exits`` came from (recorded in the report).
    """

    model: str = "multi_exit_vit_digits"
    exits: list | None = None
    dataset: str = "digits"
    dataset_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    train: TrainConfig = field(default_factory=lambda: dataclasses.replace(DEMO_TRAIN))
    checkpoint: str | None = None
    backend: str = "onnxruntime"
    precision: str = "fp32"
    max_accuracy_drop_points: float = 0.5
    floor_confidence: float | None = DEFAULT_FLOOR_CONFIDENCE
    latency_passes: int = 1
    profile_repeats: int = 50
    tuning_samples: int | None = None
    timing_samples: int | None = None
    check_samples: int | None = None
    recipe: str | None = None

    @classmethod
    def for_dataset(cls, dataset: str, **changes: Any) -> "DemoConfig":
        """The demo on ``dataset`` (a key of :data:`DEMO_PRESETS`), with ``changes``."""
        from trt_exit.models.multi_exit import model_config
        from trt_exit.training.recipes import make_recipe

        if dataset not in DEMO_PRESETS:
            raise ConfigError(f"the demo runs on {' or '.join(DEMO_PRESETS)}, not {dataset!r}")
        preset = DEMO_PRESETS[dataset]
        recipe = make_recipe(preset.recipe, preset.train)
        exits = recipe.exits(model_config(preset.model).exits)
        fields = {"dataset": dataset, "model": preset.model, "train": recipe.train,
                  "exits": exits if recipe.ensemble else None, "recipe": preset.recipe,
                  "max_accuracy_drop_points": preset.max_accuracy_drop_points,
                  "tuning_samples": preset.tuning_samples,
                  "timing_samples": preset.timing_samples,
                  "check_samples": preset.check_samples}
        return cls(**{**fields, **changes})


class _Phases:
    """Wall time per phase of the demo, printed as each phase ends."""

    def __init__(self, say: Callable[[str], None]):
        self.seconds: dict[str, float] = {}
        self._say = say
        self._began = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start
        self._say(f"[demo] {name}: {self.seconds[name]:.1f} s "
                  f"(total {time.perf_counter() - self._began:.1f} s)")


def _checkpoint_extra(config: DemoConfig) -> dict[str, Any]:
    """What ``config.checkpoint`` records, checked against the demo's dataset and seed."""
    from trt_exit.models.checkpoint import read_metadata

    extra = read_metadata(config.checkpoint)["extra"]
    recorded = extra.get("dataset") or {}
    if (recorded.get("name"), recorded.get("seed")) != (config.dataset, config.seed):
        raise ConfigError(
            f"{config.checkpoint} was trained on dataset {recorded.get('name')!r} with seed "
            f"{recorded.get('seed')!r}, not {config.dataset!r} with seed {config.seed}: pass "
            f"the matching --seed, or train anew without --checkpoint")
    return extra


def _trained_model(config: DemoConfig, out_dir: Path, progress: bool):
    """``(model, splits, training record)``: trained now, or loaded from ``config.checkpoint``."""
    from trt_exit.models.checkpoint import load_checkpoint
    from trt_exit.workflow import load_splits

    if config.checkpoint is None:
        net, splits, history = train_step(out_dir, config.model, config.dataset, config.train,
                                          config.dataset_options, progress, config.exits)
        return net, splits, {"regime": config.train.regime, "epochs": config.train.epochs,
                             "seconds": history.seconds, "seed": config.seed}
    extra = _checkpoint_extra(config)
    recorded = extra["dataset"]
    net = load_checkpoint(config.checkpoint)
    splits = load_splits(config.dataset, config.seed, recorded.get("options") or config.dataset_options)
    train = extra.get("train") or {}
    return net, splits, {"regime": train.get("regime"), "epochs": train.get("epochs"),
                         "seconds": extra.get("seconds"), "seed": config.seed,
                         "reused_checkpoint": str(config.checkpoint)}


def run_demo(out_dir: str | os.PathLike, config: DemoConfig | None = None,
             progress: bool = True, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Trains (or loads a checkpoint), exports, tunes and evaluates in FP32, FP16 and INT8;
    writes ``report.json`` and returns the report. ``say`` gets one line per finished phase."""
    from trt_exit.profiling.environment import machine_info
    from trt_exit.training.trainer import evaluate

    config = config or DemoConfig()
    config.train = dataclasses.replace(config.train, seed=config.seed)
    if config.checkpoint is not None:
        _checkpoint_extra(config)  # a wrong checkpoint fails before anything is written
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    phase = _Phases(say)
    with phase("train" if config.checkpoint is None else "load checkpoint"):
        net, splits, training = _trained_model(config, out_dir, progress)
        torch_metrics = evaluate(net, splits["test"])
    dataset_info = {"name": config.dataset, "seed": config.seed, "options": config.dataset_options,
                    **splits["test"].info}
    with phase("export"):
        manifest = export_step(net, out_dir, splits, dataset_info, checkpoint=config.checkpoint)
    task = manifest.task
    max_loss = config.max_accuracy_drop_points / 100 if task == "classification" else None
    val = splits["val"]
    tune_set = val if config.tuning_samples is None else val.subset(
        evenly_spaced(len(val), config.tuning_samples))
    with phase("tune"):
        manifest = tune_step(manifest, tune_set, config.backend, config.precision, max_loss,
                             config.profile_repeats, floor_confidence=config.floor_confidence)
    with phase("evaluate"):
        report = evaluate_step(manifest, splits["test"], config.backend, config.precision,
                               config.latency_passes, timing_samples=config.timing_samples,
                               check_samples=config.check_samples)
    with phase("fp16 and int8"):
        report["precisions"] = precision_report(
            manifest, {**splits, "val": tune_set}, report, config.backend, max_loss, config.seed,
            config=PrecisionDemoConfig(timing_samples=config.timing_samples,
                                       check_samples=config.check_samples),
            floor_confidence=config.floor_confidence)
    report.update({
        "torch_test_metrics": torch_metrics,
        "parity_max_abs_diff": manifest.parity["fp32"]["max_output_diff"],
        "training": training,
        "dataset": dataset_info,
        "recipe": config.recipe,
        "tuning": {"split": splits["val"].name, "samples": len(tune_set),
                   "max_accuracy_drop_points": config.max_accuracy_drop_points,
                   "floor_confidence": config.floor_confidence,
                   "val_metric": manifest.tuning[config.precision]["best"]["metric"],
                   "val_final_metric": manifest.tuning[config.precision]["final_metric"]},
        "artifacts": {"manifest": "manifest.json", "checkpoint": CHECKPOINT_NAME,
                      "onnx": sorted(str(Path(s.onnx["fp32"].path)) for s in manifest.stages)},
        "machine": machine_info(),
        "phase_seconds": phase.seconds,
        "seconds": time.perf_counter() - began,
    })
    atomic_write_json(out_dir / REPORT_NAME, report)
    return report
