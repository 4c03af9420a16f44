"""ONNX Runtime backend: the CPU default, available on every machine.

One ``InferenceSession`` per stage. Each session gets one intra-op thread by default: the
executor runs stages one after another, and several spinning thread pools fighting over a few
cores cost more than they give at the small batch sizes early exiting is for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from trt_exit.errors import ArtifactError, InputError, StageError
from trt_exit.manifest import Manifest, StageEntry, TensorSpec, check_graph_io, ort_type_name
from trt_exit.runtime.backends.base import Backend, StageRunner


def session_options(threads: int = 1):
    """ONNX Runtime session options: ``threads`` intra-op threads, sequential execution."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


def open_session(path: str | Path | bytes, threads: int = 1, what: str | None = None):
    """An ``InferenceSession`` on the CPU for a graph file, or a serialized graph (bytes;
    ``what`` names it in messages); a damaged graph is an :class:`ArtifactError`.

    ONNX Runtime takes file names as UTF-8 only: a graph under a folder whose name is not (a
    Latin-1 name on a Linux disk) is read here and given to it as bytes.
    """
    import onnxruntime as ort

    source: str | bytes = path if isinstance(path, bytes) else str(path)
    what = what or str(path)
    if isinstance(source, str):
        try:
            source.encode("utf-8")
        except UnicodeEncodeError:
            try:
                source = Path(path).read_bytes()
            except OSError as exc:
                raise ArtifactError(f"cannot read {path} ({exc.strerror})") from exc
    try:
        return ort.InferenceSession(source, session_options(threads),
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types for bad graphs
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        reason = lines[0][:300] + ("..." if len(lines) > 1 or len(lines[0]) > 300 else "")
        raise ArtifactError(
            f"ONNX Runtime cannot load {what}: {reason}; re-export the model"
        ) from exc


class OrtStageRunner(StageRunner):
    """Runs one ONNX graph with ONNX Runtime on the CPU.

    On load the graph's input and output names, dtypes and shapes are checked against the
    manifest's (a graph replaced by one with the same tensor names but other shapes is refused);
    every run checks the outputs' dtypes and shapes too, and a failure inside ONNX Runtime is a
    :class:`~trt_exit.errors.StageError` naming the stage.
    """

    def __init__(self, name: str, path: str | Path, inputs: list[TensorSpec],
                 outputs: list[TensorSpec], threads: int = 1):
        super().__init__(name, inputs, outputs)
        self.path = Path(path)
        self.session = open_session(path, threads)

        def declared(args) -> dict[str, tuple[str, list]]:
            return {a.name: (ort_type_name(a.type),
                             [d if isinstance(d, int) else None for d in a.shape]
                             if a.shape is not None else None) for a in args}

        check_graph_io(f"stage {name}", path, inputs, outputs,
                       declared(self.session.get_inputs()), declared(self.session.get_outputs()))
        self._input_names = [t.name for t in inputs]
        self._output_names = [t.name for t in outputs]
        self._expected = [(t.name, np.dtype(t.dtype), tuple(t.shape[1:])) for t in outputs]

    def run(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        try:
            inputs = {name: feeds[name] for name in self._input_names}
        except KeyError as exc:
            raise InputError(f"stage {self.name} needs input {exc.args[0]!r}") from None
        try:
            values = self.session.run(self._output_names, inputs)
        except Exception as exc:  # ORT's own exception types (Fail, InvalidArgument, ...)
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StageError(f"stage {self.name} failed in ONNX Runtime ({self.path.name}): "
                             f"{message}") from exc
        batch = len(next(iter(inputs.values()))) if inputs else None
        for (name, dtype, shape), value in zip(self._expected, values):
            if value.dtype != dtype or value.shape[1:] != shape or (
                    batch is not None and value.shape[0] != batch):
                raise StageError(
                    f"stage {self.name} ({self.path.name}) returned {name} as {value.dtype} "
                    f"{value.shape}, the manifest says {dtype} (batch {batch}, {shape}): the "
                    f"graph does not match the manifest; re-export the model")
        return dict(zip(self._output_names, values))

    def close(self) -> None:
        self.session = None


class OnnxRuntimeBackend(Backend):
    """Stage runners on ONNX Runtime's CPU execution provider.

    Args:
        threads: Intra-op threads per session (default 1, see the module docstring).
    """

    name = "onnxruntime"

    def __init__(self, threads: int = 1):
        self.threads = threads

    def open_stage(self, manifest: Manifest, stage: StageEntry, precision: str) -> OrtStageRunner:
        path = manifest.onnx_path(stage, precision)
        return OrtStageRunner(stage.name, path, stage.inputs, stage.outputs, self.threads)

    def open_full_model(self, manifest: Manifest, precision: str) -> OrtStageRunner:
        path = manifest.full_model_path(precision)
        return OrtStageRunner("full", path, manifest.full_model["inputs"],
                              manifest.full_model["outputs"], self.threads)

    def describe(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {"backend": self.name, "onnxruntime": ort.__version__, "threads": self.threads,
                "provider": "CPUExecutionProvider"}
