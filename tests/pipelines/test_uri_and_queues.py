"""URI parsing and the capture queue."""

from __future__ import annotations

import threading
import time

import pytest

from trt_exit.errors import ConfigError
from trt_exit.pipelines.queues import FrameQueue, QueueClosed
from trt_exit.pipelines.uri import parse_uri


@pytest.mark.parametrize("text, scheme, location, options", [
    ("csi://0", "csi", "0", {}),
    ("v4l2:///dev/video0", "v4l2", "/dev/video0", {}),
    ("v4l2:///dev/video1?width=1280&height=720", "v4l2", "/dev/video1",
     {"width": "1280", "height": "720"}),
    ("rtsp://cam.local:8554/live?channel=1", "rtsp", "cam.local:8554/live?channel=1", {}),
    ("file://clip.mp4", "file", "clip.mp4", {}),
    ("file:///abs/clip.mp4?loop=1", "file", "/abs/clip.mp4", {"loop": "1"}),
    ("clip.mp4", "file", "clip.mp4", {}),
    ("/data/my%20frames/", "file", "/data/my%20frames/", {}),
    ("synthetic://crowd?seed=3", "synthetic", "crowd", {"seed": "3"}),
    ("alsa://hw:1,0", "alsa", "hw:1,0", {}),
    ("mic://default?rate=48000", "mic", "default", {"rate": "48000"}),
    ("jsonl://out/results.jsonl", "jsonl", "out/results.jsonl", {}),
    ("display://0", "display", "0", {}),
    ("null://", "null", "", {}),
    ("NONE://", "none", "", {}),
])
def test_parse_uri(text, scheme, location, options):
    uri = parse_uri(text)
    assert (uri.scheme, uri.location, uri.options) == (scheme, location, options)
    assert str(uri) == text


def test_rtsp_keeps_the_camera_query_verbatim():
    uri = parse_uri("rtsp://user:pw@10.0.0.2:554/stream?subtype=1")
    assert uri.without_options() == "rtsp://user:pw@10.0.0.2:554/stream?subtype=1"


@pytest.mark.parametrize("text", ["", "   ", "ftp://host/file", "webcam://0"])
def test_bad_uris_say_what_is_known(text):
    with pytest.raises(ConfigError, match="URI"):
        parse_uri(text)


def test_typed_options_reject_garbage():
    uri = parse_uri("synthetic://crowd?seed=x&fps=2.5&loop=maybe")
    assert uri.float_option("fps") == 2.5
    with pytest.raises(ConfigError, match="seed"):
        uri.int_option("seed")
    with pytest.raises(ConfigError, match="loop"):
        uri.bool_option("loop")


def test_drop_oldest_keeps_the_newest_items():
    queue = FrameQueue(capacity=2, drop_oldest=True)
    for i in range(5):
        assert queue.put(i)
    assert queue.dropped == 3
    assert [queue.get(0), queue.get(0)] == [3, 4]
    assert queue.get(0.01) is None


def test_blocking_queue_waits_for_the_consumer_and_loses_nothing():
    queue = FrameQueue(capacity=1, drop_oldest=False)
    received = []

    def consume():
        while True:
            try:
                item = queue.get(1.0)
            except QueueClosed:
                return
            if item is not None:
                received.append(item)
                time.sleep(0.002)

    consumer = threading.Thread(target=consume)
    consumer.start()
    for i in range(50):
        assert queue.put(i)
    queue.close()
    consumer.join(5)
    assert not consumer.is_alive()
    assert received == list(range(50)) and queue.dropped == 0


def test_close_wakes_a_blocked_producer_and_drains():
    queue = FrameQueue(capacity=1, drop_oldest=False)
    queue.put("a")
    result = []
    producer = threading.Thread(target=lambda: result.append(queue.put("b")))
    producer.start()
    time.sleep(0.05)
    queue.close()
    producer.join(2)
    assert result == [False]
    assert queue.get(0) == "a"
    with pytest.raises(QueueClosed):
        queue.get(0)
