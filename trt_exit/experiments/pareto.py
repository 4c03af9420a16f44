"""Early exits against static models of the same cost: accuracy vs latency and FLOPs.

Do early exits earn their place? Only if, at equal mean latency, the multi-exit model is more
accurate than a plain model that is simply smaller. Protocol, per dataset (``digits`` and
``digits_c``, :mod:`trt_exit.training.digits_c`):

1. **Models**, all trained with the same recipe (the demo's, :data:`DEMO_TRAIN`, same epochs),
   from scratch, on the dataset's train split:

   * the multi-exit model (``multi_exit_vit_digits``: exits after blocks 2, 4, 6 of 8);
   * static baselines: the same backbone truncated to ``k`` blocks with its own final head and
     no early exits, for k in :attr:`ParetoConfig.static_depths`; k = 8 is the full model
     without exits.

2. **Operating points** of the multi-exit model: the tuner
   (:func:`trt_exit.runtime.tuning.tune_thresholds`) chooses thresholds on the validation split
   for every accuracy floor in :attr:`ParetoConfig.floors_points` (accuracy points allowed
   below the final exit), on a subset stratified by corruption and severity for digits-C
   (:attr:`ParetoConfig.tuning_per_cell`: the tuner's search grows with the square of the
   samples). Each point is applied to the test split by the executor (ONNX
   Runtime, batched) and its accuracy, exit histogram and mean exit block are computed on the
   whole split, pooled and per severity (digits-C).

3. **Latency**: ONNX Runtime (the project's CPU backend, default session options), FP32,
   batch 1; torch trains with :attr:`ParetoConfig.num_threads` threads. Every static model
   (its one-graph export) and every operating point (the stage chain with its thresholds) is
   timed on the same timing subset of the test split (stratified by corruption and severity),
   interleaved per sample in rotating order, for several rounds; a configuration's latency on a
   sample is the median over rounds, and its mean latency (pooled, or per severity) is the mean
   of those over the subset's samples. **FLOPs** per sample (:func:`trt_exit.models.flops.model_costs`):
   a static model's forward pass; an operating point's mean over the test split of the segments
   and enabled exit heads each sample ran.

4. **Comparison**: the static frontier is the upper concave hull of the static models'
   (latency, accuracy) points (any point on it is reachable by sending a random share of inputs
   to each of two static models). An operating point *wins* when its accuracy is above the
   frontier at its latency, *loses* when below, and has *no static rival* when it is faster
   than the fastest static model.

:func:`run_pareto` writes ``results.json``, the plots and ``RESULTS.md`` into one directory.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from trt_exit.errors import ConfigError
from trt_exit.experiments import finish_results
from trt_exit.training.config import DEMO_TRAIN, TrainConfig

LATENCY_PLOT = "{dataset}_accuracy_vs_latency.png"
FLOPS_PLOT = "{dataset}_accuracy_vs_flops.png"
HISTOGRAM_PLOT = "{dataset}_exit_histogram.png"
MARKDOWN_NAME = "RESULTS.md"


@dataclass
class ParetoConfig:
    """What the comparison runs.

    Attributes:
        datasets: Registered datasets (``digits_c`` is reported per severity too).
        dataset_options: Loader options by dataset name (e.g. digits-C's ``corruptions``).
        model: The registered multi-exit model.
        static_depths: Block counts of the static baselines (the model's depth = full model).
        train: The recipe every model is trained with.
        floors_points: Accuracy floors of the operating points (points below the final exit).
        tuning_per_cell: Tuning subset of the validation split: samples per (corruption,
            severity) cell of digits-C (the tuner's search grows with the square of the
            samples; 80 per cell is 2,080 of digits-C's 9,360); other datasets: all samples.
        timing_per_cell: Timing subset of the test split: samples per (corruption, severity)
            cell of digits-C, or 2.5 times that per class of other datasets.
        timing_rounds: Timed rounds over the subset per configuration (median per sample).
        histogram_floors_points: Floors whose exit histogram per severity is plotted.
        seed: Seed of the split, the corruptions, the training and the timing subset.
        num_threads: torch threads (training).
    """

    datasets: tuple[str, ...] = ("digits", "digits_c")
    dataset_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    model: str = "multi_exit_vit_digits"
    static_depths: tuple[int, ...] = (2, 4, 6, 8)
    train: TrainConfig = field(default_factory=lambda: dataclasses.replace(DEMO_TRAIN))
    floors_points: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0)
    tuning_per_cell: int = 80
    timing_per_cell: int = 8
    timing_rounds: int = 5
    histogram_floors_points: tuple[float, ...] = (0.5, 2.0, 5.0)
    seed: int = 0
    num_threads: int = 1

    def validate(self) -> None:
        if not self.static_depths or min(self.static_depths) < 1:
            raise ConfigError("static_depths must be block counts >= 1")
        if not self.floors_points or min(self.floors_points) < 0:
            raise ConfigError("floors_points must be accuracy points >= 0")
        if min(self.tuning_per_cell, self.timing_per_cell, self.timing_rounds) < 1:
            raise ConfigError("tuning_per_cell, timing_per_cell and timing_rounds must be >= 1")


def quick_config(seed: int = 0) -> ParetoConfig:
    """Smoke-test size: the tiny test model, one epoch, few floors (numbers mean nothing)."""
    return ParetoConfig(
        datasets=("digits_c",), model="multi_exit_vit_tiny_test", static_depths=(1, 3),
        train=TrainConfig(epochs=1, lr=1e-2, warmup_epochs=0, batch_size=128, seed=seed,
                          augment_shift_px=0),
        floors_points=(0.0, 5.0), tuning_per_cell=4, timing_per_cell=1, timing_rounds=1,
        histogram_floors_points=(5.0,), seed=seed)


# --------------------------------------------------------------------------- models


def static_model_config(model: str, depth: int):
    """``model``'s config truncated to ``depth`` blocks, with its final head and no early exits."""
    from trt_exit.models.multi_exit import model_config

    base = model_config(model)
    if depth > base.backbone_options.get("depth", depth):
        raise ConfigError(f"{model} has {base.backbone_options.get('depth')} blocks, not {depth}")
    return dataclasses.replace(base, name=f"{model}_static_{depth}", exits=[],
                               backbone_options={**base.backbone_options, "depth": depth})


def _train_and_export(model_config_, splits: dict, train: TrainConfig, out_dir: Path,
                      dataset_info: dict, say: Callable[[str], None]):
    from trt_exit.models.flops import model_costs
    from trt_exit.models.multi_exit import build_model
    from trt_exit.training.trainer import evaluate, seed_everything
    from trt_exit.training.trainer import train as train_model
    from trt_exit.workflow import export_step

    seed_everything(train.seed)
    net = build_model(model_config_)
    history = train_model(net, splits["train"], train, progress=False)
    test_metrics = evaluate(net, splits["test"])
    say(f"  {model_config_.name}: trained in {history.seconds:.0f} s, test accuracy per exit "
        + " ".join(f"{m:.4f}" for m in test_metrics))
    manifest = export_step(net, out_dir, splits, dataset_info)
    return net, manifest, model_costs(net), history.seconds


# --------------------------------------------------------------------------- analysis


def groups_of(dataset) -> dict[str, np.ndarray]:
    """Boolean masks of the samples of each reported group: ``pooled``, and ``severity_S`` for
    datasets with a ``severity`` meta array."""
    groups = {"pooled": np.ones(len(dataset), bool)}
    if "severity" in dataset.meta:
        for level in np.unique(dataset.meta["severity"]):
            groups[f"severity_{int(level)}"] = dataset.meta["severity"] == level
    return groups


def stratified_subset(dataset, per_cell: int, per_class: int, seed: int) -> np.ndarray:
    """Sorted sample indices: ``per_cell`` per (corruption, severity) cell of a dataset with
    that meta (digits-C), else ``per_class`` per class; all of a smaller cell (seeded)."""
    rng = np.random.default_rng([seed, 7, per_cell, per_class])
    if "severity" in dataset.meta:
        keys, count = dataset.meta["corruption"] * 10 + dataset.meta["severity"], per_cell
    else:
        keys, count = np.asarray(dataset.targets), per_class
    chosen = [rng.choice(np.flatnonzero(keys == key), min(count, int(np.sum(keys == key))),
                         replace=False) for key in np.unique(keys)]
    return np.sort(np.concatenate(chosen))


def upper_hull(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Upper concave hull of (latency, accuracy) points, by increasing latency, keeping only
    points that no faster point beats."""
    best: list[tuple[float, float]] = []
    for x, y in sorted(points):
        if best and y <= best[-1][1]:
            continue  # slower and not more accurate: dominated
        while len(best) >= 2:
            (x1, y1), (x2, y2) = best[-2], best[-1]
            if (x2 - x1) * (y - y1) - (y2 - y1) * (x - x1) >= 0:  # best[-1] under the chord
                best.pop()
            else:
                break
        best.append((x, y))
    return best


def frontier_at(hull: list[tuple[float, float]], latency: float) -> float | None:
    """The static frontier's accuracy at ``latency`` (None: faster than every static model)."""
    if not hull or latency < hull[0][0]:
        return None
    for (x1, y1), (x2, y2) in zip(hull, hull[1:]):
        if x1 <= latency <= x2:
            return y1 + (y2 - y1) * (latency - x1) / (x2 - x1)
    return hull[-1][1]


def verdict(accuracy: float, frontier: float | None, tolerance: float = 1e-9) -> str:
    """``wins``, ``loses``, ``ties`` against the frontier, or ``no static rival``."""
    if frontier is None:
        return "no static rival"
    if accuracy > frontier + tolerance:
        return "wins"
    return "loses" if accuracy < frontier - tolerance else "ties"


def _interleaved_latency(runs: dict[str, Callable[[int], float]], samples: np.ndarray,
                         rounds: int) -> dict[str, np.ndarray]:
    """Per-sample median latency (ms) of each configuration, timed interleaved in rotating
    order sample by sample, after one untimed warm-up pass."""
    names = list(runs)
    for i in samples[: min(20, len(samples))]:
        for name in names:
            runs[name](int(i))
    times = {name: np.zeros((rounds, len(samples))) for name in names}
    for r in range(rounds):
        for j, i in enumerate(samples):
            shift = (j + r) % len(names)
            for name in names[shift:] + names[:shift]:
                times[name][r, j] = runs[name](int(i))
    return {name: np.median(t, axis=0) for name, t in times.items()}


def _path_flops(costs: dict[str, Any], thresholds: Sequence[float | None]) -> np.ndarray:
    """FLOPs of a sample leaving at each exit: segments so far plus every enabled head run."""
    heads = [e["flops"] for e in costs["exits"]]
    enabled = [t is not None for t in thresholds] + [True]
    run = np.cumsum(costs["segment_flops"]) + np.cumsum([h * on for h, on in zip(heads, enabled)])
    return run.astype(np.float64)


def compare_dataset(dataset_name: str, splits: dict, config: ParetoConfig, work_dir: Path,
                    say: Callable[[str], None]) -> dict[str, Any]:
    """Trains, exports, tunes and times one dataset's models; returns its results."""
    from trt_exit.models.multi_exit import model_config
    from trt_exit.profiling.timers import measure_stage_latency
    from trt_exit.runtime.executor import Executor
    from trt_exit.runtime.policies import AllExitsPolicy, ThresholdPolicy
    from trt_exit.runtime.tuning import tune_thresholds

    val, test = splits["val"], splits["test"]
    info = {"name": dataset_name, "seed": config.seed, **test.info}
    train = dataclasses.replace(config.train, seed=config.seed, num_threads=config.num_threads)
    groups = groups_of(test)
    say(f"{dataset_name}: training the multi-exit model and {len(config.static_depths)} static "
        f"models ({train.summary()})")
    # ---- static models
    static, executors = [], {}
    for depth in config.static_depths:
        net, manifest, costs, seconds = _train_and_export(
            static_model_config(config.model, depth), splits, train,
            work_dir / f"static_{depth}", info, say)
        executor = Executor(manifest, "onnxruntime", "fp32")
        predictions = executor.run_full_model(test.inputs).output.argmax(axis=1)
        correct = predictions == test.targets
        static.append({"blocks": depth, "params": int(sum(p.numel() for p in net.parameters())),
                       "flops": float(costs["exits"][-1]["cumulative_flops"]),
                       "train_seconds": seconds,
                       "accuracy": {g: float(correct[m].mean()) for g, m in groups.items()}})
        executors[f"static_{depth}"] = executor
    # ---- the multi-exit model and its operating points
    net, manifest, costs, seconds = _train_and_export(
        model_config(config.model), splits, train, work_dir / "multi_exit", info, say)
    chain = Executor(manifest, "onnxruntime", "fp32")
    stage_ms = measure_stage_latency(chain, {k: v[:1] for k, v in val.inputs.items()}, repeats=50)
    tune_set = val.subset(stratified_subset(val, config.tuning_per_cell, len(val), config.seed))
    on_val = chain.run(tune_set.inputs, AllExitsPolicy())
    floors = sorted(set(config.floors_points))
    tuning = tune_thresholds(on_val.all_outputs, on_val.all_confidences, tune_set.targets,
                             manifest.task, stage_ms, max_loss=floors[0] / 100,
                             curve_losses=[f / 100 for f in floors])
    on_test = chain.run(test.inputs, AllExitsPolicy())
    blocks = np.array([e.after_block for e in manifest.exits])
    exits_accuracy = {g: [float((on_test.all_outputs[k][m].argmax(axis=1) == test.targets[m]).mean())
                          for k in range(manifest.num_exits)] for g, m in groups.items()}
    points = []
    for floor, point in zip(floors, tuning.points):
        policy = ThresholdPolicy(point.thresholds)
        result = chain.run(test.inputs, policy)
        correct = result.output.argmax(axis=1) == test.targets
        path_flops = _path_flops(costs, point.thresholds)
        entry = {"floor_points": floor, "thresholds": point.thresholds,
                 "val_accuracy": point.metric, "expected_latency_ms": point.expected_latency_ms,
                 "accuracy": {}, "exit_fractions": {}, "mean_exit_block": {}, "flops": {}}
        for g, m in groups.items():
            exits = result.exit_index[m]
            entry["accuracy"][g] = float(correct[m].mean())
            entry["exit_fractions"][g] = [float(f) for f in
                                          np.bincount(exits, minlength=manifest.num_exits) / m.sum()]
            entry["mean_exit_block"][g] = float(blocks[exits].mean())
            entry["flops"][g] = float(path_flops[exits].mean())
        points.append(entry)
        executors[f"floor_{floor:g}"] = (chain, policy)
    # ---- latency, interleaved on one timing subset
    subset = stratified_subset(test, config.timing_per_cell, int(2.5 * config.timing_per_cell),
                               config.seed)
    rows = {int(i): {k: v[i : i + 1] for k, v in test.inputs.items()} for i in subset}

    def timer(target) -> Callable[[int], float]:
        if isinstance(target, tuple):
            executor, policy = target
            return lambda i: executor.run(rows[i], policy).latency_ms
        return lambda i: target.run_full_model(rows[i]).latency_ms

    say(f"{dataset_name}: timing {len(executors)} configurations on {len(subset)} test samples, "
        f"{config.timing_rounds} rounds, interleaved")
    latency = _interleaved_latency({name: timer(t) for name, t in executors.items()}, subset,
                                   config.timing_rounds)
    sub_groups = {g: m[subset] for g, m in groups.items()}
    for entry in static:
        values = latency[f"static_{entry['blocks']}"]
        entry["latency_ms"] = {g: float(values[m].mean()) for g, m in sub_groups.items()}
    for entry in points:
        values = latency[f"floor_{entry['floor_points']:g}"]
        entry["latency_ms"] = {g: float(values[m].mean()) for g, m in sub_groups.items()}
    for executor in {id(e): e for e in [chain] + [executors[f"static_{d}"]
                                                   for d in config.static_depths]}.values():
        executor.close()
    # ---- verdicts per group, against the static frontier of that group
    comparison = {}
    for g in groups:
        for axis in ("latency_ms", "flops"):
            hull = upper_hull([(s[axis][g] if axis == "latency_ms" else s["flops"], s["accuracy"][g])
                               for s in static])
            rows_ = []
            for entry in points:
                x = entry[axis][g]
                front = frontier_at(hull, x)
                rows_.append({"floor_points": entry["floor_points"], axis: x,
                              "accuracy": entry["accuracy"][g], "static_frontier_accuracy": front,
                              "verdict": verdict(entry["accuracy"][g], front)})
            comparison.setdefault(g, {})[axis] = rows_
    return {
        "dataset": info,
        "samples": {"train": len(splits["train"]), "val": len(val), "test": len(test),
                    "tuning": len(tune_set), "timing": int(len(subset))},
        "groups": list(groups),
        "multi_exit": {"model": manifest.name, "exit_blocks": blocks.tolist(),
                       "train_seconds": seconds, "exit_accuracy": exits_accuracy,
                       "final_accuracy": {g: v[-1] for g, v in exits_accuracy.items()},
                       "stage_latency_ms": stage_ms, "operating_points": points},
        "static": static,
        "comparison": comparison,
    }


# --------------------------------------------------------------------------- the run


def run_pareto(out_dir: str | Path, config: ParetoConfig | None = None,
               say: Callable[[str], None] = print, command: str = "") -> dict[str, Any]:
    """Runs the comparison for every dataset of ``config``; writes results, plots, RESULTS.md."""
    import torch

    from trt_exit.fileio import atomic_write_text
    from trt_exit.training.datasets import load_dataset

    config = config or ParetoConfig()
    config.validate()
    began = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(config.num_threads)
    results: dict[str, Any] = {
        "experiment": "pareto", "command": command,
        "config": {**dataclasses.asdict(config), "train": dataclasses.asdict(config.train)},
        "datasets": {},
    }
    for name in config.datasets:
        splits = load_dataset(name, seed=config.seed, **config.dataset_options.get(name, {}))
        results["datasets"][name] = compare_dataset(name, splits, config, out_dir / "models" / name,
                                                    say)
    finish_results(results, out_dir, began, write_plots, say)
    atomic_write_text(out_dir / MARKDOWN_NAME, results_markdown(results))
    return results


# --------------------------------------------------------------------------- plots, tables


def write_plots(results: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Per dataset: accuracy vs mean latency and vs FLOPs (one panel per group), and the exit
    histogram per severity."""
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    written = []
    for name, data in results["datasets"].items():
        groups = data["groups"]
        points = data["multi_exit"]["operating_points"]
        for filename, axis, label, scale in ((LATENCY_PLOT, "latency_ms", "mean latency, batch 1 "
                                              "(ms, ONNX Runtime)", 1.0),
                                             (FLOPS_PLOT, "flops", "mean FLOPs per sample (M)", 1e-6)):
            columns = min(len(groups), 4)
            rows = -(-len(groups) // columns)
            figure = Figure(figsize=(4.2 * columns, 3.6 * rows), layout="constrained")
            axes = figure.subplots(rows, columns, squeeze=False).ravel()
            for ax, g in zip(axes, groups):
                sx = [(s[axis][g] if axis == "latency_ms" else s["flops"]) * scale for s in data["static"]]
                sy = [100 * s["accuracy"][g] for s in data["static"]]
                ax.plot(sx, sy, "s--", color="tab:gray", label="static (k blocks)")
                for s, x, y in zip(data["static"], sx, sy):
                    ax.annotate(str(s["blocks"]), (x, y), textcoords="offset points", xytext=(4, -10),
                                fontsize=7, color="tab:gray")
                ex = [p[axis][g] * scale for p in points]
                ey = [100 * p["accuracy"][g] for p in points]
                ax.plot(ex, ey, "o-", color="tab:blue", markersize=4, label="early exit (floors)")
                for p, x, y in zip(points, ex, ey):
                    ax.annotate(f"{p['floor_points']:g}", (x, y), textcoords="offset points",
                                xytext=(3, 3), fontsize=6, color="tab:blue")
                ax.set_title(f"{name}: {g.replace('_', ' ')}", fontsize=9)
                ax.set_xlabel(label, fontsize=8)
                ax.set_ylabel("test accuracy (%)", fontsize=8)
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)
            for ax in axes[len(groups):]:
                ax.set_visible(False)
            path = out_dir / filename.format(dataset=name)
            figure.savefig(path, dpi=100)
            written.append(path)
        floors = [p for p in points
                  if p["floor_points"] in results["config"]["histogram_floors_points"]]
        if floors:
            figure = Figure(figsize=(4.2 * len(floors), 3.4), layout="constrained")
            axes = figure.subplots(1, len(floors), squeeze=False)[0]
            blocks = data["multi_exit"]["exit_blocks"]
            for ax, p in zip(axes, floors):
                bottom = np.zeros(len(groups))
                for k, block in enumerate(blocks):
                    share = np.array([100 * p["exit_fractions"][g][k] for g in groups])
                    ax.bar(range(len(groups)), share, bottom=bottom, label=f"exit after block {block}")
                    bottom += share
                ax.set_xticks(range(len(groups)),
                              [g.replace("severity_", "sev ") for g in groups], fontsize=7)
                ax.set_ylabel("test samples leaving (%)", fontsize=8)
                ax.set_title(f"{name}: floor {p['floor_points']:g} points", fontsize=9)
                ax.legend(fontsize=6)
            path = out_dir / HISTOGRAM_PLOT.format(dataset=name)
            figure.savefig(path, dpi=100)
            written.append(path)
    return written


def results_markdown(results: dict[str, Any]) -> str:
    """Tables: static models, operating points with verdicts, exit behaviour per severity."""
    lines = [f"# Early exit vs static models\n\nCommand: `{results.get('command', '')}`  ",
             f"Machine: {results.get('machine', {}).get('cpu', '')} "
             f"({results.get('torch_threads')} torch thread), {results.get('seconds', 0):.0f} s.\n"]
    for name, data in results["datasets"].items():
        lines.append(f"## {name}\n")
        lines.append(f"Samples: {data['samples']}.\n")
        lines.append("| static model | params | MFLOPs | " +
                     " | ".join(f"{g} acc / ms" for g in data["groups"]) + " |")
        lines.append("|---" * (3 + len(data["groups"])) + "|")
        for s in data["static"]:
            lines.append(f"| {s['blocks']} blocks | {s['params']:,} | {s['flops'] / 1e6:.2f} | " +
                         " | ".join(f"{100 * s['accuracy'][g]:.2f} / {s['latency_ms'][g]:.3f}"
                                    for g in data["groups"]) + " |")
        me = data["multi_exit"]
        lines.append(f"\nMulti-exit model (exits after blocks {me['exit_blocks']}), test accuracy "
                     "per exit: " + "; ".join(
                         f"{g}: " + " ".join(f"{100 * a:.2f}" for a in v)
                         for g, v in me["exit_accuracy"].items()) + "\n")
        lines.append("| floor (points) | group | accuracy | mean ms | MFLOPs | mean exit block | "
                     "static frontier at that ms | verdict (latency) | verdict (FLOPs) |")
        lines.append("|---" * 9 + "|")
        for i, p in enumerate(me["operating_points"]):
            for g in data["groups"]:
                by_latency = data["comparison"][g]["latency_ms"][i]
                by_flops = data["comparison"][g]["flops"][i]
                front = by_latency["static_frontier_accuracy"]
                lines.append(
                    f"| {p['floor_points']:g} | {g} | {100 * p['accuracy'][g]:.2f} | "
                    f"{p['latency_ms'][g]:.3f} | {p['flops'][g] / 1e6:.2f} | "
                    f"{p['mean_exit_block'][g]:.2f} | "
                    f"{'-' if front is None else f'{100 * front:.2f}'} | {by_latency['verdict']} | "
                    f"{by_flops['verdict']} |")
        lines.append("")
    return "\n".join(lines) + "\n"
