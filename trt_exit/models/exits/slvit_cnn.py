"""SL-ViT exit over CNN feature maps (Bakhtiarnia, Zhang, Iosifidis, Neural Networks 2022).

For CNN backbones the single-layer ViT gets its tokens the way a ViT gets them from an image:
the (B, C, H, W) feature map is cut into non-overlapping ``patch_size`` x ``patch_size`` patches
and each patch is linearly projected to the exit width (a strided convolution, which is exactly
that projection); then, as for token backbones (:mod:`trt_exit.models.exits.slvit`), a fresh
class token is prepended, a learned position embedding is added, one pre-norm encoder layer
mixes the tokens and a linear head reads the class token.

Our choices where the paper leaves details open: ``patch_size`` 2 when it divides the map (else
1: every pixel a token), exit width ``dim`` equal to the map's channels, the backbone's
default head count, and a final LayerNorm before the classifier.
"""

from __future__ import annotations

import torch
from torch import nn

from trt_exit.errors import ConfigError
from trt_exit.models.exits.base import ExitContext, ExitHead, register_exit
from trt_exit.models.exits.layout import MAP, require_layout
from trt_exit.models.vit import Block


@register_exit("slvit_cnn")
class SLViTCNNExit(ExitHead):
    """Single-layer ViT exit over (B, C, H, W) feature maps.

    Args:
        context: Where the exit is attached (a backbone with ``feature_layout == "map"``).
        patch_size: Side of the square patches cut from the map; must divide H and W
            (default: 2 if it does, else 1).
        dim: Width of the exit's encoder layer; defaults to the map's channels.
        num_heads: Attention heads; defaults to the backbone's (or 1 when it does not divide
            ``dim``).
        mlp_ratio: Hidden width of the encoder layer's MLP relative to ``dim``.
        confidence: Confidence measure, see :mod:`trt_exit.models.confidence`.
    """

    def __init__(self, context: ExitContext, patch_size: int | None = None,
                 dim: int | None = None, num_heads: int | None = None, mlp_ratio: float = 2.0,
                 confidence: str = "max_softmax"):
        super().__init__(context, confidence)
        require_layout(context, self.type_name, MAP)
        height, width = context.grid_size
        if patch_size is None:
            patch_size = 2 if height % 2 == 0 and width % 2 == 0 else 1
        self.patch_size = int(patch_size)
        if self.patch_size < 1 or height % self.patch_size or width % self.patch_size:
            raise ConfigError(
                f"slvit_cnn patch_size {self.patch_size} must divide the {height}x{width} feature "
                f"map; pick a divisor of both sides"
            )
        self.dim = int(dim or context.embed_dim)
        heads = int(num_heads or context.num_heads)
        self.num_heads = heads if self.dim % heads == 0 else 1
        self.mlp_ratio = float(mlp_ratio)
        num_patches = (height // self.patch_size) * (width // self.patch_size)
        self.patch_embed = nn.Conv2d(context.embed_dim, self.dim, self.patch_size, self.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, self.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, self.dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.block = Block(self.dim, self.num_heads, self.mlp_ratio)
        self.norm = nn.LayerNorm(self.dim, eps=1e-6)
        self.fc = nn.Linear(self.dim, context.num_outputs)

    def forward(self, tokens, audio=None, state=None):
        x = self.patch_embed(tokens)  # (B, D, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (B, P, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # (B, P+1, D)
        x = self.block(x)
        return self.fc(self.norm(x[:, 0]))  # (B, K)

    def options(self) -> dict:
        return {"patch_size": self.patch_size, "dim": self.dim, "num_heads": self.num_heads,
                "mlp_ratio": self.mlp_ratio}
