"""Streams and events (CUDA runtime API), owned and closed like every other CUDA resource.

Events are recorded on the stream that does the work they mark, and a host wait is always on
an event or the stream that will complete it (never ``cudaDeviceSynchronize``).
"""

from __future__ import annotations

import threading
from typing import Any

from trt_exit.runtime.cuda.api import bindings, check


class Stream:
    """A non-blocking CUDA stream (does not synchronize with the legacy default stream).

    Attributes:
        handle: The ``cudaStream_t`` as an int (what stage runners and torch's
            ``ExternalStream`` take).
    """

    def __init__(self, what: str = "stream"):
        _, runtime, _ = bindings()
        self.what = what
        self._stream = check(runtime.cudaStreamCreateWithFlags(runtime.cudaStreamNonBlocking),
                             f"cudaStreamCreateWithFlags ({what})")
        self.handle = int(self._stream)

    def synchronize(self) -> None:
        """Blocks the host until all work enqueued so far has finished (counted:
        :func:`host_syncs`)."""
        _, runtime, _ = bindings()
        _SYNCS.count += 1
        check(runtime.cudaStreamSynchronize(self.handle), f"cudaStreamSynchronize ({self.what})")

    def wait(self, event: "Event") -> None:
        """Makes later work on this stream wait for ``event`` (no host wait)."""
        stream_wait(self.handle, event)

    def copy(self, dst: int, src: int, size_bytes: int) -> None:
        """See :func:`copy_async`."""
        copy_async(self.handle, dst, src, size_bytes)

    def close(self) -> None:
        if self.handle:
            _, runtime, _ = bindings()
            stream, self._stream, self.handle = self._stream, None, 0
            check(runtime.cudaStreamDestroy(stream), f"cudaStreamDestroy ({self.what})")

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class Event:
    """A CUDA event; ``timing=True`` for :meth:`elapsed_ms`, else a cheaper sync-only event."""

    def __init__(self, timing: bool = False):
        _, runtime, _ = bindings()
        flags = runtime.cudaEventDefault if timing else runtime.cudaEventDisableTiming
        self._event = check(runtime.cudaEventCreateWithFlags(flags), "cudaEventCreateWithFlags")
        self.handle = int(self._event)

    def record(self, stream: int | Stream) -> "Event":
        """Records the event on ``stream`` (a :class:`Stream` or a raw handle)."""
        _, runtime, _ = bindings()
        handle = stream.handle if isinstance(stream, Stream) else int(stream)
        check(runtime.cudaEventRecord(self.handle, handle), "cudaEventRecord")
        return self

    def synchronize(self) -> None:
        """Blocks the host until the work before the last :meth:`record` has finished (counted:
        :func:`host_syncs`)."""
        _, runtime, _ = bindings()
        _SYNCS.count += 1
        check(runtime.cudaEventSynchronize(self.handle), "cudaEventSynchronize")

    def elapsed_ms(self, start: "Event") -> float:
        """GPU time from ``start`` to this event, in milliseconds (both must have completed)."""
        _, runtime, _ = bindings()
        return float(check(runtime.cudaEventElapsedTime(start.handle, self.handle),
                           "cudaEventElapsedTime"))

    def close(self) -> None:
        if self.handle:
            _, runtime, _ = bindings()
            event, self._event, self.handle = self._event, None, 0
            check(runtime.cudaEventDestroy(event), "cudaEventDestroy")

    def __enter__(self) -> "Event":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def copy_async(stream: int, dst: int, src: int, size_bytes: int) -> None:
    """Enqueues a copy of ``size_bytes`` on ``stream`` (direction inferred from the pointers:
    unified addressing); host memory must be pinned for the copy to be asynchronous (and to be
    capturable into a graph)."""
    if size_bytes <= 0:
        return
    _, runtime, _ = bindings()
    check(runtime.cudaMemcpyAsync(dst, src, size_bytes, runtime.cudaMemcpyKind.cudaMemcpyDefault,
                                  stream), f"cudaMemcpyAsync({size_bytes} bytes)")


def stream_wait(stream: int, event: "Event") -> None:
    """Makes later work on ``stream`` wait for ``event``'s last record (no host wait)."""
    _, runtime, _ = bindings()
    check(runtime.cudaStreamWaitEvent(stream, event.handle, 0), "cudaStreamWaitEvent")


def wait_for_producer(consumer: Stream, producer: Any, event: Event) -> None:
    """Makes ``consumer`` wait for the work a ``__cuda_array_interface__`` producer enqueued on
    its stream (:func:`~trt_exit.runtime.cuda.memory.producer_stream`: 1 = legacy default stream,
    2 = per-thread default stream, None = nothing to wait for); an event, no host wait."""
    if producer is None or int(producer) == consumer.handle:
        return
    event.record(int(producer))
    consumer.wait(event)


def stream_handle(stream: Any) -> int:
    """A ``cudaStream_t`` as an int from what callers hold: an int, a torch stream
    (``.cuda_stream``), a CuPy stream (``.ptr``), a Numba stream (``.handle``), or a
    :class:`Stream`. 0 (the default stream) becomes 1, the legacy default stream it is.

    Raises:
        InputError: Anything else.
    """
    from trt_exit.errors import InputError

    if isinstance(stream, Stream):
        return stream.handle
    if isinstance(stream, int) and not isinstance(stream, bool):
        handle = stream
    else:
        for attribute in ("cuda_stream", "ptr", "handle"):
            value = getattr(stream, attribute, None)
            if isinstance(value, int):
                handle = value
                break
            if value is not None and hasattr(value, "value"):  # numba: a ctypes c_void_p
                handle = int(value.value or 0)
                break
        else:
            raise InputError(f"{stream!r} is not a CUDA stream: pass a torch/CuPy/Numba stream "
                             f"or its cudaStream_t as an int")
    if handle < 0:
        raise InputError(f"{handle} is not a cudaStream_t")
    return handle or 1


class _SyncCount(threading.local):
    count = 0


_SYNCS = _SyncCount()


def host_syncs() -> int:
    """Host synchronizations this thread has made through this layer so far
    (:meth:`Stream.synchronize`, :meth:`Event.synchronize`): take the difference around work."""
    return _SYNCS.count
