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


def _bounds(minimum: float | None, maximum: float | None, above: bool) -> str:
    low = "" if minimum is None else (f"> {minimum:g}" if above else f">= {minimum:g}")
    high = "" if maximum is None else f"<= {maximum:g}"
    return " and ".join(part for part in (low, high) if part)


def integer(minimum: int | None = None, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer in [``minimum``, ``maximum``] (either may be None)."""
    bounds = _bounds(minimum, maximum, False)

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer {bounds}, got {text!r}") from None
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"must be an integer {bounds}, got {text!r}")
        return value

    parse.__name__ = f"integer {bounds}".strip()
    return parse


def number(minimum: float | None = None, maximum: float | None = None,
           above: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: a finite number >= ``minimum`` (> with ``above``) and <= ``maximum``."""
    bounds = _bounds(minimum, maximum, above)

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number {bounds}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number {bounds}, got {text!r}")
        if minimum is not None and (value <= minimum if above else value < minimum):
            raise argparse.ArgumentTypeError(f"must be a number {bounds}, got {text!r}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be a number {bounds}, got {text!r}")
        return value

    parse.__name__ = f"number {bounds}".strip()
    return parse


#: Shared ranges.
COUNT = integer(1)  # repeats, passes, samples, frames, epochs, batch sizes
NON_NEGATIVE = integer(0)  # seeds, warm-up runs, device indices
SEED = integer(0, 2**32 - 1)
THREADS = integer(1, 1024)
POSITIVE = number(0.0, above=True)  # durations, budgets, rates, learning rates
