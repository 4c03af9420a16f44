"""Audio Vision Transformer: a ViT over log-mel spectrogram patches (SL-ViT's audio task).

SL-ViT classifies audio by treating its spectrogram as an image. We do the same with our own
backbone instead of the plain :class:`~trt_exit.models.vit.VisionTransformer` fed a
``(n_mels, frames)`` "image", for three reasons (our choices):

* the model's input is called ``audio`` (``input_name``), so manifests, the executor and the
  live pipeline see an audio model, not an image model with odd sizes;
* patches may be rectangular (mel bands x frames), e.g. 8 x 8 on 32 x 64 features or 4 x 16;
* spectrogram augmentation (SpecAugment-style frequency and time masks) lives inside the
  backbone and runs only in training mode; exported graphs (eval mode) do not contain it. The
  trainer's image augmentations do not apply to spectrograms.

The features themselves are computed on the host by
:func:`trt_exit.pipelines.audio_features.log_mel` (see there why), in training and deployment
alike; the model config records them in ``preprocessing["audio"]``.

Read top to bottom: the backbone's config, the backbone, registered model configs (the patch
embedding and the masking live in :mod:`trt_exit.models.audio_layers`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trt_exit import tensor_names as tn
from trt_exit.errors import ConfigError
from trt_exit.models.audio_layers import AudioPatchEmbed, spec_augment
from trt_exit.models.multi_exit import ExitSpec, ModelConfig, register_backbone, register_model
from trt_exit.models.vit import init_linear_layers, make_blocks
from trt_exit.pipelines.audio_features import LogMelConfig


@dataclass
class AudioViTConfig:
    """Audio backbone hyper-parameters.

    Attributes:
        input_shape: (channels, mels, frames) of the spectrogram input.
        patch: (mel bands, frames) per patch.
        embed_dim: Token width C.
        depth: Transformer blocks.
        num_heads: Attention heads; must divide ``embed_dim``.
        mlp_ratio: Hidden width of the block MLP relative to ``embed_dim``.
        drop_path_rate: Stochastic-depth rate of the last block (linear ramp), training only.
        dropout: Dropout after the embedding and inside MLPs, training only.
        freq_mask_bins: Training only: widest SpecAugment frequency mask (0 = off).
        time_mask_frames: Training only: widest SpecAugment time mask (0 = off).
    """

    input_shape: tuple[int, int, int] = (1, 32, 64)
    patch: tuple[int, int] = (8, 8)
    embed_dim: int = 64
    depth: int = 6
    num_heads: int = 4
    mlp_ratio: float = 2.0
    drop_path_rate: float = 0.0
    dropout: float = 0.0
    freq_mask_bins: int = 0
    time_mask_frames: int = 0

    def validate(self) -> None:
        """Raises :class:`ConfigError` when the configuration is inconsistent."""
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"num_heads {self.num_heads} must divide embed_dim {self.embed_dim}")
        if self.depth < 1:
            raise ConfigError(f"depth must be at least 1, got {self.depth}")


class AudioViT(nn.Module):
    """ViT backbone over spectrogram patches; its input is the model's ``audio`` tensor.

    Satisfies the backbone contract of :mod:`trt_exit.models.vit` (``embed``, ``blocks``, token
    layout attributes), so every exit family attaches to it unchanged. ``img_size`` and
    ``in_chans`` describe the spectrogram, for :meth:`MultiExitModel.input_shapes`.
    """

    num_prefix_tokens = 1
    input_name = tn.AUDIO

    def __init__(self, config: AudioViTConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.embed_dim = config.embed_dim
        self.num_heads = config.num_heads
        self.in_chans = int(config.input_shape[0])
        self.img_size = (int(config.input_shape[1]), int(config.input_shape[2]))
        self.patch_embed = AudioPatchEmbed(config.input_shape, config.patch, config.embed_dim)
        self.grid_size = self.patch_embed.grid_size
        self.num_tokens = self.patch_embed.num_patches + self.num_prefix_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.embed_dim))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, config.embed_dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.pos_drop = nn.Dropout(config.dropout)
        self.blocks = make_blocks(config.depth, config.embed_dim, config.num_heads,
                                  config.mlp_ratio, True, config.drop_path_rate, config.dropout)
        init_linear_layers(self)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def embed(self, audio: torch.Tensor) -> torch.Tensor:
        """Patch tokens with the class token prepended: (B, N, C)."""
        if self.training and (self.config.freq_mask_bins or self.config.time_mask_frames):
            audio = spec_augment(audio, self.config.freq_mask_bins, self.config.time_mask_frames)
        x = self.patch_embed(audio)  # (B, N-1, C), positions added
        cls = (self.cls_token + self.cls_pos).expand(x.shape[0], -1, -1)  # (B, 1, C)
        return self.pos_drop(torch.cat([cls, x], dim=1))  # (B, N, C)


@register_backbone("audio_vit")
def _audio_vit_backbone(options: dict[str, Any]) -> nn.Module:
    options = dict(options)
    for key in ("input_shape", "patch"):
        if key in options and not isinstance(options[key], int):
            options[key] = tuple(options[key])
    try:
        config = AudioViTConfig(**options)
    except TypeError as exc:
        raise ConfigError(f"bad audio_vit backbone options {options!r}: {exc}") from exc
    return AudioViT(config)


# --------------------------------------------------------------------------- named configs

#: Log-mel features of the audio classification models: 32 mel bands x 64 frames per second
#: (25 ms windows, 15.6 ms hop). The normalization is fixed, not fitted to a dataset, so the
#: config stays static: log-mel values of 16-bit speech at 16 kHz span about -14 (silence,
#: the log offset) to +8; mean -4, std 5 map that to about -2..2.
AUDIO_LOG_MEL = LogMelConfig(sample_rate=16000, window_s=1.0, n_fft=512, win_length=400,
                             hop_length=250, n_mels=32, f_min_hz=20.0, mean=-4.0, std=5.0)

#: The 35 words of Speech Commands v0.02 (Warden 2018), in the order of the class indices.
SPEECH_COMMANDS_WORDS = (
    "backward", "bed", "bird", "cat", "dog", "down", "eight", "five", "follow", "forward",
    "four", "go", "happy", "house", "learn", "left", "marvin", "nine", "no", "off", "on", "one",
    "right", "seven", "sheila", "six", "stop", "three", "tree", "two", "up", "visual", "wow",
    "yes", "zero",
)

#: Classes of the generated audio set (see :mod:`trt_exit.training.audio_datasets`).
SYNTHETIC_AUDIO_CLASSES = ("low_tone", "high_tone", "chirp_up", "chirp_down", "noise_burst",
                           "pulses")


@register_model
def multi_exit_audio_vit_speech_commands() -> ModelConfig:
    """Keyword spotting on Speech Commands (35 words): 32x64 log-mel, 8x8 patches (32 tokens),
    width 128, 8 blocks, SL-ViT exits after blocks 2, 4 and 6."""
    return ModelConfig(
        name="multi_exit_audio_vit_speech_commands",
        backbone="audio_vit",
        backbone_options=dict(input_shape=list(AUDIO_LOG_MEL.shape), patch=[8, 8], embed_dim=128,
                              depth=8, num_heads=4, mlp_ratio=2.0, drop_path_rate=0.1,
                              freq_mask_bins=4, time_mask_frames=8),
        exits=[ExitSpec(2, "slvit"), ExitSpec(4, "slvit"), ExitSpec(6, "slvit")],
        num_outputs=len(SPEECH_COMMANDS_WORDS),
        preprocessing={"audio": AUDIO_LOG_MEL.to_dict()},
        class_names=list(SPEECH_COMMANDS_WORDS),
    )


@register_model
def multi_exit_audio_vit_synthetic() -> ModelConfig:
    """The generated audio classes (tones, chirps, noise, pulses): width 64, 4 blocks, an MLP
    exit after block 1 and an SL-ViT exit after block 2."""
    return ModelConfig(
        name="multi_exit_audio_vit_synthetic",
        backbone="audio_vit",
        backbone_options=dict(input_shape=list(AUDIO_LOG_MEL.shape), patch=[8, 8], embed_dim=64,
                              depth=4, num_heads=4, mlp_ratio=2.0, freq_mask_bins=2,
                              time_mask_frames=6),
        exits=[ExitSpec(1, "mlp"), ExitSpec(2, "slvit")],
        num_outputs=len(SYNTHETIC_AUDIO_CLASSES),
        preprocessing={"audio": AUDIO_LOG_MEL.to_dict()},
        class_names=list(SYNTHETIC_AUDIO_CLASSES),
    )


@register_model
def multi_exit_audio_vit_tiny_test() -> ModelConfig:
    """A tiny audio model for tests: width 16, 2 blocks, an SL-ViT exit after block 1."""
    return ModelConfig(
        name="multi_exit_audio_vit_tiny_test",
        backbone="audio_vit",
        backbone_options=dict(input_shape=list(AUDIO_LOG_MEL.shape), patch=[8, 16], embed_dim=16,
                              depth=2, num_heads=2, mlp_ratio=2.0, freq_mask_bins=2,
                              time_mask_frames=4),
        exits=[ExitSpec(1, "slvit")],
        num_outputs=len(SYNTHETIC_AUDIO_CLASSES),
        preprocessing={"audio": AUDIO_LOG_MEL.to_dict()},
        class_names=list(SYNTHETIC_AUDIO_CLASSES),
    )
