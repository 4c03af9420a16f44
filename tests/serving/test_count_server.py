"""trt-exit count --server: the live pipeline sends frames and audio windows to trt-exit serve,
and lives through the server's restarts and crashes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("cv2", reason="the live app needs OpenCV: pip install 'trt-exit[video]'")

from trt_exit.cli import main  # noqa: E402

MODEL = "multi_exit_av_crowd_tiny_test"
AV = ["--audio", "synthetic://crowd", "--no-status"]


def count_args(out, *options: str) -> list[str]:
    return ["count", "synthetic://crowd", f"jsonl://{out}", *AV, *options]


@pytest.fixture(scope="module")
def home():
    """A PYTRITON_HOME the servers of this module share (short: it holds Unix sockets)."""
    path = Path(tempfile.mkdtemp(prefix="pytriton-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def av_server(av_model_dir, tmp_path_factory, home):
    from trt_exit.serving.process import ServerPorts, ServerProcess

    log = tmp_path_factory.mktemp("av_serve") / "serve.log"
    process = ServerProcess.serve(av_model_dir, ServerPorts.free(), MODEL, log, home=home)
    process.start()
    yield process
    assert process.stop(signal.SIGINT, timeout_s=30) == 0  # Ctrl-C stops cleanly
    assert process.leftovers == 0


def _records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _count_process(out, model_dir, url, *options: str) -> subprocess.Popen:
    """``trt-exit count ... --server url`` in a child process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen(
        [sys.executable, "-m", "trt_exit", *count_args(out, "--engines", str(model_dir),
                                                      "--server", url, *options)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_lines(out, lines: int, count: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not out.exists() or len(out.read_text().splitlines()) < lines:
        assert count.poll() is None, count.communicate()
        assert time.monotonic() < deadline, f"fewer than {lines} lines in {timeout_s} s"
        time.sleep(0.05)


def _leftovers(home) -> dict:
    """What the servers recorded in ``home`` own, as :mod:`trt_exit.serving.leftovers` sees it:
    {record dir: (live processes, existing shm names, Triton's model folders)}."""
    from trt_exit.serving.leftovers import SHM, TRITON_TMP, processes_under

    found = {}
    for record in Path(home).glob("trt-exit-*"):
        info = json.loads((record / "server.json").read_text())
        prefix = info["shm_prefix"] or "\0"  # None until the server has started
        shm = {p.name for p in SHM.iterdir() if p.name in info["shm"] or p.name.startswith(prefix)}
        folders = set()
        for folder in TRITON_TMP.glob("folder*"):
            try:  # other servers' come and go
                if str(record / "ws") in (folder / "config.pbtxt").read_text():
                    folders.add(folder)
            except OSError:
                pass
        found[record] = (processes_under(record), shm, folders)
    return found


@pytest.mark.serve
def test_count_through_the_server_writes_what_in_process_writes(av_server, av_model_dir,
                                                               tmp_path):
    local, grpc, http = (tmp_path / f"{name}.jsonl" for name in ("local", "grpc", "http"))
    engines = ["--engines", str(av_model_dir), "--max-frames", "40"]
    assert main(count_args(local, *engines)) == 0
    assert main(count_args(grpc, *engines, "--server", av_server.ports.grpc_url)) == 0
    assert main(count_args(http, *engines, "--server", av_server.ports.http_url)) == 0
    expected = _records(local)
    # (this tiny model answers these frames at its first exit; the digits tests in
    # test_serve.py compare batches of mixed exits sample by sample)
    assert len(expected) == 40
    for path in (grpc, http):
        got = _records(path)
        assert [set(r) for r in got] == [set(r) for r in expected]  # the same JSONL fields
        for a, b in zip(got, expected):
            assert (a["frame"], a["exit"], a["true_count"]) == (b["frame"], b["exit"], b["true_count"])
            assert a["count"] == pytest.approx(b["count"], rel=1e-5, abs=1e-5)
            assert a["confidence"] == pytest.approx(b["confidence"], rel=1e-5, abs=1e-6)


@pytest.mark.serve
def test_no_server_is_a_clear_error_after_bounded_retries(av_model_dir, tmp_path, capsys):
    from trt_exit.serving.environment import free_port

    started = time.monotonic()
    out = tmp_path / "out.jsonl"
    assert main(count_args(out, "--engines", str(av_model_dir), "--server",
                           f"grpc://127.0.0.1:{free_port()}")) == 2
    err = capsys.readouterr().err
    assert "did not answer" in err and "within 4 s (6 tries)" in err and "trt-exit serve" in err
    assert time.monotonic() - started < 30  # not --reconnect-s (60 s): the server never was
    assert main(count_args(out, "--engines", str(av_model_dir), "--server",
                           "tcp://127.0.0.1:1")) == 2
    assert "grpc://HOST:PORT" in capsys.readouterr().err


@pytest.mark.serve
def test_a_rolling_restart_of_the_server_loses_no_frame_line(av_model_dir, tmp_path):
    """SIGTERM the server under load and start a new one on the same ports: while the old one
    shuts down it answers NOT_FOUND for the model it unloads, then refuses connections, then
    the new one loads the model. The camera waits it out and every frame gets its line."""
    from trt_exit.serving.process import ServerPorts, ServerProcess

    ports, out, frames = ServerPorts.free(), tmp_path / "out.jsonl", 250
    old = ServerProcess.serve(av_model_dir, ports, MODEL, tmp_path / "old.log")
    count = None
    try:
        old.start()
        # 25 FPS, no frame dropped while the server is away (the queue holds 40 s of them)
        count = _count_process(out, av_model_dir, ports.grpc_url, "--realtime", "--input-rate",
                               "25", "--queue-frames", "1000", "--max-frames", str(frames))
        _wait_for_lines(out, 10, count)
        assert old.stop(signal.SIGTERM) == 0 and old.leftovers == 0
        answered_before_restart = len(out.read_text().splitlines())
        with ServerProcess.serve(av_model_dir, ports, MODEL, tmp_path / "new.log"):
            _, err = count.communicate(timeout=120)
    finally:
        old.stop()
        if count is not None and count.poll() is None:
            count.kill()
    assert count.returncode == 0, err
    assert answered_before_restart < frames  # the restart happened mid-run
    assert [r["frame"] for r in _records(out)] == list(range(frames))  # every frame, in order
    assert "the server is stopping or restarting" in err and "answers again" in err, err
    assert "Traceback" not in err


@pytest.mark.serve
def test_a_killed_server_is_cleaned_up_by_the_next_start(av_model_dir, av_server, home, tmp_path):
    """SIGKILL of a whole server (trt-exit serve, tritonserver, the Python backend): the camera
    waits for it (SIGTERM ends the wait at once, with complete JSON lines); the server left its
    workspace, shared memory and /tmp folders, which the next start removes, leaving those of a
    server still running alone."""
    from trt_exit.serving.process import ServerPorts, ServerProcess

    server = ServerProcess.serve(av_model_dir, ServerPorts.free(), MODEL, tmp_path / "a.log",
                                 home=home)
    out = tmp_path / "out.jsonl"
    with server:
        count = _count_process(out, av_model_dir, server.ports.grpc_url, "--max-frames", "100000")
        try:
            _wait_for_lines(out, 20, count)
            left = _leftovers(home)
            os.killpg(server.process.pid, signal.SIGKILL)  # the server crashes
            server.process.wait(timeout=10)
            time.sleep(1.5)  # count waits for the server (--reconnect-s 60) ...
            assert count.poll() is None
            stopped = time.monotonic()
            count.send_signal(signal.SIGTERM)  # ... until it is told to stop
            summary, err = count.communicate(timeout=60)
        finally:
            if count.poll() is None:
                count.kill()
    assert count.returncode == 0 and time.monotonic() - stopped < 10, err
    assert "stopped: interrupted" in summary
    assert f"server {server.ports.grpc_url}: infer failed" in err and "Traceback" not in err
    records = _records(out)  # every line written is complete JSON
    assert len(records) >= 20
    assert [r["frame"] for r in records] == list(range(len(records)))

    dead = home / f"trt-exit-{server.process.pid}"
    live = home / f"trt-exit-{av_server.process.pid}"
    _, dead_shm, dead_folders = left[dead]
    assert dead_shm and dead_folders and (dead / "ws").is_dir()  # left behind: the test means it
    live_before = left[live]
    with ServerProcess.serve(av_model_dir, ServerPorts.free(), MODEL, tmp_path / "b.log",
                             home=home) as after:
        now = _leftovers(home)
        assert dead not in now and not any((Path("/dev/shm") / n).exists() for n in dead_shm)
        assert not any(f.exists() for f in dead_folders)
        assert now[live][1:] == live_before[1:] and now[live][0]  # the live server's: untouched
        log = after.log.read_text()
        assert f"cleaned up after trt-exit serve (pid {server.process.pid})" in log
        assert main(count_args(tmp_path / "live.jsonl", "--engines", str(av_model_dir),
                               "--server", av_server.ports.grpc_url, "--max-frames", "3")) == 0


@pytest.mark.serve
def test_a_crash_of_tritonserver_leaves_nothing_behind(av_model_dir, home, tmp_path):
    """SIGKILL of tritonserver alone, with requests in flight: its Python-backend stub is
    reparented to init and hangs in its exit; trt-exit serve notices within a second, kills it,
    removes the shared memory and the /tmp folders, and exits 2."""
    import threading

    import numpy as np

    from trt_exit.serving.client import RemoteExecutor
    from trt_exit.serving.environment import ServingError
    from trt_exit.serving.leftovers import processes_under, start_time
    from trt_exit.serving.process import ServerPorts, ServerProcess

    server = ServerProcess.serve(av_model_dir, ServerPorts.free(), MODEL, tmp_path / "a.log",
                                 home=home)
    load_on = threading.Event()
    errors: list[str] = []

    def load() -> None:
        try:
            with RemoteExecutor(server.ports.grpc_url, av_model_dir, reconnect_s=1) as remote:
                inputs = {io.name: np.zeros((4, *io.shape[1:]), np.float32)
                          for io in remote.manifest.inputs}
                while True:
                    remote.run(inputs)
                    load_on.set()
        except ServingError as exc:  # the server is gone for good
            errors.append(str(exc))

    with server:
        clients = [threading.Thread(target=load) for _ in range(3)]
        for client in clients:
            client.start()
        assert load_on.wait(30)
        time.sleep(0.5)  # PyTriton's tensor blocks are in shared memory, requests in flight
        record = home / f"trt-exit-{server.process.pid}"
        server_processes = processes_under(record)
        assert sorted(server_processes.values()) == ["triton_python_backend_stub", "tritonserver"]
        left = _leftovers(home)[record]
        assert left[1] and left[2]
        tritonserver = next(p for p, name in server_processes.items() if name == "tritonserver")
        os.kill(tritonserver, signal.SIGKILL)
        assert server.wait(timeout_s=30) == 2
        log = server.log.read_text()
        for client in clients:
            client.join(timeout=30)
    assert "tritonserver exited" in log and "Traceback" not in log
    assert len(errors) == 3 and all(  # the clients tried for reconnect_s, then said so
        f"server {server.ports.grpc_url} " in e and "within 1 s" in e for e in errors), errors
    assert not record.exists()
    assert not any(start_time(pid) for pid in server_processes)  # no stub left hanging
    assert not any((Path("/dev/shm") / name).exists() for name in left[1])
    assert not any(folder.exists() for folder in left[2])
