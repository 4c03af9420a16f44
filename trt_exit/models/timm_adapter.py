"""Attach early exits to a timm VisionTransformer (DeiT and ViT checkpoints).

:func:`attach_exits` wraps a timm ``VisionTransformer`` without copying or changing it: its patch
embedding, position embedding and blocks become the backbone, and the final exit is timm's own
``norm`` + ``forward_head``, so the final exit reproduces ``timm_model(x)``. Early exits from the
registry are attached after the chosen blocks and trained as usual (classifier-wise keeps the
pretrained backbone frozen).

timm is an optional dependency: ``pip install 'trt-exit[timm]'``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from trt_exit.errors import ConfigError, require
from trt_exit.models.exits import ExitContext, ExitHead, register_exit
from trt_exit.models.multi_exit import (
    ExitSpec,
    ModelConfig,
    MultiExitModel,
    build_exits,
    register_backbone,
)


def _timm():
    return require("timm", "timm", "Attaching exits to timm models")


class TimmBackbone(nn.Module):
    """A timm ``VisionTransformer`` seen through the backbone contract of
    :mod:`trt_exit.models.vit` (``embed``, ``blocks`` and the token layout)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        for attribute in ("patch_embed", "blocks", "_pos_embed", "norm", "forward_head"):
            if not hasattr(model, attribute):
                raise ConfigError(
                    f"{type(model).__name__} is not a timm VisionTransformer (no {attribute!r}); "
                    f"attach_exits supports timm.models.vision_transformer models"
                )
        self.model = model
        self.blocks = model.blocks
        self.embed_dim = model.embed_dim
        self.num_heads = model.blocks[0].attn.num_heads
        self.num_prefix_tokens = model.num_prefix_tokens
        self.grid_size = tuple(model.patch_embed.grid_size)
        self.num_tokens = self.grid_size[0] * self.grid_size[1] + self.num_prefix_tokens
        self.in_chans = model.patch_embed.proj.in_channels
        self.img_size = tuple(model.patch_embed.img_size)

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """timm's ``forward_features`` up to the first block: (B, N, C)."""
        m = self.model
        x = m.patch_embed(image)
        x = m._pos_embed(x)
        x = m.patch_drop(x)
        return m.norm_pre(x)


@register_exit("timm_head")
class TimmHead(ExitHead):
    """The timm model's own head: ``norm`` then ``forward_head`` (pooling, fc_norm, head).

    It owns no parameters: they stay in the wrapped timm model (the backbone), so freezing the
    backbone freezes the pretrained head too, as classifier-wise training wants.
    """

    def __init__(self, context: ExitContext, confidence: str = "max_softmax"):
        super().__init__(context, confidence)
        if not isinstance(context.backbone, TimmBackbone):
            raise ConfigError("the timm_head exit only follows a timm backbone")
        object.__setattr__(self, "_timm", context.backbone.model)  # not a submodule

    def forward(self, tokens, audio=None, state=None):
        return self._timm.forward_head(self._timm.norm(tokens))  # (B, K)


def _create_kwargs(model: nn.Module) -> dict[str, Any]:
    """Keyword arguments that make ``timm.create_model`` rebuild ``model``'s architecture."""
    block = model.blocks[0]
    return {
        "img_size": list(model.patch_embed.img_size),
        "patch_size": list(model.patch_embed.patch_size),
        "in_chans": model.patch_embed.proj.in_channels,
        "num_classes": model.num_classes,
        "embed_dim": model.embed_dim,
        "depth": len(model.blocks),
        "num_heads": block.attn.num_heads,
        "mlp_ratio": block.mlp.fc1.out_features / model.embed_dim,
        "qkv_bias": block.attn.qkv.bias is not None,
        "global_pool": model.global_pool,
        "class_token": model.cls_token is not None,
        "no_embed_class": model.no_embed_class,
        "reg_tokens": model.num_reg_tokens,
    }


@register_backbone("timm")
def _timm_backbone(options: dict[str, Any]) -> nn.Module:
    timm = _timm()
    kwargs = dict(options.get("kwargs", {}))
    model = timm.create_model(options["model_name"], pretrained=False, **kwargs)
    return TimmBackbone(model)


def attach_exits(
    model: nn.Module,
    exit_blocks: Sequence[int],
    exit_type: str | Sequence[str] = "mlp",
    exit_options: dict[str, Any] | Sequence[dict[str, Any]] | None = None,
    name: str | None = None,
    confidence: str = "max_softmax",
) -> MultiExitModel:
    """Wraps a timm ViT as a :class:`MultiExitModel` with exits after ``exit_blocks``.

    Args:
        model: A ``timm.models.vision_transformer.VisionTransformer`` (any weights).
        exit_blocks: Blocks run before each early exit, increasing, each < depth.
        exit_type: One registered exit family for all exits, or one per exit.
        exit_options: Options for the exit family, one dict for all or one per exit.
        name: Model name (default: the timm architecture name + ``_exits``).
        confidence: Confidence measure of every exit.

    Returns:
        The multi-exit model; its final exit is timm's head and reproduces ``model(x)``.
    """
    backbone = TimmBackbone(model)
    types = [exit_type] * len(exit_blocks) if isinstance(exit_type, str) else list(exit_type)
    options = exit_options if isinstance(exit_options, (list, tuple)) else [exit_options or {}] * len(exit_blocks)
    if not len(types) == len(options) == len(exit_blocks):
        raise ConfigError("give one exit type and one options dict per exit (or one for all)")
    architecture = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    config = ModelConfig(
        name=name or f"{architecture}_exits",
        backbone="timm",
        backbone_options={"model_name": architecture, "kwargs": _create_kwargs(model)},
        exits=[ExitSpec(int(b), t, dict(o)) for b, t, o in zip(exit_blocks, types, options)],
        head=ExitSpec(0, "timm_head"),
        num_outputs=model.num_classes,
        confidence=confidence,
        preprocessing={"mean": list(cfg.get("mean", (0.485, 0.456, 0.406))),
                       "std": list(cfg.get("std", (0.229, 0.224, 0.225))),
                       "formula": "x = (rgb / 255 - mean) / std", "layout": "NCHW float32",
                       "source": f"timm pretrained_cfg of {architecture}"},
    )
    heads, blocks = build_exits(backbone, config)
    return MultiExitModel(backbone, heads, blocks, config)
