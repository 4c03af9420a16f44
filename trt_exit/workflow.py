"""The steps from data to a tuned, evaluated early-exit model (:mod:`trt_exit.demo` chains them).

Each step reads and writes files in one output directory, so the CLI can run them one at a time
(``trt-exit train``, ``export``, ``tune``, ``eval``) or all at once (``trt-exit demo``):

* ``checkpoint.safetensors``: trained weights and config (``train``);
* ``manifest.json`` and ``onnx/``: per-stage graphs (``export``), thresholds and the latency
  profile (``tune``);
* ``report.json``: accuracy and latency of every exit and of the tuned operating point (``eval``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from trt_exit.errors import ConfigError
from trt_exit.manifest import Manifest
from trt_exit.runtime import DEFAULT_FLOOR_CONFIDENCE
from trt_exit.training.datasets import Dataset, load_dataset
from trt_exit.training.config import DEMO_TRAIN, TrainConfig  # noqa: F401  DEMO_TRAIN: API

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.safetensors"
REPORT_NAME = "report.json"


# --------------------------------------------------------------------------- steps


def load_splits(name: str, seed: int, options: dict[str, Any] | None = None) -> dict[str, Dataset]:
    """Train / val / test splits of a registered dataset."""
    return load_dataset(name, seed=seed, **(options or {}))


def train_step(out_dir: str | os.PathLike, model: str, dataset: str, train_config: TrainConfig,
               dataset_options: dict[str, Any] | None = None, progress: bool = True,
               exits: list | None = None):
    """Trains a registered model on a dataset's train split and saves the checkpoint.

    Args:
        exits: :class:`~trt_exit.models.ExitSpec` list replacing the model's early exits.

    Returns:
        ``(model, splits, history)``.
    """
    from trt_exit.models import create_model
    from trt_exit.models.checkpoint import save_checkpoint
    from trt_exit.training.trainer import evaluate, seed_everything, train

    out_dir = Path(out_dir)
    splits = load_splits(dataset, train_config.seed, dataset_options)
    seed_everything(train_config.seed)
    net = create_model(model, exits=list(exits)) if exits else create_model(model)
    check_inputs_fit(net, splits["train"])
    history = train(net, splits["train"], train_config, val_set=splits["val"], progress=progress)
    val_metrics = evaluate(net, splits["val"])
    save_checkpoint(net, out_dir / CHECKPOINT_NAME, extra={
        "dataset": {"name": dataset, "seed": train_config.seed, "options": dataset_options or {}},
        "train": dataclasses.asdict(train_config),
        "seconds": history.seconds,
        "val_metrics": val_metrics,
    })
    return net, splits, history


def check_inputs_fit(net, dataset) -> None:
    """Raises a one-line :class:`ConfigError` when ``dataset``'s inputs do not have the shapes
    ``net`` takes (e.g. MNIST's 28x28 images for the 8x8 digits model)."""
    if not isinstance(dataset, Dataset):
        return  # streaming splits are shaped by their own transform
    for name, shape in net.input_shapes().items():
        array = dataset.inputs.get(name)
        if array is not None and tuple(array.shape[1:]) != tuple(shape):
            raise ConfigError(
                f"{dataset.name} has {name} inputs of shape {tuple(array.shape[1:])}, but model "
                f"{net.config.name} takes {tuple(shape)}: choose a model for this dataset "
                f"(e.g. --model multi_exit_vit_mnist for mnist and mnist_c)")


def dataset_of(manifest: Manifest) -> dict[str, Any]:
    """The dataset a manifest's model was trained on (recorded at export)."""
    info = manifest.model.get("dataset")
    if not info:
        raise ConfigError(f"{manifest.path} records no dataset; pass one explicitly")
    return info


def export_step(net, out_dir: str | os.PathLike, splits: dict[str, Dataset],
                dataset_info: dict[str, Any], checkpoint: str | os.PathLike | None = None,
                parity_samples: int = 64) -> Manifest:
    """Exports ``net`` stage by stage into ``out_dir``; parity is checked on real val samples.

    The checkpoint goes into ``out_dir`` too (``checkpoint`` is copied there, or ``net`` saved)
    and is recorded in the manifest with its hash: the torch backend runs the stages from it.
    """
    import shutil

    from trt_exit.export.onnx_export import export_model
    from trt_exit.fileio import atomic_path
    from trt_exit.manifest import FileRef
    from trt_exit.models.checkpoint import save_checkpoint

    out_dir = Path(out_dir)
    val = splits["val"]
    sample = {name: v[:parity_samples] for name, v in val.inputs.items()}
    manifest = export_model(net, out_dir, sample_inputs=sample)
    target = out_dir / CHECKPOINT_NAME
    if checkpoint is None:
        if not target.is_file():
            save_checkpoint(net, target, extra={"dataset": dataset_info})
    elif Path(checkpoint).resolve() != target.resolve():
        with atomic_path(target) as tmp:
            shutil.copyfile(checkpoint, tmp)
    manifest.model["dataset"] = dataset_info
    manifest.model["checkpoint"] = dataclasses.asdict(FileRef.of(target, out_dir))
    manifest.save()
    return manifest


#: Samples per executor run when a whole split is evaluated: on the CPU, ONNX Runtime runs a
#: batch of 10,000 several times slower per sample than batches of 512 (measured: 9.5 s against
#: 2.4 s for MNIST's test split through the demo's stage chain).
EVAL_CHUNK = 512


def run_split(executor, inputs: dict[str, Any], policy=None, full_model: bool = False,
              chunk: int = EVAL_CHUNK):
    """One executor run over a whole split, ``chunk`` samples at a time, as one
    :class:`~trt_exit.runtime.executor.ExitResults` (``latency_ms``: the sum of the runs).

    Args:
        executor: An open :class:`~trt_exit.runtime.executor.Executor`.
        inputs: Model inputs by name, (N, ...) each.
        policy: The policy (None: the executor's); ignored with ``full_model``.
        full_model: Run the no-exit baseline graph instead of the stage chain.
        chunk: Samples per run.
    """
    total = len(next(iter(inputs.values())))
    parts = []
    for start in range(0, max(total, 1), chunk):
        part = {name: value[start : start + chunk] for name, value in inputs.items()}
        parts.append(executor.run_full_model(part) if full_model else executor.run(part, policy))
    if len(parts) == 1:
        return parts[0]

    def joined(name: str, axis: int = 0):
        values = [getattr(p, name) for p in parts]
        return None if values[0] is None else np.concatenate(values, axis=axis)

    return dataclasses.replace(
        parts[0], exit_index=joined("exit_index"), output=joined("output"),
        confidence=joined("confidence"), all_outputs=joined("all_outputs", 1),
        all_confidences=joined("all_confidences", 1),
        latency_ms=float(sum(p.latency_ms for p in parts)))


def tune_step(manifest: Manifest, val: Dataset, backend: str = "onnxruntime",
              precision: str = "fp32", max_loss: float | None = None,
              profile_repeats: int = 200, apply: bool = True,
              floor_confidence: float | None = DEFAULT_FLOOR_CONFIDENCE) -> Manifest:
    """Profiles every stage at batch 1, tunes thresholds on ``val`` and stores both.

    Args:
        manifest: The exported model.
        val: Tuning split.
        backend: Backend to profile and run on.
        precision: Graphs to tune.
        max_loss: Allowed metric loss (see :func:`trt_exit.runtime.tuning.tune_thresholds`).
        profile_repeats: Timed runs per stage.
        apply: Store the thresholds with the exits (the default policy of every executor) and
            the stage profile as the manifest's ``latency_profile``; otherwise both are stored
            only under ``tuning[precision]``. Either way the single early-exit graphs get the
            thresholds as their defaults, and ``tuning[precision]["strategy"]`` records which
            of ``stages`` and ``single_graph`` ran faster (the executor's default).
        floor_confidence: Confidence level at which the floor must hold over the split's
            sampling noise (None: on the split itself); see :mod:`trt_exit.runtime.tuning`.
    """
    from trt_exit.export.early_exit_writer import write_early_exit_graphs
    from trt_exit.profiling.environment import machine_info
    from trt_exit.profiling.timers import measure_stage_latency
    from trt_exit.runtime.executor import Executor
    from trt_exit.runtime.policies import AllExitsPolicy
    from trt_exit.runtime.single_graph import compare_strategies
    from trt_exit.runtime.tuning import state_providers, tune_thresholds

    if isinstance(profile_repeats, bool) or not isinstance(profile_repeats, int) or profile_repeats < 1:
        raise ConfigError(f"profile_repeats must be a positive number of runs, got {profile_repeats!r}")
    with Executor(manifest, backend, precision, policy=AllExitsPolicy()) as executor:
        one = {name: v[:1] for name, v in val.inputs.items()}
        stage_ms = measure_stage_latency(executor, one, repeats=profile_repeats)
        results = run_split(executor, val.inputs)
        backend_info = executor.backend.describe()
    tuning = tune_thresholds(results.all_outputs, results.all_confidences, val.targets,
                             manifest.task, stage_ms, max_loss,
                             floor_confidence=floor_confidence,
                             state_providers=state_providers(manifest))
    manifest.tuning[precision] = {**tuning.to_dict(), "split": val.name, "samples": len(val),
                                  "backend": backend_info["backend"], "stage_latency_ms": stage_ms}
    if apply:
        # The applied precision's profile is the one deadline mode and reports read.
        manifest.latency_profile = {
            "backend": backend_info, "precision": precision, "batch": 1, "unit": "ms",
            "statistic": f"median of {profile_repeats}", "stages": stage_ms,
            "machine": machine_info(),
        }
        for entry, threshold in zip(manifest.exits[:-1], tuning.best.thresholds):
            entry.enabled = threshold is not None
            entry.threshold = threshold if threshold is not None else 1.0
        manifest.operating_points = [p.to_dict() for p in tuning.points]
    manifest.save()
    # The single graphs take the new thresholds as their defaults (every precision whose
    # thresholds changed), and the faster way to run this precision becomes the default.
    # (A model directory exported before the single graph existed gets it here.)
    write_early_exit_graphs(manifest, manifest.precisions(), samples=val.inputs)
    if backend == "onnxruntime":
        with Executor(manifest, backend, precision) as executor:
            choice = compare_strategies(executor, val.inputs)
    else:
        choice = {"default": "stages", "why": f"the single graph runs on ONNX Runtime only; "
                                              f"this profile ran on {backend}"}
    manifest.tuning[precision]["strategy"] = choice
    manifest.save()
    return manifest


def _timed_passes(executor, test: Dataset, passes: int, policies: dict[str, Any]) -> dict[str, list[float]]:
    """Per-sample latency (batch 1) of each policy (``"full"`` = the baseline graph; a
    ``(policy, strategy)`` pair runs the policy with that strategy), interleaved sample by
    sample in rotating order so drift touches all of them alike."""
    names = list(policies)
    samples: dict[str, list[float]] = {name: [] for name in names}
    n = len(test)
    for p in range(passes):
        for i in range(n):
            x = {name: v[i : i + 1] for name, v in test.inputs.items()}
            shift = (i + p) % len(names)
            for name in names[shift:] + names[:shift]:
                policy = policies[name]
                if policy == "full":
                    result = executor.run_full_model(x)
                elif isinstance(policy, tuple):
                    result = executor.run(x, *policy)
                else:
                    result = executor.run(x, policy)
                samples[name].append(result.latency_ms)
    return samples


def evenly_spaced(samples: int, wanted: int | None) -> np.ndarray:
    """Rows of a split of ``samples``: all, or ``wanted`` evenly spaced ones (a subset for
    timing or tuning that spans the split)."""
    if wanted is None or wanted >= samples:
        return np.arange(samples)
    if wanted < 1:
        raise ConfigError(f"a subset needs at least 1 sample, got {wanted}")
    return np.unique(np.linspace(0, samples - 1, wanted).round().astype(np.int64))


def _same_decisions(executor, test: Dataset, policy) -> dict[str, int]:
    """Samples whose exit and prediction the single graph and the stages agree on: at batch 1
    and as one batch (the stages without compaction, as the single graph runs)."""
    compact, executor.compact = executor.compact, False
    try:
        stages = executor.run(test.inputs, policy, "stages")
        graph = executor.run(test.inputs, policy, "single_graph")
        one_batch = int(np.sum((stages.exit_index == graph.exit_index)
                               & _same_rows(stages.prediction, graph.prediction)))
        batch_1 = 0
        for i in range(len(test)):
            x = {name: v[i : i + 1] for name, v in test.inputs.items()}
            a, b = executor.run(x, policy, "stages"), executor.run(x, policy, "single_graph")
            batch_1 += int(a.exit_index[0] == b.exit_index[0]
                           and _same_rows(a.prediction, b.prediction)[0])
    finally:
        executor.compact = compact
    return {"samples": len(test), "batch_1": batch_1, "one_batch": one_batch}


def _same_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row: equal classes, or regression values within 1e-4 (relative)."""
    if a.ndim == 1:
        return a == b
    return np.all(np.abs(a - b) <= 1e-4 * np.maximum(1.0, np.abs(a)), axis=1)


def evaluate_step(manifest: Manifest, test: Dataset, backend: str = "onnxruntime",
                  precision: str = "fp32", passes: int = 3, warmup: int = 50,
                  time_each_exit: bool = True, timing_samples: int | None = None,
                  strategy: str = "auto", check_samples: int | None = None) -> dict[str, Any]:
    """Accuracy and latency of every exit and of the tuned operating point on ``test``.

    Latency is measured per sample at batch 1 (the streaming case early exits are for), in the
    same run for every variant: the tuned early-exit policy (with the executor's ``strategy``),
    each exit forced (unless ``time_each_exit`` is False: then the exits' ``latency_ms`` are
    None), and the no-exit baseline graph (backbone and final head in one graph). Accuracy
    covers the whole split; latency, with ``timing_samples``, that many evenly spaced samples
    of it. Where the model has the single early-exit graph of ``precision`` (ONNX Runtime), the
    policy is also timed with each strategy, and ``single_graph`` says on how many samples the
    graph and the stages agree (exit and prediction, at batch 1 and as one batch): the whole
    split, or ``check_samples`` evenly spaced ones.
    """
    from trt_exit.runtime.executor import Executor, default_policy
    from trt_exit.runtime.policies import AllExitsPolicy, FixedExitPolicy
    from trt_exit.runtime.tuning import per_sample_loss
    from trt_exit.training.trainer import exit_metric, metric_name

    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
        raise ConfigError(f"passes must be a positive number of timed passes, got {passes!r}")
    thresholds = manifest.thresholds(precision)
    if thresholds is None:
        raise ConfigError(f"{manifest.path} has no tuned thresholds: run trt-exit tune first")
    task = manifest.task
    metric = metric_name(task)
    with Executor(manifest, backend, precision, strategy=strategy) as executor:
        policy = default_policy(manifest, precision)
        everything = run_split(executor, test.inputs, AllExitsPolicy())
        early = run_split(executor, test.inputs, policy)
        full = run_split(executor, test.inputs, full_model=True)
        one_graph = backend == "onnxruntime" and precision in manifest.early_exit_graph
        # Warm up every path, then time them interleaved.
        policies: dict[str, Any] = {"early_exit": policy, "full": "full"}
        if one_graph:
            policies.update({f"early_exit:{s}": (policy, s) for s in ("stages", "single_graph")})
        if time_each_exit:
            policies.update({f"exit_{k}": FixedExitPolicy(k) for k in range(manifest.num_exits)})
        warm = test.subset(np.arange(min(warmup, len(test))))
        _timed_passes(executor, warm, 1, policies)
        timed = test.subset(evenly_spaced(len(test), timing_samples))
        timings = _timed_passes(executor, timed, passes, policies)
        backend_info = executor.backend.describe()
        x = {name: v[:1] for name, v in test.inputs.items()}
        used = executor.run(x, policy).strategy
        checked = test.subset(evenly_spaced(len(test), check_samples))
        agree = _same_decisions(executor, checked, policy) if one_graph else None

    per_exit = [exit_metric(everything.all_outputs[k], test.targets, task)
                for k in range(manifest.num_exits)]
    fractions = np.bincount(early.exit_index, minlength=manifest.num_exits) / len(test)
    early_metric = exit_metric(early.output, test.targets, task)
    full_metric = exit_metric(full.output, test.targets, task)
    mean = {name: float(np.mean(values)) for name, values in timings.items()}
    exits = []
    for k, entry in enumerate(manifest.exits):
        exits.append({
            "index": k, "block": entry.after_block, "type": entry.type, metric: per_exit[k],
            "exit_fraction": float(fractions[k]), "latency_ms": mean.get(f"exit_{k}"),
            "threshold": None if k == manifest.num_exits - 1 else thresholds[k],
            "enabled": k == manifest.num_exits - 1 or thresholds[k] is not None,
        })
    report = {
        "model": manifest.name,
        "task": task,
        "backend": backend_info["backend"],
        "backend_info": backend_info,
        "precision": precision,
        "split": test.name,
        "samples": len(test),
        "metric": metric,
        "exits": exits,
        f"final_{metric}": per_exit[-1],
        "early_exit": {
            metric: early_metric,
            "mean_latency_ms": mean["early_exit"],
            "full_latency_ms": mean["full"],
            "speedup": mean["full"] / mean["early_exit"],
            "latency_ratio": mean["early_exit"] / mean["full"],
            "thresholds": thresholds,
            "exit_fractions": [float(f) for f in fractions],
            "full_model_" + metric: full_metric,
            "p50_latency_ms": float(np.percentile(timings["early_exit"], 50)),
            "p99_latency_ms": float(np.percentile(timings["early_exit"], 99)),
            "full_p50_latency_ms": float(np.percentile(timings["full"], 50)),
        },
        "latency": {"batch": 1, "passes": passes, "samples": len(timed),
                    "statistic": "mean over samples and passes",
                    "method": "interleaved per sample: early exit, each forced exit, full graph"},
    }
    report["early_exit"]["strategy"] = used
    if agree is not None:
        report["single_graph"] = {
            "mean_latency_ms": mean["early_exit:single_graph"],
            "stages_mean_latency_ms": mean["early_exit:stages"],
            "latency_ratio_vs_stages": mean["early_exit:single_graph"] / mean["early_exit:stages"],
            "latency_ratio_vs_full": mean["early_exit:single_graph"] / mean["full"],
            "same_exit_and_prediction": agree,
            "file": manifest.early_exit_graph[precision].path,
        }
    if task == "classification":
        # Identical decisions whichever way the batch was cut: batched vs. the per-sample runs.
        report["early_exit"]["errors"] = int(per_sample_loss(early.output[None], test.targets, task).sum())
    return report


# --------------------------------------------------------------------------- the demo


def format_report(report: dict[str, Any]) -> str:
    """The report as a readable table."""
    metric = report["metric"]
    pct = metric == "accuracy"

    def fmt(value: float) -> str:
        return f"{100 * value:6.2f}%" if pct else f"{value:7.3f}"

    lines = [
        f"{report['model']} on {report['split']} ({report['samples']} samples), "
        f"{report['backend']} {report['precision']}, batch 1",
        "",
        f"{'exit':>4} {'block':>5} {'type':<10} {metric:>9} {'exits here':>10} "
        f"{'latency':>10} {'threshold':>9}",
    ]
    for e in report["exits"]:
        threshold = "final" if e["threshold"] is None and e["enabled"] else (
            "off" if not e["enabled"] else f"{e['threshold']:.4f}")
        # evaluate_step(time_each_exit=False) leaves the forced-exit latencies untimed (None).
        latency = "-" if e["latency_ms"] is None else f"{e['latency_ms']:8.3f}ms"
        lines.append(f"{e['index']:>4} {e['block']:>5} {e['type']:<10} {fmt(e[metric]):>9} "
                     f"{100 * e['exit_fraction']:9.1f}% {latency:>10} {threshold:>9}")
    ee = report["early_exit"]
    lines += [
        "",
        f"final exit {metric}: {fmt(report['final_' + metric]).strip()}",
        f"early exit {metric}: {fmt(ee[metric]).strip()}   mean latency {ee['mean_latency_ms']:.3f} ms",
        f"no-exit baseline (backbone + final head, one graph): {ee['full_latency_ms']:.3f} ms",
        f"speedup {ee['speedup']:.2f}x (early-exit latency = {ee['latency_ratio']:.2f} x baseline)",
    ]
    one = report.get("single_graph")
    if one:
        agree = one["same_exit_and_prediction"]
        lines += [
            f"single graph ({one['file']}): {one['mean_latency_ms']:.3f} ms = "
            f"{one['latency_ratio_vs_stages']:.2f} x the stages ({one['stages_mean_latency_ms']:.3f} "
            f"ms), {one['latency_ratio_vs_full']:.2f} x baseline; same exit and prediction as "
            f"the stages on {agree['batch_1']}/{agree['samples']} samples at batch 1, "
            f"{agree['one_batch']}/{agree['samples']} as one batch",
            f"(the early-exit latency above ran with strategy {ee['strategy']})",
        ]
    precisions = report.get("precisions")
    if precisions:
        lines += ["", f"{'precision':<9} {'per-exit ' + metric:<32} {'final':>8} {'early exit':>10} "
                      f"{'mean':>9} {'baseline':>9} {'speedup':>7}"]
        for name in ("fp32", "fp16", "int8"):
            if name not in precisions:
                continue
            entry = precisions[name]
            point = entry["early_exit"]
            per_exit = " ".join(fmt(v).strip() for v in entry["exits"])
            lines.append(f"{name:<9} {per_exit:<32} {fmt(entry['final_' + metric]):>8} "
                         f"{fmt(point[metric]):>10} {point['mean_latency_ms']:7.3f}ms "
                         f"{point['full_latency_ms']:7.3f}ms {point['speedup']:6.2f}x")
        graphs = [(name, precisions[name]["single_graph"]) for name in ("fp32", "fp16", "int8")
                  if name in precisions and precisions[name].get("single_graph")]
        if graphs:
            lines.append("single graph: " + ", ".join(
                f"{name} {g['mean_latency_ms']:.3f}ms (same exit and prediction "
                f"{g['same_exit_and_prediction']['batch_1']}/{g['same_exit_and_prediction']['samples']}"
                f" at batch 1, {g['same_exit_and_prediction']['one_batch']} as one batch)"
                for name, g in graphs))
        lines.append("(all on the CPU with " + precisions.get("backend", report["backend"]) +
                     "; FP16/INT8 latency on a CPU is no guide to a GPU)")
    return "\n".join(lines)
