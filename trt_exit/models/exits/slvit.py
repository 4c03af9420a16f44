"""SL-ViT exit (Bakhtiarnia, Zhang, Iosifidis, Neural Networks 2022): a single-layer ViT.

The exit treats the backbone's intermediate tokens as the input sequence of a one-layer vision
transformer: they are projected to the exit width, a fresh class token is prepended, a learned
position embedding is added, one pre-norm encoder layer mixes them, and a linear head reads the
new class token.
"""

from __future__ import annotations

import torch
from torch import nn

from trt_exit.models.exits.base import ExitContext, ExitHead, register_exit
from trt_exit.models.exits.layout import TOKENS, require_layout
from trt_exit.models.vit import Block


@register_exit("slvit")
class SLViTExit(ExitHead):
    """Single-layer ViT exit over token backbones.

    Our choices where the paper leaves details open: every backbone token (the backbone's class
    token included) enters the sequence; the projection is a Linear layer, an identity when
    ``dim`` equals the token width; the encoder layer is a standard pre-norm block.

    Args:
        context: Where the exit is attached.
        dim: Width of the exit's encoder layer; defaults to the token width.
        num_heads: Attention heads; defaults to the backbone's (or 1 when it does not divide
            ``dim``).
        mlp_ratio: Hidden width of the encoder layer's MLP relative to ``dim``.
        confidence: Confidence measure, see :mod:`trt_exit.models.confidence`.
    """

    def __init__(self, context: ExitContext, dim: int | None = None, num_heads: int | None = None,
                 mlp_ratio: float = 2.0, confidence: str = "max_softmax"):
        super().__init__(context, confidence)
        require_layout(context, self.type_name, TOKENS)  # feature maps: see slvit_cnn
        self.dim = int(dim or context.embed_dim)
        heads = num_heads or context.num_heads
        self.num_heads = int(heads if self.dim % heads == 0 else 1)
        self.mlp_ratio = float(mlp_ratio)
        self.project = (nn.Identity() if self.dim == context.embed_dim
                        else nn.Linear(context.embed_dim, self.dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, self.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, context.num_tokens + 1, self.dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.block = Block(self.dim, self.num_heads, self.mlp_ratio)
        self.norm = nn.LayerNorm(self.dim, eps=1e-6)
        self.fc = nn.Linear(self.dim, context.num_outputs)

    def forward(self, tokens, audio=None, state=None):
        x = self.project(tokens)  # (B, N, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # (B, N+1, D)
        x = self.block(x)
        return self.fc(self.norm(x[:, 0]))  # (B, K)

    def options(self) -> dict:
        return {"dim": self.dim, "num_heads": self.num_heads, "mlp_ratio": self.mlp_ratio}
