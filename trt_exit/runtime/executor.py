"""The executor: runs a manifest's stages under an exit policy.

This is the host-side executor, used with every backend that takes host arrays (ONNX Runtime on
the CPU, the default). It runs segment 0, exit 0, segment 1, ... and after each exit compares the
per-sample confidence with the threshold. Samples that exit keep their result; by default the
batch is compacted so later stages only compute the samples still running (free with a dynamic
batch on the CPU). The CUDA-stream executor (:mod:`trt_exit.runtime.cuda_executor`) makes the
same decisions on the GPU.

Strategies (ONNX Runtime): ``stages`` drives the stage graphs one call at a time, deciding in
Python; ``single_graph`` runs the model's single early-exit graph (the whole chain with nested
``If`` nodes, :mod:`trt_exit.runtime.single_graph`) in one call per batch, with the same
per-sample decisions (without compacting the batch); ``auto`` (the default) takes what the
tuner measured faster on this machine (``manifest.tuning[precision]["strategy"]``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from trt_exit import tensor_names as tn
from trt_exit.errors import ConfigError, InputError, StageError, TrtExitError
from trt_exit.manifest import Manifest
from trt_exit.profiling.nvtx import nvtx_range
from trt_exit.runtime import DEFAULT_CHUNK
from trt_exit.runtime.backends.base import Backend, StageRunner
from trt_exit.runtime import single_graph as sg
from trt_exit.runtime.policies import (
    AllExitsPolicy,
    DeadlinePolicy,
    FixedExitPolicy,
    Policy,
    ThresholdPolicy,
)

log = logging.getLogger(__name__)


@dataclass
class ExitResults:
    """Per-sample results of one executor run.

    Attributes:
        exit_index: (B,) int32, the exit each sample took (the final head is ``num_exits - 1``).
        output: (B, K) float32, the output of the exit each sample took (logits or values).
        confidence: (B,) float32, that exit's confidence.
        task: ``"classification"`` or ``"regression"``.
        latency_ms: Wall time of the whole run, in milliseconds.
        all_outputs: With :class:`AllExitsPolicy`: (E, B, K), every exit's output.
        all_confidences: With :class:`AllExitsPolicy`: (E, B), every exit's confidence.
        strategy: How the run was driven: ``stages`` or ``single_graph`` (host executor),
            ``graph``, ``poll`` or ``eager`` (CUDA executor).
        host_syncs: CUDA executor only: times the host waited for the GPU during the run.
        device: CUDA executor only (graph and poll): the same results in the executor's device
            buffers (``__cuda_array_interface__`` views, valid until its next run), see
            :class:`trt_exit.runtime.cuda_executor.DeviceResults`.
        value_columns: Regression: how many leading output columns are predicted values (heads
            may append e.g. a predicted error scale); None: all of them.
    """

    exit_index: np.ndarray
    output: np.ndarray
    confidence: np.ndarray
    task: str
    latency_ms: float
    all_outputs: np.ndarray | None = None
    all_confidences: np.ndarray | None = None
    strategy: str | None = None
    host_syncs: int | None = None
    device: Any = None
    value_columns: int | None = None

    @property
    def prediction(self) -> np.ndarray:
        """Class index (B,) for classification, the predicted values (B, V) for regression."""
        if self.task == "classification":
            return self.output.argmax(axis=1)
        return self.output[:, : self.value_columns] if self.value_columns else self.output

    def __len__(self) -> int:
        return len(self.exit_index)

    def records(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per sample (a non-finite confidence or value becomes None).

        Linear in the batch: the predictions are computed once for the whole batch.
        """
        prediction = self.prediction
        values = prediction.tolist()  # (B,) class indices or (B, V) values
        if prediction.dtype.kind == "f" and not np.isfinite(prediction).all():
            values = [[v if math.isfinite(v) else None for v in row] for row in values]
        confidence = self.confidence.astype(np.float64).tolist()
        return [{"exit": e, "prediction": p, "confidence": c if math.isfinite(c) else None}
                for e, p, c in zip(self.exit_index.tolist(), values, confidence)]


def create_backend(name: str | Backend, **options: Any) -> Backend:
    """A backend by name: ``onnxruntime`` (CPU), ``torch`` (CUDA) or ``tensorrt``."""
    if isinstance(name, Backend):
        return name
    if name == "onnxruntime":
        from trt_exit.runtime.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(**options)
    if name == "torch":
        from trt_exit.runtime.backends.torch_backend import TorchBackend

        return TorchBackend(**options)
    if name == "tensorrt":
        from trt_exit.runtime.backends.tensorrt_backend import TensorRTBackend

        return TensorRTBackend(**options)
    raise ConfigError(f"unknown backend {name!r}; choose onnxruntime, torch or tensorrt")


def default_policy(manifest: Manifest, precision: str | None = None) -> Policy:
    """Tuned thresholds from the manifest (for ``precision`` if tuned for it), or the final
    head if the model is not tuned yet."""
    thresholds = manifest.thresholds(precision)
    if thresholds is None:
        log.info("%s has no tuned thresholds; every sample takes the final head (run trt-exit "
                 "tune to enable early exits)", manifest.path)
        return FixedExitPolicy(-1)
    return ThresholdPolicy(thresholds)


def validate_inputs(manifest: Manifest, inputs: Any, device_arrays: bool = False) -> dict[str, Any]:
    """Checks model inputs against the manifest; returns them by name.

    Args:
        manifest: The model's manifest.
        inputs: One array (models with one input) or a mapping from input name to array.
        device_arrays: Whether the backend accepts ``__cuda_array_interface__`` objects.

    Raises:
        InputError: A missing or unknown input, wrong type, dtype, rank or shape, an empty
            batch, inputs with different batch sizes, or NaN / Inf values; the message names the
            tensor and what was expected.
    """
    specs = {s.name: s for s in manifest.inputs}
    if not isinstance(inputs, Mapping):
        if len(specs) != 1:
            raise InputError(f"this model takes {sorted(specs)}: pass a dict of arrays by name")
        inputs = {next(iter(specs)): inputs}
    missing = set(specs) - set(inputs)
    unknown = set(inputs) - set(specs)
    if missing or unknown:
        raise InputError(
            f"inputs {sorted(inputs)} do not match the model's inputs {sorted(specs)}"
            + (f" (missing {sorted(missing)})" if missing else "")
            + (f" (unknown {sorted(unknown)})" if unknown else "")
        )
    feeds: dict[str, Any] = {}
    batch = None
    for name, spec in specs.items():
        value = inputs[name]
        expected = f"({', '.join(['B'] + [str(d) for d in spec.shape[1:]])}) {spec.dtype}"
        if hasattr(value, "__cuda_array_interface__") and not hasattr(value, "__array_interface__"):
            if not device_arrays:
                raise InputError(
                    f"input {name!r} is in GPU memory, but this backend runs on the CPU: copy it "
                    f"to the host first (e.g. tensor.cpu()), or use the torch / tensorrt backend"
                )
            interface = value.__cuda_array_interface__
            if np.dtype(interface["typestr"]) != np.dtype(spec.dtype):
                raise InputError(
                    f"input {name!r} has dtype {np.dtype(interface['typestr'])}, expected "
                    f"{expected}: convert it on the GPU first (e.g. tensor.float())"
                )
            feeds[name] = value
            shape = tuple(interface["shape"])
        else:
            if hasattr(value, "detach") and getattr(value, "is_cuda", False):
                raise InputError(f"input {name!r} is a CUDA tensor; this backend needs host arrays")
            try:
                array = np.asarray(value.detach() if hasattr(value, "detach") else value)
            except (TypeError, ValueError) as exc:
                raise InputError(f"input {name!r} is not an array ({type(value).__name__})") from exc
            if array.dtype != np.dtype(spec.dtype):
                raise InputError(
                    f"input {name!r} has dtype {array.dtype}, expected {expected}: convert it "
                    f"with .astype(np.{spec.dtype})"
                )
            if not np.isfinite(array).all():
                bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
                first = tuple(int(i) for i in np.argwhere(~np.isfinite(array))[0])
                raise InputError(
                    f"input {name!r} contains {bad} NaN or Inf values (first at index {first}); "
                    f"the model needs finite inputs"
                )
            feeds[name] = np.ascontiguousarray(array)
            shape = array.shape
        if len(shape) != len(spec.shape) or tuple(shape[1:]) != tuple(spec.shape[1:]):
            raise InputError(f"input {name!r} has shape {tuple(shape)}, expected {expected}")
        if shape[0] < 1:
            raise InputError(f"input {name!r} has an empty batch")
        if batch is not None and shape[0] != batch:
            raise InputError(f"inputs have different batch sizes ({batch} and {shape[0]})")
        batch = shape[0]
    return feeds


def run_stage(runner: StageRunner, values: dict[str, Any], backend: str) -> dict[str, Any]:
    """``runner.run(values)``; a backend's own exception becomes a :class:`StageError` naming the
    stage and the backend (errors trt_exit raises on purpose pass through)."""
    try:
        return runner.run(values)
    except TrtExitError:
        raise
    except Exception as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise StageError(f"stage {runner.name} failed on the {backend} backend: "
                         f"{type(exc).__name__}: {message}") from exc


class Executor:
    """Runs a multi-exit model stage by stage under an exit policy.

    Args:
        manifest: A :class:`Manifest` or the path of one (file or directory).
        backend: Backend name (``"onnxruntime"``, ``"torch"``, ``"tensorrt"``) or instance.
        precision: Which graphs to run: ``"fp32"``, ``"fp16"`` or ``"int8"``.
        policy: Default exit policy (default: the manifest's tuned thresholds).
        compact: Drop exited samples from the batch before the next stage (``stages``).
        backend_options: Keyword options for the backend (e.g. ``threads``).
        strategy: ``auto`` (default), ``stages`` or ``single_graph`` (see the module
            docstring); :meth:`run` may override it per call.

    Use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        manifest: Manifest | str | Path,
        backend: str | Backend = "onnxruntime",
        precision: str = "fp32",
        policy: Policy | None = None,
        compact: bool = True,
        backend_options: dict[str, Any] | None = None,
        strategy: str = "auto",
    ):
        self.manifest = manifest if isinstance(manifest, Manifest) else Manifest.load(manifest)
        self.backend = create_backend(backend, **(backend_options or {}))
        self.precision = precision
        self.compact = compact
        self.num_exits = self.manifest.num_exits
        self.runners: dict[str, StageRunner] = {}
        self._full: StageRunner | None = None
        self._graphs: dict[Any, Any] = {}  # ChainPlan -> SingleGraphRunner
        self._graph_file: Any = None  # the manifest's graph file's runner, once opened
        self._stale: Any = None  # why the graph file is not used (a StaleGraphError)
        self._plans: dict[tuple, Any] = {}  # policy value -> (ChainPlan, thresholds)
        try:
            self.strategy = self._check_strategy(strategy)
        except BaseException:
            self.backend.close()
            raise
        self._auto_max_batch = sg.auto_max_batch(self.manifest, precision, self.backend.name)
        try:
            for stage in self.manifest.stages:
                self.runners[stage.name] = self.backend.open_stage(self.manifest, stage, precision)
        except BaseException:
            self.close()
            raise
        n = self.num_exits
        self._segment_names = [tn.stage_name(tn.SEGMENT, k) for k in range(n)]
        self._exit_names = [tn.stage_name(tn.EXIT, k) for k in range(n)]
        self._output_names = [tn.exit_output(k) for k in range(n)]
        self._confidence_names = [tn.exit_confidence(k) for k in range(n)]
        # Exits whose state each exit reads (the BoF family hands histograms along).
        self._state_providers = [
            [int(t.name.split("_")[1]) for t in self.manifest.exit_stage(k).inputs
             if t.name.endswith("_state")]
            for k in range(n)
        ]
        self.policy = policy or default_policy(self.manifest, precision)
        self.policy.validate(self.num_exits)
        self._device_arrays = bool(getattr(self.backend, "device_arrays", False))
        spec = self.manifest.inputs[0]
        self._one_input = ((spec.name, np.dtype(spec.dtype), tuple(spec.shape[1:]))
                           if len(self.manifest.inputs) == 1 else None)

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Releases every stage runner, single graph and the backend."""
        for runner in [*self.runners.values(), *self._graphs.values()]:
            runner.close()
        self.runners.clear()
        self._graphs.clear()
        self._graph_file = None
        if self._full is not None:
            self._full.close()
            self._full = None
        self.backend.close()

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ------------------------------------------------------------------ running

    def validate_inputs(self, inputs: Any) -> dict[str, Any]:
        """See :func:`validate_inputs`. A one-input model's plain numpy batch of the right
        dtype and shape, contiguous and finite, is accepted as it is without the general
        checks (the common streaming case, where they cost a tenth of a small model's run);
        anything else goes through them."""
        one = self._one_input
        if (one is not None and type(inputs) is np.ndarray and inputs.dtype == one[1]
                and inputs.shape[1:] == one[2] and len(inputs) > 0
                and inputs.flags.c_contiguous and np.isfinite(inputs).all()):
            return {one[0]: inputs}
        return validate_inputs(self.manifest, inputs, self._device_arrays)

    def run(self, inputs: Any, policy: Policy | None = None,
            strategy: str | None = None) -> ExitResults:
        """Runs one batch.

        Args:
            inputs: One array (B, ...) or a dict of arrays by input name (float32).
            policy: Overrides the executor's policy for this run.
            strategy: Overrides the executor's strategy for this run.

        Returns:
            Per-sample results.
        """
        feeds = self.validate_inputs(inputs)
        policy = policy or self.policy
        if policy is not self.policy:
            policy.validate(self.num_exits)
        strategy = self.strategy if strategy is None else self._check_strategy(strategy)
        began = time.perf_counter()
        if isinstance(policy, AllExitsPolicy) and strategy != "single_graph":
            results = self._run_all(feeds, began)
        else:
            graph = self._single_graph(policy, strategy, len(next(iter(feeds.values()))))
            if graph is not None:
                results = self._run_graph(*graph, feeds, began)
            else:
                results = self._run_policy(feeds, policy, began)
        results.value_columns = self.manifest.value_columns
        results.strategy = results.strategy or "stages"
        return results

    def run_chunks(self, inputs: Any, chunk: int = DEFAULT_CHUNK,
                   policy: Policy | None = None,
                   strategy: str | None = None) -> Iterator[ExitResults]:
        """Runs a large input ``chunk`` samples at a time; yields each chunk's results.

        Memory stays flat in the number of samples (inputs may be memory-mapped arrays: only
        one chunk is read at a time). Every chunk is checked before the first one runs, so a
        bad sample at the end fails the run before any result is produced.

        Args:
            inputs: One array (N, ...) or a dict of arrays by input name.
            chunk: Samples per :meth:`run`.
            policy: Overrides the executor's policy.
            strategy: Overrides the executor's strategy.
        """
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ConfigError(f"chunk must be a positive number of samples, got {chunk!r}")
        arrays = dict(inputs) if isinstance(inputs, Mapping) else {None: inputs}
        for name, value in arrays.items():
            if not hasattr(value, "__len__") or np.ndim(value) == 0:
                raise InputError(f"input{'' if name is None else f' {name!r}'} is a single value "
                                 f"(0-d), not a batch of samples: give arrays shaped (N, ...)")
        lengths = {name: len(value) for name, value in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise InputError(f"inputs have different numbers of samples: {lengths}")
        total = next(iter(lengths.values()))

        def part(start: int) -> Any:
            sliced = {name: value[start : start + chunk] for name, value in arrays.items()}
            return sliced[None] if None in sliced else sliced

        if total == 0:
            self.validate_inputs(part(0))  # raises: an empty batch
        for start in range(0, total, chunk):
            self.validate_inputs(part(start))
        for start in range(0, total, chunk):
            yield self.run(part(start), policy, strategy)

    def run_full_model(self, inputs: Any) -> ExitResults:
        """Runs the no-exit baseline graph (backbone and final head in one graph)."""
        feeds = self.validate_inputs(inputs)
        if self._full is None:
            self._full = self.backend.open_full_model(self.manifest, self.precision)
        final = self.num_exits - 1
        began = time.perf_counter()
        with nvtx_range("full"):
            values = run_stage(self._full, feeds, self.backend.name)
        latency = (time.perf_counter() - began) * 1e3
        output = np.asarray(values[tn.exit_output(final)])
        batch = output.shape[0]
        return ExitResults(np.full(batch, final, np.int32), output,
                           np.asarray(values[tn.exit_confidence(final)]), self.manifest.task, latency,
                           value_columns=self.manifest.value_columns)

    # ------------------------------------------------------------------ single graph

    def _check_strategy(self, strategy: str) -> str:
        if strategy not in sg.STRATEGIES:
            raise ConfigError(f"unknown strategy {strategy!r}; choose {', '.join(sg.STRATEGIES)}")
        if strategy == "single_graph" and self.backend.name != "onnxruntime":
            raise ConfigError(f"the single early-exit graph runs on ONNX Runtime, not the "
                              f"{self.backend.name} backend: use --backend onnxruntime, or "
                              f"strategy stages")
        return strategy

    def _single_graph(self, policy: Policy, strategy: str, batch: int):
        """``(runner, thresholds)`` of the single graph this run uses, or None for the stages."""
        if strategy == "stages":
            return None
        if strategy == "auto" and (batch > self._auto_max_batch or not sg.supports(policy)):
            return None
        if not sg.supports(policy):
            raise ConfigError(f"{type(policy).__name__} needs the stages one by one; run it "
                              f"with strategy stages (or auto)")
        plan, thresholds = self._plan(policy)
        file_runner = self._file_graph()
        if file_runner is not None and file_runner.plan == plan:
            return file_runner, thresholds
        if strategy == "auto":
            return None  # another plan than the measured graph's, or a stale file: the stages
        if self._stale is not None and self._stale.plan == plan:
            raise self._stale
        if plan not in self._graphs:
            from trt_exit.export.early_exit_graph import compose_early_exit_graph

            log.info("composing the single early-exit graph for %s in memory (exits deciding: "
                     "%s, final %d)", policy.describe(), list(plan.decisions), plan.final)
            model = compose_early_exit_graph(self.manifest, self.precision, plan, thresholds)
            self._graphs[plan] = sg.SingleGraphRunner(
                self.manifest, model.SerializeToString(),
                f"early-exit graph ({self.precision}, composed for {policy.describe()})",
                getattr(self.backend, "threads", 1))
        return self._graphs[plan], thresholds

    def _plan(self, policy: Policy):
        """``(ChainPlan, thresholds to feed)`` of a policy, kept per policy value (the plan
        walks the manifest; the thresholds array is only read by ONNX Runtime)."""
        key = (type(policy), tuple(getattr(policy, "thresholds", ())),
               getattr(policy, "exit_index", None))
        cached = self._plans.get(key)
        if cached is None:
            if len(self._plans) >= 64:  # a sweep over thresholds: keep the memory bounded
                self._plans.clear()
            cached = self._plans[key] = sg.policy_plan(self.manifest, policy)
        return cached

    def _file_graph(self):
        """The runner of the manifest's graph file of this precision (opened once), or None
        (also when the file is stale, see
        :class:`~trt_exit.runtime.single_graph.StaleGraphError`: logged and kept)."""
        if self._graph_file is None and self.precision in self.manifest.early_exit_graph:
            path = self.manifest.early_exit_graph_path(self.precision)  # sha256 checked
            try:
                runner = sg.SingleGraphRunner(self.manifest, path,
                                           f"early-exit graph {path.name} ({self.precision})",
                                           getattr(self.backend, "threads", 1), self.precision)
            except sg.StaleGraphError as exc:
                log.warning("%s", exc)
                self._graph_file, self._stale = False, exc  # not opened again
                return None
            self._graphs[runner.plan] = self._graph_file = runner
        return self._graph_file or None

    def _run_graph(self, graph, thresholds: np.ndarray, feeds: dict[str, Any],
                   began: float) -> ExitResults:
        with nvtx_range("single_graph"):
            output, confidence, index = graph.run(feeds, thresholds)
        latency = (time.perf_counter() - began) * 1e3
        return ExitResults(index.astype(np.int32), output, confidence, self.manifest.task,
                           latency, strategy="single_graph")

    # ------------------------------------------------------------------ stages

    def _run_stage(self, name: str, values: dict[str, Any]) -> dict[str, Any]:
        with nvtx_range(name):
            return run_stage(self.runners[name], values, self.backend.name)

    def _run_all(self, feeds: dict[str, Any], began: float) -> ExitResults:
        values = dict(feeds)
        outputs, confidences = [], []
        for k in range(self.num_exits):
            values.update(self._run_stage(tn.stage_name(tn.SEGMENT, k), values))
            values.update(self._run_stage(tn.stage_name(tn.EXIT, k), values))
            outputs.append(np.asarray(values[tn.exit_output(k)]))
            confidences.append(np.asarray(values[tn.exit_confidence(k)]))
        latency = (time.perf_counter() - began) * 1e3
        final = self.num_exits - 1
        batch = outputs[-1].shape[0]
        return ExitResults(np.full(batch, final, np.int32), outputs[-1], confidences[-1],
                           self.manifest.task, latency, np.stack(outputs), np.stack(confidences))

    def _needed_exits(self, policy: Policy) -> list[bool]:
        """Which exit heads run: enabled ones, and the state providers of those."""
        n = self.num_exits
        if isinstance(policy, DeadlinePolicy):
            return [True] * n
        needed = [policy.exit_enabled(k, n) for k in range(n)]
        for k in reversed(range(n)):
            if needed[k]:
                for provider in self._state_providers[k]:
                    needed[provider] = True
        return needed

    def _run_policy(self, feeds: dict[str, Any], policy: Policy, began: float) -> ExitResults:
        n = self.num_exits
        final = n - 1
        fixed = policy.resolve(n) if isinstance(policy, FixedExitPolicy) else None
        deadline = isinstance(policy, DeadlinePolicy)
        needed = self._needed_exits(policy)
        batch = next(iter(feeds.values())).shape[0]
        if batch == 1:
            return self._run_one(feeds, policy, fixed, deadline, needed, began)
        rows = np.arange(batch)  # original sample index of each row of the current arrays
        alive = np.ones(batch, dtype=bool)  # rows that have not exited yet
        exit_index = np.full(batch, -1, np.int32)
        confidence = np.zeros(batch, np.float32)
        output: np.ndarray | None = None
        values = dict(feeds)
        for k in range(n):
            values.update(self._run_stage(self._segment_names[k], values))
            if not needed[k]:
                continue
            values.update(self._run_stage(self._exit_names[k], values))
            conf = np.asarray(values[self._confidence_names[k]])
            if fixed is not None:
                done = np.full(len(rows), k == fixed)
            elif k == final:
                done = np.ones(len(rows), dtype=bool)
            else:
                threshold = policy.thresholds[k]
                # NaN >= t is False: a NaN confidence never exits.
                done = conf >= threshold if threshold is not None else np.zeros(len(rows), bool)
                if deadline and self._over_budget(policy, k, began):
                    done = np.ones(len(rows), dtype=bool)
            done &= alive
            if done.any():
                out_k = np.asarray(values[self._output_names[k]])
                if output is None:
                    output = np.zeros((batch, *out_k.shape[1:]), out_k.dtype)
                taken = rows[done]
                exit_index[taken] = k
                output[taken] = out_k[done]
                confidence[taken] = conf[done]
                alive &= ~done
                if not alive.any():
                    break
                if self.compact:
                    values = {name: v[alive] for name, v in values.items()}
                    rows, alive = rows[alive], alive[alive]
        latency = (time.perf_counter() - began) * 1e3
        return ExitResults(exit_index, output, confidence, self.manifest.task, latency)

    def _run_one(self, feeds: dict[str, Any], policy: Policy, fixed: int | None, deadline: bool,
                 needed: list[bool], began: float) -> ExitResults:
        """Batch-1 path of :meth:`_run_policy` (the streaming case): the same decisions on a
        Python float instead of per-sample masks, which cost more than a small stage."""
        final = self.num_exits - 1
        values = dict(feeds)
        for k in range(self.num_exits):
            values.update(self._run_stage(self._segment_names[k], values))
            if not needed[k]:
                continue
            values.update(self._run_stage(self._exit_names[k], values))
            conf = values[self._confidence_names[k]]
            if fixed is not None:
                done = k == fixed
            elif k == final:
                done = True
            else:
                threshold = policy.thresholds[k]
                # NaN >= t is False: a NaN confidence never exits.
                done = threshold is not None and float(conf[0]) >= threshold
                done = done or (deadline and self._over_budget(policy, k, began))
            if done:
                latency = (time.perf_counter() - began) * 1e3
                return ExitResults(np.array([k], np.int32), np.asarray(values[self._output_names[k]]),
                                   np.asarray(conf, np.float32).reshape(1), self.manifest.task,
                                   latency)
        raise AssertionError("unreachable: the final exit always exits")

    def _over_budget(self, policy: DeadlinePolicy, k: int, began: float) -> bool:
        """Whether segment k+1 and exit k+1 no longer fit in the remaining budget."""
        elapsed_ms = (time.perf_counter() - began) * 1e3
        latency = policy.stage_latency_ms
        next_ms = latency.get(tn.stage_name(tn.SEGMENT, k + 1), 0.0) + latency.get(
            tn.stage_name(tn.EXIT, k + 1), 0.0)
        return elapsed_ms + next_ms > policy.budget_ms
