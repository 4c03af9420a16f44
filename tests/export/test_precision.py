"""FP16 and INT8 stage graphs: what stays FP32, TensorRT's Q/DQ convention, calibration,
the manifest records, accuracy against FP32, and atomic writes."""

from __future__ import annotations

import shutil
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from trt_exit import tensor_names as tn
from trt_exit.errors import ArtifactError, ConfigError, InputError
from trt_exit.export import calibration as calib
from trt_exit.export.fp16 import FP32_OP_TYPES, confidence_nodes, convert_to_fp16
from trt_exit.export.int8 import Int8Settings
from trt_exit.export.precision import create_precision_graphs
from trt_exit.manifest import Manifest
from trt_exit.runtime.executor import Executor
from trt_exit.runtime.policies import AllExitsPolicy


@pytest.fixture(scope="module")
def tiny_precisions(tiny_export, digits, tmp_path_factory):
    """A copy of ``tiny_export`` with FP16 and INT8 graphs (calibrated on 128 train samples)."""
    out = tmp_path_factory.mktemp("tiny_precisions") / "model"
    shutil.copytree(tiny_export, out)
    manifest = Manifest.load(out)
    create_precision_graphs(manifest, ("fp16", "int8"),
                            calib.from_dataset(digits["train"], 128, seed=0))
    return out


def _elem_types(model) -> dict[str, int]:
    model = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*model.graph.input, *model.graph.output, *model.graph.value_info]}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    return types


def _all_exits(manifest, precision, images):
    with Executor(manifest, "onnxruntime", precision, policy=AllExitsPolicy()) as executor:
        return executor.run(images)


# --------------------------------------------------------------------------- FP16


def test_fp16_keeps_sensitive_ops_io_and_confidence_in_fp32(tiny_precisions):
    manifest = Manifest.load(tiny_precisions, verify=True)
    for stage in [*manifest.stages, None]:
        path = manifest.onnx_path(stage, "fp16") if stage else manifest.full_model_path("fp16")
        model = onnx.load(str(path))
        types = _elem_types(model)
        for value in [*model.graph.input, *model.graph.output]:
            assert value.type.tensor_type.elem_type == TensorProto.FLOAT, (path, value.name)
        ops = Counter()
        for node in model.graph.node:
            float_inputs = [types[i] for i in node.input if i and types.get(i) in
                            (TensorProto.FLOAT, TensorProto.FLOAT16)]
            if node.op_type in FP32_OP_TYPES:
                assert float_inputs[:1] == [TensorProto.FLOAT], (path, node.name)
            if node.op_type in ("MatMul", "Gemm", "Conv"):
                assert set(float_inputs) == {TensorProto.FLOAT16}, (path, node.name)
            ops[node.op_type] += 1
        if stage is None or stage.kind == tn.EXIT:
            # The confidence is computed from float32 logits all the way.
            fp32 = onnx.load(str(manifest.onnx_path(stage, "fp32") if stage else
                                 manifest.full_model_path("fp32")))
            kept = confidence_nodes(fp32.graph)
            assert {n.op_type for n in fp32.graph.node if n.name in kept} >= {"Softmax", "ReduceMax"}
            for node in model.graph.node:
                if node.name in kept:
                    assert all(types[o] == TensorProto.FLOAT for o in node.output), node.name
        assert ops["Cast"] >= 2, path  # in and out


def test_fp16_pass_on_a_hand_built_graph():
    """Constants beyond FP16's range are clamped, x.float() casts stay float32, consecutive FP32
    nodes are not separated by casts, and the result type-checks."""
    big = numpy_helper.from_array(np.array([1e6, -1e6, 1.0], np.float32), "big")
    weight = numpy_helper.from_array(np.ones((3, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
         helper.make_node("Add", ["h", "big"], ["a"], name="add"),
         helper.make_node("Cast", ["a"], ["logits"], to=TensorProto.FLOAT, name="to_float"),
         helper.make_node("Softmax", ["logits"], ["p"], axis=-1, name="softmax"),
         helper.make_node("ReduceMax", ["p"], ["exit_0_confidence"], axes=[-1], keepdims=0,
                          name="max")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", 3]),
         helper.make_tensor_value_info("exit_0_confidence", TensorProto.FLOAT, ["B"])],
        [big, weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    converted, summary = convert_to_fp16(model)
    onnx.checker.check_model(converted, full_check=True)
    assert summary.clamped_values == 2
    nodes = {n.name: n for n in converted.graph.node}
    assert nodes["to_float"].attribute[0].i == TensorProto.FLOAT
    assert nodes["softmax"].input == ["logits"] and nodes["max"].input == ["p"]
    initializers = {t.name: t.data_type for t in converted.graph.initializer}
    assert initializers["w"] == TensorProto.FLOAT16


def test_fp16_pass_refuses_control_flow():
    body = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "b", [],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["out"], then_branch=body, else_branch=body, name="if")],
        "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
              helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ConfigError, match="control flow"):
        convert_to_fp16(model)


# --------------------------------------------------------------------------- INT8


def test_int8_graphs_follow_tensorrt_explicit_quantization(tiny_precisions):
    manifest = Manifest.load(tiny_precisions)
    quantized_ops = Counter()
    for stage in manifest.stages:
        model = onnx.load(str(manifest.onnx_path(stage, "int8")))
        initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        dq_out = {}
        for node in model.graph.node:
            if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
                zero_point = initializers[node.input[2]]
                assert zero_point.dtype == np.int8 and not zero_point.any(), node.name
                if node.op_type == "DequantizeLinear":
                    dq_out[node.output[0]] = node
                    source = initializers.get(node.input[0])
                    if source is not None:  # a weight: int8, per output channel
                        assert source.dtype == np.int8, node.name
                        assert initializers[node.input[1]].size > 1, node.name
        for node in model.graph.node:
            reads_dq = [i for i in node.input if i in dq_out]
            if node.op_type in ("MatMul", "Gemm", "Conv") and reads_dq:
                quantized_ops[node.op_type] += 1
            if node.op_type in ("LayerNormalization", "Softmax", "Add"):
                assert not reads_dq, (stage.name, node.name)  # no Q/DQ outside weighted ops
    assert quantized_ops["MatMul"] > 0 and quantized_ops["Conv"] == 1 and quantized_ops["Gemm"] > 0
    record = manifest.export["precisions"]["int8"]
    assert record["calibration_samples"] == 128
    assert record["settings"]["method"] == "max"


#: The tiny test model is trained for a few epochs only: its early exits' logits are close
#: together, so INT8 rounding flips more of their argmaxes than on a trained model (the demo
#: shows the trained digits model within 0.5 points).
AGREEMENT = {"fp16": (0.99, 0.005), "int8": (0.85, 0.03)}


@pytest.mark.parametrize("precision", sorted(AGREEMENT))
def test_low_precision_predictions_agree_with_fp32(tiny_precisions, digits, precision):
    manifest = Manifest.load(tiny_precisions)
    test = digits["test"]
    reference = _all_exits(manifest, "fp32", test.inputs[tn.IMAGE])
    candidate = _all_exits(manifest, precision, test.inputs[tn.IMAGE])
    min_agreement, max_accuracy_change = AGREEMENT[precision]
    for k in range(manifest.num_exits):
        ref, cand = reference.all_outputs[k].argmax(1), candidate.all_outputs[k].argmax(1)
        assert np.mean(ref == cand) >= min_agreement, (precision, k, np.mean(ref == cand))
        change = abs(np.mean(cand == test.targets) - np.mean(ref == test.targets))
        assert change <= max_accuracy_change, (precision, k, change)
    assert candidate.all_outputs.dtype == np.float32
    assert np.isfinite(candidate.all_confidences).all()


def test_manifest_records_every_graph_with_its_hash(tiny_precisions):
    manifest = Manifest.load(tiny_precisions, verify=True)
    assert manifest.precisions() == ["fp32", "fp16", "int8"]
    for precision in ("fp16", "int8"):
        for stage in manifest.stages:
            assert stage.onnx[precision].path == f"onnx/{precision}/{stage.name}.onnx"
        assert manifest.full_model["onnx"][precision].path == f"onnx/{precision}/full.onnx"
        assert manifest.parity[precision]["reference"] == "fp32"
    assert manifest.calibration["samples"] == 128
    assert manifest.calibration["origin"]["split"] == "digits/train"
    assert manifest.calibration["file"]["path"] == "calibration/calibration.npz"
    assert not list(tiny_precisions.glob(".precision-*"))  # staging removed


def test_stages_are_calibrated_on_the_activations_of_the_stages_before(tiny_precisions, tmp_path):
    """Calibrating segment_1 on the *image* ranges would be wrong; the chained values give it
    the tokens of segment_0. Re-quantizing with a shifted input set changes segment_1's ranges
    only through segment_0, so the recorded summaries must come from a full chain."""
    manifest = Manifest.load(tiny_precisions)
    graphs = manifest.export["precisions"]["int8"]["graphs"]
    assert set(graphs) == {s.name for s in manifest.stages} | {tn.FULL_MODEL}
    scales = {}
    for name in ("segment_0", "segment_1"):
        model = onnx.load(str(manifest.onnx_path(manifest.stage(name), "int8")))
        initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        first_q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
        scales[name] = float(initializers[first_q.input[1]])
    # segment_0 quantizes the image (range [-1, 1]: scale 1/127); segment_1 quantizes LayerNorm
    # output of tokens, whose range differs.
    assert scales["segment_0"] == pytest.approx(1 / 127, rel=1e-3)
    assert scales["segment_1"] != pytest.approx(scales["segment_0"], rel=0.05)


# --------------------------------------------------------------------------- calibration & errors


def test_calibration_sets_of_the_wrong_shape_or_size_are_refused(tiny_export, digits):
    manifest = Manifest.load(tiny_export)
    images = digits["train"].inputs[tn.IMAGE]
    with pytest.raises(InputError, match=r"'image' has shape \(64, 1, 4, 4\), expected \(N, 1, 8, 8\)"):
        calib.check(manifest, calib.CalibrationSet({tn.IMAGE: images[:64, :, :4, :4]}))
    with pytest.raises(InputError, match="has 8 samples; INT8 ranges need at least 32"):
        calib.check(manifest, calib.CalibrationSet({tn.IMAGE: images[:8]}))
    with pytest.raises(InputError, match="do not match the model's inputs"):
        calib.check(manifest, calib.CalibrationSet({"audio": images[:64]}))
    bad = images[:64].copy()
    bad[3, 0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        calib.check(manifest, calib.CalibrationSet({tn.IMAGE: bad}))


def test_int8_without_a_calibration_set_says_how_to_make_one(tiny_export, fresh_copy):
    manifest = Manifest.load(fresh_copy(tiny_export))
    with pytest.raises(ArtifactError, match="trt-exit calibrate"):
        create_precision_graphs(manifest, ("int8",))


def test_a_failure_half_way_leaves_the_manifest_and_files_untouched(tiny_export, digits,
                                                                     fresh_copy, monkeypatch):
    import trt_exit.export.precision as precision_module

    root = fresh_copy(tiny_export)
    before = (root / "manifest.json").read_bytes()
    calls = []
    real = precision_module.quantize_int8

    def fail_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise ConfigError("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(precision_module, "quantize_int8", fail_on_third)
    manifest = Manifest.load(root)
    calib.save(manifest, calib.from_dataset(digits["train"], 64))
    saved = (root / "manifest.json").read_bytes()
    with pytest.raises(ConfigError, match="injected"):
        create_precision_graphs(manifest, ("fp16", "int8"))
    assert (root / "manifest.json").read_bytes() == saved != before  # only the calibration record
    assert not (root / "onnx" / "int8").exists() and not (root / "onnx" / "fp16").exists()
    assert not list(root.glob(".precision-*"))
    assert Manifest.load(root, verify=True).precisions() == ["fp32"]


def test_unknown_precision_and_bad_settings():
    with pytest.raises(ConfigError, match="calibration method"):
        Int8Settings(method="mse")
    with pytest.raises(ConfigError, match="precision passes create"):
        create_precision_graphs(None, ("fp8",))  # type: ignore[arg-type]


def test_cli_calibrate_and_precision(tiny_export, fresh_copy, tmp_path, capsys):
    from trt_exit.cli import main

    root = fresh_copy(tiny_export)
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((64, 3, 8, 8), np.float32))
    assert main(["calibrate", str(root), "--from", str(bad)]) == 2
    assert "expected (N, 1, 8, 8)" in capsys.readouterr().err
    assert main(["precision", str(root), "--precision", "int8"]) == 2
    assert "trt-exit calibrate" in capsys.readouterr().err
    assert main(["calibrate", str(root), "--size", "64"]) == 0
    assert "64 samples from digits/train" in capsys.readouterr().out
    assert main(["precision", str(root), "--precision", "fp16"]) == 0
    out = capsys.readouterr().out
    assert "fp16:" in out and "top-1 agreement" in out
    assert Manifest.load(root, verify=True).precisions() == ["fp32", "fp16"]


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_each_precision_gets_its_single_early_exit_graph(tiny_precisions, digits, precision):
    """The precision pass writes the chain as one graph too; it decides as that precision's
    stage graphs do (Q/DQ graphs keep their shape arithmetic: see early_exit_graph._QDQ)."""
    from trt_exit.runtime.policies import ThresholdPolicy

    manifest = Manifest.load(tiny_precisions, verify=True)
    assert manifest.early_exit_graph[precision].path == f"onnx/{precision}/early_exit.onnx"
    assert manifest.parity[precision]["early_exit_graph"]["results_compared"] > 0
    images = digits["test"].inputs["image"][:96]
    conf = _all_exits(manifest, precision, images).all_confidences
    policy = ThresholdPolicy([float(np.median(conf[0])), float(np.median(conf[1]))])
    with Executor(manifest, precision=precision, compact=False) as executor:
        untuned = executor.run(images, strategy="single_graph")  # the file: final exit only
        assert untuned.strategy == "single_graph" and (untuned.exit_index == 2).all()
        for size in (1, 96):
            for start in range(0, 8 if size == 1 else 96, size):
                x = images[start : start + size]
                stages = executor.run(x, policy, "stages")
                graph = executor.run(x, policy, "single_graph")
                np.testing.assert_array_equal(graph.exit_index, stages.exit_index)
                np.testing.assert_allclose(graph.output, stages.output, rtol=0, atol=1e-4)
