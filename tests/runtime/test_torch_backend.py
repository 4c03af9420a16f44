"""The torch backend on the CPU against ONNX Runtime, through the host executor.

Tolerances (fp32): ONNX Runtime and PyTorch run the same exported stages with different
kernels; outputs agree to 1e-4 absolute on logits of order 1-10, confidences to 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest

from trt_exit.errors import ConfigError, InputError
from trt_exit.manifest import Manifest
from trt_exit.runtime.backends.base import DeviceStageRunner
from trt_exit.runtime.backends.torch_backend import TorchBackend
from trt_exit.runtime.executor import Executor
from trt_exit.runtime.policies import AllExitsPolicy, FixedExitPolicy, ThresholdPolicy

OUTPUT_ATOL = 1e-4
CONFIDENCE_ATOL = 1e-5


@pytest.fixture(scope="module")
def images(digits):
    return digits["test"].inputs["image"][:64]


@pytest.fixture(scope="module")
def executors(tiny_export):
    with Executor(tiny_export, "onnxruntime", policy=AllExitsPolicy()) as ort_executor, \
            Executor(tiny_export, "torch", policy=AllExitsPolicy(),
                     backend_options={"device": "cpu"}) as torch_executor:
        yield ort_executor, torch_executor


def test_every_exit_matches_onnxruntime(executors, images):
    ort_executor, torch_executor = executors
    expected = ort_executor.run(images)
    got = torch_executor.run(images)
    np.testing.assert_allclose(got.all_outputs, expected.all_outputs, atol=OUTPUT_ATOL)
    np.testing.assert_allclose(got.all_confidences, expected.all_confidences,
                               atol=CONFIDENCE_ATOL)


@pytest.mark.parametrize("batch", [1, 64])
def test_threshold_decisions_match_onnxruntime(executors, images, batch):
    ort_executor, torch_executor = executors
    everything = ort_executor.run(images[:batch])
    # A threshold at the median first-exit confidence sends about half the samples out early,
    # away from the decision boundary (no sample sits within the tolerance of it).
    first = everything.all_confidences[0]
    threshold = float(np.median(first)) if batch > 1 else float(first[0]) - 0.01
    margin = np.abs(first - threshold).min()
    assert margin > CONFIDENCE_ATOL
    policy = ThresholdPolicy([threshold, None])
    expected = ort_executor.run(images[:batch], policy)
    got = torch_executor.run(images[:batch], policy)
    np.testing.assert_array_equal(got.exit_index, expected.exit_index)
    np.testing.assert_allclose(got.output, expected.output, atol=OUTPUT_ATOL)
    if batch > 1:
        assert 0 < (got.exit_index == 0).sum() < batch


def test_full_model_matches_onnxruntime(executors, images):
    ort_executor, torch_executor = executors
    np.testing.assert_allclose(torch_executor.run_full_model(images).output,
                               ort_executor.run_full_model(images).output, atol=OUTPUT_ATOL)


def test_runners_implement_the_device_interface(tiny_export):
    manifest = Manifest.load(tiny_export)
    backend = TorchBackend(device="cpu")
    runner = backend.open_stage(manifest, manifest.stages[0], "fp32")
    assert isinstance(runner, DeviceStageRunner)
    assert runner.scratch_bytes() == 0
    assert not backend.device_arrays
    with pytest.raises(ConfigError, match="CUDA device"):
        runner.enqueue(0, {}, 1)
    with pytest.raises(InputError, match="needs input"):
        runner.run({})
    # One model per backend, shared by every stage runner.
    other = backend.open_stage(manifest, manifest.stages[1], "fp32")
    assert other.module.model is runner.module.model
    backend.close()


@pytest.mark.parametrize("precision, message", [("int8", "fp32 or fp16"),
                                                ("fp16", "CUDA only")])
def test_unsupported_precisions_are_clear_errors(tiny_export, precision, message):
    manifest = Manifest.load(tiny_export)
    with pytest.raises(ConfigError, match=message):
        TorchBackend(device="cpu").open_stage(manifest, manifest.stages[0], precision)


def test_fixed_exit_runs_on_the_torch_backend(executors, images):
    _, torch_executor = executors
    results = torch_executor.run(images[:8], FixedExitPolicy(0))
    assert (results.exit_index == 0).all()
    everything = torch_executor.run(images[:8])
    np.testing.assert_allclose(results.output, everything.all_outputs[0], atol=1e-6)


def test_cuda_device_without_gpu_is_a_clear_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the no-GPU message cannot be observed")
    from trt_exit.errors import CudaUnavailableError

    with pytest.raises(CudaUnavailableError, match="device.*cpu"):
        TorchBackend(device="cuda")
