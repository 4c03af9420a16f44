"""Sinks: JSON lines, video files with the overlay, and the clear errors of the others."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2", reason="sink tests need OpenCV: pip install 'trt-exit[video]'")

from trt_exit.errors import ConfigError  # noqa: E402
from trt_exit.pipelines.base import Frame  # noqa: E402
from trt_exit.pipelines.opencv_support import gstreamer_available, gui_available  # noqa: E402
from trt_exit.pipelines.overlay import draw_overlay, overlay_lines  # noqa: E402
from trt_exit.pipelines.sinks import FrameResult, JsonlSink, NullSink, open_sink  # noqa: E402


def result(i: int, **changes) -> FrameResult:
    values = dict(frame=i, timestamp_s=i / 30, count=12.5 + i, exit=i % 3, num_exits=3,
                  confidence=0.9, latency_ms=1.25, pipeline_latency_ms=3.5, fps=29.7)
    values.update(changes)
    return FrameResult(**values)


def frame(i: int, size=(96, 128)) -> Frame:
    return Frame(np.full((*size, 3), 40 + i, np.uint8), i / 30, i, bgr=True)


def test_jsonl_lines_are_complete_before_close(tmp_path):
    path = tmp_path / "out" / "results.jsonl"
    sink = open_sink(f"jsonl://{path}")
    assert isinstance(sink, JsonlSink)
    sink.open(30.0)
    for i in range(3):
        sink.write(frame(i), result(i), None)
        # Flushed as written: another reader sees every line already (a crash loses nothing).
        lines = path.read_text().splitlines()
        assert len(lines) == i + 1
    sink.write(frame(3), result(3, confidence=float("nan"), true_count=7.0), None)
    sink.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert set(records[0]) >= {"frame", "timestamp_s", "count", "exit", "confidence", "latency_ms"}
    assert records[1]["frame"] == 1 and records[1]["count"] == 13.5 and records[1]["exit"] == 1
    assert records[3]["confidence"] is None and records[3]["true_count"] == 7.0


def test_jsonl_into_a_directory_or_unwritable_place_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="directory"):
        open_sink(f"jsonl://{tmp_path}").open(None)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot write"):
        open_sink(f"jsonl://{blocker}/sub/results.jsonl").open(None)


def test_plain_jsonl_path_and_null():
    assert isinstance(open_sink("results.jsonl"), JsonlSink)
    assert isinstance(open_sink("null://"), NullSink)


def test_video_file_has_every_frame_with_the_overlay(tmp_path):
    path = tmp_path / "out.mp4"
    sink = open_sink(str(path))
    assert sink.renders
    sink.open(15.0)
    for i in range(8):
        r = result(i)
        sink.write(frame(i), r, draw_overlay(frame(i).image, r))
    sink.close()
    capture = cv2.VideoCapture(str(path))
    assert capture.get(cv2.CAP_PROP_FPS) == pytest.approx(15.0)
    read = []
    while True:
        ok, image = capture.read()
        if not ok:
            break
        read.append(image)
    capture.release()
    assert len(read) == 8 and read[0].shape == (96, 128, 3)
    # The overlay darkened the top-left box and wrote white text into it.
    box = read[3][:30, :60].astype(int)
    assert box.max() > 150 and np.median(box) < 40


def test_overlay_text_and_rgb_input():
    r = result(2, true_count=14.0, audio_missing_ms=250.0)
    lines = overlay_lines(r)
    assert lines[0] == "count 14.5  (true 14)" and lines[1].startswith("exit 2/2")
    assert "29.7 FPS" in lines[2] and "audio missing 250 ms" in lines[3]
    rgb = np.zeros((720, 1280, 3), np.uint8)
    rgb[..., 0] = 200  # red in RGB
    out = draw_overlay(rgb, r, bgr=False)
    assert out[700, 700].tolist() == [0, 0, 200]  # converted to BGR outside the box
    assert rgb[5, 5, 0] == 200  # the input is untouched


@pytest.mark.skipif(gui_available(), reason="this OpenCV has a GUI")
def test_display_without_gui_says_what_to_install():
    with pytest.raises(ConfigError, match="opencv-python-headless"):
        open_sink("display://0").open(None)


@pytest.mark.skipif(gstreamer_available(), reason="this OpenCV has GStreamer")
@pytest.mark.parametrize("uri", ["rtsp://localhost:8554/live", "rtp://127.0.0.1:5000"])
def test_stream_output_without_gstreamer_explains_the_fix(uri):
    with pytest.raises(ConfigError, match="GStreamer"):
        open_sink(uri)


def test_h264_pipelines():
    from trt_exit.pipelines.opencv_support import csi_pipeline, h264_output_pipeline

    rtp = h264_output_pipeline("rtp://192.0.2.1:5004", 30, encoder="nvv4l2h264enc")
    assert "nvv4l2h264enc" in rtp and rtp.endswith("udpsink host=192.0.2.1 port=5004 sync=false")
    assert h264_output_pipeline("rtsp://srv:8554/x", 25).endswith("rtspclientsink location=rtsp://srv:8554/x")
    csi = csi_pipeline(1, 1920, 1080, 30, flip_method=2)
    assert csi.startswith("nvarguscamerasrc sensor-id=1 ! video/x-raw(memory:NVMM),width=1920")
    assert "flip-method=2" in csi and csi.endswith("appsink drop=1 max-buffers=1")


def test_record_is_strict_json():
    r = result(0, latency_ms=math.inf)
    text = json.dumps(r.record(), allow_nan=False)
    assert json.loads(text)["latency_ms"] is None
