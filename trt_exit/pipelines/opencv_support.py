"""OpenCV as an optional dependency, and the GStreamer pipelines of Jetson's cameras.

PyPI's OpenCV wheels (``opencv-python``, ``opencv-python-headless``) are built without
GStreamer, so they cannot open ``csi://`` cameras or ``rtsp://`` outputs. On a Jetson use the
system OpenCV that JetPack ships (``apt-get install python3-opencv``, built with GStreamer) from a
virtual environment created with ``--system-site-packages``, and do not install the PyPI wheel
into that environment (it would shadow the system one).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import socket
import subprocess
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from trt_exit.errors import ConfigError, require
from trt_exit.pipelines.base import SourceError

log = logging.getLogger(__name__)

#: What to do when OpenCV lacks GStreamer (printed with every error that needs it).
GSTREAMER_FIX = (
    "This OpenCV was built without GStreamer (PyPI's opencv-python wheels are). On a Jetson, "
    "use the system OpenCV from JetPack: sudo apt-get install python3-opencv, create the "
    "virtual environment with 'python3 -m venv --system-site-packages', and pip uninstall "
    "opencv-python opencv-python-headless inside it; or run in the trt-exit Jetson container "
    "(Dockerfile.jetson). Check with: python3 -c \"import cv2; print(cv2.getBuildInformation())\" "
    "| grep GStreamer"
)


def import_cv2():
    """Imports OpenCV or raises a :class:`MissingDependencyError` naming the extra."""
    return require("cv2", "video", "video capture and video output",
                   hint="On a Jetson use JetPack's python3-opencv instead (it has GStreamer): "
                        "see docs/jetson.md")


@functools.lru_cache(maxsize=1)
def build_information() -> dict[str, str]:
    """The ``Video I/O`` lines of ``cv2.getBuildInformation()`` as ``{backend: value}``."""
    cv2 = import_cv2()
    info: dict[str, str] = {}
    for line in cv2.getBuildInformation().splitlines():
        match = re.match(r"\s+(GStreamer|FFMPEG|v4l/v4l2|GTK\+|QT|Win32 UI|Cocoa):\s+(.*)$", line)
        if match:
            info[match.group(1)] = match.group(2).strip()
    return info


def gstreamer_available() -> bool:
    """Whether this OpenCV can open GStreamer pipelines."""
    return build_information().get("GStreamer", "NO").upper().startswith("YES")


def gui_available() -> bool:
    """Whether this OpenCV can open windows (``cv2.imshow``); headless wheels cannot."""
    info = build_information()
    return any(info.get(k, "NO").upper().startswith("YES") for k in ("GTK+", "QT", "Win32 UI", "Cocoa"))


@dataclass(frozen=True)
class CameraElements:
    """The GStreamer elements of a camera pipeline that depend on the hardware.

    Attributes:
        source: The source element with its properties (``{sensor}`` is the sensor id).
        memory: Caps feature of the raw frames (``(memory:NVMM)``: device memory on a Jetson).
        convert: Converts (and flips) the frames to ``BGRx`` (``{flip}`` is the flip method).
        flip_methods: ``nvvidconv`` flip-method → this converter's value.
    """

    source: str
    memory: str
    convert: str
    flip_methods: tuple[int, ...] = tuple(range(8))


#: The camera sources :func:`csi_pipeline` knows: the Jetson's, and its software twin (a test
#: pattern through the same pipeline, for machines without a camera; ``csi://0?source=videotestsrc``).
CAMERA_SOURCES = {
    "nvarguscamerasrc": CameraElements("nvarguscamerasrc sensor-id={sensor}", "(memory:NVMM)",
                                       "nvvidconv flip-method={flip}"),
    # videoflip converts no formats (videoconvert does), and numbers its methods differently:
    # nvvidconv's 1 (counter-clockwise) is its 3, ...
    "videotestsrc": CameraElements("videotestsrc is-live=true pattern=smpte", "",
                                   "videoconvert ! videoflip video-direction={flip}", (0, 3, 2, 1, 4, 7, 5, 6)),
}


def csi_pipeline(sensor_id: int = 0, width: int = 1280, height: int = 720, fps: int = 30,
                 flip_method: int = 0, source: str = "nvarguscamerasrc") -> str:
    """The GStreamer pipeline of a CSI camera on a Jetson (``nvarguscamerasrc``).

    The camera delivers NV12 into NVMM (device) memory; ``nvvidconv`` converts (and flips) it
    on the VIC; ``appsink drop=1 max-buffers=1`` keeps only the newest frame, so a slow reader
    gets fresh frames instead of a backlog. ``source="videotestsrc"`` swaps the NVIDIA elements
    for their software twins (``videotestsrc``, system memory, ``videoflip``) and keeps the rest.

    Args:
        sensor_id: The camera (``csi://0``, ``csi://1``).
        width: Capture width in pixels (a mode the sensor supports).
        height: Capture height in pixels.
        fps: Frames per second.
        flip_method: ``nvvidconv`` flip-method (0 none, 2 rotate 180, 4 horizontal flip, ...).
        source: A key of :data:`CAMERA_SOURCES`.

    Raises:
        ConfigError: An unknown source or flip method.
    """
    elements = CAMERA_SOURCES.get(source)
    if elements is None:
        raise ConfigError(f"camera source {source!r} is not one of {', '.join(CAMERA_SOURCES)}")
    if not 0 <= flip_method < len(elements.flip_methods):
        raise ConfigError(f"flip method {flip_method} is not one of 0-7 (nvvidconv flip-method)")
    flip = elements.flip_methods[flip_method]
    return (
        f"{elements.source.format(sensor=sensor_id)} ! "
        f"video/x-raw{elements.memory},width={width},height={height},framerate={fps}/1,"
        f"format=NV12 ! {elements.convert.format(flip=flip)} ! video/x-raw,format=BGRx ! "
        f"videoconvert ! video/x-raw,format=BGR ! appsink drop=1 max-buffers=1"
    )


def rtsp_input_pipeline(uri: str, latency_ms: int = 200, tcp_timeout_s: float = 10.0) -> str:
    """A GStreamer pipeline decoding an RTSP stream (``decodebin`` picks the Jetson's hardware
    decoder when its plugins are installed). ``tcp_timeout_s`` bounds how long ``rtspsrc``
    waits for a server that accepts the connection but does not answer."""
    return (
        f"rtspsrc location={uri} latency={latency_ms} "
        f"tcp-timeout={int(tcp_timeout_s * 1e6)} ! decodebin ! videoconvert ! "
        f"video/x-raw,format=BGR ! appsink drop=1 max-buffers=1"
    )


def file_input_pipeline(path: str | os.PathLike) -> str:
    """A GStreamer pipeline decoding a video file (``decodebin``: the Jetson's hardware decoder
    where its plugins are installed); every frame is kept (no ``drop``), as fast as it is read."""
    location = str(path).replace("\\", "\\\\").replace('"', '\\"')
    return (f'filesrc location="{location}" ! decodebin ! videoconvert ! '
            f"video/x-raw,format=BGR ! appsink sync=false")


def probe_rtsp_server(uri: str, timeout_s: float = 5.0) -> None:
    """Connects to an RTSP server's TCP port (554 unless given), so that an address that refuses
    or does not answer is a clear error at once: OpenCV's GStreamer backend can hang opening a
    refused URL (seen with OpenCV 4.6 and GStreamer 1.22).

    Raises:
        ConfigError: No host, or a malformed port.
        SourceError: Nothing answers there within ``timeout_s``.
    """
    parts = urllib.parse.urlsplit(uri)
    try:
        host, port = parts.hostname, parts.port or 554
    except ValueError:
        raise ConfigError(f"{uri}: malformed port in the RTSP address") from None
    if not host:
        raise ConfigError(f"{uri}: no host in the RTSP address (rtsp://host:8554/path)")
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise SourceError(f"{uri}: nothing answers at {host}:{port} ({reason}): check the "
                          f"address, that the camera or RTSP server is up, and the network "
                          f"(ffprobe {uri})") from None


#: Where the GStreamer elements trt_exit uses come from (Debian/Ubuntu packages, JetPack).
ELEMENT_PACKAGES = {
    "nvarguscamerasrc": "JetPack's nvidia-l4t-gstreamer (a Jetson with a CSI camera); in a "
                        "container whose gst-inspect-1.0 says 'libGLdispatch.so.0: cannot "
                        "allocate memory in static TLS block', start it with -e LD_PRELOAD="
                        "/lib/aarch64-linux-gnu/libGLdispatch.so.0 and delete "
                        "~/.cache/gstreamer-1.0",
    "nvvidconv": "JetPack's nvidia-l4t-gstreamer",
    "nvv4l2h264enc": "JetPack's nvidia-l4t-gstreamer (no Orin Nano has a hardware encoder)",
    "x264enc": "gstreamer1.0-plugins-ugly",
    "rtspsrc": "gstreamer1.0-plugins-good", "rtph264pay": "gstreamer1.0-plugins-good",
    "udpsink": "gstreamer1.0-plugins-good", "videoflip": "gstreamer1.0-plugins-good",
    "h264parse": "gstreamer1.0-plugins-bad", "rtspclientsink": "gstreamer1.0-rtsp",
    "avdec_h264": "gstreamer1.0-libav",
}
BASE_PACKAGE = "gstreamer1.0-plugins-base"


def pipeline_elements(pipeline: str) -> list[str]:
    """The element names of a ``gst-launch`` style pipeline (caps filters left out)."""
    names = []
    for part in pipeline.split("!"):
        words = part.strip().split()
        if words and "/" not in words[0] and "=" not in words[0] and words[0] not in names:
            names.append(words[0].strip("()"))
    return names


@functools.lru_cache(maxsize=None)
def gstreamer_has_element(name: str) -> bool | None:
    """Whether GStreamer has the element ``name`` (None: cannot tell, neither GStreamer's Python
    bindings nor ``gst-inspect-1.0`` are installed)."""
    try:
        import gi

        gi.require_version("Gst", "1.0")
        from gi.repository import Gst

        Gst.init(None)
        return Gst.ElementFactory.find(name) is not None
    except (ImportError, ValueError):
        pass
    inspect = shutil.which("gst-inspect-1.0")
    if inspect is None:
        return None
    try:
        return subprocess.run([inspect, "--exists", name], capture_output=True,
                              timeout=30).returncode == 0
    except subprocess.TimeoutExpired:
        return None


def missing_elements_message(pipeline: str) -> str | None:
    """'GStreamer has no element X (install P)' for the first element of ``pipeline`` that
    GStreamer lacks; None when all are there (or it cannot tell)."""
    for name in pipeline_elements(pipeline):
        if gstreamer_has_element(name) is False:
            package = ELEMENT_PACKAGES.get(name, f"{BASE_PACKAGE} or another GStreamer plugin set")
            return (f"GStreamer has no element {name}: install {package} (check with "
                    f"gst-inspect-1.0 {name})")
    return None


#: The device node of the Jetson's hardware video encoder (absent on Orin Nano).
NVENC_DEVICE = Path("/dev/v4l2-nvenc")


def choose_h264_encoder(jetson: bool, nvenc_device: str | os.PathLike = NVENC_DEVICE) -> str:
    """``nvv4l2h264enc`` on a Jetson with a hardware encoder, else ``x264enc``.

    Orin Nano has no NVENC: ``nvv4l2h264enc`` exists there but fails with "Cannot identify device
    '/dev/v4l2-nvenc'", so the device node decides, and the fall-back is logged.
    """
    if not jetson:
        return "x264enc"
    if Path(nvenc_device).exists() and gstreamer_has_element("nvv4l2h264enc") is not False:
        return "nvv4l2h264enc"
    log.info("no hardware H.264 encoder (%s absent, as on Orin Nano, or no nvv4l2h264enc): "
             "encoding with x264enc on the CPU", nvenc_device)
    return "x264enc"


def h264_output_pipeline(target: str, fps: float, bitrate_kbps: int = 4000,
                         encoder: str = "x264enc") -> str:
    """A GStreamer pipeline encoding BGR frames from ``appsrc`` to H.264 and sending them.

    Args:
        target: ``rtsp://host:port/path`` (published to an RTSP server such as mediamtx with
            ``rtspclientsink``) or ``rtp://host:port`` (RTP over UDP).
        fps: Frame rate written into the stream caps.
        bitrate_kbps: Encoder bit rate.
        encoder: ``x264enc`` (software) or ``nvv4l2h264enc`` (Jetson hardware encoder).
    """
    if encoder == "nvv4l2h264enc":
        encode = (f"nvvidconv ! video/x-raw(memory:NVMM),format=I420 ! "
                  f"nvv4l2h264enc bitrate={bitrate_kbps * 1000} insert-sps-pps=true "
                  f"iframeinterval={max(1, int(round(fps)))}")
    else:
        encode = (f"x264enc tune=zerolatency speed-preset=ultrafast bitrate={bitrate_kbps} "
                  f"key-int-max={max(1, int(round(fps)))}")
    head = f"appsrc ! videoconvert ! video/x-raw,format=I420 ! {encode} ! h264parse ! "
    if target.startswith("rtp://"):
        host, _, port = target[len("rtp://"):].partition(":")
        port = port.split("/")[0] or "5000"
        return head + f"rtph264pay config-interval=1 pt=96 ! udpsink host={host} port={port} sync=false"
    return head + f"rtspclientsink location={target}"
