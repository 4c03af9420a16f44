"""Exceptions raised by trt_exit.

Every error a user can cause (bad input, a damaged file, a missing optional dependency) is one of
these, with a message that names the file or tensor involved and says what to do. The CLI prints
the message and exits non-zero without a traceback.
"""

from __future__ import annotations


class TrtExitError(Exception):
    """Base class of every error trt_exit raises on purpose."""


class ConfigError(TrtExitError, ValueError):
    """A configuration value is invalid (unknown exit type, bad block index, ...)."""


class InputError(TrtExitError, ValueError):
    """An input tensor has the wrong shape, dtype, device or contains NaN/Inf."""


class ArtifactError(TrtExitError):
    """A file on disk (ONNX graph, checkpoint, engine, manifest) is missing or damaged."""


class ManifestError(ArtifactError):
    """A manifest is malformed, or does not match the files it describes."""


class OutputError(TrtExitError):
    """An output cannot be written where it was asked to go (a missing or read-only folder, a
    path that is a model's file or the command's own input, a value JSON cannot hold)."""


class StageError(TrtExitError, RuntimeError):
    """A backend failed while running a stage; the message names the stage and the backend."""


class MissingDependencyError(TrtExitError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""

    def __init__(self, package: str, extra: str, purpose: str, hint: str = "") -> None:
        message = (
            f"{purpose} needs the Python package '{package}', which is not installed. "
            f"Install it with: pip install 'trt-exit[{extra}]'"
        )
        if hint:
            message += f". {hint}"
        super().__init__(message)
        self.package = package
        self.extra = extra


def require(module: str, extra: str, purpose: str, hint: str = ""):
    """Imports an optional dependency or raises :class:`MissingDependencyError`.

    Args:
        module: Importable module name, e.g. ``"tensorrt"``.
        extra: The ``trt-exit[...]`` extra that provides it.
        purpose: What the caller was trying to do, for the message.
        hint: Extra advice appended to the message (e.g. how to get it on Jetson).

    Returns:
        The imported module.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(module.split(".")[0], extra, purpose, hint) from exc


class CudaError(TrtExitError, RuntimeError):
    """A CUDA driver, runtime or NVRTC call failed; the message names the call and the error."""


class CudaUnavailableError(CudaError):
    """No usable NVIDIA GPU or driver (or one too old for what was asked)."""
