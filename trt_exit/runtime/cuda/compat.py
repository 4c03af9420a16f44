"""Calls whose signatures differ between the CUDA 12.x (JetPack 6) and 13.x (JetPack 7) bindings.

CUDA 13 folded the ``_v2`` / ``_v3`` graph-capture entry points into the plain names:

* ``cuGraphAddNode`` and ``cuStreamUpdateCaptureDependencies`` (and their runtime twins) take
  an ``edgeData`` / ``dependencyData`` argument after the dependencies; 12.x takes none (its
  ``_v2`` variants do).
* ``cuStreamGetCaptureInfo`` returns ``(status, captureStatus, id, graph, dependencies,
  numDependencies)`` in 12.x and additionally the edge data before ``numDependencies`` in 13.x.

Rather than trusting version numbers, each helper looks at the installed function's signature
(``inspect.signature`` works on the Cython bindings) or at the length of what it returned, so a
binding that back- or forward-ports a variant still gets the right call.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable

from trt_exit.runtime.cuda.api import bindings, check

_EDGE_PARAMS = ("dependencyData", "edgeData")


@functools.lru_cache(maxsize=None)
def takes_edge_data(function: Callable) -> bool:
    """Whether a graph-capture binding has an edge-data parameter (CUDA 13 style)."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):  # no signature: the 12.x plain entry points had none
        return False
    return any(name in parameters for name in _EDGE_PARAMS)


def edge_data_call(function: Callable, head: tuple, dependencies: list, tail: tuple) -> Any:
    """Calls ``function(*head, dependencies, [edgeData=None,] len(dependencies), *tail)``.

    The edge data (``None``: default edges) is passed only where the signature has it.
    """
    if takes_edge_data(function):
        return function(*head, dependencies, None, len(dependencies), *tail)
    return function(*head, dependencies, len(dependencies), *tail)


@dataclass
class CaptureInfo:
    """What ``cuStreamGetCaptureInfo`` says about a capturing stream.

    Attributes:
        active: The stream is capturing.
        status: The raw capture status enum.
        graph: The graph being captured into (``CUgraph``).
        dependencies: Nodes the next captured operation will depend on.
    """

    active: bool
    status: Any
    graph: Any
    dependencies: list


def unpack_capture_info(values: tuple) -> tuple[Any, Any, list]:
    """``(captureStatus, graph, dependencies)`` from the values of a ``cuStreamGetCaptureInfo``
    call, status removed: 5 values in 12.x, 6 in 13.x (edge data before the count)."""
    if len(values) not in (5, 6):
        raise ValueError(f"unexpected cuStreamGetCaptureInfo result of {len(values)} values")
    status, _capture_id, graph, dependencies = values[:4]
    return status, graph, list(dependencies or [])


def capture_info(stream: int) -> CaptureInfo:
    """The capture state of ``stream`` (driver API, either binding major version)."""
    driver, _, _ = bindings()
    values = check(driver.cuStreamGetCaptureInfo(stream), "cuStreamGetCaptureInfo")
    status, graph, dependencies = unpack_capture_info(values)
    active = status == driver.CUstreamCaptureStatus.CU_STREAM_CAPTURE_STATUS_ACTIVE
    return CaptureInfo(active, status, graph, dependencies)


def graph_add_node(graph: Any, dependencies: list, params: Any) -> Any:
    """``cuGraphAddNode`` with default edges; returns the new node."""
    driver, _, _ = bindings()
    return check(edge_data_call(driver.cuGraphAddNode, (graph,), dependencies, (params,)),
                 "cuGraphAddNode")


def set_capture_dependencies(stream: int, nodes: list) -> None:
    """Makes the next operation captured on ``stream`` depend on exactly ``nodes``."""
    driver, _, _ = bindings()
    flags = driver.CUstreamUpdateCaptureDependencies_flags.CU_STREAM_SET_CAPTURE_DEPENDENCIES
    check(edge_data_call(driver.cuStreamUpdateCaptureDependencies, (stream,), nodes, (flags,)),
          "cuStreamUpdateCaptureDependencies")


def begin_capture_to_graph(stream: int, graph: Any, mode: Any) -> None:
    """Starts capturing ``stream`` into an existing (body) graph; same signature in 12.x and 13.x
    (both take dependency data)."""
    driver, _, _ = bindings()
    check(edge_data_call(driver.cuStreamBeginCaptureToGraph, (stream, graph), [], (mode,)),
          "cuStreamBeginCaptureToGraph")
