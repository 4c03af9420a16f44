"""The TensorRT build and runtime layers, everything that can be checked without TensorRT:
settings, cache keys, engine selection and verification, the ONNX preflight, parser error
messages, and the errors a user sees when TensorRT is missing."""

from __future__ import annotations

import dataclasses
import json
import sys

import onnx
import pytest
from onnx import TensorProto, helper

from trt_exit.build import preflight
from trt_exit.build.config import BatchProfile, BuildConfig
from trt_exit.build.errors import EngineMismatchError, OnnxParseError
from trt_exit.build.steps import ParserIssue, format_parser_issues
from trt_exit.build.target import Target, engine_filename, engine_for, engine_key, runs_on
from trt_exit.errors import ArtifactError, ConfigError, ManifestError, MissingDependencyError
from trt_exit.fileio import atomic_write_bytes
from trt_exit.manifest import FileRef, Manifest, TensorSpec

ORIN_TRT10 = Target("10.3.0", "Orin", "8.7")
THOR_TRT11 = Target("11.4.1", "NVIDIA Thor", "11.0")


@pytest.fixture
def no_tensorrt(monkeypatch):
    """Makes ``import tensorrt`` fail as on a machine without it (even where it is installed)."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


# --------------------------------------------------------------------------- settings


def test_batch_profile_validation_and_shapes():
    profile = BatchProfile(1, 2, 8)
    spec = TensorSpec("tokens_0", [-1, 17, 64])
    assert profile.shapes(spec) == ((1, 17, 64), (2, 17, 64), (8, 17, 64))
    for bad in [(0, 1, 1), (2, 1, 4), (1, 4, 2)]:
        with pytest.raises(ConfigError, match="1 <= min <= opt <= max"):
            BatchProfile(*bad)
    with pytest.raises(ConfigError, match="dynamic batch"):
        profile.shapes(TensorSpec("x", [4, 17, 64]))


def test_build_config_validation():
    with pytest.raises(ConfigError, match="unknown precision"):
        BuildConfig(precisions=("fp8",))
    with pytest.raises(ConfigError, match="workspace"):
        BuildConfig(workspace_mib=0)
    with pytest.raises(ConfigError, match="optimization level"):
        BuildConfig(optimization_level=7)
    assert BuildConfig(precisions=("fp16", "fp16", "int8")).precisions == ("fp16", "int8")


# --------------------------------------------------------------------------- cache keys


def test_engine_key_changes_with_everything_that_changes_the_engine():
    options = BuildConfig().engine_options()
    base = engine_key("a" * 64, "fp16", ORIN_TRT10, options)
    assert base.startswith("fp16-") and len(base) == len("fp16-") + 16
    assert engine_key("a" * 64, "fp16", ORIN_TRT10, options) == base  # stable
    variants = [
        engine_key("b" * 64, "fp16", ORIN_TRT10, options),
        engine_key("a" * 64, "int8", ORIN_TRT10, options),
        engine_key("a" * 64, "fp16", dataclasses.replace(ORIN_TRT10, tensorrt="10.3.1"), options),
        engine_key("a" * 64, "fp16", dataclasses.replace(ORIN_TRT10, device_name="Orin Nano"), options),
        engine_key("a" * 64, "fp16", dataclasses.replace(ORIN_TRT10, compute_capability="8.6"), options),
        engine_key("a" * 64, "fp16", ORIN_TRT10,
                   BuildConfig(profile=BatchProfile(1, 1, 16)).engine_options()),
        engine_key("a" * 64, "fp16", ORIN_TRT10, BuildConfig(dla_core=0).engine_options()),
        engine_key("a" * 64, "fp16", ORIN_TRT10,
                   BuildConfig(version_compatible=True).engine_options()),
    ]
    assert len(set(variants)) == len(variants) and base not in variants
    # The workspace limit bounds the tactics tried, not what the engine computes.
    assert engine_key("a" * 64, "fp16", ORIN_TRT10,
                      BuildConfig(workspace_mib=64).engine_options()) == base
    assert engine_filename("exit_1", base) == f"engines/exit_1.fp16.{base[5:]}.engine"


def test_engines_run_only_where_they_were_built():
    record = {"precision": "fp16", "target": ORIN_TRT10.to_dict(), "version_compatible": False}
    assert runs_on(record, ORIN_TRT10)
    assert not runs_on(record, dataclasses.replace(ORIN_TRT10, tensorrt="10.7.0"))
    assert not runs_on(record, THOR_TRT11)
    assert not runs_on(record, dataclasses.replace(ORIN_TRT10, compute_capability="7.2"))
    compatible = {**record, **BuildConfig(version_compatible=True).engine_options(),
                  "target": ORIN_TRT10.to_dict()}
    assert runs_on(compatible, dataclasses.replace(ORIN_TRT10, tensorrt="10.7.0"))
    assert not runs_on(compatible, dataclasses.replace(ORIN_TRT10, tensorrt="10.2.0"))
    assert not runs_on(compatible, dataclasses.replace(ORIN_TRT10, tensorrt="11.4.1"))


@pytest.fixture
def with_engine(tiny_export, fresh_copy):
    """A copy of the tiny export whose segment_0 has a (fake-content) fp16 engine record built
    for TensorRT 10.3 on Orin, written and recorded the way the builder does."""
    root = fresh_copy(tiny_export)
    manifest = Manifest.load(root)
    stage = manifest.stage("segment_0")
    key = engine_key(stage.onnx["fp32"].sha256, "fp16", ORIN_TRT10, BuildConfig().engine_options())
    path = root / engine_filename(stage.name, key)
    atomic_write_bytes(path, b"ftrt" + bytes(range(256)) * 64)
    stage.engines[key] = {"precision": "fp16", "file": dataclasses.asdict(FileRef.of(path, root)),
                          "onnx_sha256": stage.onnx["fp32"].sha256, "target": ORIN_TRT10.to_dict(),
                          **BuildConfig().engine_options()}
    manifest.save()
    return Manifest.load(root), path


def test_engine_for_the_right_machine_is_found_and_verified(with_engine):
    manifest, path = with_engine
    stage = manifest.stage("segment_0")
    record, found = engine_for(manifest, stage.name, stage.engines, "fp16", ORIN_TRT10,
                               onnx_sha256=stage.onnx["fp32"].sha256)
    assert found == path.resolve() and record["precision"] == "fp16"


def test_engine_from_another_tensorrt_version_or_device_is_refused(with_engine):
    manifest, _ = with_engine
    stage = manifest.stage("segment_0")
    with pytest.raises(EngineMismatchError) as info:
        engine_for(manifest, stage.name, stage.engines, "fp16", THOR_TRT11)
    message = str(info.value)
    assert "TensorRT 10.3.0 on Orin" in message and "TensorRT 11.4.1 on NVIDIA Thor" in message
    assert f"trt-exit build {manifest.root} --precision fp16" in message
    with pytest.raises(ArtifactError, match="no int8 TensorRT engine has been built"):
        engine_for(manifest, stage.name, stage.engines, "int8", ORIN_TRT10)
    # An engine built from an older graph is never used, whatever machine it is for.
    with pytest.raises(ArtifactError, match="built from an older version of the graph"):
        engine_for(manifest, stage.name, stage.engines, "fp16", ORIN_TRT10, onnx_sha256="0" * 64)


def test_truncated_or_missing_engine_file_is_refused(with_engine):
    manifest, path = with_engine
    stage = manifest.stage("segment_0")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="truncated or changed after the build; rebuild"):
        engine_for(manifest, stage.name, stage.engines, "fp16", ORIN_TRT10)
    path.unlink()
    with pytest.raises(ArtifactError, match="is missing; rebuild"):
        engine_for(manifest, stage.name, stage.engines, "fp16", ORIN_TRT10)


def test_build_jobs_need_the_graphs_of_each_precision(tiny_export):
    from trt_exit.build.builder import build_jobs

    manifest = Manifest.load(tiny_export)
    jobs = build_jobs(manifest, ("fp32",))
    assert [j.name for j in jobs] == [s.name for s in manifest.stages] + ["full"]
    with pytest.raises(ManifestError, match="trt-exit precision .* --precision fp16"):
        build_jobs(manifest, ("fp16",))


# --------------------------------------------------------------------------- ONNX preflight


def _graph_with(node, inputs, outputs, domain_opsets=()):
    graph = helper.make_graph([node], "g", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), *domain_opsets])


def test_preflight_accepts_every_exported_graph(tiny_export):
    for path in sorted(tiny_export.glob("onnx/*/*.onnx")):
        preflight.check_parsable(path)


def test_preflight_names_the_node_tensorrt_cannot_parse(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 8])
    fused = _graph_with(helper.make_node("Gelu", ["x"], ["y"], domain="com.microsoft",
                                         name="/blocks.0/mlp/Gelu_fused"),
                        [x], [y], [helper.make_opsetid("com.microsoft", 1)])
    onnx.save(fused, tmp_path / "fused.onnx")
    with pytest.raises(OnnxParseError, match=r"node 0 '/blocks.0/mlp/Gelu_fused' \(op "
                                             r"com.microsoft.Gelu\) is from domain"):
        preflight.check_parsable(tmp_path / "fused.onnx")
    seq = helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, ["B", 8])
    sequence = _graph_with(helper.make_node("SequenceConstruct", ["x"], ["s"], name="to_seq"),
                           [x], [seq])
    onnx.save(sequence, tmp_path / "sequence.onnx")
    with pytest.raises(OnnxParseError, match="'to_seq' \\(op SequenceConstruct\\) is not supported"):
        preflight.check_parsable(tmp_path / "sequence.onnx")
    new_opset = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])],
                                                    "g", [x], [y]),
                                  opset_imports=[helper.make_opsetid("", 23)])
    onnx.save(new_opset, tmp_path / "opset23.onnx")
    with pytest.raises(OnnxParseError, match="opset 23"):
        preflight.check_parsable(tmp_path / "opset23.onnx")


def test_parser_errors_are_reported_by_node():
    message = format_parser_issues("onnx/fp16/exit_1.onnx", [
        ParserIssue(12, "/exits.1/attn/Einsum", "Einsum", "ErrorCode.UNSUPPORTED_NODE",
                    "Ellipsis is not supported"),
        ParserIssue(-1, "", "", "ErrorCode.INVALID_GRAPH", "graph has no outputs")])
    assert "onnx/fp16/exit_1.onnx" in message
    assert "node 12 '/exits.1/attn/Einsum' (op Einsum): Ellipsis is not supported " \
           "[ErrorCode.UNSUPPORTED_NODE]" in message
    assert "the graph: graph has no outputs" in message


# --------------------------------------------------------------------------- no TensorRT


JETPACK_ADVICE = ("JetPack", "--system-site-packages", "ONNX Runtime path still works")


def test_build_without_tensorrt_explains_how_to_get_it(tiny_export, no_tensorrt, capsys):
    from trt_exit.build.builder import build_engines
    from trt_exit.cli import main

    with pytest.raises(MissingDependencyError) as info:
        build_engines(Manifest.load(tiny_export), BuildConfig(precisions=("fp32",)), progress=False)
    assert all(text in str(info.value) for text in JETPACK_ADVICE)
    assert main(["build", str(tiny_export), "--precision", "fp32"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("trt-exit build: error: trt-exit build needs the Python package 'tensorrt'")
    assert all(text in err for text in JETPACK_ADVICE) and "Traceback" not in err


def test_tensorrt_backend_without_tensorrt(tiny_export, no_tensorrt):
    from trt_exit.runtime.executor import Executor

    with pytest.raises(MissingDependencyError, match="The TensorRT backend needs"):
        Executor(tiny_export, "tensorrt", "fp32")


def test_doctor_without_tensorrt(no_tensorrt, capsys):
    from trt_exit.cli import main

    assert main(["doctor", "--skip-self-test"]) == 0
    out = capsys.readouterr().out
    assert "tensorrt" in out and "not installed" in out and "ONNX Runtime path works" in out
    assert main(["doctor", "--skip-self-test", "--require-tensorrt"]) == 1
    assert "--require-tensorrt given and TensorRT is missing" in capsys.readouterr().out


@pytest.mark.slow
def test_doctor_self_test_runs_every_precision_on_onnxruntime(no_tensorrt, tmp_path, capsys):
    from trt_exit.cli import main

    report = tmp_path / "doctor.json"
    assert main(["doctor", "--json", str(report)]) == 0
    out = capsys.readouterr().out
    for precision in ("fp32", "fp16", "int8"):
        assert f"[ok  ] onnxruntime {precision}" in out
    checks = json.loads(report.read_text())["checks"]
    assert [c["ok"] for c in checks if c["name"].startswith("onnxruntime")] == [True] * 3
    assert [c["ok"] for c in checks if c["name"] == "tensorrt"] == [None]  # skipped, not failed


def test_deploy_copy_is_a_complete_model_directory(with_engine, tmp_path):
    from trt_exit.build.builder import deploy_copy

    manifest, _ = with_engine
    out = tmp_path / "engines" / "tiny"
    copy = deploy_copy(manifest, out)
    assert copy.root == out.resolve()
    Manifest.load(out, verify=True).checkpoint_path()  # every graph and the checkpoint verify
    assert copy.stage("segment_0").engines == {}  # engines stay where they were built
    # A second copy keeps the engine records already in the output directory.
    key = "fp16-0123456789abcdef"
    copy.stage("segment_0").engines[key] = {
        "precision": "fp16", "file": {"path": f"engines/segment_0.{key}.engine",
                                      "sha256": "0" * 64, "bytes": 0}}
    copy.save()
    again = deploy_copy(manifest, out)
    assert key in again.stage("segment_0").engines


def test_version_compatible_engines_embed_the_lean_runtime_and_say_so():
    """Build and load agree: the plan keeps TensorRT's lean runtime (no EXCLUDE_LEAN_RUNTIME,
    which would need IRuntime.load_runtime at every load), the record and key say so, and a
    version-compatible record without it (built before) is not loaded by a newer TensorRT."""
    import ast
    from pathlib import Path

    import trt_exit.build.steps as steps

    flags = {node.attr for node in ast.walk(ast.parse(Path(steps.__file__).read_text()))
             if isinstance(node, ast.Attribute)}
    assert "VERSION_COMPATIBLE" in flags and "EXCLUDE_LEAN_RUNTIME" not in flags
    options = BuildConfig(version_compatible=True).engine_options()
    assert options["lean_runtime"] == "embedded"
    assert "lean_runtime" not in BuildConfig().engine_options()  # other keys are unchanged
    before = {k: v for k, v in options.items() if k != "lean_runtime"}
    assert engine_key("a" * 64, "fp16", ORIN_TRT10, options) != \
        engine_key("a" * 64, "fp16", ORIN_TRT10, before)
    newer = dataclasses.replace(ORIN_TRT10, tensorrt="10.7.0")
    record = {"precision": "fp16", "target": ORIN_TRT10.to_dict(), **options}
    assert runs_on(record, newer)
    assert not runs_on({**record, "lean_runtime": None}, newer)
    assert runs_on({**record, "lean_runtime": None}, ORIN_TRT10)  # same version: still fine


def test_dla_builds_use_a_static_profile():
    dla = BuildConfig(dla_core=0, profile=BatchProfile(1, 2, 8))
    assert dla.profile == BatchProfile(2, 2, 2) and dla.profile.static
    assert dla.engine_options()["profile"] == {"min_batch": 2, "opt_batch": 2, "max_batch": 2}
    assert BuildConfig(profile=BatchProfile(1, 2, 8)).profile == BatchProfile(1, 2, 8)


def test_dla_layers_are_counted_from_the_engine_inspector_json():
    from trt_exit.build.steps import count_dla_layers

    gpu_only = '{"Layers": [{"Name": "matmul", "LayerType": "MatrixMultiply"}, "softmax"]}'
    assert count_dla_layers(gpu_only) == (0, 2)
    mixed = ('{"Layers": ["input to nvm", {"Name": "{ForeignNode[conv...relu]}", '
             '"LayerType": "DLA"}, {"Name": "out from nvm", "TacticName": "DLA copy"}, '
             '{"Name": "softmax", "LayerType": "Softmax"}]}')
    assert count_dla_layers(mixed) == (2, 4)
    assert count_dla_layers("") == (0, 0)
