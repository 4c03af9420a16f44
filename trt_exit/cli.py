"""``trt-exit <command>``: the command-line interface.

Each command group lives in a module of :mod:`trt_exit.commands` that contributes its own
subcommands and options through ``register(subparsers)``. Errors trt_exit raises on purpose are
printed as one line and the exit status is non-zero, without a traceback.
"""

from __future__ import annotations

import sys

try:  # Ctrl-C in the first moments of `trt-exit` (these imports): a line, not a traceback
    import argparse
    import importlib
    import logging

    from trt_exit import __version__
    from trt_exit.errors import TrtExitError
except KeyboardInterrupt:
    print("trt-exit: interrupted", file=sys.stderr)
    raise SystemExit(130) from None

#: Modules contributing subcommands, in the order they appear in ``--help``.
COMMAND_MODULES = [
    "trt_exit.commands.spine",
    "trt_exit.commands.build",
    "trt_exit.commands.pipelines",
    "trt_exit.commands.profile",
    "trt_exit.commands.experiment",
    "trt_exit.commands.serving",
]

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every command module's subcommands."""
    parser = argparse.ArgumentParser(
        prog="trt-exit",
        description="Multi-exit Vision Transformers: train, export per stage, build TensorRT "
                    "engines, and run with early exits.",
    )
    parser.add_argument("--version", action="version", version=f"trt-exit {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-vv for debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the process exit status."""
    try:  # Ctrl-C while the command modules import (torch, numpy): no traceback
        parser = build_parser()
        args = parser.parse_args(argv)
    except Exception as exc:
        if not interrupted(exc):
            raise
        print("trt-exit: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("trt-exit: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="trt-exit: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_ERROR
    try:
        return int(args.func(args) or 0)
    except Exception as exc:
        if interrupted(exc):
            print(f"trt-exit {args.command}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        message = error_message(exc)
        if message is None:
            raise
        print(f"trt-exit {args.command}: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"trt-exit {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def error_message(exc: BaseException) -> str | None:
    """The one-line message for an error the user can fix, or None for a bug (a traceback).

    Errors trt_exit raises on purpose, and OS errors on a path that a command did not turn into
    its own message (a name too long, a NUL byte, a full disk: see
    :func:`trt_exit.fileio.os_error_message`). A message is always one line: a library's text
    that a message quotes may span lines, which are joined.
    """
    if isinstance(exc, TrtExitError):
        message = str(exc)
    else:
        from trt_exit.fileio import os_error_message

        message = os_error_message(exc)
        if message is None:
            return None
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())


def interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` comes from a Ctrl-C: a library may turn the KeyboardInterrupt into its own
    error (a C extension interrupted while it initializes raises ``ImportError: initialization
    failed``), which then carries the KeyboardInterrupt as its cause or context."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def entrypoint() -> None:
    """Console-script entry point."""
    try:
        status = main()
    except KeyboardInterrupt:  # between main's handlers (logging set-up, their own prints)
        print("trt-exit: interrupted", file=sys.stderr)
        status = EXIT_INTERRUPTED
    sys.exit(status)
