"""Early exits against static models of the same cost: accuracy vs latency and FLOPs.

Do early exits earn their place? Only if, at equal mean latency, the multi-exit model is more
accurate than a plain model that is simply smaller. Protocol, per dataset (``digits``,
``digits_c`` (:mod:`trt_exit.training.digits_c`), ``mnist`` and ``mnist_c``
(:mod:`trt_exit.training.mnist`)) and seed:

1. **Models**, all on the same training budget (:data:`DEFAULT_TRAIN`: epochs x samples,
   learning rate, batch size, augmentation), from scratch, on the dataset's train split:

   * the multi-exit model (:data:`DEFAULT_MODELS`: exits after blocks 2, 4, 6 of 8), once per
     training recipe (:attr:`ParetoConfig.recipes`, :mod:`trt_exit.training.recipes`:
     end to end, two-phase, self-distillation, ensemble exits, calibration);
   * static baselines: the same backbone truncated to ``k`` blocks with its own final head and
     no early exits, trained end to end on the labels, for k in
     :attr:`ParetoConfig.static_depths`; k = 8 is the full model without exits.

2. **Operating points** of the multi-exit model: the tuner
   (:func:`trt_exit.runtime.tuning.tune_thresholds`) chooses thresholds on the validation split
   for every accuracy floor in :attr:`ParetoConfig.floors_points` (accuracy points allowed
   below the final exit), on a subset stratified by corruption and severity (or by class)
   (:attr:`ParetoConfig.tuning_per_cell`), after the recipe's calibration, if any. Each point is applied to the test split by the executor (ONNX
   Runtime, batched) and its accuracy, exit histogram and mean exit block are computed on the
   whole split, pooled and per severity (digits-C, MNIST-C).

3. **Latency**: ONNX Runtime (the project's CPU backend, default session options), FP32,
   batch 1; torch trains with :attr:`ParetoConfig.num_threads` threads. Every static model
   (its one-graph export) and every operating point (the stage chain with its thresholds) is
   timed on the same timing subset of the test split (stratified by corruption and severity),
   every recipe's points together,
   interleaved per sample in rotating order, for several rounds; a configuration's latency on a
   sample is the median over rounds, and its mean latency (pooled, or per severity) is the mean
   of those over the subset's samples. **FLOPs** per sample (:func:`trt_exit.models.flops.model_costs`):
   a static model's forward pass; an operating point's mean over the test split of the segments
   and exit heads each sample ran (enabled heads, and the heads whose state they read).

4. **Comparison**: the static frontier is the upper concave hull of the static models'
   (latency, accuracy) points (any point on it is reachable by sending a random share of inputs
   to each of two static models). An operating point *wins* when its accuracy is above the
   frontier at its latency, *loses* when below, and has *no static rival* when it is faster
   than the fastest static model.

5. **Seeds**: with several, every accuracy, latency and FLOPs count is the mean over the seeds
   (operating points: at each floor), verdicts are taken on the means, and each seed's own
   verdicts are kept.

:func:`run_pareto` writes ``results.json``, the plots and ``RESULTS.md`` into one directory.
"""

from __future__ import annotations

import contextlib
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


#: The multi-exit model of each dataset family.
DEFAULT_MODELS = {"digits": "multi_exit_vit_digits", "digits_c": "multi_exit_vit_digits",
                  "mnist": "multi_exit_vit_mnist", "mnist_c": "multi_exit_vit_mnist"}
#: The training budget of each dataset family (every recipe and every static model gets it):
#: digits, the demo recipe at 60 epochs (as the first study); MNIST, :data:`MNIST_PARETO_TRAIN`
#: on a 10,000-image training subset (:data:`DEFAULT_DATASET_OPTIONS`).
DIGITS_PARETO_TRAIN = dataclasses.replace(DEMO_TRAIN, epochs=60)
MNIST_PARETO_TRAIN = TrainConfig(epochs=10, batch_size=128, lr=3e-3, warmup_epochs=1,
                                 label_smoothing=0.1, augment_shift_px=0, val_every_epochs=10)
DEFAULT_TRAIN = {"digits": DIGITS_PARETO_TRAIN, "digits_c": DIGITS_PARETO_TRAIN,
                 "mnist": MNIST_PARETO_TRAIN, "mnist_c": MNIST_PARETO_TRAIN}
#: MNIST trains on a seeded, class-stratified 10,000-image subset (the machine's budget: five
#: models per dataset and seed on one CPU core); val and test stay whole (MNIST-C: 1,000
#: images x 26 copies each, the loader's default).
DEFAULT_DATASET_OPTIONS = {"mnist": {"train_images": 10_000},
                           "mnist_c": {"train_images": 10_000}}


@dataclass
class ParetoConfig:
    """What the comparison runs.

    Attributes:
        datasets: Registered datasets (``digits_c`` and ``mnist_c`` are reported per severity
            too).
        dataset_options: Loader options by dataset name (default :data:`DEFAULT_DATASET_OPTIONS`).
        models: The registered multi-exit model by dataset (default :data:`DEFAULT_MODELS`).
        static_depths: Block counts of the static baselines (the model's depth = full model).
        train: The training budget every model gets (None: :data:`DEFAULT_TRAIN` per dataset):
            the static models are trained end to end on it, each recipe derives its phases from
            it (:mod:`trt_exit.training.recipes`).
        recipes: Multi-exit training recipes to compare (the first is the headline, reported as
            ``multi_exit``), e.g. ``("end_to_end", "two_phase+ensemble+calibrate")``.
        floors_points: Accuracy floors of the operating points (points below the final exit).
        tuning_per_cell: Tuning subset of the validation split: samples per (corruption,
            severity) cell of corrupted datasets, 2.6 times that per class of the others (80:
            2,080 samples either way; the tuner's search grows with the square of the samples).
        timing_per_cell: Timing subset of the test split: samples per (corruption, severity)
            cell, or 2.5 times that per class of other datasets.
        timing_rounds: Timed rounds over the subset per configuration (median per sample).
        histogram_floors_points: Floors whose exit histogram per severity is plotted.
        seeds: Seeds of the splits, the corruptions, the training and the timing subsets; with
            several, each dataset's numbers are the means over the seeds (each seed's under
            ``per_seed``).
        num_threads: torch threads (training).
        epochs: Replaces the budget's epochs (every dataset), if given.
    """

    datasets: tuple[str, ...] = ("digits", "digits_c")
    dataset_options: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {k: dict(v) for k, v in DEFAULT_DATASET_OPTIONS.items()})
    models: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_MODELS))
    static_depths: tuple[int, ...] = (2, 4, 6, 8)
    train: TrainConfig | None = None
    recipes: tuple[str, ...] = ("end_to_end",)
    floors_points: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0)
    tuning_per_cell: int = 80
    timing_per_cell: int = 8
    timing_rounds: int = 5
    histogram_floors_points: tuple[float, ...] = (0.5, 2.0, 5.0)
    seeds: tuple[int, ...] = (0,)
    num_threads: int = 1
    epochs: int | None = None

    def validate(self) -> None:
        from trt_exit.training.recipes import parse_recipe

        if not self.static_depths or min(self.static_depths) < 1:
            raise ConfigError("static_depths must be block counts >= 1")
        if not self.floors_points or min(self.floors_points) < 0:
            raise ConfigError("floors_points must be accuracy points >= 0")
        if min(self.tuning_per_cell, self.timing_per_cell, self.timing_rounds) < 1:
            raise ConfigError("tuning_per_cell, timing_per_cell and timing_rounds must be >= 1")
        if not self.recipes or len(set(self.recipes)) != len(self.recipes):
            raise ConfigError("recipes must name at least one recipe, each once")
        for recipe in self.recipes:
            parse_recipe(recipe)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError("seeds must list at least one seed, each once")
        missing = [d for d in self.datasets if d not in self.models]
        if missing:
            raise ConfigError(f"no multi-exit model given for {missing}: set models[dataset]")

    def base_train(self, dataset: str) -> TrainConfig:
        """The training budget on ``dataset``."""
        train = self.train if self.train is not None else DEFAULT_TRAIN.get(dataset, TrainConfig())
        return train if self.epochs is None else dataclasses.replace(train, epochs=self.epochs)


def quick_config(seed: int = 0) -> ParetoConfig:
    """Smoke-test size: the tiny test model, one epoch, few floors (numbers mean nothing)."""
    return ParetoConfig(
        datasets=("digits_c",), models={"digits_c": "multi_exit_vit_tiny_test"},
        static_depths=(1, 3),
        train=TrainConfig(epochs=1, lr=1e-2, warmup_epochs=0, batch_size=128, seed=seed,
                          augment_shift_px=0),
        floors_points=(0.0, 5.0), tuning_per_cell=4, timing_per_cell=1, timing_rounds=1,
        histogram_floors_points=(5.0,), seeds=(seed,))


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
    history = train_model(net, splits["train"], train, progress=False,
                          val_set=splits["val"] if train.calibrate else None)
    test_metrics = evaluate(net, splits["test"])
    say(f"  {model_config_.name}: trained in {history.seconds:.0f} s, test accuracy per exit "
        + " ".join(f"{m:.4f}" for m in test_metrics))
    manifest = export_step(net, out_dir, splits, dataset_info)
    return net, manifest, model_costs(net), history


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


def _path_flops(costs: dict[str, Any], thresholds: Sequence[float | None],
                providers: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """FLOPs of a sample leaving at each exit: segments so far plus every head that runs, i.e.
    every enabled head and the heads whose state an enabled head reads (``providers``)."""
    heads = [e["flops"] for e in costs["exits"]]
    runs = [t is not None for t in thresholds] + [True]
    for k in reversed(range(len(runs))):
        for provider in (providers or [[]] * len(runs))[k]:
            runs[provider] = runs[provider] or runs[k]
    total = np.cumsum(costs["segment_flops"]) + np.cumsum([h * on for h, on in zip(heads, runs)])
    return total.astype(np.float64)


def _tuning_subset(val, per_cell: int, seed: int) -> np.ndarray:
    """The tuning subset: ``per_cell`` per corruption-severity cell, or 2.6 times that per class."""
    return stratified_subset(val, per_cell, int(round(2.6 * per_cell)), seed)


def _static_models(model: str, splits: dict, config: ParetoConfig, train: TrainConfig,
                   groups: dict[str, np.ndarray], work_dir: Path, info: dict,
                   say: Callable[[str], None]) -> list[dict[str, Any]]:
    from trt_exit.runtime.executor import Executor
    from trt_exit.workflow import run_split

    test = splits["test"]
    static = []
    for depth in config.static_depths:
        net, manifest, costs, history = _train_and_export(
            static_model_config(model, depth), splits, train, work_dir / f"static_{depth}", info,
            say)
        with Executor(manifest, "onnxruntime", "fp32") as executor:
            predictions = run_split(executor, test.inputs, full_model=True).output.argmax(axis=1)
        correct = predictions == test.targets
        static.append({"blocks": depth, "params": int(sum(p.numel() for p in net.parameters())),
                       "flops": float(costs["exits"][-1]["cumulative_flops"]),
                       "train_seconds": history.seconds, "manifest": str(manifest.path),
                       "accuracy": {g: float(correct[m].mean()) for g, m in groups.items()}})
    return static


def _multi_exit(model: str, recipe, splits: dict, config: ParetoConfig, seed: int,
                groups: dict[str, np.ndarray], work_dir: Path, info: dict,
                say: Callable[[str], None]) -> dict[str, Any]:
    """Trains one recipe's multi-exit model; its per-exit accuracy and its operating points
    (tuned on the validation subset, applied to the whole test split)."""
    from trt_exit.models.multi_exit import model_config
    from trt_exit.profiling.timers import measure_stage_latency
    from trt_exit.runtime.executor import Executor
    from trt_exit.runtime.policies import AllExitsPolicy, ThresholdPolicy
    from trt_exit.runtime.tuning import state_providers, tune_thresholds
    from trt_exit.workflow import run_split

    val, test = splits["val"], splits["test"]
    base = model_config(model)
    config_ = dataclasses.replace(base, exits=recipe.exits(base.exits))
    net, manifest, costs, history = _train_and_export(config_, splits, recipe.train, work_dir,
                                                      info, say)
    providers = state_providers(manifest)
    blocks = np.array([e.after_block for e in manifest.exits])
    floors = sorted(set(config.floors_points))
    with Executor(manifest, "onnxruntime", "fp32") as chain:
        stage_ms = measure_stage_latency(chain, {k: v[:1] for k, v in val.inputs.items()},
                                         repeats=50)
        tune_set = val.subset(_tuning_subset(val, config.tuning_per_cell, seed))
        on_val = run_split(chain, tune_set.inputs, AllExitsPolicy())
        tuning = tune_thresholds(on_val.all_outputs, on_val.all_confidences, tune_set.targets,
                                 manifest.task, stage_ms, max_loss=floors[0] / 100,
                                 curve_losses=[f / 100 for f in floors],
                                 state_providers=providers)
        on_test = run_split(chain, test.inputs, AllExitsPolicy())
        exits_accuracy = {g: [float((on_test.all_outputs[k][m].argmax(axis=1)
                                     == test.targets[m]).mean())
                              for k in range(manifest.num_exits)] for g, m in groups.items()}
        points = []
        for floor, point in zip(floors, tuning.points):
            result = run_split(chain, test.inputs, ThresholdPolicy(point.thresholds))
            correct = result.output.argmax(axis=1) == test.targets
            path_flops = _path_flops(costs, point.thresholds, providers)
            entry = {"floor_points": floor, "thresholds": point.thresholds,
                     "val_accuracy": point.metric,
                     "expected_latency_ms": point.expected_latency_ms,
                     "accuracy": {}, "exit_fractions": {}, "mean_exit_block": {}, "flops": {}}
            for g, m in groups.items():
                exits = result.exit_index[m]
                entry["accuracy"][g] = float(correct[m].mean())
                entry["exit_fractions"][g] = [
                    float(f) for f in np.bincount(exits, minlength=manifest.num_exits) / m.sum()]
                entry["mean_exit_block"][g] = float(blocks[exits].mean())
                entry["flops"][g] = float(path_flops[exits].mean())
            points.append(entry)
    return {"model": manifest.name, "recipe": recipe.name, "train": recipe.train.summary(),
            "exit_types": [e.type for e in manifest.exits], "exit_blocks": blocks.tolist(),
            "train_seconds": history.seconds, "calibration": history.calibration,
            "exit_accuracy": exits_accuracy,
            "final_accuracy": {g: v[-1] for g, v in exits_accuracy.items()},
            "stage_latency_ms": stage_ms, "manifest": str(manifest.path),
            "operating_points": points}


def _time_configurations(data: dict[str, Any], test, config: ParetoConfig, seed: int,
                         say: Callable[[str], None]) -> None:
    """Adds ``latency_ms`` per group to every static model and operating point of ``data``: all
    timed interleaved on one subset of the test split, executors opened here."""
    from trt_exit.runtime.executor import Executor
    from trt_exit.runtime.policies import ThresholdPolicy

    subset = stratified_subset(test, config.timing_per_cell, int(2.5 * config.timing_per_cell),
                               seed)
    rows = {int(i): {k: v[i : i + 1] for k, v in test.inputs.items()} for i in subset}
    executors, runs, owners = [], {}, {}
    try:
        for entry in data["static"]:
            executor = Executor(entry["manifest"], "onnxruntime", "fp32")
            executors.append(executor)
            name = f"static_{entry['blocks']}"
            runs[name] = lambda i, e=executor: e.run_full_model(rows[i]).latency_ms
            owners[name] = entry
        for recipe in data["recipes"].values():
            executor = Executor(recipe["manifest"], "onnxruntime", "fp32")
            executors.append(executor)
            for point in recipe["operating_points"]:
                name = f"{recipe['recipe']}:floor_{point['floor_points']:g}"
                policy = ThresholdPolicy(point["thresholds"])
                runs[name] = lambda i, e=executor, p=policy: e.run(rows[i], p).latency_ms
                owners[name] = point
        say(f"  timing {len(runs)} configurations on {len(subset)} test samples, "
            f"{config.timing_rounds} rounds, interleaved")
        latency = _interleaved_latency(runs, subset, config.timing_rounds)
    finally:
        for executor in executors:
            executor.close()
    sub_groups = {g: m[subset] for g, m in groups_of(test).items()}
    for name, entry in owners.items():
        entry["latency_ms"] = {g: float(latency[name][m].mean()) for g, m in sub_groups.items()}
    data["samples"]["timing"] = int(len(subset))


def _comparison(static: list[dict], points: list[dict], groups: list[str]) -> dict[str, Any]:
    """Verdict of every operating point against the static frontier, per group and axis."""
    comparison: dict[str, Any] = {}
    for g in groups:
        for axis in ("latency_ms", "flops"):
            hull = upper_hull([(s[axis][g] if axis == "latency_ms" else s["flops"],
                                s["accuracy"][g]) for s in static])
            rows_ = []
            for entry in points:
                x = entry[axis][g]
                front = frontier_at(hull, x)
                rows_.append({"floor_points": entry["floor_points"], axis: x,
                              "accuracy": entry["accuracy"][g],
                              "static_frontier_accuracy": front,
                              "verdict": verdict(entry["accuracy"][g], front)})
            comparison.setdefault(g, {})[axis] = rows_
    return comparison


def exits_vs_static(multi_exit: dict[str, Any], static: list[dict], group: str = "pooled"
                    ) -> list[dict[str, Any]]:
    """Each exit's accuracy against the static model of the same depth (where there is one)."""
    by_depth = {s["blocks"]: s["accuracy"][group] for s in static}
    return [{"exit": k, "block": block, "accuracy": multi_exit["exit_accuracy"][group][k],
             "static_accuracy": by_depth.get(block),
             "difference_points": (None if block not in by_depth else
                                   100 * (multi_exit["exit_accuracy"][group][k] - by_depth[block]))}
            for k, block in enumerate(multi_exit["exit_blocks"])]


def compare_dataset(dataset_name: str, splits: dict, config: ParetoConfig, work_dir: Path,
                    say: Callable[[str], None], seed: int | None = None,
                    timing_context: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Trains, exports, tunes and times one dataset's models for one seed; returns its results.

    ``timing_context()``, if given, is entered around the latency measurement only (e.g. to
    wait for idle cores); the executors that are timed are opened inside it.
    """
    from trt_exit.training.recipes import make_recipe, static_train

    seed = config.seeds[0] if seed is None else seed
    model = config.models[dataset_name]
    val, test = splits["val"], splits["test"]
    info = {"name": dataset_name, "seed": seed, **test.info}
    base = dataclasses.replace(config.base_train(dataset_name), seed=seed,
                               num_threads=config.num_threads)
    groups = groups_of(test)
    say(f"{dataset_name} (seed {seed}): {len(config.static_depths)} static models and "
        f"{len(config.recipes)} multi-exit recipes on one budget ({base.summary()})")
    static = _static_models(model, splits, config, static_train(base), groups,
                            work_dir / "static", info, say)
    recipes = {}
    for name in config.recipes:
        recipe = make_recipe(name, base)
        recipes[name] = _multi_exit(model, recipe, splits, config, seed, groups,
                                    work_dir / name.replace("+", "_"), info, say)
    data = {
        "dataset": info,
        "seed": seed,
        "samples": {"train": len(splits["train"]), "val": len(val), "test": len(test),
                    "tuning": len(_tuning_subset(val, config.tuning_per_cell, seed))},
        "groups": list(groups),
        "static": static,
        "recipes": recipes,
    }
    with (timing_context() if timing_context else contextlib.nullcontext()):
        _time_configurations(data, test, config, seed, say)
    _finish_dataset(data)
    return data


def _finish_dataset(data: dict[str, Any]) -> None:
    """Verdicts of every recipe; the first recipe becomes ``multi_exit`` and ``comparison``."""
    for recipe in data["recipes"].values():
        recipe["comparison"] = _comparison(data["static"], recipe["operating_points"],
                                           data["groups"])
        recipe["exits_vs_static"] = exits_vs_static(recipe, data["static"])
    headline = next(iter(data["recipes"].values()))
    data["multi_exit"] = headline
    data["comparison"] = headline["comparison"]


def _mean(values: list) -> Any:
    """Element-wise mean of equally shaped JSON values (numbers, lists, dicts); None stays."""
    first = values[0]
    if isinstance(first, dict):
        return {k: _mean([v[k] for v in values]) for k in first}
    if isinstance(first, list):
        return [_mean(list(column)) for column in zip(*values)]
    if first is None or isinstance(first, (str, bool)):
        return first
    return float(np.mean(values))


_AVERAGED_POINT = ("accuracy", "latency_ms", "flops", "mean_exit_block", "exit_fractions",
                   "val_accuracy", "expected_latency_ms")
_AVERAGED_RECIPE = ("train_seconds", "exit_accuracy", "final_accuracy", "stage_latency_ms")


def aggregate_seeds(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """One dataset's results over seeds: every accuracy, latency and FLOPs count the mean over
    the seeds (at each floor, for operating points), verdicts recomputed on the means; each
    seed's thresholds are kept (``thresholds_per_seed``)."""
    if len(per_seed) == 1:
        return per_seed[0]
    first = per_seed[0]
    data = {"dataset": {**first["dataset"], "seed": [d["seed"] for d in per_seed]},
            "seeds": [d["seed"] for d in per_seed],
            "samples": first["samples"], "groups": first["groups"], "static": [],
            "recipes": {}}
    for i, entry in enumerate(first["static"]):
        runs = [d["static"][i] for d in per_seed]
        data["static"].append({**{k: v for k, v in entry.items() if k != "manifest"},
                               **{k: _mean([r[k] for r in runs])
                                  for k in ("accuracy", "latency_ms", "flops", "train_seconds")}})
    for name, recipe in first["recipes"].items():
        runs = [d["recipes"][name] for d in per_seed]
        merged = {k: v for k, v in recipe.items()
                  if k not in ("manifest", "calibration", "comparison", "exits_vs_static")}
        merged.update({k: _mean([r[k] for r in runs]) for k in _AVERAGED_RECIPE})
        merged["calibration_per_seed"] = [r.get("calibration") for r in runs]
        points = []
        for j, point in enumerate(recipe["operating_points"]):
            at_floor = [r["operating_points"][j] for r in runs]
            points.append({"floor_points": point["floor_points"],
                           "thresholds_per_seed": [p["thresholds"] for p in at_floor],
                           **{k: _mean([p[k] for p in at_floor]) for k in _AVERAGED_POINT}})
        merged["operating_points"] = points
        merged["verdicts_per_seed"] = [
            {g: {axis: [row["verdict"] for row in rows] for axis, rows in axes.items()}
             for g, axes in r["comparison"].items()} for r in runs]
        data["recipes"][name] = merged
    _finish_dataset(data)
    return data


# --------------------------------------------------------------------------- the run


def run_pareto(out_dir: str | Path, config: ParetoConfig | None = None,
               say: Callable[[str], None] = print, command: str = "",
               timing_context: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Runs the comparison for every dataset and seed of ``config``; writes ``results.json``
    (with every seed's results under ``per_seed``), the plots and RESULTS.md.

    ``timing_context``: see :func:`compare_dataset`.
    """
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
        "config": {**dataclasses.asdict(config),
                   "train": {d: dataclasses.asdict(config.base_train(d)) for d in config.datasets}},
        "datasets": {}, "per_seed": {},
    }
    for name in config.datasets:
        runs = []
        for seed in config.seeds:
            splits = load_dataset(name, seed=seed, **config.dataset_options.get(name, {}))
            runs.append(compare_dataset(name, splits, config,
                                        out_dir / "models" / name / f"seed_{seed}", say, seed,
                                        timing_context))
            del splits
        results["datasets"][name] = aggregate_seeds(runs)
        if len(runs) > 1:
            results["per_seed"][name] = runs
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
        seeds = data.get("seeds", [data.get("seed")])
        lines.append(f"Samples: {data['samples']}. Seeds: {seeds}"
                     + (" (every number: the mean over the seeds)" if len(seeds) > 1 else "")
                     + ".\n")
        lines += _recipes_markdown(data)
        lines.append("| static model | params | MFLOPs | " +
                     " | ".join(f"{g} acc / ms" for g in data["groups"]) + " |")
        lines.append("|---" * (3 + len(data["groups"])) + "|")
        for s in data["static"]:
            lines.append(f"| {s['blocks']} blocks | {s['params']:,} | {s['flops'] / 1e6:.2f} | " +
                         " | ".join(f"{100 * s['accuracy'][g]:.2f} / {s['latency_ms'][g]:.3f}"
                                    for g in data["groups"]) + " |")
        me = data["multi_exit"]
        lines.append(f"\nMulti-exit model, recipe {me['recipe']} ({me['train']}; exits after blocks "
                     f"{me['exit_blocks']}, types {me['exit_types']}), test accuracy "
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


#: Floors summarized per recipe (the issue's acceptance floors).
SUMMARY_FLOORS = (0.5, 1.0, 2.0)


def _recipes_markdown(data: dict[str, Any]) -> list[str]:
    """Per recipe: each exit against the static model of its depth, and the pooled verdicts at
    :data:`SUMMARY_FLOORS` (points above (+) or below (-) the static frontier)."""
    lines = ["| recipe | train s | exit accuracy vs static of the same depth (pooled, points) | "
             + " | ".join(f"floor {f:g}: ms / FLOPs" for f in SUMMARY_FLOORS) + " |",
             "|---" * (3 + len(SUMMARY_FLOORS)) + "|"]
    for name, recipe in data["recipes"].items():
        exits = ", ".join(
            f"b{e['block']} {100 * e['accuracy']:.2f}"
            + ("" if e["static_accuracy"] is None else f" ({e['difference_points']:+.2f})")
            for e in recipe["exits_vs_static"])
        cells = []
        for floor in SUMMARY_FLOORS:
            rows = {axis: next((r for r in recipe["comparison"]["pooled"][axis]
                                if r["floor_points"] == floor), None)
                    for axis in ("latency_ms", "flops")}
            parts = []
            for axis in ("latency_ms", "flops"):
                row = rows[axis]
                if row is None:
                    parts.append("-")
                elif row["static_frontier_accuracy"] is None:
                    parts.append("no rival")
                else:
                    parts.append(f"{100 * (row['accuracy'] - row['static_frontier_accuracy']):+.2f}")
            cells.append(" / ".join(parts))
        lines.append(f"| {name} | {recipe['train_seconds']:.0f} | {exits} | " + " | ".join(cells)
                     + " |")
    return lines + [""]
