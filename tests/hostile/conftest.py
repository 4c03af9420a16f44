"""Helpers of the hostile-input suite: the CLI in-process, and directory snapshots.

Every refusal is checked the same way: exit status 2 (argparse's usage errors: 2 as well), the
error is one line without a traceback, and no file changed (every file under the watched
folders is hashed before and after).
"""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
from pathlib import Path

import pytest

from trt_exit.cli import main


def snapshot(*folders: Path) -> dict[str, str]:
    """sha256 of every file (and the target of every symlink) under ``folders``."""
    state = {}
    for folder in folders:
        for dirpath, _, filenames in os.walk(folder):
            for name in filenames:
                path = Path(dirpath) / name
                if path.is_symlink():
                    state[str(path)] = "-> " + os.readlink(path)
                elif path.is_file():
                    state[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def cli(capsys, *args) -> tuple[int, str]:
    """Runs ``trt-exit ARGS`` in this process; returns (exit status, stderr)."""
    try:
        status = main([str(a) for a in args])
    except SystemExit as exc:  # argparse's errors
        status = exc.code
    return status, capsys.readouterr().err


def assert_refused(capsys, args, message: str, *watched: Path) -> str:
    """Runs the CLI and checks a clean refusal: status 2, one error line containing
    ``message`` (after argparse's usage lines, if any), no traceback, ``watched`` unchanged."""
    before = snapshot(*watched)
    status, err = cli(capsys, *args)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert status == 2, err
    assert "Traceback" not in err
    assert lines and message in lines[-1], err
    usage = [line for line in lines[:-1] if not line.startswith(("usage:", " "))]
    assert not usage, f"more than one error line: {err}"
    assert snapshot(*watched) == before, "a file changed"
    return lines[-1]


def subcommands():
    """``(name, parser)`` of every ``trt-exit`` subcommand."""
    import argparse

    from trt_exit.cli import build_parser

    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def _fields(document, path=()):
    """Every field's path in a JSON document (keys and list indices)."""
    if isinstance(document, dict):
        for key, value in document.items():
            yield from _fields(value, path + (key,))
    elif isinstance(document, list):
        for i, value in enumerate(document):
            yield from _fields(value, path + (i,))
    if path:
        yield path


def damage(document: dict, data, values) -> dict:
    """1 to 3 edits of a JSON document drawn with hypothesis's ``data``: a field removed, or
    replaced by a value drawn from the strategy ``values``. A top-level section is drawn first,
    then a field in it, so every section gets its share (stages are most of a manifest)."""
    from hypothesis import strategies as st

    document = copy.deepcopy(document)
    for _ in range(data.draw(st.integers(1, 3))):
        section = data.draw(st.sampled_from(sorted(document)))
        path = data.draw(st.sampled_from([(section,), *((section, *p)
                                                        for p in _fields(document[section]))]))
        node = document
        try:
            for key in path[:-1]:
                node = node[key]
            if data.draw(st.booleans()) and isinstance(node, dict):
                node.pop(path[-1], None)
            else:
                # A copy: strategies hand out the same list / dict object every time.
                node[path[-1]] = copy.deepcopy(data.draw(values))
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit removed the branch
    return document


@pytest.fixture
def model(tiny_tuned, tmp_path) -> Path:
    """A private copy of the tuned tiny model."""
    dst = tmp_path / "model"
    shutil.copytree(tiny_tuned, dst)
    return dst


@pytest.fixture
def untuned(tiny_export, tmp_path) -> Path:
    dst = tmp_path / "untuned"
    shutil.copytree(tiny_export, dst)
    return dst


@pytest.fixture
def sample_file(digits, tmp_path) -> Path:
    import numpy as np

    path = tmp_path / "inputs" / "x.npy"
    path.parent.mkdir()
    np.save(path, digits["test"].inputs["image"][:4])
    return path
