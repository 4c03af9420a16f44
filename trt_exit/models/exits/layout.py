"""What an exit reads: token sequences (ViTs) or feature maps (CNNs), and helpers for both.

A backbone says which it hands to its exits with a ``feature_layout`` attribute:

* ``"tokens"`` (the default, every ViT): (B, N, C), prefix (class) tokens first, then the patch
  tokens of a ``grid_size`` grid in row-major order;
* ``"map"`` (the CNN backbone of :mod:`trt_exit.models.cnn`): (B, C, H, W) with
  ``grid_size == (H, W)`` and no prefix tokens.

Exit families check the layout when they are built, so a family that needs a class token fails
with a clear message instead of a shape error at the first forward pass.
"""

from __future__ import annotations

import torch

from trt_exit.errors import ConfigError
from trt_exit.models.exits.base import ExitContext

TOKENS = "tokens"
MAP = "map"
LAYOUTS = (TOKENS, MAP)


def feature_layout(context: ExitContext) -> str:
    """``"tokens"`` or ``"map"``: what the backbone of ``context`` hands to its exits."""
    layout = getattr(context.backbone, "feature_layout", TOKENS)
    if layout not in LAYOUTS:
        raise ConfigError(f"backbone feature_layout {layout!r} is not one of {LAYOUTS}")
    return layout


def require_layout(context: ExitContext, family: str, *allowed: str) -> str:
    """Returns the layout of ``context`` if ``family`` supports it, else raises ConfigError."""
    layout = feature_layout(context)
    if layout not in allowed:
        raise ConfigError(
            f"the {family!r} exit reads {' or '.join(allowed)}, but this backbone hands its exits "
            f"{layout} ({'(B, C, H, W) feature maps' if layout == MAP else '(B, N, C) tokens'}); "
            f"choose a family that supports {layout} (see docs/exits.md)"
        )
    return layout


def require_class_token(context: ExitContext, family: str) -> None:
    """Raises ConfigError unless ``context`` has token features with a class token first."""
    require_layout(context, family, TOKENS)
    if context.num_prefix_tokens < 1 or not context.has_class_token:
        what = ("no prefix tokens" if context.num_prefix_tokens < 1 else
                f"no class token (its {context.num_prefix_tokens} prefix tokens are register "
                f"tokens)")
        raise ConfigError(
            f"the {family!r} exit reads the class token, but this backbone has {what}; "
            f"use a family that reads patch tokens only (cnn_ignore, mixer, resmlp, slvit, bof)"
        )


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C), positions in row-major order."""
    return x.flatten(2).transpose(1, 2)


def tokens_to_map(x: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """(B, H*W, C) patch tokens in row-major order -> (B, C, H, W)."""
    height, width = grid_size
    return x.transpose(1, 2).reshape(-1, x.shape[2], height, width)


def local_features(x: torch.Tensor, context: ExitContext, layout: str) -> torch.Tensor:
    """One feature vector per spatial position, (B, P, C): the patch tokens (prefix tokens
    dropped) or the map's pixels."""
    if layout == MAP:
        return map_to_tokens(x)  # (B, H*W, C)
    return x[:, context.num_prefix_tokens :]  # (B, Gh*Gw, C)
