"""CUDA graphs by stream capture, with conditional IF nodes (CUDA 12.4+ drivers).

The recipe (as in cuda.core's ``GraphBuilder`` and NVIDIA NeMo's ``with_conditional_node``):
while a stream is capturing, create a conditional handle in the graph being captured, launch a
kernel that sets it (``cudaGraphSetConditional``), add an IF node depending on what was
captured so far, make the stream's next work depend on that node, and capture the IF body on a
second stream with ``cuStreamBeginCaptureToGraph`` into the node's body graph. Bodies nest:
each level of nesting captures on its own stream.

Body graphs may only hold kernel, memcpy, memset, empty, child-graph and conditional nodes; work
that records events or calls host functions fails to capture there (:class:`CaptureError`).

What a graph holds is read back from the driver after the capture (:func:`census`:
``cuGraphGetNodes`` / ``cuGraphNodeGetType`` on the top graph and on every IF body), so a check
of a captured graph compares the plan with the driver, not with the capture's own bookkeeping.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

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


NODE_TYPE_PREFIX = "CU_GRAPH_NODE_TYPE_"


@dataclass(frozen=True)
class GraphCensus:
    """The nodes a graph holds as the driver reports them, by nesting level.

    Attributes:
        levels: Level 0 is the top graph, level i + 1 the bodies of the conditional nodes of
            level i; per level, node type (``kernel``, ``memcpy``, ``conditional``, ...) ->
            count.
        unknown_bodies: Conditional nodes whose body graph the capture did not record (their
            contents are not counted).
    """

    levels: tuple[dict[str, int], ...]
    unknown_bodies: int = 0

    def per_level(self, kind: str) -> list[int]:
        """Nodes of type ``kind`` at each level."""
        return [level.get(kind, 0) for level in self.levels]

    @property
    def conditional_nodes(self) -> int:
        """Conditional (IF) nodes at every level."""
        return sum(self.per_level("conditional"))

    def to_dict(self) -> dict[str, Any]:
        return {"levels": [dict(level) for level in self.levels],
                "unknown_bodies": self.unknown_bodies}


def census(graph: Any, bodies: dict[int, Any], nodes_of: Callable[[Any], list],
           type_of: Callable[[Any], str]) -> GraphCensus:
    """Counts the nodes of ``graph`` and of every conditional body below it, level by level.

    Args:
        graph: The top graph.
        bodies: Body graph of each conditional node the capture added, by ``int(node)``.
        nodes_of: The nodes of a graph (:func:`graph_nodes`).
        type_of: A node's type name (:func:`node_type`).
    """
    levels: list[dict[str, int]] = []
    unknown = 0
    current = [graph]
    while current:
        counts: dict[str, int] = {}
        below = []
        for g in current:
            for node in nodes_of(g):
                kind = type_of(node)
                counts[kind] = counts.get(kind, 0) + 1
                if kind == "conditional":
                    body = bodies.get(int(node))
                    if body is None:
                        unknown += 1
                    else:
                        below.append(body)
        levels.append(counts)
        current = below
    return GraphCensus(tuple(levels), unknown)


def graph_nodes(graph: Any) -> list:
    """The nodes of a graph (``cuGraphGetNodes``: count first, then the nodes)."""
    driver, _, _ = bindings()
    _, count = check(driver.cuGraphGetNodes(graph), "cuGraphGetNodes (count)")
    if not count:
        return []
    nodes, _ = check(driver.cuGraphGetNodes(graph, count), "cuGraphGetNodes")
    return list(nodes)[:count]


def node_type(node: Any) -> str:
    """A node's type as a short name (``CU_GRAPH_NODE_TYPE_KERNEL`` -> ``kernel``)."""
    driver, _, _ = bindings()
    kind = check(driver.cuGraphNodeGetType(node), "cuGraphNodeGetType")
    name = getattr(kind, "name", str(kind))
    return name[len(NODE_TYPE_PREFIX):].lower() if name.startswith(NODE_TYPE_PREFIX) else name


class GraphExec:
    """An instantiated graph (``cudaGraphExec_t``): launch it as one unit of work.

    It keeps the graph it was instantiated from (its template) until :meth:`close`: updating a
    node of the executable graph (:meth:`set_copy`) names the node of the template.

    Args:
        graph: The template (``CUgraph``); owned from here on (destroyed by :meth:`close`).
        what: For messages.
        census: What the driver holds in the template (:func:`census`).
    """

    def __init__(self, graph: Any, what: str = "graph", census: GraphCensus | None = None):
        _, runtime, _ = bindings()
        self.what = what
        self.census = census or GraphCensus(())
        #: IF nodes in the graph (at every nesting level), as the driver reports them.
        self.conditional_nodes = self.census.conditional_nodes
        #: Launches so far (the first one is where a broken graph shows).
        self.launches = 0
        self._template = None
        self._exec = check(runtime.cudaGraphInstantiate(graph, 0), f"cudaGraphInstantiate ({what})")
        self._template = graph
        #: Source address each updatable copy node reads now, by node (see :meth:`set_copy`).
        self.copy_sources: dict[int, int] = {}

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
        """Enqueues the graph on ``stream``.

        Raises:
            CudaError: The launch failed (``cudaGraphLaunch``'s error).
        """
        _, runtime, _ = bindings()
        self.launches += 1
        check(runtime.cudaGraphLaunch(self._exec, stream), f"cudaGraphLaunch ({self.what})")

    def set_copy(self, node: Any, dst: int, src: int, size_bytes: int) -> None:
        """Points a 1-D memcpy node of the graph at ``src`` (and ``dst``) for later launches
        (``cudaGraphExecMemcpyNodeSetParams1D``; the memory must come from the same context as
        the captured copy's). Skipped when the node already reads ``src``.

        Raises:
            CudaError: The driver refused the update.
        """
        if self.copy_sources.get(int(node)) == src:
            return
        _, runtime, _ = bindings()
        check(runtime.cudaGraphExecMemcpyNodeSetParams1D(
            self._exec, node, dst, src, size_bytes, runtime.cudaMemcpyKind.cudaMemcpyDefault),
            f"cudaGraphExecMemcpyNodeSetParams1D ({self.what}, {size_bytes} bytes)")
        self.copy_sources[int(node)] = src

    def close(self) -> None:
        """Destroys the executable graph, then its template (IF bodies included)."""
        driver, runtime, _ = bindings()
        if self._exec is not None:
            graph_exec, self._exec = self._exec, None
            check(runtime.cudaGraphExecDestroy(graph_exec), f"cudaGraphExecDestroy ({self.what})")
        if self._template is not None:
            template, self._template = self._template, None
            check(driver.cuGraphDestroy(template), f"cuGraphDestroy ({self.what})")

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
        #: IF nodes added so far (the capture's own count; :func:`census` asks the driver).
        self.conditional_nodes = 0
        self._open: list[int] = []  # streams capturing, outermost first
        self._graph: Any = None
        self._bodies: dict[int, Any] = {}  # body graph of each IF node, by int(node)

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
        self._bodies[int(node)] = body
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

    def last_node(self, stream: int) -> Any:
        """The node the work just enqueued on ``stream`` became (its one capture dependency).

        Raises:
            CaptureError: ``stream`` is not capturing, or its last work is not one node.
        """
        info = compat.capture_info(stream)
        if not info.active or len(info.dependencies) != 1:
            raise CaptureError(f"{self.what}: the last captured operation on stream "
                               f"{stream:#x} is not a single node")
        return info.dependencies[0]

    def instantiate(self) -> GraphExec:
        """Counts what the driver holds (:func:`census`) and instantiates the captured graph;
        the :class:`GraphExec` owns the template from then on.

        Raises:
            CaptureError: Reading the graph back or instantiating it failed.
        """
        if self._graph is None:
            raise CaptureError(f"{self.what}: nothing captured yet")
        driver, _, _ = bindings()
        graph, self._graph = self._graph, None
        try:
            held = census(graph, self._bodies, graph_nodes, node_type)
            return GraphExec(graph, self.what, held)
        except (CudaError, RuntimeError) as exc:
            driver.cuGraphDestroy(graph)
            raise CaptureError(f"instantiating {self.what} failed: {exc}") from exc


def require_conditional_nodes(driver_version: int) -> None:
    """Raises :class:`CudaUnavailableError` if the driver predates conditional nodes."""
    if driver_version < CONDITIONAL_NODES_DRIVER:
        raise CudaUnavailableError(
            f"the NVIDIA driver supports CUDA {format_version(driver_version)}, but conditional "
            f"graph nodes need CUDA {format_version(CONDITIONAL_NODES_DRIVER)} (JetPack 6.1+ on "
            f"Jetson): use strategy='poll', or update the driver")
