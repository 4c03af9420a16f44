"""A served model's inputs and outputs, and the step every server runs per batch of requests.

Triton's dynamic batcher hands a model several requests at once (each with a batch of one or
more samples). :func:`run_requests` checks each request on its own, runs the valid ones as one
executor batch, in which every sample leaves at its own exit (the executor compacts the rows
that continue), and splits the results back per request. A request that fails the check gets
its own error; the others in the batch are unaffected.

Outputs of a served model, per sample (names are the contract with clients):

* ``output`` (K,) float32: the output of the exit the sample took (logits or values);
* ``exit_index`` (1,) int32: that exit (0-based; the final head is ``num_exits - 1``);
* ``confidence`` (1,) float32: that exit's confidence;
* ``prediction``: the class (1,) int64 for classification, the values (V,) float32 for
  regression;
* ``error`` (1,) bytes, PyTriton only: empty, or why this request was refused (PyTriton has no
  per-request error responses for batched models; the stock-Triton model uses real ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from trt_exit import tensor_names as tn
from trt_exit.errors import ConfigError, InputError
from trt_exit.manifest import Manifest
from trt_exit.runtime.executor import ExitResults, validate_inputs

OUTPUT = "output"
EXIT_INDEX = "exit_index"
CONFIDENCE = "confidence"
PREDICTION = "prediction"
ERROR = "error"

#: numpy dtype name -> Triton's datatype name (config.pbtxt uses ``TYPE_`` + this).
TRITON_DTYPES = {"float32": "FP32", "float16": "FP16", "int32": "INT32", "int64": "INT64",
                 "uint8": "UINT8", "object": "BYTES"}


@dataclass(frozen=True)
class TensorIO:
    """One tensor of the served model: name, per-sample dims (no batch), numpy dtype name."""

    name: str
    dims: tuple[int, ...]
    dtype: str

    @property
    def triton_dtype(self) -> str:
        """``FP32``, ``INT64``, ... (the wire name; config.pbtxt prefixes ``TYPE_``)."""
        return TRITON_DTYPES[self.dtype]


def served_inputs(manifest: Manifest) -> list[TensorIO]:
    """The model's inputs as the manifest declares them."""
    return [TensorIO(spec.name, tuple(int(d) for d in spec.shape[1:]), spec.dtype)
            for spec in manifest.inputs]


def served_outputs(manifest: Manifest, errors_in_band: bool = False) -> list[TensorIO]:
    """The outputs listed in the module docstring, sized from the final exit's output."""
    final = manifest.num_exits - 1
    specs = {t.name: t for t in manifest.exit_stage(final).outputs}
    name = tn.exit_output(final)
    if name not in specs:
        raise ConfigError(f"{manifest.path}: stage exit_{final} does not declare {name}; "
                          f"re-export the model")
    width = int(specs[name].shape[-1])
    if manifest.task == "classification":
        prediction = TensorIO(PREDICTION, (1,), "int64")
    else:
        prediction = TensorIO(PREDICTION, (manifest.value_columns or width,), "float32")
    outputs = [TensorIO(OUTPUT, (width,), "float32"), TensorIO(EXIT_INDEX, (1,), "int32"),
               TensorIO(CONFIDENCE, (1,), "float32"), prediction]
    if errors_in_band:
        outputs.append(TensorIO(ERROR, (1,), "object"))
    return outputs


def engines_max_batch(manifest: Manifest, precision: str) -> int | None:
    """The largest batch every stage's TensorRT engines of ``precision`` accept (the smallest
    of the stages' profile maxima), or None if the model has no such engines."""
    limits = []
    for stage in manifest.stages:
        maxima = [int(record["profile"]["max_batch"]) for record in stage.engines.values()
                  if record.get("precision") == precision and "profile" in record]
        if not maxima:
            return None
        limits.append(max(maxima))
    return min(limits) if limits else None


def served_model_name(manifest: Manifest, requested: str | None) -> str:
    """The name clients use: ``requested`` (``--model-name``), else the manifest's. It becomes
    a folder of a Triton repository and a part of every URL, so it must be a model name
    (letters, digits, ``_ . : -``; :data:`trt_exit.manifest_schema.MODEL_NAME`).

    Raises:
        ConfigError: It is not one.
    """
    from trt_exit.manifest_schema import MODEL_NAME

    name = requested or manifest.name
    if not MODEL_NAME.match(name):
        shown = name if len(name) <= 60 else name[:57] + "..."
        raise ConfigError(f"--model-name {shown!r} is not a model name: use letters, digits and "
                          f"_ . : - (at most 200 characters)")
    return name


def resolve_max_batch(manifest: Manifest, backend: str, precision: str,
                      requested: int | None, default: int = 16) -> int:
    """The server's max batch: ``requested`` (default ``default``), within the engines' profile
    when the model runs on TensorRT engines.

    Raises:
        ConfigError: ``requested`` is below 1, or above what the engines were built for.
    """
    limit = engines_max_batch(manifest, precision)
    if requested is None:
        return limit if limit is not None else default
    if requested < 1:
        raise ConfigError(f"--max-batch must be at least 1, got {requested}")
    if backend == "tensorrt" and limit is not None and requested > limit:
        raise ConfigError(f"--max-batch {requested} is above the {precision} engines' profile "
                          f"(max batch {limit}): lower it, or rebuild with trt-exit build "
                          f"--max-batch {requested}")
    return requested


def result_rows(results: ExitResults, rows: slice) -> dict[str, np.ndarray]:
    """The served outputs of ``rows`` of an executor run."""
    if results.task == "classification":
        prediction = np.asarray(results.prediction[rows], np.int64)[:, None]
    else:
        prediction = np.ascontiguousarray(results.prediction[rows], np.float32)
    return {
        OUTPUT: np.ascontiguousarray(results.output[rows], np.float32),
        EXIT_INDEX: np.asarray(results.exit_index[rows], np.int32)[:, None],
        CONFIDENCE: np.asarray(results.confidence[rows], np.float32)[:, None],
        PREDICTION: prediction,
    }


def run_requests(executor, requests: Sequence[dict[str, Any]],
                 policy=None) -> list[dict[str, np.ndarray] | InputError]:
    """Runs a dynamic batch of requests as one executor batch.

    Args:
        executor: The host :class:`~trt_exit.runtime.executor.Executor` or the CUDA executor.
        requests: Each request's inputs by name, each (B_i, ...) with its own batch size.
        policy: Exit policy (None: the executor's).

    Returns:
        Per request, in order: its outputs (see the module docstring), or the
        :class:`InputError` that refused it (wrong inputs, NaN or Inf values).
    """
    answers: list[dict[str, np.ndarray] | InputError | None] = [None] * len(requests)
    valid: list[tuple[int, dict[str, np.ndarray]]] = []
    for i, inputs in enumerate(requests):
        try:
            valid.append((i, validate_inputs(executor.manifest, dict(inputs))))
        except InputError as exc:
            answers[i] = exc
    if valid:
        names = list(valid[0][1])
        batch = {name: np.concatenate([feeds[name] for _, feeds in valid])
                 for name in names} if len(valid) > 1 else valid[0][1]
        results = executor.run(batch, policy)
        start = 0
        for i, feeds in valid:
            size = len(feeds[names[0]])
            answers[i] = result_rows(results, slice(start, start + size))
            start += size
    return answers  # type: ignore[return-value]


def exit_counts(answers: Sequence[dict[str, np.ndarray] | InputError], num_exits: int) -> list[int]:
    """Samples per exit over the answered requests (for metrics)."""
    counts = [0] * num_exits
    for answer in answers:
        if isinstance(answer, dict):
            for k in answer[EXIT_INDEX][:, 0]:
                counts[int(k)] += 1
    return counts
