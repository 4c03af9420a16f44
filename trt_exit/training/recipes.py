"""Named training recipes for multi-exit models, all on one budget.

A recipe name is a base and optional modifiers joined by ``+``, e.g.
``two_phase+ensemble+calibrate``. Every recipe derived from one base
:class:`~trt_exit.training.config.TrainConfig` passes over the training split the same number of
times (``TrainConfig.sample_epochs``, the base's ``epochs``), so recipes and the static
models they are compared with get the same budget (epochs x samples).

Bases:

* ``end_to_end``: everything trained together, the final head weighted 2x (Multi-Exit ViT);
* ``two_phase``: the recipe used with pretrained backbones: backbone + final head first (a
  static model, :data:`TWO_PHASE_SPLIT` of the epochs), then the exits on the frozen features
  with self-distillation from the final head, then a short joint fine-tune of everything at a
  tenth of the learning rate.

Modifiers:

* ``distill``: self-distillation (Be Your Own Teacher, Zhang et al. 2019): each early exit
  learns the final head's softened outputs (weight :data:`DISTILL_WEIGHT`, temperature
  :data:`DISTILL_TEMPERATURE`) as well as the labels (``two_phase`` always distills);
* ``ensemble``: every early exit becomes a cumulative ensemble of itself and the exits before it
  (Zero Time Waste, :mod:`trt_exit.models.exits.ensemble`), the same head inside;
* ``calibrate``: per-exit temperature scaling on the validation split after training.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from trt_exit.errors import ConfigError
from trt_exit.training.config import CLASSIFIER_WISE, END_TO_END, TrainConfig

BASES = ("end_to_end", "two_phase")
MODIFIERS = ("distill", "ensemble", "calibrate")
#: Self-distillation weight and temperature of the ``distill`` modifier and ``two_phase``.
DISTILL_WEIGHT = 0.5
DISTILL_TEMPERATURE = 3.0
#: ``two_phase``: shares of the epochs for backbone + final head, exits, joint fine-tune.
TWO_PHASE_SPLIT = (0.7, 0.2, 0.1)
#: ``two_phase``: fine-tune learning rate relative to the base's.
FINETUNE_LR_FACTOR = 0.1


@dataclass
class Recipe:
    """A training recipe: the training config and the early exits it trains.

    Attributes:
        name: The recipe's name (``base+modifier+...``).
        train: The training config.
        ensemble: Whether the model's early exits become ensemble exits.
    """

    name: str
    train: TrainConfig
    ensemble: bool = False

    def exits(self, specs: list) -> list:
        """The early exits this recipe trains, from the model's own ``specs``."""
        from trt_exit.models import ExitSpec

        if not self.ensemble:
            return list(specs)
        return [ExitSpec(s.after_block, "ensemble", {"base": s.type, "base_options": dict(s.options)})
                if s.type != "ensemble" else s for s in specs]


def parse_recipe(name: str) -> tuple[str, tuple[str, ...]]:
    """``"two_phase+ensemble"`` -> ``("two_phase", ("ensemble",))``; a clear error otherwise."""
    base, *modifiers = [part.strip() for part in name.split("+")]
    unknown = [m for m in modifiers if m not in MODIFIERS]
    if base not in BASES or unknown or len(set(modifiers)) != len(modifiers):
        raise ConfigError(f"unknown recipe {name!r}: use a base ({', '.join(BASES)}) followed by "
                          f"modifiers ({', '.join(MODIFIERS)}) joined by '+', e.g. "
                          f"two_phase+ensemble+calibrate")
    return base, tuple(modifiers)


def make_recipe(name: str, base: TrainConfig) -> Recipe:
    """The recipe ``name`` on the budget of ``base`` (its epochs, learning rate, batch size,
    augmentation; ``base`` should be an end-to-end config without distillation)."""
    kind, modifiers = parse_recipe(name)
    total = base.epochs
    train = dataclasses.replace(base, regime=END_TO_END, backbone_epochs=0, finetune_epochs=0,
                                distill_weight=0.0, calibrate=False)
    if "distill" in modifiers or kind == "two_phase":
        train = dataclasses.replace(train, distill_weight=DISTILL_WEIGHT,
                                    distill_temperature=DISTILL_TEMPERATURE)
    if kind == "two_phase":
        if total < 3:
            raise ConfigError(f"two_phase splits the epochs into three phases: it needs at least "
                              f"3 epochs, got {total}")
        exits = max(1, math.floor(TWO_PHASE_SPLIT[1] * total + 0.5))
        finetune = max(1, math.floor(TWO_PHASE_SPLIT[2] * total + 0.5))
        backbone = total - exits - finetune
        train = dataclasses.replace(train, regime=CLASSIFIER_WISE, backbone_epochs=backbone,
                                    epochs=exits, finetune_epochs=finetune,
                                    finetune_lr=base.lr * FINETUNE_LR_FACTOR)
    if "calibrate" in modifiers:
        train = dataclasses.replace(train, calibrate=True)
    if train.sample_epochs != total:  # the budget is the point of the comparison
        raise ConfigError(f"recipe {name} would train {train.sample_epochs} epochs, not {total}")
    return Recipe(name, train, ensemble="ensemble" in modifiers)


def static_train(base: TrainConfig) -> TrainConfig:
    """How the static baselines are trained on ``base``'s budget: end to end, labels only."""
    return dataclasses.replace(base, regime=END_TO_END, backbone_epochs=0, finetune_epochs=0,
                               distill_weight=0.0, calibrate=False)
