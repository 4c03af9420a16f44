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


def check_trained(
    model: Any,
    reference: Mapping[str, Any],
    stage_names: Sequence[str],
    run_candidate: Callable[[str, dict[str, np.ndarray]], dict[str, np.ndarray]],
) -> dict[str, Any]:
    """Chains the exported stages on a checkpoint's reference input and compares every exit's
    output with the outputs the *trained* model computed before it was saved.

    :func:`check_stages` compares each graph with the PyTorch module it was exported from, which,
    after a checkpoint round trip, is a rebuild; this check closes the loop to the model that was
    trained (see :mod:`trt_exit.models.checkpoint`). The graphs run chained (each on the previous
    graph's outputs), so the tolerance is the checkpoint's relative one, not the per-stage one.

    Returns:
        ``{"ok", "max_output_diff", "tolerance", "per_exit"}``.

    Raises:
        ParityError: An exit differs from the trained model's output beyond the tolerance.
    """
    from trt_exit import tensor_names as tn
    from trt_exit.models.checkpoint import (
        compare_with_reference,
        reference_inputs,
        reference_tolerance,
    )

    values: dict[str, np.ndarray] = dict(reference_inputs(model))
    for name in stage_names:
        values.update(run_candidate(name, values))
    outputs = [values[tn.exit_output(k)] for k in range(len(reference["outputs"]))
               if tn.exit_output(k) in values]
    diffs = compare_with_reference(outputs, reference)
    limit = reference_tolerance(reference)
    if not max(diffs) <= limit:
        worst = max(range(len(diffs)), key=diffs.__getitem__)
        raise ParityError(f"the exported graphs do not reproduce the trained model: exit {worst} "
                          f"differs by {diffs[worst]:.3g} > {limit:.3g} from the outputs saved "
                          f"with the checkpoint")
    return {"ok": True, "max_output_diff": max(diffs), "tolerance": limit, "per_exit": diffs,
            "input": "checkpoint reference input (trt_exit.models.checkpoint.reference_inputs)"}
