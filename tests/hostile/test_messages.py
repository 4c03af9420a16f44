"""Item 11 of issue 12: messages that said the wrong thing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import assert_refused, cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("case,message", [("folder", "records no image transform"),  # images
                                          ("/dev/null", "is not a regular file"),
                                          ("text.npy", "is not a .npy or .npz array file (it "
                                                       "starts with b'hello,'"),
                                          ("empty.npy", "(it is empty)"),
                                          ("truncated.npy", "damaged or truncated"),
                                          ("missing.npy", "does not exist")])
def test_input_files_that_are_not_arrays(model, tmp_path, case, message, capsys, sample_file):
    import numpy as np

    path = {"folder": tmp_path, "/dev/null": Path("/dev/null")}.get(case, tmp_path / case)
    if case == "text.npy":
        path.write_text("hello, I am a text file\n")
    elif case == "empty.npy":
        path.write_bytes(b"")
    elif case == "truncated.npy":
        np.save(path, np.zeros((100, 1, 8, 8), np.float32))
        path.write_bytes(path.read_bytes()[:300])
    line = assert_refused(capsys, ["run", model, "--input", path], message, model)
    assert "pickle" not in line


def test_mp4_output_in_a_read_only_folder_does_not_blame_the_codec(model, capsys):
    folder = "/sys" if os.geteuid() == 0 else None
    if folder is None:
        pytest.skip("needs a folder this user cannot write; the non-root variant is in "
                    "test_outputs.py")
    line = assert_refused(capsys, ["count", "synthetic://crowd", f"file://{folder}/out.mp4",
                                   "--engines", model, "--max-frames", "2"], "cannot write in",
                          model)
    assert "codec" not in line


def test_ctrl_c_while_the_commands_load_is_one_line(monkeypatch, capsys):
    import trt_exit.commands.profile as profile

    def interrupted(subparsers):
        raise KeyboardInterrupt
    monkeypatch.setattr(profile, "register", interrupted)
    status, err = cli(capsys, "--help")
    assert status == 130 and err.strip() == "trt-exit: interrupted"


STARTER = """
import sys
import trt_exit  # the package (a version string): the interpreter's own start-up is done
sys.stderr.write("python is up\\n"); sys.stderr.flush()
from trt_exit.cli import entrypoint
sys.argv = ["trt-exit", "run", sys.argv[1], "--input", sys.argv[2]]
entrypoint()
"""


@pytest.mark.parametrize("delay_s", [0.01, 0.05, 0.15, 0.4, 0.8])
def test_ctrl_c_in_the_first_moments_prints_no_traceback(model, sample_file, delay_s):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", STARTER, str(model), str(sample_file)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr.readline() == "python is up\n"
    time.sleep(delay_s)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err, err
    # 130: interrupted; 0: it finished first; -SIGINT: the signal came during the interpreter's
    # shutdown, after the command (Python restores the default handler there): no traceback.
    assert proc.returncode in (0, 130, -signal.SIGINT), err


def test_an_interrupt_a_library_turned_into_its_own_error_is_an_interrupt(monkeypatch, capsys,
                                                                         model, sample_file):
    """Ctrl-C while a C extension initializes surfaces as `ImportError: initialization failed`
    with the KeyboardInterrupt as its context (seen with onnxruntime)."""
    import trt_exit.commands.spine as spine

    def load(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise ImportError("initialization failed")  # noqa: B904 - what the library does
    monkeypatch.setattr(spine, "_load_manifest", load)
    status, err = cli(capsys, "run", model, "--input", sample_file)
    assert status == 130 and err.strip() == "trt-exit run: interrupted"
