"""Per-exit temperature scaling (Guo, Pleiss, Sun, Weinberger, "On Calibration of Modern Neural
Networks", ICML 2017), fitted on a validation split.

Each classification exit gets one temperature ``T > 0``: its logits are divided by ``T`` inside
the model (:meth:`~trt_exit.models.exits.ExitHead.calibrated`, so the exported exit graph's
confidence is the calibrated one), with ``T`` chosen to minimize the negative log-likelihood of
the split's labels. Predictions (the argmax) do not change. Thresholds must be tuned after
calibrating: they are compared with the calibrated confidence.

Only heads whose confidence is computed from a softmax (``max_softmax``, ``entropy``) are
calibrated; others (regression, the BoF activation-ratio rule) keep ``T = 1``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from trt_exit.errors import ConfigError
from trt_exit.models.confidence import CLASSIFICATION_MEASURES
from trt_exit.models.exits import CLASSIFICATION
from trt_exit.models.predict import predict_with_targets

#: Search range of the temperature (log-uniform bounds).
TEMPERATURE_RANGE = (0.05, 20.0)


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """The temperature minimizing the mean negative log-likelihood of ``targets`` under
    ``softmax(logits / T)``: a bounded 1-D search over ``log T`` (the NLL is convex in
    ``1 / T``, so the minimum is unique)."""
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    logits = np.asarray(logits, dtype=np.float64)
    rows = np.arange(len(targets))

    def nll(log_t: float) -> float:
        return float(-log_softmax(logits / np.exp(log_t), axis=1)[rows, targets].mean())

    low, high = np.log(TEMPERATURE_RANGE[0]), np.log(TEMPERATURE_RANGE[1])
    result = minimize_scalar(nll, bounds=(low, high), method="bounded",
                             options={"xatol": 1e-4})
    return float(np.exp(result.x))


def _nll(logits: np.ndarray, targets: np.ndarray) -> float:
    from scipy.special import log_softmax

    return float(-log_softmax(np.asarray(logits, np.float64), axis=1)[np.arange(len(targets)),
                                                                     targets].mean())


@torch.no_grad()
def calibrate_temperatures(model, dataset) -> dict[str, Any]:
    """Fits and sets every softmax-confidence exit's temperature on ``dataset`` (validation).

    Args:
        model: A classification :class:`~trt_exit.models.multi_exit.MultiExitModel`.
        dataset: The split to fit on (arrays or a streaming split).

    Returns:
        ``{"split": name, "temperatures": [T per exit], "nll_before": [...],
        "nll_after": [...]}`` (exits left at 1: their NLL both times).
    """
    if model.task != CLASSIFICATION:
        raise ConfigError("temperature calibration applies to classification models")
    for head in model.exits:
        head.temperature.fill_(1.0)  # fit on the raw logits
    outputs, targets = predict_with_targets(model, dataset)
    targets = np.asarray(targets, dtype=np.int64)
    record: dict[str, Any] = {"split": getattr(dataset, "name", ""), "temperatures": [],
                              "nll_before": [], "nll_after": []}
    for head, logits in zip(model.exits, outputs):
        before = _nll(logits, targets)
        temperature = 1.0
        if head.confidence_measure in CLASSIFICATION_MEASURES:
            temperature = fit_temperature(logits, targets)
            head.temperature.fill_(temperature)
        record["temperatures"].append(temperature)
        record["nll_before"].append(before)
        record["nll_after"].append(_nll(logits / temperature, targets))
    return record
