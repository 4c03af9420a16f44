"""TensorRT for real: build engines for the tiny model and run them against ONNX Runtime.

Marked ``tensorrt``: these need TensorRT's native libraries and an NVIDIA GPU, and skip with the
reason elsewhere (this project's CI cannot install TensorRT; ``trt-exit doctor`` runs the same
comparison on a Jetson).
"""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

from trt_exit import tensor_names as tn
from trt_exit.build.doctor import TOLERANCES
from trt_exit.build.target import Target
from trt_exit.errors import ArtifactError, InputError

pytestmark = pytest.mark.tensorrt


def _tensorrt_reason() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed (JetPack's python3-libnvinfer, or pip install tensorrt on x86)"
    from trt_exit.runtime.cuda.api import cuda_status

    status = cuda_status()
    return None if status.available else f"TensorRT cannot run here: {status.reason}"


REASON = _tensorrt_reason()
skip_without_tensorrt = pytest.mark.skipif(REASON is not None, reason=REASON or "")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The seeded tiny model with FP32/FP16/INT8 graphs and engines (batch 1..8)."""
    if REASON:
        pytest.skip(REASON)
    from trt_exit.build.builder import build_engines
    from trt_exit.build.config import BatchProfile, BuildConfig
    from trt_exit.build.doctor import tiny_model_dir

    manifest, images = tiny_model_dir(tmp_path_factory.mktemp("trt") / "tiny",
                                      ("fp32", "fp16", "int8"))
    summary = build_engines(manifest, BuildConfig(precisions=("fp32", "fp16", "int8"),
                                                  profile=BatchProfile(1, 4, 16)), progress=False)
    return manifest, images, summary


@skip_without_tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_engines_match_onnxruntime(built, precision):
    from trt_exit.build.doctor import _all_exits, _within

    manifest, images, _ = built
    ref_outputs, ref_conf = _all_exits(manifest, "onnxruntime", precision, images)
    outputs, conf = _all_exits(manifest, "tensorrt", precision, images)
    for ref, got in ((ref_outputs, outputs), (ref_conf, conf)):
        ok, diff, limit = _within(ref, got, TOLERANCES[precision])
        assert ok, (precision, diff, limit)


@skip_without_tensorrt
def test_an_unchanged_model_is_not_rebuilt(built):
    from trt_exit.build.builder import build_engines
    from trt_exit.build.config import BatchProfile, BuildConfig

    manifest, _, first = built
    assert len(first.built) == 3 * (len(manifest.stages) + 1) and first.timing_cache.is_file()
    again = build_engines(manifest, BuildConfig(precisions=("fp32", "fp16", "int8"),
                                                profile=BatchProfile(1, 4, 16)), progress=False)
    assert again.built == [] and len(again.cached) == len(first.built)


@skip_without_tensorrt
def test_scratch_is_shared_and_batches_outside_the_profile_are_refused(built):
    from trt_exit.runtime.backends.tensorrt_backend import TensorRTBackend

    manifest, images, _ = built
    backend = TensorRTBackend()
    runners = [backend.open_stage(manifest, s, "fp16") for s in manifest.stages]
    try:
        assert all(r.scratch_bytes() >= 0 for r in runners)
        with pytest.raises(InputError, match="outside the engine's optimization profile"):
            runners[0].run({tn.IMAGE: np.zeros((17, *images.shape[1:]), np.float32)})
    finally:
        for runner in runners:
            runner.close()
        backend.close()


@skip_without_tensorrt
def test_truncated_engine_and_engine_for_another_tensorrt_are_refused(built, tmp_path):
    from trt_exit.build.errors import EngineMismatchError
    from trt_exit.manifest import Manifest
    from trt_exit.runtime.executor import Executor

    manifest, _, _ = built
    root = tmp_path / "copy"
    shutil.copytree(manifest.root, root)
    copy = Manifest.load(root)
    stage = copy.stage("segment_0")
    record = next(r for r in stage.engines.values() if r["precision"] == "fp16")
    engine = root / record["file"]["path"]
    engine.write_bytes(engine.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match="truncated"):
        Executor(copy, "tensorrt", "fp16")
    record["target"] = dataclasses.replace(Target(**record["target"]), tensorrt="9.0.0").to_dict()
    with pytest.raises(EngineMismatchError, match="rebuild"):
        Executor(copy, "tensorrt", "fp16")


@skip_without_tensorrt
def test_parser_errors_name_the_node(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from trt_exit.build.errors import OnnxParseError
    from trt_exit.build.steps import network_from_onnx_path
    from trt_exit.manifest import TensorSpec

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 4])
    # Standard domain, passes the preflight; TensorRT rejects a non-constant Einsum ellipsis.
    node = helper.make_node("Einsum", ["x", "x"], ["y"], equation="...i,...i->...i", name="odd")
    model = helper.make_model(helper.make_graph([node], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "odd.onnx"
    onnx.save(model, path)
    with pytest.raises(OnnxParseError, match="'odd'"):
        network_from_onnx_path(path, [TensorSpec("x", [-1, 4])])
