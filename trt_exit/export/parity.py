"""Parity checks: each exported stage against the PyTorch module it came from.

Tolerances are written down here, per precision, and recorded in the manifest with the measured
differences. The acceptance bar for FP32 is a max abs difference of 1e-4 on exit outputs
(logits); intermediate tokens are compared relative to their magnitude, since deep ViTs carry
token values in the hundreds where float32 summation order alone moves the last digits.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from trt_exit.errors import TrtExitError

#: Max abs difference allowed on exit outputs and confidences, per precision. FP16 and INT8
#: graphs are compared against FP32 on accuracy, not elementwise (see trt_exit.export.precision).
OUTPUT_ATOL = {"fp32": 1e-4}
#: Tokens: allowed max abs difference per unit of the largest reference magnitude.
TOKENS_RTOL = {"fp32": 1e-5}


class ParityError(TrtExitError):
    """An exported graph does not reproduce its PyTorch module within tolerance."""


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest elementwise |a - b| (inf if the shapes differ or either has NaN)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return float("inf")
    diff = np.abs(a - b)
    return float("inf") if np.isnan(diff).any() else float(diff.max(initial=0.0))


def compare_outputs(
    name: str,
    reference: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    precision: str = "fp32",
) -> dict[str, Any]:
    """Compares one stage's outputs; returns a record with the differences and whether they pass.

    Output tensors whose names start with ``tokens`` or end with ``state`` get the relative
    token tolerance; everything else (exit outputs, confidences) the absolute output tolerance.
    """
    record: dict[str, Any] = {"stage": name, "precision": precision, "tensors": {}, "ok": True}
    for tensor, ref in reference.items():
        diff = max_abs_diff(ref, candidate[tensor])
        if tensor.startswith("tokens") or tensor.endswith("state"):
            scale = max(1.0, float(np.abs(ref).max(initial=0.0)))
            limit = TOKENS_RTOL[precision] * scale
        else:
            limit = OUTPUT_ATOL[precision]
        ok = diff <= limit
        record["tensors"][tensor] = {"max_abs_diff": diff, "tolerance": limit, "ok": ok}
        record["ok"] &= ok
    return record


def check_stages(
    stage_names: Sequence[str],
    run_reference: Callable[[str, dict[str, np.ndarray]], dict[str, np.ndarray]],
    run_candidate: Callable[[str, dict[str, np.ndarray]], dict[str, np.ndarray]],
    inputs: dict[str, np.ndarray],
    precision: str = "fp32",
) -> dict[str, Any]:
    """Chains the stages on ``inputs`` and compares each stage's outputs.

    Each stage is fed the *reference* outputs of the stages before it, so a difference is
    attributed to the stage that made it; the chained end-to-end difference is checked by the
    executor tests.

    Returns:
        ``{"precision", "ok", "stages": [per-stage records], "max_output_diff"}``.

    Raises:
        ParityError: A stage exceeds its tolerance; the message names it and the tensor.
    """
    values = dict(inputs)
    records = []
    for name in stage_names:
        ref = run_reference(name, values)
        cand = run_candidate(name, values)
        records.append(compare_outputs(name, ref, cand, precision))
        values.update(ref)
    failures = [
        f"{r['stage']}.{t} differs by {v['max_abs_diff']:.3g} > {v['tolerance']:.3g}"
        for r in records for t, v in r["tensors"].items() if not v["ok"]
    ]
    if failures:
        raise ParityError(f"{precision} ONNX graphs do not match PyTorch: " + "; ".join(failures))
    output_diffs = [v["max_abs_diff"] for r in records for t, v in r["tensors"].items()
                    if not (t.startswith("tokens") or t.endswith("state"))]
    return {
        "precision": precision,
        "ok": True,
        "max_output_diff": max(output_diffs, default=0.0),
        "output_tolerance": OUTPUT_ATOL[precision],
        "stages": records,
    }
