"""Losses over all exits of a multi-exit model."""

from __future__ import annotations

from typing import Sequence

import torch

from trt_exit.models.multi_exit import MultiExitModel


def exit_weights(num_exits: int, final_weight: float = 2.0) -> list[float]:
    """Weights of the exits' losses: 1 for each early exit, ``final_weight`` for the final head.

    Multi-Exit ViT's end-to-end regime weights the final exit twice as much as the others.
    """
    return [1.0] * (num_exits - 1) + [float(final_weight)]


def multi_exit_loss(
    model: MultiExitModel,
    outputs: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor] | torch.Tensor,
    weights: Sequence[float],
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Weighted mean of the exits' own losses (see :meth:`ExitHead.loss`).

    Args:
        model: The model whose exits produced ``outputs``.
        outputs: One output per exit, the final head last.
        targets: One target for all exits, or one per exit (distillation gives each exit the
            backbone's predictions).
        weights: Loss weight per exit; exits with weight 0 are skipped.
        label_smoothing: Cross-entropy label smoothing for classification.
    """
    if isinstance(targets, torch.Tensor):
        targets = [targets] * len(outputs)
    total = outputs[0].new_zeros(())
    weight_sum = 0.0
    for head, output, target, weight in zip(model.exits, outputs, targets, weights):
        if weight:
            total = total + weight * head.loss(output, target, label_smoothing)
            weight_sum += weight
    return total / max(weight_sum, 1e-12)
