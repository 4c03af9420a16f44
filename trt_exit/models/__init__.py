"""Backbones, exit heads and multi-exit models."""

from trt_exit.models.multi_exit import (
    ExitSpec,
    ModelConfig,
    MultiExitModel,
    build_model,
    create_model,
    model_config,
    model_names,
    register_backbone,
    register_model,
)
from trt_exit.models.vit import ViTConfig, VisionTransformer
from trt_exit.models import timm_adapter  # noqa: E402,F401  registers the timm backbone and head
from trt_exit.models import audio_vit, audiovisual  # noqa: E402,F401  registers the audio and AV models
from trt_exit.models import cnn  # noqa: E402,F401  registers the CNN backbone and its head

__all__ = [
    "ExitSpec",
    "ModelConfig",
    "MultiExitModel",
    "ViTConfig",
    "VisionTransformer",
    "build_model",
    "create_model",
    "model_config",
    "model_names",
    "register_backbone",
    "register_model",
]
