"""ResMLP-EE (Multi-Exit ViT, Bakhtiarnia et al. 2021): one ResMLP layer, then a classifier on
the mean token.

A ResMLP layer (Touvron et al. 2021) replaces LayerNorm with a per-channel affine map
``Aff(x) = alpha * x + beta``, mixes tokens with a single linear layer across the token axis
and channels with a two-layer MLP, each residual branch scaled by a learned per-channel
"layer scale".

Our choices where the paper leaves details open: a LayerNorm in front of the layer (the tokens
of a pre-norm ViT are not normalized between blocks and ResMLP has no normalization of its own
to absorb that); every backbone token takes part, class token included (the token-mixing layer
is N x N); layer scales start at 0.1 (ResMLP's value for shallow networks); the channel MLP is
``mlp_ratio`` (default 2, like the backbone's blocks) times wider than C; the head is a final
affine map, the mean over tokens and a linear classifier, as in ResMLP.
"""

from __future__ import annotations

import torch
from torch import nn

from trt_exit.models.exits.base import ExitContext, ExitHead, register_exit
from trt_exit.models.exits.layout import TOKENS, require_layout
from trt_exit.models.vit import Mlp


class Affine(nn.Module):
    """Per-channel ``alpha * x + beta`` over the last axis."""

    def __init__(self, dim: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return self.alpha * x + self.beta


class ResMLPLayer(nn.Module):
    """x + ls1 * linear_tokens(Aff(x)), then x + ls2 * mlp(Aff(x)) over (B, N, C)."""

    def __init__(self, num_tokens: int, dim: int, hidden: int, init_scale: float = 0.1):
        super().__init__()
        self.norm1 = Affine(dim)
        self.token_fc = nn.Linear(num_tokens, num_tokens)
        self.norm2 = Affine(dim)
        self.mlp = Mlp(dim, hidden)
        self.ls1 = nn.Parameter(torch.full((dim,), init_scale))
        self.ls2 = nn.Parameter(torch.full((dim,), init_scale))

    def forward(self, x):
        y = self.token_fc(self.norm1(x).transpose(1, 2)).transpose(1, 2)  # (B, N, C)
        x = x + self.ls1 * y
        return x + self.ls2 * self.mlp(self.norm2(x))  # (B, N, C)


@register_exit("resmlp")
class ResMLPExit(ExitHead):
    """LayerNorm, one ResMLP layer over all backbone tokens, Affine, mean over tokens, Linear.

    Args:
        context: Where the exit is attached.
        mlp_ratio: Hidden width of the channel MLP relative to the token width C.
        init_scale: Initial layer scale of both residual branches.
        confidence: Confidence measure, see :mod:`trt_exit.models.confidence`.
    """

    def __init__(self, context: ExitContext, mlp_ratio: float = 2.0, init_scale: float = 0.1,
                 confidence: str = "max_softmax"):
        super().__init__(context, confidence)
        require_layout(context, self.type_name, TOKENS)
        self.mlp_ratio = float(mlp_ratio)
        self.init_scale = float(init_scale)
        dim = context.embed_dim
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.layer = ResMLPLayer(context.num_tokens, dim, max(1, int(dim * self.mlp_ratio)),
                                 self.init_scale)
        self.head_norm = Affine(dim)
        self.fc = nn.Linear(dim, context.num_outputs)

    def forward(self, tokens, audio=None, state=None):
        x = self.layer(self.norm(tokens))  # (B, N, C)
        return self.fc(self.head_norm(x).mean(dim=1))  # (B, K)

    def options(self) -> dict:
        return {"mlp_ratio": self.mlp_ratio, "init_scale": self.init_scale}
