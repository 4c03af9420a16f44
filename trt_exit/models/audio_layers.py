"""Layers for spectrogram inputs: rectangular patch embedding and SpecAugment-style masking.

Shared by the audio backbone (:mod:`trt_exit.models.audio_vit`) and the audiovisual exits
(:mod:`trt_exit.models.exits.av_slvit`); this module imports nothing of the model registry, so
exit families can use it without an import cycle.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from trt_exit.errors import ConfigError


def _pair(value: int | Sequence[int], what: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if len(value) != 2:
        raise ConfigError(f"{what} must be an int or a pair, got {value!r}")
    return (int(value[0]), int(value[1]))


class AudioPatchEmbed(nn.Module):
    """Cuts a (B, C, mels, frames) spectrogram into non-overlapping mel x frame patches and
    projects each to ``dim`` channels, with a learned position per patch.

    Args:
        input_shape: (channels, mels, frames) of one sample.
        patch: (mel bands, frames) per patch; must divide the input's sides.
        dim: Output token width.
    """

    def __init__(self, input_shape: Sequence[int], patch: int | Sequence[int], dim: int):
        super().__init__()
        if len(input_shape) != 3:
            raise ConfigError(f"audio input shape must be (channels, mels, frames), got {input_shape}")
        channels, mels, frames = (int(v) for v in input_shape)
        self.patch = _pair(patch, "audio patch")
        if mels % self.patch[0] or frames % self.patch[1]:
            raise ConfigError(
                f"audio patch {self.patch} must divide the spectrogram size {mels}x{frames}: "
                f"choose a patch whose sides divide n_mels and frames"
            )
        self.grid_size = (mels // self.patch[0], frames // self.patch[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(channels, dim, kernel_size=self.patch, stride=self.patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, D, Gm, Gf)
        return x.flatten(2).transpose(1, 2) + self.pos_embed  # (B, Na, D)


def spec_augment(x: torch.Tensor, freq_mask_bins: int, time_mask_frames: int,
                 masks: int = 2) -> torch.Tensor:
    """SpecAugment-style masking: ``masks`` random mel bands and frame ranges per sample are
    set to the sample's mean (not zero, which is loud silence after normalization).

    Args:
        x: (B, C, mels, frames) features.
        freq_mask_bins: Widest frequency mask, in mel bands (0 = none).
        time_mask_frames: Widest time mask, in frames (0 = none).
        masks: Masks of each kind per sample.
    """
    batch, _, mels, frames = x.shape
    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    keep = torch.ones(batch, 1, mels, frames, dtype=torch.bool, device=x.device)
    for size, length, axis in ((freq_mask_bins, mels, 2), (time_mask_frames, frames, 3)):
        if size <= 0:
            continue
        for _ in range(masks):
            width = torch.randint(0, size + 1, (batch, 1), device=x.device)
            start = (torch.rand(batch, 1, device=x.device) * (length - width + 1)).long()
            index = torch.arange(length, device=x.device)[None, :]  # (1, L)
            hit = (index >= start) & (index < start + width)  # (B, L)
            shape = (batch, 1, length, 1) if axis == 2 else (batch, 1, 1, length)
            keep &= ~hit.reshape(shape)
    return torch.where(keep, x, mean)
