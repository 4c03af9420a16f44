"""Exit heads, one family per file, created by name through the registry."""

from trt_exit.models.exits.base import (
    CLASSIFICATION,
    REGRESSION,
    ExitContext,
    ExitHead,
    create_exit,
    exit_class,
    exit_types,
    register_exit,
)

# Importing a family registers it.
from trt_exit.models.exits import head, mlp, slvit  # noqa: E402,F401  isort: skip
from trt_exit.models.exits import av_slvit  # noqa: E402,F401  isort: skip
from trt_exit.models.exits import bof, cnn, mixer, resmlp, slvit_cnn, vitee  # noqa: E402,F401  isort: skip
from trt_exit.models.exits import ensemble  # noqa: E402,F401  isort: skip

__all__ = [
    "CLASSIFICATION",
    "REGRESSION",
    "ExitContext",
    "ExitHead",
    "create_exit",
    "exit_class",
    "exit_types",
    "register_exit",
]
