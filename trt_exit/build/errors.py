"""Errors of the TensorRT build and of loading engines."""

from __future__ import annotations

from trt_exit.errors import ArtifactError, TrtExitError


class OnnxParseError(ArtifactError):
    """TensorRT's ONNX parser (or the preflight check) rejected a graph; the message names the
    node, its op type and why."""


class EngineBuildError(TrtExitError):
    """TensorRT parsed the graph but could not build an engine from it."""


class EngineMismatchError(ArtifactError):
    """An engine was built for another TensorRT version or GPU: it must be rebuilt here."""
