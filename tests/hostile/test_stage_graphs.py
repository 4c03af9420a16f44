"""Item 3 of issue 12: stage graphs are checked against the manifest (names, dtypes, shapes) on
load and on every run; a backend's failure is a StageError naming the stage."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from trt_exit.errors import ArtifactError, StageError
from trt_exit.fileio import sha256_file
from trt_exit.manifest import MANIFEST_NAME, Manifest
from trt_exit.runtime.executor import Executor

from .conftest import assert_refused


def _exit_graph(classes=10, batch="batch", tokens_type=TensorProto.FLOAT,
                rank=3) -> onnx.ModelProto:
    """An exit_0 graph with the right tensor names: tokens_0 -> (exit_0_output, confidence).

    ``batch``: an int fixes the dimension, a string leaves it symbolic.
    """
    dims = [batch, 17, 16] if rank == 3 else [batch, 16]
    tokens = helper.make_tensor_value_info("tokens_0", tokens_type, dims)
    weight = helper.make_tensor("w", TensorProto.FLOAT, [16, classes],
                                np.ones((16, classes), np.float32).ravel().tolist())
    nodes = [helper.make_node("Cast", ["tokens_0"], ["t"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["t"], ["pooled"], axes=[1], keepdims=0)
             if rank == 3 else helper.make_node("Identity", ["t"], ["pooled"]),
             helper.make_node("MatMul", ["pooled", "w"], ["exit_0_output"])]
    nodes.append(helper.make_node("ReduceMax", ["exit_0_output"], ["m"], axes=[1], keepdims=0))
    nodes.append(helper.make_node("Sigmoid", ["m"], ["exit_0_confidence"]))
    outputs = [helper.make_tensor_value_info("exit_0_output", TensorProto.FLOAT, [batch, classes]),
               helper.make_tensor_value_info("exit_0_confidence", TensorProto.FLOAT, [batch])]
    graph = helper.make_graph(nodes, "exit_0", [tokens], outputs, [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _replace_exit_0(model_dir, graph: onnx.ModelProto) -> None:
    """Replaces exit_0's graph and updates its hash, as someone handing over a directory could."""
    path = model_dir / "onnx" / "fp32" / "exit_0.onnx"
    onnx.save(graph, str(path))
    manifest_path = model_dir / MANIFEST_NAME
    data = json.loads(manifest_path.read_text())
    ref = data["stages"][1]["onnx"]["fp32"]
    ref.update(sha256=sha256_file(path), bytes=path.stat().st_size)
    manifest_path.write_text(json.dumps(data))


REPLACEMENTS = {
    "five classes": dict(classes=5),
    "fixed batch 1": dict(batch=1),
    "double input": dict(tokens_type=TensorProto.DOUBLE),
    "wrong rank": dict(rank=2),
}


@pytest.mark.parametrize("name", REPLACEMENTS)
def test_replaced_graph_is_refused_on_load_and_by_verify(model, name, capsys, sample_file):
    _replace_exit_0(model, _exit_graph(**REPLACEMENTS[name]))
    with pytest.raises(ArtifactError, match="exit_0.*do not match the manifest"):
        Manifest.load(model, verify=True)
    with pytest.raises(ArtifactError, match="exit_0.*do not match the manifest"):
        Executor(model)
    assert_refused(capsys, ["run", model, "--input", sample_file, "--policy", "fixed:0"],
                   "do not match the manifest", model)


def _symbolic_graph(reshape: bool = False) -> onnx.ModelProto:
    """exit_0 names, every dimension symbolic: the pooled tokens (B, 16) as 'logits', which
    neither the manifest check nor shape inference can tell from (B, 10) before a run. With
    ``reshape``, the pooled tokens are reshaped to (-1, 10), which fails at run time."""
    tokens = helper.make_tensor_value_info("tokens_0", TensorProto.FLOAT, ["batch", "n", "c"])
    pooled = "pooled" if reshape else "exit_0_output"
    nodes = [helper.make_node("ReduceMean", ["tokens_0"], [pooled], axes=[1], keepdims=0)]
    inits = []
    if reshape:
        inits.append(helper.make_tensor("s", TensorProto.INT64, [2], [-1, 10]))
        nodes.append(helper.make_node("Reshape", [pooled, "s"], ["exit_0_output"]))
    nodes += [helper.make_node("ReduceMax", ["exit_0_output"], ["m"], axes=[1], keepdims=0),
              helper.make_node("Sigmoid", ["m"], ["exit_0_confidence"])]
    outputs = [helper.make_tensor_value_info("exit_0_output", TensorProto.FLOAT, ["batch", "c"]),
               helper.make_tensor_value_info("exit_0_confidence", TensorProto.FLOAT, ["batch"])]
    graph = helper.make_graph(nodes, "exit_0", [tokens], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_symbolic_class_count_is_caught_on_the_first_run(model, digits):
    _replace_exit_0(model, _symbolic_graph())
    with Executor(model) as executor, \
            pytest.raises(StageError, match="stage exit_0.*exit_0_output"):
        executor.run(digits["test"].inputs["image"][:3])


def test_a_failing_graph_is_a_stage_error(model, digits, capsys, sample_file):
    _replace_exit_0(model, _symbolic_graph(reshape=True))  # (3, 16) cannot become (-1, 10)
    with Executor(model) as executor, pytest.raises(StageError, match="stage exit_0 failed"):
        executor.run(digits["test"].inputs["image"][:3])
    assert_refused(capsys, ["run", model, "--input", sample_file], "stage exit_0 failed", model)


def test_any_backend_exception_names_the_stage(model, digits):
    """The host executor wraps a backend's own exception (any backend) with the stage name."""
    with Executor(model, strategy="stages") as executor:  # auto may run the single graph
        runner = executor.runners["segment_0"]

        def broken(feeds):
            raise RuntimeError("device fell off the bus\nsecond line")
        runner.run = broken
        with pytest.raises(StageError, match="stage segment_0 failed on the onnxruntime backend: "
                                             "RuntimeError: device fell off the bus$"):
            executor.run(digits["test"].inputs["image"][:2])
