"""CopycatSL-ViT: imitation targets come from the frozen final head; backbone and final head
never change; the exits learn to copy the final head before they learn the labels."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from trt_exit.errors import ConfigError
from trt_exit.training.copycat import CopycatConfig, copycat_train, final_head_targets
from trt_exit.training.trainer import CLASSIFIER_WISE, TrainConfig

PHASE = TrainConfig(regime=CLASSIFIER_WISE, epochs=1, batch_size=64, lr=3e-3, warmup_epochs=0,
                    augment_shift_px=0, seed=0)


@pytest.fixture
def student(tiny_model):
    """A copy of the session's trained tiny model (MLP and SL-ViT exits) to train further."""
    return copy.deepcopy(tiny_model)


def test_targets_are_the_final_heads_predictions_and_modes_are_kept(student, digits):
    images = torch.from_numpy(digits["train"].inputs["image"][:32])
    labels = torch.from_numpy(digits["train"].targets[:32])
    with torch.no_grad():
        final = student(images)[-1]
    student.train()
    student.backbone.eval()  # as the classifier-wise trainer leaves it
    modes = {name: m.training for name, m in student.named_modules()}
    targets = final_head_targets()(student, {"image": images}, labels)
    assert {name: m.training for name, m in student.named_modules()} == modes
    assert len(targets) == student.num_exits
    for target in targets[:-1]:
        torch.testing.assert_close(target, final.argmax(dim=1))
    assert targets[-1] is labels
    soft = final_head_targets(soft=True, temperature=2.0)(student, {"image": images}, labels)
    torch.testing.assert_close(soft[0], (final / 2.0).softmax(dim=1))


def test_imitation_teaches_the_final_heads_answers_not_the_labels(digits):
    """With an untrained backbone the final head's answers are far from the labels; after the
    imitation phase alone the exits agree with the final head much more than with the labels."""
    from trt_exit.models import create_model
    from trt_exit.training.trainer import predict_exits, seed_everything

    seed_everything(3)
    model = create_model("multi_exit_vit_tiny_test")
    train_set = digits["train"].subset(np.arange(256))
    config = CopycatConfig(imitation=dataclasses.replace(PHASE, epochs=3),
                           finetune=dataclasses.replace(PHASE, epochs=0))
    history = copycat_train(model, train_set, config, progress=False)
    assert history["finetune"] is None
    outputs = predict_exits(model, train_set)
    teacher = outputs[-1].argmax(axis=1)
    for exit_output in outputs[:-1]:
        prediction = exit_output.argmax(axis=1)
        assert np.mean(prediction == teacher) > np.mean(prediction == train_set.targets) + 0.3


def test_copycat_trains_only_the_exits(student, digits):
    before = {k: v.clone() for k, v in student.state_dict().items()}
    config = CopycatConfig(imitation=PHASE, finetune=PHASE)
    history = copycat_train(student, digits["train"].subset(np.arange(128)), config,
                            progress=False)
    assert history["imitation"]["phases"][0]["phase"] == "exits"
    assert history["finetune"]["phases"][0]["phase"] == "exits"
    final = f"exits.{student.num_exits - 1}."
    for name, value in student.state_dict().items():
        if name.endswith(".temperature"):
            continue  # calibration, not a trained weight
        frozen = name.startswith("backbone.") or name.startswith(final)
        assert torch.equal(value, before[name]) == frozen, name


@pytest.mark.parametrize("phase", ["imitation", "finetune"])
def test_copycat_refuses_to_train_the_backbone(phase):
    bad = dataclasses.replace(PHASE, regime="end_to_end")
    with pytest.raises(ConfigError, match="classifier_wise"):
        copycat_train(None, None, CopycatConfig(**{phase: bad}))
