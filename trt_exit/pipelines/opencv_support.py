"""OpenCV as an optional dependency, and the GStreamer pipelines of Jetson's cameras.

PyPI's OpenCV wheels (``opencv-python``, ``opencv-python-headless``) are built without
GStreamer, so they cannot open ``csi://`` cameras or ``rtsp://`` outputs. On a Jetson use the
system OpenCV that JetPack ships (``apt-get install python3-opencv``, built with GStreamer) from a
virtual environment created with ``--system-site-packages``, and do not install the PyPI wheel
into that environment (it would shadow the system one).
"""

from __future__ import annotations

import functools
import re

from trt_exit.errors import require

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


def csi_pipeline(sensor_id: int = 0, width: int = 1280, height: int = 720, fps: int = 30,
                 flip_method: int = 0) -> str:
    """The GStreamer pipeline of a CSI camera on a Jetson (``nvarguscamerasrc``).

    The camera delivers NV12 into NVMM (device) memory; ``nvvidconv`` converts (and flips) it
    on the VIC; ``appsink drop=1 max-buffers=1`` keeps only the newest frame, so a slow reader
    gets fresh frames instead of a backlog.

    Args:
        sensor_id: The camera (``csi://0``, ``csi://1``).
        width: Capture width in pixels (a mode the sensor supports).
        height: Capture height in pixels.
        fps: Frames per second.
        flip_method: ``nvvidconv`` flip-method (0 none, 2 rotate 180, 4 horizontal flip, ...).
    """
    return (
        f"nvarguscamerasrc sensor-id={sensor_id} ! "
        f"video/x-raw(memory:NVMM),width={width},height={height},framerate={fps}/1,format=NV12 ! "
        f"nvvidconv flip-method={flip_method} ! video/x-raw,format=BGRx ! "
        f"videoconvert ! video/x-raw,format=BGR ! appsink drop=1 max-buffers=1"
    )


def rtsp_input_pipeline(uri: str, latency_ms: int = 200) -> str:
    """A GStreamer pipeline decoding an RTSP stream (``decodebin`` picks the Jetson's hardware
    decoder when its plugins are installed)."""
    return (
        f"rtspsrc location={uri} latency={latency_ms} ! decodebin ! videoconvert ! "
        f"video/x-raw,format=BGR ! appsink drop=1 max-buffers=1"
    )


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
