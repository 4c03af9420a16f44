"""MLP-Mixer-EE (Multi-Exit ViT, Bakhtiarnia et al. 2021): one MLP-Mixer layer, then a
classifier on the mean token.

A Mixer layer (Tolstikhin et al. 2021) mixes information across tokens with an MLP applied to
each channel (token mixing), then across channels with an MLP applied to each token (channel
mixing), each with a residual connection and a LayerNorm in front.

Our choices where the paper leaves details open: every backbone token takes part, the class
token included (the token-mixing MLP has N = ``num_tokens`` inputs, so the exit is tied to the
backbone's token count, like the Mixer itself is to its patch count); hidden widths follow
timm's Mixer defaults relative to the token width C (``tokens_ratio`` 0.5 for token mixing,
``mlp_ratio`` 2 like the backbone's blocks for channel mixing); a final LayerNorm, the mean over
tokens and a linear classifier, as in the Mixer's own head.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from trt_exit.models.exits.base import ExitContext, ExitHead, register_exit
from trt_exit.models.exits.layout import TOKENS, require_layout
from trt_exit.models.vit import Mlp


class MixerLayer(nn.Module):
    """x + token_mlp(norm(x)^T)^T, then x + channel_mlp(norm(x)) over (B, N, C)."""

    def __init__(self, num_tokens: int, dim: int, tokens_hidden: int, channels_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.token_fc1 = nn.Linear(num_tokens, tokens_hidden)
        self.token_fc2 = nn.Linear(tokens_hidden, num_tokens)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.channel_mlp = Mlp(dim, channels_hidden)

    def forward(self, x):
        y = self.norm1(x).transpose(1, 2)  # (B, C, N)
        y = self.token_fc2(F.gelu(self.token_fc1(y)))  # (B, C, N)
        x = x + y.transpose(1, 2)  # (B, N, C)
        return x + self.channel_mlp(self.norm2(x))  # (B, N, C)


@register_exit("mixer")
class MixerExit(ExitHead):
    """One Mixer layer over all backbone tokens, LayerNorm, mean over tokens, Linear.

    Args:
        context: Where the exit is attached.
        tokens_ratio: Hidden width of the token-mixing MLP relative to the token width C.
        mlp_ratio: Hidden width of the channel-mixing MLP relative to C.
        confidence: Confidence measure, see :mod:`trt_exit.models.confidence`.
    """

    def __init__(self, context: ExitContext, tokens_ratio: float = 0.5, mlp_ratio: float = 2.0,
                 confidence: str = "max_softmax"):
        super().__init__(context, confidence)
        require_layout(context, self.type_name, TOKENS)
        self.tokens_ratio = float(tokens_ratio)
        self.mlp_ratio = float(mlp_ratio)
        dim = context.embed_dim
        self.layer = MixerLayer(context.num_tokens, dim, max(1, int(dim * self.tokens_ratio)),
                                max(1, int(dim * self.mlp_ratio)))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc = nn.Linear(dim, context.num_outputs)

    def forward(self, tokens, audio=None, state=None):
        x = self.layer(tokens)  # (B, N, C)
        return self.fc(self.norm(x).mean(dim=1))  # (B, K)

    def options(self) -> dict:
        return {"tokens_ratio": self.tokens_ratio, "mlp_ratio": self.mlp_ratio}
