"""Audiovisual SL-ViT exit: audio and visual tokens fused inside a single-layer ViT exit.

SL-ViT (Bakhtiarnia, Zhang, Iosifidis, Neural Networks 2022) counts crowds from an image plus
one second of audio (DISCO) with audio and visual features fused *inside* the exits, so an exit
can decide with vision, audio or both. Here the exit's input sequence is built from

* the backbone's tokens after the exit's block (visual), projected to the exit width, with a
  learned position per token, and/or
* the model's ``audio`` input (a log-mel spectrogram, computed on the host) cut into
  mel x frame patches and projected to the exit width, with a learned position per patch,

each with a learned modality embedding, plus a fresh class token; one pre-norm encoder layer
mixes them and a linear head reads the class token. ``modality`` chooses which tokens enter:
``"visual"`` (the image only; the exit does not read the audio input), ``"audio"`` (the
spectrogram only: the exit ignores the backbone's tokens and is as good after block 1 as after
block 11), or ``"audiovisual"``. Our choices where the paper leaves details open: the audio
patch embedding belongs to each exit (exits share no weights, so every exit graph stands
alone); modality embeddings; the output scaling below.

Regression (crowd counting): the head predicts the count *and* its own expected error. Output
columns are ``[value_1 .. value_V, log_b]``: V = num_outputs - 1 values (the count), then the
log of a Laplace scale ``b``, the expected absolute error of the values in their units (persons).
The values are trained with L1 (the metric is MAE); ``log_b`` with the Laplace negative log
likelihood ``log b + |y - mu| / b`` with ``mu`` detached, so predicting the error never pulls
the prediction. The confidence ``predicted_error`` is ``1 / (1 + b) = sigmoid(-log_b)`` in
[0, 1], computed in the graph: 0.5 means "I expect to be off by one person". Why Laplace and
not a Gaussian: the metric is MAE, and a Laplace scale *is* the expected absolute error, so
the confidence reads directly in the metric's units. Values are produced as
``value_offset + value_scale * linear(...)`` so a freshly initialized head starts in the
right range (counts of tens) without thousands of steps moving a bias.

Classification: plain logits and the usual cross-entropy, confidence as configured.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from trt_exit.errors import ConfigError
from trt_exit.models import confidence as confidence_measures
from trt_exit.models.audio_layers import AudioPatchEmbed
from trt_exit.models.exits.base import (
    CLASSIFICATION,
    LOG_SCALE_RANGE,
    ExitContext,
    ExitHead,
    register_exit,
)
from trt_exit.models.exits.layout import TOKENS, require_layout
from trt_exit.models.vit import Block

MODALITIES = ("audio", "visual", "audiovisual")

#: Regression confidence of AV exits: 1 / (1 + predicted absolute error), in [0, 1] (defined
#: with the other measures; kept importable from here).
PREDICTED_ERROR = confidence_measures.PREDICTED_ERROR
predicted_error_confidence = confidence_measures.predicted_error_confidence

#: log b is clamped to this range in the loss, so one wild sample cannot blow it up.
_LOG_SCALE_RANGE = LOG_SCALE_RANGE


@register_exit("av_slvit")
class AudioVisualSLViTExit(ExitHead):
    """Single-layer ViT exit over visual tokens, audio patches, or both.

    Args:
        context: Where the exit is attached (``context.audio_shape`` is needed unless the
            modality is ``"visual"``).
        modality: ``"visual"``, ``"audio"`` or ``"audiovisual"``.
        dim: Width of the exit's encoder layer; defaults to the backbone's token width.
        num_heads: Attention heads; defaults to the backbone's (1 when it does not divide
            ``dim``).
        mlp_ratio: Hidden width of the encoder layer's MLP relative to ``dim``.
        audio_patch: (mel bands, frames) per audio patch; must divide the spectrogram's sides.
        value_offset: Regression only: the value a zero linear output means.
        value_scale: Regression only: value units per unit of linear output.
        confidence: Confidence measure (``predicted_error`` for regression).
    """

    def __init__(self, context: ExitContext, modality: str = "audiovisual",
                 dim: int | None = None, num_heads: int | None = None, mlp_ratio: float = 2.0,
                 audio_patch: int | Sequence[int] = (8, 8), value_offset: float = 0.0,
                 value_scale: float = 1.0, confidence: str | None = None):
        regression = context.task != CLASSIFICATION
        if confidence is None:
            confidence = PREDICTED_ERROR if regression else confidence_measures.MAX_SOFTMAX
        super().__init__(context, confidence)
        require_layout(context, self.type_name or "av_slvit", TOKENS)
        if modality not in MODALITIES:
            raise ConfigError(f"unknown modality {modality!r}; choose one of {MODALITIES}")
        if regression and context.num_outputs < 2:
            raise ConfigError(
                "an av_slvit regression head outputs its values and a log error scale: the "
                f"model needs num_outputs >= 2 (values + 1), got {context.num_outputs}"
            )
        if value_scale <= 0:
            raise ConfigError(f"value_scale must be positive, got {value_scale}")
        self.modality = modality
        self.uses_audio = modality != "visual"
        self.regression = regression
        self.dim = int(dim or context.embed_dim)
        heads = num_heads or context.num_heads
        self.num_heads = int(heads if self.dim % heads == 0 else 1)
        self.mlp_ratio = float(mlp_ratio)
        self.value_offset = float(value_offset)
        self.value_scale = float(value_scale)
        self.audio_patch = tuple(int(v) for v in (
            (audio_patch, audio_patch) if isinstance(audio_patch, int) else audio_patch))

        if modality != "audio":
            self.project = (nn.Identity() if self.dim == context.embed_dim
                            else nn.Linear(context.embed_dim, self.dim))
            self.visual_pos = nn.Parameter(torch.zeros(1, context.num_tokens, self.dim))
            nn.init.trunc_normal_(self.visual_pos, std=0.02)
        if modality != "visual":
            if context.audio_shape is None:
                raise ConfigError(
                    f"a {modality!r} av_slvit exit reads the audio input, but the model config "
                    f"has no audio_shape: set ModelConfig.audio_shape to (1, n_mels, frames)"
                )
            self.audio_embed = AudioPatchEmbed(context.audio_shape, self.audio_patch, self.dim)
        if modality == "audiovisual":
            self.modality_embed = nn.Parameter(torch.zeros(1, 2, self.dim))  # visual, audio
            nn.init.trunc_normal_(self.modality_embed, std=0.02)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, self.dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.block = Block(self.dim, self.num_heads, self.mlp_ratio)
        self.norm = nn.LayerNorm(self.dim, eps=1e-6)
        self.fc = nn.Linear(self.dim, context.num_outputs)
        nn.init.trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def forward(self, tokens, audio=None, state=None):
        parts = []
        if self.modality != "audio":
            visual = self.project(tokens) + self.visual_pos  # (B, N, D)
            if self.modality == "audiovisual":
                visual = visual + self.modality_embed[:, :1]
            parts.append(visual)
        if self.modality != "visual":
            if audio is None:
                raise ConfigError(f"the {self.modality!r} exit needs the model's audio input")
            sound = self.audio_embed(audio)  # (B, Na, D)
            if self.modality == "audiovisual":
                sound = sound + self.modality_embed[:, 1:]
            parts.append(sound)
        # The batch size comes from the tokens in every modality: an audio-only exit graph
        # still reads its tokens input (as a shape), so every exit graph has the same interface.
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, *parts], dim=1)  # (B, 1 + N [+ Na], D)
        x = self.block(x)
        out = self.fc(self.norm(x[:, 0]))  # (B, K)
        if not self.regression:
            return out
        values = self.value_offset + self.value_scale * out[:, :-1]  # (B, V)
        log_scale = out[:, -1:] + math.log(self.value_scale)  # (B, 1) log b in value units
        return torch.cat([values, log_scale], dim=1)  # (B, V + 1)

    def prediction(self, output: torch.Tensor) -> torch.Tensor:
        """The values without the log error scale (regression); the logits (classification)."""
        return output[:, :-1] if self.regression else output

    def loss(self, output: torch.Tensor, target: torch.Tensor,
             label_smoothing: float = 0.0) -> torch.Tensor:
        """L1 on the values plus the Laplace NLL of the error scale (regression), both in units
        of ``value_scale``; cross-entropy for classification."""
        if not self.regression:
            return F.cross_entropy(output, target, label_smoothing=label_smoothing)
        target = target.reshape(target.shape[0], -1).to(output.dtype)  # (B, V)
        if target.shape[1] != output.shape[1] - 1:
            raise ConfigError(f"targets have {target.shape[1]} columns but the head predicts "
                              f"{output.shape[1] - 1} values")
        error = (output[:, :-1] - target).abs() / self.value_scale  # (B, V) normalized
        log_b = (output[:, -1:] - math.log(self.value_scale)).clamp(*_LOG_SCALE_RANGE)  # (B, 1)
        nll = log_b + error.detach() / log_b.exp()
        return error.mean() + nll.mean()

    def options(self) -> dict:
        return {"modality": self.modality, "dim": self.dim, "num_heads": self.num_heads,
                "mlp_ratio": self.mlp_ratio, "audio_patch": list(self.audio_patch),
                "value_offset": self.value_offset, "value_scale": self.value_scale,
                "confidence": self.confidence_measure}
