"""Checks of an ONNX graph before TensorRT sees it (no TensorRT needed).

TensorRT's own parser is the authority (its errors are reported by node in
:mod:`trt_exit.build.steps`); this module catches, on any machine, what it is sure to reject, so
``trt-exit precision`` or a CI run can fail before anyone copies a model to a Jetson:

* nodes from a non-standard domain (``com.microsoft`` fusions from ONNX Runtime's optimizer,
  custom ops): TensorRT parses them only through plugins this project does not ship;
* ops TensorRT's ONNX parser has never supported (sequence and string ops, the integer-only
  QLinear/Integer ops: TensorRT takes INT8 as Q/DQ pairs instead), from onnx-tensorrt's
  ``docs/operators.md``;
* opsets outside 9..20 (TensorRT 10.3's parser range; 11.x accepts a superset).
"""

from __future__ import annotations

import os
from pathlib import Path

from trt_exit.build.errors import OnnxParseError

STANDARD_DOMAINS = ("", "ai.onnx")
#: Ops marked unsupported ("N") in onnx-tensorrt's operator matrix of every release from 8.4 on.
UNSUPPORTED_OPS = frozenset({
    "ConcatFromSequence", "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase",
    "SequenceInsert", "SequenceLength", "SplitToSequence",
    "StringNormalizer", "TfIdfVectorizer",
    "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear",
    "BitShift", "SoftmaxCrossEntropyLoss", "NegativeLogLikelihoodLoss",
})
OPSET_RANGE = (9, 20)


def check_parsable(path: str | os.PathLike) -> None:
    """Raises :class:`OnnxParseError` naming the first node TensorRT cannot parse.

    Args:
        path: An ONNX file.
    """
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    for opset in model.opset_import:
        if opset.domain in STANDARD_DOMAINS and not OPSET_RANGE[0] <= opset.version <= OPSET_RANGE[1]:
            raise OnnxParseError(
                f"{path}: opset {opset.version} is outside what TensorRT 10.3's ONNX parser "
                f"reads ({OPSET_RANGE[0]}..{OPSET_RANGE[1]}); re-export with opset 17 (the "
                f"default of trt-exit export)")
    for index, node in enumerate(model.graph.node):
        label = f"node {index} {node.name or '(unnamed)'!r} (op {node.domain + '.' if node.domain else ''}{node.op_type})"
        if node.domain not in STANDARD_DOMAINS:
            raise OnnxParseError(
                f"{path}: {label} is from domain {node.domain!r}, which TensorRT's ONNX parser "
                f"cannot import without a plugin; export the graph without ONNX Runtime's "
                f"optimizer fusions (trt-exit export writes standard ops only)")
        if node.op_type in UNSUPPORTED_OPS:
            raise OnnxParseError(
                f"{path}: {label} is not supported by TensorRT's ONNX parser; change the model "
                f"so that it exports without {node.op_type}")
