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

FP16 is the ONNX FP16 pass's recipe (:mod:`trt_exit.export.fp16`) applied once to a copy of
the model when a stage is opened (:func:`to_fp16_with_fp32_islands`): weights in half precision,
normalization layers with FP32 weights computing in FP32, the exits' confidences computed in FP32
from their outputs, stage inputs and outputs float32. No autocast at run time: autocast's cast
cache is dropped when its block exits, so every weight would be re-cast on every inference (and
the casts captured into every CUDA graph).

On the CPU (``device="cpu"``) the runners serve the host executor, so the torch path (FP32 and
FP16) is tested against ONNX Runtime without a GPU.
"""

from __future__ import annotations

import functools
import re
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
#: First torch release with ``torch.cuda.MemPool`` / ``use_mem_pool`` (2.5) *and* the fix of
#: ``use_mem_pool``'s pool reference counting (pytorch/pytorch#133600, merged in October 2024
#: after 2.5.0 was released), which the CUDA path needs.
MIN_TORCH_CUDA = (2, 6)


def torch_cuda_unsupported(version: str, has_mem_pool: bool) -> str:
    """Why this torch cannot run the CUDA path ("" if it can).

    Args:
        version: ``torch.__version__``.
        has_mem_pool: Whether ``torch.cuda`` has ``MemPool`` and ``use_mem_pool``.
    """
    numbers = tuple(int(n) for n in re.findall(r"\d+", version)[:2])
    if numbers >= MIN_TORCH_CUDA and has_mem_pool:
        return ""
    floor = ".".join(map(str, MIN_TORCH_CUDA))
    return (f"the torch backend on CUDA needs torch {floor} or newer (torch.cuda.MemPool and "
            f"use_mem_pool keep the memory CUDA graphs point at to the backend); this is torch "
            f"{version}: pip install 'torch>={floor}' (on a Jetson, NVIDIA's JetPack wheel of "
            f"{floor}+), or use backend='tensorrt' / the onnxruntime host executor")


def _fp32_module_types():
    """Modules the FP16 pass keeps in FP32 (as ``FP32_OP_TYPES`` of the ONNX pass do)."""
    nn = _torch().nn
    return (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm,
            nn.modules.instancenorm._InstanceNorm)


def _to_float32(module, args):
    torch = _torch()
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)


def _to_float16(module, args, output):
    return output.half()


def _confidence_in_fp32(confidence, output):
    return confidence(output.float())


def to_fp16_with_fp32_islands(model):
    """Converts ``model`` (in place) to the FP16 ONNX pass's recipe, once.

    Weights and buffers become float16, except normalization layers, which keep FP32 weights and
    compute in FP32 (their inputs are cast up, their outputs down to the FP16 consumers, as the
    ONNX pass's Casts do). Each exit head's confidence is computed in FP32 from its output.
    Softmax, reductions, exp/log/pow/sqrt on float16 tensors accumulate in FP32 inside PyTorch's
    kernels and round only their result, which the FP16 consumer after them reads in FP16 in
    the ONNX graph too. Returns ``model``.
    """
    model.half()
    for module in model.modules():
        if isinstance(module, _fp32_module_types()):
            module.float()
            module.register_forward_pre_hook(_to_float32)
            module.register_forward_hook(_to_float16)
    for head in getattr(model, "exits", []):
        # An instance attribute: only this converted copy computes confidences this way.
        head.confidence = functools.partial(_confidence_in_fp32, head.confidence)
    return model


class _Fp16Stage:
    """A stage module of an FP16 model: float32 in and out (the executor's buffers)."""

    def __init__(self, module):
        self.module = module

    def __getattr__(self, name):
        if name == "module":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.module, name)

    def __call__(self, *args):
        torch = _torch()
        values = self.module(*[a.half() if a.is_floating_point() else a for a in args])
        if isinstance(values, torch.Tensor):
            return values.float()
        return tuple(v.float() if v.is_floating_point() else v for v in values)


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
        with torch.no_grad():
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
                self.backend.allocations():
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
        device: ``"cuda"``, ``"cuda:N"`` or ``"cpu"``. The precision (fp32, or fp16 as the
            ONNX FP16 pass does it: :func:`to_fp16_with_fp32_islands`) comes from the
            executor's ``precision``.

    Raises:
        CudaUnavailableError: ``cuda`` without a GPU PyTorch can use.
        ConfigError: ``cuda`` with a torch too old for the CUDA path (:data:`MIN_TORCH_CUDA`).
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
            reason = torch_cuda_unsupported(torch.__version__, hasattr(torch.cuda, "MemPool")
                                            and hasattr(torch.cuda, "use_mem_pool"))
            if reason:
                raise ConfigError(reason)
            if self.torch_device.index is None:
                self.torch_device = torch.device("cuda", torch.cuda.current_device())
        elif self.torch_device.type != "cpu":
            raise ConfigError(f"torch backend device {device!r}: use 'cuda', 'cuda:N' or 'cpu'")
        self.precision = "fp32"
        self._models: dict[tuple[Path, str], Any] = {}
        self._pool = None

    @property
    def device_arrays(self) -> bool:
        """Whether runners take ``__cuda_array_interface__`` inputs (on CUDA)."""
        return self.torch_device.type == "cuda"

    # ------------------------------------------------------------------ helpers

    def allocations(self):
        """Routes this thread's allocations into the backend's memory pool (CUDA)."""
        torch = _torch()
        if self._pool is None:
            with torch.cuda.device(self.torch_device):  # a pool belongs to the current device
                self._pool = torch.cuda.MemPool()
        return torch.cuda.use_mem_pool(self._pool, device=self.torch_device)

    def _set_precision(self, precision: str) -> None:
        if precision == "int8":
            raise ConfigError("the torch backend runs fp32 or fp16; int8 graphs run on "
                              "onnxruntime or tensorrt")
        if precision not in ("fp32", "fp16"):
            raise ConfigError(f"unknown precision {precision!r}; choose fp32 or fp16")
        self.precision = precision

    def model(self, manifest: Manifest):
        """The manifest's model in this backend's precision, rebuilt from its checkpoint (and
        converted to FP16) once per backend, in eval mode."""
        from trt_exit.models.checkpoint import load_checkpoint

        key = (manifest.checkpoint_path(), self.precision)
        if key not in self._models:
            model = load_checkpoint(key[0]).to(self.torch_device).eval()
            if self.precision == "fp16":
                model = to_fp16_with_fp32_islands(model)
            self._models[key] = model
        return self._models[key]

    def _wrap(self, module):
        return _Fp16Stage(module) if self.precision == "fp16" else module

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
        return TorchStageRunner(stage.name, self._wrap(module.eval()), stage.inputs,
                                stage.outputs, self)

    def open_full_model(self, manifest: Manifest, precision: str) -> TorchStageRunner:
        from trt_exit.export.stages import FullModelStage

        self._set_precision(precision)
        module = FullModelStage(self.model(manifest)).eval()
        full = manifest.full_model
        if not full.get("inputs") or not full.get("outputs"):
            raise ConfigError(f"{manifest.path} describes no full-model graph; re-export")
        return TorchStageRunner(tn.FULL_MODEL, self._wrap(module), full["inputs"],
                                full["outputs"], self)

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
