"""The far end of the GStreamer tests, run as a subprocess: an RTSP camera, an RTSP server that
records what is published to it, or an RTP/UDP receiver (GStreamer's Python bindings, python3-gi
and gir1.2-gst-rtsp-server-1.0).

    python gst_peer.py camera  PORT [--fps 15]  # rtsp://127.0.0.1:PORT/cam (videotestsrc, H.264)
    python gst_peer.py record  PORT OUT          # accepts RECORD on rtsp://127.0.0.1:PORT/live
    python gst_peer.py rtp     PORT OUT          # RTP/H.264 on udp://127.0.0.1:PORT

The receivers decode every frame and append one line per frame to OUT: the frame's mean
level (the tests encode a frame's index in its brightness). Each prints ``ready`` when it
listens, and exits on SIGTERM or after ``--lifetime`` seconds (never outlives a test).
"""

from __future__ import annotations

import argparse
import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

#: What a receiver decodes its H.264 with, back to RGB (width a multiple of 4: no row padding).
DECODE = "h264parse ! avdec_h264 ! videoconvert ! video/x-raw,format=RGB ! " \
         "fakesink name=sink signal-handoffs=true sync=false"


def frame_logger(path: str):
    """A fakesink handoff callback appending each frame's mean level to ``path``."""
    out = open(path, "a", buffering=1, encoding="utf-8")

    def on_handoff(_sink, buffer, _pad):
        ok, info = buffer.map(Gst.MapFlags.READ)
        if ok:
            data = bytes(info.data)
            buffer.unmap(info)
            out.write(f"{sum(data) / max(1, len(data)):.2f}\n")

    return on_handoff


def rtsp_server(port: int, mount: str, factory) -> GstRtspServer.RTSPServer:
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(port))
    server.get_mount_points().add_factory(mount, factory)
    if server.attach(None) == 0:
        sys.exit(f"cannot listen on 127.0.0.1:{port}")
    return server


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=("camera", "record", "rtp"))
    parser.add_argument("port", type=int)
    parser.add_argument("out", nargs="?")
    parser.add_argument("--fps", type=int, default=15)
    parser.add_argument("--lifetime", type=float, default=120.0)
    args = parser.parse_args()
    Gst.init(None)
    loop = GLib.MainLoop()
    keep = []
    if args.role == "camera":
        factory = GstRtspServer.RTSPMediaFactory()
        factory.set_launch(
            f"( videotestsrc is-live=true pattern=ball ! video/x-raw,width=160,height=120,"
            f"framerate={args.fps}/1 ! x264enc tune=zerolatency speed-preset=ultrafast "
            f"key-int-max={args.fps} ! rtph264pay name=pay0 pt=96 config-interval=1 )")
        factory.set_shared(True)
        keep.append(rtsp_server(args.port, "/cam", factory))
    elif args.role == "record":
        factory = GstRtspServer.RTSPMediaFactory()
        factory.set_transport_mode(GstRtspServer.RTSPTransportMode.RECORD)
        factory.set_launch(f"( rtph264depay name=depay0 ! {DECODE} )")
        on_handoff = frame_logger(args.out)

        def configure(_factory, media):
            sink = media.get_element().get_by_name("sink")
            sink.connect("handoff", on_handoff)

        factory.connect("media-configure", configure)
        keep.append(rtsp_server(args.port, "/live", factory))
    else:
        pipeline = Gst.parse_launch(
            f"udpsrc address=127.0.0.1 port={args.port} caps=\"application/x-rtp,media=video,"
            f"clock-rate=90000,encoding-name=H264,payload=96\" ! rtph264depay ! {DECODE}")
        pipeline.get_by_name("sink").connect("handoff", frame_logger(args.out))
        pipeline.set_state(Gst.State.PLAYING)
        keep.append(pipeline)
    GLib.timeout_add(int(args.lifetime * 1000), loop.quit)
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGTERM, loop.quit)
    print("ready", flush=True)
    loop.run()
    for item in keep:
        if isinstance(item, Gst.Pipeline):
            item.set_state(Gst.State.NULL)


if __name__ == "__main__":
    main()
