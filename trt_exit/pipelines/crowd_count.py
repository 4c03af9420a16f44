"""Live audiovisual crowd counting: capture → preprocess → infer (early exit) → sinks → status.

The main loop, in the jetson-inference manner::

    with CrowdCounter(manifest, executor, video, audio, sinks, config) as app:
        summary = app.run()

Each frame is taken from the capture thread's queue (the newest one for live input), paired
with the audio window ending at its timestamp, turned into the model's inputs with the same
functions training used (:func:`~trt_exit.pipelines.preprocess.image_to_input`,
:func:`~trt_exit.pipelines.audio_features.log_mel`), run through the executor under its exit
policy, and handed to every sink.

What keeps running and what stops (see docs/pipelines.md):

* a live camera or stream that drops: the capture thread reconnects with backoff; the loop
  waits (status shows ``reconnecting``) and stops with :class:`SourceLost` only when the camera
  is not back within ``--reconnect-s``;
* a microphone that drops: the run goes on with silence (each record reports
  ``audio_missing_ms``) while the source reopens it with backoff;
* a corrupt or truncated video file: the frames before the damage are processed, a warning
  says where decoding stopped, and the run ends normally;
* a sink that fails, or Ctrl-C / SIGTERM: the loop stops; every thread is joined and every file
  closed, and the JSONL lines written so far are complete (each is flushed as it is written).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, TextIO

import numpy as np

from trt_exit import tensor_names as tn
from trt_exit.errors import ConfigError
from trt_exit.manifest import Manifest
from trt_exit.pipelines.audio_features import LogMelConfig, log_mel
from trt_exit.pipelines.audio_sources import AudioSource, wait_for_audio
from trt_exit.pipelines.base import Backoff, Frame, SessionClock, SourceLost
from trt_exit.pipelines.preprocess import image_to_input
from trt_exit.pipelines.queues import QueueClosed
from trt_exit.pipelines.sinks import FrameResult, Sink
from trt_exit.pipelines.video_sources import CaptureThread, VideoSource
from trt_exit.profiling.nsys import cuda_profiler_range
from trt_exit.profiling.nvtx import nvtx_range
from trt_exit.profiling.timers import summarize_ms

log = logging.getLogger(__name__)


@dataclass
class CountConfig:
    """How the live app runs.

    Attributes:
        max_frames: Stop after this many processed frames (None: until the source ends).
        duration_s: Stop after this many seconds (None: no limit).
        realtime: Pace file and synthetic sources at their frame rate (always the case when
            the other input is live), dropping frames the model cannot keep up with.
        queue_frames: Capture queue length (live input keeps only the newest frames).
        reconnect_s: How long a lost camera is retried before the run stops (0: never).
        audio_wait_s: How long to wait for a live microphone's first full window.
        status_interval_s: Seconds between status lines.
        warmup_runs: Untimed inferences before capture starts.
        cuda_profiler: Open the CUDA profiler capture range (``cudaProfilerStart``/``Stop``)
            around the loop, after loading and warm-up (``trt-exit nsys``; GPU backends).
    """

    max_frames: int | None = None
    duration_s: float | None = None
    realtime: bool = False
    queue_frames: int = 2
    reconnect_s: float = 60.0
    audio_wait_s: float = 1.0
    status_interval_s: float = 0.5
    warmup_runs: int = 3
    cuda_profiler: bool = False


@dataclass
class CountSummary:
    """What a run did (printed at the end, and written by ``--summary``).

    Attributes:
        frames: Frames processed.
        duration_s: Wall time from the first frame to the end.
        fps: ``frames / duration_s``.
        latency_ms: Inference latency statistics (median, p90, p99, ...; over a uniform
            sample of at most 10,000 frames of the run).
        pipeline_latency_ms: Capture-to-result latency statistics (likewise).
        exit_histogram: Frames per exit (index = exit).
        dropped_frames: Frames the capture queue dropped because the model was behind.
        reconnects: Times a lost camera came back.
        audio_missing_frames: Frames whose audio window was (partly) missing.
        stop_reason: ``max_frames``, ``duration``, ``end_of_stream``, ``interrupted``,
            ``window_closed`` or ``source_lost``.
        count_mae: Mean absolute error against the source's ground truth (synthetic scene).
        error: What stopped the run, if it was a failure.
    """

    frames: int = 0
    duration_s: float = 0.0
    fps: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)
    pipeline_latency_ms: dict[str, float] = field(default_factory=dict)
    exit_histogram: list[int] = field(default_factory=list)
    dropped_frames: int = 0
    reconnects: int = 0
    audio_missing_frames: int = 0
    stop_reason: str = ""
    count_mae: float | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        """A few readable lines."""
        lines = [f"{self.frames} frames in {self.duration_s:.1f} s ({self.fps:.1f} FPS); "
                 f"stopped: {self.stop_reason}"]
        if self.latency_ms:
            lat, pipe = self.latency_ms, self.pipeline_latency_ms
            lines.append(f"inference p50 {lat['median_ms']:.2f} ms, p90 {lat['p90_ms']:.2f} ms, "
                         f"p99 {lat['p99_ms']:.2f} ms; capture to result p50 "
                         f"{pipe['median_ms']:.2f} ms")
        if self.exit_histogram:
            total = max(1, sum(self.exit_histogram))
            shares = ", ".join(f"exit {k}: {100 * n / total:.0f}%"
                               for k, n in enumerate(self.exit_histogram))
            lines.append(f"exits taken: {shares}")
        extras = [f"dropped {self.dropped_frames} frames"]
        if self.reconnects:
            extras.append(f"{self.reconnects} reconnects")
        if self.audio_missing_frames:
            extras.append(f"{self.audio_missing_frames} frames with missing audio")
        if self.count_mae is not None:
            extras.append(f"count MAE vs. ground truth {self.count_mae:.2f}")
        lines.append("; ".join(extras))
        if self.error:
            lines.append(f"error: {self.error}")
        return "\n".join(lines)


def count_of(manifest: Manifest, output: np.ndarray) -> float:
    """The people count from a regression exit's output row.

    The output is the count itself unless the manifest's model records a target transform
    (``model["target_transform"] == "log1p"``: the model predicts ``log(1 + count)``); counts
    are clipped at 0.
    """
    value = float(np.asarray(output, np.float64).reshape(-1)[0])
    transform = manifest.model.get("target_transform")
    if transform == "log1p":
        value = math.expm1(value)
    elif transform not in (None, "", "identity"):
        raise ConfigError(f"{manifest.path}: unknown target_transform {transform!r}")
    return max(0.0, value)


class ModelInputs:
    """Turns a frame and its audio window into the model's inputs (batch 1), as the manifest
    says.

    Raises:
        ConfigError: The manifest has no image preprocessing spec (it is not a model for
            camera input), or an audio input without audio preprocessing.
    """

    def __init__(self, manifest: Manifest):
        names = [spec.name for spec in manifest.inputs]
        if tn.IMAGE not in names or "image" not in manifest.preprocessing:
            raise ConfigError(
                f"{manifest.path}: {manifest.name} has no image preprocessing spec "
                f"(preprocessing['image']); trt-exit count needs a camera model such as "
                f"multi_exit_av_crowd (the digits demo model reads 8x8 arrays: use trt-exit run "
                f"or trt-exit profile for it)")
        self.image_spec = manifest.preprocessing["image"]
        self.audio_config: LogMelConfig | None = None
        if tn.AUDIO in names:
            if "audio" not in manifest.preprocessing:
                raise ConfigError(f"{manifest.path}: the model has an audio input but no "
                                  f"preprocessing['audio'] (log-mel settings); re-export it")
            self.audio_config = LogMelConfig.from_dict(manifest.preprocessing["audio"])
        unknown = set(names) - {tn.IMAGE, tn.AUDIO}
        if unknown:
            raise ConfigError(f"{manifest.path}: inputs {sorted(unknown)} cannot be fed from a "
                              f"camera and a microphone")

    @property
    def needs_audio(self) -> bool:
        return self.audio_config is not None

    def image(self, frame: Frame) -> np.ndarray:
        """(1, 3, H, W) float32."""
        return image_to_input(frame.image, self.image_spec, bgr=frame.bgr)[None]

    def audio(self, samples: np.ndarray, sample_rate: int) -> np.ndarray:
        """(1, 1, n_mels, frames) float32 (resampled to the model's rate on the way)."""
        return log_mel(samples, self.audio_config, sample_rate)[None]

    def zeros(self) -> dict[str, np.ndarray]:
        """Inputs of the right shapes for warm-up runs."""
        height, width = self.image_spec["size"]
        feeds = {tn.IMAGE: np.zeros((1, 3, height, width), np.float32)}
        if self.audio_config is not None:
            feeds[tn.AUDIO] = np.zeros((1, *self.audio_config.shape), np.float32)
        return feeds


def single_threaded_blas():
    """Limits BLAS (OpenBLAS, MKL) to one thread for the run, as a context manager.

    The per-frame matrix products (the mel filterbank: 64 x 257 x 32) are tiny; a BLAS thread
    pool spinning up for each of them competes with the capture thread and the inference
    threads for the same cores. Measured on a busy 2-core machine: 18 ms per filterbank product
    with OpenBLAS's default threads, 0.02 ms with one. threadpoolctl comes with scikit-learn;
    without it this is a no-op.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


class Reservoir:
    """A uniform random sample of at most ``capacity`` values of an unbounded stream
    (Vitter's algorithm R), so a run of days keeps bounded memory and its percentiles still
    describe the whole run."""

    def __init__(self, capacity: int = 10_000, seed: int = 0):
        self.capacity = capacity
        self.values: list[float] = []
        self.seen = 0
        self._rng = np.random.default_rng(seed)

    def add(self, value: float) -> None:
        self.seen += 1
        if len(self.values) < self.capacity:
            self.values.append(value)
            return
        slot = int(self._rng.integers(self.seen))
        if slot < self.capacity:
            self.values[slot] = value


class StatusLine:
    """One line of live status on a terminal (rewritten in place), or a line every few
    seconds when the output is a file."""

    def __init__(self, stream: TextIO | None = None, interval_s: float = 0.5):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval_s = interval_s if self.tty else max(interval_s, 5.0)
        self._last_s = -math.inf
        self._width = 0

    def show(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_s < self.interval_s:
            return
        self._last_s = now
        if self.tty:
            padding = " " * max(0, self._width - len(text))
            self.stream.write("\r" + text + padding)
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def end(self) -> None:
        if self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0


class CrowdCounter:
    """The live app. Owns the capture thread, the audio source and the sinks once entered
    (the executor stays the caller's).

    Args:
        manifest: The model's manifest.
        executor: Anything with ``run(inputs, policy) -> ExitResults`` (the host
            :class:`~trt_exit.runtime.executor.Executor`, or the CUDA executor).
        video: An unopened video source.
        audio: An unopened audio source (None for image-only models).
        sinks: Unopened sinks.
        config: Run settings.
        policy: Exit policy (None: the executor's).
        status: Where the status line goes (None: no status line).
        stop_event: Set from outside (a signal handler) to stop the run cleanly.
    """

    def __init__(self, manifest: Manifest, executor, video: VideoSource,
                 audio: AudioSource | None, sinks: list[Sink], config: CountConfig | None = None,
                 policy=None, status: StatusLine | None = None,
                 stop_event: threading.Event | None = None,
                 on_result: Callable[[FrameResult], None] | None = None):
        self.manifest = manifest
        self.executor = executor
        self.inputs = ModelInputs(manifest)
        if self.inputs.needs_audio and audio is None:
            raise ConfigError(f"{manifest.name} listens as well as looks: pass --audio (mic://"
                              f"default, alsa://hw:1,0, file://clip.wav, synthetic://crowd), or "
                              f"--audio none:// to run it on silence")
        self.video = video
        self.audio = audio if self.inputs.needs_audio else None
        if audio is not None and not self.inputs.needs_audio:
            log.warning("%s has no audio input; --audio %s is ignored", manifest.name, audio.uri)
        self.sinks = sinks
        self.config = config or CountConfig()
        self.policy = policy
        self.status = status
        self.stop_event = stop_event or threading.Event()
        self.on_result = on_result
        self.clock: SessionClock | None = None
        self.capture: CaptureThread | None = None
        self._stack = ExitStack()

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> "CrowdCounter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Stops and joins the capture thread, closes the audio source and every sink."""
        self._stack.close()

    def _open(self) -> None:
        """Warm-up, then opens audio, video and the sinks (video sinks take the source's frame
        rate)."""
        for _ in range(self.config.warmup_runs):
            self.executor.run(self.inputs.zeros(), self.policy)
        live = self.video.live or (self.audio is not None and self.audio.live)
        self.clock = SessionClock()
        if self.audio is not None:
            self._stack.enter_context(self.audio)
            self.audio.open(self.clock, self.inputs.audio_config.sample_rate)
        backoff = Backoff(give_up_s=self.config.reconnect_s)
        self.capture = CaptureThread(self.video, self.clock, realtime=self.config.realtime or live,
                                     capacity=self.config.queue_frames, backoff=backoff)
        self._stack.enter_context(self.capture)
        self.capture.start()
        for sink in self.sinks:
            self._stack.enter_context(sink)
            sink.open(self.video.fps)
        if self.audio is not None:
            wait_for_audio(self.audio, self.clock, self.inputs.audio_config.window_s,
                           self.config.audio_wait_s)

    # ------------------------------------------------------------------ the loop

    def run(self) -> CountSummary:
        """Runs until a stop condition; always returns a summary (also after Ctrl-C).

        Raises:
            SourceLost: The camera was lost and did not come back (after the summary is
                complete: it is attached as ``exc.summary``).
        """
        summary = CountSummary(exit_histogram=[0] * self.manifest.num_exits)
        latencies, pipeline = Reservoir(), Reservoir(seed=1)  # bounded: a run may last days
        error_sum, error_count = 0.0, 0
        recent = collections.deque(maxlen=30)  # wall times of recent frames, for the FPS
        renders = any(sink.renders for sink in self.sinks)
        began = None
        lost: SourceLost | None = None
        try:
            self._stack.enter_context(single_threaded_blas())
            self._open()
            self._stack.enter_context(cuda_profiler_range(self.config.cuda_profiler))
            began = time.perf_counter()
            while True:
                if self.stop_event.is_set():
                    summary.stop_reason = "interrupted"
                    break
                if self.config.max_frames is not None and summary.frames >= self.config.max_frames:
                    summary.stop_reason = "max_frames"
                    break
                if (self.config.duration_s is not None
                        and time.perf_counter() - began >= self.config.duration_s):
                    summary.stop_reason = "duration"
                    break
                try:
                    frame = self.capture.get(timeout_s=0.25)
                except QueueClosed:
                    if isinstance(self.capture.error, SourceLost):
                        lost = self.capture.error
                        summary.stop_reason = "source_lost"
                    elif self.capture.error is not None:
                        raise self.capture.error
                    else:
                        summary.stop_reason = "end_of_stream"
                    break
                if frame is None:
                    if self.status is not None:
                        state = "reconnecting" if self.capture.reconnecting else "waiting for frames"
                        self.status.show(f"{state} from {self.video.uri} ...")
                    continue
                result = self._process(frame, recent, renders)
                summary.frames += 1
                summary.exit_histogram[result.exit] += 1
                latencies.add(result.latency_ms)
                pipeline.add(result.pipeline_latency_ms)
                if result.audio_missing_ms > 0:
                    summary.audio_missing_frames += 1
                if result.true_count is not None:
                    error_sum += abs(result.count - result.true_count)
                    error_count += 1
                if self.on_result is not None:
                    self.on_result(result)
                if self.status is not None:
                    self.status.show(self._status_text(result))
                if any(sink.stop_requested for sink in self.sinks):
                    summary.stop_reason = "window_closed"
                    break
        except KeyboardInterrupt:
            summary.stop_reason = "interrupted"
        finally:
            if self.status is not None:
                self.status.end()
            if self.capture is not None:
                summary.dropped_frames = self.capture.dropped
                summary.reconnects = self.capture.reconnects
            self.close()
        summary.duration_s = time.perf_counter() - began if began is not None else 0.0
        summary.fps = summary.frames / summary.duration_s if summary.duration_s > 0 else 0.0
        if latencies.values:
            summary.latency_ms = summarize_ms(latencies.values)
            summary.pipeline_latency_ms = summarize_ms(pipeline.values)
        if error_count:
            summary.count_mae = error_sum / error_count
        if lost is not None:
            summary.error = str(lost)
            lost.summary = summary
            raise lost
        return summary

    def _process(self, frame: Frame, recent: collections.deque, renders: bool) -> FrameResult:
        with nvtx_range("preprocess"):
            feeds = {tn.IMAGE: self.inputs.image(frame)}
            missing_ms = 0.0
            if self.audio is not None:
                window = self.audio.window(frame.timestamp_s, self.inputs.audio_config.window_s)
                feeds[tn.AUDIO] = self.inputs.audio(window.samples, window.sample_rate)
                missing_ms = window.missing_ms
        with nvtx_range("infer"):
            results = self.executor.run(feeds, self.policy)
        now = time.perf_counter()
        recent.append(now)
        fps = (len(recent) - 1) / (recent[-1] - recent[0]) if len(recent) > 1 else 0.0
        captured = frame.captured_s if frame.captured_s is not None else frame.timestamp_s
        true_count = frame.meta.get("true_count")
        result = FrameResult(
            frame=frame.index, timestamp_s=frame.timestamp_s,
            count=count_of(self.manifest, results.output[0]),
            exit=int(results.exit_index[0]), num_exits=self.manifest.num_exits,
            confidence=float(results.confidence[0]), latency_ms=float(results.latency_ms),
            pipeline_latency_ms=1e3 * (self.clock.now_s() - captured), fps=fps,
            true_count=None if true_count is None else float(true_count),
            audio_missing_ms=missing_ms)
        with nvtx_range("sink"):
            rendered = None
            if renders:
                from trt_exit.pipelines.overlay import draw_overlay

                rendered = draw_overlay(frame.image, result, bgr=frame.bgr)
            for sink in self.sinks:
                sink.write(frame, result, rendered)
        return result

    def _status_text(self, result: FrameResult) -> str:
        text = (f"frame {result.frame:6d} | count {result.count:6.1f} | exit "
                f"{result.exit}/{result.num_exits - 1} | {result.latency_ms:6.2f} ms | "
                f"{result.fps:5.1f} FPS | dropped {self.capture.dropped}")
        if result.audio_missing_ms > 0:
            text += f" | audio missing {result.audio_missing_ms:.0f} ms"
        return text
