"""Soak measurement of the live app: does a long run grow in memory or threads?

:func:`soak` runs the crowd-counting app on the synthetic scene (video and audio) for many
frames and samples the process's resident memory (``VmRSS``), its OS thread count (``Threads``,
which includes ONNX Runtime's and OpenCV's own threads) and Python's thread count every
``sample_every`` frames. After the warm-up share of the run (allocators, caches and lazily
created pools settle), a leak shows as a steady slope; the verdict compares the growth from the
end of the warm-up to the end, and the least-squares slope over that part, with limits.
``benchmarks/soak.py`` is its command line.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


def process_status() -> dict[str, int]:
    """``VmRSS`` (bytes) and ``Threads`` of this process, from ``/proc/self/status`` (Linux)."""
    values: dict[str, int] = {}
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key == "VmRSS":
                values["rss_bytes"] = int(rest.split()[0]) * 1024
            elif key == "Threads":
                values["os_threads"] = int(rest.split()[0])
    return values


@dataclass
class SoakLimits:
    """What counts as growth.

    Attributes:
        warmup_fraction: Share of the run before the baseline is taken.
        max_rss_growth_mb: Allowed RSS growth from the baseline to the end.
        max_rss_slope_kb_per_1k_frames: Allowed least-squares slope after the warm-up.
    """

    warmup_fraction: float = 0.2
    max_rss_growth_mb: float = 16.0
    max_rss_slope_kb_per_1k_frames: float = 512.0


@dataclass
class SoakResult:
    """Samples and verdict of a soak run."""

    frames: int
    duration_s: float
    fps: float
    samples: list[dict[str, float]] = field(default_factory=list)
    baseline_rss_mb: float = 0.0
    final_rss_mb: float = 0.0
    rss_growth_mb: float = 0.0
    rss_slope_kb_per_1k_frames: float = 0.0
    os_threads: list[int] = field(default_factory=list)
    python_threads: list[int] = field(default_factory=list)
    threads_before: int = 0
    threads_after_close: int = 0
    passed: bool = False
    reasons: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def soak(engines: str | os.PathLike, frames: int, jsonl: str | os.PathLike | None = None,
         sample_every: int = 100, limits: SoakLimits | None = None, seed: int = 0,
         backend: str = "onnxruntime") -> SoakResult:
    """Runs ``frames`` synthetic frames through the app and measures growth.

    Args:
        engines: Directory of an audiovisual crowd model's manifest.
        frames: Frames to run.
        jsonl: Also write every result here (exercises the JSONL sink); None: ``null://``.
        sample_every: Frames between samples.
        limits: Growth limits of the verdict.
        seed: Seed of the synthetic scene.
        backend: Executor backend.
    """
    from trt_exit.commands.pipelines import open_executor
    from trt_exit.manifest import Manifest
    from trt_exit.pipelines.audio_sources import open_audio_source
    from trt_exit.pipelines.crowd_count import CountConfig, CrowdCounter
    from trt_exit.pipelines.sinks import open_sink
    from trt_exit.pipelines.video_sources import open_video_source

    limits = limits or SoakLimits()
    manifest = Manifest.load(engines)
    samples: list[dict[str, float]] = []
    began = time.perf_counter()

    def on_result(result) -> None:
        if result.frame % sample_every == 0 or result.frame == frames - 1:
            status = process_status()
            samples.append({"frame": result.frame, "t_s": time.perf_counter() - began,
                            "rss_mb": status["rss_bytes"] / 2 ** 20,
                            "os_threads": status["os_threads"],
                            "python_threads": threading.active_count()})

    gc.collect()
    threads_before = threading.active_count()
    sink = f"jsonl://{Path(jsonl)}" if jsonl else "null://"
    with open_executor(manifest, backend, "fp32") as executor:
        app = CrowdCounter(manifest, executor, open_video_source(f"synthetic://crowd?seed={seed}"),
                           open_audio_source(f"synthetic://crowd?seed={seed}"), [open_sink(sink)],
                           CountConfig(max_frames=frames), on_result=on_result)
        with app:
            summary = app.run()
    gc.collect()
    threads_after = threading.active_count()
    result = SoakResult(frames=summary.frames, duration_s=summary.duration_s, fps=summary.fps,
                        samples=samples, threads_before=threads_before,
                        threads_after_close=threads_after, summary=summary.to_dict())
    judge(result, limits)
    return result


def judge(result: SoakResult, limits: SoakLimits) -> None:
    """Fills in the growth figures and the verdict of ``result``."""
    samples = result.samples
    reasons = []
    if len(samples) < 3:
        result.reasons = ["too few samples to judge (run more frames)"]
        return
    start = min(int(len(samples) * limits.warmup_fraction), len(samples) - 2)
    steady = samples[start:]
    frames = np.array([s["frame"] for s in steady], np.float64)
    rss = np.array([s["rss_mb"] for s in steady], np.float64)
    result.baseline_rss_mb = float(rss[0])
    result.final_rss_mb = float(rss[-1])
    result.rss_growth_mb = float(rss[-1] - rss[0])
    slope_mb_per_frame = float(np.polyfit(frames, rss, 1)[0]) if np.ptp(frames) > 0 else 0.0
    result.rss_slope_kb_per_1k_frames = slope_mb_per_frame * 1024 * 1000
    result.os_threads = [int(s["os_threads"]) for s in samples]
    result.python_threads = [int(s["python_threads"]) for s in samples]
    if result.rss_growth_mb > limits.max_rss_growth_mb:
        reasons.append(f"RSS grew {result.rss_growth_mb:.1f} MB after the warm-up "
                       f"(limit {limits.max_rss_growth_mb} MB)")
    if result.rss_slope_kb_per_1k_frames > limits.max_rss_slope_kb_per_1k_frames:
        reasons.append(f"RSS slope {result.rss_slope_kb_per_1k_frames:.0f} KB per 1,000 frames "
                       f"(limit {limits.max_rss_slope_kb_per_1k_frames})")
    steady_threads = result.os_threads[start:]
    if max(steady_threads) != min(steady_threads):
        reasons.append(f"OS thread count changed during the run: {sorted(set(steady_threads))}")
    if result.threads_after_close != result.threads_before:
        reasons.append(f"{result.threads_after_close - result.threads_before} Python threads "
                       f"left after close")
    result.reasons = reasons
    result.passed = not reasons
