"""What sources, sinks and the live app share: frames, the session clock, errors, backoff."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trt_exit.errors import InputError


class SourceError(InputError):
    """A camera, microphone, stream or file cannot be opened or read; the message says what
    to do."""


class SourceLost(SourceError):
    """A live source stopped delivering mid-run (unplugged camera, dropped stream)."""


class SessionClock:
    """Seconds since the pipeline started, on the monotonic clock.

    Every timestamp of a run is on this clock: live frames and audio blocks are stamped when
    they are captured, files and the synthetic scene by their media time (which starts at 0 when
    the run does), so "the audio window ending at this frame" means the same thing for every
    combination of sources.
    """

    def __init__(self) -> None:
        self.start_monotonic_s = time.monotonic()

    def now_s(self) -> float:
        return time.monotonic() - self.start_monotonic_s

    def sleep_until(self, t_s: float, stop=None) -> bool:
        """Sleeps until session time ``t_s``; returns False early if ``stop`` (an Event) is set."""
        while True:
            remaining = t_s - self.now_s()
            if remaining <= 0:
                return True
            if stop is not None:
                if stop.wait(min(remaining, 0.1)):
                    return False
            else:
                time.sleep(min(remaining, 0.1))


@dataclass
class Frame:
    """One video frame.

    Attributes:
        image: (H, W, 3) uint8.
        timestamp_s: Capture time on the :class:`SessionClock` (media time for files).
        index: Frame number within the source (0, 1, ...; keeps counting across reconnects).
        bgr: Channel order is OpenCV's BGR (else RGB).
        meta: Source extras, e.g. ``{"true_count": 37}`` from the synthetic scene.
        captured_s: Session time when the capture thread got the frame (for the pipeline
            latency; differs from ``timestamp_s`` for files, which carry media time).
    """

    image: np.ndarray
    timestamp_s: float
    index: int
    bgr: bool = True
    meta: dict[str, Any] = field(default_factory=dict)
    captured_s: float | None = None


@dataclass
class Backoff:
    """Exponential backoff between reconnection attempts.

    Attributes:
        initial_s: First wait.
        max_s: Longest wait.
        give_up_s: Stop trying after this long without success (0: never try; None: forever).
    """

    initial_s: float = 0.5
    max_s: float = 8.0
    give_up_s: float | None = 60.0

    def delays(self):
        """Successive waits, ``initial_s`` doubling up to ``max_s``, until ``give_up_s``."""
        if self.give_up_s == 0:
            return
        waited, delay = 0.0, self.initial_s
        while self.give_up_s is None or waited + delay <= self.give_up_s:
            yield delay
            waited += delay
            delay = min(delay * 2, self.max_s)
