"""MLP-EE (Multi-Exit ViT, Bakhtiarnia et al. 2021): an MLP on the class token."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from trt_exit.models.exits.base import ExitContext, ExitHead, register_exit
from trt_exit.models.exits.layout import require_class_token


@register_exit("mlp")
class MLPExit(ExitHead):
    """LayerNorm, then Linear - GELU - Linear on the class token.

    The paper describes MLP-EE as an MLP applied to the class token; the LayerNorm in front (the
    tokens of a pre-norm ViT are not normalized between blocks) and one hidden layer of width
    ``hidden_dim`` are our choices.

    Args:
        context: Where the exit is attached.
        hidden_dim: Width of the hidden layer; defaults to the token width.
        confidence: Confidence measure, see :mod:`trt_exit.models.confidence`.
    """

    def __init__(self, context: ExitContext, hidden_dim: int | None = None,
                 confidence: str = "max_softmax"):
        super().__init__(context, confidence)
        require_class_token(context, self.type_name)
        self.hidden_dim = int(hidden_dim or context.embed_dim)
        self.norm = nn.LayerNorm(context.embed_dim, eps=1e-6)
        self.fc1 = nn.Linear(context.embed_dim, self.hidden_dim)
        self.fc2 = nn.Linear(self.hidden_dim, context.num_outputs)

    def forward(self, tokens, audio=None, state=None):
        x = self.norm(tokens[:, 0])  # (B, C) class token
        return self.fc2(F.gelu(self.fc1(x)))  # (B, K)

    def options(self) -> dict:
        return {"hidden_dim": self.hidden_dim}
