"""Exits attached to a real timm VisionTransformer; the final exit is timm's own output."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trt_exit.errors import ConfigError

timm = pytest.importorskip("timm", reason="timm is in the [dev] extra")

from trt_exit.models.timm_adapter import attach_exits  # noqa: E402


@pytest.fixture(scope="module")
def timm_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4,
                             num_classes=10).eval()


@pytest.mark.parametrize("exit_type", ["mlp", "slvit"])
def test_final_exit_reproduces_timm(timm_vit, exit_type):
    model = attach_exits(timm_vit, [4, 8], exit_type).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        outputs = model(x)
        reference = timm_vit(x)
    assert len(outputs) == 3
    assert float((outputs[-1] - reference).abs().max()) <= 1e-4


def test_classifier_wise_training_keeps_timm_head_frozen(timm_vit, digits):
    """Exits learn; the pretrained backbone and head (owned by the timm model) stay put."""
    from trt_exit.training.datasets import Dataset
    from trt_exit.training.trainer import TrainConfig, train

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2,
                            num_classes=10, in_chans=1, depth=3, embed_dim=16, num_heads=2)
    model = attach_exits(vit, [1, 2], "mlp")
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    exit_before = [p.clone() for p in model.exits[0].parameters()]
    small = digits["train"].subset(np.arange(128))
    train(model, small, TrainConfig(regime="classifier_wise", epochs=1, augment_shift_px=0),
          progress=False)
    after = vit.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(a, b) for a, b in zip(exit_before, model.exits[0].parameters()))


def test_models_without_forward_intermediates_are_refused():
    with pytest.raises(ConfigError, match="does not implement timm's forward_intermediates.*"
                                          "supported: timm VisionTransformer"):
        attach_exits(torch.nn.Linear(2, 2), [1])
