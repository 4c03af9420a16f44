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
                                                ("bf16", "fp32 or fp16")])
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


# --------------------------------------------------------------------------- FP16 (convert once)

#: Torch FP16 vs ONNX Runtime on the FP16 graph: both round weights and activations to FP16 but
#: in different kernels (ONNX Runtime's CPU kernels compute FP16 nodes in FP32 internally);
#: measured max differences on the tiny model: outputs 1.5e-3, confidences 1.5e-4.
FP16_OUTPUT_ATOL = 1e-2
FP16_CONFIDENCE_ATOL = 2e-3


@pytest.fixture(scope="module")
def fp16_export(tiny_export, tmp_path_factory):
    import shutil

    from trt_exit.export.precision import create_precision_graphs

    out = tmp_path_factory.mktemp("fp16") / "model"
    shutil.copytree(tiny_export, out)
    create_precision_graphs(Manifest.load(out), ("fp16",))
    return out


def test_fp16_matches_the_onnx_fp16_graph_without_autocast(fp16_export, images):
    import torch

    policy = AllExitsPolicy()
    with Executor(fp16_export, "onnxruntime", "fp16", policy=policy) as ort_executor, \
            Executor(fp16_export, "torch", "fp16", policy=policy,
                     backend_options={"device": "cpu"}) as torch16, \
            Executor(fp16_export, "torch", "fp32", policy=policy,
                     backend_options={"device": "cpu"}) as torch32:
        autocast_seen = []
        model = torch16.backend.model(torch16.manifest)
        model.exits[0].register_forward_hook(
            lambda *_: autocast_seen.append(torch.is_autocast_enabled("cpu")))
        expected = ort_executor.run(images[:16])
        got = torch16.run(images[:16])
        fp32 = torch32.run(images[:16])
    np.testing.assert_allclose(got.all_outputs, expected.all_outputs, atol=FP16_OUTPUT_ATOL)
    np.testing.assert_allclose(got.all_confidences, expected.all_confidences,
                               atol=FP16_CONFIDENCE_ATOL)
    assert got.all_outputs.dtype == np.float32
    assert not np.array_equal(got.all_outputs, fp32.all_outputs)  # it really ran in FP16
    assert autocast_seen == [False]


def test_fp16_weights_are_converted_once_with_fp32_normalization(fp16_export):
    import torch

    manifest = Manifest.load(fp16_export)
    backend = TorchBackend(device="cpu")
    first = backend.open_stage(manifest, manifest.stages[0], "fp16")
    second = backend.open_stage(manifest, manifest.stages[1], "fp16")
    model = backend.model(manifest)
    assert second.module.model is first.module.model is model  # converted once, shared
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    norms = {name for name, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    assert norms
    for name, dtype in dtypes.items():
        in_norm = name.rsplit(".", 1)[0] in norms
        assert dtype == (torch.float32 if in_norm else torch.float16), name
    fp32_model = TorchBackend(device="cpu")
    fp32_model.open_stage(manifest, manifest.stages[0], "fp32")
    assert {p.dtype for p in fp32_model.model(manifest).parameters()} == {torch.float32}


@pytest.mark.parametrize("version, has_pool, ok", [
    ("2.4.1+cu121", False, False),
    ("2.5.1", True, False),       # MemPool, but before use_mem_pool's ref-count fix
    ("2.6.0", True, True),
    ("2.14.1+cu130", True, True),
    ("2.14.1", False, False),     # a build without the pool API
])
def test_torch_floor_for_the_cuda_path_is_a_clear_error(version, has_pool, ok):
    from trt_exit.runtime.backends.torch_backend import torch_cuda_unsupported

    reason = torch_cuda_unsupported(version, has_pool)
    assert (reason == "") is ok
    if not ok:
        assert "torch 2.6 or newer" in reason and version in reason
