"""Cumulative exit ensembles (Zero Time Waste): the ensemble is computed inside the exported exit
graphs through the exit-state tensors, so ONNX Runtime gives what PyTorch gives, and every
executor path (an exit disabled, a batch splitting) runs its predecessors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from trt_exit import tensor_names as tn
from trt_exit.errors import ConfigError
from trt_exit.models import ExitSpec, create_model
from trt_exit.runtime.policies import AllExitsPolicy, ThresholdPolicy
from trt_exit.training.trainer import TrainConfig, seed_everything, train

ENSEMBLE_EXITS = [ExitSpec(1, "ensemble"), ExitSpec(2, "ensemble", {"base": "slvit"})]


@pytest.fixture(scope="module")
def ensemble_model(digits):
    seed_everything(0)
    model = create_model("multi_exit_vit_tiny_test", exits=ENSEMBLE_EXITS)
    train(model, digits["train"], TrainConfig(epochs=3, lr=1e-2, warmup_epochs=0, batch_size=128,
                                              augment_shift_px=0, calibrate=True),
          val_set=digits["val"], progress=False)
    return model.eval()


@pytest.fixture(scope="module")
def ensemble_export(ensemble_model, digits, tmp_path_factory):
    from trt_exit.workflow import export_step

    out = tmp_path_factory.mktemp("ensemble")
    return export_step(ensemble_model, out, digits, {"name": "digits", "seed": 0})


def test_the_ensemble_is_the_documented_combination(ensemble_model, digits):
    model = ensemble_model
    x = torch.from_numpy(digits["val"].inputs["image"][:16])
    with torch.no_grad():
        outputs = model(x)
        tokens, own = x, []
        for k in range(2):
            tokens = model.run_segment(k, tokens)
            own.append(model.exits[k].base(tokens).log_softmax(-1))
    for k in range(2):
        head = model.exits[k]
        members = torch.stack(own[: k + 1], dim=1)  # (B, k+1, K)
        expected = ((members * head.member_weights[None, :, None]).sum(1) + head.bias)
        torch.testing.assert_close(outputs[k], expected / head.temperature, rtol=1e-5, atol=1e-5)
    # Training moved the weights away from "own member only".
    assert float(model.exits[1].member_weights[0].detach().abs()) > 1e-3


def test_exported_ensemble_exits_match_pytorch(ensemble_model, ensemble_export, digits):
    """ONNX Runtime's outputs, confidences and states against the trained PyTorch model."""
    from trt_exit.runtime.executor import Executor

    manifest = ensemble_export
    exit_1 = manifest.exit_stage(1)
    assert [t.name for t in exit_1.inputs] == [tn.tokens(1), tn.exit_state(0)]
    assert tn.exit_state(0) in [t.name for t in manifest.exit_stage(0).outputs]
    x = digits["test"].inputs["image"][:100]
    with torch.no_grad():
        expected = ensemble_model(torch.from_numpy(x))
        confidences = ensemble_model.confidences(expected)
    with Executor(manifest) as executor:
        result = executor.run(x, AllExitsPolicy())
    for k in range(3):
        np.testing.assert_allclose(result.all_outputs[k], expected[k].numpy(), atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(result.all_confidences[k], confidences[k].numpy(), atol=1e-5)


@pytest.mark.parametrize("batch", [1, 37])
def test_a_disabled_ensemble_exit_still_feeds_the_next(ensemble_model, ensemble_export, digits,
                                                       batch):
    """Exit 0 disabled, exit 1 enabled: the executor runs exit 0's head for its state, and the
    samples leaving at exit 1 get exactly the ensemble PyTorch computes."""
    from trt_exit.runtime.executor import Executor

    x = digits["test"].inputs["image"][:batch]
    with torch.no_grad():
        expected = [o.numpy() for o in ensemble_model(torch.from_numpy(x))]
        confidence = ensemble_model.confidences([torch.from_numpy(e) for e in expected])[1].numpy()
    # Halfway between two samples' confidences (far from both: ONNX and torch round apart).
    ordered = np.sort(confidence)
    gaps = np.diff(ordered) if batch > 1 else np.array([1.0])
    i = int(np.argmax(gaps)) if batch > 1 else 0
    threshold = float((ordered[i] + ordered[i + 1]) / 2) if batch > 1 else float(ordered[0]) - 1e-3
    with Executor(ensemble_export) as executor:
        result = executor.run(x, ThresholdPolicy([None, threshold]))
    leave = confidence >= threshold
    np.testing.assert_array_equal(result.exit_index, np.where(leave, 1, 2))
    rows = np.flatnonzero(leave)
    np.testing.assert_allclose(result.output[rows], expected[1][rows], atol=1e-4, rtol=1e-4)


def test_the_tuner_charges_the_heads_an_enabled_exit_reads():
    from trt_exit.runtime.tuning import tune_thresholds

    n = 200
    outputs = np.zeros((3, n, 2), np.float32)
    outputs[:, :, 0] = 1.0  # every exit predicts class 0, the right one: any point is accurate
    targets = np.zeros(n, np.int64)
    confidences = np.stack([np.full(n, np.nan), np.ones(n), np.ones(n)])  # NaN: never leaves at 0
    stages = {"segment_0": 1.0, "exit_0": 0.5, "segment_1": 1.0, "exit_1": 0.1,
              "segment_2": 1.0, "exit_2": 0.1}
    plain = tune_thresholds(outputs, confidences, targets, "classification", stages, 0.0)
    chained = tune_thresholds(outputs, confidences, targets, "classification", stages, 0.0,
                              state_providers=[[], [0], []])
    # Without state, exit 0 is disabled and costs nothing: 1 + 1 + 0.1.
    assert plain.best.thresholds[0] is None
    assert plain.best.expected_latency_ms == pytest.approx(2.1)
    # With exit 1 reading exit 0's state, exit 0's head runs anyway: 1 + 0.5 + 1 + 0.1.
    assert chained.best.expected_latency_ms == pytest.approx(2.6)


def test_invalid_ensembles_are_refused():
    with pytest.raises(ConfigError, match="stateless"):
        create_model("multi_exit_vit_tiny_test", exits=[ExitSpec(1, "ensemble", {"base": "bof"})])
    with pytest.raises(ConfigError, match="cannot be mixed"):
        create_model("multi_exit_vit_tiny_test",
                     exits=[ExitSpec(1, "ensemble"), ExitSpec(2, "bof")])
    with pytest.raises(ConfigError, match="cannot be mixed"):
        create_model("multi_exit_vit_tiny_test",
                     exits=[ExitSpec(1, "bof"), ExitSpec(2, "ensemble")])


def test_ensembles_survive_a_checkpoint(ensemble_model, tmp_path):
    from trt_exit.models.checkpoint import load_checkpoint, save_checkpoint

    save_checkpoint(ensemble_model, tmp_path / "e.safetensors")
    loaded = load_checkpoint(tmp_path / "e.safetensors")  # checks the reference outputs
    assert [type(h).__name__ for h in loaded.exits][:2] == ["EnsembleExit"] * 2
    assert loaded.exits[1].options() == {"base": "slvit", "base_options": {}}
    assert dataclasses.asdict(loaded.config)["exits"][1]["options"] == {"base": "slvit"}
