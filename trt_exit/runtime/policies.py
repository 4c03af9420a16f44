"""Exit policies: when the executor stops.

* :class:`ThresholdPolicy`: stop at the first exit whose confidence reaches its threshold
  (a threshold of None disables that exit: its head is not even run).
* :class:`FixedExitPolicy`: always stop at one exit; the exit heads before it are skipped.
* :class:`AllExitsPolicy`: run everything and return every exit's output (evaluation).
* :class:`DeadlinePolicy`: thresholds as above, and also stop when the next segment and exit
  (their profiled latency) no longer fit in the remaining time budget.

NaN confidences never count as confident.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from trt_exit.errors import ConfigError


class Policy:
    """Base class of exit policies."""

    def validate(self, num_exits: int) -> None:
        """Raises :class:`ConfigError` if the policy does not fit a model with ``num_exits``."""

    def exit_enabled(self, index: int, num_exits: int) -> bool:
        """Whether exit ``index``'s head runs at all."""
        return True

    def describe(self) -> dict:
        return {"policy": type(self).__name__}


def check_thresholds(thresholds: Sequence[float | None], num_exits: int) -> list[float | None]:
    """Validates early-exit thresholds: one per early exit (a trailing final-head value is
    accepted and ignored), each in [0, 1] or None (exit disabled)."""
    values = list(thresholds)
    if len(values) == num_exits:
        values = values[:-1]
    if len(values) != num_exits - 1:
        raise ConfigError(
            f"expected {num_exits - 1} thresholds (one per early exit) for a model with "
            f"{num_exits} exits, got {len(thresholds)}"
        )
    for index, value in enumerate(values):
        if value is None:
            continue
        if not isinstance(value, (int, float)) or math.isnan(value) or not 0.0 <= value <= 1.0:
            raise ConfigError(
                f"threshold of exit {index} is {value!r}; thresholds are confidences in [0, 1] "
                f"(or None to disable the exit)"
            )
    return [None if v is None else float(v) for v in values]


@dataclass
class ThresholdPolicy(Policy):
    """Stop at the first exit with ``confidence >= threshold``.

    Attributes:
        thresholds: One per early exit, in [0, 1], or None to disable an exit.
    """

    thresholds: list[float | None]

    def validate(self, num_exits: int) -> None:
        self.thresholds = check_thresholds(self.thresholds, num_exits)

    def exit_enabled(self, index: int, num_exits: int) -> bool:
        return index == num_exits - 1 or self.thresholds[index] is not None

    def threshold(self, index: int, num_exits: int) -> float | None:
        """Threshold of exit ``index`` (None: disabled; the final head: 0)."""
        return 0.0 if index == num_exits - 1 else self.thresholds[index]

    def describe(self) -> dict:
        return {"policy": "thresholds", "thresholds": list(self.thresholds)}


@dataclass
class FixedExitPolicy(Policy):
    """Always stop at exit ``exit_index`` (negative counts from the end: -1 is the final head)."""

    exit_index: int

    def resolve(self, num_exits: int) -> int:
        index = self.exit_index + num_exits if self.exit_index < 0 else self.exit_index
        return index

    def validate(self, num_exits: int) -> None:
        if not 0 <= self.resolve(num_exits) < num_exits:
            raise ConfigError(
                f"exit index {self.exit_index} is out of range for a model with {num_exits} exits"
            )

    def exit_enabled(self, index: int, num_exits: int) -> bool:
        return index == self.resolve(num_exits)

    def describe(self) -> dict:
        return {"policy": "fixed", "exit": self.exit_index}


@dataclass
class AllExitsPolicy(Policy):
    """Run every segment and exit on every sample; results carry every exit's output."""

    def describe(self) -> dict:
        return {"policy": "all"}


@dataclass
class DeadlinePolicy(ThresholdPolicy):
    """Thresholds, plus a time budget per inference.

    Before segment ``k + 1`` runs, the executor checks whether its profiled latency plus that of
    the next enabled exit fits in ``budget_ms`` minus the time spent so far; if not, every
    remaining sample takes the current exit.

    Attributes:
        thresholds: As for :class:`ThresholdPolicy` (all None: exit only on the deadline).
        budget_ms: Time budget of one inference, in milliseconds.
        stage_latency_ms: Profiled latency of each stage by name (from the manifest).
    """

    budget_ms: float = 0.0
    stage_latency_ms: dict[str, float] = field(default_factory=dict)

    def validate(self, num_exits: int) -> None:
        super().validate(num_exits)
        if not self.budget_ms > 0 or math.isinf(self.budget_ms):
            raise ConfigError(f"budget_ms must be a positive number, got {self.budget_ms!r}")
        if not self.stage_latency_ms:
            raise ConfigError(
                "deadline mode needs the stages' profiled latency: run trt-exit tune (or "
                "trt-exit profile) to record it in the manifest"
            )

    def describe(self) -> dict:
        return {"policy": "deadline", "budget_ms": self.budget_ms, "thresholds": self.thresholds}
