"""The single early-exit graph: composed from the stage graphs, written by export / precision /
tune, and making the host executor's decisions for every batch size."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from trt_exit import tensor_names as tn
from trt_exit.errors import ManifestError
from trt_exit.export.early_exit_graph import ChainPlan, plan_chain
from trt_exit.manifest import Manifest
from trt_exit.runtime.executor import Executor
from trt_exit.runtime.policies import AllExitsPolicy, FixedExitPolicy, ThresholdPolicy


def graph_session(manifest: Manifest, precision: str = "fp32"):
    import onnxruntime as ort

    return ort.InferenceSession(str(manifest.early_exit_graph_path(precision)),
                                providers=["CPUExecutionProvider"])


def assert_same_as_stages(manifest, images, policy, batch_sizes, precision="fp32"):
    """Every sample: the same exit and output from the single graph as from the stages
    (without compaction), at every batch size."""
    with Executor(manifest, precision=precision, compact=False) as executor:
        for size in batch_sizes:
            for start in range(0, len(images), size):
                x = images[start : start + size]
                stages = executor.run(x, policy, "stages")
                graph = executor.run(x, policy, "single_graph")
                assert graph.strategy == "single_graph" and stages.strategy == "stages"
                np.testing.assert_array_equal(graph.exit_index, stages.exit_index)
                np.testing.assert_allclose(graph.output, stages.output, rtol=0, atol=1e-5)
                np.testing.assert_allclose(graph.confidence, stages.confidence, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def images(digits):
    return digits["test"].inputs["image"]


@pytest.fixture(scope="module")
def confidences(tiny_tuned, images):
    with Executor(tiny_tuned) as executor:
        return executor.run(images, AllExitsPolicy()).all_confidences


def test_export_and_tune_write_the_graph_with_the_tuned_thresholds(tiny_export, tiny_tuned):
    import onnx
    from onnx import numpy_helper

    untuned, tuned = Manifest.load(tiny_export, verify=True), Manifest.load(tiny_tuned, verify=True)
    for manifest, decisions in ((untuned, ()), (tuned, (0, 1))):
        assert manifest.early_exit_graph["fp32"].path == "onnx/fp32/early_exit.onnx"
        model = onnx.load(str(manifest.early_exit_graph_path("fp32")))
        onnx.checker.check_model(model, full_check=True)
        stage = onnx.load(str(manifest.onnx_path(manifest.stages[0])))
        assert [(o.domain, o.version) for o in model.opset_import] == \
            [(o.domain, o.version) for o in stage.opset_import]
        defaults = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        assert tn.THRESHOLDS in [i.name for i in model.graph.input]  # overridable
        props = {p.key: p.value for p in model.metadata_props}
        assert ChainPlan.from_metadata(props) == plan_chain(manifest, manifest.thresholds())
        assert ChainPlan.from_metadata(props).decisions == decisions
        expected = [np.inf] * 2 if not decisions else manifest.thresholds()
        np.testing.assert_array_equal(defaults[tn.THRESHOLDS], np.float32(expected))
        assert [o.name for o in model.graph.output] == [
            tn.EARLY_EXIT_OUTPUT, tn.EARLY_EXIT_CONFIDENCE, tn.EARLY_EXIT_INDEX]
        assert manifest.parity["fp32"]["early_exit_graph"]["results_compared"] > 0


@pytest.mark.parametrize("sizes", [(1, 2, 3, 7, 64, 360)])
def test_same_exits_and_outputs_as_the_stages_at_every_batch_size(tiny_tuned, images, sizes):
    manifest = Manifest.load(tiny_tuned)
    policy = ThresholdPolicy(manifest.thresholds())
    assert_same_as_stages(manifest, images, policy, sizes)


def test_other_thresholds_disabled_exits_and_fixed_exits(tiny_tuned, images, confidences):
    manifest = Manifest.load(tiny_tuned)
    medians = [float(np.median(confidences[k])) for k in range(2)]
    for policy in (ThresholdPolicy(medians), ThresholdPolicy([None, medians[1]]),
                   ThresholdPolicy([medians[0], None]), ThresholdPolicy([None, None]),
                   FixedExitPolicy(0), FixedExitPolicy(1), FixedExitPolicy(-1)):
        assert_same_as_stages(manifest, images[:96], policy, (1, 5, 96))
    # every exit taken by some sample under the medians: the branches all ran
    with Executor(manifest) as executor:
        taken = executor.run(images, ThresholdPolicy(medians), "single_graph").exit_index
    assert set(taken.tolist()) == {0, 1, 2}


def test_thresholds_input_overrides_the_default(tiny_tuned, images, confidences):
    manifest = Manifest.load(tiny_tuned)
    session = graph_session(manifest)
    medians = np.float32([np.median(confidences[0]), np.median(confidences[1])])
    _, _, index = session.run(None, {"image": images, tn.THRESHOLDS: medians})
    with Executor(manifest, compact=False) as executor:
        expected = executor.run(images, ThresholdPolicy(medians.tolist()), "stages")
    np.testing.assert_array_equal(index, expected.exit_index)
    _, _, never = session.run(None, {"image": images, tn.THRESHOLDS: np.float32([2, 2])})
    assert (never == 2).all()  # above 1: no sample exits early


def test_a_nan_confidence_never_exits(tiny_tuned, images):
    """NaN >= t is False: the sample goes on (as the executor's gate decides)."""
    manifest = Manifest.load(tiny_tuned)
    session = graph_session(manifest)
    x = images[:4].copy()
    x[1, 0, 0, 0] = np.nan
    _, confidence, index = session.run(None, {"image": x, tn.THRESHOLDS: np.float32([0, 0])})
    assert np.isnan(confidence[1]) and index[1] == 2
    assert (index[[0, 2, 3]] == 0).all()  # threshold 0: the others stop at once


def test_tune_rewrites_the_graph_under_the_manifest_lock(tiny_tuned, fresh_copy, monkeypatch):
    import trt_exit.manifest as manifest_module
    from trt_exit.export.early_exit_writer import write_early_exit_graphs

    root = fresh_copy(tiny_tuned)
    manifest = Manifest.load(root)
    before = manifest.early_exit_graph["fp32"]
    # as tune records it when exit 0 does not pay for itself
    manifest.tuning["fp32"]["best"]["thresholds"][0] = None
    manifest.save()
    path = manifest.early_exit_graph_path("fp32")
    original_bytes = path.read_bytes()
    real_lock, asked = manifest_module.manifest_lock, threading.Event()

    def watched_lock(*args, **kwargs):
        asked.set()
        return real_lock(*args, **kwargs)

    monkeypatch.setattr(manifest_module, "manifest_lock", watched_lock)
    done = threading.Event()
    with real_lock(root):  # another writer holds the manifest
        writer = threading.Thread(target=lambda: (write_early_exit_graphs(manifest), done.set()))
        writer.start()
        assert asked.wait(60)
        time.sleep(0.5)
        assert not done.is_set() and path.read_bytes() == original_bytes
        assert Manifest.load(root).early_exit_graph["fp32"] == before
    writer.join(60)
    assert done.is_set()
    reloaded = Manifest.load(root, verify=True)
    assert reloaded.early_exit_graph["fp32"].sha256 != before.sha256
    with Executor(reloaded) as executor:
        plan = executor._file_graph().plan
    assert plan.decisions == (1,) and plan.heads == (1, 2)  # exit 0's head is not in it


def test_a_changed_graph_file_is_refused(tiny_tuned, fresh_copy, images):
    root = fresh_copy(tiny_tuned)
    manifest = Manifest.load(root)
    path = manifest.early_exit_graph_path("fp32")
    path.write_bytes(path.read_bytes()[:-4] + b"\0\0\0\0")
    with Executor(manifest) as executor:
        with pytest.raises(ManifestError, match="early-exit graph .*does not match"):
            executor.run(images[:1], strategy="single_graph")
    with pytest.raises(ManifestError, match="early_exit_graph.fp32.path"):
        data = manifest.to_dict()
        data["early_exit_graph"]["fp32"]["path"] = "../outside.onnx"
        Manifest.from_dict(data, root)


# --------------------------------------------------------------------------- state handed along


@pytest.fixture(scope="module")
def bof_export(digits, tmp_path_factory):
    """A tiny ViT whose BoF exits hand their histogram along (exit 0 -> exit 2 -> the head)."""
    import torch

    from trt_exit.export.onnx_export import export_model
    from trt_exit.models import ExitSpec, build_model, model_config

    torch.manual_seed(0)
    config = model_config(
        "multi_exit_vit_tiny_test",
        backbone_options=dict(img_size=8, patch_size=2, in_chans=1, embed_dim=16, depth=4,
                              num_heads=2, mlp_ratio=2.0),
        exits=[ExitSpec(1, "bof", {"codewords": 8}), ExitSpec(2, "mlp"),
               ExitSpec(3, "bof", {"codewords": 8})],
        head=ExitSpec(0, "bof", {"codewords": 8}))
    model = build_model(config).eval()
    sample = {"image": digits["val"].inputs["image"][:32]}
    return export_model(model, tmp_path_factory.mktemp("bof_graph"), sample_inputs=sample)


def test_state_providers_run_even_when_their_exit_is_disabled(bof_export, images):
    manifest = bof_export
    assert [t.name for t in manifest.exit_stage(2).inputs] == ["tokens_2", "exit_0_state"]
    plan = plan_chain(manifest, [None, 0.5, None])
    assert plan.decisions == (1,) and plan.heads == (0, 1, 2, 3)  # 0 and 2 hand on histograms
    assert plan_chain(manifest, None, final=1).heads == (1,)
    assert plan_chain(manifest, None, final=2).heads == (0, 2)
    with Executor(manifest) as executor:
        conf = executor.run(images[:96], AllExitsPolicy()).all_confidences
    medians = [float(np.median(conf[k])) for k in range(3)]
    for policy in (ThresholdPolicy(medians), ThresholdPolicy([None, medians[1], None]),
                   ThresholdPolicy([None, None, medians[2]]), FixedExitPolicy(2)):
        assert_same_as_stages(manifest, images[:96], policy, (1, 7, 96))


def test_tune_gives_a_directory_exported_before_the_single_graph_its_graph(tiny_tuned, digits,
                                                                          fresh_copy):
    from trt_exit.workflow import tune_step

    root = fresh_copy(tiny_tuned)
    manifest = Manifest.load(root)
    manifest.early_exit_graph_path("fp32").unlink()
    manifest.early_exit_graph.clear()
    manifest.tuning["fp32"].pop("strategy")
    manifest.save()
    tune_step(Manifest.load(root), digits["val"], max_loss=0.02, profile_repeats=5)
    upgraded = Manifest.load(root, verify=True)
    assert list(upgraded.early_exit_graph) == ["fp32"]
    assert upgraded.tuning["fp32"]["strategy"]["default"] in ("stages", "single_graph")


def test_a_graph_built_from_other_stage_graphs_is_not_run(tiny_tuned, fresh_copy, images):
    """A stage graph replaced since (its new hash recorded): the single graph no longer holds
    what the manifest lists. auto runs the stages; asking for the graph is an error."""
    import onnx

    from trt_exit.fileio import sha256_file
    from trt_exit.runtime.single_graph import StaleGraphError

    root = fresh_copy(tiny_tuned)
    manifest = Manifest.load(root)
    manifest.tuning["fp32"]["strategy"] = {"default": "single_graph", "single_graph_max_batch": 1}
    stage = manifest.exit_stage(0)
    path = manifest.onnx_path(stage)
    model = onnx.load(str(path))
    model.doc_string = "replaced"
    onnx.save(model, str(path))
    stage.onnx["fp32"].sha256, stage.onnx["fp32"].bytes = sha256_file(path), path.stat().st_size
    manifest.save()
    with Executor(root) as executor:
        assert executor.run(images[:1]).strategy == "stages"
        with pytest.raises(StaleGraphError, match="built from other fp32 stage graphs"):
            executor.run(images[:1], strategy="single_graph")
        fixed = executor.run(images[:1], FixedExitPolicy(1), strategy="single_graph")
        assert fixed.strategy == "single_graph"  # composed anew from the stage graphs listed
