"""What every strategy of the CUDA executor enqueues on: its stream, its buffers and the steps.

A :class:`Chain` owns the executor's stream, every device and pinned buffer (allocated once for
``max_batch`` rows), the gate kernels and the enqueue helpers the strategies share: copy the
inputs in, run a stage, the begin and gate kernels, copy the results out, wait for the stream.
The strategies (:mod:`.graph`, :mod:`.poll`, :mod:`.eager`) decide in which order and where the
host waits; the stage runners and the backend stay the executor's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from trt_exit import tensor_names as tn
from trt_exit.errors import ConfigError
from trt_exit.manifest import Manifest, TensorSpec
from trt_exit.profiling.nvtx import nvtx_range
from trt_exit.runtime.backends.base import DeviceStageRunner
from trt_exit.runtime.executor import ExitResults
from trt_exit.runtime.gate import GateKernels, GateParams, load_gate_kernels

_ALIGN = 256


def aligned(size: int) -> int:
    """``size`` rounded up to the result regions' alignment (256 bytes)."""
    return (size + _ALIGN - 1) // _ALIGN * _ALIGN


def sample_bytes(spec: TensorSpec) -> int:
    """Bytes of one sample (row) of a tensor."""
    return int(math.prod(spec.shape[1:])) * np.dtype(spec.dtype).itemsize


@dataclass(frozen=True)
class DeviceResults:
    """Results in the executor's device buffers (valid until its next run; owns nothing).

    Each is a ``__cuda_array_interface__`` view (version 3, exporting the executor's stream):
    ``torch.as_tensor(r.output, device="cuda")``. The executor's next run overwrites them on
    its own stream: work that reads them asynchronously on another stream must be handed back
    first, ``executor.wait_for_consumer(stream)`` (or that stream synchronized), or the next
    run may overwrite them under it.

    Attributes:
        exit_index: (B,) int32.
        output: (B, K) float32.
        confidence: (B,) float32.
    """

    exit_index: Any
    output: Any
    confidence: Any


class Chain:
    """The executor's stream, buffers and gate kernels, and the enqueue steps of the exit chain.

    Args:
        manifest: The model.
        runners: Device stage runners by stage name (owned by the executor).
        max_batch: Rows every buffer holds.
        device_info: The GPU (:class:`~trt_exit.runtime.cuda.api.DeviceInfo`).
        device_timing: Record CUDA events around each run's work (:meth:`device_ms`).

    Raises:
        ConfigError: Exit outputs or confidences that are not float32, or exits whose outputs
            differ in shape.
    """

    def __init__(self, manifest: Manifest, runners: dict[str, DeviceStageRunner],
                 max_batch: int, device_info: Any, device_timing: bool = False):
        self.manifest = manifest
        self.runners = runners
        self.max_batch = max_batch
        self.num_exits = manifest.num_exits
        self.device_info = device_info
        self.device_timing = device_timing
        self._timed = False
        self._owned: list[Any] = []  # CUDA resources, closed in reverse order
        self._gates: dict[bool, GateKernels] = {}
        self._body_streams: list[Any] = []
        try:
            self._allocate()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ setup

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
        own = self.own
        self.stream = own(Stream("executor stream"))
        self.sync_event = own(Event(timing=False))
        self._producer_event = own(Event(timing=False))
        self.consumer_event = own(Event(timing=False))
        self._time_events = (own(Event(timing=True)), own(Event(timing=True)))
        self.buffers = {
            name: own(DeviceBuffer(mb * sample_bytes(spec), name))
            for name, spec in self.specs.items()
        }
        self.addresses = {name: b.address for name, b in self.buffers.items()}
        self.scratch = None
        scratch = max((r.scratch_bytes() for r in self.runners.values()), default=0)
        if scratch > 0:
            self.scratch = own(DeviceBuffer(scratch, "shared scratch"))
            for runner in self.runners.values():
                runner.set_scratch(self.scratch.address, scratch)
        # Results: exit index, confidence, output; the same layout on the device and pinned.
        self._offsets = (0, aligned(4 * mb), 2 * aligned(4 * mb))
        result_bytes = self._offsets[2] + 4 * mb * self.num_outputs
        self.results_device = own(DeviceBuffer(result_bytes, "results"))
        self.results_host = own(PinnedBuffer(result_bytes, what="results (host)"))
        self.start_ns = own(DeviceBuffer(8, "start timestamp"))
        self.flags = own(PinnedBuffer(4 * self.num_exits, mapped=True, what="poll flags"))
        self.staging = {spec.name: own(PinnedBuffer(mb * sample_bytes(spec), what=spec.name))
                        for spec in self.manifest.inputs}
        # Per exit: confidence and output copied back (eager strategy, all-exits, full model).
        per_exit = aligned(4 * mb) + aligned(4 * mb * self.num_outputs)
        self.readback_buffer = own(PinnedBuffer(per_exit * self.num_exits,
                                                what="per-exit readback"))
        self._readback_stride = per_exit

    def own(self, resource):
        """Takes ``resource`` (anything with ``close()``) to close with the chain."""
        self._owned.append(resource)
        return resource

    def body_stream(self, level: int) -> int:
        """Stream that captures the body of the IF node at nesting ``level`` (1-based)."""
        from trt_exit.runtime.cuda.stream import Stream

        while len(self._body_streams) < level:
            self._body_streams.append(self.own(Stream(f"IF body {len(self._body_streams) + 1}")))
        return self._body_streams[level - 1].handle

    def gate_kernels(self, conditional: bool) -> GateKernels:
        """The gate kernels of graph (``conditional``) or poll mode, loaded once.

        Raises:
            CudaError: They cannot load here (:func:`~trt_exit.runtime.gate.load_gate_kernels`).
        """
        if conditional not in self._gates:
            self._gates[conditional] = load_gate_kernels(
                self.device_info.compute_capability, conditional, self.device_info.driver_version)
        return self._gates[conditional]

    def close(self) -> None:
        """Releases the kernels and every buffer, stream and event."""
        for kernels in self._gates.values():
            kernels.close()
        self._gates.clear()
        while self._owned:
            self._owned.pop().close()

    # ------------------------------------------------------------------ enqueue steps

    def start(self, producers: list[int]) -> None:
        """Orders the executor's stream after the inputs' producers (no host wait) and, with
        ``device_timing``, marks the start of the run's GPU work."""
        from trt_exit.runtime.cuda.stream import wait_for_producer

        for producer in producers:
            wait_for_producer(self.stream, producer, self._producer_event)
        if self.device_timing:
            self._time_events[0].record(self.stream.handle)
            self._timed = True

    def untimed(self) -> None:
        """Forgets the start mark (work since then is not the run's: a capture's warm-up)."""
        self._timed = False

    def copy_inputs(self, stream: int, host_inputs: list[str], batch: int) -> None:
        """Enqueues copying the staged host inputs into their device buffers."""
        from trt_exit.runtime.cuda.stream import copy_async

        with nvtx_range("copy_inputs", "copy"):
            for name in host_inputs:
                copy_async(stream, self.addresses[name], self.staging[name].address,
                           batch * sample_bytes(self.specs[name]))

    def copy_input(self, stream: int, name: str, source: int, batch: int) -> None:
        """Enqueues copying input ``name`` from ``source`` (pinned staging or a caller's device
        array) into the executor's own buffer of it."""
        from trt_exit.runtime.cuda.stream import copy_async

        with nvtx_range(f"copy_{name}", "copy"):
            copy_async(stream, self.addresses[name], source, self.input_bytes(name, batch))

    def input_bytes(self, name: str, batch: int) -> int:
        """Bytes of ``batch`` samples of input ``name``."""
        return batch * sample_bytes(self.specs[name])

    def stage(self, name: str, stream: int, addresses: dict[str, int], batch: int) -> None:
        """Enqueues stage ``name``."""
        with nvtx_range(name):
            self.runners[name].enqueue(stream, addresses, batch)

    def result_address(self, which: int) -> int:
        """Device address of a result region: 0 exit index, 1 confidence, 2 output."""
        return self.results_device.address + self._offsets[which]

    def begin(self, kernels: GateKernels, stream: int, batch: int) -> None:
        """Enqueues the begin kernel (every sample running, start time stamped)."""
        with nvtx_range("gate_begin", "gate"):
            kernels.begin(stream, self.result_address(0), batch, self.start_ns.address)

    def gate(self, kernels: GateKernels, stream: int, params: GateParams, batch: int,
             flag: int = 0, handle: Any = None) -> None:
        """Enqueues exit ``params.exit_k``'s gate (``flag``: poll mode's mapped flag; ``handle``:
        graph mode's conditional handle)."""
        k = params.exit_k
        with nvtx_range(f"gate_{k}", "gate"):
            kernels.gate(stream, params, confidence=self.addresses[tn.exit_confidence(k)],
                         output=self.addresses[tn.exit_output(k)],
                         exit_index=self.result_address(0),
                         result_confidence=self.result_address(1),
                         result_output=self.result_address(2), start_ns=self.start_ns.address,
                         batch=batch, num_outputs=self.num_outputs, flag=flag, handle=handle)

    def copy_results(self, stream: int, batch: int) -> None:
        """Enqueues copying the results to pinned host memory."""
        from trt_exit.runtime.cuda.stream import copy_async

        # One copy: exit index and confidence regions are max_batch long, the output's first
        # `batch` rows follow them.
        with nvtx_range("copy_results", "copy"):
            copy_async(stream, self.results_host.address, self.results_device.address,
                       self._offsets[2] + 4 * batch * self.num_outputs)

    def readback(self, stream: int, k: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Enqueues copying exit k's confidence and output to pinned memory; returns the host
        views (valid after the next synchronization)."""
        from trt_exit.runtime.cuda.stream import copy_async

        base = k * self._readback_stride
        out_offset = base + aligned(4 * self.max_batch)
        with nvtx_range(f"copy_exit_{k}", "copy"):
            copy_async(stream, self.readback_buffer.address + base,
                       self.addresses[tn.exit_confidence(k)], 4 * batch)
            copy_async(stream, self.readback_buffer.address + out_offset,
                       self.addresses[tn.exit_output(k)], 4 * batch * self.num_outputs)
        return (self.readback_buffer.array((batch,), np.float32, base),
                self.readback_buffer.array((batch, self.num_outputs), np.float32, out_offset))

    def synchronize(self) -> None:
        """The host waits for the stream (the CUDA layer counts it: ``host_syncs``); with
        ``device_timing`` the end of the GPU work is marked first (the last mark counts)."""
        if self._timed:
            self._time_events[1].record(self.stream.handle)
        with nvtx_range("synchronize", "copy"):
            self.stream.synchronize()

    def device_ms(self) -> float | None:
        """GPU time of the run just finished (ms), None when it was not timed."""
        if not self._timed:
            return None
        self._timed = False
        return self._time_events[1].elapsed_ms(self._time_events[0])

    # ------------------------------------------------------------------ results

    def host_results(self, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Copies of the pinned results: exit index, output, confidence."""
        host = self.results_host
        return (host.array((batch,), np.int32, self._offsets[0]).copy(),
                host.array((batch, self.num_outputs), np.float32, self._offsets[2]).copy(),
                host.array((batch,), np.float32, self._offsets[1]).copy())

    def device_results(self, batch: int) -> DeviceResults:
        """Views of the results in device memory; each exports the executor's stream, which
        writes them (``__cuda_array_interface__`` version 3)."""
        buf, stream = self.results_device, self.stream.handle
        return DeviceResults(buf.view((batch,), np.int32, self._offsets[0], stream),
                             buf.view((batch, self.num_outputs), np.float32, self._offsets[2],
                                      stream),
                             buf.view((batch,), np.float32, self._offsets[1], stream))

    def results(self, batch: int, with_device: bool) -> ExitResults:
        """The run's results from the pinned copy (and the device views)."""
        exit_index, output, confidence = self.host_results(batch)
        return ExitResults(exit_index, output, confidence, self.manifest.task, 0.0,
                           device=self.device_results(batch) if with_device else None)
