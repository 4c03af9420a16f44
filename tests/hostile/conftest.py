"""Helpers of the hostile-input suite: the CLI in-process, and directory snapshots.

Every refusal is checked the same way: exit status 2 (argparse's usage errors: 2 as well), the
error is one line without a traceback, and no file changed (every file under the watched
folders is hashed before and after).
"""

from __future__ import annotations

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
