"""What every exit head is, and the registry that creates them by name.

An exit head maps the backbone's tokens after some block, (B, N, C), to a prediction
(B, num_outputs): class logits for classification, values for regression. The per-sample
confidence is computed from that prediction by :meth:`ExitHead.confidence`, inside the exported
graph, so that the runtime can decide to stop without looking at the logits.

Exit families register themselves with :func:`register_exit`; :func:`create_exit` builds one from
its registered name, so configs, checkpoints and the CLI name exits by string.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from trt_exit.errors import ConfigError
from trt_exit.models import confidence as confidence_measures

#: ``log b`` of heads that predict their own error is clamped to this range in the loss, so one
#: wild sample cannot blow it up.
LOG_SCALE_RANGE = (-7.0, 7.0)

CLASSIFICATION = "classification"
REGRESSION = "regression"
TASKS = (CLASSIFICATION, REGRESSION)


@dataclass(frozen=True)
class ExitContext:
    """What an exit head needs to know about where it is attached.

    Attributes:
        embed_dim: Token width C of the backbone.
        num_heads: Attention heads of the backbone (a default for attention-based exits).
        num_tokens: Tokens per sample N, prefix tokens included.
        num_prefix_tokens: Leading non-patch tokens (the class token), usually 1.
        grid_size: Patch grid (rows, columns); N - num_prefix_tokens == rows * columns.
        num_outputs: Classes (classification) or regression outputs.
        task: ``"classification"`` or ``"regression"``.
        audio_shape: Per-sample shape of the model's audio input, for audiovisual exits; None
            for image-only models.
        backbone: The backbone module itself, for heads that reuse its parts (the timm head);
            not part of the context's identity.
        shared: One dict per model, handed to every exit head of it: heads that share modules
            across exits (the BoF family's single classifier) keep them here.
        has_class_token: Whether the first prefix token is a class token (False for ViTs with
            register tokens only: then the prefix tokens are registers, which exits that read
            a class token must not take for one).
    """

    embed_dim: int
    num_heads: int
    num_tokens: int
    num_prefix_tokens: int
    grid_size: tuple[int, int]
    num_outputs: int
    task: str = CLASSIFICATION
    audio_shape: tuple[int, ...] | None = None
    backbone: Any = field(default=None, repr=False, compare=False)
    shared: dict = field(default_factory=dict, repr=False, compare=False)
    has_class_token: bool = True

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"unknown task {self.task!r}; expected one of {TASKS}")
        patches = self.grid_size[0] * self.grid_size[1]
        if self.num_tokens - self.num_prefix_tokens != patches:
            raise ConfigError(
                f"{self.num_tokens} tokens with {self.num_prefix_tokens} prefix tokens do not "
                f"fill a {self.grid_size[0]}x{self.grid_size[1]} patch grid"
            )


class ExitHead(nn.Module):
    """Base class of exit heads.

    Subclasses set ``type_name`` (through :func:`register_exit`) and implement :meth:`forward`.
    A head that reads the audio input sets ``uses_audio``; a head that hands state to the next
    exit of the same model (the BoF family's accumulated histogram) sets ``carries_state`` and
    then takes ``state`` (None at the first such exit) and returns ``(output, new_state)``.
    """

    type_name: ClassVar[str] = ""
    uses_audio: bool = False
    carries_state: bool = False

    def __init__(self, context: ExitContext, confidence: str = confidence_measures.MAX_SOFTMAX):
        super().__init__()
        self.context = context
        self.confidence_measure = confidence_measures.check(confidence, context.task)
        # Temperature scaling (Guo et al., 2017): classification outputs leave the head divided
        # by it (see calibrated), so the exported graph's confidence is the calibrated one. 1
        # until trt_exit.training.calibration sets it on a validation split.
        self.register_buffer("temperature", torch.ones(()))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before calibration existed have no temperature: 1, as trained.
        state_dict.setdefault(prefix + "temperature", torch.ones(()))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def calibrated(self, output: torch.Tensor) -> torch.Tensor:
        """This head's output as the model hands it on: classification logits divided by the
        head's temperature; other outputs as they are."""
        if self.context.task != CLASSIFICATION:
            return output
        return output / self.temperature

    def forward(
        self,
        tokens: torch.Tensor,
        audio: torch.Tensor | None = None,
        state: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def confidence(self, output: torch.Tensor) -> torch.Tensor:
        """Per-sample confidence in [0, 1], (B,), from this head's output (B, num_outputs)."""
        return confidence_measures.compute(self.confidence_measure, output)

    @property
    def predicts_error(self) -> bool:
        """Regression with the ``predicted_error`` confidence: the output's last column is
        ``log b``, the head's expected absolute error (see :mod:`trt_exit.models.confidence`)."""
        return (self.context.task != CLASSIFICATION
                and self.confidence_measure == confidence_measures.PREDICTED_ERROR)

    def loss(self, output: torch.Tensor, target: torch.Tensor,
             label_smoothing: float = 0.0) -> torch.Tensor:
        """Training loss of this head: cross-entropy for classification (``target`` holds class
        indices, or class probabilities for distillation), L1 on the value columns for
        regression, plus, for heads that predict their error, the Laplace negative log
        likelihood ``log b + |y - mu| / b`` of the last column with ``mu`` detached (predicting
        the error never pulls the prediction). Families may override it."""
        if self.context.task == CLASSIFICATION:
            return F.cross_entropy(output, target, label_smoothing=label_smoothing)
        target = target.reshape(target.shape[0], -1).to(output.dtype)  # (B, V)
        if not self.predicts_error:
            return F.l1_loss(output[:, : target.shape[1]], target)
        if output.shape[1] < 2:
            raise ConfigError("a head with the predicted_error confidence needs num_outputs >= 2 "
                              "(values, then log b)")
        error = (output[:, :-1][:, : target.shape[1]] - target).abs()  # (B, V)
        log_b = output[:, -1:].clamp(*LOG_SCALE_RANGE)  # (B, 1)
        return error.mean() + (log_b + error.detach() / log_b.exp()).mean()

    def prediction(self, output: torch.Tensor) -> torch.Tensor:
        """The task's prediction from this head's output: the output itself, except for heads
        whose output carries extra columns (which keep only the value columns)."""
        return output[:, :-1] if self.predicts_error else output

    def options(self) -> dict:
        """Constructor options that recreate this head (stored in checkpoints and manifests)."""
        return {}


ExitT = TypeVar("ExitT", bound=type[ExitHead])
_REGISTRY: dict[str, type[ExitHead]] = {}


def register_exit(name: str) -> Callable[[ExitT], ExitT]:
    """Class decorator that registers an exit family under ``name``."""

    def decorate(cls: ExitT) -> ExitT:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ConfigError(f"exit type {name!r} is registered twice")
        cls.type_name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def exit_types() -> list[str]:
    """Names of every registered exit family."""
    return sorted(_REGISTRY)


def exit_class(type_name: str) -> type[ExitHead]:
    """The class registered under ``type_name``; a clear error lists the known names."""
    try:
        return _REGISTRY[type_name]
    except KeyError:
        raise ConfigError(
            f"unknown exit type {type_name!r}; known exit types: {', '.join(exit_types())}"
        ) from None


def create_exit(type_name: str, context: ExitContext, **options) -> ExitHead:
    """Builds the exit head registered under ``type_name`` for ``context``."""
    cls = exit_class(type_name)
    try:
        return cls(context, **options)
    except TypeError as exc:
        raise ConfigError(f"bad options {options!r} for exit type {type_name!r}: {exc}") from exc
