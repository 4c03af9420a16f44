"""CopycatSL-ViT (Bakhtiarnia, Zhang, Iosifidis, Neural Networks 2022): exits first learn to
imitate the backbone's own final predictions, then are fine-tuned on the ground truth.

Both phases are classifier-wise: the backbone and the final head are frozen, only the early
exits learn. In the imitation phase every early exit's target is what the final head predicts
for the same (augmented) batch, so the exits learn to copy the model they sit in, including
its mistakes; the fine-tuning phase then trains on the dataset's labels as usual. Imitation can
use data without labels: pass it as ``imitation_set`` (its targets are never read).

Our choices where the paper leaves details open: the imitation targets are the final head's
*hard* predictions (class indices; a Copycat CNN queries labels) by default, or its softmax at a
temperature with ``soft=True``; for regression the targets are the final head's predicted
values. Each phase has its own :class:`TrainConfig`, so the learning-rate schedule restarts
(warm-up, cosine) for the fine-tuning phase.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from trt_exit.errors import ConfigError
from trt_exit.models.exits import CLASSIFICATION
from trt_exit.models.multi_exit import MultiExitModel
from trt_exit.training.datasets import Dataset
from trt_exit.training.trainer import CLASSIFIER_WISE, TargetsFn, TrainConfig, train


def final_head_targets(soft: bool = False, temperature: float = 1.0) -> TargetsFn:
    """A ``targets_fn`` for :func:`~trt_exit.training.trainer.train` that gives every exit the
    frozen final head's prediction on the batch.

    Args:
        soft: Classification: the final head's softmax (at ``temperature``) instead of its
            argmax.
        temperature: Softmax temperature of soft targets.

    Returns:
        ``targets_fn(model, inputs, targets) -> one target per exit``; the final head's own
        target stays the dataset's (its loss weight is 0 in classifier-wise training anyway).
    """
    if temperature <= 0:
        raise ConfigError(f"temperature must be positive, got {temperature}")

    def targets_fn(model: MultiExitModel, inputs: dict[str, torch.Tensor],
                   targets: torch.Tensor) -> list[torch.Tensor]:
        from trt_exit import tensor_names as tn

        final = model.num_exits - 1
        needs_state = model.exits[final].carries_state
        # The teacher's prediction without dropout or batch-norm updates; every module's mode
        # is put back afterwards (the trainer keeps a frozen backbone in eval mode).
        modes = [(module, module.training) for module in model.modules()]
        model.eval()
        with torch.no_grad():
            x = inputs[model.backbone_input]
            audio = inputs.get(tn.AUDIO)
            state = None
            for index in range(model.num_exits):
                x = model.run_segment(index, x)
                if index == final:
                    output, _ = model.run_exit(index, x, audio, state)
                elif needs_state and model.exits[index].carries_state:
                    _, state = model.run_exit(index, x, audio, state)
        for module, mode in modes:
            module.training = mode
        head = model.exits[final]
        if model.task == CLASSIFICATION:
            teacher = ((output / temperature).softmax(dim=-1) if soft
                       else output.argmax(dim=-1))
        else:
            teacher = head.prediction(output).to(targets.dtype)  # (B, values)
        return [teacher] * final + [targets]

    return targets_fn


@dataclass
class CopycatConfig:
    """The two phases of CopycatSL-ViT training.

    Attributes:
        imitation: Training recipe of the imitation phase (classifier-wise, no backbone epochs).
        finetune: Training recipe of the fine-tuning phase on the ground truth (same rules); 0
            epochs skips it (imitation only).
        soft: Imitate the final head's softmax instead of its argmax (classification).
        temperature: Softmax temperature of soft targets.
    """

    imitation: TrainConfig = field(default_factory=lambda: TrainConfig(
        regime=CLASSIFIER_WISE, epochs=30))
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(
        regime=CLASSIFIER_WISE, epochs=30))
    soft: bool = False
    temperature: float = 1.0

    def validate(self) -> None:
        for name, phase in (("imitation", self.imitation), ("finetune", self.finetune)):
            if phase.regime != CLASSIFIER_WISE or phase.backbone_epochs:
                raise ConfigError(
                    f"CopycatSL-ViT's {name} phase trains the exits of a trained backbone: use "
                    f"regime='classifier_wise' and backbone_epochs=0 (train the backbone first)"
                )


def copycat_train(
    model: MultiExitModel,
    train_set: Dataset,
    config: CopycatConfig | None = None,
    val_set: Dataset | None = None,
    imitation_set: Dataset | None = None,
    progress: bool = True,
    epoch_callback=None,
    resume_from: str | None = None,
) -> dict[str, Any]:
    """Trains ``model``'s early exits CopycatSL-ViT style, in place.

    Args:
        model: A model whose backbone and final head are already trained (they stay frozen).
        train_set: Labelled data of the fine-tuning phase (and of imitation by default).
        config: The two phases (defaults: :class:`CopycatConfig`).
        val_set: If given, per-exit validation metrics after every epoch of both phases.
        imitation_set: Data for the imitation phase; its labels are not used.
        progress: Show progress bars.
        epoch_callback: As for :func:`~trt_exit.training.trainer.train`; phases are reported as
            ``imitation:<phase>`` and ``finetune:<phase>``.
        resume_from: A state saved through ``epoch_callback``: its stage continues after its
            epoch (imitation is skipped when the state is from fine-tuning). The model's weights
            must already be loaded from it.

    Returns:
        ``{"imitation": history dict, "finetune": history dict or None}``.
    """
    config = config or CopycatConfig()
    config.validate()
    resume = None
    if resume_from is not None:
        resume = torch.load(resume_from, map_location="cpu", weights_only=True)
        stage, _, phase = str(resume.get("phase")).partition(":")
        if stage not in ("imitation", "finetune"):
            raise ConfigError(f"{resume_from} is not a CopycatSL-ViT training state")
        resume = {**resume, "phase": phase, "stage": stage}

    def tagged(stage: str):
        if epoch_callback is None:
            return None
        return lambda phase, epoch, state: epoch_callback(f"{stage}:{phase}", epoch, state)

    def resumed(stage: str):
        return resume if resume is not None and resume["stage"] == stage else None

    imitation = None
    if resume is None or resume["stage"] == "imitation":
        imitation = train(model, imitation_set or train_set, config.imitation, val_set, progress,
                          targets_fn=final_head_targets(config.soft, config.temperature),
                          epoch_callback=tagged("imitation"), resume_from=resumed("imitation"))
    finetune = None
    if config.finetune.epochs:
        finetune = train(model, train_set, config.finetune, val_set, progress,
                         epoch_callback=tagged("finetune"), resume_from=resumed("finetune"))
    return {"imitation": imitation.to_dict() if imitation is not None else None,  # resumed after
            "finetune": finetune.to_dict() if finetune is not None else None,
            "config": {"imitation": dataclasses.asdict(config.imitation),
                       "finetune": dataclasses.asdict(config.finetune),
                       "soft": config.soft, "temperature": config.temperature}}
