"""``trt-exit count``: live crowd counting from a camera (or file) and a microphone (or file)."""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading
import urllib.parse

from trt_exit.commands.options import COUNT, PATH, POSITIVE, THREADS, URI, integer
from trt_exit.errors import ConfigError

log = logging.getLogger(__name__)

BACKENDS = ("onnxruntime", "torch", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")


# --------------------------------------------------------------------------- shared helpers


def add_backend_options(parser: argparse.ArgumentParser) -> None:
    """``--backend``, ``--precision``, ``--threads``: how the model runs."""
    group = parser.add_argument_group("model")
    group.add_argument("--backend", default="onnxruntime", choices=BACKENDS,
                       help="onnxruntime (CPU, default), torch (CUDA) or tensorrt (engines "
                            "built on this device)")
    group.add_argument("--precision", default="fp32", choices=PRECISIONS,
                       help="which graphs/engines to run (default: fp32)")
    group.add_argument("--threads", type=THREADS, default=1,
                       help="onnxruntime: intra-op threads per stage (default 1)")


def add_strategy_option(parser: argparse.ArgumentParser) -> None:
    """``--strategy``: how the host executor drives the chain (ONNX Runtime)."""
    from trt_exit.runtime.single_graph import STRATEGIES

    parser.add_argument(
        "--strategy", default="auto", choices=STRATEGIES,
        help="onnxruntime: stages (one call per stage), single_graph (the whole chain in one "
             "graph, one call per batch) or auto (default: what trt-exit tune measured faster "
             "here)")


def open_executor(manifest, backend: str, precision: str, policy=None, threads: int = 1,
                  max_batch: int | None = None, strategy: str = "auto"):
    """An executor for ``manifest``: the CUDA executor for GPU backends when it is available,
    else the host :class:`~trt_exit.runtime.executor.Executor`. Both have
    ``run(inputs, policy) -> ExitResults`` and are context managers. ``max_batch``: the largest
    batch the CUDA executor allocates for (its default when None). ``strategy``: the host
    executor's (``auto``, ``stages``, ``single_graph``)."""
    from trt_exit.runtime.executor import Executor

    if backend in ("torch", "tensorrt"):
        try:
            module = importlib.import_module("trt_exit.runtime.cuda_executor")
        except ModuleNotFoundError:
            module = None
        cuda_executor = getattr(module, "CudaExecutor", None)
        if cuda_executor is not None:
            from trt_exit.errors import CudaUnavailableError

            try:
                sized = {"max_batch": max_batch} if max_batch is not None else {}
                return cuda_executor(manifest, backend=backend, precision=precision,
                                     policy=policy, **sized)
            except CudaUnavailableError as exc:
                reason = str(exc).split(". ")[0]
                raise CudaUnavailableError(
                    f"--backend {backend} needs an NVIDIA GPU ({reason}); run the same model "
                    f"directory on the CPU with --backend onnxruntime") from exc
    options = {"threads": threads} if backend == "onnxruntime" else {}
    return Executor(manifest, backend, precision, policy=policy, backend_options=options,
                    strategy=strategy)


def deadline_policy(manifest, budget_ms: float, backend: str):
    """:class:`DeadlinePolicy` with the manifest's thresholds and latency profile."""
    from trt_exit.runtime.policies import DeadlinePolicy

    profile = manifest.latency_profile or {}
    stages = profile.get("stages") or {}
    if not stages:
        raise ConfigError(f"--budget-ms needs the stages' measured latency, which "
                          f"{manifest.path} lacks: run trt-exit tune {manifest.root} (or trt-exit "
                          f"profile {manifest.root} --save-latency) on this device first")
    measured_on = (profile.get("backend") or {}).get("backend")
    if measured_on and measured_on != backend:
        log.warning("the latency profile in %s was measured with %s, but this run uses %s: "
                    "deadline decisions will be off until you re-profile with --backend %s",
                    manifest.path, measured_on, backend, backend)
    thresholds = manifest.thresholds() or [None] * (manifest.num_exits - 1)
    return DeadlinePolicy(thresholds, budget_ms=budget_ms, stage_latency_ms=dict(stages))


def with_options(uri: str, **options) -> str:
    """``uri`` with query options added (those given as None are left out; options already
    in the URI win)."""
    extra = {k: str(v).lower() if isinstance(v, bool) else str(v)
             for k, v in options.items() if v is not None and v is not False}
    if not extra or "://" not in uri or uri.split("://")[0] in ("rtsp", "rtp"):
        return uri
    base, _, query = uri.partition("?")
    current = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
    merged = {**extra, **current}
    return base + "?" + urllib.parse.urlencode(merged)


# --------------------------------------------------------------------------- count


def _count(args: argparse.Namespace) -> int:
    from trt_exit.manifest import Manifest
    from trt_exit.pipelines.audio_sources import open_audio_source
    from trt_exit.pipelines.base import SourceLost
    from trt_exit.pipelines.crowd_count import CountConfig, CrowdCounter, StatusLine
    from trt_exit.pipelines.sinks import open_sink
    from trt_exit.pipelines.video_sources import open_video_source
    from trt_exit.profiling.nsys import profiler_range_wanted

    manifest = Manifest.load(args.engines)
    _check_outputs(args, manifest)
    input_uri = args.input
    if "://" not in input_uri:
        input_uri = "file://" + input_uri
    if input_uri.split("://")[0] in ("csi", "v4l2", "synthetic", "file"):
        input_uri = with_options(input_uri, width=args.input_width, height=args.input_height,
                                 fps=args.input_rate, flip=args.input_flip,
                                 loop=args.input_loop or None)
    video = open_video_source(input_uri)
    audio = open_audio_source(args.audio) if args.audio else None
    sinks = [open_sink(uri) for uri in (args.output or ["null://"])]
    policy = deadline_policy(manifest, args.budget_ms, args.backend) if args.budget_ms else None
    config = CountConfig(max_frames=args.max_frames, duration_s=args.duration_s,
                         realtime=args.realtime, queue_frames=args.queue_frames,
                         reconnect_s=args.reconnect_s,
                         cuda_profiler=profiler_range_wanted(args.backend))
    stop = threading.Event()
    # Ctrl-C and docker stop finish the frame in hand and close everything. A KeyboardInterrupt
    # raised at an arbitrary point could land inside a queue's lock and hang the capture
    # thread's join; a second Ctrl-C still interrupts at once.
    handled = (signal.SIGINT, signal.SIGTERM)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {signum: signal.getsignal(signum) for signum in handled}

    def on_stop_signal(signum, frame):
        if signum == signal.SIGINT and stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    if in_main_thread:
        for signum in handled:
            signal.signal(signum, on_stop_signal)
    status = None if args.no_status else StatusLine(sys.stderr)
    try:
        with _count_executor(args, manifest, policy, stop) as executor:
            app = CrowdCounter(manifest, executor, video, audio, sinks, config, policy=policy,
                               status=status, stop_event=stop)
            with app:
                try:
                    summary = app.run()
                except SourceLost as exc:
                    summary = exc.summary
                    print(summary.format())
                    _write_summary(args.summary, summary)
                    raise
    finally:
        if in_main_thread:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    print(summary.format())
    _write_summary(args.summary, summary)
    return 0


def _count_executor(args: argparse.Namespace, manifest, policy, stop: threading.Event):
    """The in-process executor, or with ``--server`` one that sends frames to a server (and
    waits up to ``--reconnect-s`` for a server that stops answering, e.g. while it restarts)."""
    if not args.server:
        return open_executor(manifest, args.backend, args.precision, policy, args.threads,
                             strategy=args.strategy)
    if policy is not None:
        raise ConfigError("--budget-ms and --server: the served model's exit policy is the "
                          "server's (start trt-exit serve with --policy deadline:MS)")
    if args.strategy != "auto":
        raise ConfigError("--strategy and --server: the server runs the model its own way")
    from trt_exit.serving.client import RemoteExecutor

    return RemoteExecutor(args.server, manifest, reconnect_s=args.reconnect_s, stop_event=stop)


def _check_outputs(args: argparse.Namespace, manifest) -> None:
    """Every file ``count`` will write (``--summary``, ``jsonl://`` and ``file://`` outputs):
    writable, and neither a model file nor one of its inputs, before anything runs."""
    from trt_exit.fileio import check_output_file
    from trt_exit.pipelines.uri import parse_uri

    def local_path(uri: str):
        parsed = parse_uri(uri if "://" in uri else "file://" + uri)
        return parsed.path if parsed.scheme in ("file", "jsonl") else None

    inputs = [(name, local_path(uri)) for name, uri in (("INPUT", args.input),
                                                        ("--audio", args.audio)) if uri]
    for uri in args.output or []:
        path = local_path(uri)
        if path is not None:
            check_output_file(path, "output", models=[manifest], inputs=inputs)
    if args.summary:
        check_output_file(args.summary, "--summary", models=[manifest], inputs=inputs)


def _write_summary(path: str | None, summary) -> None:
    if path:
        from trt_exit.fileio import atomic_write_json

        atomic_write_json(path, summary.to_dict())
        print(f"wrote {path}")


# --------------------------------------------------------------------------- registration


def register(subparsers) -> None:
    """Adds ``count``."""
    p = subparsers.add_parser(
        "count", help="live crowd counting from a camera and a microphone",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Counts people live: each video frame is paired with the audio window "
                    "ending at it, run through the multi-exit model with early exits, and sent "
                    "to the outputs.",
        epilog="inputs:  csi://0  v4l2:///dev/video0  rtsp://host/stream  file://clip.mp4 "
               "(or a path)  file://frames/  synthetic://crowd\n"
               "audio:   mic://default  alsa://hw:1,0  file://clip.wav  synthetic://crowd  "
               "none://\n"
               "outputs: jsonl://results.jsonl  file://out.mp4  display://0  "
               "rtsp://server:8554/live  rtp://host:5000  null://\n\n"
               "example: trt-exit count csi://0 jsonl://counts.jsonl --audio alsa://hw:1,0 "
               "--engines engines/av_crowd --backend tensorrt --precision fp16\n"
               "Ctrl-C (or SIGTERM) stops cleanly and prints a summary.")
    p.add_argument("input", type=URI, metavar="INPUT", help="video source URI (see below)")
    p.add_argument("output", type=URI, metavar="OUTPUT", nargs="*",
                   help="one or more output URIs (default null://)")
    p.add_argument("--audio", type=URI, metavar="URI",
                   help="audio source URI (required for audiovisual models; none:// = silence)")
    p.add_argument("--engines", type=PATH, required=True, metavar="DIR",
                   help="model directory with manifest.json (ONNX graphs for onnxruntime, "
                        "engines for tensorrt)")
    add_backend_options(p)
    add_strategy_option(p)
    p.add_argument("--server", type=URI, metavar="URL",
                   help="run the model on a Triton server (trt-exit serve) instead of here: "
                        "grpc://HOST:8001 or http://HOST:8000 (optionally /MODEL_NAME); "
                        "--engines still gives the manifest (preprocessing)")
    p.add_argument("--budget-ms", type=POSITIVE,
                   help="deadline mode: stop at the last exit that fits this budget per frame "
                        "(uses the manifest's latency profile)")
    group = p.add_argument_group("input")
    group.add_argument("--input-width", type=COUNT, help="camera capture width")
    group.add_argument("--input-height", type=COUNT, help="camera capture height")
    group.add_argument("--input-rate", type=POSITIVE, help="camera/synthetic frame rate (FPS)")
    group.add_argument("--input-flip", type=integer(0, 7),
                       help="CSI nvvidconv flip-method 0-7 (2 = 180 deg)")
    group.add_argument("--input-loop", action="store_true", help="loop video files")
    group.add_argument("--realtime", action="store_true",
                       help="play files and synthetic input at their frame rate (dropping "
                            "frames the model cannot keep up with) instead of as fast as "
                            "possible")
    group.add_argument("--queue-frames", type=COUNT, default=2,
                       help="capture queue length; live input keeps the newest (default 2)")
    group.add_argument("--reconnect-s", type=POSITIVE, default=60.0,
                       help="how long to retry a lost camera, or a --server that stopped "
                            "answering (restarting, crashed), before stopping (default 60)")
    group = p.add_argument_group("run")
    group.add_argument("--max-frames", type=COUNT, help="stop after N frames")
    group.add_argument("--duration-s", type=POSITIVE, help="stop after S seconds")
    group.add_argument("--summary", type=PATH, metavar="FILE",
                       help="write the run summary as JSON here (its folder must exist)")
    group.add_argument("--no-status", action="store_true", help="no live status line")
    p.set_defaults(func=_count)


__all__ = ["add_backend_options", "add_strategy_option", "deadline_policy", "open_executor",
           "register", "with_options"]
