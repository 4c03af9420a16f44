"""A trained audiovisual crowd model through the spine: per-stage ONNX, parity, the host executor
on ONNX Runtime, threshold tuning and evaluation on a regression task."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trt_exit import tensor_names as tn
from trt_exit.experiments.av_crowd import TINY_EXPORT_SAMPLES, build_tiny_av_export
from trt_exit.training.crowd_datasets import load_synthetic_av_crowd


@pytest.fixture(scope="module")
def av_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("av_export")
    return build_tiny_av_export(out, seed=0)


@pytest.fixture(scope="module")
def av_splits():
    train, val, test = TINY_EXPORT_SAMPLES
    return load_synthetic_av_crowd(seed=0, train=train, val=val, test=test)


def test_manifest_describes_an_audiovisual_regression_model(av_export):
    manifest = av_export
    assert manifest.task == "regression"
    assert {t.name: t.shape for t in manifest.inputs} == {
        tn.IMAGE: [-1, 3, 96, 128], tn.AUDIO: [-1, 1, 32, 64]}
    assert set(manifest.preprocessing) == {"image", "audio"}
    assert manifest.preprocessing["audio"]["features"] == "log_mel"
    readers = {s.name: s.input_names() for s in manifest.stages if s.kind == tn.EXIT}
    assert readers == {"exit_0": ["tokens_0", tn.AUDIO], "exit_1": ["tokens_1"],
                       "exit_2": ["tokens_2", tn.AUDIO]}
    assert [e.options["modality"] for e in manifest.exits] == ["audio", "visual", "audiovisual"]
    assert all(e.confidence == "predicted_error" for e in manifest.exits)
    assert manifest.parity["fp32"]["ok"]
    assert manifest.thresholds() is not None
    assert manifest.tuning["fp32"]["metric"] == "mae"
    assert manifest.model["dataset"]["name"] == "synthetic_av_crowd"


def test_executor_matches_torch_chained(av_export, av_splits):
    from trt_exit.models.checkpoint import load_checkpoint
    from trt_exit.runtime.executor import Executor
    from trt_exit.runtime.policies import AllExitsPolicy

    test = av_splits["test"]
    model = load_checkpoint(av_export.checkpoint_path())
    with torch.no_grad():
        reference = [o.numpy() for o in model(torch.from_numpy(test.inputs[tn.IMAGE]),
                                              torch.from_numpy(test.inputs[tn.AUDIO]))]
    with Executor(av_export, "onnxruntime") as executor:
        results = executor.run(test.inputs, AllExitsPolicy())
    for k, ref in enumerate(reference):
        assert np.abs(results.all_outputs[k] - ref).max() < 1e-3  # counts of tens, chained fp32
        expected = 1.0 / (1.0 + np.exp(ref[:, 1]))
        assert np.abs(results.all_confidences[k] - expected).max() < 1e-4


def test_threshold_policy_on_a_regression_model(av_export, av_splits):
    from trt_exit.runtime.executor import Executor
    from trt_exit.runtime.policies import AllExitsPolicy, ThresholdPolicy

    test = av_splits["test"]
    with Executor(av_export, "onnxruntime") as executor:
        everything = executor.run(test.inputs, AllExitsPolicy())
        # Median confidences: about half the samples leave at exit 0, a share of the rest at 1.
        thresholds = [float(np.median(everything.all_confidences[k])) for k in range(2)]
        early = executor.run(test.inputs, ThresholdPolicy(thresholds))
        one_by_one = [executor.run({k: v[i:i + 1] for k, v in test.inputs.items()},
                                   ThresholdPolicy(thresholds)) for i in range(8)]
    conf = everything.all_confidences
    for i, k in enumerate(early.exit_index):
        # The first exit whose own confidence reaches its threshold, else the final head.
        passing = [j for j in range(2) if conf[j, i] >= thresholds[j]]
        assert k == (passing[0] if passing else 2)
        assert np.allclose(early.output[i], everything.all_outputs[k, i], atol=1e-5)
    assert len(set(early.exit_index.tolist())) > 1, "thresholds should split the batch"
    for i, single in enumerate(one_by_one):
        assert single.exit_index[0] == early.exit_index[i]
        assert np.allclose(single.output[0], early.output[i], atol=1e-4)


def test_tuning_respects_the_mae_floor(av_export, av_splits):
    from trt_exit.runtime.executor import Executor
    from trt_exit.runtime.policies import AllExitsPolicy
    from trt_exit.runtime.tuning import tune_thresholds

    val = av_splits["val"]
    with Executor(av_export, "onnxruntime") as executor:
        results = executor.run(val.inputs, AllExitsPolicy())
    stages = {f"{kind}_{k}": 1.0 for k in range(3) for kind in ("segment", "exit")}
    args = (results.all_outputs, results.all_confidences, val.targets, "regression", stages)
    strict = tune_thresholds(*args, max_loss=0.0)
    assert strict.metric_name == "mae"
    assert strict.best.metric <= strict.final_metric + 1e-9
    loose = tune_thresholds(*args, max_loss=1e6)
    assert loose.best.exit_fractions[0] == 1.0  # anything goes: everyone leaves at exit 0
    assert loose.best.expected_latency_ms == 2.0


def test_evaluate_step_reports_mae(av_export, av_splits):
    from trt_exit.workflow import evaluate_step

    report = evaluate_step(av_export, av_splits["test"], passes=1, warmup=4)
    assert report["metric"] == "mae" and report["task"] == "regression"
    assert len(report["exits"]) == 3
    assert np.isfinite(report["early_exit"]["mae"]) and report["early_exit"]["mae"] >= 0
    assert abs(sum(report["early_exit"]["exit_fractions"]) - 1.0) < 1e-9


def test_a_stream_frame_and_its_audio_go_through_the_manifest_recipes(av_export):
    from trt_exit.pipelines.audio_features import LogMelConfig, log_mel
    from trt_exit.pipelines.preprocess import image_to_input
    from trt_exit.runtime.executor import Executor
    from trt_exit.training.crowd_synth import SyntheticCrowdStream

    stream = SyntheticCrowdStream(seed=5)
    frame, count = stream.frame(3.0)
    inputs = {
        tn.IMAGE: image_to_input(frame, av_export.preprocessing["image"])[None],
        tn.AUDIO: log_mel(stream.audio(2.0, 3.0),
                          LogMelConfig.from_dict(av_export.preprocessing["audio"]))[None],
    }
    with Executor(av_export, "onnxruntime") as executor:
        result = executor.run(inputs)
    assert result.output.shape == (1, 2) and np.isfinite(result.output).all()
    assert 0.0 <= result.confidence[0] <= 1.0


def test_predictions_are_counts_without_the_error_scale(av_export, av_splits):
    from trt_exit.runtime.executor import Executor

    assert av_export.value_columns == 1
    with Executor(av_export, "onnxruntime") as executor:
        results = executor.run({k: v[:4] for k, v in av_splits["test"].inputs.items()})
    assert results.output.shape == (4, 2)  # [count, log error scale]
    assert results.prediction.shape == (4, 1)
    np.testing.assert_array_equal(results.prediction[:, 0], results.output[:, 0])
    assert all(len(r["prediction"]) == 1 for r in results.records())
