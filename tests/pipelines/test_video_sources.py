"""Video sources (files, folders, the synthetic scene, cameras) and the capture thread."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2", reason="video tests need OpenCV: pip install 'trt-exit[video]'")

from trt_exit.errors import ConfigError  # noqa: E402
from trt_exit.pipelines.base import Backoff, Frame, SessionClock, SourceError, SourceLost  # noqa: E402
from trt_exit.pipelines.opencv_support import GSTREAMER_FIX, gstreamer_available  # noqa: E402
from trt_exit.pipelines.queues import QueueClosed  # noqa: E402
from trt_exit.pipelines.video_sources import (  # noqa: E402
    CaptureThread,
    SyntheticVideoSource,
    open_video_source,
)


def write_video(path, frames: int, fps: float = 10.0, size=(64, 48)) -> list[np.ndarray]:
    """Frames whose mean brightness encodes their index (survives lossy coding)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    assert writer.isOpened()
    images = []
    for i in range(frames):
        image = np.full((size[1], size[0], 3), (20 + 10 * i) % 256, np.uint8)
        writer.write(image)
        images.append(image)
    writer.release()
    return images


def read_all(source, clock=None) -> list[Frame]:
    frames = []
    with source:
        source.open(clock or SessionClock())
        while (frame := source.read()) is not None:
            frames.append(frame)
    return frames


def test_video_file_frames_carry_media_time(tmp_path):
    path = tmp_path / "clip.mp4"
    write_video(path, 12, fps=10)
    frames = read_all(open_video_source(f"file://{path}"))
    assert len(frames) == 12
    assert [f.index for f in frames] == list(range(12))
    assert frames[5].timestamp_s == pytest.approx(0.5)
    assert frames[0].bgr and frames[0].image.shape == (48, 64, 3)
    assert abs(frames[7].image.mean() - 90) < 6  # the right frame, in order


def test_plain_path_and_loop_option(tmp_path):
    path = tmp_path / "clip.mp4"
    write_video(path, 4)
    source = open_video_source(f"file://{path}?loop=1")
    with source:
        source.open(SessionClock())
        frames = [source.read() for _ in range(10)]
    assert [round((f.image.mean() - 20) / 10) for f in frames] == [0, 1, 2, 3] * 2 + [0, 1]
    assert frames[-1].timestamp_s == pytest.approx(0.9)  # media time keeps counting
    assert len(read_all(open_video_source(str(path)))) == 4


def test_corrupt_video_file_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.mp4"
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40)
    with pytest.raises(SourceError, match="corrupt"):
        read_all(open_video_source(str(path)))
    with pytest.raises(SourceError, match="no such video file"):
        read_all(open_video_source(str(tmp_path / "missing.mp4")))


def test_truncated_video_keeps_the_frames_before_the_damage(tmp_path, caplog):
    path = tmp_path / "clip.avi"  # MJPG in AVI: frames decode independently
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    rng = np.random.default_rng(0)
    for _ in range(20):
        writer.write(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    writer.release()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING):
        try:
            frames = read_all(open_video_source(str(path)))
        except SourceError as exc:  # some FFmpeg builds refuse a file without its index
            assert "corrupt" in str(exc)
            return
    assert 0 < len(frames) < 20
    assert "truncated or corrupt" in caplog.text


def test_image_folder_in_name_order_skipping_undecodable_files(tmp_path, caplog):
    for i in (2, 0, 1):
        cv2.imwrite(str(tmp_path / f"img_{i}.png"), np.full((8, 8, 3), 50 * i, np.uint8))
    (tmp_path / "img_3.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "notes.txt").write_text("ignored")
    with caplog.at_level(logging.WARNING):
        frames = read_all(open_video_source(f"file://{tmp_path}?fps=5"))
    assert [int(f.image.mean()) for f in frames] == [0, 50, 100]
    assert frames[2].timestamp_s == pytest.approx(0.4)
    assert "img_3.jpg" in caplog.text
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceError, match="holds no images"):
        read_all(open_video_source(str(empty)))


def test_synthetic_frames_and_ground_truth():
    source = open_video_source("synthetic://crowd?seed=2&fps=15")
    assert isinstance(source, SyntheticVideoSource)
    with source:
        source.open(SessionClock())
        frames = [source.read() for _ in range(3)]
    from trt_exit.training.crowd_synth import CrowdSceneConfig, SyntheticCrowdStream

    image, count = SyntheticCrowdStream(2, CrowdSceneConfig()).frame(2 / 15)
    np.testing.assert_array_equal(frames[2].image, image)
    assert frames[2].meta["true_count"] == count and not frames[2].bgr


def test_absent_v4l2_camera_lists_what_is_there():
    with pytest.raises(SourceError, match="no camera at /dev/video97"):
        read_all(open_video_source("v4l2:///dev/video97"))


@pytest.mark.skipif(gstreamer_available(), reason="this OpenCV has GStreamer")
def test_csi_without_gstreamer_explains_the_jetson_fix():
    with pytest.raises(SourceError) as info:
        read_all(open_video_source("csi://0"))
    assert GSTREAMER_FIX in str(info.value) and "system-site-packages" in str(info.value)


@pytest.mark.parametrize("uri, message", [
    ("jsonl://x.jsonl", "not a video source"),
    ("frame.png", "single image"),
    ("synthetic://crowd?fps=0", "fps must be positive"),
])
def test_bad_video_uris(uri, message):
    with pytest.raises(ConfigError, match=message):
        open_video_source(uri)


# --------------------------------------------------------------------------- capture thread


class FlakyCamera(SyntheticVideoSource):
    """A live source (synthetic frames, camera timing) that drops out after ``fail_after``
    frames and refuses ``refusals`` reopen attempts; every frame takes ``period_s``."""

    live = True

    def __init__(self, uri, fail_after: int, refusals: int, period_s: float = 0.002):
        super().__init__(uri)
        self.fail_after, self.refusals, self.period_s = fail_after, refusals, period_s
        self.opens = 0
        self.closed = 0

    def open(self, clock):
        self.opens += 1
        if self.opens > 1 and self.refusals > 0:
            self.refusals -= 1
            raise SourceError("camera not there")
        super().open(clock)
        self._delivered = 0

    def read(self):
        if self._delivered >= self.fail_after:
            raise SourceLost("camera unplugged")
        time.sleep(self.period_s)
        self._delivered += 1
        frame = super().read()
        frame.timestamp_s = self._clock.now_s()
        return frame

    def close(self):
        self.closed += 1
        super().close()


def drain(capture, limit_s=10.0) -> list[Frame]:
    frames, deadline = [], time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            frame = capture.get(0.1)
        except QueueClosed:
            return frames
        if frame is not None:
            frames.append(frame)
    raise AssertionError("the capture thread never closed its queue")


def test_capture_reconnects_with_backoff_and_keeps_counting_frames():
    from trt_exit.pipelines.uri import parse_uri

    camera = FlakyCamera(parse_uri("synthetic://crowd"), fail_after=5, refusals=2)
    capture = CaptureThread(camera, SessionClock(), capacity=100,
                            backoff=Backoff(initial_s=0.01, max_s=0.02, give_up_s=1.0))
    with capture:
        capture.start()
        frames = []
        while len(frames) < 12:
            frame = capture.get(2.0)
            assert frame is not None, "no frames after the reconnect"
            frames.append(frame)
    assert capture.reconnects >= 1 and camera.opens >= 4  # 1 + 2 refused + 1 accepted
    assert [f.index for f in frames] == list(range(12))  # numbering continues across reconnects
    assert camera.closed >= 1


def test_capture_gives_up_after_the_reconnect_window():
    from trt_exit.pipelines.uri import parse_uri

    camera = FlakyCamera(parse_uri("synthetic://crowd"), fail_after=3, refusals=10 ** 6)
    capture = CaptureThread(camera, SessionClock(), capacity=100,
                            backoff=Backoff(initial_s=0.01, max_s=0.05, give_up_s=0.2))
    with capture:
        capture.start()
        frames = drain(capture)
    assert len(frames) == 3
    assert isinstance(capture.error, SourceLost) and "not back after" in str(capture.error)


def test_live_capture_drops_the_oldest_frames_for_a_slow_consumer():
    from trt_exit.pipelines.uri import parse_uri

    camera = FlakyCamera(parse_uri("synthetic://crowd"), fail_after=10 ** 9, refusals=0,
                         period_s=0.004)
    clock = SessionClock()
    with CaptureThread(camera, clock, capacity=2) as capture:
        capture.start()
        ages = []
        for _ in range(6):
            time.sleep(0.08)  # a model much slower than the camera
            frame = capture.get(1.0)
            ages.append(clock.now_s() - frame.timestamp_s)
        dropped = capture.dropped
    assert dropped > 10
    # Never falls behind: a frame is about the queue length of camera periods old (plus
    # scheduling noise on a busy machine), not the backlog a lossless queue would build up:
    # 80 ms per read of a 4 ms camera would leave the sixth frame read about 0.45 s old.
    assert np.median(ages) < 0.1 and ages[-1] < 0.2


def test_offline_capture_is_lossless_and_close_joins_the_thread(tmp_path):
    path = tmp_path / "clip.mp4"
    write_video(path, 30)
    before = threading.active_count()
    capture = CaptureThread(open_video_source(str(path)), SessionClock(), capacity=2)
    with capture:
        capture.start()
        frames = []
        for _ in range(10):
            frames.append(capture.get(2.0))
            time.sleep(0.005)
    assert [f.index for f in frames] == list(range(10)) and capture.dropped == 0
    assert threading.active_count() == before


def test_paced_offline_source_follows_its_frame_rate():
    clock = SessionClock()
    with CaptureThread(open_video_source("synthetic://crowd?fps=20"), clock,
                       realtime=True) as capture:
        capture.start()
        frames = [capture.get(2.0) for _ in range(6)]
    spacing = np.diff([f.timestamp_s for f in frames])
    np.testing.assert_allclose(spacing, 0.05, atol=1e-6)
    assert frames[-1].captured_s >= frames[-1].timestamp_s - 0.01
