"""The training options that make exits strong: self-distillation, the two-phase recipe with a
joint fine-tune, and per-exit temperature calibration (whose temperature the exported graphs
apply)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trt_exit.errors import ConfigError
from trt_exit.models import create_model
from trt_exit.training.calibration import calibrate_temperatures, fit_temperature
from trt_exit.training.losses import distillation_loss, exit_weights, multi_exit_loss
from trt_exit.training.trainer import (
    CLASSIFIER_WISE,
    TrainConfig,
    predict_exits,
    seed_everything,
    train,
)

QUICK = TrainConfig(epochs=2, lr=1e-2, warmup_epochs=0, weight_decay=0.0, batch_size=128, seed=0,
                    augment_shift_px=0)


def _tiny():
    seed_everything(0)
    return create_model("multi_exit_vit_tiny_test")


def test_distillation_loss_is_the_documented_formula():
    torch.manual_seed(0)
    model = _tiny()
    outputs = [torch.randn(8, 10, requires_grad=True) for _ in range(3)]
    targets = torch.randint(0, 10, (8,))
    weights = exit_weights(3, 2.0)
    a, t = 0.7, 3.0
    loss = multi_exit_loss(model, outputs, targets, weights, 0.0, a, t)
    expected = 0.0
    for k, (out, w) in enumerate(zip(outputs, weights)):
        ce = F.cross_entropy(out, targets)
        if k < 2:
            teacher = F.softmax(outputs[2].detach() / t, dim=-1)
            kl = (teacher * (teacher.log() - F.log_softmax(out / t, dim=-1))).sum(-1).mean()
            ce = (1 - a) * ce + a * t * t * kl
        expected = expected + w * ce
    torch.testing.assert_close(loss, expected / sum(weights))
    # The teacher is not pulled towards the students: only its own label loss reaches it.
    loss.backward()
    only_labels = torch.autograd.grad(
        weights[2] * F.cross_entropy(outputs[2], targets) / sum(weights), outputs[2])[0]
    torch.testing.assert_close(outputs[2].grad, only_labels)
    # Identical student and teacher: no distillation loss.
    same = torch.randn(4, 10)
    assert float(distillation_loss(same, same, 2.0)) == pytest.approx(0.0, abs=1e-6)


def test_distilled_exits_follow_the_final_head(digits):
    """Exits trained on frozen features with distillation weight 1 learn only from the final
    head: they agree with it more than exits trained on the labels alone."""
    base = _tiny()
    train(base, digits["train"], dataclasses.replace(QUICK, epochs=4), progress=False)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    agreement = {}
    for weight in (0.0, 1.0):
        model = _tiny()
        model.load_state_dict(state)
        for head in model.exits[:-1]:  # fresh exits: only what this training teaches them
            for module in head.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        train(model, digits["train"], dataclasses.replace(
            QUICK, regime=CLASSIFIER_WISE, epochs=4, distill_weight=weight), progress=False)
        outputs = predict_exits(model, digits["val"])
        final = outputs[-1].argmax(1)
        agreement[weight] = [float((o.argmax(1) == final).mean()) for o in outputs[:-1]]
        # The frozen final head is untouched by either.
        np.testing.assert_array_equal(final, predict_exits(base, digits["val"])[-1].argmax(1))
    assert all(d > l for d, l in zip(agreement[1.0], agreement[0.0])), agreement


def test_two_phase_recipe_freezes_then_fine_tunes(digits):
    """backbone + final head first (a static model), exits on frozen features, then everything
    jointly at the fine-tune learning rate."""
    model = _tiny()
    snapshots, lrs = {}, {}

    def record(phase, epoch, state):
        snapshots[phase] = {k: v.clone() for k, v in state["model"].items()}
        lrs[phase] = [g["lr"] for g in state["optimizer"]["param_groups"]]

    config = dataclasses.replace(QUICK, regime=CLASSIFIER_WISE, backbone_epochs=1, epochs=1,
                                 distill_weight=0.5, finetune_epochs=1, finetune_lr=1e-4)
    history = train(model, digits["train"], config, val_set=digits["val"], progress=False,
                    epoch_callback=record)
    assert [p["phase"] for p in history.phases] == ["backbone", "exits", "finetune"]
    assert config.sample_epochs == 3
    backbone, exits, finetune = (snapshots[p] for p in ("backbone", "exits", "finetune"))
    frozen = [k for k in backbone if k.startswith(("backbone.", "exits.2."))
              and backbone[k].is_floating_point()]
    trained_exits = [k for k in backbone if k.startswith(("exits.0.", "exits.1."))
                     and not k.endswith("temperature")]
    # Exits phase: backbone and final head unchanged, exits changed.
    assert all(torch.equal(backbone[k], exits[k]) for k in frozen)
    assert any(not torch.equal(backbone[k], exits[k]) for k in trained_exits)
    # Fine-tune: the backbone moves again, at the low learning rate (cosine from finetune_lr).
    assert any(not torch.equal(exits[k], finetune[k]) for k in frozen if k.startswith("backbone."))
    assert max(lrs["finetune"]) <= 1e-4 + 1e-12 and max(lrs["exits"]) > 1e-4


def test_bad_training_options_are_refused(digits):
    model = _tiny()
    for bad in (dict(distill_weight=1.5), dict(distill_temperature=0.0),
                dict(finetune_epochs=-1), dict(finetune_lr=0.0)):
        with pytest.raises(ConfigError):
            train(model, digits["train"], dataclasses.replace(QUICK, **bad), progress=False)
    with pytest.raises(ConfigError, match="val_set"):
        train(model, digits["train"], dataclasses.replace(QUICK, calibrate=True), progress=False)


def test_fit_temperature_recovers_the_true_temperature():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, (20_000, 10))
    true_t = 2.5
    probabilities = np.exp(logits / true_t)
    probabilities /= probabilities.sum(1, keepdims=True)
    labels = np.array([rng.choice(10, p=p) for p in probabilities])
    assert fit_temperature(logits, labels) == pytest.approx(true_t, rel=0.05)


def test_calibration_is_in_the_model_its_checkpoint_and_its_onnx_graphs(digits, tmp_path):
    from trt_exit.models.checkpoint import load_checkpoint, save_checkpoint
    from trt_exit.runtime.executor import Executor
    from trt_exit.runtime.policies import AllExitsPolicy
    from trt_exit.workflow import export_step

    model = _tiny()
    history = train(model, digits["train"], dataclasses.replace(QUICK, epochs=3, calibrate=True),
                    val_set=digits["val"], progress=False)
    record = history.calibration
    temperatures = [float(h.temperature) for h in model.exits]
    assert record["temperatures"] == pytest.approx(temperatures)
    assert all(t != 1.0 for t in temperatures)
    assert all(a <= b + 1e-9 for a, b in zip(record["nll_after"], record["nll_before"]))
    # Calibrating again finds the same temperatures (it fits on the raw logits, not on the
    # already divided ones).
    assert calibrate_temperatures(model, digits["val"])["temperatures"] == pytest.approx(
        temperatures, rel=1e-3)
    # The exported graphs output the calibrated logits and their confidence.
    x = digits["test"].inputs["image"][:64]
    model.eval()
    with torch.no_grad():
        raw = [head(t) for head, t in zip(model.exits, _tokens(model, torch.from_numpy(x)))]
    manifest = export_step(model, tmp_path / "calibrated", digits, {"name": "digits", "seed": 0})
    with Executor(manifest) as executor:
        result = executor.run(x, AllExitsPolicy())
    for k, (logits, t) in enumerate(zip(raw, temperatures)):
        expected = (logits / t).softmax(-1).amax(-1).numpy()
        np.testing.assert_allclose(result.all_confidences[k], expected, atol=1e-5)
        np.testing.assert_array_equal(result.all_outputs[k].argmax(1), logits.argmax(1).numpy())
    # The temperature travels with the checkpoint.
    save_checkpoint(model, tmp_path / "c.safetensors")
    loaded = load_checkpoint(tmp_path / "c.safetensors")
    assert [float(h.temperature) for h in loaded.exits] == pytest.approx(temperatures)


def test_checkpoints_from_before_calibration_still_load(digits, tmp_path):
    """A checkpoint without temperature buffers (written before they existed) loads as T = 1."""
    from safetensors.torch import load_file, save_file

    from trt_exit.models.checkpoint import load_checkpoint, save_checkpoint

    model = _tiny()
    save_checkpoint(model, tmp_path / "new.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "new.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = {k: v for k, v in load_file(str(tmp_path / "new.safetensors")).items()
               if not k.endswith(".temperature")}
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=metadata)
    loaded = load_checkpoint(tmp_path / "old.safetensors")
    assert [float(h.temperature) for h in loaded.exits] == [1.0] * loaded.num_exits


def _tokens(model, x):
    out = []
    for k in range(model.num_exits):
        x = model.run_segment(k, x)
        out.append(x)
    return out
