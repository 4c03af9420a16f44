"""CUDA graphs by stream capture, with conditional IF nodes (CUDA 12.4+ drivers).

The recipe (as in cuda.core's ``GraphBuilder`` and NVIDIA NeMo's ``with_conditional_node``):
while a stream is capturing, create a conditional handle in the graph being captured, launch a
kernel that sets it (``cudaGraphSetConditional``), add an IF node depending on what was
captured so far, make the stream's next work depend on that node, and capture the IF body on a
second stream with ``cuStreamBeginCaptureToGraph`` into the node's body graph. Bodies nest:
each level of nesting captures on its own stream.

Body graphs may only hold kernel, memcpy, memset, empty, child-graph and conditional nodes; work
that records events or calls host functions fails to capture there (:class:`CaptureError`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from trt_exit.errors import CudaError, CudaUnavailableError
from trt_exit.runtime.cuda import compat
from trt_exit.runtime.cuda.api import CONDITIONAL_NODES_DRIVER, bindings, check, format_version


class CaptureError(CudaError):
    """Work could not be captured into a CUDA graph (the executor falls back to polling)."""


def capture_mode(name: str = "relaxed") -> Any:
    """A driver ``CUstreamCaptureMode``. Relaxed by default: PyTorch's caching allocator may
    call ``cudaMalloc`` while a stage is captured, which the stricter modes forbid."""
    driver, _, _ = bindings()
    modes = driver.CUstreamCaptureMode
    return {"global": modes.CU_STREAM_CAPTURE_MODE_GLOBAL,
            "thread_local": modes.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            "relaxed": modes.CU_STREAM_CAPTURE_MODE_RELAXED}[name]


class GraphExec:
    """An instantiated graph (``cudaGraphExec_t``): launch it as one unit of work."""

    def __init__(self, graph: Any, what: str = "graph", conditional_nodes: int = 0):
        _, runtime, _ = bindings()
        self.what = what
        #: IF nodes in the graph (at every nesting level).
        self.conditional_nodes = conditional_nodes
        self._exec = check(runtime.cudaGraphInstantiate(graph, 0), f"cudaGraphInstantiate ({what})")

    def upload(self, stream: int) -> None:
        """Uploads the graph's resources ahead of the first launch (keeps it off the timing).

        Raises:
            CaptureError: The upload failed (part of making the graph: callers fall back).
        """
        _, runtime, _ = bindings()
        try:
            check(runtime.cudaGraphUpload(self._exec, stream), f"cudaGraphUpload ({self.what})")
        except (CudaError, RuntimeError) as exc:
            raise CaptureError(f"uploading {self.what} failed: {exc}") from exc

    def launch(self, stream: int) -> None:
        _, runtime, _ = bindings()
        check(runtime.cudaGraphLaunch(self._exec, stream), f"cudaGraphLaunch ({self.what})")

    def close(self) -> None:
        if self._exec is not None:
            _, runtime, _ = bindings()
            graph_exec, self._exec = self._exec, None
            check(runtime.cudaGraphExecDestroy(graph_exec), f"cudaGraphExecDestroy ({self.what})")

    def __enter__(self) -> "GraphExec":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class GraphCapture:
    """Captures the work enqueued on a stream (and on conditional-body streams) into a graph.

    Use::

        with GraphCapture(stream.handle) as capture:
            enqueue(stream.handle)                  # captured, not run
            handle = capture.conditional_handle(stream.handle)
            set_condition_kernel(stream.handle, handle)
            with capture.if_body(stream.handle, handle, body_stream.handle):
                enqueue(body_stream.handle)         # runs only if the condition was set
        graph_exec = capture.instantiate()

    Leaving the ``with`` block by an exception ends every open capture (so the streams are
    usable again) and raises :class:`CaptureError`; so does a failure of the end of the capture
    itself (``cuStreamEndCapture`` reports an invalidated capture there).

    Args:
        stream: The stream whose work is captured.
        mode: Capture mode (see :func:`capture_mode`).
        what: For messages.
        context: The ``CUcontext`` the conditional handles and IF nodes belong to (the
            executor's device; default: the context current on this thread).
    """

    def __init__(self, stream: int, mode: str = "relaxed", what: str = "graph",
                 context: Any = None):
        self.stream = stream
        self.mode = mode
        self.what = what
        self.context = context
        #: IF nodes added so far.
        self.conditional_nodes = 0
        self._open: list[int] = []  # streams capturing, outermost first
        self._graph: Any = None

    def _context(self) -> Any:
        if self.context is None:
            driver, _, _ = bindings()
            self.context = check(driver.cuCtxGetCurrent(), "cuCtxGetCurrent")
        return self.context

    def __enter__(self) -> "GraphCapture":
        driver, _, _ = bindings()
        check(driver.cuStreamBeginCapture(self.stream, capture_mode(self.mode)),
              f"cuStreamBeginCapture ({self.what})")
        self._open.append(self.stream)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            driver, _, _ = bindings()
            try:
                self._graph = check(driver.cuStreamEndCapture(self.stream),
                                    f"cuStreamEndCapture ({self.what})")
            except (CudaError, RuntimeError) as end_exc:
                self._abort()
                raise CaptureError(f"ending the capture of {self.what} failed: {end_exc}") \
                    from end_exc
            self._open.pop()
            return None
        self._abort()
        if isinstance(exc, CaptureError) or not isinstance(exc, Exception):
            return None
        raise CaptureError(f"capturing {self.what} failed: {exc}") from exc

    def _abort(self) -> None:
        """Ends every open capture, innermost first, discarding what was captured."""
        driver, _, _ = bindings()
        while self._open:
            stream = self._open.pop()
            try:
                status, graph = driver.cuStreamEndCapture(stream)
            except RuntimeError:  # no driver library: nothing is capturing
                continue
            if int(status) == 0 and graph is not None and int(graph) and stream == self.stream:
                driver.cuGraphDestroy(graph)
        # An invalidated capture leaves a sticky "capture invalidated" error on the stream
        # until it is ended; it has been ended above.

    def conditional_handle(self, stream: int, default: int = 0) -> Any:
        """A conditional handle in the graph that ``stream`` is capturing into, reset to
        ``default`` at every launch."""
        driver, _, _ = bindings()
        info = compat.capture_info(stream)
        if not info.active:
            raise CaptureError(f"stream {stream:#x} is not capturing: cannot add a condition")
        return check(driver.cuGraphConditionalHandleCreate(
            info.graph, self._context(), default, driver.CU_GRAPH_COND_ASSIGN_DEFAULT),
            "cuGraphConditionalHandleCreate")

    @contextlib.contextmanager
    def if_body(self, stream: int, handle: Any, body_stream: int) -> Iterator[int]:
        """Adds an IF node after the work captured on ``stream``; work enqueued on
        ``body_stream`` inside the block forms its body (runs only if ``handle`` is non-zero).

        Yields:
            ``body_stream``.
        """
        driver, _, _ = bindings()
        info = compat.capture_info(stream)
        if not info.active:
            raise CaptureError(f"stream {stream:#x} is not capturing: cannot add an IF node")
        params = driver.CUgraphNodeParams()
        params.type = driver.CUgraphNodeType.CU_GRAPH_NODE_TYPE_CONDITIONAL
        params.conditional.handle = handle
        params.conditional.type = driver.CUgraphConditionalNodeType.CU_GRAPH_COND_TYPE_IF
        params.conditional.size = 1
        params.conditional.ctx = self._context()
        node = compat.graph_add_node(info.graph, info.dependencies, params)
        self.conditional_nodes += 1
        compat.set_capture_dependencies(stream, [node])
        body = params.conditional.phGraph_out[0]
        compat.begin_capture_to_graph(body_stream, body, capture_mode(self.mode))
        self._open.append(body_stream)
        yield body_stream
        # The body graph belongs to the IF node: do not destroy what EndCapture returns.
        try:
            check(driver.cuStreamEndCapture(body_stream), "cuStreamEndCapture (IF body)")
        except (CudaError, RuntimeError) as exc:
            raise CaptureError(f"ending the capture of an IF body of {self.what} failed: "
                               f"{exc}") from exc
        self._open.pop()

    def instantiate(self) -> GraphExec:
        """Instantiates the captured graph (then frees the template)."""
        if self._graph is None:
            raise CaptureError(f"{self.what}: nothing captured yet")
        driver, _, _ = bindings()
        graph, self._graph = self._graph, None
        try:
            return GraphExec(graph, self.what, self.conditional_nodes)
        except CudaError as exc:
            raise CaptureError(f"instantiating {self.what} failed: {exc}") from exc
        finally:
            driver.cuGraphDestroy(graph)


def require_conditional_nodes(driver_version: int) -> None:
    """Raises :class:`CudaUnavailableError` if the driver predates conditional nodes."""
    if driver_version < CONDITIONAL_NODES_DRIVER:
        raise CudaUnavailableError(
            f"the NVIDIA driver supports CUDA {format_version(driver_version)}, but conditional "
            f"graph nodes need CUDA {format_version(CONDITIONAL_NODES_DRIVER)} (JetPack 6.1+ on "
            f"Jetson): use strategy='poll', or update the driver")
