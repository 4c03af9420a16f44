"""Folding run-time shape arithmetic: exact for every batch size, and only where it is exact."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from trt_exit.export.shape_folding import fold_reshape_targets


def ints(name: str, values) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, np.int64), name)


def model(nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(m, feeds):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(m.SerializeToString(), options,
                                providers=["CPUExecutionProvider"]).run(None, feeds)


def reshape_by_batch(dims):
    """x (batch, 12, 4) reshaped to [Shape(x)[0], 12, 2, 2] the TorchScript way."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 12, 2, 2])
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["b"], axis=0),
        helper.make_node("Unsqueeze", ["b", "axes"], ["b1"]),
        helper.make_node("Concat", ["b1", "rest"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    return model(nodes, [x], [y], [ints("zero", 0), ints("axes", [0]),
                                   ints("rest", [12, 2, 2])])


def test_a_reshape_by_the_batch_becomes_a_constant_and_stays_exact():
    original = reshape_by_batch(["batch", 12, 4])
    folded, count = fold_reshape_targets(original)
    assert count == 1
    assert [n.op_type for n in folded.graph.node] == ["Reshape"]  # the shape nodes are gone
    target = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    assert [list(v) for v in target.values()] == [[-1, 12, 2, 2]]
    onnx.checker.check_model(folded, full_check=True)
    for batch in (1, 3, 8):
        x = np.random.default_rng(batch).standard_normal((batch, 12, 4)).astype(np.float32)
        np.testing.assert_array_equal(run(folded, {"x": x})[0], run(original, {"x": x})[0])


@pytest.mark.parametrize("dims", [["batch", "tokens", 4], ["batch", None, 4]])
def test_two_unknown_dimensions_are_left_alone(dims):
    """A second dynamic dimension (or one shape inference cannot name) stays computed."""
    original = reshape_by_batch(dims)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
    original.graph.input[0].CopyFrom(x)
    # target [batch, tokens(, computed)...]: make the second entry dynamic too
    original.graph.node[3].input[1] = "rest2"
    original.graph.node.insert(3, helper.make_node("Gather", ["shape", "one"], ["t"], axis=0))
    original.graph.node.insert(4, helper.make_node("Unsqueeze", ["t", "axes"], ["t1"]))
    original.graph.node.insert(5, helper.make_node("Concat", ["t1", "last"], ["rest2"], axis=0))
    original.graph.initializer.extend([ints("one", 1), ints("last", [2, 2])])
    folded, count = fold_reshape_targets(original)
    assert count == 0 and len(folded.graph.node) == len(original.graph.node)


def test_an_expand_target_is_read_from_the_same_dimension():
    """Expand cannot take -1: its target is rebuilt from one Shape read and a Concat."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["b"], axis=0),
        helper.make_node("Unsqueeze", ["b", "axes"], ["b1"]),
        helper.make_node("Concat", ["b1", "minus"], ["raw"], axis=0),  # [B, -1]
        helper.make_node("ConstantOfShape", ["two"], ["ones"],
                         value=numpy_helper.from_array(np.array([1], np.int64))),
        helper.make_node("Mul", ["ones", "neg"], ["negs"]),
        helper.make_node("Equal", ["raw", "negs"], ["is_neg"]),
        helper.make_node("Where", ["is_neg", "ones", "raw"], ["target"]),  # [B, 1]
        helper.make_node("Expand", ["token", "target"], ["y"]),
    ]
    original = model(nodes, [x], [y], [ints("zero", 0), ints("axes", [0]), ints("minus", [-1]),
                                       ints("two", [2]), ints("neg", -1),
                                       numpy_helper.from_array(np.ones((1, 5), np.float32),
                                                               "token")])
    folded, count = fold_reshape_targets(original)
    assert count == 1
    assert sorted(n.op_type for n in folded.graph.node) == ["Concat", "Expand", "Shape"]
    onnx.checker.check_model(folded, full_check=True)
    for batch in (1, 4):
        feeds = {"x": np.zeros((batch, 3), np.float32)}
        np.testing.assert_array_equal(run(folded, feeds)[0], run(original, feeds)[0])
        assert run(folded, feeds)[0].shape == (batch, 5)


def test_a_flatten_with_minus_one_uses_the_reshaped_tensor_s_own_dimensions():
    """[batch, 8, -1] of a (batch, 8, 2, 2) tensor: the -1 is 4, the batch becomes -1."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8, 2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8, 4])
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Slice", ["shape", "start", "end", "axis"], ["head"]),
        helper.make_node("Concat", ["head", "minus"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    original = model(nodes, [x], [y], [ints("start", [0]), ints("end", [2]), ints("axis", [0]),
                                       ints("minus", [-1])])
    folded, count = fold_reshape_targets(original)
    target = [list(numpy_helper.to_array(t)) for t in folded.graph.initializer]
    assert count == 1 and target == [[-1, 8, 4]]
    x_value = np.arange(3 * 32, dtype=np.float32).reshape(3, 8, 2, 2)
    np.testing.assert_array_equal(run(folded, {"x": x_value})[0],
                                  run(original, {"x": x_value})[0])
