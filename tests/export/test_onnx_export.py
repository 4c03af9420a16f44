"""Per-stage ONNX export: files, names, dynamic batch, parity, atomicity, bad files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from trt_exit import tensor_names as tn
from trt_exit.errors import ArtifactError, ManifestError
from trt_exit.export import parity
from trt_exit.export.onnx_export import check_onnx_file, export_model
from trt_exit.manifest import Manifest
from trt_exit.runtime.executor import Executor
from trt_exit.runtime.policies import AllExitsPolicy


def test_export_writes_one_checked_graph_per_stage(tiny_export):
    manifest = Manifest.load(tiny_export, verify=True)
    names = [s.name for s in manifest.stages]
    assert names == ["segment_0", "exit_0", "segment_1", "exit_1", "segment_2", "exit_2"]
    for stage in manifest.stages:
        path = manifest.onnx_path(stage)
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
        graph_in = [i.name for i in model.graph.input]
        graph_out = [o.name for o in model.graph.output]
        assert graph_in == stage.input_names() and graph_out == stage.output_names()
        # every tensor has a symbolic (dynamic) batch dimension
        for value in list(model.graph.input) + list(model.graph.output):
            assert value.type.tensor_type.shape.dim[0].dim_param == "batch"
        assert model.opset_import[0].version == 17
    exit_1 = manifest.exit_stage(1)
    assert exit_1.input_names() == [tn.tokens(1)]
    assert exit_1.output_names() == [tn.exit_output(1), tn.exit_confidence(1)]
    assert exit_1.exit_type == "slvit"
    assert [e.after_block for e in manifest.exits] == [1, 2, 3]
    assert manifest.full_model_path().is_file()
    assert {i.name: i.shape for i in manifest.inputs} == {"image": [-1, 1, 8, 8]}


def test_parity_is_recorded_and_within_1e4(tiny_export):
    manifest = Manifest.load(tiny_export)
    record = manifest.parity["fp32"]
    assert record["ok"] and record["output_tolerance"] == 1e-4
    assert record["max_output_diff"] <= 1e-4
    assert {r["stage"] for r in record["stages"]} >= {"segment_0", "exit_2", "full"}


@pytest.mark.parametrize("batch", [1, 7])
def test_chained_onnx_matches_pytorch_end_to_end(tiny_export, tiny_model, digits, batch):
    x = digits["test"].inputs["image"][:batch]
    with Executor(tiny_export, policy=AllExitsPolicy()) as executor:
        results = executor.run(x)
        full = executor.run_full_model(x)
    with torch.no_grad():
        reference = [o.numpy() for o in tiny_model(torch.from_numpy(x))]
    for k, ref in enumerate(reference):
        assert np.abs(results.all_outputs[k] - ref).max() <= 1e-4
    assert np.abs(full.output - reference[-1]).max() <= 1e-4


def test_failed_export_leaves_the_previous_export_intact(tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "model"
    first = export_model(tiny_model, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def broken(*args, **kwargs):
        raise parity.ParityError("injected parity failure")

    monkeypatch.setattr(parity, "check_stages", broken)
    with pytest.raises(parity.ParityError, match="injected"):
        export_model(tiny_model, out)
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # nothing replaced, no temp files or staging dirs left
    assert not list(out.glob(".export-*"))
    Manifest.load(out, verify=True)
    assert first.stages[0].onnx["fp32"].sha256 == Manifest.load(out).stages[0].onnx["fp32"].sha256


def test_parity_failure_names_the_stage():
    reference = {"exit_0_output": np.zeros((2, 3), np.float32)}
    candidate = {"exit_0_output": np.full((2, 3), 1e-3, np.float32)}
    with pytest.raises(parity.ParityError, match=r"exit_0\.exit_0_output differs by 0\.001"):
        parity.check_stages(["exit_0"], lambda n, v: reference, lambda n, v: candidate, {})


def test_truncated_onnx_is_a_clear_error(tiny_export, fresh_copy):
    copy = fresh_copy(tiny_export)
    path = copy / "onnx" / "fp32" / "segment_1.onnx"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ArtifactError, match="segment_1.onnx"):
        check_onnx_file(path)
    with pytest.raises(ManifestError, match=r"segment_1\.onnx does not match .*truncated"):
        Executor(copy)


def test_sample_inputs_of_the_wrong_shape_are_refused(tiny_model, tmp_path):
    from trt_exit.errors import ConfigError

    with pytest.raises(ConfigError, match=r"sample input 'image' must have shape \(B, 1, 8, 8\)"):
        export_model(tiny_model, tmp_path, sample_inputs={"image": np.zeros((2, 1, 9, 9), np.float32)})
