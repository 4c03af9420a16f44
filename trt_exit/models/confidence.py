"""Confidence measures, computed inside each exit graph in float32.

A confidence is a per-sample number in [0, 1]; larger means more sure. The runtime exits when it
reaches the exit's threshold. NaN never counts as confident: every comparison with NaN is false,
in numpy, in ONNX and in the CUDA gate alike.
"""

from __future__ import annotations

import math

import torch

from trt_exit.errors import ConfigError

#: Largest softmax probability (the Multi-Exit ViT default).
MAX_SOFTMAX = "max_softmax"
#: One minus the softmax entropy normalized by log(classes): 1 for a one-hot, 0 for uniform.
ENTROPY = "entropy"

CLASSIFICATION_MEASURES = (MAX_SOFTMAX, ENTROPY)
#: Measures for regression heads; exit families add theirs here (see the AV exits).
REGRESSION_MEASURES: list[str] = []
_REGRESSION_FUNCTIONS: dict = {}


def register_regression_measure(name: str, fn) -> None:
    """Registers a regression confidence ``fn(output) -> (B,)`` under ``name``."""
    if name not in REGRESSION_MEASURES:
        REGRESSION_MEASURES.append(name)
    _REGRESSION_FUNCTIONS[name] = fn


#: Regression: ``1 / (1 + b) = sigmoid(-log_b)`` of a head whose last output column is ``log b``,
#: the log of its own expected absolute error (a Laplace scale), in [0, 1]. Heads trained with it
#: learn ``log b`` with the Laplace likelihood (see ExitHead.loss and the AV exits).
PREDICTED_ERROR = "predicted_error"


def predicted_error_confidence(output: torch.Tensor) -> torch.Tensor:
    """``sigmoid(-log_b)`` of the last output column: 1 / (1 + predicted error), (B,)."""
    return torch.sigmoid(-output[:, -1])


def check(measure: str, task: str) -> str:
    """Returns ``measure`` if it applies to ``task``, else raises :class:`ConfigError`."""
    allowed = CLASSIFICATION_MEASURES if task == "classification" else tuple(REGRESSION_MEASURES)
    if measure not in allowed:
        raise ConfigError(
            f"confidence measure {measure!r} does not apply to {task}; "
            f"choose one of {', '.join(allowed) or '(none registered)'}"
        )
    return measure


def compute(measure: str, output: torch.Tensor) -> torch.Tensor:
    """Confidence (B,) of ``output`` (B, K) under ``measure``."""
    output = output.float()
    if measure == MAX_SOFTMAX:
        return output.softmax(dim=-1).amax(dim=-1)
    if measure == ENTROPY:
        log_p = output.log_softmax(dim=-1)
        entropy = -(log_p.exp() * log_p).sum(dim=-1)
        classes = output.shape[-1]
        return 1.0 - entropy / math.log(classes) if classes > 1 else torch.ones_like(entropy)
    if measure in _REGRESSION_FUNCTIONS:
        return _REGRESSION_FUNCTIONS[measure](output)
    raise ConfigError(f"unknown confidence measure {measure!r}")


register_regression_measure(PREDICTED_ERROR, predicted_error_confidence)
