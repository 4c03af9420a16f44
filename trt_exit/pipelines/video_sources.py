"""Video sources from URIs, and the capture thread that feeds the main loop.

=====================  ========  =============================================================
URI                    live      how
=====================  ========  =============================================================
``csi://0``            yes       GStreamer ``nvarguscamerasrc`` through OpenCV (needs GStreamer);
                                 ``?source=videotestsrc``: its software twin, a test pattern
``v4l2:///dev/video0`` yes       OpenCV's V4L2 backend
``rtsp://...``         yes       OpenCV (GStreamer ``rtspsrc`` when available, else FFmpeg)
``file://clip.mp4``    no        OpenCV (FFmpeg); a plain path works too; ``?api=gstreamer``:
                                 GStreamer's ``decodebin`` (hardware decoders on a Jetson)
``file://frames/``     no        every image in the folder, sorted by name
``synthetic://crowd``  no        :class:`~trt_exit.training.crowd_synth.SyntheticCrowdStream`
=====================  ========  =============================================================

Options (query string, or the ``count`` command's ``--input-*`` flags): ``width``, ``height``,
``fps`` (capture mode of cameras; the frame rate of image folders and of the synthetic scene),
``flip`` (CSI ``nvvidconv`` flip-method), ``loop`` (files: start again at the end), ``seed``
(synthetic scene), ``source`` (CSI: ``nvarguscamerasrc`` or ``videotestsrc``), ``api`` (files:
``ffmpeg``, the default, or ``gstreamer``).

Opening is bounded: an RTSP address that refuses is reported at once (a TCP probe before
GStreamer is involved), and an OpenCV open that does not return within :attr:`OpenCVSource.
open_timeout_s` (a pipeline that never prerolls) is an error, not a hang.

Live sources are read by a :class:`CaptureThread` into a drop-oldest :class:`FrameQueue`, so the
main loop always gets the newest frame; when a live source stops delivering, the thread
reconnects with exponential backoff (:class:`Backoff`). Offline sources are read into a blocking
queue (every frame is processed) unless paced in real time, which they are when the other input
is live (and with ``--realtime``).
"""

from __future__ import annotations

import glob
import logging
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from trt_exit.errors import ConfigError
from trt_exit.pipelines.base import Backoff, Frame, SessionClock, SourceError, SourceLost
from trt_exit.pipelines.opencv_support import (
    CAMERA_SOURCES,
    GSTREAMER_FIX,
    csi_pipeline,
    file_input_pipeline,
    gstreamer_available,
    import_cv2,
    missing_elements_message,
    probe_rtsp_server,
    rtsp_input_pipeline,
)
from trt_exit.pipelines.queues import FrameQueue, QueueClosed
from trt_exit.pipelines.uri import ResourceURI, parse_uri

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".ts")


class VideoSource(ABC):
    """A stream of frames. Use it as a context manager (or call :meth:`close`).

    Attributes:
        uri: Where the frames come from.
        live: Frames arrive in real time whether or not anyone reads them (cameras, streams).
        fps: Nominal frame rate, or None if unknown.
    """

    live = False

    def __init__(self, uri: ResourceURI):
        self.uri = uri
        self.fps: float | None = None
        self._next_index = 0

    @abstractmethod
    def open(self, clock: SessionClock) -> None:
        """Opens the device or file; raises :class:`SourceError` with what to do."""

    @abstractmethod
    def read(self) -> Frame | None:
        """The next frame; None at the end of a file.

        Raises:
            SourceLost: A live source stopped delivering.
        """

    def close(self) -> None:
        """Releases the device or file (idempotent)."""

    def reopen(self) -> None:
        """Closes and opens again (live sources, after :class:`SourceLost`)."""
        self.close()
        self.open(self._clock)

    def describe(self) -> dict[str, Any]:
        return {"uri": str(self.uri), "live": self.live, "fps": self.fps}

    def __enter__(self) -> "VideoSource":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# --------------------------------------------------------------------------- synthetic


class SyntheticVideoSource(VideoSource):
    """The synthetic crowd scene (``synthetic://crowd?seed=0&fps=30``): RGB frames whose
    people count changes over time; each frame carries ``meta["true_count"]``.

    It is deterministic in (seed, time), so a ``synthetic://crowd`` audio source with the same
    seed hears the same crowd.
    """

    def __init__(self, uri: ResourceURI):
        super().__init__(uri)
        if uri.location not in ("crowd", ""):
            raise ConfigError(f"{uri}: the synthetic video source is synthetic://crowd")
        self.seed = uri.int_option("seed", 0)
        self.fps = uri.float_option("fps", 30.0)
        if not self.fps > 0:
            raise ConfigError(f"{uri}: fps must be positive")
        self._stream = None

    def open(self, clock: SessionClock) -> None:
        from trt_exit.training.crowd_synth import CrowdSceneConfig, SyntheticCrowdStream

        self._clock = clock
        self._stream = SyntheticCrowdStream(self.seed, CrowdSceneConfig())

    def read(self) -> Frame | None:
        t_s = self._next_index / self.fps
        image, count = self._stream.frame(t_s)
        frame = Frame(np.ascontiguousarray(image), t_s, self._next_index, bgr=False,
                      meta={"true_count": float(count)})
        self._next_index += 1
        return frame

    def close(self) -> None:
        self._stream = None


# --------------------------------------------------------------------------- image folders


class ImageFolderSource(VideoSource):
    """Every image of a folder, sorted by name, at ``fps`` (default 30) media time."""

    def __init__(self, uri: ResourceURI):
        super().__init__(uri)
        self.fps = uri.float_option("fps", 30.0)
        self.loop = uri.bool_option("loop", False)
        self._files: list[Path] = []

    def open(self, clock: SessionClock) -> None:
        self._clock = clock
        folder = self.uri.path
        self._files = sorted(p for p in folder.iterdir()
                             if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not self._files:
            raise SourceError(f"{self.uri}: the folder {folder} holds no images "
                              f"({', '.join(IMAGE_EXTENSIONS)})")
        self._cv2 = import_cv2()
        self._position = 0

    def read(self) -> Frame | None:
        while True:
            if self._position >= len(self._files):
                if not self.loop:
                    return None
                self._position = 0
            path = self._files[self._position]
            self._position += 1
            image = self._cv2.imread(str(path), self._cv2.IMREAD_COLOR)
            if image is None:
                log.warning("%s: cannot decode %s; skipped", self.uri, path.name)
                continue
            frame = Frame(image, self._next_index / self.fps, self._next_index, bgr=True,
                          meta={"file": path.name})
            self._next_index += 1
            return frame


# --------------------------------------------------------------------------- OpenCV capture


class OpenCVSource(VideoSource):
    """Cameras, streams and video files through ``cv2.VideoCapture``.

    ``csi://N`` needs OpenCV with GStreamer; ``v4l2://`` uses OpenCV's V4L2 backend; ``rtsp://``
    uses GStreamer when this OpenCV has it (lower latency, hardware decode on Jetson) and FFmpeg
    otherwise; files use FFmpeg (``?api=gstreamer``: GStreamer).

    Attributes:
        open_timeout_s: How long an open may take before it counts as failed (a GStreamer
            pipeline that never prerolls); the stuck call is left to a daemon thread.
    """

    open_timeout_s = 20.0
    API_CHOICES = ("ffmpeg", "gstreamer")

    def __init__(self, uri: ResourceURI):
        super().__init__(uri)
        self.live = uri.scheme in ("csi", "v4l2", "rtsp")
        self.width = uri.int_option("width")
        self.height = uri.int_option("height")
        self.requested_fps = uri.float_option("fps")
        self.flip = uri.int_option("flip", 0)
        self.loop = uri.bool_option("loop", False)
        self.camera_source = uri.option("source", "nvarguscamerasrc")
        if uri.scheme == "csi" and self.camera_source not in CAMERA_SOURCES:
            raise ConfigError(f"{uri}: source={self.camera_source} is not one of "
                              f"{', '.join(CAMERA_SOURCES)}")
        self.api = (uri.option("api", "ffmpeg") or "ffmpeg").lower()
        if self.api not in self.API_CHOICES:
            raise ConfigError(f"{uri}: api={self.api} is not one of {', '.join(self.API_CHOICES)}")
        self._cap = None
        self._expected_frames: int | None = None

    # ------------------------------------------------------------------ opening

    def _capture_args(self, cv2) -> tuple[Any, int]:
        uri = self.uri
        if uri.scheme == "csi":
            if not gstreamer_available():
                raise SourceError(f"{uri}: CSI cameras are read through GStreamer "
                                  f"(nvarguscamerasrc). {GSTREAMER_FIX}")
            try:
                sensor = int(uri.location or 0)
            except ValueError:
                raise ConfigError(f"{uri}: use csi://0, csi://1, ... (the sensor id)") from None
            pipeline = csi_pipeline(sensor, self.width or 1280, self.height or 720,
                                    int(self.requested_fps or 30), self.flip, self.camera_source)
            return pipeline, cv2.CAP_GSTREAMER
        if uri.scheme == "v4l2":
            location = uri.location or "/dev/video0"
            device = f"/dev/video{location}" if location.isdigit() else location
            if not Path(device).exists():
                present = sorted(glob.glob("/dev/video*")) or ["none"]
                raise SourceError(
                    f"{uri}: no camera at {device} (video devices present: "
                    f"{', '.join(present)}); plug it in, or pass --device {device} to "
                    f"docker run")
            return device, cv2.CAP_V4L2
        if uri.scheme == "rtsp":
            probe_rtsp_server(uri.uri)
            if gstreamer_available():
                return rtsp_input_pipeline(uri.uri), cv2.CAP_GSTREAMER
            return uri.uri, cv2.CAP_FFMPEG
        path = uri.path
        if not path.is_file():
            raise SourceError(f"{uri}: no such video file {path}")
        if self.api == "gstreamer":
            if not gstreamer_available():
                raise SourceError(f"{uri}: api=gstreamer needs OpenCV with GStreamer. "
                                  f"{GSTREAMER_FIX}")
            return file_input_pipeline(path.resolve()), cv2.CAP_GSTREAMER
        return str(path), cv2.CAP_ANY

    def _open_capture(self, cv2, target, api):
        """``cv2.VideoCapture(target, api)``, bounded by :attr:`open_timeout_s`."""
        done: dict[str, Any] = {}

        def work():
            try:
                done["cap"] = cv2.VideoCapture(target, api)
            except Exception as exc:  # noqa: BLE001 - re-raised below, in the caller's thread
                done["error"] = exc

        thread = threading.Thread(target=work, name=f"open {self.uri}", daemon=True)
        thread.start()
        thread.join(self.open_timeout_s)
        if thread.is_alive():
            what = ("the GStreamer pipeline did not preroll" if api == cv2.CAP_GSTREAMER
                    else "OpenCV did not return")
            raise SourceError(f"{self.uri}: opening took more than {self.open_timeout_s:.0f} s "
                              f"({what}); check that the source delivers frames "
                              f"(gst-launch-1.0 or ffprobe on the same address)")
        if "error" in done:
            raise SourceError(f"{self.uri}: OpenCV cannot open it ({done['error']})")
        return done["cap"]

    def open(self, clock: SessionClock) -> None:
        self._clock = clock
        cv2 = import_cv2()
        self._cv2 = cv2
        target, api = self._capture_args(cv2)
        if api == cv2.CAP_GSTREAMER:
            # Before OpenCV sees it: a pipeline naming an absent element can hang its open.
            missing = missing_elements_message(target)
            if missing:
                raise SourceError(f"{self.uri}: {missing}")
        cap = self._open_capture(cv2, target, api)
        if not cap.isOpened():
            cap.release()
            raise SourceError(self._open_failure_message())
        if self.uri.scheme == "v4l2":
            # Request the capture mode; the driver picks the nearest it supports.
            if self.width:
                cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.width)
            if self.height:
                cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.height)
            if self.requested_fps:
                cap.set(cv2.CAP_PROP_FPS, self.requested_fps)
        self._cap = cap
        fps = cap.get(cv2.CAP_PROP_FPS)
        if self.live:
            self.fps = self.requested_fps or (fps if 0 < fps < 1000 else None)
        else:
            if not 0 < fps < 1000:
                log.warning("%s: the file does not say its frame rate; assuming 30 FPS", self.uri)
                fps = 30.0
            self.fps = fps
            frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
            self._expected_frames = frames if frames > 0 else None
            self._file_frames = 0

    def _open_failure_message(self) -> str:
        uri = self.uri
        if uri.scheme == "csi":
            return (f"{uri}: cannot open the CSI camera. Check that it is connected "
                    f"(ls /dev/video*), that nvargus-daemon runs (sudo systemctl restart "
                    f"nvargus-daemon), and in a container that /tmp/argus_socket is mounted "
                    f"(-v /tmp/argus_socket:/tmp/argus_socket) and --runtime nvidia is set")
        if uri.scheme == "v4l2":
            return (f"{uri}: the device exists but OpenCV cannot open it: is another program "
                    f"using it, or is it not a capture device (v4l2-ctl --list-devices)?")
        if uri.scheme == "rtsp":
            return (f"{uri}: cannot connect to the RTSP stream: check the address and that the "
                    f"camera is reachable (ffprobe {uri.uri})")
        return (f"{uri}: OpenCV cannot decode {uri.path}: the file is corrupt or in a format "
                f"this OpenCV's FFmpeg cannot read (check it with ffprobe)")

    # ------------------------------------------------------------------ reading

    def read(self) -> Frame | None:
        if self._cap is None:
            raise SourceLost(f"{self.uri}: not open")
        ok, image = self._cap.read()
        if not ok or image is None:
            if self.live:
                raise SourceLost(f"{self.uri}: the camera/stream stopped delivering frames")
            return self._end_of_file()
        if image.ndim == 2:  # some V4L2 devices deliver grey
            image = self._cv2.cvtColor(image, self._cv2.COLOR_GRAY2BGR)
        if self.live:
            t_s = self._clock.now_s()
        else:
            t_s = self._next_index / self.fps
            self._file_frames += 1
        frame = Frame(image, t_s, self._next_index, bgr=True)
        self._next_index += 1
        return frame

    def _end_of_file(self) -> Frame | None:
        expected = self._expected_frames
        if expected is not None and self._file_frames < expected - 1:
            log.warning("%s: decoding stopped at frame %d of %d: the file is truncated or "
                        "corrupt; results so far are kept", self.uri, self._file_frames, expected)
        if self.loop and self._file_frames > 0:
            self._cap.set(self._cv2.CAP_PROP_POS_FRAMES, 0)
            self._file_frames = 0
            return self.read()
        return None

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        if self._cap is not None:
            cv2 = self._cv2
            info.update(width=int(self._cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
                        height=int(self._cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
        return info


def open_video_source(uri: str | ResourceURI) -> VideoSource:
    """The video source for ``uri`` (not opened yet).

    Raises:
        ConfigError: A scheme that is not a video source, or bad options.
    """
    uri = parse_uri(uri) if isinstance(uri, str) else uri
    if uri.scheme == "synthetic":
        return SyntheticVideoSource(uri)
    if uri.scheme in ("csi", "v4l2", "rtsp"):
        return OpenCVSource(uri)
    if uri.scheme == "file":
        if uri.path.is_dir():
            return ImageFolderSource(uri)
        if uri.extension in IMAGE_EXTENSIONS:
            raise ConfigError(f"{uri}: a single image is not a video; put images in a folder "
                              f"and pass the folder")
        return OpenCVSource(uri)
    raise ConfigError(f"{uri}: {uri.scheme}:// is not a video source; use csi://, v4l2://, "
                      f"rtsp://, file:// (video or image folder) or synthetic://crowd")


# --------------------------------------------------------------------------- capture thread


class CaptureThread:
    """Reads a video source in a thread into a :class:`FrameQueue`.

    Args:
        source: An unopened source; the thread owns it from :meth:`start` and closes it.
        clock: The session clock.
        realtime: Pace an offline source at its frame rate (live sources always are).
        capacity: Queue length; live and paced queues drop the oldest frame when full.
        backoff: Reconnection policy of live sources.

    After the queue is closed, :attr:`error` holds what stopped the thread (None at a clean end
    of stream or after :meth:`close`).
    """

    def __init__(self, source: VideoSource, clock: SessionClock, realtime: bool = False,
                 capacity: int = 2, backoff: Backoff | None = None):
        self.source = source
        self.clock = clock
        self.realtime = realtime or source.live
        self.queue: FrameQueue[Frame] = FrameQueue(capacity, drop_oldest=self.realtime)
        self.backoff = backoff or Backoff()
        self.error: BaseException | None = None
        self.reconnects = 0
        self.reconnecting = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"capture {source.uri}",
                                        daemon=True)
        self._opened = False

    def start(self) -> "CaptureThread":
        """Opens the source (errors are raised here, in the caller's thread) and starts."""
        self.source.open(self.clock)
        self._opened = True
        self._thread.start()
        return self

    def get(self, timeout_s: float) -> Frame | None:
        """The next frame, or None if none came within ``timeout_s``.

        Raises:
            QueueClosed: The source ended (check :attr:`error` for why).
        """
        return self.queue.get(timeout_s)

    @property
    def dropped(self) -> int:
        return self.queue.dropped

    def _run(self) -> None:
        offset_s = None  # session time of media time 0 (paced offline sources)
        try:
            while not self._stop.is_set():
                try:
                    frame = self.source.read()
                except SourceLost as exc:
                    if not self._reconnect(exc):
                        return
                    continue
                if frame is None:
                    return
                if self.realtime and not self.source.live:
                    if offset_s is None:
                        offset_s = self.clock.now_s() - frame.timestamp_s
                    frame.timestamp_s += offset_s
                    if not self.clock.sleep_until(frame.timestamp_s, self._stop):
                        return
                frame.captured_s = self.clock.now_s()
                while not self.queue.put(frame, timeout_s=0.2):
                    if self._stop.is_set() or self.queue.closed:
                        return
        except Exception as exc:  # noqa: BLE001 - handed to the main thread, which re-raises it
            self.error = exc
            log.error("%s: capture failed: %s", self.source.uri, exc)
        finally:
            self.queue.close()
            self.source.close()

    def _reconnect(self, lost: SourceLost) -> bool:
        """Reopens a lost live source with backoff; False when it gives up (or is stopped)."""
        log.warning("%s; reconnecting", lost)
        self.reconnecting = True
        try:
            for delay in self.backoff.delays():
                if self._stop.wait(delay):
                    return False
                try:
                    self.source.reopen()
                except SourceError as exc:
                    log.warning("%s: reconnect failed (%s); next try in %.1f s",
                                self.source.uri, exc, min(delay * 2, self.backoff.max_s))
                    continue
                self.reconnects += 1
                log.warning("%s: reconnected", self.source.uri)
                return True
        finally:
            self.reconnecting = False
        self.error = SourceLost(
            f"{self.source.uri}: lost and not back after {self.backoff.give_up_s or 0:.0f} s of "
            f"retries; check the cable/network and the device (ls /dev/video*), then start "
            f"again (--reconnect-s sets how long to retry)")
        return False

    def close(self, timeout_s: float = 5.0) -> None:
        """Stops the thread and joins it; closes the source."""
        self._stop.set()
        self.queue.close()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                # A driver call (cap.read) that never returns; the daemon thread dies with the
                # process, and the source is released when it does.
                log.warning("%s: capture thread did not stop within %.0f s", self.source.uri,
                            timeout_s)
        elif not self._thread.ident:
            if self._opened:
                self.source.close()

    def __enter__(self) -> "CaptureThread":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


__all__ = ["CaptureThread", "Frame", "ImageFolderSource", "OpenCVSource", "QueueClosed",
           "SyntheticVideoSource", "VideoSource", "open_video_source"]
