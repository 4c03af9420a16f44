"""Writing the single early-exit graph of each precision into a model directory.

:mod:`trt_exit.export.early_exit_graph` composes the graph; this module checks it against the
stage graphs (through the host executor), writes it next to them (``onnx/<precision>/
early_exit.onnx``) and records it in the manifest, under the manifest's lock. ``export`` (FP32),
``precision`` (FP16, INT8) and ``tune`` (new default thresholds) call
:func:`write_early_exit_graphs`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from trt_exit import tensor_names as tn
from trt_exit.export.early_exit_graph import (
    META_SOURCES,
    ChainPlan,
    compose_early_exit_graph,
    default_thresholds,
    plan_chain,
)
from trt_exit.manifest import Manifest

#: Samples the written graph is checked on against the stage graphs (decisions and outputs).
CHECK_SAMPLES = 32
#: Allowed output difference from the stage graphs, per unit of the largest output magnitude.
#: The graph runs the stage graphs' own nodes; ONNX Runtime may fuse across a stage boundary
#: (an exit head's LayerNorm with the residual add before it), which moves the last bits.
OUTPUT_RTOL = {"fp32": 1e-4, "fp16": 1e-3, "int8": 1e-3}


def graph_file(manifest: Manifest, precision: str) -> Path:
    """Where the single graph of ``precision`` lives: ``onnx/<precision>/early_exit.onnx``."""
    return manifest.root / "onnx" / precision / f"{tn.EARLY_EXIT_GRAPH}.onnx"


def _up_to_date(manifest: Manifest, precision: str, plan: ChainPlan,
                thresholds: np.ndarray) -> bool:
    """Whether the recorded graph holds ``plan`` with these defaults, built from the stage
    graphs the manifest lists now."""
    import onnx
    from onnx import numpy_helper

    from trt_exit.errors import ArtifactError

    if precision not in manifest.early_exit_graph:
        return False
    try:
        model = onnx.load(str(manifest.early_exit_graph_path(precision)))
    except (ArtifactError, OSError, ValueError):
        return False  # missing or changed: written anew from the stage graphs
    props = {p.key: p.value for p in model.metadata_props}
    defaults = next((numpy_helper.to_array(t) for t in model.graph.initializer
                     if t.name == tn.THRESHOLDS), None)
    sources = {name: sha for name, sha in json.loads(props.get(META_SOURCES, "{}")).items()}
    current = {name: manifest.stage(name).onnx.get(precision) for name in sources}
    return (ChainPlan.from_metadata(props) == plan and defaults is not None
            and np.array_equal(defaults, thresholds)
            and all(ref is not None and ref.sha256 == sources[name]
                    for name, ref in current.items()))


def check_against_stages(manifest: Manifest, precision: str, graph: bytes, plan: ChainPlan,
                         thresholds: np.ndarray, samples: dict[str, np.ndarray]) -> dict:
    """Runs ``graph`` and the stage graphs (host executor, batch not compacted) on ``samples``
    as one batch and one sample at a time, with the graph's default thresholds and, where
    exits decide, with each deciding exit's median confidence on the samples (so that both
    outcomes of every decision occur); every sample must take the same exit with the same
    output. A different exit is accepted only where the deciding confidence is within 1e-6
    of its threshold (a tie that the last bit decides).

    Returns:
        A record of what was compared (for the manifest's ``parity``).

    Raises:
        ParityError: A sample took another exit, or an output differs beyond
            :data:`OUTPUT_RTOL`.
    """
    from trt_exit.export.parity import ParityError
    from trt_exit.runtime.executor import Executor
    from trt_exit.runtime.policies import AllExitsPolicy, ThresholdPolicy
    from trt_exit.runtime.single_graph import SingleGraphRunner

    runner = SingleGraphRunner(manifest, graph, f"early-exit graph ({precision})")
    compared = ties = 0
    worst = 0.0
    limit = OUTPUT_RTOL.get(precision, 1e-3)
    try:
        with Executor(manifest, "onnxruntime", precision, compact=False,
                      strategy="stages") as executor:
            every = executor.run(samples, AllExitsPolicy())
            sets = [thresholds]
            if plan.decisions:
                medians = thresholds.copy()
                for k in plan.decisions:
                    medians[k] = np.float32(np.median(every.all_confidences[k]))
                sets.append(medians)
            count = len(next(iter(samples.values())))
            batches = [slice(0, count)] + [slice(i, i + 1) for i in range(min(count, 8))]
            for values in sets:
                policy = ThresholdPolicy([float(values[k]) if k in plan.decisions else None
                                          for k in range(manifest.num_exits - 1)])
                for rows in batches:
                    feeds = {name: v[rows] for name, v in samples.items()}
                    reference = executor.run(feeds, policy)
                    output, _, index = runner.run(feeds, values)
                    for i in np.flatnonzero(index != reference.exit_index):
                        sample = rows.start + i
                        gaps = [abs(float(every.all_confidences[k][sample]) - float(values[k]))
                                for k in plan.decisions]
                        if not gaps or min(gaps) > 1e-6:
                            raise ParityError(
                                f"the {precision} early-exit graph sends sample {sample} to exit "
                                f"{index[i]}, the stage graphs to exit "
                                f"{reference.exit_index[i]}; it was not written")
                        ties += 1
                    same = index == reference.exit_index
                    scale = max(1.0, float(np.abs(reference.output).max(initial=0.0)))
                    diff = float(np.abs(output[same] - reference.output[same]).max(initial=0.0))
                    worst = max(worst, diff / scale)
                    compared += len(index)
                    if not worst <= limit:
                        raise ParityError(
                            f"the {precision} early-exit graph's outputs differ from the stage "
                            f"graphs' by {diff:.3g} (> {limit:g} x {scale:.3g}); it was not "
                            f"written")
    finally:
        runner.close()
    return {"compared_with": "stage graphs, host executor without compaction",
            "samples": count, "batches": [count, 1], "threshold_sets": len(sets),
            "results_compared": compared, "ties": ties, "max_relative_output_diff": worst,
            "tolerance": limit}


def write_early_exit_graphs(manifest: Manifest, precisions: Sequence[str] | None = None,
                            samples: dict[str, np.ndarray] | None = None) -> Manifest:
    """Writes the single graph of each precision, with the manifest's thresholds for that
    precision as its default (:meth:`Manifest.thresholds`; an untuned model: no early exit),
    and records it in the manifest. A graph already holding them is left as it is.

    Each graph is composed from the stage graphs, passes the ONNX checker, is compared with
    the stage graphs on ``samples`` (:func:`check_against_stages`; default: the calibration
    set, else seeded normal inputs), and is then written atomically and recorded, under the
    manifest's lock (readers see both or neither).

    Args:
        manifest: The model (saved).
        precisions: Default: every precision that has a graph already.
        samples: Model inputs by name, (N, ...) float32.
    """
    import onnx

    from trt_exit.fileio import atomic_path
    from trt_exit.manifest import FileRef, ManifestError, manifest_lock

    precisions = list(manifest.early_exit_graph if precisions is None else precisions)
    built = {}
    for precision in precisions:
        thresholds = manifest.thresholds(precision)
        plan = plan_chain(manifest, thresholds)
        defaults = default_thresholds(manifest, plan, thresholds)
        if _up_to_date(manifest, precision, plan, defaults):
            continue
        model = compose_early_exit_graph(manifest, precision, plan, defaults)
        data = model.SerializeToString()
        record = check_against_stages(manifest, precision, data, plan, defaults,
                                      _check_samples(manifest, samples))
        built[precision] = (data, record)
    if not built:
        return manifest
    with manifest_lock(manifest.root):
        disk = Manifest.load(manifest.root)
        for precision in built:
            now = {s.name: s.onnx.get(precision) for s in disk.stages}
            if any(now.get(s.name) != s.onnx[precision] for s in manifest.stages):
                raise ManifestError(f"{manifest.path}: the {precision} stage graphs changed while "
                                    f"their early-exit graph was built; run the command again")
        for precision, (data, record) in built.items():
            target = graph_file(manifest, precision)
            with atomic_path(target) as tmp:
                tmp.write_bytes(data)
            manifest.early_exit_graph[precision] = FileRef.of(target, manifest.root)
            manifest.parity.setdefault(precision, {})["early_exit_graph"] = record
        manifest.save(lock_held=True)
    return manifest


def _check_samples(manifest: Manifest, samples: dict[str, np.ndarray] | None
                   ) -> dict[str, np.ndarray]:
    if samples is not None:
        return {name: np.ascontiguousarray(samples[name][:CHECK_SAMPLES], np.float32)
                for name in (s.name for s in manifest.inputs)}
    if manifest.calibration.get("file"):
        from trt_exit.export import calibration as calib

        return {k: v[:CHECK_SAMPLES] for k, v in calib.load(manifest).inputs.items()}
    rng = np.random.default_rng(0)
    return {s.name: rng.standard_normal((CHECK_SAMPLES, *s.shape[1:])).astype(np.float32)
            for s in manifest.inputs}
