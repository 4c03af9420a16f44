"""Numeric command-line options with ranges: every number a user types is checked on parsing.

``type=integer(1)`` instead of ``type=int``: a value out of range, NaN or Infinity is an
argparse error naming the option and the range (``argument --repeats: must be an integer >= 1,
got '0'``), before any work. ``tests/hostile/test_options.py`` checks that no command has a
bare ``int`` or ``float`` option left.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable


def _ranged(convert: Callable[[str], float], kind: str, minimum: float | None,
            maximum: float | None, above: bool) -> Callable[[str], float]:
    low = "" if minimum is None else (f"> {minimum:g}" if above else f">= {minimum:g}")
    high = "" if maximum is None else f"<= {maximum:g}"
    expected = f"must be {kind} {' and '.join(part for part in (low, high) if part)}".strip()

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{expected}, got {text!r}") from None
        if (not math.isfinite(value)
                or (minimum is not None and (value <= minimum if above else value < minimum))
                or (maximum is not None and value > maximum)):
            raise argparse.ArgumentTypeError(f"{expected}, got {text!r}")
        return value

    parse.__name__ = expected.removeprefix("must be ")
    return parse


def integer(minimum: int | None = None, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer in [``minimum``, ``maximum``] (either may be None)."""
    return _ranged(int, "an integer", minimum, maximum, False)


def number(minimum: float | None = None, maximum: float | None = None,
           above: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: a finite number >= ``minimum`` (> with ``above``), <= ``maximum``."""
    return _ranged(float, "a finite number", minimum, maximum, above)


#: Shared ranges.
COUNT = integer(1)  # repeats, passes, samples, frames, epochs, batch sizes
NON_NEGATIVE = integer(0)  # seeds, warm-up runs, device indices
SEED = integer(0, 2**32 - 1)
THREADS = integer(1, 1024)
POSITIVE = number(0.0, above=True)  # durations, budgets, rates, learning rates


def confidence_level(text: str) -> float | None:
    """An argparse ``type``: a one-sided confidence level in [0.5, 1), or 0 for none (None)."""
    value = number(0.0, 1.0)(text)
    if value == 0.0:
        return None
    if not 0.5 <= value < 1.0:
        raise argparse.ArgumentTypeError(
            f"must be a confidence level >= 0.5 and < 1 (e.g. 0.95), or 0 for none; got {text!r}")
    return value
