"""Sinks from URIs: where results (and rendered frames) go.

=========================  ===========================================================
URI                        what
=========================  ===========================================================
``jsonl://results.jsonl``  one JSON object per frame, flushed as written
``file://out.mp4``         video with the overlay (``.mp4``, ``.avi``, ``.mkv``)
``display://0``            a window with the overlay (``q`` or Esc stops the run)
``rtsp://host:8554/live``  H.264 published to an RTSP server (GStreamer ``rtspclientsink``)
``rtp://host:5000``        H.264 as RTP over UDP (GStreamer)
``null://``                nothing (measure the pipeline alone)
=========================  ===========================================================

Options: ``fps`` (video files and streams; default the source's), ``bitrate`` (kbit/s),
``encoder`` (``x264enc`` or ``nvv4l2h264enc``; the default is ``nvv4l2h264enc`` on a Jetson
with a hardware encoder, ``/dev/v4l2-nvenc``, and ``x264enc`` elsewhere, Orin Nano included),
``fsync`` (JSONL: also fsync every line, for power loss rather than a crash). On ``rtsp://`` and
``rtp://`` these three are taken out of the query string; the rest of it goes to the server.
"""

from __future__ import annotations

import json
import logging
import math
import os
import urllib.parse
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from trt_exit.errors import ConfigError
from trt_exit.pipelines.base import Frame, SourceError
from trt_exit.pipelines.opencv_support import (
    GSTREAMER_FIX,
    choose_h264_encoder,
    gstreamer_available,
    gui_available,
    h264_output_pipeline,
    import_cv2,
    missing_elements_message,
    probe_rtsp_server,
)
from trt_exit.pipelines.uri import ResourceURI, parse_uri

log = logging.getLogger(__name__)


@dataclass
class FrameResult:
    """What the app concluded about one frame (one JSONL line).

    Attributes:
        frame: Frame index within the source.
        timestamp_s: Frame timestamp on the session clock (media time for files).
        count: Estimated people count.
        exit: The exit that answered (0-based; the final head is ``num_exits - 1``).
        num_exits: Exits of the model.
        confidence: That exit's confidence.
        latency_ms: Inference wall time (all stages run).
        pipeline_latency_ms: Capture to result (preprocessing, queueing and inference).
        fps: Frames processed per second, averaged over the last second or so.
        true_count: Ground truth when the source knows it (synthetic scene), else None.
        audio_missing_ms: Milliseconds of the frame's audio window without audio.
    """

    frame: int
    timestamp_s: float
    count: float
    exit: int
    num_exits: int
    confidence: float
    latency_ms: float
    pipeline_latency_ms: float
    fps: float
    true_count: float | None = None
    audio_missing_ms: float = 0.0

    def record(self) -> dict[str, Any]:
        """The JSON-ready dict (NaN/Inf become null so every line is valid JSON)."""
        out = {}
        for key, value in asdict(self).items():
            if isinstance(value, float):
                value = round(value, 6) if math.isfinite(value) else None
            out[key] = value
        return out


class Sink(ABC):
    """Receives every processed frame and its result. A context manager.

    Attributes:
        uri: Where results go.
        renders: The sink shows or stores frames (it gets the overlay drawn).
        stop_requested: The user asked to stop (closed the window).
    """

    renders = False

    def __init__(self, uri: ResourceURI):
        self.uri = uri
        self.stop_requested = False
        self.written = 0

    def open(self, fps: float | None) -> None:
        """Prepares the sink; ``fps`` is the source's frame rate (None if unknown)."""

    @abstractmethod
    def write(self, frame: Frame, result: FrameResult, rendered: np.ndarray | None) -> None:
        """Takes one result; ``rendered`` is the BGR frame with the overlay (rendering sinks)."""

    def close(self) -> None:
        """Flushes and closes (idempotent)."""

    def __enter__(self) -> "Sink":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class NullSink(Sink):
    """``null://``: discards everything."""

    def write(self, frame, result, rendered) -> None:
        self.written += 1


class JsonlSink(Sink):
    """``jsonl://results.jsonl``: one JSON object per line, flushed as written, so a crash
    loses no line already written (``?fsync=1`` also survives power loss)."""

    def __init__(self, uri: ResourceURI):
        super().__init__(uri)
        self.fsync = uri.bool_option("fsync", False)
        self._file = None

    def open(self, fps: float | None) -> None:
        path = self.uri.path
        if path.is_dir():
            raise ConfigError(f"{self.uri}: {path} is a directory; name a file")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "w", encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{self.uri}: cannot write {path} ({exc.strerror})") from exc

    def write(self, frame, result, rendered) -> None:
        self._file.write(json.dumps(result.record(), allow_nan=False) + "\n")
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())
        self.written += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class _VideoWriterSink(Sink):
    """Shared by video files and streams: a ``cv2.VideoWriter`` opened on the first frame."""

    renders = True

    def __init__(self, uri: ResourceURI):
        super().__init__(uri)
        self.fps = uri.float_option("fps")
        self._writer = None
        self._cv2 = import_cv2()

    def open(self, fps: float | None) -> None:
        self.fps = self.fps or fps or 30.0

    @abstractmethod
    def _open_writer(self, width: int, height: int):
        """A ``cv2.VideoWriter`` for frames of this size."""

    def write(self, frame, result, rendered) -> None:
        if self._writer is None:
            height, width = rendered.shape[:2]
            self._size = (width, height)
            self._writer = self._open_writer(width, height)
        if (rendered.shape[1], rendered.shape[0]) != self._size:
            # A camera that came back in another mode: keep the stream's size.
            rendered = self._cv2.resize(rendered, self._size)
        self._writer.write(rendered)
        self.written += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None


FOURCC = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".avi": "MJPG", ".mkv": "XVID"}


class VideoFileSink(_VideoWriterSink):
    """``file://out.mp4``: the frames with the overlay (mp4v in .mp4, MJPG in .avi)."""

    def _open_writer(self, width: int, height: int):
        cv2 = self._cv2
        path = self.uri.path
        fourcc = FOURCC.get(self.uri.extension)
        if fourcc is None:
            raise ConfigError(f"{self.uri}: video output must be one of {', '.join(FOURCC)}")
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), self.fps,
                                 (width, height))
        if not writer.isOpened():
            from trt_exit.fileio import check_output_dir

            check_output_dir(path.parent, str(self.uri))  # a read-only folder: say so
            raise SourceError(f"{self.uri}: OpenCV cannot write {path} with codec {fourcc}; "
                              f"try .avi (MJPG)")
        return writer


class StreamSink(_VideoWriterSink):
    """``rtsp://`` (publish to an RTSP server, e.g. mediamtx) or ``rtp://host:port`` (UDP):
    H.264 through GStreamer."""

    OWN_OPTIONS = ("fps", "bitrate", "encoder")
    ENCODERS = ("x264enc", "nvv4l2h264enc")

    def __init__(self, uri: ResourceURI):
        # Network URIs keep their query string verbatim: take this sink's options out of it.
        base, _, query = uri.uri.partition("?")
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        own = {k: v for k, v in pairs if k in self.OWN_OPTIONS}
        rest = urllib.parse.urlencode([(k, v) for k, v in pairs if k not in self.OWN_OPTIONS])
        uri = ResourceURI(uri.uri, uri.scheme, uri.location, own)
        super().__init__(uri)
        self.target = base + ("?" + rest if rest else "")
        if not gstreamer_available():
            raise ConfigError(f"{uri}: streaming output is a GStreamer pipeline. {GSTREAMER_FIX}")
        from trt_exit.profiling.jetson import is_jetson

        self.bitrate_kbps = int(uri.float_option("bitrate", 4000))
        self.encoder = uri.option("encoder") or choose_h264_encoder(is_jetson())
        if self.encoder not in self.ENCODERS:
            raise ConfigError(f"{uri}: encoder={self.encoder} is not one of "
                              f"{', '.join(self.ENCODERS)}")

    def _open_writer(self, width: int, height: int):
        cv2 = self._cv2
        if self.uri.scheme == "rtsp":
            probe_rtsp_server(self.target)
        pipeline = h264_output_pipeline(self.target, self.fps, self.bitrate_kbps, self.encoder)
        missing = missing_elements_message(pipeline)
        if missing:
            raise SourceError(f"{self.uri}: {missing}")
        writer = cv2.VideoWriter(pipeline, cv2.CAP_GSTREAMER, 0, self.fps, (width, height))
        if not writer.isOpened():
            raise SourceError(f"{self.uri}: cannot open the GStreamer output pipeline "
                              f"'{pipeline}'; for rtsp:// an RTSP server must be listening "
                              f"(e.g. mediamtx), and gst-inspect-1.0 {self.encoder} must work")
        return writer


class DisplaySink(Sink):
    """``display://0``: a window with the overlay; ``q`` or Esc (or closing it) stops the run."""

    renders = True
    WINDOW = "trt-exit"

    def __init__(self, uri: ResourceURI):
        super().__init__(uri)
        self._cv2 = import_cv2()
        self._open = False

    def open(self, fps: float | None) -> None:
        if not gui_available():
            raise ConfigError(
                f"{self.uri}: this OpenCV has no GUI (the headless wheel); install "
                f"opencv-python instead of opencv-python-headless, or on a Jetson use "
                f"JetPack's python3-opencv; or write to file://out.mp4 / rtsp:// instead")
        if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
            raise ConfigError(f"{self.uri}: no display (DISPLAY is not set); in a container pass "
                              f"-e DISPLAY -v /tmp/.X11-unix:/tmp/.X11-unix, or use another sink")
        self._cv2.namedWindow(self.WINDOW, self._cv2.WINDOW_NORMAL)
        self._open = True

    def write(self, frame, result, rendered) -> None:
        cv2 = self._cv2
        cv2.imshow(self.WINDOW, rendered)
        key = cv2.waitKey(1) & 0xFF
        if key in (ord("q"), 27) or cv2.getWindowProperty(self.WINDOW, cv2.WND_PROP_VISIBLE) < 1:
            self.stop_requested = True
        self.written += 1

    def close(self) -> None:
        if self._open:
            self._cv2.destroyWindow(self.WINDOW)
            self._cv2.waitKey(1)
            self._open = False


def open_sink(uri: str | ResourceURI) -> Sink:
    """The sink for ``uri`` (not opened yet).

    Raises:
        ConfigError: A scheme that is not a sink, or a missing capability (GUI, GStreamer).
    """
    uri = parse_uri(uri) if isinstance(uri, str) else uri
    if uri.scheme == "null":
        return NullSink(uri)
    if uri.scheme == "jsonl":
        return JsonlSink(uri)
    if uri.scheme == "display":
        return DisplaySink(uri)
    if uri.scheme in ("rtsp", "rtp"):
        return StreamSink(uri)
    if uri.scheme == "file":
        if uri.extension in (".jsonl", ".json", ".ndjson"):
            return JsonlSink(uri)
        return VideoFileSink(uri)
    raise ConfigError(f"{uri}: {uri.scheme}:// is not an output; use jsonl://, file://, "
                      f"display://, rtsp://, rtp:// or null://")
