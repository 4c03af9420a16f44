"""The final head: the backbone's last exit, as a plain ViT classifier.

Kept in the exit registry so that the final head and the early exits go through one code path
(stage split, export, confidence, runtime).
"""

from __future__ import annotations

import torch
from torch import nn

from trt_exit.models.exits.base import ExitContext, ExitHead, register_exit
from trt_exit.models.exits.layout import TOKENS, require_class_token, require_layout


@register_exit("vit_head")
class ClassTokenHead(ExitHead):
    """LayerNorm over the tokens, then a linear layer on the class token (or the token mean).

    This is the standard ViT head (the final norm of a pre-norm ViT belongs to it here).

    Args:
        context: Where the head is attached.
        pool: ``"token"`` reads the class token; ``"avg"`` averages the patch tokens.
        confidence: Confidence measure, see :mod:`trt_exit.models.confidence`.
    """

    def __init__(self, context: ExitContext, pool: str = "token", confidence: str = "max_softmax"):
        super().__init__(context, confidence)
        if pool not in ("token", "avg"):
            raise ValueError(f"pool must be 'token' or 'avg', got {pool!r}")
        if pool == "token":
            require_class_token(context, self.type_name)
        else:
            require_layout(context, self.type_name, TOKENS)
        self.pool = pool
        self.norm = nn.LayerNorm(context.embed_dim, eps=1e-6)
        self.fc = nn.Linear(context.embed_dim, context.num_outputs)

    def forward(self, tokens, audio=None, state=None):
        x = self.norm(tokens)  # (B, N, C)
        if self.pool == "token":
            x = x[:, 0]  # (B, C)
        else:
            x = x[:, self.context.num_prefix_tokens :].mean(dim=1)  # (B, C)
        return self.fc(x)  # (B, K)

    def options(self) -> dict:
        return {"pool": self.pool}
