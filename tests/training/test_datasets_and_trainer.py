"""The digits splits and the training regimes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trt_exit.errors import ConfigError
from trt_exit.models import create_model
from trt_exit.training.datasets import load_dataset, load_digits
from trt_exit.training.trainer import (
    TrainConfig,
    evaluate,
    random_affine,
    random_shift,
    seed_everything,
    train,
)


def test_digits_split_is_fixed_stratified_and_disjoint(digits):
    sizes = {k: len(v) for k, v in digits.items()}
    assert sizes == {"train": 1077, "val": 360, "test": 360}
    images = {k: v.inputs["image"] for k, v in digits.items()}
    assert all(x.dtype == np.float32 and x.shape[1:] == (1, 8, 8) for x in images.values())
    assert -1.0 <= min(x.min() for x in images.values()) and max(x.max() for x in images.values()) <= 1.0
    # stratified: every class in proportion (within one sample) in val and test
    for split in ("val", "test"):
        counts = np.bincount(digits[split].targets, minlength=10)
        assert counts.min() >= 34 and counts.max() <= 38
    # disjoint and deterministic
    flat = {k: {x.tobytes() for x in v} for k, v in images.items()}
    assert not (flat["test"] & flat["val"]) or len(flat["test"] & flat["val"]) < 3  # duplicates exist in digits
    again = load_digits(seed=0)
    assert np.array_equal(again["test"].targets, digits["test"].targets)
    other = load_digits(seed=1)
    assert not np.array_equal(other["test"].targets, digits["test"].targets)


def test_unknown_dataset():
    with pytest.raises(ConfigError, match="unknown dataset"):
        load_dataset("imagenet")


def test_augmentations_keep_shapes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1, 8, 8)
    assert random_shift(x, 1, g).shape == x.shape
    assert random_affine(x, 10.0, 0.1, 1, g).shape == x.shape
    assert torch.equal(random_shift(x, 0, g), x)


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def _changed(before, module):
    return any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_end_to_end_trains_everything_and_learns(digits):
    seed_everything(0)
    model = create_model("multi_exit_vit_tiny_test")
    backbone, heads = _params(model.backbone), [_params(h) for h in model.exits]
    history = train(model, digits["train"], TrainConfig(epochs=4, lr=1e-2, warmup_epochs=0,
                                                        weight_decay=0.0, augment_shift_px=0),
                    val_set=digits["val"], progress=False)
    assert _changed(backbone, model.backbone)
    assert all(_changed(h, head) for h, head in zip(heads, model.exits))
    losses = history.phases[0]["loss"]
    assert losses[-1] < losses[0]
    assert max(evaluate(model, digits["val"])) > 0.3  # far above chance (0.1) after 4 epochs
    assert len(history.phases[0]["val"]) == 4  # per-epoch validation metrics recorded


def test_classifier_wise_freezes_backbone_and_final_head(digits):
    seed_everything(0)
    model = create_model("multi_exit_vit_tiny_test")
    small = digits["train"].subset(np.arange(256))
    backbone, final, early = _params(model.backbone), _params(model.exits[-1]), _params(model.exits[0])
    history = train(model, small, TrainConfig(regime="classifier_wise", epochs=2), progress=False)
    assert not _changed(backbone, model.backbone)
    assert not _changed(final, model.exits[-1])
    assert _changed(early, model.exits[0])
    assert [p["phase"] for p in history.phases] == ["exits"]
    # with backbone_epochs, the backbone is trained first, then frozen
    backbone = _params(model.backbone)
    history = train(model, small, TrainConfig(regime="classifier_wise", epochs=1, backbone_epochs=1),
                    progress=False)
    assert _changed(backbone, model.backbone)
    assert [p["phase"] for p in history.phases] == ["backbone", "exits"]
    assert all(p.requires_grad for p in model.parameters())  # nothing left frozen afterwards


def test_training_is_seeded(digits):
    small = digits["train"].subset(np.arange(128))
    weights = []
    for _ in range(2):
        seed_everything(3)
        model = create_model("multi_exit_vit_tiny_test")
        train(model, small, TrainConfig(epochs=1, seed=3), progress=False)
        weights.append(torch.cat([p.flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_validation_every_n_epochs_and_after_the_last(digits):
    small, val = digits["train"].subset(np.arange(64)), digits["val"].subset(np.arange(32))
    model = create_model("multi_exit_vit_tiny_test")
    history = train(model, small, TrainConfig(epochs=5, val_every_epochs=2, seed=0), val_set=val,
                    progress=False)
    assert len(history.phases[0]["loss"]) == 5
    assert len(history.phases[0]["val"]) == 3  # after epochs 2, 4 and 5
    with pytest.raises(ConfigError, match="val_every_epochs"):
        train(model, small, TrainConfig(epochs=1, val_every_epochs=0), progress=False)


def test_bad_training_config(digits):
    model = create_model("multi_exit_vit_tiny_test")
    with pytest.raises(ConfigError, match="unknown training regime"):
        train(model, digits["train"], TrainConfig(regime="layer_wise"), progress=False)


def test_dataset_options_from_the_command_line_are_typed_and_checked():
    from trt_exit.errors import ConfigError
    from trt_exit.training.datasets import load_dataset

    splits = load_dataset("synthetic_av_crowd", seed=0, train="8", val="4", test="4",
                          degraded_fraction="0.5")
    assert [len(splits[s].targets) for s in ("train", "val", "test")] == [8, 4, 4]
    with pytest.raises(ConfigError, match="has no option 'train_size'; its options: train, val"):
        load_dataset("synthetic_av_crowd", train_size="8")
    with pytest.raises(ConfigError, match="option 'train' takes an integer, got 'many'"):
        load_dataset("synthetic_av_crowd", train="many")
