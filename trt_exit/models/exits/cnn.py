"""CNN exits of Multi-Exit ViT (Bakhtiarnia, Zhang, Iosifidis, BMVC 2021): the patch tokens
are put back on their 2-D grid and a small convolutional head classifies them.

The three families differ only in what they do with the class token before the grid is built
(the same three "readout" options as DPT's reassemble step):

* ``cnn_ignore``: drop it; the grid is the patch tokens alone. Also reads CNN feature maps
  directly (there is no class token to drop), so it is the plain convolutional exit of the CNN
  backbone;
* ``cnn_add``: add it to every patch token;
* ``cnn_project``: concatenate it to every patch token and project back to C channels
  (Linear 2C -> C, then GELU).

Our choices where the paper leaves details open: a LayerNorm over the channels first (the
tokens of a pre-norm ViT are not normalized between blocks); one 3x3 convolution (``conv_dim``
channels, default C) with GELU; 2x2 max pooling with ``ceil_mode`` (odd grids keep their last
row and column); the pooled map flattened into an MLP (one hidden layer of ``hidden_dim``, default
C). Flattening keeps where on the grid a feature was, which a global average would lose; the
first MLP layer therefore grows with the grid (C x ceil(Gh/2) x ceil(Gw/2) inputs).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trt_exit.errors import ConfigError
from trt_exit.models.exits.base import ExitContext, ExitHead, register_exit
from trt_exit.models.exits.layout import (
    MAP,
    TOKENS,
    map_to_tokens,
    require_class_token,
    require_layout,
    tokens_to_map,
)


class ConvHead(nn.Module):
    """Conv 3x3 - GELU - max pool - flatten - Linear - GELU - Linear on a (B, C, H, W) grid."""

    def __init__(self, in_dim: int, grid_size: tuple[int, int], conv_dim: int, hidden_dim: int,
                 num_outputs: int, pool: int = 2):
        super().__init__()
        if pool < 1:
            raise ConfigError(f"pool must be >= 1, got {pool}")
        self.conv = nn.Conv2d(in_dim, conv_dim, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(pool, pool, ceil_mode=True) if pool > 1 else nn.Identity()
        pooled = math.ceil(grid_size[0] / pool) * math.ceil(grid_size[1] / pool)
        self.fc1 = nn.Linear(conv_dim * pooled, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.gelu(self.conv(x)))  # (B, D, H', W')
        return self.fc2(F.gelu(self.fc1(x.flatten(1))))  # (B, K)


class _CNNExit(ExitHead):
    """Shared body of the three CNN exits; subclasses build the grid from the tokens.

    Args:
        context: Where the exit is attached.
        conv_dim: Channels of the convolution; defaults to the token width.
        hidden_dim: Width of the MLP's hidden layer; defaults to the token width.
        pool: Max-pooling window and stride (1 = no pooling).
        confidence: Confidence measure, see :mod:`trt_exit.models.confidence`.
    """

    def __init__(self, context: ExitContext, conv_dim: int | None = None,
                 hidden_dim: int | None = None, pool: int = 2, confidence: str = "max_softmax"):
        super().__init__(context, confidence)
        self.layout = self._check_layout(context)
        self.conv_dim = int(conv_dim or context.embed_dim)
        self.hidden_dim = int(hidden_dim or context.embed_dim)
        self.pool_size = int(pool)
        self.norm = nn.LayerNorm(context.embed_dim, eps=1e-6)
        self.head = ConvHead(context.embed_dim, context.grid_size, self.conv_dim, self.hidden_dim,
                             context.num_outputs, self.pool_size)

    def _check_layout(self, context: ExitContext) -> str:
        require_class_token(context, self.type_name)
        return TOKENS

    def grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """The (B, C, Gh, Gw) grid the convolution reads."""
        raise NotImplementedError

    def forward(self, tokens, audio=None, state=None):
        return self.head(self.grid(tokens))  # (B, K)

    def options(self) -> dict:
        return {"conv_dim": self.conv_dim, "hidden_dim": self.hidden_dim, "pool": self.pool_size}


@register_exit("cnn_ignore")
class CNNIgnoreExit(_CNNExit):
    """CNN-ignore-EE: the class token is dropped; reads ViT tokens or CNN feature maps."""

    def _check_layout(self, context: ExitContext) -> str:
        return require_layout(context, self.type_name, TOKENS, MAP)

    def grid(self, tokens):
        if self.layout == MAP:
            x = self.norm(map_to_tokens(tokens))  # (B, H*W, C)
        else:
            x = self.norm(tokens[:, self.context.num_prefix_tokens :])  # (B, Gh*Gw, C)
        return tokens_to_map(x, self.context.grid_size)  # (B, C, Gh, Gw)


@register_exit("cnn_add")
class CNNAddExit(_CNNExit):
    """CNN-add-EE: the class token is added to every patch token (other prefix tokens, such as
    register tokens, are dropped)."""

    def grid(self, tokens):
        x = self.norm(tokens)  # (B, N, C)
        patches = x[:, self.context.num_prefix_tokens :] + x[:, :1]  # (B, Gh*Gw, C)
        return tokens_to_map(patches, self.context.grid_size)  # (B, C, Gh, Gw)


@register_exit("cnn_project")
class CNNProjectExit(_CNNExit):
    """CNN-project-EE: the class token is concatenated to every patch token and the pair is
    projected back to C channels (Linear 2C -> C, GELU)."""

    def __init__(self, context: ExitContext, conv_dim: int | None = None,
                 hidden_dim: int | None = None, pool: int = 2, confidence: str = "max_softmax"):
        super().__init__(context, conv_dim, hidden_dim, pool, confidence)
        self.project = nn.Linear(2 * context.embed_dim, context.embed_dim)

    def grid(self, tokens):
        x = self.norm(tokens)  # (B, N, C)
        patches = x[:, self.context.num_prefix_tokens :]  # (B, P, C)
        cls = x[:, :1].expand_as(patches)  # (B, P, C)
        x = F.gelu(self.project(torch.cat([patches, cls], dim=-1)))  # (B, P, C)
        return tokens_to_map(x, self.context.grid_size)  # (B, C, Gh, Gw)
