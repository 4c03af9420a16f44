"""The backend interface: how the executor runs one stage.

A backend opens a :class:`StageRunner` per stage graph of a manifest. Runners bind tensors by the
names in the stage's manifest entry; ``run`` takes and returns arrays by name.

The model directory is a trust boundary (docs/trust.md): a runner checks its graph's input and
output names, dtypes and shapes against the manifest when it opens it
(:func:`trt_exit.manifest.check_graph_io`), and the host executor turns a backend's own
exception in ``run`` into a :class:`~trt_exit.errors.StageError` naming the stage
(:func:`trt_exit.runtime.executor.run_stage`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Mapping

from trt_exit.manifest import Manifest, StageEntry, TensorSpec


class StageRunner(ABC):
    """Runs one stage graph.

    Attributes:
        name: Stage name (``segment_0``, ``exit_1``, ``full``).
        inputs: Tensors the stage reads.
        outputs: Tensors the stage writes.
    """

    def __init__(self, name: str, inputs: list[TensorSpec], outputs: list[TensorSpec]):
        self.name = name
        self.inputs = inputs
        self.outputs = outputs

    @abstractmethod
    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Runs the stage on ``feeds`` (at least its inputs, by name); returns its outputs."""

    def close(self) -> None:
        """Releases the runner's resources."""

    def __enter__(self) -> "StageRunner":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class Backend(ABC):
    """Creates stage runners for the graphs of a manifest."""

    #: Backend name as used by the CLI and reports.
    name: str = ""

    @abstractmethod
    def open_stage(self, manifest: Manifest, stage: StageEntry, precision: str) -> StageRunner:
        """A runner for ``stage`` in ``precision``."""

    @abstractmethod
    def open_full_model(self, manifest: Manifest, precision: str) -> StageRunner:
        """A runner for the no-exit baseline graph."""

    def close(self) -> None:
        """Releases backend-wide resources."""

    def describe(self) -> dict[str, Any]:
        """Backend name, version and settings, for reports."""
        return {"backend": self.name}


class DeviceStageRunner(StageRunner):
    """A stage runner that also enqueues onto a CUDA stream with caller-owned device buffers.

    The CUDA executor (:mod:`trt_exit.runtime.cuda_executor`) allocates every tensor once and
    hands each stage the device addresses of its inputs and outputs by tensor name (segment k's
    output buffer *is* segment k+1's input). Runners never allocate per call.

    Attributes:
        device_arrays: True: :meth:`StageRunner.run` also accepts ``__cuda_array_interface__``
            inputs.
    """

    device_arrays = True

    @abstractmethod
    def enqueue(self, stream: int, addresses: Mapping[str, int], batch: int) -> None:
        """Enqueues the stage on ``stream`` (a ``cudaStream_t`` as int) for ``batch`` samples,
        reading and writing the device buffers at ``addresses`` (by tensor name). Must not
        synchronize the stream or the device."""

    def scratch_bytes(self) -> int:
        """Device scratch memory the stage needs (0 if it manages its own)."""
        return 0

    def set_scratch(self, address: int, size: int) -> None:
        """Hands the stage a shared scratch block of ``size`` bytes at ``address``; the
        executor sizes it to the largest :meth:`scratch_bytes` of its stages."""
