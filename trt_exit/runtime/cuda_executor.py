"""The CUDA-stream executor: exit decisions on the GPU, one host synchronization per inference.

Stages run as :class:`~trt_exit.runtime.backends.base.DeviceStageRunner` s (the torch backend
on CUDA, or TensorRT) on one stream, over device buffers allocated once: every tensor name gets
one buffer of ``max_batch`` rows, so segment k's output buffer *is* segment k+1's input, and
stages that need scratch memory share one block sized to the largest. After each exit head a
gate kernel (:mod:`trt_exit.runtime.gate`) decides on the GPU which samples stop there, keeps
earlier results, and says whether anything is left to run. Three strategies drive the chain:

* ``graph``: the whole chain is one CUDA graph: after each gate a conditional IF node whose body
  is the rest of the chain (nested), so skipped stages are never even launched. One graph
  launch and one host synchronization per inference. Needs a CUDA 12.4+ driver.
* ``poll``: the gate writes its decision to mapped pinned memory; the host waits on an event
  after each exit before enqueuing the next segment (any CUDA version).
* ``eager``: the plain host loop: after each exit the confidence and output are copied back and
  the host decides (:func:`~trt_exit.runtime.gate.gate_on_host`). The reference, and the
  baseline benchmarks compare against.

The plan (which stages and gates run, in the order every strategy walks them) is
:mod:`trt_exit.runtime.cuda_plan`. ``auto`` picks graph where the driver supports conditional
nodes, else poll, else eager (only a strategy that can work). When a chain
cannot be captured (a stage that records events or calls host code inside a conditional body,
for example) the executor logs why and polls instead.

Batches are not compacted on the GPU: the chain continues for the whole batch while any sample
is still running, and samples that exited keep their earlier result. Results are identical
across strategies for the same input and policy (deadline decisions depend on time, so they are
identical only away from the budget).

Inputs are numpy arrays (staged through pinned memory and copied in by the graph), or any
``__cuda_array_interface__`` object (torch, CuPy, pycuda), read in place: a CUDA graph is bound
to the addresses it was captured with, so graphs are cached per input address (reuse your input
buffer to avoid captures). Not thread-safe: one executor per thread.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from trt_exit import tensor_names as tn
from trt_exit.errors import ConfigError, CudaError, CudaUnavailableError, InputError
from trt_exit.manifest import Manifest, TensorSpec
from trt_exit.profiling.nvtx import nvtx_range
from trt_exit.runtime.backends.base import Backend, DeviceStageRunner
from trt_exit.runtime.executor import ExitResults, create_backend, default_policy, validate_inputs
from trt_exit.runtime.cuda_plan import (  # noqa: F401  plan_exits, ExitPlan: public API here too
    ChainStep,
    ExitPlan,
    chain_steps,
    choose_strategy,
    conditional_nodes,
    plan_exits,
)
from trt_exit.runtime.gate import GateKernels, GateParams, gate_on_host
from trt_exit.runtime.policies import AllExitsPolicy, Policy

log = logging.getLogger(__name__)

STRATEGIES = ("graph", "poll", "eager")
_ALIGN = 256


def _aligned(size: int) -> int:
    return (size + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclass(frozen=True)
class DeviceResults:
    """Results in the executor's device buffers (valid until its next run; owns nothing).

    Each is a ``__cuda_array_interface__`` view: ``torch.as_tensor(r.output, device="cuda")``.

    Attributes:
        exit_index: (B,) int32.
        output: (B, K) float32.
        confidence: (B,) float32.
    """

    exit_index: Any
    output: Any
    confidence: Any


# --------------------------------------------------------------------------- the executor


class CudaExecutor:
    """Runs a multi-exit model on the GPU with the exit decisions made on the GPU.

    Args:
        manifest: A :class:`Manifest` or the path of one.
        backend: ``"torch"`` (default, CUDA), ``"tensorrt"``, or a :class:`Backend` whose stage
            runners are :class:`DeviceStageRunner` s.
        precision: ``"fp32"``, ``"fp16"`` (or ``"int8"`` with TensorRT).
        policy: Default exit policy (default: the manifest's tuned thresholds).
        strategy: ``"auto"`` (graph where supported, else poll), ``"graph"``, ``"poll"`` or
            ``"eager"``.
        max_batch: Largest batch; buffers are allocated for it once.
        device: CUDA device ordinal.
        backend_options: Keyword options of the backend (the torch backend's device defaults to
            this executor's GPU).
        graph_cache_size: Captured graphs kept (per policy, batch and input address).
        device_timing: Time every run on the GPU too (:attr:`last_device_ms`): CUDA events on
            the executor's stream, one before the run's first work and one before its last
            synchronization.

    Raises:
        CudaUnavailableError: No usable GPU (the message says what to use instead).
        ConfigError: A stage runner that cannot enqueue on a stream, outputs that are not
            float32, or a ``max_batch`` above what the runners support.
    """

    def __init__(self, manifest: Manifest | str | Path, backend: str | Backend = "torch",
                 precision: str = "fp32", policy: Policy | None = None, strategy: str = "auto",
                 max_batch: int = 8, device: int = 0,
                 backend_options: dict[str, Any] | None = None, graph_cache_size: int = 8,
                 device_timing: bool = False):
        from trt_exit.runtime.cuda.api import use_device

        if strategy not in ("auto", *STRATEGIES):
            raise ConfigError(f"unknown strategy {strategy!r}; choose auto, graph, poll or eager")
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"max_batch must be a positive int, got {max_batch!r}")
        self.manifest = manifest if isinstance(manifest, Manifest) else Manifest.load(manifest)
        self.device_info = use_device(device)
        self.device = device
        self.precision = precision
        self.max_batch = max_batch
        self.num_exits = self.manifest.num_exits
        self.graph_cache_size = max(int(graph_cache_size), 1)
        self.runners: dict[str, DeviceStageRunner] = {}
        self._owned: list[Any] = []  # CUDA resources, closed in reverse order
        self._graphs: collections.OrderedDict[tuple, Any] = collections.OrderedDict()
        self._graph_failures: dict[tuple, str] = {}
        self._gates: dict[bool, GateKernels] = {}
        self._kernel_reasons: dict[bool, str] = {}
        self._fallbacks_logged: set[tuple[str, str]] = set()
        self._full = None
        self.device_timing = device_timing
        #: GPU time of the last run (ms) with ``device_timing``, else None.
        self.last_device_ms: float | None = None
        #: Exit chains captured as graphs so far (each capture costs a warm-up and syncs).
        self.captures = 0
        self._timed = False
        self._plans: dict[int, tuple[Policy, str, ExitPlan]] = {}
        options = dict(backend_options or {})
        if backend == "torch":
            options.setdefault("device", f"cuda:{device}")
        elif backend == "tensorrt":
            options.setdefault("device", device)
        self.policy = policy or default_policy(self.manifest, precision)
        self.policy.validate(self.num_exits)
        self.backend = create_backend(backend, **options)
        try:
            self._open_runners()
            self._allocate()
        except BaseException:
            self.close()
            raise
        self.fallback_reason = ""
        self.strategy = self._choose_strategy(strategy)

    # ------------------------------------------------------------------ setup

    def _open_runners(self) -> None:
        for stage in self.manifest.stages:
            runner = self.backend.open_stage(self.manifest, stage, self.precision)
            self.runners[stage.name] = runner
            if not isinstance(runner, DeviceStageRunner):
                raise ConfigError(
                    f"backend {self.backend.name!r} runs stages on the host only; the CUDA "
                    f"executor needs device stage runners (backend 'torch' on CUDA or "
                    f"'tensorrt'); use trt_exit.runtime.executor.Executor for this backend")
            limit = getattr(runner, "max_batch", None)
            if limit is not None and self.max_batch > int(limit):
                raise ConfigError(
                    f"max_batch {self.max_batch} exceeds stage {stage.name}'s limit of {limit} "
                    f"(its engine's optimization profile): rebuild the engines for a larger "
                    f"batch or lower max_batch")
        self._state_providers = [
            [int(t.name.split("_")[1]) for t in self.manifest.exit_stage(k).inputs
             if t.name.endswith("_state")]
            for k in range(self.num_exits)
        ]

    def _specs(self) -> dict[str, TensorSpec]:
        specs: dict[str, TensorSpec] = {s.name: s for s in self.manifest.inputs}
        for stage in self.manifest.stages:
            for spec in [*stage.inputs, *stage.outputs]:
                known = specs.setdefault(spec.name, spec)
                if tuple(known.shape[1:]) != tuple(spec.shape[1:]) or known.dtype != spec.dtype:
                    raise ConfigError(f"{self.manifest.path}: tensor {spec.name} has different "
                                      f"shapes or dtypes in different stages")
        return specs

    def _allocate(self) -> None:
        from trt_exit.runtime.cuda.memory import DeviceBuffer, PinnedBuffer
        from trt_exit.runtime.cuda.stream import Event, Stream

        mb = self.max_batch
        self.specs = self._specs()
        for k in range(self.num_exits):
            for name in (tn.exit_output(k), tn.exit_confidence(k)):
                if np.dtype(self.specs[name].dtype) != np.float32:
                    raise ConfigError(f"{name} is {self.specs[name].dtype}; the gate reads "
                                      f"float32 outputs and confidences (re-export with fp32 I/O)")
        shapes = {tuple(self.specs[tn.exit_output(k)].shape[1:]) for k in range(self.num_exits)}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            raise ConfigError(f"exit outputs have shapes {sorted(shapes)}; the CUDA executor "
                              f"needs every exit to output (B, K) with the same K")
        self.num_outputs = int(next(iter(shapes))[0])
        own = self._own
        self.stream = own(Stream("executor stream"))
        self._body_streams: list[Any] = []
        self._sync_event = own(Event(timing=False))
        self._producer_event = own(Event(timing=False))
        self._time_events = (own(Event(timing=True)), own(Event(timing=True)))
        self.buffers = {
            name: own(DeviceBuffer(mb * _sample_bytes(spec), name))
            for name, spec in self.specs.items()
        }
        self._addresses = {name: b.address for name, b in self.buffers.items()}
        self._scratch = None
        scratch = max((r.scratch_bytes() for r in self.runners.values()), default=0)
        if scratch > 0:
            self._scratch = own(DeviceBuffer(scratch, "shared scratch"))
            for runner in self.runners.values():
                runner.set_scratch(self._scratch.address, scratch)
        # Results: exit index, confidence, output; the same layout on the device and pinned.
        self._offsets = (0, _aligned(4 * mb), 2 * _aligned(4 * mb))
        result_bytes = self._offsets[2] + 4 * mb * self.num_outputs
        self.results_device = own(DeviceBuffer(result_bytes, "results"))
        self.results_host = own(PinnedBuffer(result_bytes, what="results (host)"))
        self.start_ns = own(DeviceBuffer(8, "start timestamp"))
        self.flags = own(PinnedBuffer(4 * self.num_exits, mapped=True, what="poll flags"))
        self.staging = {spec.name: own(PinnedBuffer(mb * _sample_bytes(spec), what=spec.name))
                        for spec in self.manifest.inputs}
        # Per exit: confidence and output copied back (eager strategy, all-exits, full model).
        per_exit = _aligned(4 * mb) + _aligned(4 * mb * self.num_outputs)
        self.readback = own(PinnedBuffer(per_exit * self.num_exits, what="per-exit readback"))
        self._readback_stride = per_exit

    def _own(self, resource):
        self._owned.append(resource)
        return resource

    def _body_stream(self, level: int) -> int:
        """Stream that captures the body of the IF node at nesting ``level`` (1-based)."""
        from trt_exit.runtime.cuda.stream import Stream

        while len(self._body_streams) < level:
            self._body_streams.append(self._own(Stream(f"IF body {len(self._body_streams) + 1}")))
        return self._body_streams[level - 1].handle

    def _gate_kernels(self, conditional: bool) -> GateKernels:
        if conditional not in self._gates:
            self._gates[conditional] = GateKernels(self.device_info.compute_capability,
                                                   conditional)
        return self._gates[conditional]

    def kernels_unavailable(self, conditional: bool) -> str:
        """Why the gate kernels of graph (``conditional``) or poll mode cannot load ("" if they
        can): an NVRTC newer than the driver, no NVRTC, or a module the driver refuses."""
        if conditional not in self._kernel_reasons:
            from trt_exit.runtime.cuda.api import version_mismatch
            from trt_exit.runtime.cuda.module import nvrtc_version

            reason = ""
            try:
                reason = version_mismatch(self.device_info.driver_version, 0,
                                          nvrtc_version()[0])
                if not reason:
                    self._gate_kernels(conditional)
            except CudaError as exc:
                reason = str(exc)
            variant = "graph" if conditional else "poll"
            self._kernel_reasons[conditional] = (
                f"the {variant}-mode gate kernel does not load: {reason}" if reason else "")
        return self._kernel_reasons[conditional]

    def graph_unavailable(self) -> str:
        """Why the graph strategy cannot run here ("" if it can)."""
        if not self.device_info.conditional_nodes:
            from trt_exit.runtime.cuda.api import format_version

            return (f"the driver supports CUDA {format_version(self.device_info.driver_version)}"
                    f"; conditional graph nodes need 12.4+ (JetPack 6.1+)")
        return self.kernels_unavailable(conditional=True)

    def _choose_strategy(self, requested: str) -> str:
        if requested == "eager":
            return "eager"
        graph_reason = self.graph_unavailable() if requested in ("auto", "graph") else ""
        poll_reason = self.kernels_unavailable(conditional=False) if graph_reason or \
            requested == "poll" else ""
        chosen, reason = choose_strategy(requested, graph_reason, poll_reason)
        if reason and (requested, chosen) not in self._fallbacks_logged:
            self._fallbacks_logged.add((requested, chosen))  # once, not at every run
            self.fallback_reason = reason
            level = logging.INFO if requested == "auto" else logging.WARNING
            log.log(level, "CUDA executor: using the %s strategy instead of %s: %s", chosen,
                    "graph" if requested == "auto" else requested, reason)
        return chosen

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Releases graphs, runners, the backend, kernels and every buffer (in that order)."""
        from trt_exit.runtime.cuda.api import make_current

        with contextlib.suppress(CudaError):
            make_current(self.device)
        if getattr(self, "stream", None) is not None and self.stream.handle:
            with contextlib.suppress(CudaError):
                self.stream.synchronize()
        for graph in self._graphs.values():
            graph.close()
        self._graphs.clear()
        if self._full is not None:
            self._full["runner"].close()
            for graph in self._full["graphs"].values():
                graph.close()
            self._full = None
        for runner in self.runners.values():
            runner.close()
        self.runners.clear()
        self.backend.close()
        for kernels in self._gates.values():
            kernels.close()
        self._gates.clear()
        while self._owned:
            self._owned.pop().close()

    def __enter__(self) -> "CudaExecutor":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ------------------------------------------------------------------ inputs

    def _bind(self, inputs: Any) -> tuple[int, dict[str, int], list[str], list[int]]:
        """Validates inputs; stages host arrays in pinned memory.

        Returns:
            ``(batch, addresses, host input names, producer streams to wait for)``.
        """
        from trt_exit.runtime.cuda.memory import external_array

        fast = self._bind_one_device_array(inputs)
        if fast is not None:
            return fast
        feeds = validate_inputs(self.manifest, inputs, device_arrays=True)
        batch = 0
        addresses = dict(self._addresses)
        host_inputs: list[str] = []
        producers: list[int] = []
        for name, value in feeds.items():
            spec = self.specs[name]
            if isinstance(value, np.ndarray):
                rows = value.shape[0]
            else:
                array = external_array(name, value, self.device)
                rows = array.shape[0]
                if array.dtype != np.dtype(spec.dtype):
                    raise InputError(f"input {name!r} has dtype {array.dtype}, expected "
                                     f"{spec.dtype}")
            if rows > self.max_batch:
                raise InputError(
                    f"input {name!r} has a batch of {rows}, more than this executor's max_batch "
                    f"of {self.max_batch} (its buffers and engines are sized for that): split "
                    f"the batch, or create the executor with max_batch={rows}")
            batch = rows
            if isinstance(value, np.ndarray):
                np.copyto(self.staging[name].array(value.shape, value.dtype), value)
                host_inputs.append(name)
            else:
                addresses[name] = array.address
                if array.stream is not None:
                    producers.append(array.stream)
        return batch, addresses, host_inputs, producers

    def _bind_one_device_array(self, value: Any):
        """:meth:`_bind` for the streaming case: one device array for a one-input model,
        checked in one pass (the general path reads the array interface twice). None when the
        case does not apply."""
        from trt_exit.runtime.cuda.memory import external_array

        if len(self.manifest.inputs) != 1 or isinstance(value, (Mapping, np.ndarray)) or \
                hasattr(value, "__array_interface__"):
            return None
        try:
            interface = value.__cuda_array_interface__
        except AttributeError:  # e.g. a CPU torch tensor: the general path converts it
            return None
        spec = self.manifest.inputs[0]
        shape = tuple(interface["shape"])
        if len(shape) != len(spec.shape) or shape[1:] != tuple(spec.shape[1:]) or shape[0] < 1:
            return None  # the general path raises the detailed message
        array = external_array(spec.name, value, self.device, interface)
        if array.dtype != np.dtype(spec.dtype):
            raise InputError(f"input {spec.name!r} has dtype {array.dtype}, expected {spec.dtype}")
        if shape[0] > self.max_batch:
            raise InputError(
                f"input {spec.name!r} has a batch of {shape[0]}, more than this executor's "
                f"max_batch of {self.max_batch} (its buffers and engines are sized for that): "
                f"split the batch, or create the executor with max_batch={shape[0]}")
        addresses = dict(self._addresses)
        addresses[spec.name] = array.address
        return int(shape[0]), addresses, [], [] if array.stream is None else [array.stream]

    def _start(self, producers: list[int]) -> None:
        """Orders the executor's stream after the inputs' producers (no host wait) and, with
        ``device_timing``, marks the start of the run's GPU work."""
        from trt_exit.runtime.cuda.stream import wait_for_producer

        for producer in producers:
            wait_for_producer(self.stream, producer, self._producer_event)
        if self.device_timing:
            self._time_events[0].record(self.stream.handle)
            self._timed = True

    # ------------------------------------------------------------------ enqueue helpers

    def _copy_inputs(self, stream: int, host_inputs: list[str], batch: int) -> None:
        from trt_exit.runtime.cuda.stream import copy_async

        with nvtx_range("copy_inputs", "copy"):
            for name in host_inputs:
                copy_async(stream, self._addresses[name], self.staging[name].address,
                           batch * _sample_bytes(self.specs[name]))

    def _stage(self, name: str, stream: int, addresses: dict[str, int], batch: int) -> None:
        with nvtx_range(name):
            self.runners[name].enqueue(stream, addresses, batch)

    def _result_address(self, which: int) -> int:
        return self.results_device.address + self._offsets[which]

    def _begin(self, kernels: GateKernels, stream: int, batch: int) -> None:
        with nvtx_range("gate_begin", "gate"):
            kernels.begin(stream, self._result_address(0), batch, self.start_ns.address)

    def _gate(self, kernels: GateKernels, stream: int, params: GateParams, batch: int,
              flag: int = 0, handle: Any = None) -> None:
        k = params.exit_k
        with nvtx_range(f"gate_{k}", "gate"):
            kernels.gate(stream, params, confidence=self._addresses[tn.exit_confidence(k)],
                         output=self._addresses[tn.exit_output(k)],
                         exit_index=self._result_address(0),
                         result_confidence=self._result_address(1),
                         result_output=self._result_address(2), start_ns=self.start_ns.address,
                         batch=batch, num_outputs=self.num_outputs, flag=flag, handle=handle)

    def _copy_results(self, stream: int, batch: int) -> None:
        from trt_exit.runtime.cuda.stream import copy_async

        # One copy: exit index and confidence regions are max_batch long, the output's first
        # `batch` rows follow them.
        with nvtx_range("copy_results", "copy"):
            copy_async(stream, self.results_host.address, self.results_device.address,
                       self._offsets[2] + 4 * batch * self.num_outputs)

    def _readback(self, stream: int, k: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Enqueues copying exit k's confidence and output to pinned memory; returns the host
        views (valid after the next synchronization)."""
        from trt_exit.runtime.cuda.stream import copy_async

        base = k * self._readback_stride
        out_offset = base + _aligned(4 * self.max_batch)
        with nvtx_range(f"copy_exit_{k}", "copy"):
            copy_async(stream, self.readback.address + base,
                       self._addresses[tn.exit_confidence(k)], 4 * batch)
            copy_async(stream, self.readback.address + out_offset,
                       self._addresses[tn.exit_output(k)], 4 * batch * self.num_outputs)
        return (self.readback.array((batch,), np.float32, base),
                self.readback.array((batch, self.num_outputs), np.float32, out_offset))

    def _synchronize(self) -> None:
        """The host waits for the stream (the CUDA layer counts it: :attr:`host_syncs`); with
        ``device_timing`` the end of the GPU work is marked first (the last mark counts)."""
        if self._timed:
            self._time_events[1].record(self.stream.handle)
        with nvtx_range("synchronize", "copy"):
            self.stream.synchronize()

    def _host_results(self, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        host = self.results_host
        return (host.array((batch,), np.int32, self._offsets[0]).copy(),
                host.array((batch, self.num_outputs), np.float32, self._offsets[2]).copy(),
                host.array((batch,), np.float32, self._offsets[1]).copy())

    def _device_results(self, batch: int) -> DeviceResults:
        buf = self.results_device
        return DeviceResults(buf.view((batch,), np.int32, self._offsets[0]),
                             buf.view((batch, self.num_outputs), np.float32, self._offsets[2]),
                             buf.view((batch,), np.float32, self._offsets[1]))

    # ------------------------------------------------------------------ running

    def plan(self, policy: Policy | None = None) -> ExitPlan:
        """The exit plan of ``policy`` (default: the executor's), cached per policy object and
        recomputed if its fields changed."""
        policy = policy or self.policy
        snapshot = repr(policy)  # dataclass fields: thresholds, exit, budget, latencies
        cached = self._plans.get(id(policy))
        if cached is not None and cached[0] is policy and cached[1] == snapshot:
            return cached[2]
        policy.validate(self.num_exits)  # normalizes thresholds: snapshot again
        snapshot = repr(policy)
        plan = plan_exits(policy, self.num_exits, self._state_providers)
        if len(self._plans) >= 64:
            self._plans.clear()
        self._plans[id(policy)] = (policy, snapshot, plan)
        return plan

    def run(self, inputs: Any, policy: Policy | None = None,
            strategy: str | None = None) -> ExitResults:
        """Runs one batch.

        Args:
            inputs: One array (B, ...) or a dict by input name: numpy (float32), or
                ``__cuda_array_interface__`` objects on this executor's GPU (read in place).
            policy: Overrides the executor's policy for this run.
            strategy: Overrides the executor's strategy for this run (``graph`` falls back to
                ``poll`` where graphs are not available, with the reason logged).

        Returns:
            Per-sample results; ``strategy`` and ``host_syncs`` (as counted by the CUDA layer)
            say how the run went.
        """
        from trt_exit.runtime.cuda.api import make_current
        from trt_exit.runtime.cuda.stream import host_syncs

        make_current(self.device)
        strategy = self._strategy(strategy)
        policy = policy or self.policy
        plan = None if isinstance(policy, AllExitsPolicy) else self.plan(policy)  # validates
        syncs_before = host_syncs()
        began = time.perf_counter()
        self._timed = False
        with nvtx_range(f"infer_{strategy}", "full"):
            batch, addresses, host_inputs, producers = self._bind(inputs)
            if plan is None:
                results = self._run_all(batch, addresses, host_inputs, producers)
                strategy = "eager"
            else:
                if strategy == "graph":
                    results = self._run_graph(plan, batch, addresses, host_inputs, producers)
                    if results is None:
                        strategy = "poll" if not self.kernels_unavailable(False) else "eager"
                if strategy == "poll":
                    results = self._run_poll(plan, batch, addresses, host_inputs, producers)
                elif strategy == "eager":
                    results = self._run_eager(plan, batch, addresses, host_inputs, producers,
                                              began)
        results.latency_ms = (time.perf_counter() - began) * 1e3
        results.strategy = strategy
        results.host_syncs = host_syncs() - syncs_before
        results.value_columns = self.manifest.value_columns
        self.last_device_ms = self._device_ms()
        return results

    def _device_ms(self) -> float | None:
        if not self._timed:
            return None
        self._timed = False
        return self._time_events[1].elapsed_ms(self._time_events[0])

    def _strategy(self, strategy: str | None) -> str:
        if strategy is None or strategy == "auto" or strategy == self.strategy:
            return self.strategy
        if strategy not in STRATEGIES:
            raise ConfigError(f"unknown strategy {strategy!r}; choose auto, graph, poll or eager")
        return self._choose_strategy(strategy)

    def _results(self, batch: int, with_device: bool) -> ExitResults:
        exit_index, output, confidence = self._host_results(batch)
        return ExitResults(exit_index, output, confidence, self.manifest.task, 0.0,
                           device=self._device_results(batch) if with_device else None)

    # graph ----------------------------------------------------------------

    def _run_graph(self, plan: ExitPlan, batch: int, addresses: dict[str, int],
                   host_inputs: list[str], producers: list[int]) -> ExitResults | None:
        """One graph launch, one synchronization; None if the chain cannot be captured."""
        bound = tuple((s.name, addresses[s.name]) for s in self.manifest.inputs)
        key = (plan.key, batch, bound, tuple(host_inputs))
        graph = self._graphs.get(key)
        if graph is None:
            if plan.key in self._graph_failures:
                return None
            # The capture's warm-up reads the inputs: order it after their producers first.
            self._start(producers)
            self._timed = False
            try:
                graph = self._capture(plan, batch, addresses, host_inputs)
            except CudaError as exc:  # CaptureError, or any failure while making the graph
                self._graph_failures[plan.key] = str(exc)
                log.warning("CUDA executor: the exit chain could not be captured as a CUDA "
                            "graph (%s); polling for this policy instead", exc)
                return None
            self.captures += 1
            self._remember(self._graphs, key, graph)
        else:
            self._graphs.move_to_end(key)
        self._start(producers)
        with nvtx_range("graph_launch"):
            graph.launch(self.stream.handle)
        self._synchronize()
        return self._results(batch, with_device=True)

    def graph_conditional_nodes(self) -> list[int]:
        """IF nodes of each cached exit-chain graph (as captured; for tests and benchmarks)."""
        return [graph.conditional_nodes for graph in self._graphs.values()]

    def _remember(self, cache: collections.OrderedDict, key: tuple, graph: Any) -> None:
        cache[key] = graph
        while len(cache) > self.graph_cache_size:
            _, old = cache.popitem(last=False)
            old.close()  # not in flight: every run ends with a synchronization

    def _warm_up(self, steps: list[ChainStep], batch: int, addresses: dict[str, int],
                 streams: list[int]) -> None:
        """Runs the chain's stages once on every stream the capture will use, so that lazy
        allocations (TensorRT's first run, PyTorch's per-stream workspaces) happen before
        capturing, not during it."""
        from trt_exit.runtime.cuda.stream import stream_wait

        main = self.stream.handle
        for stream in streams:  # one after another: each waits for the previous one
            self._sync_event.record(main)
            stream_wait(stream, self._sync_event)
            for step in steps:
                if step.stage:
                    self._stage(step.stage, stream, addresses, batch)
            self._sync_event.record(stream)
            stream_wait(main, self._sync_event)
        self._synchronize()

    def _capture(self, plan: ExitPlan, batch: int, addresses: dict[str, int],
                 host_inputs: list[str]) -> Any:
        from trt_exit.runtime.cuda.graph import CaptureError, GraphCapture

        kernels = self._gate_kernels(conditional=True)
        main = self.stream.handle
        steps = chain_steps(plan)
        levels = conditional_nodes(plan)
        streams = [main] + [self._body_stream(level) for level in range(1, levels + 1)]
        self._copy_inputs(main, host_inputs, batch)
        self._warm_up(steps, batch, addresses, streams)
        with GraphCapture(main, what=f"exit chain (batch {batch})",
                          context=self.device_info.context) as capture:
            self._begin(kernels, main, batch)
            self._copy_inputs(main, host_inputs, batch)
            with contextlib.ExitStack() as bodies:
                stream, level = main, 0
                for step in steps:
                    if step.stage:
                        self._stage(step.stage, stream, addresses, batch)
                    elif not step.branches:
                        self._gate(kernels, stream, step.gate, batch)
                    else:
                        handle = capture.conditional_handle(stream)
                        self._gate(kernels, stream, step.gate, batch, handle=handle)
                        level += 1
                        stream = bodies.enter_context(
                            capture.if_body(stream, handle, streams[level]))
            self._copy_results(main, batch)
        graph = capture.instantiate()
        if graph.conditional_nodes != levels:
            graph.close()
            raise CaptureError(f"the graph holds {graph.conditional_nodes} IF nodes, the plan "
                               f"{levels}")
        try:
            graph.upload(main)
        except CaptureError:
            graph.close()
            raise
        return graph

    # poll -----------------------------------------------------------------

    def _run_poll(self, plan: ExitPlan, batch: int, addresses: dict[str, int],
                  host_inputs: list[str], producers: list[int]) -> ExitResults:
        """One host wait per gate evaluated: the results are copied back behind every gate, so
        the wait that reads a "stop" flag also delivers them."""
        kernels = self._gate_kernels(conditional=False)
        main = self.stream.handle
        flags = self.flags.array((self.num_exits,), np.uint32)
        self._start(producers)
        self._begin(kernels, main, batch)
        self._copy_inputs(main, host_inputs, batch)
        for step in chain_steps(plan):
            if step.stage:
                self._stage(step.stage, main, addresses, batch)
                continue
            k = step.gate.exit_k
            self._gate(kernels, main, step.gate, batch,
                       flag=self.flags.device_address + 4 * k if step.branches else 0)
            self._copy_results(main, batch)
            self._synchronize()
            if not step.branches or not flags[k]:
                break
        return self._results(batch, with_device=True)

    # eager ----------------------------------------------------------------

    def _run_eager(self, plan: ExitPlan, batch: int, addresses: dict[str, int],
                   host_inputs: list[str], producers: list[int], began: float) -> ExitResults:
        main = self.stream.handle
        self._start(producers)
        self._copy_inputs(main, host_inputs, batch)
        exit_index = np.full(batch, -1, np.int32)
        output = np.zeros((batch, self.num_outputs), np.float32)
        confidence = np.zeros(batch, np.float32)
        running = np.ones(batch, dtype=bool)
        for step in chain_steps(plan):
            if step.stage:
                self._stage(step.stage, main, addresses, batch)
                continue
            gate = step.gate
            k = gate.exit_k
            conf_k, out_k = self._readback(main, k, batch)
            self._synchronize()
            over = gate.deadline and (
                (time.perf_counter() - began) * 1e9 + gate.next_ns > gate.budget_ns)
            done = gate_on_host(gate, conf_k, running, over)
            exit_index[done] = k
            output[done] = out_k[done]
            confidence[done] = conf_k[done]
            running &= ~done
            if not running.any():
                break
        return ExitResults(exit_index, output, confidence, self.manifest.task, 0.0)

    # all exits ------------------------------------------------------------

    def _run_all(self, batch: int, addresses: dict[str, int], host_inputs: list[str],
                 producers: list[int]) -> ExitResults:
        main = self.stream.handle
        self._start(producers)
        self._copy_inputs(main, host_inputs, batch)
        views = []
        for k in range(self.num_exits):
            self._stage(tn.stage_name(tn.SEGMENT, k), main, addresses, batch)
            self._stage(tn.stage_name(tn.EXIT, k), main, addresses, batch)
            views.append(self._readback(main, k, batch))
        self._synchronize()
        confidences = np.stack([c.copy() for c, _ in views])
        outputs = np.stack([o.copy() for _, o in views])
        final = self.num_exits - 1
        return ExitResults(np.full(batch, final, np.int32), outputs[-1].copy(),
                           confidences[-1].copy(), self.manifest.task, 0.0, outputs, confidences)

    # ------------------------------------------------------------------ baseline and profile

    def run_full_model(self, inputs: Any, strategy: str | None = None) -> ExitResults:
        """Runs the no-exit baseline (backbone and final head as one stage), as one CUDA graph
        with ``strategy="graph"`` (the default where graphs work), else enqueued directly."""
        from trt_exit.runtime.cuda.api import make_current
        from trt_exit.runtime.cuda.graph import GraphCapture
        from trt_exit.runtime.cuda.stream import host_syncs

        make_current(self.device)
        strategy = self._strategy(strategy)
        if self._full is None:
            runner = self.backend.open_full_model(self.manifest, self.precision)
            if not isinstance(runner, DeviceStageRunner):
                runner.close()
                raise ConfigError(f"backend {self.backend.name!r} cannot enqueue the full model")
            self._share_scratch(runner)
            self._full = {"runner": runner, "graphs": collections.OrderedDict(), "failed": ""}
        runner = self._full["runner"]
        syncs_before = host_syncs()
        began = time.perf_counter()
        self._timed = False
        batch, addresses, host_inputs, producers = self._bind(inputs)
        final = self.num_exits - 1
        main = self.stream.handle

        def enqueue(stream: int) -> None:
            self._copy_inputs(stream, host_inputs, batch)
            with nvtx_range("full"):
                runner.enqueue(stream, addresses, batch)

        used = "eager"
        if strategy == "graph" and not self._full["failed"]:
            bound = tuple((s.name, addresses[s.name]) for s in self.manifest.inputs)
            key = (batch, bound, tuple(host_inputs))
            graph = self._full["graphs"].get(key)
            if graph is None:
                try:
                    self._start(producers)
                    self._timed = False
                    enqueue(main)  # warm-up outside the capture
                    self._synchronize()
                    with GraphCapture(main, what="full model",
                                      context=self.device_info.context) as capture:
                        enqueue(main)
                    graph = capture.instantiate()
                    graph.upload(main)
                    self._remember(self._full["graphs"], key, graph)
                except CudaError as exc:  # CaptureError, or any failure while making the graph
                    if graph is not None:
                        graph.close()
                        graph = None
                    self._full["failed"] = str(exc)
                    log.warning("CUDA executor: the full model could not be captured (%s)", exc)
            if graph is not None:
                self._start(producers)
                graph.launch(main)
                used = "graph"
        if used == "eager":
            self._start(producers)
            enqueue(main)
        confidence, output = self._readback(main, final, batch)
        self._synchronize()
        self.last_device_ms = self._device_ms()
        return ExitResults(np.full(batch, final, np.int32), output.copy(), confidence.copy(),
                           self.manifest.task, (time.perf_counter() - began) * 1e3,
                           strategy=used, host_syncs=host_syncs() - syncs_before,
                           value_columns=self.manifest.value_columns)

    def _share_scratch(self, runner: DeviceStageRunner) -> None:
        """Hands ``runner`` the shared scratch block, or a block of its own if it needs more."""
        from trt_exit.runtime.cuda.memory import DeviceBuffer

        need = runner.scratch_bytes()
        if need <= 0:
            return
        block = self._scratch
        if block is None or block.size_bytes < need:
            block = self._own(DeviceBuffer(need, f"{runner.name} scratch"))
        runner.set_scratch(block.address, block.size_bytes)

    def profile_stages(self, inputs: Any, repeats: int = 100, warmup: int = 10,
                       chain_overheads: bool = False) -> dict[str, float]:
        """Each stage's own GPU time (median ms), timed alone with CUDA events.

        Each stage is captured into a graph of its own where possible, so the time is the GPU
        work without host launch gaps; otherwise its direct enqueue is timed. The chain is first
        run once on ``inputs`` so every stage reads real values.

        Args:
            inputs: As for :meth:`run`.
            repeats: Timed launches per stage.
            warmup: Untimed launches first.
            chain_overheads: Also time what every chain adds to its stages, each alone in a
                graph: ``gate_begin`` (the begin kernel), ``gate`` (one gate kernel, threshold
                mode) and ``copy_results`` (the results copied to pinned host memory).
        """
        from trt_exit.runtime.cuda.api import make_current

        make_current(self.device)
        self.run(inputs, AllExitsPolicy())
        batch, addresses, _, _ = self._bind(inputs)
        times: dict[str, float] = {}
        for stage in self.manifest.stages:
            runner = self.runners[stage.name]
            times[stage.name] = self._time_alone(
                stage.name, lambda s, r=runner: r.enqueue(s, addresses, batch), repeats, warmup)
        if chain_overheads:
            kernels = self._gate_kernels(conditional=False)
            params = GateParams(0, use_threshold=True, threshold=1.0)
            times["gate_begin"] = self._time_alone(
                "gate_begin", lambda s: self._begin(kernels, s, batch), repeats, warmup)
            times["gate"] = self._time_alone(
                "gate", lambda s: self._gate(kernels, s, params, batch), repeats, warmup)
            times["copy_results"] = self._time_alone(
                "copy_results", lambda s: self._copy_results(s, batch), repeats, warmup)
        return times

    def _time_alone(self, what: str, enqueue, repeats: int, warmup: int) -> float:
        """Median GPU time (ms) of ``enqueue(stream)``, captured alone in a graph if it can be."""
        from trt_exit.runtime.cuda.graph import GraphCapture
        from trt_exit.runtime.cuda.stream import Event

        main = self.stream.handle
        graph = None
        try:
            with GraphCapture(main, what=what, context=self.device_info.context) as capture:
                enqueue(main)
            graph = capture.instantiate()
        except CudaError as exc:
            log.info("profiling %s without a graph: %s", what, exc)
        samples = []
        with Event(timing=True) as start, Event(timing=True) as end:
            try:
                for i in range(warmup + repeats):
                    start.record(main)
                    if graph is not None:
                        graph.launch(main)
                    else:
                        enqueue(main)
                    end.record(main)
                    end.synchronize()
                    if i >= warmup:
                        samples.append(end.elapsed_ms(start))
            finally:
                if graph is not None:
                    graph.close()
        return float(np.median(samples))

    def describe(self) -> dict[str, Any]:
        """Device, backend and strategy, for reports."""
        return {"executor": "cuda", "strategy": self.strategy,
                "fallback_reason": self.fallback_reason, "max_batch": self.max_batch,
                "device": self.device_info.to_dict(), **self.backend.describe()}


def _sample_bytes(spec: TensorSpec) -> int:
    return int(math.prod(spec.shape[1:])) * np.dtype(spec.dtype).itemsize


def create_executor(manifest: Manifest | str | Path, backend: str = "torch",
                    precision: str = "fp32", policy: Policy | None = None,
                    strategy: str = "auto", fallback: bool = True, **options: Any):
    """The CUDA executor where a GPU is usable, else (with ``fallback``) the host executor.

    Without a GPU the reason is logged and the host :class:`~trt_exit.runtime.executor.Executor`
    runs the same model with ONNX Runtime (``tensorrt`` requested) or torch on the CPU
    (``torch`` requested), under the same policy.

    Raises:
        CudaUnavailableError: No GPU and ``fallback`` is False.
    """
    from trt_exit.runtime.cuda.api import cuda_status
    from trt_exit.runtime.executor import Executor

    status = cuda_status()
    if status.available:
        return CudaExecutor(manifest, backend, precision, policy, strategy, **options)
    if not fallback:
        raise CudaUnavailableError(f"{status.reason}; the CUDA executor needs an NVIDIA GPU")
    host_backend = "torch" if backend == "torch" else "onnxruntime"
    backend_options = {"device": "cpu"} if host_backend == "torch" else {}
    log.warning("no usable GPU (%s): running on the CPU with the host executor (%s backend)",
                status.reason, host_backend)
    return Executor(manifest, host_backend, precision, policy, backend_options=backend_options)
