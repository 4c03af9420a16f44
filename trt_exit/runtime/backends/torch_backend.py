"""PyTorch backend: the stages as PyTorch modules, on a CUDA GPU or on the CPU.

The model is rebuilt from the checkpoint the graphs were exported from
(``manifest.checkpoint_path()``, verified against its sha256) and cut into the same
:mod:`trt_exit.export.stages` modules that were exported to ONNX, so the torch backend computes
what the ONNX graphs compute.

On CUDA every runner is a :class:`DeviceStageRunner`: :meth:`TorchStageRunner.enqueue` runs the
stage on the executor's stream, reading and writing the executor's buffers in place (wrapped as
tensors without a copy). Temporaries come from one memory pool per backend
(``torch.cuda.MemPool``) that lives as long as the backend: a CUDA graph captured from these
stages keeps pointing at that memory, so nothing else may be handed it, and nothing in it is
returned to the driver while a graph could still use it.

On the CPU (``device="cpu"``) the runners serve the host executor, so the torch path is tested
against ONNX Runtime without a GPU.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from trt_exit import tensor_names as tn
from trt_exit.errors import ConfigError, CudaUnavailableError, InputError
from trt_exit.manifest import Manifest, StageEntry, TensorSpec
from trt_exit.runtime.backends.base import Backend, DeviceStageRunner


def _torch():
    import torch

    return torch


#: Cached tensor views of executor buffers per runner (by name, address and batch).
_MAX_VIEWS = 256


class _Interface:
    """A device pointer with ``__cuda_array_interface__``, for ``torch.as_tensor``."""

    def __init__(self, address: int, shape: tuple[int, ...], typestr: str):
        self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr,
                                         "data": (address, False), "strides": None,
                                         "version": 3, "stream": None}


class TorchStageRunner(DeviceStageRunner):
    """Runs one stage module with PyTorch.

    Args:
        name: Stage name.
        module: The stage module (its positional inputs are ``inputs`` in order).
        inputs: Tensors read.
        outputs: Tensors written, in the module's output order.
        backend: The owning backend (device, precision, memory pool).
    """

    def __init__(self, name: str, module: Any, inputs: list[TensorSpec], outputs: list[TensorSpec],
                 backend: "TorchBackend"):
        super().__init__(name, inputs, outputs)
        self.module = module
        self.backend = backend
        self._streams: dict[int, Any] = {}
        self._views: dict[tuple, Any] = {}

    @property
    def device_arrays(self) -> bool:  # type: ignore[override]
        return self.backend.device_arrays

    # ------------------------------------------------------------------ host path

    def _tensor(self, name: str, value: Any):
        torch = _torch()
        device = self.backend.torch_device
        if isinstance(value, torch.Tensor):
            return value.to(device)
        if hasattr(value, "__cuda_array_interface__") and not hasattr(value, "__array_interface__"):
            if device.type != "cuda":
                raise InputError(f"input {name!r} is in GPU memory but the torch backend runs on "
                                 f"the CPU: copy it to the host first")
            return torch.as_tensor(value, device=device)
        return torch.from_numpy(np.ascontiguousarray(value)).to(device)

    def run(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        torch = _torch()
        try:
            args = [self._tensor(t.name, feeds[t.name]) for t in self.inputs]
        except KeyError as exc:
            raise InputError(f"stage {self.name} needs input {exc.args[0]!r}") from None
        with torch.no_grad(), self.backend.autocast():
            values = self.module(*args)
        if isinstance(values, torch.Tensor):
            values = (values,)
        return {spec.name: value.float().cpu().numpy()
                for spec, value in zip(self.outputs, values)}

    # ------------------------------------------------------------------ device path

    def _stream(self, handle: int):
        stream = self._streams.get(handle)
        if stream is None:
            torch = _torch()
            stream = torch.cuda.ExternalStream(handle, device=self.backend.torch_device)
            self._streams[handle] = stream
        return stream

    def _view(self, spec: TensorSpec, address: int, batch: int):
        key = (spec.name, address, batch)
        view = self._views.get(key)
        if view is None:
            if len(self._views) >= _MAX_VIEWS:  # callers' input buffers come and go
                self._views.clear()
            torch = _torch()
            shape = (batch, *spec.per_sample_shape())
            typestr = np.dtype(spec.dtype).str
            view = torch.as_tensor(_Interface(address, shape, typestr),
                                   device=self.backend.torch_device)
            self._views[key] = view
        return view

    def enqueue(self, stream: int, addresses: Mapping[str, int], batch: int) -> None:
        torch = _torch()
        if self.backend.torch_device.type != "cuda":
            raise ConfigError(f"stage {self.name}: enqueue needs the torch backend on a CUDA "
                              f"device, not {self.backend.torch_device}")
        with torch.cuda.stream(self._stream(stream)), torch.no_grad(), \
                self.backend.allocations(), self.backend.autocast():
            args = [self._view(t, addresses[t.name], batch) for t in self.inputs]
            values = self.module(*args)
            if isinstance(values, torch.Tensor):
                values = (values,)
            for spec, value in zip(self.outputs, values):
                self._view(spec, addresses[spec.name], batch).copy_(value)

    def close(self) -> None:
        self._views.clear()
        self._streams.clear()
        self.module = None


class TorchBackend(Backend):
    """Stage runners on PyTorch.

    Args:
        device: ``"cuda"``, ``"cuda:N"`` or ``"cpu"``. The precision (fp32, or fp16 by
            autocast on CUDA) comes from the executor's ``precision``.
    """

    name = "torch"

    def __init__(self, device: str = "cuda"):
        torch = _torch()
        self.torch_device = torch.device(device)
        if self.torch_device.type == "cuda":
            if not torch.cuda.is_available():
                raise CudaUnavailableError(
                    "the torch backend on 'cuda' needs an NVIDIA GPU that PyTorch can use (none "
                    "found): use backend_options={'device': 'cpu'} or the onnxruntime backend")
            if self.torch_device.index is None:
                self.torch_device = torch.device("cuda", torch.cuda.current_device())
        elif self.torch_device.type != "cpu":
            raise ConfigError(f"torch backend device {device!r}: use 'cuda', 'cuda:N' or 'cpu'")
        self.precision = "fp32"
        self._models: dict[Path, Any] = {}
        self._pool = None

    @property
    def device_arrays(self) -> bool:
        """Whether runners take ``__cuda_array_interface__`` inputs (on CUDA)."""
        return self.torch_device.type == "cuda"

    # ------------------------------------------------------------------ helpers

    def autocast(self):
        """Autocast to fp16 for ``precision="fp16"`` on CUDA; nothing for fp32."""
        if self.precision == "fp16":
            return _torch().autocast(device_type="cuda", dtype=_torch().float16)
        return contextlib.nullcontext()

    def allocations(self):
        """Routes this thread's allocations into the backend's memory pool (CUDA)."""
        torch = _torch()
        if self._pool is None:
            self._pool = torch.cuda.MemPool()
        return torch.cuda.use_mem_pool(self._pool, device=self.torch_device)

    def _set_precision(self, precision: str) -> None:
        if precision == "int8":
            raise ConfigError("the torch backend runs fp32 or fp16; int8 graphs run on "
                              "onnxruntime or tensorrt")
        if precision == "fp16" and self.torch_device.type != "cuda":
            raise ConfigError("the torch backend runs fp16 on CUDA only; use fp32 on the CPU")
        if precision not in ("fp32", "fp16"):
            raise ConfigError(f"unknown precision {precision!r}; choose fp32 or fp16")
        self.precision = precision

    def model(self, manifest: Manifest):
        """The manifest's model, rebuilt from its checkpoint once per backend, in eval mode."""
        from trt_exit.models.checkpoint import load_checkpoint

        path = manifest.checkpoint_path()
        if path not in self._models:
            self._models[path] = load_checkpoint(path).to(self.torch_device).eval()
        return self._models[path]

    # ------------------------------------------------------------------ Backend

    def open_stage(self, manifest: Manifest, stage: StageEntry, precision: str) -> TorchStageRunner:
        from trt_exit.export.stages import ExitStage, SegmentStage

        self._set_precision(precision)
        model = self.model(manifest)
        if stage.kind == tn.SEGMENT:
            module = SegmentStage(model, stage.index)
        elif stage.kind == tn.EXIT:
            inputs = stage.input_names()
            outputs = stage.output_names()
            module = ExitStage(model, stage.index, reads_audio=tn.AUDIO in inputs[1:],
                               reads_state=any(n.endswith("_state") for n in inputs),
                               writes_state=any(n.endswith("_state") for n in outputs))
        else:
            raise ConfigError(f"{manifest.path}: stage {stage.name} has unknown kind {stage.kind!r}")
        return TorchStageRunner(stage.name, module.eval(), stage.inputs, stage.outputs, self)

    def open_full_model(self, manifest: Manifest, precision: str) -> TorchStageRunner:
        from trt_exit.export.stages import FullModelStage

        self._set_precision(precision)
        module = FullModelStage(self.model(manifest)).eval()
        full = manifest.full_model
        if not full.get("inputs") or not full.get("outputs"):
            raise ConfigError(f"{manifest.path} describes no full-model graph; re-export")
        return TorchStageRunner(tn.FULL_MODEL, module, full["inputs"], full["outputs"], self)

    def close(self) -> None:
        self._models.clear()
        self._pool = None

    def describe(self) -> dict[str, Any]:
        torch = _torch()
        info = {"backend": self.name, "torch": torch.__version__, "device": str(self.torch_device),
                "precision": self.precision}
        if self.torch_device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(self.torch_device)
        return info
