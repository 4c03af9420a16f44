"""ViT-EE (Multi-Exit ViT, Bakhtiarnia et al. 2021): one more transformer encoder layer, then a
classifier on the class token.

How it differs from SL-ViT (:mod:`trt_exit.models.exits.slvit`), both being "one encoder layer
and a head": ViT-EE *continues* the backbone. It reads the backbone's tokens as they are, class
token included, with no projection, no new class token and no new position embedding (the
positions the backbone added at its input are still in the tokens), so the exit is literally
one extra block of the backbone followed by the ViT head. SL-ViT instead treats the tokens as
the input of a *new* single-layer ViT: optionally projected to its own width, with its own
class token and its own learned position embedding.

Our choices where the paper leaves details open: a standard pre-norm block of the backbone's
width with the backbone's head count (``num_heads`` and ``mlp_ratio`` may be changed), and a
final LayerNorm before the linear classifier, as in the backbone's own head.
"""

from __future__ import annotations

from torch import nn

from trt_exit.models.exits.base import ExitContext, ExitHead, register_exit
from trt_exit.models.exits.layout import require_class_token
from trt_exit.models.vit import Block


@register_exit("vitee")
class ViTEEExit(ExitHead):
    """One pre-norm encoder block over the backbone's tokens, LayerNorm, Linear on the class token.

    Args:
        context: Where the exit is attached.
        num_heads: Attention heads; defaults to the backbone's.
        mlp_ratio: Hidden width of the block's MLP relative to the token width.
        confidence: Confidence measure, see :mod:`trt_exit.models.confidence`.
    """

    def __init__(self, context: ExitContext, num_heads: int | None = None, mlp_ratio: float = 2.0,
                 confidence: str = "max_softmax"):
        super().__init__(context, confidence)
        require_class_token(context, self.type_name)
        heads = int(num_heads or context.num_heads)
        self.num_heads = heads if context.embed_dim % heads == 0 else 1
        self.mlp_ratio = float(mlp_ratio)
        self.block = Block(context.embed_dim, self.num_heads, self.mlp_ratio)
        self.norm = nn.LayerNorm(context.embed_dim, eps=1e-6)
        self.fc = nn.Linear(context.embed_dim, context.num_outputs)

    def forward(self, tokens, audio=None, state=None):
        x = self.block(tokens)  # (B, N, C)
        return self.fc(self.norm(x[:, 0]))  # (B, K)

    def options(self) -> dict:
        return {"num_heads": self.num_heads, "mlp_ratio": self.mlp_ratio}
