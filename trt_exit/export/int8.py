"""INT8 pass: one stage graph with Q/DQ nodes in TensorRT's explicit-quantization convention.

TensorRT 11 has no INT8 calibrator and no INT8 builder flag: INT8 is whatever the ONNX graph
says, through QuantizeLinear / DequantizeLinear pairs. This pass writes such a graph with ONNX
Runtime's ``quantize_static`` in the form TensorRT expects:

* QDQ format (never QOperator), int8 activations and weights, **symmetric** (zero points 0);
* weights per output channel (Conv axis 0, MatMul axis 1, Gemm with transB axis 0), stored as
  int8 initializers read by a DequantizeLinear;
* Q/DQ on the *inputs* of Conv, MatMul and Gemm only (``OpTypesToExcludeOutputQuantization``):
  TensorRT fuses a DQ into the layer that reads it and a Q into the layer that writes it, and
  outputs left in float keep residual adds, LayerNorm, softmax and GELU in FP32;
* biases stay float (TensorRT does not take int32 bias DQs).

Calibration runs the graph on real activations with ONNX Runtime on the CPU (``max`` range by
default, or ``percentile`` / ``entropy``).

Why ONNX Runtime's quantizer rather than NVIDIA ModelOpt's ``modelopt.onnx.quantization``: it
ships with ``onnxruntime``, a core dependency, so ``pip install trt-exit`` produces INT8 graphs
on any CPU (the demo measures them); ModelOpt is a large optional install whose ``[onnx]`` extra
pins an older onnx and pulls onnxruntime-gpu beside onnxruntime. Both write the same Q/DQ
convention for these ops.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from trt_exit.errors import ConfigError

#: Calibration methods by CLI name.
CALIBRATION_METHODS = ("max", "percentile", "entropy")


@dataclass
class Int8Settings:
    """How stage graphs are quantized.

    Attributes:
        method: Range calibration: ``max`` (min/max over the data), ``percentile`` or ``entropy``.
        percentile: With ``percentile``: the percentile of |x| that maps to 127.
        op_types: Op types whose inputs get Q/DQ.
        activation_matmuls: Also quantize MatMuls whose both inputs are activations (attention's
            Q·Kᵀ and P·V); False keeps them in float.
        batch_size: Calibration batch size.
    """

    method: str = "max"
    percentile: float = 99.999
    op_types: tuple[str, ...] = ("Conv", "MatMul", "Gemm")
    activation_matmuls: bool = True
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise ConfigError(f"unknown calibration method {self.method!r}; choose one of "
                              f"{', '.join(CALIBRATION_METHODS)}")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile must be in (50, 100], got {self.percentile}")
        self.op_types = tuple(self.op_types)

    def to_dict(self) -> dict:
        return asdict(self)

    def ort_options(self) -> dict:
        """Keyword arguments of ``quantize_static`` for these settings (TensorRT convention)."""
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

        method = {"max": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                  "entropy": CalibrationMethod.Entropy}[self.method]
        extra = {
            "ActivationSymmetric": True,
            "WeightSymmetric": True,
            "QuantizeBias": False,
            "OpTypesToExcludeOutputQuantization": list(self.op_types),
            "MatMulConstBOnly": not self.activation_matmuls,
        }
        if self.method == "percentile":
            extra["CalibPercentile"] = self.percentile
        return {"quant_format": QuantFormat.QDQ, "op_types_to_quantize": list(self.op_types),
                "per_channel": True, "reduce_range": False, "activation_type": QuantType.QInt8,
                "weight_type": QuantType.QInt8, "calibrate_method": method,
                "extra_options": extra}


class _Reader:
    """ONNX Runtime calibration data reader over in-memory batches."""

    def __init__(self, feeds: dict[str, np.ndarray], batch_size: int):
        count = len(next(iter(feeds.values())))
        self._batches = iter([{k: v[s : s + batch_size] for k, v in feeds.items()}
                              for s in range(0, count, batch_size)])

    def get_next(self):
        return next(self._batches, None)

    def __iter__(self):  # ORT >= 1.17 may iterate the reader
        return self

    def __next__(self):
        batch = self.get_next()
        if batch is None:
            raise StopIteration
        return batch


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ONNX Runtime's quantizer logs its pre-processing advice on the root logger and prints
    histogram progress for percentile/entropy calibration; the graphs are checked afterwards,
    so keep both out of the user's terminal."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def quantize_int8(fp32_path: str | os.PathLike, out_path: str | os.PathLike,
                  feeds: dict[str, np.ndarray], settings: Int8Settings | None = None) -> dict:
    """Writes the Q/DQ INT8 graph of ``fp32_path`` to ``out_path``, calibrated on ``feeds``.

    Args:
        fp32_path: The FP32 stage graph.
        out_path: Destination (written by ONNX Runtime; callers write into a staging directory).
        feeds: Calibration values of every graph input, (N, ...) float32 by name.
        settings: Quantization settings (default :class:`Int8Settings`).

    Returns:
        A summary: quantized node counts by op type and the number of Q/DQ nodes.
    """
    import onnx
    from onnxruntime.quantization import quantize_static

    settings = settings or Int8Settings()
    with _quiet():
        quantize_static(str(fp32_path), str(out_path), _Reader(feeds, settings.batch_size),
                        **settings.ort_options())
    model = onnx.load(str(out_path))
    return summarize(model)


def summarize(model) -> dict:
    """Q/DQ statistics of a quantized graph: which nodes read dequantized inputs, zero points."""
    from onnx import numpy_helper

    dq_outputs = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    quantized: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") and any(
                i in dq_outputs for i in node.input):
            quantized[node.op_type] = quantized.get(node.op_type, 0) + 1
    initializers = {t.name: t for t in model.graph.initializer}
    zero_points = [numpy_helper.to_array(initializers[n.input[2]])
                   for n in model.graph.node
                   if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2
                   and n.input[2] in initializers]
    return {
        "quantized_nodes": dict(sorted(quantized.items())),
        "quantize_nodes": sum(n.op_type == "QuantizeLinear" for n in model.graph.node),
        "dequantize_nodes": sum(n.op_type == "DequantizeLinear" for n in model.graph.node),
        "zero_points_all_zero": all(not np.any(z) for z in zero_points),
        "int8_only": all(z.dtype == np.int8 for z in zero_points),
    }


def check_tensorrt_convention(path: str | os.PathLike) -> None:
    """Raises :class:`ConfigError` if a Q/DQ graph breaks TensorRT's explicit-quantization
    rules: non-int8 types, non-zero zero points, or quantized biases (int32 DQ)."""
    import onnx

    summary = summarize(onnx.load(str(Path(path))))
    if not summary["int8_only"] or not summary["zero_points_all_zero"]:
        raise ConfigError(f"{path}: Q/DQ nodes must be int8 with zero points 0 for TensorRT "
                          f"({summary})")
