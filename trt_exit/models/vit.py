"""Vision Transformer backbone that exposes its intermediate tokens.

Read top to bottom: patch embedding, attention, MLP, block, the backbone, the final head.
The backbone contract that exits and the stage split rely on (timm ViTs satisfy it through
:mod:`trt_exit.models.timm_adapter`):

* ``embed(image)`` returns the tokens entering block 0, (B, N, C), prefix (class) tokens first;
* ``blocks`` is an ``nn.ModuleList`` of blocks mapping (B, N, C) to (B, N, C);
* ``embed_dim``, ``num_heads``, ``num_prefix_tokens``, ``grid_size`` (patch rows, columns) and
  ``num_tokens`` describe the token layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from trt_exit.errors import ConfigError


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if len(value) != 2:
        raise ConfigError(f"expected an int or (height, width), got {value!r}")
    return (int(value[0]), int(value[1]))


@dataclass
class ViTConfig:
    """Backbone hyper-parameters.

    Attributes:
        img_size: Input height and width in pixels (an int for square inputs).
        patch_size: Side of the square patches; must divide both image sides.
        in_chans: Input channels (1 for digits and spectrograms, 3 for RGB).
        embed_dim: Token width C.
        depth: Number of transformer blocks.
        num_heads: Attention heads; must divide ``embed_dim``.
        mlp_ratio: Hidden width of the block MLP relative to ``embed_dim``.
        qkv_bias: Whether the qkv projection has a bias.
        drop_path_rate: Stochastic-depth rate of the last block (linear ramp), training only.
        dropout: Dropout after the embedding and inside MLPs, training only.
        stem_channels: 0 for the plain patch projection; otherwise a 3x3 convolution to this
            many channels and a GELU run first, at full resolution (a convolutional stem:
            early convolutions make small ViTs learn faster, Xiao et al., NeurIPS 2021).
    """

    img_size: int | tuple[int, int] = 8
    patch_size: int = 2
    in_chans: int = 1
    embed_dim: int = 64
    depth: int = 8
    num_heads: int = 4
    mlp_ratio: float = 2.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.0
    dropout: float = 0.0
    stem_channels: int = 0

    def validate(self) -> None:
        """Raises :class:`ConfigError` when the configuration is inconsistent."""
        height, width = _pair(self.img_size)
        if self.patch_size <= 0 or height % self.patch_size or width % self.patch_size:
            raise ConfigError(
                f"patch_size {self.patch_size} must divide the image size {height}x{width}"
            )
        if self.embed_dim % self.num_heads:
            raise ConfigError(
                f"num_heads {self.num_heads} must divide embed_dim {self.embed_dim}"
            )
        if self.depth < 1:
            raise ConfigError(f"depth must be at least 1, got {self.depth}")
        if self.stem_channels < 0:
            raise ConfigError(f"stem_channels must be >= 0, got {self.stem_channels}")


class PatchEmbed(nn.Module):
    """Cuts the image into non-overlapping patches and projects each to C channels, after an
    optional 3x3 convolution + GELU stem of ``stem_channels`` channels."""

    def __init__(self, img_size: tuple[int, int], patch_size: int, in_chans: int, dim: int,
                 stem_channels: int = 0):
        super().__init__()
        self.img_size = img_size
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.stem = (nn.Conv2d(in_chans, stem_channels, kernel_size=3, padding=1)
                     if stem_channels else None)
        self.proj = nn.Conv2d(stem_channels or in_chans, dim, kernel_size=patch_size,
                              stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stem is not None:
            x = F.gelu(self.stem(x))  # (B, S, H, W)
        x = self.proj(x)  # (B, C, Gh, Gw)
        return x.flatten(2).transpose(1, 2)  # (B, Gh*Gw, C)


class Attention(nn.Module):
    """Multi-head self-attention, written out so that it exports to plain ONNX ops."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, D)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, H, N, N)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(batch, tokens, dim)  # (B, N, C)
        return self.proj(x)


class Mlp(nn.Module):
    """Two linear layers with GELU between them."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample while training."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    """Pre-norm transformer encoder block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 2.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def make_blocks(depth: int, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool,
                drop_path_rate: float, dropout: float) -> nn.ModuleList:
    """``depth`` pre-norm blocks, stochastic depth rising linearly to ``drop_path_rate``."""
    rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
    return nn.ModuleList(Block(dim, num_heads, mlp_ratio, qkv_bias, rate, dropout)
                         for rate in rates)


def init_linear_layers(module: nn.Module) -> None:
    """ViT initialization of every Linear below ``module``: truncated normal (std 0.02) weights,
    zero biases."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.trunc_normal_(layer.weight, std=0.02)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class VisionTransformer(nn.Module):
    """ViT backbone: patch embedding, class token, learned positions, pre-norm blocks.

    The backbone has no head: the final head is the model's last exit (see
    :class:`trt_exit.models.exits.head.ClassTokenHead`), so that intermediate and final exits are
    handled alike.
    """

    num_prefix_tokens = 1

    def __init__(self, config: ViTConfig):
        super().__init__()
        config.validate()
        self.config = config
        img_size = _pair(config.img_size)
        self.embed_dim = config.embed_dim
        self.num_heads = config.num_heads
        self.patch_embed = PatchEmbed(img_size, config.patch_size, config.in_chans, config.embed_dim,
                                      config.stem_channels)
        self.grid_size = self.patch_embed.grid_size
        self.num_tokens = self.grid_size[0] * self.grid_size[1] + self.num_prefix_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, config.embed_dim))
        self.pos_drop = nn.Dropout(config.dropout)
        self.blocks = make_blocks(config.depth, config.embed_dim, config.num_heads,
                                  config.mlp_ratio, config.qkv_bias, config.drop_path_rate,
                                  config.dropout)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        init_linear_layers(self)

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
        """Patch tokens with the class token prepended and positions added: (B, N, C)."""
        x = self.patch_embed(image)  # (B, N-1, C)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, C)
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # (B, N, C)
        return self.pos_drop(x)

    def forward_intermediates(
        self, image: torch.Tensor, indices: Sequence[int]
    ) -> list[torch.Tensor]:
        """Tokens after each block count in ``indices`` (1 = after the first block)."""
        wanted = set(indices)
        x = self.embed(image)
        out = []
        for count, block in enumerate(self.blocks, start=1):
            x = block(x)
            if count in wanted:
                out.append(x)
        return out
