"""A small residual CNN backbone that hands (B, C, H, W) feature maps to its exits.

It exists so that exits for CNN backbones (SL-ViT over feature maps, BoF, CNN-ignore) can be
trained, exported and run like the ViT exits. Read top to bottom: the residual block, the
backbone, its final head, the registered model configs.

It satisfies the backbone contract of :mod:`trt_exit.models.vit` with feature maps in place of
tokens: ``embed(image)`` is the stem, (B, C, H, W); each of ``blocks`` maps (B, C, H, W) to
(B, C, H, W); ``feature_layout = "map"`` tells exits what they get
(:mod:`trt_exit.models.exits.layout`); ``embed_dim`` is C, ``grid_size`` is (H, W),
``num_prefix_tokens`` is 0 and ``num_tokens`` is H * W. The stage graphs pass the maps between
segments as they are (NCHW, what a TensorRT convolution engine wants), under the usual
``tokens_k`` tensor names.

Our choice: one width and one resolution throughout (the stem may downsample once with
``stem_stride``). Backbones whose stages change width and resolution give every exit position
its own :class:`~trt_exit.models.exits.ExitContext` with ``exit_geometry(after_block)`` (see
the timm adapter).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trt_exit.errors import ConfigError
from trt_exit.models.exits import ExitContext, ExitHead, register_exit
from trt_exit.models.exits.layout import MAP, require_layout
from trt_exit.models.multi_exit import (
    DIGITS_PREPROCESSING,
    ExitSpec,
    ModelConfig,
    register_backbone,
    register_model,
)
from trt_exit.models.vit import _pair


@dataclass
class CNNConfig:
    """CNN backbone hyper-parameters.

    Attributes:
        img_size: Input height and width in pixels (an int for square inputs).
        in_chans: Input channels.
        width: Channels C of every feature map.
        depth: Number of residual blocks.
        stem_stride: Stride of the stem convolution (1 keeps the input resolution).
        num_heads: Default attention heads of exits attached to it (SL-ViT); must divide width.
    """

    img_size: int | tuple[int, int] = 8
    in_chans: int = 1
    width: int = 32
    depth: int = 6
    stem_stride: int = 1
    num_heads: int = 4

    def validate(self) -> None:
        """Raises :class:`ConfigError` when the configuration is inconsistent."""
        height, width = _pair(self.img_size)
        if self.stem_stride < 1 or height % self.stem_stride or width % self.stem_stride:
            raise ConfigError(f"stem_stride {self.stem_stride} must divide the image size "
                              f"{height}x{width}")
        if self.depth < 1 or self.width < 1:
            raise ConfigError(f"depth and width must be at least 1, got {self.depth}, {self.width}")
        if self.width % self.num_heads:
            raise ConfigError(f"num_heads {self.num_heads} must divide width {self.width}")


class ResidualBlock(nn.Module):
    """conv3x3 - BN - ReLU - conv3x3 - BN, plus the input, then ReLU (ResNet's basic block)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))  # (B, C, H, W)
        return F.relu(x + self.bn2(self.conv2(y)))  # (B, C, H, W)


class ConvNet(nn.Module):
    """Stem (conv3x3 - BN - ReLU) and ``depth`` residual blocks at one resolution; no head (the
    final head is the model's last exit, ``cnn_head``)."""

    feature_layout = MAP
    num_prefix_tokens = 0

    def __init__(self, config: CNNConfig):
        super().__init__()
        config.validate()
        self.config = config
        height, width = _pair(config.img_size)
        self.embed_dim = config.width
        self.num_heads = config.num_heads
        self.grid_size = (height // config.stem_stride, width // config.stem_stride)
        self.num_tokens = self.grid_size[0] * self.grid_size[1]
        self.stem = nn.Sequential(
            nn.Conv2d(config.in_chans, config.width, 3, stride=config.stem_stride, padding=1,
                      bias=False),
            nn.BatchNorm2d(config.width),
            nn.ReLU(),
        )
        self.blocks = nn.ModuleList(ResidualBlock(config.width) for _ in range(config.depth))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        for block in self.blocks:  # start each residual branch near zero (as in timm's ResNets)
            nn.init.zeros_(block.bn2.weight)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def in_chans(self) -> int:
        return self.config.in_chans

    @property
    def img_size(self) -> tuple[int, int]:
        return _pair(self.config.img_size)

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """The stem's feature map, (B, C, H, W)."""
        return self.stem(image)


@register_backbone("cnn")
def _cnn_backbone(options: dict[str, Any]) -> nn.Module:
    try:
        config = CNNConfig(**options)
    except TypeError as exc:
        raise ConfigError(f"bad CNN backbone options {options!r}: {exc}") from exc
    return ConvNet(config)


@register_exit("cnn_head")
class GlobalPoolHead(ExitHead):
    """The CNN's final head: global average pooling of the feature map, then a linear layer
    (the ResNet head)."""

    def __init__(self, context: ExitContext, confidence: str = "max_softmax"):
        super().__init__(context, confidence)
        require_layout(context, self.type_name, MAP)
        self.fc = nn.Linear(context.embed_dim, context.num_outputs)

    def forward(self, tokens, audio=None, state=None):
        return self.fc(tokens.mean(dim=(2, 3)))  # (B, K)


@register_model
def multi_exit_cnn_digits() -> ModelConfig:
    """8x8 digits, a width-32 residual CNN of 6 blocks at 8x8, SL-ViT exits after 2 and 4."""
    return ModelConfig(
        name="multi_exit_cnn_digits",
        backbone="cnn",
        backbone_options=dict(img_size=8, in_chans=1, width=32, depth=6, num_heads=4),
        exits=[ExitSpec(2, "slvit_cnn"), ExitSpec(4, "slvit_cnn")],
        head=ExitSpec(0, "cnn_head"),
        num_outputs=10,
        preprocessing=dict(DIGITS_PREPROCESSING),
        class_names=[str(d) for d in range(10)],
    )


@register_model
def multi_exit_cnn_tiny_test() -> ModelConfig:
    """A tiny CNN model for tests: width 8, 3 blocks, an SL-ViT-CNN exit and a BoF exit."""
    return ModelConfig(
        name="multi_exit_cnn_tiny_test",
        backbone="cnn",
        backbone_options=dict(img_size=8, in_chans=1, width=8, depth=3, num_heads=2),
        exits=[ExitSpec(1, "slvit_cnn"), ExitSpec(2, "cnn_ignore")],
        head=ExitSpec(0, "cnn_head"),
        num_outputs=10,
        preprocessing=dict(DIGITS_PREPROCESSING),
    )
