"""Fixtures of the pipeline tests: the tiny audiovisual model, and the real GStreamer / RTSP /
PulseAudio peers of the Jetson-I/O tests.

The Jetson-I/O tests need OpenCV built with GStreamer, GStreamer's Python bindings with the RTSP
server (python3-gi, gir1.2-gst-rtsp-server-1.0), the plugin sets, PulseAudio and PortAudio: the
Jetson-like environment ``.ci/jetson_like.sh`` builds. Elsewhere (PyPI's OpenCV) they skip and
say what is missing; with ``TRT_EXIT_REQUIRE_JETSON_IO=1`` (set by that script) a missing piece
is a failure instead, so CI cannot pass with these tests silently skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from trt_exit.serving.environment import free_port

PEER = Path(__file__).with_name("gst_peer.py")
REQUIRE = os.environ.get("TRT_EXIT_REQUIRE_JETSON_IO") == "1"


def unavailable(reason: str):
    """Skips (or fails, under TRT_EXIT_REQUIRE_JETSON_IO=1) a test whose prerequisites are
    missing."""
    if REQUIRE:
        pytest.fail(f"TRT_EXIT_REQUIRE_JETSON_IO=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def av_model(tmp_path_factory):
    """The experiments' tiny trained audiovisual crowd model (exported, tuned)."""
    from trt_exit.experiments.av_crowd import build_tiny_av_export

    out = tmp_path_factory.mktemp("av_model")
    return build_tiny_av_export(out, seed=0).root


def gstreamer_missing() -> str | None:
    """What the GStreamer tests lack here, or None."""
    try:
        import cv2  # noqa: F401
    except ImportError:
        return "no OpenCV"
    from trt_exit.pipelines.opencv_support import gstreamer_available, gstreamer_has_element

    if not gstreamer_available():
        return "this OpenCV has no GStreamer (PyPI's wheels); the Jetson-like run has it"
    try:
        import gi

        gi.require_version("Gst", "1.0")
        gi.require_version("GstRtspServer", "1.0")
        from gi.repository import GstRtspServer  # noqa: F401
    except (ImportError, ValueError) as exc:
        return f"no GStreamer RTSP server bindings (python3-gi, gir1.2-gst-rtsp-server-1.0): {exc}"
    for element in ("videotestsrc", "x264enc", "avdec_h264", "rtspsrc", "rtspclientsink",
                    "videoflip"):
        if not gstreamer_has_element(element):
            return f"GStreamer has no {element} (the gstreamer1.0-plugins-* sets, -libav, -rtsp)"
    return None


@pytest.fixture(scope="session")
def gstreamer():
    """Skips (fails under TRT_EXIT_REQUIRE_JETSON_IO=1) without the real GStreamer stack."""
    missing = gstreamer_missing()
    if missing:
        unavailable(missing)


@pytest.fixture
def port() -> int:
    """A TCP/UDP port on 127.0.0.1 that was free a moment ago."""
    return free_port("127.0.0.1")


class Peer:
    """A :mod:`gst_peer` subprocess (RTSP camera, RTSP record server, RTP receiver)."""

    def __init__(self, role: str, port: int, out: Path | None = None, *extra: str):
        self.args = [sys.executable, str(PEER), role, str(port)]
        self.args += [str(out)] if out else []
        self.args += ["--lifetime", "90", *extra]
        self.process = None
        self.out = out

    def start(self, timeout_s: float = 20.0) -> "Peer":
        # The system Python packages (gi) are on sys.path in the Jetson-like venv.
        self.log = tempfile.TemporaryFile()  # not a pipe: unread, it could fill and stall
        self.process = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=self.log,
                                        text=True)
        deadline = time.monotonic() + timeout_s
        line = self.process.stdout.readline()  # "ready", or "" if it died
        if line.strip() != "ready" or time.monotonic() > deadline:
            self.log.seek(0)
            message = self.log.read()
            self.stop()
            raise RuntimeError(f"{self.args[2]} peer did not start: {message!r}")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        if self.process is not None:
            self.process.stdout.close()
            self.log.close()

    def values(self) -> list[float]:
        """The receivers' per-frame mean grey levels so far."""
        if self.out is None or not self.out.exists():
            return []
        return [float(line) for line in self.out.read_text().split()]


@pytest.fixture
def peers():
    """Starts peers for a test and stops them after it, whatever happens."""
    started: list[Peer] = []

    def start(role: str, port: int, out: Path | None = None, *extra: str) -> Peer:
        peer = Peer(role, port, out, *extra).start()
        started.append(peer)
        return peer

    yield start
    for peer in started:
        peer.stop()


# --------------------------------------------------------------------------- PulseAudio


class PulseServer:
    """A private PulseAudio daemon (null sink ``trt_exit_test``, its monitor the default source),
    on a unix socket in a temporary folder. Root needs ``--daemonize=no`` without ``--system``
    (it warns "not intended to be run as root" and runs); no D-Bus, no cookie."""

    SINK = "trt_exit_test"

    def __init__(self, folder: Path):
        self.folder = folder
        self.socket = folder / "native"
        self.process = None

    @property
    def server(self) -> str:
        return f"unix:{self.socket}"

    def start(self, timeout_s: float = 10.0) -> None:
        env = {**os.environ, "HOME": str(self.folder), "PULSE_RUNTIME_PATH": str(self.folder / "rt"),
               "PULSE_STATE_PATH": str(self.folder / "state")}
        self.process = subprocess.Popen(
            ["pulseaudio", "--daemonize=no", "--exit-idle-time=-1", "--disallow-exit", "-n",
             "--use-pid-file=no", "--log-target=stderr", "--log-level=error",
             "-L", f"module-native-protocol-unix socket={self.socket} auth-anonymous=1",
             "-L", f"module-null-sink sink_name={self.SINK} rate=48000"],
            # Its log goes to a file: an unread pipe would fill up and stall the daemon.
            env=env, stdout=subprocess.DEVNULL, stderr=self._log_file())
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"pulseaudio exited: {(self.folder / 'log').read_text()}")
            done = subprocess.run(["pactl", "--server", self.server, "info"],
                                  capture_output=True, timeout=10)
            if done.returncode == 0:
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("pulseaudio did not answer within 10 s")

    def _log_file(self):
        self._log = open(self.folder / "log", "ab")
        return self._log

    def play(self, wav: Path) -> subprocess.Popen:
        return subprocess.Popen(["paplay", "--server", self.server, f"--device={self.SINK}",
                                 str(wav)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        if self.process is not None:
            self._log.close()
        self.process = None


@pytest.fixture
def pulse(monkeypatch):
    """A running PulseAudio daemon that PortAudio (through ALSA's pulse plugin) captures from."""
    missing = [tool for tool in ("pulseaudio", "pactl", "paplay") if shutil.which(tool) is None]
    if missing:
        unavailable(f"no PulseAudio ({', '.join(missing)}: apt-get install pulseaudio "
                    f"pulseaudio-utils libasound2-plugins)")
    from trt_exit.errors import MissingDependencyError
    from trt_exit.pipelines.audio_sources import import_sounddevice
    from trt_exit.pipelines.base import SourceError

    try:
        import_sounddevice()
    except (MissingDependencyError, SourceError) as exc:
        unavailable(f"no PortAudio / sounddevice: {exc}")
    # A short folder: a unix socket path must fit in 107 bytes, pytest's tmp_path may not.
    with tempfile.TemporaryDirectory(prefix="trt_exit_pa_") as folder:
        server = PulseServer(Path(folder))
        monkeypatch.setenv("PULSE_SERVER", server.server)
        server.start()
        try:
            yield server
        finally:
            server.stop()
