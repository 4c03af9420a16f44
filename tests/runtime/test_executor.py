"""The host executor on ONNX Runtime: policies, batches, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from trt_exit import tensor_names as tn
from trt_exit.errors import ConfigError, InputError
from trt_exit.manifest import Manifest
from trt_exit.runtime.backends.onnxruntime import OnnxRuntimeBackend, OrtStageRunner
from trt_exit.runtime.executor import Executor
from trt_exit.runtime.policies import (
    AllExitsPolicy,
    DeadlinePolicy,
    FixedExitPolicy,
    ThresholdPolicy,
)


@pytest.fixture(scope="module")
def executor(tiny_export):
    with Executor(tiny_export) as ex:
        yield ex


@pytest.fixture(scope="module")
def images(digits):
    return digits["test"].inputs["image"][:40]


@pytest.fixture(scope="module")
def everything(executor, images):
    return executor.run(images, AllExitsPolicy())


def test_untuned_manifest_defaults_to_the_final_exit(executor, images, everything):
    results = executor.run(images)
    assert (results.exit_index == 2).all()
    np.testing.assert_allclose(results.output, everything.all_outputs[-1], atol=1e-6)


def test_all_exits_returns_every_output(everything, images):
    assert everything.all_outputs.shape == (3, len(images), 10)
    assert everything.all_confidences.shape == (3, len(images))
    assert ((everything.all_confidences >= 0) & (everything.all_confidences <= 1)).all()


@pytest.mark.parametrize("k", [0, 1, 2, -1])
def test_fixed_exit(executor, images, everything, k):
    results = executor.run(images, FixedExitPolicy(k))
    assert (results.exit_index == (k % 3)).all()
    np.testing.assert_allclose(results.output, everything.all_outputs[k], atol=1e-6)
    np.testing.assert_allclose(results.confidence, everything.all_confidences[k], atol=1e-6)


def _expected_exits(confidences, thresholds):
    exits = np.full(confidences.shape[1], len(thresholds))
    for k in reversed(range(len(thresholds))):
        if thresholds[k] is not None:
            exits = np.where(confidences[k] >= thresholds[k], k, exits)
    return exits


@pytest.mark.parametrize("compact", [True, False])
def test_threshold_policy_takes_the_first_confident_exit(tiny_export, images, everything, compact):
    conf = everything.all_confidences
    thresholds = [float(np.median(conf[0])), float(np.median(conf[1]))]
    expected = _expected_exits(conf, thresholds)
    assert len(set(expected)) == 3  # every exit is taken by some sample
    with Executor(tiny_export, compact=compact) as ex:
        batched = ex.run(images, ThresholdPolicy(thresholds))
        singles = [ex.run(images[i : i + 1], ThresholdPolicy(thresholds)) for i in range(len(images))]
    np.testing.assert_array_equal(batched.exit_index, expected)
    chosen = everything.all_outputs[expected, np.arange(len(images))]
    np.testing.assert_allclose(batched.output, chosen, atol=1e-5)
    np.testing.assert_array_equal([s.exit_index[0] for s in singles], expected)
    np.testing.assert_allclose(np.concatenate([s.output for s in singles]), batched.output, atol=1e-5)


def test_disabled_exit_is_skipped(executor, images, everything):
    results = executor.run(images, ThresholdPolicy([None, 0.0]))
    assert (results.exit_index == 1).all()
    assert executor._needed_exits(ThresholdPolicy([None, 0.0])) == [False, True, True]


@pytest.mark.parametrize("thresholds", [[1.5, 0.5], [-0.1, 0.5], [float("nan"), 0.5], [0.5]])
def test_thresholds_outside_0_1_are_refused(executor, images, thresholds):
    with pytest.raises(ConfigError):
        executor.run(images, ThresholdPolicy(thresholds))


def test_fixed_exit_out_of_range(executor, images):
    with pytest.raises(ConfigError, match="out of range"):
        executor.run(images, FixedExitPolicy(3))


def test_deadline_policy(executor, images, tiny_export):
    stages = {s.name: 1.0 for s in Manifest.load(tiny_export).stages}
    tight = DeadlinePolicy([None, None], budget_ms=0.5, stage_latency_ms=stages)
    assert (executor.run(images, tight).exit_index == 0).all()
    loose = DeadlinePolicy([None, None], budget_ms=1e6, stage_latency_ms=stages)
    assert (executor.run(images, loose).exit_index == 2).all()
    with pytest.raises(ConfigError, match="profiled latency"):
        executor.run(images, DeadlinePolicy([None, None], budget_ms=5.0))


class _NaNConfidenceBackend(OnnxRuntimeBackend):
    """Real ONNX Runtime stages, with exit 0's confidence of sample 0 replaced by NaN (as an
    FP16 overflow would produce)."""

    def open_stage(self, manifest, stage, precision):
        runner = super().open_stage(manifest, stage, precision)
        if stage.name != "exit_0":
            return runner
        original = runner.run

        def run(feeds):
            out = original(feeds)
            conf = out[tn.exit_confidence(0)].copy()
            conf[0] = np.nan
            out[tn.exit_confidence(0)] = conf
            return out

        runner.run = run
        return runner


def test_nan_confidence_never_exits(tiny_export, images):
    with Executor(tiny_export, backend=_NaNConfidenceBackend()) as ex:
        results = ex.run(images[:4], ThresholdPolicy([0.0, 1.0]))
        single = ex.run(images[:1], ThresholdPolicy([0.0, 1.0]))
    assert results.exit_index.tolist() == [2, 0, 0, 0]
    assert single.exit_index.tolist() == [2]


class _CudaArray:
    __cuda_array_interface__ = {"shape": (1, 1, 8, 8), "typestr": "<f4", "data": (0, False),
                                "version": 3}


@pytest.mark.parametrize("value,message", [
    (np.zeros((2, 1, 8, 9), np.float32), r"'image' has shape \(2, 1, 8, 9\), expected \(B, 1, 8, 8\)"),
    (np.zeros((1, 8, 8), np.float32), "has shape"),
    (np.zeros((2, 1, 8, 8), np.float64), "dtype float64, expected .* float32"),
    (np.zeros((0, 1, 8, 8), np.float32), "empty batch"),
    (np.full((2, 1, 8, 8), np.nan, np.float32), r"128 NaN or Inf values \(first at index \(0, 0, 0, 0\)\)"),
    (np.where(np.eye(8)[None, None] > 0, np.inf, 0).astype(np.float32), "8 NaN or Inf"),
    ({"audio": np.zeros((1, 1, 8, 8), np.float32)}, r"missing \['image'\].*unknown \['audio'\]"),
    (_CudaArray(), "in GPU memory, but this backend runs on the CPU"),
    ("not an array", "dtype <U12"),
])
def test_bad_inputs_name_the_tensor(executor, value, message):
    with pytest.raises(InputError, match=message):
        executor.run(value)


def test_records_are_json_ready(executor, images):
    import json

    records = executor.run(images[:3]).records()
    assert [set(r) for r in records] == [{"exit", "prediction", "confidence"}] * 3
    json.dumps(records)


def test_runner_refuses_a_graph_that_does_not_match_the_manifest(tiny_export):
    from trt_exit.errors import ArtifactError

    manifest = Manifest.load(tiny_export)
    stage = manifest.stage("segment_1")
    with pytest.raises(ArtifactError, match="do not match the manifest"):
        OrtStageRunner("segment_1", manifest.onnx_path(stage), manifest.stage("exit_1").inputs,
                       stage.outputs)


def test_regression_predictions_are_the_value_columns():
    from trt_exit.runtime.executor import ExitResults

    output = np.array([[12.0, -0.5], [30.0, 0.2]], np.float32)  # [count, log error scale]
    results = ExitResults(np.zeros(2, np.int32), output, np.ones(2, np.float32), "regression", 0.0,
                          value_columns=1)
    assert results.prediction.tolist() == [[12.0], [30.0]]
    assert results.records()[0]["prediction"] == [12.0]
    whole = ExitResults(np.zeros(2, np.int32), output, np.ones(2, np.float32), "regression", 0.0)
    assert whole.prediction.shape == (2, 2)


def test_manifest_records_value_columns(tiny_export):
    assert Manifest.load(tiny_export).value_columns == 10  # classification: every logit


class _HalfCudaArray:
    __cuda_array_interface__ = {"shape": (1, 1, 8, 8), "typestr": "<f2", "data": (0, False),
                                "version": 3}


def test_device_inputs_are_checked_for_dtype_and_shape(executor):
    from trt_exit.runtime.executor import validate_inputs

    manifest = executor.manifest
    feeds = validate_inputs(manifest, _CudaArray(), device_arrays=True)
    assert isinstance(feeds["image"], _CudaArray)  # passed through, not copied
    with pytest.raises(InputError, match=r"dtype float16, expected \(B, 1, 8, 8\) float32"):
        validate_inputs(manifest, _HalfCudaArray(), device_arrays=True)
