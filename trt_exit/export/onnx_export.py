"""Export a multi-exit model to one ONNX graph per stage, plus the no-exit baseline graph.

Every graph has a dynamic batch dimension, is checked with ``onnx.checker`` (full check, with
shape inference), is compared with PyTorch under :mod:`trt_exit.export.parity`, and only then
moved into place; the manifest is written last. A failure at any step leaves no manifest that
points at half-written or mismatched files.

Exporter: TorchScript-based ``torch.onnx.export(dynamo=False)`` at opset 17, the lowest opset
with a native ``LayerNormalization`` (which TensorRT keeps in FP32; see FACTS.md on FP16
LayerNorm overflow) and one that TensorRT 10.3's parser supports. The dynamo exporter can be
chosen with ``exporter="dynamo"``; it emits opset 18+.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from trt_exit import tensor_names as tn
from trt_exit.errors import ArtifactError, ConfigError
from trt_exit.export import parity
from trt_exit.export.stages import Stage, full_model_io, split_stages
from trt_exit.manifest import MANIFEST_NAME, ExitEntry, FileRef, Manifest, TensorSpec
from trt_exit.models.multi_exit import MultiExitModel

OPSET = 17
EXPORTERS = ("torchscript", "dynamo")


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silences the exporter's deprecation and tracer chatter (not errors)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def export_onnx(
    module: torch.nn.Module,
    inputs: list[tuple[str, torch.Tensor]],
    output_names: list[str],
    path: str | os.PathLike,
    exporter: str = "torchscript",
    opset: int = OPSET,
) -> Path:
    """Exports ``module`` to ``path`` with a dynamic batch on every tensor, then checks it.

    Args:
        module: Module taking the tensors of ``inputs`` positionally.
        inputs: ``(name, example tensor)`` pairs in the module's argument order.
        output_names: Names of the module's outputs, in order.
        path: Destination; written only if the export and the check succeed.
        exporter: ``"torchscript"`` (opset ``opset``) or ``"dynamo"`` (opset 18 or more).
        opset: ONNX opset for the TorchScript exporter.

    Returns:
        ``path``.
    """
    import onnx

    from trt_exit.fileio import atomic_path

    if exporter not in EXPORTERS:
        raise ConfigError(f"unknown exporter {exporter!r}; choose one of {EXPORTERS}")
    names = [n for n, _ in inputs]
    args = tuple(t for _, t in inputs)
    module.eval()
    with atomic_path(path) as tmp, _quiet_exporter(), torch.no_grad():
        if exporter == "torchscript":
            torch.onnx.export(
                module, args, str(tmp), input_names=names, output_names=output_names,
                dynamic_axes={n: {0: "batch"} for n in names + output_names},
                opset_version=opset, do_constant_folding=True, dynamo=False,
            )
        else:
            batch = torch.export.Dim("batch", min=1, max=4096)
            program = torch.onnx.export(
                module, args, input_names=names, output_names=output_names,
                dynamic_shapes=[{0: batch} for _ in args], opset_version=max(opset, 18),
                dynamo=True, optimize=True, verbose=False,
            )
            program.save(str(tmp))
        model = onnx.load(str(tmp))
        onnx.checker.check_model(model, full_check=True)
    return Path(path)


def _stage_feeds(entry_inputs: list[TensorSpec], values: dict[str, torch.Tensor]):
    return [(t.name, values[t.name]) for t in entry_inputs]


@torch.no_grad()
def _stage_values(stages: list[Stage], inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Runs the stages in order on ``inputs``; returns every tensor by name."""
    values = dict(inputs)
    for stage in stages:
        results = stage.module(*[values[n] for n in stage.entry.input_names()])
        if isinstance(results, torch.Tensor):
            results = (results,)
        values.update(zip(stage.entry.output_names(), results))
    return values


def _as_numpy(values: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in values.items()}


def export_model(
    model: MultiExitModel,
    out_dir: str | os.PathLike,
    sample_inputs: dict[str, np.ndarray] | None = None,
    exporter: str = "torchscript",
    extra: dict[str, Any] | None = None,
) -> Manifest:
    """Exports every stage of ``model`` and the baseline graph; writes ``manifest.json``.

    Args:
        model: Trained model.
        out_dir: Output directory; gets ``onnx/fp32/<stage>.onnx``, ``onnx/fp32/full.onnx``,
            ``onnx/fp32/early_exit.onnx`` (the whole chain as one graph, see
            :mod:`trt_exit.export.early_exit_graph`) and ``manifest.json``. An existing manifest
            there is replaced only on success.
        sample_inputs: Real model inputs by name, (B, ...) float32, used for the parity check
            (random normal data when None).
        exporter: ``"torchscript"`` or ``"dynamo"``, see the module docstring.
        extra: Extra top-level manifest fields (e.g. ``{"tuning": ...}``).

    Returns:
        The saved manifest.

    Raises:
        ParityError: A graph differs from PyTorch beyond the tolerance in
            :mod:`trt_exit.export.parity`.
    """
    import onnx

    from trt_exit.runtime.backends.onnxruntime import OrtStageRunner

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    shapes = model.input_shapes()
    if sample_inputs is None:
        generator = np.random.default_rng(0)
        sample_inputs = {n: generator.standard_normal((4, *s)).astype(np.float32)
                         for n, s in shapes.items()}
    for name, shape in shapes.items():
        if name not in sample_inputs or tuple(sample_inputs[name].shape[1:]) != shape:
            raise ConfigError(f"sample input {name!r} must have shape (B, {', '.join(map(str, shape))})")
    torch_inputs = {n: torch.from_numpy(np.ascontiguousarray(sample_inputs[n], dtype=np.float32))
                    for n in shapes}
    example = {n: t[:2] for n, t in torch_inputs.items()}
    stages = split_stages(model, example)
    full_module, full_inputs, full_outputs = full_model_io(model, example)

    # Export into a staging directory first; move into place only when everything checks out.
    from trt_exit.fileio import make_staging_dir, remove_staging_dir

    staging = make_staging_dir(out_dir, ".export-")  # locked: a killed export's is removed later
    try:
        rel = Path("onnx") / "fp32"
        example_values = _stage_values(stages, example)
        for stage in stages:
            export_onnx(stage.module, _stage_feeds(stage.entry.inputs, example_values),
                        stage.entry.output_names(), staging / rel / f"{stage.entry.name}.onnx",
                        exporter)
        full_rel = rel / f"{tn.FULL_MODEL}.onnx"
        export_onnx(full_module, _stage_feeds(full_inputs, example),
                    [t.name for t in full_outputs], staging / full_rel, exporter)

        # Parity: each stage graph against its module, on the sample inputs.
        runners = {s.entry.name: OrtStageRunner(s.entry.name, staging / rel / f"{s.entry.name}.onnx",
                                                s.entry.inputs, s.entry.outputs)
                   for s in stages}
        modules = {s.entry.name: s for s in stages}

        def run_torch(name: str, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            stage = modules[name]
            tensors = [torch.from_numpy(values[n]) for n in stage.entry.input_names()]
            with torch.no_grad():
                results = stage.module(*tensors)
            if isinstance(results, torch.Tensor):
                results = (results,)
            return _as_numpy(dict(zip(stage.entry.output_names(), results)))

        def run_onnx(name: str, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return runners[name].run(values)

        report = parity.check_stages([s.entry.name for s in stages], run_torch, run_onnx,
                                     _as_numpy(torch_inputs))
        full_runner = OrtStageRunner("full", staging / full_rel, full_inputs, full_outputs)
        with torch.no_grad():
            full_ref = full_module(*[torch_inputs[t.name] for t in full_inputs])
        full_record = parity.compare_outputs(
            tn.FULL_MODEL, _as_numpy(dict(zip([t.name for t in full_outputs], full_ref))),
            full_runner.run(_as_numpy(torch_inputs)))
        if not full_record["ok"]:
            raise parity.ParityError(f"full-model graph does not match PyTorch: {full_record}")
        report["stages"].append(full_record)
        trained = getattr(model, "trained_reference", None)  # set by load_checkpoint
        if trained is not None:
            report["trained_model"] = parity.check_trained(
                model, trained, [s.entry.name for s in stages], run_onnx)
        # Heads may append columns to their output (a predicted error scale): record how many
        # leading columns are the prediction, so runtimes report values only.
        value_columns = int(model.exits[-1].prediction(full_ref[0]).shape[1])
        report["samples"] = int(next(iter(torch_inputs.values())).shape[0])

        # Move into place: old manifest first (so no stale manifest points at new files).
        (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
        (out_dir / rel).mkdir(parents=True, exist_ok=True)
        for path in sorted((staging / rel).iterdir()):
            os.replace(path, out_dir / rel / path.name)
    finally:
        remove_staging_dir(staging)

    for stage in stages:
        stage.entry.onnx["fp32"] = FileRef.of(out_dir / rel / f"{stage.entry.name}.onnx", out_dir)
    config = model.config
    exits = []
    for index, spec in enumerate([*config.exits, config.head]):
        head = model.exits[index]
        exits.append(ExitEntry(
            index=index, after_block=model.exit_blocks[index], type=head.type_name,
            confidence=head.confidence_measure, threshold=None if index < model.num_exits - 1 else 0.0,
            options=head.options()))
    manifest = Manifest(
        model={"name": config.name, "task": config.task, "num_outputs": config.num_outputs,
               "class_names": config.class_names, "config": config.to_dict(),
               "value_columns": value_columns},
        inputs=[TensorSpec(n, [-1, *s]) for n, s in shapes.items()],
        stages=[s.entry for s in stages],
        exits=exits,
        full_model={"onnx": {"fp32": FileRef.of(out_dir / full_rel, out_dir)},
                    "inputs": full_inputs, "outputs": full_outputs},
        preprocessing=dict(config.preprocessing),
        parity={"fp32": report},
        export={"exporter": exporter, "opset": OPSET if exporter == "torchscript" else 18,
                "torch": torch.__version__, "onnx": onnx.__version__,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")},
        root=out_dir.resolve(),
    )
    for key, value in (extra or {}).items():
        setattr(manifest, key, value)
    manifest.save()
    # The whole chain as one graph too (untuned: every sample takes the final head until
    # trt-exit tune writes the thresholds into it).
    from trt_exit.export.early_exit_writer import write_early_exit_graphs

    return write_early_exit_graphs(manifest, ["fp32"], sample_inputs)


def check_onnx_file(path: str | os.PathLike) -> None:
    """Loads and fully checks an ONNX file; damage is an :class:`ArtifactError` naming it."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"ONNX file {path} does not exist")
    try:
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    except Exception as exc:  # onnx raises DecodeError, ValidationError, ...
        raise ArtifactError(f"{path} is not a valid ONNX model ({type(exc).__name__}: {exc})") from exc
