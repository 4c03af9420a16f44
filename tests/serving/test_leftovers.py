"""What a killed ``trt-exit serve`` leaves is removed at the next start, and only that: real
processes holding real records, shared memory and /tmp folders (no Triton needed; the tests in
test_count_server.py do the same with real servers)."""

from __future__ import annotations

import os
import random
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from trt_exit.serving.leftovers import SHM, TRITON_TMP, clean_stale_servers

pytestmark = pytest.mark.skipif(not SHM.is_dir() or not Path("/proc/self/maps").exists(),
                                reason="needs Linux (/proc, /dev/shm)")

#: A stand-in for a server: it holds a record, maps a shared-memory segment, and has a model
#: folder and a python_env directory in /tmp, as tritonserver makes them.
SERVER = textwrap.dedent("""
    import os, random, string, sys, tempfile, time
    from multiprocessing import shared_memory
    from pathlib import Path
    from trt_exit.serving.leftovers import TRITON_TMP, ServerRecord

    record = ServerRecord.create(sys.argv[1])
    before = set(TRITON_TMP.glob("python_env_*"))
    env = TRITON_TMP / ("python_env_" + "".join(random.choices(string.ascii_letters, k=6)))
    env.mkdir()
    record.note_python_env(before)
    record.workspace.mkdir()
    (record.workspace / "tritonserver").write_bytes(b"x" * 1000)
    folder = Path(tempfile.mkdtemp(prefix="folder", dir=TRITON_TMP))
    (folder / "config.pbtxt").write_text(
        'parameters {\\n  key: "workspace-path"\\n  value {\\n    string_value: "%s"\\n  }\\n}\\n'
        % record.workspace)
    shm = shared_memory.SharedMemory(create=True, size=4096)
    record.refresh()
    print(record.root, shm.name, folder, env, flush=True)
    time.sleep(600)
""")


def _server(home: Path) -> tuple[subprocess.Popen, list[Path]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen([sys.executable, "-c", SERVER, str(home)], env=env,
                               stdout=subprocess.PIPE, text=True, start_new_session=True)
    root, shm, folder, python_env = process.stdout.readline().split()
    return process, [Path(root), SHM / shm, Path(folder), Path(python_env)]


def test_only_a_dead_servers_leftovers_are_removed():
    home = Path(tempfile.mkdtemp(prefix="pytriton-"))
    # An unrelated model folder and python_env in /tmp: not the dead server's either.
    other = Path(tempfile.mkdtemp(prefix="folder", dir=TRITON_TMP))
    (other / "config.pbtxt").write_text('key: "workspace-path" value { string_value: "/x" }')
    other_env = TRITON_TMP / ("python_env_" + "".join(random.choices(string.digits, k=6)))
    other_env.mkdir()
    dead, dead_files = _server(home)
    live, live_files = _server(home)
    try:
        os.killpg(dead.pid, signal.SIGKILL)  # the server, and its resource tracker with it
        dead.wait(timeout=10)
        assert all(path.exists() for path in dead_files)  # left behind

        cleaned = clean_stale_servers(home)

        assert [c.pid for c in cleaned] == [dead.pid]
        assert not any(path.exists() for path in dead_files)
        assert all(path.exists() for path in live_files)  # a running server's: untouched
        assert other.exists() and other_env.exists()
        assert clean_stale_servers(home) == []  # nothing more to do; the live one stays
        os.killpg(live.pid, signal.SIGKILL)
        live.wait(timeout=10)
        assert [c.pid for c in clean_stale_servers(home)] == [live.pid]
        assert not any(path.exists() for path in live_files) and list(home.iterdir()) == []
    finally:
        for process in (dead, live):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
        for path in (home, other, other_env):
            shutil.rmtree(path, ignore_errors=True)
