"""NVTX ranges in the ``trt_exit`` domain, free when NVTX is not installed.

``with nvtx_range("segment_0"):`` marks the enclosed work in Nsight Systems timelines. The
``nvtx`` package is an optional extra (``trt-exit[cuda]``); without it the ranges are no-ops that
cost one attribute lookup.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

DOMAIN = "trt_exit"
_NULL = contextlib.nullcontext()

try:  # optional dependency: profiling only
    import nvtx as _nvtx
except ImportError:  # pragma: no cover - depends on the environment
    _nvtx = None

#: Colors by range kind, so segments, exits and gates are told apart at a glance.
COLORS = {"segment": "blue", "exit": "green", "gate": "orange", "copy": "gray", "full": "purple"}


def available() -> bool:
    """Whether NVTX ranges are emitted."""
    return _nvtx is not None


def nvtx_range(name: str, kind: str | None = None) -> ContextManager:
    """A context manager marking ``name`` in the ``trt_exit`` NVTX domain."""
    if _nvtx is None:
        return _NULL
    color = COLORS.get(kind or name.split("_")[0], "white")
    return _nvtx.annotate(name, color=color, domain=DOMAIN)
