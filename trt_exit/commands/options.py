"""Command-line option types: every number and every path a user types is checked on parsing.

``type=integer(1)`` instead of ``type=int``: a value out of range, NaN or Infinity is an
argparse error naming the option and the range (``argument --repeats: must be an integer >= 1,
got '0'``), before any work. ``tests/hostile/test_options.py`` checks that no command has a
bare ``int`` or ``float`` option left.

Every text option says what it holds: ``type=PATH`` (a file or folder), ``type=URI`` (a
source, sink or data URI, or a plain path) or ``type=TEXT`` (anything else: names, specs). A
path the operating system cannot take (a NUL byte, a file name over 255 bytes, a path over
4,095) is then an argparse error naming the option, before any work;
``tests/hostile/test_paths.py`` checks that no text option lacks one of these types.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable

from trt_exit.fileio import path_text_problem, shown_path


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


def path(text: str) -> str:
    """An argparse ``type``: a file or folder path the operating system can take."""
    problem = path_text_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"{shown_path(text)}: {problem}")
    return text


#: URI schemes whose location is a local path (the rest name hosts, devices or generators).
_PATH_SCHEMES = ("file", "jsonl", "imagefolder")


def uri(text: str) -> str:
    """An argparse ``type``: a URI (``file://clip.mp4``, ``rtsp://host/x``, ``imagefolder://DIR``)
    or a plain path; the location of a local one is checked like :func:`path`."""
    scheme, sep, rest = text.partition("://")
    if sep and scheme.lower() in _PATH_SCHEMES:
        location = rest.partition("?")[0]
        problem = path_text_problem(location)
    elif sep:
        problem = "it contains a NUL byte" if "\0" in text else None
    else:
        problem = path_text_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"{shown_path(text)}: {problem}")
    return text


def text(value: str) -> str:
    """An argparse ``type``: text that is not a path (a name, a spec such as ``2:mlp,4:slvit``);
    a NUL byte, which no command-line argument from a shell can hold, is refused."""
    if "\0" in value:
        raise argparse.ArgumentTypeError(f"{shown_path(value)}: it contains a NUL byte")
    return value


PATH = path
URI = uri
TEXT = text
