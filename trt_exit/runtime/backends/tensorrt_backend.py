"""TensorRT backend: one deserialized engine per stage, enqueued on the executor's CUDA stream.

Engines come from ``trt-exit build`` on this device: :func:`trt_exit.build.target.engine_for`
picks, for each stage, the newest engine of the precision asked for that was built with this
TensorRT version for this GPU (and refuses, with the rebuild command, engines from another
version or device), and checks the file against its sha256 before TensorRT sees it.

Contexts: one execution context per batch size (:class:`ExecutionContexts`). A CUDA graph
captured from ``execute_async_v3`` is tied to the state of the context it was captured with, and
the CUDA executor caches graphs per batch size: were one context shared, capturing at batch 8
(``set_input_shape``) would change the context a batch-1 graph replays on. Each context's input
shapes are set once, when it is created.

Memory: every context is created without scratch memory
(``ExecutionContextAllocationStrategy.USER_MANAGED``); :meth:`TensorRTStageRunner.scratch_bytes`
reports ``device_memory_size_v2`` and the CUDA executor hands every stage one shared block sized
to the largest (:meth:`TensorRTStageRunner.set_scratch`), which all contexts of all stages use.
Stages run one after another on one stream, so sharing is safe. A runner used on its own (the
host path, :meth:`run`) allocates its own block the first time it needs one.

Tensors are bound by name (``set_tensor_address``) to the executor's buffers. ``enqueue`` never
synchronizes; before a CUDA graph captures it, run it once (TensorRT allocates on the first
run).

CUDA calls go through :mod:`trt_exit.runtime.cuda` (cuda-python, checked calls, owned buffers).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from trt_exit.build.target import Target, engine_for
from trt_exit.build.trt_api import import_tensorrt
from trt_exit.errors import ArtifactError, ConfigError, CudaError, InputError
from trt_exit.manifest import Manifest, StageEntry, TensorSpec
from trt_exit.runtime.backends.base import Backend, DeviceStageRunner

log = logging.getLogger(__name__)


class ExecutionContexts:
    """The execution contexts of one engine, one per batch size, sharing one scratch block.

    Args:
        create: Makes a new context without device memory (TensorRT's
            ``create_execution_context(USER_MANAGED)``); None means it failed.
        inputs: The engine's inputs (their shapes are set once per context).
        name: Stage name, for messages.
        errors: Returns what TensorRT logged, for messages.
    """

    def __init__(self, create: Callable[[], Any], inputs: list[TensorSpec], name: str,
                 errors: Callable[[], str]):
        self._create = create
        self._inputs = inputs
        self._name = name
        self._errors = errors
        self._by_batch: dict[int, Any] = {}
        self._scratch: tuple[int, int] | None = None

    @property
    def scratch(self) -> tuple[int, int] | None:
        """``(address, size)`` of the scratch block every context uses, None before one is set."""
        return self._scratch

    def set_scratch(self, address: int, size: int) -> None:
        """Points every context, present and future, at the scratch block."""
        self._scratch = (int(address), int(size))
        for context in self._by_batch.values():
            context.set_device_memory(*self._scratch)

    def for_batch(self, batch: int) -> Any:
        """The context for ``batch`` samples (created, shaped and given the scratch block on
        first use; its shapes never change afterwards)."""
        context = self._by_batch.get(batch)
        if context is None:
            context = self._create()
            if context is None:
                raise CudaError(f"{self._name}: TensorRT could not create an execution context "
                                f"({self._errors()})")
            if self._scratch is not None:
                context.set_device_memory(*self._scratch)
            for spec in self._inputs:
                shape = (batch, *spec.per_sample_shape())
                if not context.set_input_shape(spec.name, shape):
                    raise InputError(f"stage {self._name}: TensorRT rejected input shape "
                                     f"{shape} for {spec.name}")
            self._by_batch[batch] = context
        return context

    def __len__(self) -> int:
        return len(self._by_batch)

    def close(self) -> None:
        self._by_batch.clear()


class TensorRTStageRunner(DeviceStageRunner):
    """Runs one stage engine.

    Args:
        name: Stage name.
        engine_path: The serialized engine (already verified against the manifest).
        inputs: Tensors the stage reads (names must match the engine's inputs).
        outputs: Tensors it writes.
        backend: The owning backend (TensorRT runtime, logger, device, host-path stream).
        rebuild: The command that rebuilds this engine, for messages.
    """

    def __init__(self, name: str, engine_path: Path, inputs: list[TensorSpec],
                 outputs: list[TensorSpec], backend: "TensorRTBackend", rebuild: str):
        super().__init__(name, inputs, outputs)
        trt = backend.trt
        self.backend = backend
        self.engine_path = Path(engine_path)
        self._rebuild = rebuild
        engine = backend.runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if engine is None:
            raise ArtifactError(
                f"TensorRT {trt.__version__} cannot load {self.engine_path} "
                f"({backend.logger.errors()}): the file is damaged, or was built by another "
                f"TensorRT version or for another GPU; rebuild it: {rebuild}")
        self.engine = engine
        self._check_io(trt)
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        self.contexts = ExecutionContexts(lambda: engine.create_execution_context(strategy),
                                          self.inputs, name, backend.logger.errors)
        self.contexts.for_batch(self.min_batch)  # fails here, not at the first run
        self._scratch_needed = int(engine.device_memory_size_v2)
        self._scratch_owned = None  # DeviceBuffer, only when no shared block was handed over
        self._host_buffers: dict[str, Any] = {}
        self._host_capacity = 0

    def _check_io(self, trt) -> None:
        engine = self.engine
        found: dict[str, tuple[Any, Any]] = {}
        for index in range(engine.num_io_tensors):
            name = engine.get_tensor_name(index)
            found[name] = (engine.get_tensor_mode(name), engine.get_tensor_dtype(name))
        want_in = {t.name for t in self.inputs}
        want_out = {t.name for t in self.outputs}
        have_in = {n for n, (mode, _) in found.items() if mode == trt.TensorIOMode.INPUT}
        have_out = {n for n, (mode, _) in found.items() if mode == trt.TensorIOMode.OUTPUT}
        if have_in != want_in or have_out != want_out:
            raise ArtifactError(
                f"{self.engine_path}: engine tensors {sorted(have_in)} -> {sorted(have_out)} do "
                f"not match the manifest's {sorted(want_in)} -> {sorted(want_out)}; rebuild: "
                f"{self._rebuild}")
        for spec in [*self.inputs, *self.outputs]:
            dtype = np.dtype(trt.nptype(found[spec.name][1]))
            if dtype != np.dtype(spec.dtype):
                raise ArtifactError(f"{self.engine_path}: tensor {spec.name} is {dtype} in the "
                                    f"engine but {spec.dtype} in the manifest; rebuild: "
                                    f"{self._rebuild}")
        shapes = engine.get_tensor_profile_shape(self.inputs[0].name, 0)
        self.min_batch = int(tuple(shapes[0])[0])
        self.max_batch = int(tuple(shapes[2])[0])

    # ------------------------------------------------------------------ scratch memory

    def scratch_bytes(self) -> int:
        """``device_memory_size_v2`` of the engine: what :meth:`set_scratch` must provide."""
        return self._scratch_needed

    def set_scratch(self, address: int, size: int) -> None:
        if size < self._scratch_needed:
            raise ConfigError(f"{self.name}: scratch block of {size} bytes is smaller than the "
                              f"{self._scratch_needed} bytes the engine needs")
        self.contexts.set_scratch(address, size)
        if self._scratch_owned is not None:
            self._scratch_owned.close()
            self._scratch_owned = None

    def _ensure_scratch(self) -> None:
        if self.contexts.scratch is None:
            from trt_exit.runtime.cuda.memory import DeviceBuffer

            self._scratch_owned = DeviceBuffer(self._scratch_needed, f"{self.name} scratch")
            self.contexts.set_scratch(self._scratch_owned.address, self._scratch_owned.size_bytes)

    # ------------------------------------------------------------------ device path

    def _check_batch(self, batch: int) -> None:
        if not self.min_batch <= batch <= self.max_batch:
            raise InputError(
                f"stage {self.name}: batch {batch} is outside the engine's optimization profile "
                f"[{self.min_batch}, {self.max_batch}]; split the batch, or rebuild with a "
                f"larger --max-batch: {self._rebuild} --max-batch {batch}")

    def enqueue(self, stream: int, addresses: Mapping[str, int], batch: int) -> None:
        self._check_batch(batch)
        self._ensure_scratch()
        context = self.contexts.for_batch(batch)
        for spec in [*self.inputs, *self.outputs]:
            if spec.name not in addresses:
                raise ConfigError(f"stage {self.name}: no device buffer for tensor {spec.name}")
            if not context.set_tensor_address(spec.name, int(addresses[spec.name])):
                raise CudaError(f"stage {self.name}: TensorRT rejected the address of "
                                f"{spec.name} ({self.backend.logger.errors()})")
        if not context.execute_async_v3(int(stream)):
            raise CudaError(f"stage {self.name}: TensorRT execute_async_v3 failed "
                            f"({self.backend.logger.errors()})")

    # ------------------------------------------------------------------ host path

    def _host_buffer(self, spec: TensorSpec, batch: int):
        from trt_exit.runtime.cuda.memory import DeviceBuffer

        if batch > self._host_capacity:
            for buffer in self._host_buffers.values():
                buffer.close()
            self._host_buffers.clear()
            self._host_capacity = batch
        if spec.name not in self._host_buffers:
            size = self._host_capacity * int(np.prod(spec.per_sample_shape())) * \
                np.dtype(spec.dtype).itemsize
            self._host_buffers[spec.name] = DeviceBuffer(size, f"{self.name}:{spec.name}")
        return self._host_buffers[spec.name]

    def run(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Runs the stage on host arrays or ``__cuda_array_interface__`` arrays; blocks until
        the outputs are back on the host."""
        from trt_exit.runtime.cuda.memory import external_array
        from trt_exit.runtime.cuda.stream import wait_for_producer

        stream = self.backend.stream
        try:
            values = {spec.name: feeds[spec.name] for spec in self.inputs}
        except KeyError as exc:
            raise InputError(f"stage {self.name} needs input {exc.args[0]!r}") from None
        first = values[self.inputs[0].name]
        batch = int((first.__cuda_array_interface__["shape"] if hasattr(
            first, "__cuda_array_interface__") and not hasattr(first, "__array_interface__")
            else np.shape(first))[0])
        addresses: dict[str, int] = {}
        keep_alive = []  # host arrays must live until the stream synchronizes
        for spec in self.inputs:
            value = values[spec.name]
            expected = (batch, *spec.per_sample_shape())
            if hasattr(value, "__cuda_array_interface__") and not hasattr(value, "__array_interface__"):
                array = external_array(spec.name, value, self.backend.device_index)
                if array.shape != expected or array.dtype != np.dtype(spec.dtype):
                    raise InputError(f"stage {self.name}: input {spec.name} is {array.dtype} "
                                     f"{array.shape}, expected {spec.dtype} {expected}")
                wait_for_producer(stream, array.stream, self.backend.event)
                addresses[spec.name] = array.address
            else:
                host = np.ascontiguousarray(value, dtype=np.dtype(spec.dtype))
                if host.shape != expected:
                    raise InputError(f"stage {self.name}: input {spec.name} has shape "
                                     f"{host.shape}, expected {expected}")
                buffer = self._host_buffer(spec, batch)
                stream.copy(buffer.address, host.ctypes.data, host.nbytes)
                keep_alive.append(host)
                addresses[spec.name] = buffer.address
        results = {}
        for spec in self.outputs:
            results[spec.name] = np.empty((batch, *spec.per_sample_shape()), np.dtype(spec.dtype))
            addresses[spec.name] = self._host_buffer(spec, batch).address
        self.enqueue(stream.handle, addresses, batch)
        for spec in self.outputs:
            out = results[spec.name]
            stream.copy(out.ctypes.data, addresses[spec.name], out.nbytes)
        stream.synchronize()
        return results

    def close(self) -> None:
        for buffer in self._host_buffers.values():
            buffer.close()
        self._host_buffers.clear()
        if self._scratch_owned is not None:
            self._scratch_owned.close()
            self._scratch_owned = None
        self.contexts.close()
        self.engine = None


class TensorRTBackend(Backend):
    """Stage runners on TensorRT engines built by ``trt-exit build`` on this device.

    Args:
        device: CUDA device ordinal.

    Raises:
        MissingDependencyError: TensorRT or cuda-python is missing (the message says how to get
            them on a Jetson, and that the ONNX Runtime backend works without them).
        CudaUnavailableError: No usable GPU.
    """

    name = "tensorrt"
    device_arrays = True

    def __init__(self, device: int = 0):
        from trt_exit.build.steps import make_logger
        from trt_exit.runtime.cuda.api import use_device

        self.trt = import_tensorrt("The TensorRT backend")
        info = use_device(device)
        self.device_index = device
        self.device_info = info
        self.target = Target(str(self.trt.__version__), info.name,
                             f"{info.compute_capability[0]}.{info.compute_capability[1]}")
        self.logger = make_logger()
        self.runtime = self.trt.Runtime(self.logger)
        self._stream = None
        self._event = None

    @property
    def stream(self):
        """The backend's own stream for the host path (:meth:`TensorRTStageRunner.run`)."""
        if self._stream is None:
            from trt_exit.runtime.cuda.stream import Stream

            self._stream = Stream("tensorrt host path")
        return self._stream

    @property
    def event(self):
        """An event for ordering after a caller's stream (host path inputs on the GPU)."""
        if self._event is None:
            from trt_exit.runtime.cuda.stream import Event

            self._event = Event()
        return self._event

    def _open(self, manifest: Manifest, name: str, records: dict, precision: str,
              inputs: list[TensorSpec], outputs: list[TensorSpec],
              onnx_sha256: str | None) -> TensorRTStageRunner:
        record, path = engine_for(manifest, name, records, precision, self.target, onnx_sha256)
        if record.get("version_compatible"):
            self.runtime.engine_host_code_allowed = True
        rebuild = f"trt-exit build {manifest.root} --precision {precision} --rebuild"
        return TensorRTStageRunner(name, path, inputs, outputs, self, rebuild)

    def open_stage(self, manifest: Manifest, stage: StageEntry, precision: str) -> TensorRTStageRunner:
        graph = stage.onnx.get(precision)
        return self._open(manifest, stage.name, stage.engines, precision, stage.inputs,
                          stage.outputs, graph.sha256 if graph else None)

    def open_full_model(self, manifest: Manifest, precision: str) -> TensorRTStageRunner:
        full = manifest.full_model
        graph = full.get("onnx", {}).get(precision)
        return self._open(manifest, "full", full.get("engines", {}), precision, full["inputs"],
                          full["outputs"], graph.sha256 if graph else None)

    def close(self) -> None:
        for owner in (self._event, self._stream):
            if owner is not None:
                owner.close()
        self._event = self._stream = None

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "tensorrt": str(self.trt.__version__),
                "gpu": self.target.device_name,
                "compute_capability": self.target.compute_capability}

