"""Progress display that suits where it goes: bars on a terminal, lines in a log.

tqdm redraws its bars with carriage returns; written to a file or a pipe (CI logs, ``nohup``,
``| tee``) every redraw becomes a line, and nested bars during training make thousands of them.
:func:`progress_bar` therefore shows tqdm's bar only when standard error is a terminal.
Elsewhere an outer loop (epochs, engines) writes one plain line per finished step, with the
values the loop reported (``set_postfix``), and an inner loop (images of an epoch) shows
nothing.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Iterable, Iterator, TextIO


def on_terminal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default standard error) is a terminal."""
    stream = stream if stream is not None else sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(iterable: Iterable | None = None, *, desc: str = "", total: int | None = None,
                 unit: str = "it", enabled: bool = True, lines: bool = False,
                 stream: TextIO | None = None):
    """A tqdm bar on a terminal; otherwise one line per step (``lines``) or nothing.

    Args:
        iterable: What to iterate over (or None, and call ``update``).
        desc: What the loop does (``train end_to_end``), the start of every line.
        total: Number of steps (default ``len(iterable)``).
        unit: What a step is, for the bar.
        enabled: False shows nothing anywhere (``--no-progress``).
        lines: Off a terminal, write a line per finished step (for loops of few, long steps);
            False shows nothing there.
        stream: Where to write (default standard error).

    Returns:
        An object used like tqdm's: iterate over it, ``update(n)``, ``set_postfix(dict)``,
        ``close()``.
    """
    stream = stream if stream is not None else sys.stderr
    if enabled and on_terminal(stream):
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, file=stream)
    return LineProgress(iterable, desc=desc, total=total, unit=unit,
                        stream=stream if enabled and lines else None)


class LineProgress:
    """The off-terminal stand-in for a tqdm bar: a line per finished step, or silence.

    A step is finished when the loop asks for the next one (or the loop ends); its line carries
    what ``set_postfix`` reported during it: ``train end_to_end: epoch 3/10, loss 0.412, val
    0.91 0.93 (12 s)``.
    """

    def __init__(self, iterable: Iterable | None = None, *, desc: str = "",
                 total: int | None = None, unit: str = "it", stream: TextIO | None = None):
        self.iterable = iterable
        self.desc, self.unit, self.stream = desc, unit, stream
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total = total
        self.n = 0
        self.postfix: dict[str, Any] = {}
        self._began = time.monotonic()

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            self.postfix = {}
            yield item
            self.n += 1
            self._line(self._step(item))

    def _step(self, item: Any) -> str:
        """A finished step's name: ``epoch 3/10`` over a range (resumed runs start past 1),
        else ``engine 3/14``."""
        if isinstance(self.iterable, range) and isinstance(item, int):
            return f"{self.unit} {item + 1}/{self.iterable.stop}"
        return f"{self.unit} {self.n}" + (f"/{self.total}" if self.total else "")

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, values: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.postfix = {**(values or {}), **kwargs}

    def set_postfix_str(self, text: str) -> None:
        self.postfix = {"": text}

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def _line(self, step: str) -> None:
        if self.stream is None:
            return
        parts = [f"{key} {value}" if key else str(value) for key, value in self.postfix.items()]
        elapsed = time.monotonic() - self._began
        self.stream.write(f"{self.desc}: {', '.join([step, *parts])} ({elapsed:.0f} s)\n")
        self.stream.flush()

    def close(self) -> None:
        pass

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
