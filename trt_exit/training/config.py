"""Training hyper-parameters, importable without torch (the CLI builds its options from them)."""

from __future__ import annotations

from dataclasses import dataclass

from trt_exit.errors import ConfigError

END_TO_END = "end_to_end"
CLASSIFIER_WISE = "classifier_wise"
REGIMES = (END_TO_END, CLASSIFIER_WISE)


@dataclass
class TrainConfig:
    """Training hyper-parameters.

    Attributes:
        regime: ``"end_to_end"`` or ``"classifier_wise"``.
        epochs: Epochs of the main phase (exits only, for classifier-wise).
        backbone_epochs: Classifier-wise only: epochs training backbone + final head first
            (0 when the backbone is already trained, e.g. a timm checkpoint).
        batch_size: Samples per step.
        lr: Peak AdamW learning rate (linear warm-up, then cosine decay).
        weight_decay: AdamW weight decay.
        warmup_epochs: Epochs of linear warm-up.
        final_weight: Loss weight of the final head relative to 1 for each early exit.
        augment_shift_px: Random translation of images by up to this many pixels (0 = none).
        augment_rotate_deg: Random rotation of images by up to this many degrees (0 = none).
        augment_scale: Random zoom of images by a factor in [1 - s, 1 + s] (0 = none).
        label_smoothing: Cross-entropy label smoothing.
        seed: Seed of initialization order, shuffling and augmentation.
        val_every_epochs: With a validation split, evaluate it after every this many epochs
            (and after the last).
        num_threads: torch intra-op threads (None leaves torch's default).
        distill_weight: Self-distillation (Be Your Own Teacher, Zhang et al. 2019): each early
            exit's loss becomes ``(1 - a) * CE(labels) + a * T^2 * KL(final_T || exit_T)``
            with ``a`` this weight, the final head's output (detached) the teacher and
            ``_T`` a softmax at ``distill_temperature``; 0 = labels only. Classification only.
        distill_temperature: Softmax temperature T of distillation.
        finetune_epochs: After the main phase(s), this many epochs of every part trained
            jointly (final head weighted ``final_weight``, distillation as configured) at
            ``finetune_lr``, no warm-up: the last step of the two-phase recipe (classifier-wise
            with ``backbone_epochs``, distillation, then a short joint fine-tune).
        finetune_lr: Peak learning rate of the fine-tune (cosine decay).
        calibrate: After training, fit one temperature per exit on the validation split
            (temperature scaling, :mod:`trt_exit.training.calibration`), so exits' confidences
            (computed inside the exported graphs) are calibrated before thresholds are tuned.
            Needs a validation split.
    """

    regime: str = END_TO_END
    epochs: int = 60
    backbone_epochs: int = 0
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 3
    final_weight: float = 2.0
    augment_shift_px: int = 1
    augment_rotate_deg: float = 0.0
    augment_scale: float = 0.0
    label_smoothing: float = 0.0
    seed: int = 0
    val_every_epochs: int = 1
    num_threads: int | None = None
    distill_weight: float = 0.0
    distill_temperature: float = 3.0
    finetune_epochs: int = 0
    finetune_lr: float = 2e-4
    calibrate: bool = False

    def summary(self) -> str:
        """One line for help texts and logs, e.g. ``"250 epochs, AdamW lr 0.003, ..."``."""
        parts = [f"{self.regime}, {self.epochs} epochs", f"AdamW lr {self.lr:g}"]
        augment = [f"shift {self.augment_shift_px} px" if self.augment_shift_px else "",
                   f"rotation {self.augment_rotate_deg:g} deg" if self.augment_rotate_deg else "",
                   f"zoom {self.augment_scale:g}" if self.augment_scale else ""]
        if any(augment):
            parts.append("augmentation: " + " / ".join(a for a in augment if a))
        if self.label_smoothing:
            parts.append(f"label smoothing {self.label_smoothing:g}")
        if self.backbone_epochs and self.regime == CLASSIFIER_WISE:
            parts[0] = (f"{self.regime}, {self.backbone_epochs} backbone epochs + {self.epochs} "
                        f"exit epochs")
        if self.distill_weight:
            parts.append(f"distillation {self.distill_weight:g} at T {self.distill_temperature:g}")
        if self.finetune_epochs:
            parts.append(f"joint fine-tune {self.finetune_epochs} epochs at lr "
                         f"{self.finetune_lr:g}")
        if self.calibrate:
            parts.append("per-exit temperature calibration")
        return ", ".join(parts)

    @property
    def sample_epochs(self) -> int:
        """Passes over the training split, every phase counted (the training budget)."""
        backbone = self.backbone_epochs if self.regime == CLASSIFIER_WISE else 0
        return backbone + self.epochs + self.finetune_epochs

    def validate(self) -> None:
        if self.regime not in REGIMES:
            raise ConfigError(f"unknown training regime {self.regime!r}; choose one of {REGIMES}")
        if self.epochs < 0 or self.backbone_epochs < 0 or self.batch_size < 1:
            raise ConfigError("epochs must be >= 0 and batch_size >= 1")
        if self.val_every_epochs < 1:
            raise ConfigError("val_every_epochs must be >= 1")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ConfigError(f"distill_weight must be in [0, 1], got {self.distill_weight}")
        if not self.distill_temperature > 0:
            raise ConfigError(f"distill_temperature must be > 0, got {self.distill_temperature}")
        if self.finetune_epochs < 0 or not self.finetune_lr > 0:
            raise ConfigError("finetune_epochs must be >= 0 and finetune_lr > 0")


#: Training recipe of the demo: ViTs trained from scratch on 1,077 digits need augmentation.
#: 110 epochs at lr 4e-3 (was 150 at 3e-3, before that 250 epochs): see the README's "What
#: the demo shows" for the measured trade-off.
DEMO_TRAIN = TrainConfig(epochs=110, lr=4e-3, warmup_epochs=2, label_smoothing=0.1,
                         augment_shift_px=1, augment_rotate_deg=12.0, augment_scale=0.1, seed=0,
                         val_every_epochs=10)

#: Training recipe of the MNIST demo (``multi_exit_vit_mnist``, 50,000 training images): see
#: the README's "What the demo shows" for how it was chosen.
MNIST_DEMO_TRAIN = TrainConfig(epochs=3, batch_size=128, lr=3e-3, warmup_epochs=0,
                               label_smoothing=0.1, augment_shift_px=0, seed=0,
                               val_every_epochs=3)
