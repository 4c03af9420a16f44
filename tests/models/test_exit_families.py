"""Every exit family: builds at any position, trains on digits, exports per stage to ONNX and
runs through the host executor on ONNX Runtime with the same numbers as PyTorch.

To keep the suite fast, two models carry every family at once and are trained and exported
once per session: a tiny ViT with one exit of each token family (BoF at two positions and as
the final head, so histograms pass over other exits and into the head) and a tiny CNN with the
feature-map families. The tests are still one per family.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from trt_exit.errors import ConfigError
from trt_exit.models import ExitSpec, build_model, model_config
from trt_exit.training.trainer import TrainConfig

#: The token model: (position, family); its final head is a BoF exit too.
VIT_EXITS = [(1, "mlp"), (2, "bof"), (3, "cnn_ignore"), (4, "cnn_add"), (5, "bof"),
             (6, "cnn_project"), (7, "vitee"), (8, "mixer"), (9, "resmlp"), (10, "slvit")]
#: The CNN model: (position, family); its final head is ``cnn_head``.
CNN_EXITS = [(1, "slvit_cnn"), (2, "bof"), (3, "cnn_ignore")]
#: Every (model, exit index, family) under test, the final heads included.
CASES = ([("vit", k, f) for k, (_, f) in enumerate(VIT_EXITS)] + [("vit", 10, "bof_head")]
         + [("cnn", k, f) for k, (_, f) in enumerate(CNN_EXITS)] + [("cnn", 3, "cnn_head")])
CASE_IDS = [f"{m}-{k}-{f}" for m, k, f in CASES]
#: Two steps of end-to-end training (batch 64 of 128 samples): a smoke test, not a recipe.
SMOKE_TRAIN = TrainConfig(epochs=1, batch_size=64, lr=3e-3, warmup_epochs=0, seed=0)
BOF_INDICES = [1, 4, 10]


def vit_config():
    return model_config(
        "multi_exit_vit_tiny_test",
        backbone_options=dict(img_size=8, patch_size=2, in_chans=1, embed_dim=16, depth=11,
                              num_heads=2, mlp_ratio=2.0),
        exits=[ExitSpec(p, f, {"codewords": 8} if f == "bof" else {}) for p, f in VIT_EXITS],
        head=ExitSpec(0, "bof", {"codewords": 8}),
    )


def cnn_config():
    return model_config(
        "multi_exit_cnn_tiny_test",
        backbone_options=dict(img_size=8, in_chans=1, width=8, depth=4, num_heads=2),
        exits=[ExitSpec(p, f, {"codewords": 8} if f == "bof" else {}) for p, f in CNN_EXITS],
    )


def _smoke_trained(config, digits):
    from trt_exit.models.exits.bof import bof_exits, measure_mean_activations
    from trt_exit.training.trainer import seed_everything, train

    seed_everything(0)
    model = build_model(config)
    initial = copy.deepcopy(model.state_dict())
    small = digits["train"].subset(np.arange(128))
    train(model, small, SMOKE_TRAIN, progress=False)
    if bof_exits(model):
        measure_mean_activations(model, small)
    return model.eval(), initial


@pytest.fixture(scope="session")
def trained(digits):
    """Both models after two training steps, with their initial weights."""
    return {"vit": _smoke_trained(vit_config(), digits),
            "cnn": _smoke_trained(cnn_config(), digits)}


@pytest.fixture(scope="session")
def exported(trained, digits, tmp_path_factory):
    """Both models exported (per-stage ONNX, parity checked on 32 real validation digits)."""
    from trt_exit.export.onnx_export import export_model

    sample = {"image": digits["val"].inputs["image"][:32]}
    out = {}
    for name, (model, _) in trained.items():
        directory = tmp_path_factory.mktemp(f"families_{name}")
        out[name] = export_model(model, directory, sample_inputs=sample)
    return out


@pytest.fixture(scope="session")
def reference(trained, digits):
    """PyTorch outputs and confidences of every exit on 48 test digits."""
    images = digits["test"].inputs["image"][:48]
    out = {}
    for name, (model, _) in trained.items():
        with torch.no_grad():
            outputs = model(torch.from_numpy(images))
            confidences = model.confidences(outputs)
        out[name] = (images, [o.numpy() for o in outputs], [c.numpy() for c in confidences])
    return out


# --------------------------------------------------------------------------- per family


@pytest.mark.parametrize("family", ["mlp", "cnn_ignore", "cnn_add", "cnn_project", "vitee",
                                   "mixer", "resmlp", "slvit", "bof"])
def test_token_family_builds_at_any_position(family):
    config = model_config("multi_exit_vit_tiny_test",
                          exits=[ExitSpec(1, family), ExitSpec(2, family)])
    model = build_model(config).eval()
    outputs = model(torch.randn(3, 1, 8, 8))
    assert [tuple(o.shape) for o in outputs] == [(3, 10)] * 3
    confidences = model.confidences(outputs)
    assert all(((c >= 0) & (c <= 1)).all() for c in confidences)


@pytest.mark.parametrize("model_name,index,family", CASES, ids=CASE_IDS)
def test_family_trains_on_digits(trained, model_name, index, family):
    model, initial = trained[model_name]
    prefix = f"exits.{index}."
    changed = [name for name, value in model.state_dict().items()
               if name.startswith(prefix) and value.dtype.is_floating_point
               and not torch.equal(value, initial[name])]
    assert changed, f"no parameter of exit {index} ({family}) changed in two training steps"


@pytest.mark.parametrize("model_name,index,family", CASES, ids=CASE_IDS)
def test_family_exit_graph_matches_pytorch(exported, reference, model_name, index, family):
    from trt_exit.runtime.executor import Executor
    from trt_exit.runtime.policies import FixedExitPolicy

    manifest = exported[model_name]
    record = next(r for r in manifest.parity["fp32"]["stages"] if r["stage"] == f"exit_{index}")
    assert record["ok"]
    assert manifest.exits[index].type == family.replace("bof_head", "bof")
    images, outputs, confidences = reference[model_name]
    with Executor(manifest, "onnxruntime", policy=FixedExitPolicy(index)) as executor:
        result = executor.run(images)
    assert (result.exit_index == index).all()
    np.testing.assert_allclose(result.output, outputs[index], atol=1e-4, rtol=0)
    np.testing.assert_allclose(result.confidence, confidences[index], atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_name", ["vit", "cnn"])
def test_all_exits_and_thresholds_through_executor(exported, reference, model_name):
    from trt_exit.runtime.executor import Executor
    from trt_exit.runtime.policies import AllExitsPolicy, ThresholdPolicy

    manifest = exported[model_name]
    images, outputs, confidences = reference[model_name]
    with Executor(manifest, "onnxruntime") as executor:
        everything = executor.run(images, AllExitsPolicy())
        np.testing.assert_allclose(everything.all_outputs, np.stack(outputs), atol=1e-4, rtol=0)
        np.testing.assert_allclose(everything.all_confidences, np.stack(confidences), atol=1e-5,
                                   rtol=0)
        # Thresholds at each exit's median confidence: about half the samples leave at exit 0.
        thresholds = [float(np.median(c)) for c in confidences[:-1]]
        result = executor.run(images, ThresholdPolicy(thresholds))
    conf = np.stack(confidences)  # (E, B)
    passes = np.vstack([conf[:-1] >= np.array(thresholds)[:, None], np.ones((1, len(images)), bool)])
    expected = passes.argmax(axis=0)
    np.testing.assert_array_equal(result.exit_index, expected)
    np.testing.assert_allclose(result.output, np.stack(outputs)[expected, np.arange(len(images))],
                               atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- BoF


def test_bof_histograms_pass_from_exit_to_exit(exported, trained):
    manifest = exported["vit"]
    stage_inputs = {k: [t.name for t in manifest.exit_stage(k).inputs] for k in BOF_INDICES}
    assert stage_inputs == {1: ["tokens_1"], 4: ["tokens_4", "exit_1_state"],
                            10: ["tokens_10", "exit_4_state"]}
    assert [t.name for t in manifest.exit_stage(4).outputs][-1] == "exit_4_state"
    model, _ = trained["vit"]
    assert [model.exits[k].level for k in BOF_INDICES] == [1, 2, 3]
    assert model.exits[1].classifier is model.exits[4].classifier is model.exits[10].classifier


def test_bof_fixed_exit_and_baseline_run_the_histogram_providers(exported, reference):
    from trt_exit.runtime.executor import Executor
    from trt_exit.runtime.policies import FixedExitPolicy

    images, outputs, _ = reference["vit"]
    with Executor(exported["vit"], "onnxruntime") as executor:
        second = executor.run(images, FixedExitPolicy(4))
        full = executor.run_full_model(images)
        one = executor.run(images[:1], FixedExitPolicy(-1))
    np.testing.assert_allclose(second.output, outputs[4], atol=1e-4, rtol=0)
    np.testing.assert_allclose(full.output, outputs[-1], atol=1e-4, rtol=0)
    np.testing.assert_allclose(one.output, outputs[-1][:1], atol=1e-4, rtol=0)


def test_each_bof_graph_has_its_copy_of_the_shared_classifier(exported, trained):
    import onnx
    from onnx import numpy_helper

    model, _ = trained["vit"]
    weight = model.exits[1].classifier.fc.weight.detach().numpy()  # (K, M)
    for k in BOF_INDICES:
        path = exported["vit"].root / exported["vit"].exit_stage(k).onnx["fp32"].path
        graph = onnx.load(str(path)).graph
        tensors = [numpy_helper.to_array(t) for t in graph.initializer]
        assert any(t.shape == weight.shape and np.allclose(t, weight) or
                   t.shape == weight.T.shape and np.allclose(t, weight.T) for t in tensors), k


def test_bof_confidence_is_the_papers_activation_ratio(trained, reference):
    from trt_exit.models.exits.bof import ACTIVATION_RATIO, beta_threshold

    model, _ = trained["vit"]
    _, outputs, confidences = reference["vit"]
    for k in BOF_INDICES:
        head = model.exits[k]
        assert head.confidence_measure == ACTIVATION_RATIO
        mean = float(head.mean_activation)
        assert mean != 1.0 and 0 < mean <= 1  # measured on training data
        activation = torch.from_numpy(outputs[k]).softmax(-1).amax(-1).numpy()
        for beta in (0.5, 1.0, 1.5):
            exits = confidences[k] >= beta_threshold(beta)
            np.testing.assert_array_equal(exits, activation >= beta * mean - 1e-6)
    assert beta_threshold(1.0) == 0.5


def test_bof_checkpoint_stores_the_shared_classifier_once(trained, tmp_path):
    from safetensors import safe_open

    from trt_exit.models.checkpoint import load_checkpoint, save_checkpoint

    model, _ = trained["vit"]
    path = save_checkpoint(model, tmp_path / "bof.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        assert len([k for k in handle.keys() if k.endswith("classifier.fc.weight")]) == 1
    loaded = load_checkpoint(path)
    assert loaded.exits[1].classifier is loaded.exits[10].classifier
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        for a, b in zip(model(x), loaded(x)):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert float(loaded.exits[4].mean_activation) == float(model.exits[4].mean_activation)


def test_bof_needs_the_previous_histogram():
    model = build_model(model_config("multi_exit_vit_tiny_test",
                                     exits=[ExitSpec(1, "bof"), ExitSpec(2, "bof")]))
    tokens = torch.randn(2, model.backbone.num_tokens, model.backbone.embed_dim)
    with pytest.raises(ConfigError, match="needs the histogram sum"):
        model.exits[1](tokens)


def test_bof_codebook_init_and_calibration_read_real_features(digits):
    from trt_exit.models.exits.bof import init_codebooks_from_data, measure_mean_activations

    model = build_model(model_config("multi_exit_vit_tiny_test",
                                     exits=[ExitSpec(1, "bof", {"codewords": 16})]))
    init_codebooks_from_data(model, {"image": digits["train"].inputs["image"][:32]}, seed=0)
    codebook = model.exits[0].bof.codebook.detach()
    # Codewords are LayerNorm-ed features: zero mean and unit variance over the channels.
    torch.testing.assert_close(codebook.mean(dim=1), torch.zeros(16), atol=1e-4, rtol=0)
    measured = measure_mean_activations(model, digits["val"].subset(np.arange(64)))
    assert set(measured) == {0} and 0.1 <= measured[0] <= 1.0


# --------------------------------------------------------------------------- wrong places


@pytest.mark.parametrize("config,match", [
    (lambda: model_config("multi_exit_cnn_tiny_test", exits=[ExitSpec(1, "cnn_add")]),
     "reads tokens"),
    (lambda: model_config("multi_exit_cnn_tiny_test", exits=[ExitSpec(1, "vitee")]),
     "reads tokens"),
    (lambda: model_config("multi_exit_cnn_tiny_test", exits=[ExitSpec(1, "slvit")]),
     "reads tokens"),
    (lambda: model_config("multi_exit_vit_tiny_test", exits=[ExitSpec(1, "slvit_cnn")]),
     "reads map"),
    (lambda: model_config("multi_exit_vit_tiny_test", head=ExitSpec(0, "cnn_head")),
     "reads map"),
    (lambda: model_config("multi_exit_cnn_tiny_test",
                          exits=[ExitSpec(1, "slvit_cnn", {"patch_size": 3})]), "must divide"),
    (lambda: model_config("multi_exit_vit_tiny_test",
                          exits=[ExitSpec(1, "bof", {"codewords": 8}),
                                 ExitSpec(2, "bof", {"codewords": 16})]), "same number"),
    (lambda: model_config("multi_exit_cnn_tiny_test", exits=[ExitSpec(1, "mlp")]),
     "reads tokens"),
    (lambda: model_config("multi_exit_cnn_tiny_test", head=ExitSpec(0, "vit_head")),
     "reads tokens"),
    (lambda: model_config("multi_exit_cnn_tiny_test",
                          head=ExitSpec(0, "vit_head", {"pool": "avg"})), "reads tokens"),
], ids=["cnn_add-on-cnn", "vitee-on-cnn", "slvit-on-cnn", "slvit_cnn-on-vit", "cnn_head-on-vit",
        "slvit_cnn-patch", "bof-codewords", "mlp-on-cnn", "vit_head-on-cnn", "vit_head-avg-on-cnn"])
def test_family_in_the_wrong_place_is_a_clear_error(config, match):
    with pytest.raises(ConfigError, match=match):
        build_model(config())


def test_cnn_backbone_rejects_inconsistent_options():
    with pytest.raises(ConfigError, match="num_heads"):
        build_model(dataclasses.replace(cnn_config(), backbone_options=dict(width=6, num_heads=4)))
