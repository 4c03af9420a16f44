"""Memory owners: device buffers, pinned (optionally mapped) host buffers, and views.

Each owner frees its memory in :meth:`close` (also on ``with`` exit); closing twice is fine.
Whoever created an owner owns it; :class:`DeviceView` and the numpy views of
:class:`PinnedBuffer` own nothing and must not outlive the owner they were taken from.

Frees synchronize implicitly (``cudaFree`` / ``cudaFreeHost`` wait for the device), so work
still reading a buffer never sees it freed under it.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from trt_exit.errors import InputError
from trt_exit.runtime.cuda.api import bindings, check


class DeviceBuffer:
    """``size_bytes`` of device memory (``cudaMalloc``); :attr:`address` is the pointer."""

    def __init__(self, size_bytes: int, what: str = "buffer"):
        _, runtime, _ = bindings()
        self.size_bytes = max(int(size_bytes), 1)
        self.what = what
        self.address = int(check(runtime.cudaMalloc(self.size_bytes),
                                 f"cudaMalloc({self.size_bytes}) for {what}"))

    def view(self, shape: tuple[int, ...], dtype: Any, offset_bytes: int = 0,
             stream: int | None = None) -> "DeviceView":
        """A ``__cuda_array_interface__`` view into this buffer (owns nothing); ``stream``: the
        stream that writes it, which a consumer must order itself after."""
        view = DeviceView(self.address + offset_bytes, tuple(shape), np.dtype(dtype), stream)
        if offset_bytes + view.nbytes > self.size_bytes:
            raise ValueError(f"view of {view.nbytes} bytes at {offset_bytes} exceeds {self.what}")
        return view

    def memset_async(self, value: int, size_bytes: int, stream: int) -> None:
        _, runtime, _ = bindings()
        check(runtime.cudaMemsetAsync(self.address, value, size_bytes, stream), "cudaMemsetAsync")

    def close(self) -> None:
        if self.address:
            _, runtime, _ = bindings()
            address, self.address = self.address, 0
            check(runtime.cudaFree(address), f"cudaFree ({self.what})")

    def __enter__(self) -> "DeviceBuffer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class PinnedBuffer:
    """Page-locked host memory (``cudaHostAlloc``), for fast and asynchronous copies.

    With ``mapped=True`` the GPU can read and write it directly at :attr:`device_address`
    (zero-copy; on Jetson's shared DRAM it is the same memory): the poll strategy's gate writes
    its decision flags there.
    """

    def __init__(self, size_bytes: int, mapped: bool = False, what: str = "pinned buffer"):
        _, runtime, _ = bindings()
        self.size_bytes = max(int(size_bytes), 1)
        self.what = what
        flags = runtime.cudaHostAllocMapped if mapped else runtime.cudaHostAllocDefault
        self.address = int(check(runtime.cudaHostAlloc(self.size_bytes, flags),
                                 f"cudaHostAlloc({self.size_bytes}) for {what}"))
        self.device_address = 0
        if mapped:
            self.device_address = int(check(runtime.cudaHostGetDevicePointer(self.address, 0),
                                            f"cudaHostGetDevicePointer ({what})"))
        import ctypes

        raw = (ctypes.c_ubyte * self.size_bytes).from_address(self.address)
        #: All of the buffer as bytes; valid until :meth:`close`.
        self.bytes = np.frombuffer(raw, dtype=np.uint8)

    def array(self, shape: tuple[int, ...], dtype: Any, offset_bytes: int = 0) -> np.ndarray:
        """A numpy view (no copy) of part of the buffer; valid until :meth:`close`."""
        dtype = np.dtype(dtype)
        count = int(math.prod(shape))
        end = offset_bytes + count * dtype.itemsize
        if end > self.size_bytes:
            raise ValueError(f"view of {end - offset_bytes} bytes at {offset_bytes} exceeds {self.what}")
        return self.bytes[offset_bytes:end].view(dtype).reshape(shape)

    def close(self) -> None:
        if self.address:
            _, runtime, _ = bindings()
            address, self.address, self.device_address = self.address, 0, 0
            self.bytes = np.zeros(0, np.uint8)
            check(runtime.cudaFreeHost(address), f"cudaFreeHost ({self.what})")

    def __enter__(self) -> "PinnedBuffer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


@dataclass(frozen=True)
class DeviceView:
    """A C-contiguous array in device memory it does not own, exported through
    ``__cuda_array_interface__`` (version 3) so torch, CuPy or Numba can wrap it without a copy
    (``torch.as_tensor(view, device="cuda")``).

    ``stream`` is the stream that writes the memory (the interface's ``stream`` key): a
    consumer that honours version 3 (CuPy, Numba) orders its reads after that stream's work.
    None: no synchronization is needed.
    """

    address: int
    shape: tuple[int, ...]
    dtype: np.dtype
    stream: int | None = None

    @property
    def nbytes(self) -> int:
        return int(math.prod(self.shape)) * self.dtype.itemsize

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.address, False),
                "strides": None, "version": 3, "stream": self.stream}


@dataclass(frozen=True)
class ExternalArray:
    """A caller's ``__cuda_array_interface__`` array, checked and described.

    Attributes:
        address: Device pointer of element 0.
        shape: Array shape.
        dtype: Element type.
        stream: The stream work reading the array must be ordered after
            (:func:`producer_stream`), or None when no ordering is needed.
    """

    address: int
    shape: tuple[int, ...]
    dtype: np.dtype
    stream: int | None


def external_array(name: str, value: Any, device: int,
                   interface: dict[str, Any] | None = None) -> ExternalArray:
    """Reads and checks a ``__cuda_array_interface__`` object for use without a copy.

    Args:
        name: Input name, for messages.
        value: The object.
        device: The GPU it must be on.
        interface: Its interface dict if already read (reading it can cost microseconds).

    Raises:
        InputError: It is not C-contiguous, is read-only-masked, or lives on another device
            or in host memory; the message says what to do.
    """
    if interface is None:
        interface = value.__cuda_array_interface__
    shape = tuple(int(d) for d in interface["shape"])
    dtype = np.dtype(interface["typestr"])
    if interface.get("mask") is not None:
        raise InputError(f"input {name!r} is a masked array; pass a plain device array")
    strides = interface.get("strides")
    if strides is not None:
        expected, step = [], dtype.itemsize
        for dim in reversed(shape):
            expected.append(step)
            step *= dim
        if tuple(strides) != tuple(reversed(expected)) and math.prod(shape) > 1:
            raise InputError(f"input {name!r} is not C-contiguous (strides {tuple(strides)}): "
                             f"pass a contiguous array (e.g. tensor.contiguous())")
    address = int(interface["data"][0])
    if address and math.prod(shape) > 0:
        where = pointer_device(address)
        if where is None:
            raise InputError(f"input {name!r} exposes __cuda_array_interface__ but its memory "
                             f"is not device memory; pass it as a numpy array instead")
        if where != device:
            raise InputError(f"input {name!r} is on GPU {where}, but the executor runs on GPU "
                             f"{device}: move it (e.g. tensor.to('cuda:{device}'))")
    return ExternalArray(address, shape, dtype, producer_stream(value, interface))


#: ``cudaStreamLegacy``: the legacy default stream, as the interface (v3) and the runtime name it.
LEGACY_DEFAULT_STREAM = 1


def producer_stream(value: Any, interface: dict[str, Any]) -> int | None:
    """The stream whose work a consumer of ``value`` must be ordered after, or None.

    * A CUDA torch tensor: torch's current stream on the tensor's device. torch exports
      interface version 2, which has no ``stream`` key, and writes tensors on its current
      stream; its default stream (handle 0) is the legacy default stream.
    * Interface version 3 (CuPy, Numba, pycuda): the ``stream`` key (1: legacy default stream,
      2: per-thread default stream, else a ``cudaStream_t``); absent or None means the producer
      requires no synchronization (the specification's rule).
    * Version 2 from anything else: the producer cannot say; our choice is the legacy default
      stream, which is ordered after the work of every blocking stream of the context.

    The executor records an event on that stream and makes its own (non-blocking) stream wait
    for it: no host synchronization.
    """
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor) and value.is_cuda:
        handle = int(torch.cuda.current_stream(value.device).cuda_stream)
        return handle if handle else LEGACY_DEFAULT_STREAM
    if int(interface.get("version", 0)) >= 3:
        stream = interface.get("stream")
        if stream is None:
            return None
        return int(stream) if int(stream) else LEGACY_DEFAULT_STREAM
    return LEGACY_DEFAULT_STREAM


def pointer_device(address: int) -> int | None:
    """Device ordinal of device or managed memory at ``address``; None for host memory."""
    _, runtime, _ = bindings()
    attributes = check(runtime.cudaPointerGetAttributes(address), "cudaPointerGetAttributes")
    kinds = runtime.cudaMemoryType
    if attributes.type in (kinds.cudaMemoryTypeDevice, kinds.cudaMemoryTypeManaged):
        return int(attributes.device)
    return None
