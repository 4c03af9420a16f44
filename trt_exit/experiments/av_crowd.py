"""Audiovisual crowd counting: do exits that hear count better when the picture is poor?

DISCO's premise (Hu et al. 2020), which SL-ViT's audiovisual exits build on: sound carries
evidence of how many people there are, and it matters most when the image is degraded (dark,
blurred, occluded). This module tests it on the generated ``synthetic_av_crowd`` set, and builds
small trained audiovisual models for other parts' tests.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from trt_exit.experiments import finish_results
from trt_exit.manifest import Manifest
from trt_exit.training.datasets import Dataset

#: Split sizes (train, val, test) of :func:`build_tiny_av_export`.
TINY_EXPORT_SAMPLES = (160, 48, 48)


def build_tiny_av_export(out_dir: str | os.PathLike, seed: int = 0,
                         samples: tuple[int, int, int] = TINY_EXPORT_SAMPLES,
                         epochs: int = 6) -> Manifest:
    """Trains ``multi_exit_av_crowd_tiny_test`` for a few seconds, exports and tunes it.

    A real audiovisual manifest for tests of everything downstream of export (executor, live
    pipeline): inputs ``image`` and ``audio``, ``preprocessing`` with both recipes, an
    audio-only exit, a visual-only exit and an audiovisual final head, thresholds tuned on the
    val split with ONNX Runtime. The model is barely trained: its counts are rough.

    Args:
        out_dir: Directory for ``manifest.json``, ``onnx/`` and the checkpoint.
        seed: Seed of the data, the initialization and training.
        samples: Train / val / test sizes of the generated data.
        epochs: Training epochs.

    Returns:
        The tuned manifest (saved in ``out_dir``).
    """
    from trt_exit.models import create_model
    from trt_exit.training.crowd_datasets import load_synthetic_av_crowd
    from trt_exit.training.trainer import TrainConfig, seed_everything, train
    from trt_exit.workflow import export_step, tune_step

    train_n, val_n, test_n = samples
    splits = load_synthetic_av_crowd(seed=seed, train=train_n, val=val_n, test=test_n)
    seed_everything(seed)
    model = create_model("multi_exit_av_crowd_tiny_test")
    train(model, splits["train"],
          TrainConfig(epochs=epochs, lr=3e-3, batch_size=32, warmup_epochs=1, augment_shift_px=0,
                      seed=seed, num_threads=1),
          progress=False)
    dataset_info: dict[str, Any] = {
        "name": "synthetic_av_crowd", "seed": seed,
        "options": {"train": train_n, "val": val_n, "test": test_n}}
    manifest = export_step(model, Path(out_dir), splits, dataset_info)
    return tune_step(manifest, splits["val"], profile_repeats=10, floor_confidence=None)


# --------------------------------------------------------------------------- the experiment

MODALITY_PLOT = "mae_by_modality.png"
CONFIDENCE_PLOT = "confidence_risk_coverage.png"
EXITS_PLOT = "exit_fractions_by_condition.png"

#: Image conditions of the test split, in report order ("degraded" = the three together).
CONDITIONS = ("clean", "dark", "blur", "occluded", "degraded", "all")


@dataclass
class AVExperimentConfig:
    """What :func:`run_av_experiment` does.

    Attributes:
        seed: Seed of the data, every initialization and training run.
        samples: Train / val / test sizes of ``synthetic_av_crowd``.
        degraded_fraction: Share of scenes with a degraded image.
        embed_dim: Backbone width of the modality comparison (as ``multi_exit_av_crowd``).
        depth: Backbone blocks.
        num_heads: Backbone attention heads.
        patch_size: Image patch side.
        exit_dim: Width of every exit's encoder layer.
        audio_patch: (mel bands, frames) per audio patch of the exits.
        exit_blocks: Positions (blocks run) where the compared exits sit.
        backbone_epochs: Epochs training backbone + visual final head.
        exit_epochs: Epochs training each modality's exits (backbone frozen).
        deploy_model: Registered model trained end to end, exported, tuned and evaluated.
        deploy_epochs: Its training epochs.
        batch_size: Samples per step.
        lr: Peak AdamW learning rate.
        augment_shift_px: Random image translation in training (pixels).
        num_threads: torch threads (1: small models on shared cores).
        profile_repeats: Timed runs per stage when tuning.
        latency_passes: Timed passes over the test split when evaluating the deployed model.
    """

    seed: int = 0
    samples: tuple[int, int, int] = (1600, 400, 600)
    degraded_fraction: float = 0.5
    embed_dim: int = 64
    depth: int = 6
    num_heads: int = 4
    patch_size: int = 16
    exit_dim: int = 64
    audio_patch: tuple[int, int] = (8, 8)
    exit_blocks: tuple[int, ...] = (2, 4)
    backbone_epochs: int = 30
    exit_epochs: int = 20
    deploy_model: str = "multi_exit_av_crowd"
    deploy_epochs: int = 30
    batch_size: int = 32
    lr: float = 2e-3
    augment_shift_px: int = 4
    num_threads: int = 1
    profile_repeats: int = 100
    latency_passes: int = 1


def quick_config(seed: int = 0) -> AVExperimentConfig:
    """Smoke-test size (about a minute): tiny models, a few epochs; numbers mean nothing."""
    return AVExperimentConfig(
        seed=seed, samples=(128, 48, 96), embed_dim=16, depth=3, num_heads=2, exit_dim=16,
        audio_patch=(8, 16), exit_blocks=(1, 2), backbone_epochs=2, exit_epochs=2,
        deploy_model="multi_exit_av_crowd_tiny_test", deploy_epochs=2, profile_repeats=5)


def _train_config(config: AVExperimentConfig, epochs: int, regime: str) -> Any:
    from trt_exit.training.trainer import TrainConfig

    return TrainConfig(regime=regime, epochs=epochs, batch_size=config.batch_size, lr=config.lr,
                       warmup_epochs=min(2, epochs), augment_shift_px=config.augment_shift_px,
                       seed=config.seed, num_threads=config.num_threads)


def _model_config(config: AVExperimentConfig, name: str, exits: list[tuple[int, str]]):
    from trt_exit.models.audiovisual import av_crowd_config

    return av_crowd_config(name, embed_dim=config.embed_dim, depth=config.depth,
                           num_heads=config.num_heads, patch_size=config.patch_size, exits=exits,
                           head_modality="visual", exit_dim=config.exit_dim,
                           audio_patch=tuple(config.audio_patch))


def condition_masks(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean masks of every condition in :data:`CONDITIONS` for per-sample labels
    (``"clean"`` or a degradation)."""
    masks = {name: labels == name for name in CONDITIONS[:4]}
    masks["degraded"] = labels != "clean"
    masks["all"] = np.ones(len(labels), dtype=bool)
    return masks


def mae_by_condition(predictions: np.ndarray, targets: np.ndarray,
                     labels: np.ndarray) -> dict[str, float]:
    """MAE (persons) of (N,) predictions in every condition (NaN where a condition is empty)."""
    errors = np.abs(np.asarray(predictions).reshape(-1) - np.asarray(targets).reshape(-1))
    return {name: float(errors[mask].mean()) if mask.any() else float("nan")
            for name, mask in condition_masks(labels).items()}


def risk_coverage(confidence: np.ndarray, errors: np.ndarray,
                  coverages: np.ndarray) -> list[float]:
    """MAE of the ``coverage`` most confident samples, for each coverage in (0, 1]."""
    order = np.argsort(-np.asarray(confidence), kind="stable")
    sorted_errors = np.asarray(errors)[order]
    counts = np.maximum(1, np.round(coverages * len(errors)).astype(int))
    return [float(sorted_errors[:c].mean()) for c in counts]


def confidence_quality(outputs: np.ndarray, confidences: np.ndarray, targets: np.ndarray,
                       seed: int) -> list[dict[str, Any]]:
    """How well each exit's confidence ranks its own errors.

    For every exit: Spearman's rho between confidence and -|error| (1 = perfect ranking), the
    mean predicted error b against the measured MAE (calibration), and risk-coverage curves
    (MAE of the most confident fraction) for the confidence, for a random order, and for the
    oracle order (by the true error), with their means over coverage (lower is better).
    """
    from scipy.stats import spearmanr

    coverages = np.linspace(0.1, 1.0, 10)
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(outputs.shape[0]):
        errors = np.abs(outputs[k, :, 0] - targets.reshape(-1))
        predicted_b = np.exp(outputs[k, :, -1])
        rho = spearmanr(confidences[k], -errors).statistic
        curves = {
            "predicted_error": risk_coverage(confidences[k], errors, coverages),
            "random": risk_coverage(rng.random(len(errors)), errors, coverages),
            "oracle": risk_coverage(-errors, errors, coverages),
        }
        rows.append({
            "exit": k,
            "spearman_confidence_vs_neg_error": float(rho),
            "mae": float(errors.mean()),
            "mean_predicted_error": float(predicted_b.mean()),
            "median_predicted_error": float(np.median(predicted_b)),
            "coverages": [float(c) for c in coverages],
            "risk_coverage": curves,
            "mean_risk": {name: float(np.mean(curve)) for name, curve in curves.items()},
        })
    return rows


def _compare_modalities(config: AVExperimentConfig, splits: dict[str, Dataset],
                        labels: dict[str, np.ndarray], say: Callable[[str], None],
                        progress: bool) -> dict[str, Any]:
    """Trains the visual backbone once, then each modality's exits on it (frozen)."""
    from trt_exit.models.exits.av_slvit import MODALITIES
    from trt_exit.models.flops import model_costs
    from trt_exit.models.multi_exit import build_model
    from trt_exit.training.trainer import (
        CLASSIFIER_WISE,
        END_TO_END,
        predict_exits,
        seed_everything,
        train,
    )

    seed_everything(config.seed)
    base = build_model(_model_config(config, "av_crowd_visual_backbone", []))
    backbone_train = _train_config(config, config.backbone_epochs, END_TO_END)
    history = train(base, splits["train"], backbone_train, progress=progress)
    final = {split: mae_by_condition(predict_exits(base, splits[split])[-1][:, 0],
                                     splits[split].targets, labels[split])
             for split in ("val", "test")}
    # Progress lines show val numbers: design decisions are made on val, never on test.
    say(f"backbone + visual final head: val MAE {final['val']['all']:.2f} "
        f"(clean {final['val']['clean']:.2f}, degraded {final['val']['degraded']:.2f}; "
        f"{history.seconds:.0f} s)")
    rows = []
    exit_train = _train_config(config, config.exit_epochs, CLASSIFIER_WISE)
    for modality in MODALITIES:
        seed_everything(config.seed)
        model = build_model(_model_config(
            config, f"av_crowd_{modality}_exits", [(b, modality) for b in config.exit_blocks]))
        model.backbone.load_state_dict(base.backbone.state_dict())
        model.exits[-1].load_state_dict(base.exits[-1].state_dict())
        record = train(model, splits["train"], exit_train, progress=progress)
        costs = model_costs(model)
        outputs = {split: predict_exits(model, splits[split]) for split in ("val", "test")}
        for k, block in enumerate(config.exit_blocks):
            rows.append({
                "modality": modality, "after_block": block,
                "test_mae": mae_by_condition(outputs["test"][k][:, 0], splits["test"].targets,
                                             labels["test"]),
                "val_mae": mae_by_condition(outputs["val"][k][:, 0], splits["val"].targets,
                                            labels["val"]),
                "exit_params": costs["exits"][k]["params"],
                "exit_flops": costs["exits"][k]["flops"],
                "cumulative_flops": costs["exits"][k]["cumulative_flops"],
            })
        say(f"{modality:<11} exits: val MAE degraded "
            + " ".join(f"b{r['after_block']}:{r['val_mae']['degraded']:.2f}"
                       for r in rows[-len(config.exit_blocks):])
            + " clean " + " ".join(f"b{r['after_block']}:{r['val_mae']['clean']:.2f}"
                                   for r in rows[-len(config.exit_blocks):])
            + f" ({record.seconds:.0f} s)")
    base_costs = model_costs(base)
    return {
        "backbone": {"embed_dim": config.embed_dim, "depth": config.depth,
                     "patch_size": config.patch_size, "params": base_costs["backbone_params"],
                     "train": dataclasses.asdict(backbone_train), "seconds": history.seconds},
        "final_head": {"modality": "visual", "test_mae": final["test"], "val_mae": final["val"],
                       "flops": base_costs["exits"][-1]["cumulative_flops"]},
        "exit_train": dataclasses.asdict(exit_train),
        "rows": rows,
    }


def _deploy(config: AVExperimentConfig, splits: dict[str, Dataset],
            labels: dict[str, np.ndarray], out_dir: Path, say: Callable[[str], None],
            progress: bool) -> dict[str, Any]:
    """Trains the registered AV model end to end; exports, tunes and evaluates it (ONNX
    Runtime, batch 1), and measures how well its confidences rank its errors."""
    from trt_exit.models import create_model
    from trt_exit.runtime.executor import Executor
    from trt_exit.runtime.policies import AllExitsPolicy
    from trt_exit.training.trainer import END_TO_END, seed_everything, train
    from trt_exit.workflow import evaluate_step, export_step, tune_step

    seed_everything(config.seed)
    model = create_model(config.deploy_model)
    deploy_train = _train_config(config, config.deploy_epochs, END_TO_END)
    history = train(model, splits["train"], deploy_train, progress=progress)
    dataset_info = {"name": "synthetic_av_crowd", "seed": config.seed,
                    "options": dict(zip(("train", "val", "test"), config.samples))}
    manifest = export_step(model, out_dir, splits, dataset_info)
    # The floor checked on the split itself, as when docs/audiovisual.md's results were measured.
    manifest = tune_step(manifest, splits["val"], profile_repeats=config.profile_repeats,
                         floor_confidence=None)
    report = evaluate_step(manifest, splits["test"], passes=config.latency_passes)
    test = splits["test"]
    with Executor(manifest, "onnxruntime") as executor:
        everything = executor.run(test.inputs, AllExitsPolicy())
        early = executor.run(test.inputs)
    masks = condition_masks(labels["test"])
    exits_by_condition = {
        name: [float(f) for f in np.bincount(early.exit_index[mask], minlength=manifest.num_exits)
               / max(int(mask.sum()), 1)]
        for name, mask in masks.items()}
    per_exit = [mae_by_condition(everything.all_outputs[k, :, 0], test.targets, labels["test"])
                for k in range(manifest.num_exits)]
    say(f"deployed {config.deploy_model}: test MAE by exit "
        + " ".join(f"{m['all']:.2f}" for m in per_exit)
        + f"; early exit {report['early_exit']['mae']:.2f} at "
        + f"{report['early_exit']['latency_ratio']:.2f}x the no-exit latency")
    return {
        "model": config.deploy_model,
        "train": dataclasses.asdict(deploy_train),
        "train_seconds": history.seconds,
        "exit_modalities": [e.options.get("modality") for e in manifest.exits],
        "exit_blocks": [e.after_block for e in manifest.exits],
        "test_mae_by_exit": per_exit,
        "early_exit": {
            "test_mae": mae_by_condition(early.output[:, 0], test.targets, labels["test"]),
            "exit_fractions_by_condition": exits_by_condition,
            "thresholds": manifest.thresholds(),
        },
        "report": report,
        "confidence": confidence_quality(everything.all_outputs, everything.all_confidences,
                                         test.targets, config.seed),
        "manifest": str(Path(manifest.path).name),
    }


def run_av_experiment(out_dir: Path, seed: int = 0, quick: bool = False,
                      config: AVExperimentConfig | None = None, progress: bool = False,
                      log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Audio-only vs visual-only vs audiovisual exits at the same positions, degraded images.

    Protocol:

    1. ``synthetic_av_crowd`` splits (default 1,600 / 400 / 600, half the images degraded:
       dark, blurred or occluded in equal shares).
    2. A conv-stem ViT backbone (as ``multi_exit_av_crowd``: width 64, 6 blocks) is trained
       from scratch with a *visual* final head only, so its features owe nothing to the audio.
    3. For each modality (audio, visual, audiovisual), fresh ``av_slvit`` exits of that
       modality after blocks 2 and 4 are trained on the frozen backbone, classifier-wise, with
       the same seed and epochs. Exits of one model do not interact (each has its own
       parameters), so one model per modality serves both positions.
    4. Every exit's MAE on the test split, per image condition (clean, dark, blur, occluded,
       all degraded, all), with parameters and FLOPs (PyTorch's FlopCounterMode). Val MAEs are
       recorded too (design decisions were made on val).
    5. The registered ``multi_exit_av_crowd`` (audiovisual exits and head) trained end to end,
       exported per stage, thresholds tuned on val, evaluated on test with ONNX Runtime at
       batch 1; how well the ``predicted_error`` confidence ranks each exit's errors (Spearman,
       risk-coverage against random and oracle orders); exits taken per image condition.

    Args:
        out_dir: Output directory: ``results.json``, PNG plots, and the deployed model
            (``deploy/``: manifest, ONNX graphs, checkpoint).
        seed: Seed of everything.
        quick: Smoke-test size (:func:`quick_config`); numbers mean nothing.
        config: Overrides ``seed`` and ``quick`` when given.
        progress: Show training progress bars.
        log: Called with one line per finished step (default: print, flushed).

    Returns:
        The results (the content of ``results.json``).
    """
    from trt_exit.training.crowd_datasets import load_synthetic_av_crowd, plan_scenes

    config = config or (quick_config(seed) if quick else AVExperimentConfig(seed=seed))
    say = log or (lambda line: print(line, flush=True))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    began = time.perf_counter()
    train_n, val_n, test_n = config.samples
    splits = load_synthetic_av_crowd(seed=config.seed, train=train_n, val=val_n, test=test_n,
                                     degraded_fraction=config.degraded_fraction)
    labels = {split: plan_scenes(config.seed, split, size, config.degraded_fraction)
              .degradation_labels()
              for split, size in zip(("train", "val", "test"), config.samples)}
    say(f"synthetic_av_crowd: {train_n} / {val_n} / {test_n} scenes "
        f"({time.perf_counter() - began:.0f} s)")
    comparison = _compare_modalities(config, splits, labels, say, progress)
    deployed = _deploy(config, splits, labels, out_dir / "deploy", say, progress)
    test_targets = splits["test"].targets
    results = {
        "experiment": "av_crowd",
        "command": f"trt-exit experiment --dataset synthetic_av_crowd --seed {config.seed}"
                   + (" --quick" if quick and config == quick_config(seed) else "")
                   + f" --out {out_dir}",
        "quick": bool(quick),
        "config": dataclasses.asdict(config),
        "dataset": {"name": "synthetic_av_crowd", **splits["test"].info,
                    "samples": list(config.samples),
                    "test_conditions": {name: int(mask.sum()) for name, mask in
                                        condition_masks(labels["test"]).items()},
                    "test_constant_mae": float(np.abs(
                        test_targets - np.median(splits["train"].targets)).mean())},
        "protocol": {
            "backbone": "ViT trained from scratch with a visual-only final head (no audio)",
            "exits": "per modality, fresh av_slvit exits after each compared block, trained "
                     "classifier-wise on the frozen backbone (same seed and epochs)",
            "metric": "mean absolute error of the count (persons), test split, per condition",
            "flops": "per sample, 2 x multiply-accumulates of matmuls and convolutions "
                     "(torch.utils.flop_counter.FlopCounterMode)",
            "deployed": "registered AV model trained end to end, exported per stage, "
                        "thresholds tuned on val (MAE within 5% of the final exit's), "
                        "ONNX Runtime fp32 at batch 1",
        },
        "modalities": comparison,
        "deployed": deployed,
    }
    return finish_results(results, out_dir, began, write_plots, say)


def write_plots(results: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """MAE by modality and condition per exit position; the confidence's risk-coverage curves;
    exits taken per condition by the deployed model."""
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    written = []
    comparison = results["modalities"]
    blocks = sorted({r["after_block"] for r in comparison["rows"]})
    modalities = list(dict.fromkeys(r["modality"] for r in comparison["rows"]))
    conditions = CONDITIONS[:5]
    figure = Figure(figsize=(6.0 * len(blocks), 4.4), layout="constrained")
    axes = figure.subplots(1, len(blocks), squeeze=False)[0]
    width = 0.8 / len(modalities)
    x = np.arange(len(conditions))
    for ax, block in zip(axes, blocks):
        for i, modality in enumerate(modalities):
            row = next(r for r in comparison["rows"]
                       if r["modality"] == modality and r["after_block"] == block)
            ax.bar(x + (i - (len(modalities) - 1) / 2) * width,
                   [row["test_mae"][c] for c in conditions], width, label=f"{modality} exit")
        final = comparison["final_head"]["test_mae"]
        ax.plot(x, [final[c] for c in conditions], "k*", markersize=10,
                label="final head (visual, all blocks)")
        ax.axhline(results["dataset"]["test_constant_mae"], color="gray", linestyle=":",
                   linewidth=1, label="constant (train median)")
        ax.set_xticks(x, conditions)
        ax.set_ylabel("test MAE (persons)")
        ax.set_title(f"exits after block {block} of {comparison['backbone']['depth']}")
        ax.grid(axis="y", alpha=0.3)
        tallest = max(max(r["test_mae"][c] for c in conditions) for r in comparison["rows"])
        tallest = max(tallest, *(final[c] for c in conditions))
        ax.set_ylim(0, 1.35 * tallest)  # headroom for the legend
        ax.legend(fontsize=7, loc="upper left", ncol=2)
    path = out_dir / MODALITY_PLOT
    figure.savefig(path, dpi=110)
    written.append(path)

    rows = results["deployed"]["confidence"]
    figure = Figure(figsize=(4.2 * len(rows), 3.8), layout="constrained")
    axes = figure.subplots(1, len(rows), squeeze=False)[0]
    for ax, row in zip(axes, rows):
        coverage = 100 * np.asarray(row["coverages"])
        for name, style in (("predicted_error", "-o"), ("random", "--"), ("oracle", ":")):
            ax.plot(coverage, row["risk_coverage"][name], style, markersize=3, label=name)
        ax.set_xlabel("coverage: most confident samples (%)")
        ax.set_ylabel("MAE of those samples")
        ax.set_title(f"deployed exit {row['exit']} (rho {row['spearman_confidence_vs_neg_error']:.2f})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    path = out_dir / CONFIDENCE_PLOT
    figure.savefig(path, dpi=110)
    written.append(path)

    fractions = results["deployed"]["early_exit"]["exit_fractions_by_condition"]
    figure = Figure(figsize=(6.0, 3.8), layout="constrained")
    ax = figure.subplots()
    names = [c for c in CONDITIONS if c in fractions]
    bottom = np.zeros(len(names))
    for k in range(len(fractions["all"])):
        values = np.array([fractions[c][k] for c in names]) * 100
        ax.bar(names, values, bottom=bottom, label=f"exit {k}")
        bottom += values
    ax.set_ylabel("samples leaving at the exit (%)")
    ax.set_title("deployed model, tuned thresholds, test split")
    ax.legend(fontsize=7)
    path = out_dir / EXITS_PLOT
    figure.savefig(path, dpi=110)
    written.append(path)
    return written


def results_markdown(results: dict[str, Any]) -> str:
    """The modality comparison and the deployed model as markdown tables."""
    comparison = results["modalities"]
    lines = ["| exit | after block | " + " | ".join(CONDITIONS) + " | exit FLOPs |",
             "|---|---:|" + "---:|" * (len(CONDITIONS) + 1)]
    for row in sorted(comparison["rows"], key=lambda r: (r["after_block"], r["modality"])):
        cells = " | ".join(f"{row['test_mae'][c]:.2f}" for c in CONDITIONS)
        lines.append(f"| {row['modality']} | {row['after_block']} | {cells} | "
                     f"{row['exit_flops']:,} |")
    final = comparison["final_head"]["test_mae"]
    lines.append(f"| final head (visual) | {comparison['backbone']['depth']} | "
                 + " | ".join(f"{final[c]:.2f}" for c in CONDITIONS) + " | |")
    deployed = results["deployed"]
    lines += ["", f"Deployed `{deployed['model']}` (exits "
              + ", ".join(f"{m} after block {b}" for m, b in zip(deployed["exit_modalities"],
                                                                  deployed["exit_blocks"]))
              + "), test MAE:", "",
              "| | " + " | ".join(CONDITIONS) + " |", "|---|" + "---:|" * len(CONDITIONS)]
    for k, row in enumerate(deployed["test_mae_by_exit"]):
        lines.append(f"| exit {k} | " + " | ".join(f"{row[c]:.2f}" for c in CONDITIONS) + " |")
    early = deployed["early_exit"]
    lines.append("| tuned early exit | " + " | ".join(f"{early['test_mae'][c]:.2f}"
                                                    for c in CONDITIONS) + " |")
    report = deployed["report"]["early_exit"]
    lines += ["", f"Early exit: {report['mean_latency_ms']:.3f} ms mean vs "
              f"{report['full_latency_ms']:.3f} ms for the no-exit graph "
              f"({report['speedup']:.2f}x), exit fractions "
              + ", ".join(f"{100 * f:.0f}%" for f in report["exit_fractions"]) + ".", "",
              "| deployed exit | Spearman(conf, -error) | MAE | mean predicted error | "
              "mean risk: predicted_error / random / oracle |", "|---:|---:|---:|---:|---|"]
    for row in deployed["confidence"]:
        risk = row["mean_risk"]
        lines.append(f"| {row['exit']} | {row['spearman_confidence_vs_neg_error']:.2f} | "
                     f"{row['mae']:.2f} | {row['mean_predicted_error']:.2f} | "
                     f"{risk['predicted_error']:.2f} / {risk['random']:.2f} / "
                     f"{risk['oracle']:.2f} |")
    return "\n".join(lines)
