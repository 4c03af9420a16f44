"""The audio ViT backbone over spectrogram patches, and its layers."""

from __future__ import annotations

import pytest
import torch

from trt_exit import tensor_names as tn
from trt_exit.errors import ConfigError
from trt_exit.models import create_model, model_config
from trt_exit.models.audio_layers import AudioPatchEmbed, spec_augment
from trt_exit.models.audio_vit import AUDIO_LOG_MEL, SPEECH_COMMANDS_WORDS
from trt_exit.pipelines.audio_features import LogMelConfig


def test_rectangular_patches():
    embed = AudioPatchEmbed((1, 32, 64), (4, 16), 8)
    assert embed.grid_size == (8, 4) and embed.num_patches == 32
    assert embed(torch.randn(2, 1, 32, 64)).shape == (2, 32, 8)
    with pytest.raises(ConfigError, match="divide"):
        AudioPatchEmbed((1, 32, 64), (5, 8), 8)
    with pytest.raises(ConfigError, match="channels, mels, frames"):
        AudioPatchEmbed((32, 64), 8, 8)


def test_spec_augment_masks_bands_and_frames_with_the_mean():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 32, 64)
    y = spec_augment(x, freq_mask_bins=6, time_mask_frames=10)
    changed = y != x
    assert changed.any()
    # Masked cells hold the sample's mean; masks are whole bands or whole frame ranges.
    means = x.mean(dim=(1, 2, 3))
    for b in range(4):
        assert torch.allclose(y[b][changed[b]], means[b].expand(int(changed[b].sum())))
    assert torch.equal(spec_augment(x, 0, 0), x)


@pytest.mark.parametrize("name", ["multi_exit_audio_vit_speech_commands",
                                  "multi_exit_audio_vit_synthetic",
                                  "multi_exit_audio_vit_tiny_test"])
def test_audio_models_read_the_audio_input(name):
    config = model_config(name)
    assert LogMelConfig.from_dict(config.preprocessing["audio"]) == AUDIO_LOG_MEL
    model = create_model(name).eval()
    assert model.backbone_input == tn.AUDIO
    assert model.input_names() == [tn.AUDIO]
    assert model.input_shapes() == {tn.AUDIO: AUDIO_LOG_MEL.shape}
    with torch.no_grad():
        outputs = model(torch.randn(2, *AUDIO_LOG_MEL.shape))
    assert all(o.shape == (2, config.num_outputs) for o in outputs)
    assert model_config("multi_exit_audio_vit_speech_commands").class_names == list(SPEECH_COMMANDS_WORDS)


def test_augmentation_only_in_training():
    torch.manual_seed(0)
    model = create_model("multi_exit_audio_vit_tiny_test")
    x = torch.randn(3, *AUDIO_LOG_MEL.shape)
    model.eval()
    with torch.no_grad():
        first, second = model(x)[-1], model(x)[-1]
        assert torch.equal(first, second)
        model.train()
        noisy = model(x)[-1]
    assert not torch.allclose(noisy, first)
