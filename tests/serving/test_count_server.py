"""trt-exit count --server: the live pipeline sends frames and audio windows to trt-exit serve."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("cv2", reason="the live app needs OpenCV: pip install 'trt-exit[video]'")

from trt_exit.cli import main  # noqa: E402

MODEL = "multi_exit_av_crowd_tiny_test"
AV = ["--audio", "synthetic://crowd", "--no-status"]


def count_args(out, *options: str) -> list[str]:
    return ["count", "synthetic://crowd", f"jsonl://{out}", *AV, *options]


@pytest.fixture(scope="module")
def av_server(av_model_dir, tmp_path_factory):
    from trt_exit.serving.process import ServerPorts, ServerProcess

    log = tmp_path_factory.mktemp("av_serve") / "serve.log"
    process = ServerProcess.serve(av_model_dir, ServerPorts.free(), MODEL, log)
    process.start()
    yield process
    assert process.stop(signal.SIGINT, timeout_s=30) == 0  # Ctrl-C stops cleanly
    assert process.leftovers == 0


def _records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


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
    assert "did not answer" in err and "after 5 tries" in err and "trt-exit serve" in err
    assert time.monotonic() - started < 30
    assert main(count_args(out, "--engines", str(av_model_dir), "--server",
                           "tcp://127.0.0.1:1")) == 2
    assert "grpc://HOST:PORT" in capsys.readouterr().err


@pytest.mark.serve
def test_a_server_that_goes_away_mid_stream_loses_no_line(av_model_dir, tmp_path):
    from trt_exit.serving.process import ServerPorts, ServerProcess

    server = ServerProcess.serve(av_model_dir, ServerPorts.free(), MODEL, tmp_path / "serve.log")
    out = tmp_path / "out.jsonl"
    with server:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        count = subprocess.Popen(
            [sys.executable, "-m", "trt_exit", *count_args(out, "--engines", str(av_model_dir),
                                                          "--server", server.ports.grpc_url,
                                                          "--max-frames", "100000")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and (
                    not out.exists() or len(out.read_text().splitlines()) < 20):
                time.sleep(0.1)
            os.killpg(server.process.pid, signal.SIGKILL)  # the server crashes
            server.process.wait(timeout=10)
            _, err = count.communicate(timeout=60)
        finally:
            if count.poll() is None:
                count.kill()
    assert count.returncode == 2, err
    assert f"server {server.ports.grpc_url} did not answer" in err and "Traceback" not in err
    records = _records(out)  # every line written is complete JSON
    assert len(records) >= 20
    assert [r["frame"] for r in records] == list(range(len(records)))
