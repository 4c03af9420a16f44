"""Losses over all exits of a multi-exit model."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from trt_exit.errors import ConfigError
from trt_exit.models.exits import CLASSIFICATION
from trt_exit.models.multi_exit import MultiExitModel


def exit_weights(num_exits: int, final_weight: float = 2.0) -> list[float]:
    """Weights of the exits' losses: 1 for each early exit, ``final_weight`` for the final head.

    Multi-Exit ViT's end-to-end regime weights the final exit twice as much as the others.
    """
    return [1.0] * (num_exits - 1) + [float(final_weight)]


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, batch mean (Hinton et al.'s
    scaling keeps its gradients on the scale of the label loss's for any T)."""
    log_student = F.log_softmax(student / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher.detach() / temperature, dim=-1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean",
                    log_target=True) * temperature ** 2


def multi_exit_loss(
    model: MultiExitModel,
    outputs: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor] | torch.Tensor,
    weights: Sequence[float],
    label_smoothing: float = 0.0,
    distill_weight: float = 0.0,
    distill_temperature: float = 1.0,
) -> torch.Tensor:
    """Weighted mean of the exits' losses (see :meth:`ExitHead.loss`).

    Args:
        model: The model whose exits produced ``outputs``.
        outputs: One output per exit, the final head last.
        targets: One target for all exits, or one per exit (distillation gives each exit the
            backbone's predictions).
        weights: Loss weight per exit; exits with weight 0 are skipped.
        label_smoothing: Cross-entropy label smoothing for classification.
        distill_weight: ``a`` > 0 makes every early exit's loss
            ``(1 - a) * own loss + a * distillation_loss(exit, final head)`` (Be Your Own
            Teacher's self-distillation; the final head's output is the teacher, detached).
        distill_temperature: Softmax temperature of the distillation term.
    """
    if isinstance(targets, torch.Tensor):
        targets = [targets] * len(outputs)
    if distill_weight and model.task != CLASSIFICATION:
        raise ConfigError("distillation (distill_weight > 0) applies to classification models")
    final = len(outputs) - 1
    teacher = outputs[final].detach()
    total = outputs[0].new_zeros(())
    weight_sum = 0.0
    for k, (head, output, target, weight) in enumerate(zip(model.exits, outputs, targets, weights)):
        if not weight:
            continue
        loss = head.loss(output, target, label_smoothing)
        if distill_weight and k != final:
            loss = ((1.0 - distill_weight) * loss
                    + distill_weight * distillation_loss(output, teacher, distill_temperature))
        total = total + weight * loss
        weight_sum += weight
    return total / max(weight_sum, 1e-12)
