"""FP16 pass: one stage graph in half precision, numerically sensitive parts kept in FP32.

TensorRT builds these graphs *strongly typed*: every tensor runs in the type the ONNX graph gives
it, so this pass decides the precision of every node. What stays FP32:

* graph inputs and outputs (the executor's buffers, the confidence gate and the stage before and
  after stay float32; a Cast at each end converts);
* normalization and its decomposition, softmax, reductions, exp/log/pow/sqrt
  (:data:`FP32_OP_TYPES`): FP16 LayerNorm overflows in ViTs (TensorRT issues #2564, #4493), and
  a sum of squares or an exp of logits leaves FP16's range long before the weights do;
* the confidence computation: every node that feeds an ``exit_k_confidence`` output but not the
  exit's prediction (softmax, max, entropy), so the threshold is compared with an FP32 number.

Everything else (matrix multiplies, convolutions, GELU, adds, reshapes) becomes FP16, with its
float constants converted (finite values clamped to ±65504).

Why our own pass rather than onnxconverter-common's ``float16`` (also vendored in ONNX Runtime as
``onnxruntime.transformers.float16``) or ModelOpt's AutoCast: the former, given a block list,
puts a Cast pair between any two consecutive blocked nodes (a softmax's probabilities are
rounded to FP16 before the max that makes them a confidence), rewrites ``Cast(to=float)`` nodes
inside blocked regions, and emits graphs that fail ``onnx.checker`` (nodes out of topological
order); ModelOpt is a large optional dependency that the demo's plain install cannot rely on.
This pass is a few dozen lines over ``onnx`` alone: each float tensor has one home precision (its
producer's), and a consumer in the other precision reads it through one shared Cast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from trt_exit.errors import ConfigError

#: Op types whose nodes always run in FP32.
FP32_OP_TYPES = frozenset({
    "LayerNormalization", "GroupNormalization", "InstanceNormalization", "BatchNormalization",
    "Softmax", "LogSoftmax",
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare",
    "Pow", "Sqrt", "Reciprocal", "Exp", "Log",
    "TopK", "ArgMax", "ArgMin", "CumSum", "Range",
})
#: Inputs (by index) that must stay float32 even when their node runs in FP16.
_ALWAYS_FP32_INPUTS = {"Resize": {1, 2}}
#: Ops with subgraphs: the pass does not descend into them.
_SUBGRAPH_OPS = frozenset({"If", "Loop", "Scan"})

FP16_MAX = float(np.finfo(np.float16).max)


@dataclass
class Fp16Summary:
    """What the pass did to one graph.

    Attributes:
        fp16_nodes: Nodes that now compute in FP16.
        fp32_nodes: Nodes with float tensors kept in FP32, by op type.
        casts: Cast nodes inserted.
        clamped_values: Constant values outside FP16's finite range, clamped to ±65504.
    """

    fp16_nodes: int = 0
    fp32_nodes: dict[str, int] = field(default_factory=dict)
    casts: int = 0
    clamped_values: int = 0

    def to_dict(self) -> dict:
        return {"fp16_nodes": self.fp16_nodes, "fp32_nodes": dict(sorted(self.fp32_nodes.items())),
                "casts": self.casts, "clamped_values": self.clamped_values}


def _to_fp16_array(values: np.ndarray, summary: Fp16Summary) -> np.ndarray:
    finite = np.isfinite(values)
    over = finite & (np.abs(values) > FP16_MAX)
    summary.clamped_values += int(over.sum())
    return np.where(over, np.sign(values) * FP16_MAX, values).astype(np.float16)


def _tensor_to_fp16(tensor, summary: Fp16Summary):
    from onnx import numpy_helper

    array = numpy_helper.to_array(tensor)
    converted = numpy_helper.from_array(_to_fp16_array(array, summary), tensor.name)
    return converted


def confidence_nodes(graph) -> set[str]:
    """Names of the nodes that compute confidences: ancestors of an ``exit_k_confidence``
    output that are not ancestors of any other graph output."""
    producer = {out: node for node in graph.node for out in node.output}

    def ancestors(names: Iterable[str]) -> set[str]:
        seen: set[str] = set()
        stack = [producer[n] for n in names if n in producer]
        while stack:
            node = stack.pop()
            if node.name in seen:
                continue
            seen.add(node.name)
            stack.extend(producer[i] for i in node.input if i in producer)
        return seen

    outputs = [o.name for o in graph.output]
    confidence = [o for o in outputs if o.endswith("_confidence")]
    others = [o for o in outputs if o not in confidence]
    return ancestors(confidence) - ancestors(others)


def convert_to_fp16(model, keep_fp32_nodes: Iterable[str] = ()):
    """Returns an FP16 copy of ``model`` (an ``onnx.ModelProto``) and a summary.

    Args:
        model: An FP32 graph; not modified.
        keep_fp32_nodes: Extra node names to keep in FP32 (the confidence nodes are always kept).

    Raises:
        ConfigError: The graph has control flow (If/Loop/Scan), a float tensor whose type shape
            inference cannot tell, or the result does not type-check.
    """
    import onnx
    from onnx import TensorProto, helper

    FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
    model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    graph = model.graph
    summary = Fp16Summary()
    for index, node in enumerate(graph.node):
        if node.op_type in _SUBGRAPH_OPS:
            raise ConfigError(f"node {node.name or index} ({node.op_type}) has a subgraph; the "
                              f"FP16 pass handles graphs without control flow only")
        if not node.name:
            node.name = f"{node.op_type}_{index}"

    elem_type: dict[str, int] = {}
    for info in [*graph.input, *graph.output, *graph.value_info]:
        elem_type[info.name] = info.type.tensor_type.elem_type
    initializers = {t.name: t for t in graph.initializer}
    for tensor in graph.initializer:
        elem_type[tensor.name] = tensor.data_type
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    elem_type[node.output[0]] = attr.t.data_type

    def is_float(name: str) -> bool:
        if not name:
            return False
        if name not in elem_type:
            raise ConfigError(f"shape inference gives no type for tensor {name!r}; cannot "
                              f"decide its precision")
        return elem_type[name] == FLOAT

    def _casts_float_to_float(node) -> bool:
        # ``x.float()`` in the model: the graph says float32 here. Such a Cast reads its input
        # in whatever precision it has and writes float32.
        return node.op_type == "Cast" and is_float(node.input[0])

    # 1. Which nodes compute in FP32.
    keep = set(keep_fp32_nodes) | confidence_nodes(graph)
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    half_node: dict[str, bool] = {}
    for node in graph.node:
        has_float = any(is_float(n) for n in [*node.input, *node.output])
        if node.op_type == "Constant":
            continue  # decided by its consumers, below
        half_node[node.name] = (has_float and node.op_type not in FP32_OP_TYPES
                                and node.name not in keep and not _casts_float_to_float(node))
        if has_float:
            if half_node[node.name]:
                summary.fp16_nodes += 1
            else:
                summary.fp32_nodes[node.op_type] = summary.fp32_nodes.get(node.op_type, 0) + 1

    def wants_half(node, index: int) -> bool:
        return half_node[node.name] and index not in _ALWAYS_FP32_INPUTS.get(node.op_type, ())

    def consumed_half_only(name: str) -> bool:
        uses = [(n, i) for n in consumers.get(name, []) for i, x in enumerate(n.input) if x == name]
        return bool(uses) and all(wants_half(n, i) for n, i in uses)

    # 2. Home precision of every float tensor: its producer's. Constants and initializers go
    # to FP16 when every consumer computes in FP16; otherwise they stay FP32 and FP16
    # consumers read them through a Cast (which TensorRT folds at build time).
    home_half: set[str] = set()
    for node in graph.node:
        if node.op_type == "Constant":
            values = [a for a in node.attribute if a.name == "value"]  # value_float etc. stay
            if values and is_float(node.output[0]) and consumed_half_only(node.output[0]):
                values[0].t.CopyFrom(_tensor_to_fp16(values[0].t, summary))
                home_half.add(node.output[0])
            continue
        if half_node[node.name]:
            home_half.update(o for o in node.output if is_float(o))
            if node.op_type == "Cast":
                for attr in node.attribute:
                    if attr.name == "to" and attr.i == FLOAT:
                        attr.i = HALF
            if node.op_type == "ConstantOfShape":
                for attr in node.attribute:
                    if attr.name == "value" and attr.t.data_type == FLOAT:
                        attr.t.CopyFrom(_tensor_to_fp16(attr.t, summary))
    for name, tensor in initializers.items():
        if tensor.data_type == FLOAT and consumed_half_only(name):
            tensor.CopyFrom(_tensor_to_fp16(tensor, summary))
            home_half.add(name)

    # 3. Graph outputs stay float32: an FP16-producing node writes NAME__fp16, a Cast writes NAME.
    renamed: dict[str, str] = {}
    for output in graph.output:
        if output.name in home_half:
            renamed[output.name] = f"{output.name}__fp16"
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name in renamed:
                node.output[i] = renamed[name]
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    home_half = {renamed.get(n, n) for n in home_half}
    original_of = {new: old for old, new in renamed.items()}
    for old, new in renamed.items():
        elem_type[new] = elem_type[old]

    # 4. Rebuild the node list with Casts where a consumer's precision differs from the home.
    casts: dict[tuple[str, bool], str] = {(new, False): old for old, new in renamed.items()}
    nodes = []

    def cast(name: str, to_half: bool) -> str:
        key = (name, to_half)
        if key not in casts:
            target = f"{name}__to_{'fp16' if to_half else 'fp32'}"
            nodes.append(helper.make_node("Cast", [name], [target], to=HALF if to_half else FLOAT,
                                          name=f"{target}__cast"))
            summary.casts += 1
            casts[key] = target
        return casts[key]

    for original_node in graph.node:
        node = onnx.NodeProto()
        node.CopyFrom(original_node)
        if node.op_type != "Constant" and not _casts_float_to_float(node):
            for i, name in enumerate(node.input):
                if is_float(name):
                    want = wants_half(node, i)
                    if want != (name in home_half):
                        node.input[i] = cast(name, want)
        nodes.append(node)
        for name in node.output:
            if name in original_of:
                original = original_of[name]
                nodes.append(helper.make_node("Cast", [name], [original], to=FLOAT,
                                              name=f"{original}__cast"))
                summary.casts += 1
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    try:
        model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except onnx.shape_inference.InferenceError as exc:
        raise ConfigError(f"the FP16 graph does not type-check: {exc}") from exc
    return model, summary
