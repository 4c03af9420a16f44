"""The served model's I/O and the per-batch step, without a server (real ONNX Runtime)."""

from __future__ import annotations

import numpy as np
import pytest

from trt_exit.errors import ConfigError, InputError
from trt_exit.manifest import Manifest
from trt_exit.runtime.executor import Executor
from trt_exit.serving.model_io import (
    CONFIDENCE,
    EXIT_INDEX,
    OUTPUT,
    PREDICTION,
    engines_max_batch,
    exit_counts,
    resolve_max_batch,
    run_requests,
    served_inputs,
    served_outputs,
)


def test_inputs_and_outputs_come_from_the_manifest(tiny_tuned):
    manifest = Manifest.load(tiny_tuned)
    [image] = served_inputs(manifest)
    assert (image.name, image.dims, image.triton_dtype) == ("image", (1, 8, 8), "FP32")
    outputs = {io.name: io for io in served_outputs(manifest)}
    assert outputs[OUTPUT].dims == (10,) and outputs[PREDICTION].triton_dtype == "INT64"
    assert "error" not in outputs and "error" in {io.name for io in
                                                  served_outputs(manifest, errors_in_band=True)}


@pytest.mark.serve  # with the serving tests, which build the AV model anyway
def test_regression_prediction_has_the_value_columns(av_model_dir):
    manifest = Manifest.load(av_model_dir)
    assert {io.name for io in served_inputs(manifest)} == {"image", "audio"}
    prediction = {io.name: io for io in served_outputs(manifest)}[PREDICTION]
    assert prediction.triton_dtype == "FP32" and prediction.dims == (manifest.value_columns,)


def test_a_dynamic_batch_matches_the_executor_sample_by_sample(tiny_tuned, digits):
    images = digits["test"].inputs["image"][:23]
    sizes = [1, 5, 2, 7, 8]  # requests of different batch sizes, as Triton's batcher forms them
    requests, start = [], 0
    for size in sizes:
        requests.append({"image": images[start:start + size]})
        start += size
    with Executor(tiny_tuned) as executor:
        reference = executor.run(images)
        answers = run_requests(executor, requests)
    assert len(set(reference.exit_index.tolist())) > 1  # the batch really mixes exits
    start = 0
    for size, answer in zip(sizes, answers):
        rows = slice(start, start + size)
        np.testing.assert_array_equal(answer[EXIT_INDEX][:, 0], reference.exit_index[rows])
        np.testing.assert_allclose(answer[OUTPUT], reference.output[rows], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(answer[CONFIDENCE][:, 0], reference.confidence[rows], rtol=1e-6)
        np.testing.assert_array_equal(answer[PREDICTION][:, 0], reference.prediction[rows])
        start += size
    assert exit_counts(answers, 3) == np.bincount(reference.exit_index, minlength=3).tolist()


def test_a_bad_request_is_refused_alone(tiny_tuned, digits):
    images = digits["test"].inputs["image"][:4]
    nan = images[:2].copy()
    nan[1, 0, 3, 3] = np.nan
    requests = [{"image": images[:2]}, {"image": nan}, {"image": images[2:].astype(np.float64)},
                {"image": images[2:]}]
    with Executor(tiny_tuned) as executor:
        reference = executor.run(images)
        answers = run_requests(executor, requests)
    assert isinstance(answers[1], InputError) and "NaN" in str(answers[1])
    assert isinstance(answers[2], InputError) and "float64" in str(answers[2])
    np.testing.assert_array_equal(answers[0][EXIT_INDEX][:, 0], reference.exit_index[:2])
    np.testing.assert_array_equal(answers[3][EXIT_INDEX][:, 0], reference.exit_index[2:])
    with Executor(tiny_tuned) as executor:
        assert all(isinstance(a, InputError) for a in run_requests(executor, [{"image": nan}]))


def test_max_batch_follows_the_engines_profile(tiny_tuned):
    manifest = Manifest.load(tiny_tuned)
    assert engines_max_batch(manifest, "fp16") is None
    assert resolve_max_batch(manifest, "onnxruntime", "fp32", None) == 16
    for stage in manifest.stages:  # engine records as trt-exit build writes them
        stage.engines["fp16-0123456789abcdef"] = {
            "precision": "fp16", "profile": {"min_batch": 1, "opt_batch": 1,
                                             "max_batch": 4 if stage.name == "exit_1" else 8}}
    assert engines_max_batch(manifest, "fp16") == 4
    assert resolve_max_batch(manifest, "tensorrt", "fp16", None) == 4
    assert resolve_max_batch(manifest, "tensorrt", "fp16", 2) == 2
    with pytest.raises(ConfigError, match="above the fp16 engines' profile"):
        resolve_max_batch(manifest, "tensorrt", "fp16", 32)
    with pytest.raises(ConfigError, match="at least 1"):
        resolve_max_batch(manifest, "onnxruntime", "fp32", 0)
