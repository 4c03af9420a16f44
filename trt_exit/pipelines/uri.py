"""Resource URIs for sources and sinks, in the jetson-inference convention.

========================  ==========================================================
``csi://0``               MIPI CSI camera 0 (GStreamer ``nvarguscamerasrc``, Jetson)
``v4l2:///dev/video0``    V4L2 device (USB webcam); ``v4l2://0`` is the same
``rtsp://host:8554/cam``  RTSP stream (input), or a stream published to an RTSP server (output)
``rtp://host:5000``       RTP/H.264 over UDP (output)
``file://clip.mp4``       video file; a plain path works too (``clip.mp4``)
``file://frames/``        folder of images (sorted by name)
``synthetic://crowd``     the synthetic crowd scene (video and audio)
``alsa://hw:1,0``         ALSA capture device (via PortAudio / sounddevice)
``mic://default``         the default microphone; ``mic://2`` is PortAudio device 2
``file://clip.wav``       WAV file
``display://0``           a window on display 0
``jsonl://results.jsonl`` one JSON line per frame
``null://``               discard
``none://``               audio only: no microphone (the model hears silence)
========================  ==========================================================

Options go in the query string: ``synthetic://crowd?seed=3&fps=15``,
``v4l2:///dev/video0?width=1280&height=720``.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from trt_exit.errors import ConfigError

#: Schemes with a network location (``rtsp://host:port/path``): the rest is kept verbatim.
NETWORK_SCHEMES = ("rtsp", "rtp", "http", "https")
#: Every scheme trt_exit understands, with what it is for.
SCHEMES = {
    "csi": "CSI camera (Jetson, GStreamer nvarguscamerasrc)",
    "v4l2": "V4L2 camera device",
    "rtsp": "RTSP stream",
    "rtp": "RTP over UDP (output)",
    "file": "video, image folder, WAV, MP4 or JSONL file",
    "synthetic": "synthetic crowd scene",
    "alsa": "ALSA capture device",
    "mic": "microphone (PortAudio device name or index)",
    "display": "window",
    "jsonl": "JSON lines file",
    "null": "discard",
    "none": "no audio",
}


@dataclass(frozen=True)
class ResourceURI:
    """A parsed source or sink URI.

    Attributes:
        uri: The text as given.
        scheme: ``csi``, ``v4l2``, ``file``, ... (a plain path is ``file``).
        location: What follows ``scheme://`` without the query: a device, path or host.
        options: Query-string options (``?width=1280&seed=3``), as strings.
    """

    uri: str
    scheme: str
    location: str
    options: dict[str, str] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        """``location`` as a file-system path (``file://``, ``jsonl://``, ``v4l2://``)."""
        return Path(self.location).expanduser()

    @property
    def extension(self) -> str:
        """Lower-case file extension of ``location`` (``".mp4"``), or ``""``."""
        return Path(self.location).suffix.lower()

    def option(self, name: str, default: str | None = None) -> str | None:
        return self.options.get(name, default)

    def int_option(self, name: str, default: int | None = None) -> int | None:
        """An integer option; a malformed one is a :class:`ConfigError`."""
        value = self.options.get(name)
        if value is None:
            return default
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{self.uri}: option {name}={value!r} must be an integer") from None

    def float_option(self, name: str, default: float | None = None) -> float | None:
        """A float option; a malformed one is a :class:`ConfigError`."""
        value = self.options.get(name)
        if value is None:
            return default
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{self.uri}: option {name}={value!r} must be a number") from None

    def bool_option(self, name: str, default: bool = False) -> bool:
        value = self.options.get(name)
        if value is None:
            return default
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{self.uri}: option {name}={value!r} must be true or false")

    def without_options(self) -> str:
        """The URI without its query string (what a network stream is opened with)."""
        return f"{self.scheme}://{self.location}"

    def __str__(self) -> str:
        return self.uri


def parse_uri(text: str) -> ResourceURI:
    """Parses a source or sink URI; a plain path becomes ``file://``.

    ``file://clip.mp4`` and ``file:///abs/clip.mp4`` both work (the first is relative to the
    working directory). Network URIs (``rtsp://``, ``rtp://``) are kept verbatim, query string
    included, because cameras use query strings of their own.

    Raises:
        ConfigError: An empty URI or an unknown scheme (the message lists the known ones).
    """
    text = str(text).strip()
    if not text:
        raise ConfigError("empty source/sink URI")
    if "://" not in text:
        return ResourceURI(text, "file", text, {})
    scheme, rest = text.split("://", 1)
    scheme = scheme.lower()
    if scheme not in SCHEMES and scheme not in NETWORK_SCHEMES:
        known = ", ".join(f"{s}://" for s in SCHEMES)
        raise ConfigError(f"unknown URI scheme {scheme}:// in {text!r}; use one of {known} "
                          f"or a plain file path")
    if scheme in NETWORK_SCHEMES:
        return ResourceURI(text, scheme, rest, {})
    location, _, query = rest.partition("?")
    options = dict(urllib.parse.parse_qsl(query, keep_blank_values=True)) if query else {}
    return ResourceURI(text, scheme, urllib.parse.unquote(location), options)
