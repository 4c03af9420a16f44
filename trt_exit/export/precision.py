"""Precision passes over a manifest's stage graphs: FP32 → FP16 and FP32 → INT8 (Q/DQ).

``trt-exit precision DIR --precision fp16 int8`` (or :func:`create_precision_graphs`) writes
``onnx/fp16/<stage>.onnx`` and ``onnx/int8/<stage>.onnx`` for every stage and for the no-exit
baseline graph, and records them in the manifest beside the FP32 graphs. TensorRT builds them
strongly typed, so what runs on the Jetson is exactly what ONNX Runtime measured on the CPU.

* FP16: :mod:`trt_exit.export.fp16` (LayerNorm, softmax, reductions and the confidence
  computation kept FP32; inputs and outputs float32).
* INT8: :mod:`trt_exit.export.int8`, calibrated on the manifest's calibration set
  (:mod:`trt_exit.export.calibration`). Stages are calibrated in execution order, each on the
  activations the *already quantized* stages before it produce from the calibration inputs, so
  a stage's ranges match what it will see at run time. The baseline graph is calibrated on the
  model inputs.

Every new graph is fully checked (``onnx.checker``), loaded by ONNX Runtime, run on calibration
data (finite outputs of the manifest's shapes), and compared with FP32 stage by stage (recorded
in ``manifest.parity[precision]``; accuracy, not elementwise difference, is the acceptance test:
see the demo's ``precisions`` report). Graphs are written to a staging directory and moved into
place only when all of them pass; the manifest never points at a half-written file.
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from trt_exit import tensor_names as tn
from trt_exit.errors import ArtifactError, ConfigError
from trt_exit.export import calibration as calib
from trt_exit.export.fp16 import FP32_OP_TYPES, convert_to_fp16
from trt_exit.export.int8 import Int8Settings, check_tensorrt_convention, quantize_int8
from trt_exit.export.parity import max_abs_diff
from trt_exit.fileio import make_staging_dir, remove_staging_dir
from trt_exit.manifest import FileRef, Manifest, TensorSpec

#: Precisions this module creates (FP32 comes from export).
LOW_PRECISIONS = ("fp16", "int8")
#: Samples used for the checks and the FP32 comparison.
CHECK_SAMPLES = 64


def _graphs(manifest: Manifest) -> list[tuple[str, list[TensorSpec], list[TensorSpec], Path]]:
    """(name, inputs, outputs, verified FP32 path) of every stage in order, then the baseline."""
    graphs = [(s.name, s.inputs, s.outputs, manifest.onnx_path(s, "fp32")) for s in manifest.stages]
    full = manifest.full_model
    graphs.append((tn.FULL_MODEL, full["inputs"], full["outputs"], manifest.full_model_path("fp32")))
    return graphs


def _run_batched(runner, values: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    names = [t.name for t in runner.inputs]
    count = len(values[names[0]])
    parts = [runner.run({n: values[n][s : s + batch_size] for n in names})
             for s in range(0, count, batch_size)]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def _check_outputs(name: str, path: Path, outputs: list[TensorSpec], values: dict[str, np.ndarray]) -> None:
    for spec in outputs:
        value = values[spec.name]
        if value.dtype != np.dtype(spec.dtype) or tuple(value.shape[1:]) != tuple(spec.shape[1:]):
            raise ArtifactError(f"{path}: output {spec.name} is {value.dtype} {value.shape}, the "
                                f"manifest says {spec.dtype} (B, {spec.shape[1:]})")
        if not np.isfinite(value).all():
            raise ArtifactError(f"{path}: output {spec.name} of {name} has NaN/Inf on the check "
                                f"samples; the precision pass broke the graph")


def _sample_inputs(manifest: Manifest, calibration: calib.CalibrationSet | None) -> dict[str, np.ndarray]:
    if calibration is not None:
        return {k: v[:CHECK_SAMPLES] for k, v in calibration.inputs.items()}
    rng = np.random.default_rng(0)
    return {s.name: rng.standard_normal((8, *s.shape[1:])).astype(np.float32) for s in manifest.inputs}


def _make_graphs(manifest: Manifest, precision: str, out_dir: Path,
                 calibration: calib.CalibrationSet | None, int8: Int8Settings) -> dict[str, Any]:
    """Writes every graph of ``precision`` into ``out_dir``; returns per-graph summaries."""
    import onnx

    from trt_exit.export.onnx_export import check_onnx_file
    from trt_exit.runtime.backends.onnxruntime import OrtStageRunner

    out_dir.mkdir(parents=True, exist_ok=True)
    summaries: dict[str, Any] = {}
    # Values the stages are calibrated on: the model inputs, then each quantized stage's outputs.
    chained = dict(calibration.inputs) if calibration is not None else None
    for name, inputs, outputs, fp32_path in _graphs(manifest):
        target = out_dir / f"{name}.onnx"
        if precision == "fp16":
            model, summary = convert_to_fp16(onnx.load(str(fp32_path)))
            onnx.save(model, str(target))
            summaries[name] = summary.to_dict()
        else:
            source = calibration.inputs if name == tn.FULL_MODEL else chained
            feeds = {t.name: source[t.name] for t in inputs}
            summaries[name] = quantize_int8(fp32_path, target, feeds, int8)
            check_tensorrt_convention(target)
        check_onnx_file(target)
        runner = OrtStageRunner(name, target, inputs, outputs)
        try:
            if precision == "int8" and name != tn.FULL_MODEL:
                chained.update(_run_batched(runner, chained, int8.batch_size))
        finally:
            runner.close()
    return summaries


def _compare_with_fp32(manifest: Manifest, precision: str, out_dir: Path,
                       sample: dict[str, np.ndarray]) -> dict[str, Any]:
    """Each graph against FP32 on FP32 inputs (a difference is attributed to the stage that
    made it); top-1 agreement of every exit. Informational: accuracy is the acceptance test."""
    from trt_exit.runtime.backends.onnxruntime import OrtStageRunner

    reference = dict(sample)
    records, agreement = [], {}
    for name, inputs, outputs, fp32_path in _graphs(manifest):
        feeds = {t.name: (sample if name == tn.FULL_MODEL else reference)[t.name] for t in inputs}
        ref_runner = OrtStageRunner(name, fp32_path, inputs, outputs)
        cand_runner = OrtStageRunner(name, out_dir / f"{name}.onnx", inputs, outputs)
        try:
            ref = ref_runner.run(feeds)
            cand = cand_runner.run(feeds)
        finally:
            ref_runner.close()
            cand_runner.close()
        _check_outputs(name, out_dir / f"{name}.onnx", outputs, cand)
        records.append({"stage": name,
                        "max_abs_diff": {t: max_abs_diff(ref[t], cand[t]) for t in ref}})
        for tensor in ref:
            if tn.exit_index_of_output(tensor) is not None and manifest.task == "classification":
                key = tensor if name != tn.FULL_MODEL else f"{tn.FULL_MODEL}:{tensor}"
                agreement[key] = float(np.mean(ref[tensor].argmax(1) == cand[tensor].argmax(1)))
        if name != tn.FULL_MODEL:
            reference.update(ref)
    return {"reference": "fp32", "samples": len(next(iter(sample.values()))),
            "inputs": "FP32 outputs of the stages before (per-stage attribution)",
            "stages": records, "top1_agreement": agreement,
            "note": "informational; the accuracy of each precision is the acceptance test"}


def _commit(manifest: Manifest, staging: Path, records: dict[str, dict[str, Any]]) -> None:
    """Moves the staged graphs into ``onnx/<precision>/`` and records them in the manifest."""
    root = manifest.root
    # 1. Forget the old graphs of these precisions (and engines built from them) first, so no
    # saved manifest points at a file that is about to change.
    for precision in records:
        for stage in manifest.stages:
            stage.onnx.pop(precision, None)
            stage.engines = {k: v for k, v in stage.engines.items()
                             if v.get("precision") != precision}
        manifest.full_model.get("onnx", {}).pop(precision, None)
        manifest.early_exit_graph.pop(precision, None)
        manifest.parity.pop(precision, None)
    manifest.save()
    # 2. Move into place.
    for precision in records:
        (root / "onnx" / precision).mkdir(parents=True, exist_ok=True)
        for path in sorted((staging / "onnx" / precision).iterdir()):
            os.replace(path, root / "onnx" / precision / path.name)
    # 3. Record.
    for precision, record in records.items():
        rel = Path("onnx") / precision
        for stage in manifest.stages:
            stage.onnx[precision] = FileRef.of(root / rel / f"{stage.name}.onnx", root)
        manifest.full_model.setdefault("onnx", {})[precision] = FileRef.of(
            root / rel / f"{tn.FULL_MODEL}.onnx", root)
        manifest.parity[precision] = record.pop("parity")
        manifest.export.setdefault("precisions", {})[precision] = record
    manifest.save()


def create_precision_graphs(
    manifest: Manifest,
    precisions: Iterable[str] = LOW_PRECISIONS,
    calibration: calib.CalibrationSet | None = None,
    int8: Int8Settings | None = None,
) -> Manifest:
    """Writes the FP16 and/or INT8 graphs of every stage, the baseline and the single early-exit
    graph (:mod:`trt_exit.export.early_exit_graph`); updates the manifest.

    Args:
        manifest: An exported model (FP32 graphs).
        precisions: Any of ``"fp16"``, ``"int8"``.
        calibration: INT8 calibration set: saved as the manifest's (``calibration/``) first.
            Default: the manifest's own (see ``trt-exit calibrate``).
        int8: INT8 settings (default :class:`Int8Settings`).

    Returns:
        The manifest, saved, with the new graphs recorded.

    Raises:
        ConfigError: An unknown precision.
        ArtifactError: INT8 without a calibration set, or a graph that fails its checks.
        InputError: A calibration set that does not fit the model.
    """
    import onnxruntime as ort

    precisions = list(dict.fromkeys(precisions))
    unknown = [p for p in precisions if p not in LOW_PRECISIONS]
    if unknown or not precisions:
        raise ConfigError(f"precision passes create {', '.join(LOW_PRECISIONS)}; got {precisions} "
                          f"(fp32 graphs come from trt-exit export)")
    int8 = int8 or Int8Settings()
    if calibration is not None:
        calib.save(manifest, calibration)  # every INT8 graph is calibrated on calibration/
    calibration = calib.load(manifest) if "int8" in precisions or manifest.calibration else None
    manifest.verify(["fp32"])
    sample = _sample_inputs(manifest, calibration)
    staging = make_staging_dir(manifest.root, ".precision-")  # a killed pass's is removed later
    try:
        records = {}
        for precision in precisions:
            out_dir = staging / "onnx" / precision
            graphs = _make_graphs(manifest, precision, out_dir, calibration, int8)
            tool = ({"pass": "trt_exit.export.fp16.convert_to_fp16",
                     "fp32_op_types": sorted(FP32_OP_TYPES),
                     "fp32_also": "confidence computation; graph inputs and outputs"}
                    if precision == "fp16" else
                    {"pass": "onnxruntime.quantization.quantize_static (QDQ, TensorRT convention)",
                     "onnxruntime": ort.__version__, "settings": int8.to_dict(),
                     "calibration_sha256": manifest.calibration["file"]["sha256"],
                     "calibration_samples": len(calibration),
                     "calibrated_on": "each stage on the outputs of the INT8 stages before it"})
            parity = _compare_with_fp32(manifest, precision, out_dir, sample)
            parity["samples_from"] = ("the calibration set" if calibration is not None else
                                      "seeded random normal inputs (no calibration set)")
            records[precision] = {
                **tool, "graphs": graphs, "parity": parity,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            }
        _commit(manifest, staging, records)
    finally:
        remove_staging_dir(staging)
    # Each precision's chain as one graph too, with the thresholds the manifest has for it.
    from trt_exit.export.early_exit_writer import write_early_exit_graphs

    return write_early_exit_graphs(manifest, precisions, sample)
