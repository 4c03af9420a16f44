"""Real GStreamer paths, as on a Jetson with its NVIDIA elements swapped for software twins:
the CSI pipeline on a test pattern, file decoding, RTSP in from a local server (which goes away
and comes back), RTP and RTSP out read back frame by frame, and the errors of bad input.

They need the Jetson-like environment (OpenCV with GStreamer, see conftest.py); elsewhere they
skip with the reason, and the encoder-choice test at the end runs everywhere.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2", reason="video tests need OpenCV: pip install 'trt-exit[video]'")

from trt_exit.errors import ConfigError  # noqa: E402
from trt_exit.pipelines.base import Backoff, Frame, SessionClock, SourceError  # noqa: E402
from trt_exit.pipelines.opencv_support import (  # noqa: E402
    CAMERA_SOURCES,
    choose_h264_encoder,
    csi_pipeline,
    gstreamer_has_element,
)
from trt_exit.pipelines.sinks import FrameResult, open_sink  # noqa: E402
from trt_exit.pipelines.video_sources import CaptureThread, open_video_source  # noqa: E402

gst = pytest.mark.gstreamer


def grab(uri: str, frames: int) -> list[Frame]:
    source = open_video_source(uri)
    with source:
        source.open(SessionClock())
        return [source.read() for _ in range(frames)]


def test_camera_stand_in_differs_from_csi_only_in_the_camera_elements():
    jetson = csi_pipeline(0, 640, 480, 30, 2)
    twin = csi_pipeline(0, 640, 480, 30, 2, source="videotestsrc")
    assert jetson.startswith("nvarguscamerasrc sensor-id=0 ! video/x-raw(memory:NVMM),width=640")
    assert twin.startswith("videotestsrc is-live=true pattern=smpte ! video/x-raw,width=640")
    tail = "! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! appsink drop=1 max-buffers=1"
    assert jetson.endswith("nvvidconv flip-method=2 " + tail)
    assert twin.endswith("videoflip video-direction=2 " + tail)
    assert set(CAMERA_SOURCES) == {"nvarguscamerasrc", "videotestsrc"}
    with pytest.raises(ConfigError, match="not one of nvarguscamerasrc, videotestsrc"):
        open_video_source("csi://0?source=v4l2src")


@gst
def test_camera_stand_in_through_the_csi_path_with_flips(gstreamer):
    base = "csi://0?source=videotestsrc&width=160&height=120&fps=30"
    frames = grab(base, 4)
    assert all(f.image.shape == (120, 160, 3) and f.bgr for f in frames)
    assert [f.index for f in frames] == [0, 1, 2, 3]
    times = [f.timestamp_s for f in frames]
    assert all(b > a for a, b in zip(times, times[1:]))  # session time of a live source
    upright = frames[-1].image.astype(int)
    assert upright.std() > 30  # the colour bars, not a blank frame
    # nvvidconv's flip-method numbers, mapped onto videoflip's: the same pictures numpy makes
    # (of the same frame: part of the pattern moves with the frame number).
    expected = {4: upright[:, ::-1], 2: upright[::-1, ::-1], 1: np.rot90(upright),
                3: np.rot90(upright, -1), 6: upright[::-1]}
    for method, picture in expected.items():
        flipped = grab(f"{base}&flip={method}", 4)[-1].image.astype(int)
        assert flipped.shape == picture.shape, method
        assert np.abs(flipped - picture).mean() < 1.0, method


@gst
def test_the_jetson_camera_element_missing_is_named_with_its_package(gstreamer):
    assert gstreamer_has_element("nvarguscamerasrc") is False  # not a Jetson
    with pytest.raises(SourceError, match="GStreamer has no element nvarguscamerasrc: install "
                                          "JetPack's nvidia-l4t-gstreamer"):
        grab("csi://0?width=160&height=120", 1)


def write_numbered_video(path, frames: int, fps: float = 10.0, size=(64, 48)) -> None:
    """Frame i has the grey level 20 + 10 i (survives lossy coding)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    assert writer.isOpened()
    for i in range(frames):
        writer.write(np.full((size[1], size[0], 3), 20 + 10 * i, np.uint8))
    writer.release()


@gst
def test_file_decoded_through_gstreamer(gstreamer, tmp_path):
    path = tmp_path / "clip.mp4"
    write_numbered_video(path, 12)
    source = open_video_source(f"file://{path}?api=gstreamer")
    frames = []
    with source:
        source.open(SessionClock())
        while (frame := source.read()) is not None:
            frames.append(frame)
    assert len(frames) == 12 and source.fps == pytest.approx(10.0)
    assert [round((f.image.mean() - 20) / 10) for f in frames] == list(range(12))
    assert frames[5].timestamp_s == pytest.approx(0.5)


@gst
def test_file_that_does_not_preroll_is_a_clear_error(gstreamer, tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("not a video\n" * 100)
    start = time.monotonic()
    with pytest.raises(SourceError, match="cannot decode"):
        grab(f"file://{path}?api=gstreamer", 1)
    assert time.monotonic() - start < 10


@gst
def test_rtsp_camera_from_a_local_server(gstreamer, peers, port):
    peers("camera", port)
    frames = grab(f"rtsp://127.0.0.1:{port}/cam", 10)
    assert all(f.image.shape == (120, 160, 3) for f in frames)
    assert frames[-1].image.std() > 5  # the bouncing ball on black, decoded


@gst
def test_rtsp_camera_that_disappears_reconnects_with_backoff(gstreamer, peers, port, caplog):
    server = peers("camera", port)
    uri = f"rtsp://127.0.0.1:{port}/cam"
    capture = CaptureThread(open_video_source(uri), SessionClock(), capacity=2,
                            backoff=Backoff(initial_s=0.2, max_s=1.0, give_up_s=30.0))
    with caplog.at_level(logging.WARNING), capture:
        capture.start()
        before = [capture.get(10.0) for _ in range(5)]
        assert all(f is not None for f in before)
        server.stop()  # the camera goes away mid-run
        deadline = time.monotonic() + 10
        while not capture.reconnecting and time.monotonic() < deadline:
            capture.get(0.1)
        assert capture.reconnecting, "the loss was not noticed within 10 s"
        time.sleep(1.0)  # a few refused attempts, with backoff
        peers("camera", port)  # and comes back
        after = []
        deadline = time.monotonic() + 20
        while len(after) < 5 and time.monotonic() < deadline:
            frame = capture.get(0.5)
            if frame is not None:
                after.append(frame)
    assert len(after) == 5, "no frames after the server came back"
    assert capture.reconnects == 1 and capture.error is None
    assert after[0].index > before[-1].index  # numbering continues across the reconnect
    assert "reconnect failed" in caplog.text and "nothing answers" in caplog.text
    assert "reconnected" in caplog.text


@gst
def test_rtsp_address_that_refuses_fails_at_once(gstreamer, port):
    # nothing listens at port
    start = time.monotonic()
    with pytest.raises(SourceError, match=f"nothing answers at 127.0.0.1:{port}"):
        grab(f"rtsp://127.0.0.1:{port}/cam", 1)
    assert time.monotonic() - start < 2


@gst
def test_rtsp_server_that_never_answers_is_bounded(gstreamer):
    """A server that accepts the connection and says nothing: the pipeline never prerolls."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]
    accepted = []
    stop = threading.Event()

    def accept():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    source = open_video_source(f"rtsp://127.0.0.1:{port}/cam")
    source.open_timeout_s = 3.0
    start = time.monotonic()
    try:
        with pytest.raises(SourceError, match="did not preroll|cannot connect"):
            source.open(SessionClock())
        assert time.monotonic() - start < 6
    finally:
        stop.set()
        thread.join(5)
        for conn in accepted:
            conn.close()
        listener.close()


def result(i: int) -> FrameResult:
    return FrameResult(frame=i, timestamp_s=i / 15, count=3.0, exit=0, num_exits=3,
                       confidence=0.9, latency_ms=1.0, pipeline_latency_ms=2.0, fps=15.0)


def send_numbered_frames(uri: str, frames: int) -> list[float]:
    """Writes frames whose grey level encodes their index (10 levels apart: H.264 and the
    colour conversions move a level by up to 4); returns the levels sent."""
    levels = [30.0 + 10 * i for i in range(frames)]
    sink = open_sink(uri)
    sink.open(15.0)
    with sink:
        for i, level in enumerate(levels):
            image = np.full((96, 128, 3), level, np.uint8)
            sink.write(Frame(image, i / 15, i, bgr=True), result(i), image)
    return levels


def wait_for_values(peer, count: int, timeout_s: float = 15.0) -> list[float]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and len(peer.values()) < count:
        time.sleep(0.1)
    time.sleep(0.3)  # anything extra would show up now
    return peer.values()


@gst
def test_rtp_output_read_back_frame_by_frame(gstreamer, peers, port, tmp_path):
    receiver = peers("rtp", port, tmp_path / "rtp.txt")
    sent = send_numbered_frames(f"rtp://127.0.0.1:{port}?encoder=x264enc&bitrate=2000", 20)
    received = wait_for_values(receiver, len(sent))
    assert len(received) == len(sent)
    np.testing.assert_allclose(received, sent, atol=5)  # every frame, in order


@gst
def test_rtsp_output_published_to_a_server_read_back_frame_by_frame(gstreamer, peers, port,
                                                                   tmp_path):
    server = peers("record", port, tmp_path / "rtsp.txt")
    sent = send_numbered_frames(f"rtsp://127.0.0.1:{port}/live", 20)
    received = wait_for_values(server, len(sent))
    assert len(received) == len(sent)
    np.testing.assert_allclose(received, sent, atol=5)


@gst
def test_stream_output_bad_input(gstreamer, port):
    sink = open_sink(f"rtsp://127.0.0.1:{port}/live")
    sink.open(15.0)
    image = np.zeros((96, 128, 3), np.uint8)
    with pytest.raises(SourceError, match=f"nothing answers at 127.0.0.1:{port}"):
        sink.write(Frame(image, 0.0, 0), result(0), image)
    sink = open_sink(f"rtp://127.0.0.1:{port}?encoder=nvv4l2h264enc")
    sink.open(15.0)
    with pytest.raises(SourceError, match="GStreamer has no element nvvidconv: install JetPack"):
        sink.write(Frame(image, 0.0, 0), result(0), image)
    with pytest.raises(ConfigError, match="encoder=h265 is not one of"):
        open_sink("rtp://127.0.0.1:5000?encoder=h265")


# --------------------------------------------------------------------------- runs everywhere


def test_h264_encoder_falls_back_to_x264_without_nvenc(tmp_path, caplog):
    absent = tmp_path / "v4l2-nvenc"
    assert choose_h264_encoder(jetson=False, nvenc_device=absent) == "x264enc"
    with caplog.at_level(logging.INFO, logger="trt_exit.pipelines.opencv_support"):
        assert choose_h264_encoder(jetson=True, nvenc_device=absent) == "x264enc"
    assert "no hardware H.264 encoder" in caplog.text and "Orin Nano" in caplog.text
    absent.write_text("")  # a Jetson whose encoder device exists (AGX Orin, Orin NX)
    expected = "x264enc" if gstreamer_has_element("nvv4l2h264enc") is False else "nvv4l2h264enc"
    assert choose_h264_encoder(jetson=True, nvenc_device=absent) == expected
