"""Wall-clock timing helpers: warm-up first, many repeats, medians.

GPU work is timed with CUDA events on the stream that does it (see the CUDA executor); these
helpers time host-side calls, which for the CPU backends is the whole story.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from trt_exit import tensor_names as tn
from trt_exit.profiling.nvtx import nvtx_range


def summarize_ms(samples_ms: list[float] | np.ndarray) -> dict[str, float]:
    """Median, mean, p90, p99, min and max of latency samples in milliseconds."""
    values = np.asarray(samples_ms, dtype=np.float64)
    return {
        "median_ms": float(np.median(values)),
        "mean_ms": float(values.mean()),
        "p90_ms": float(np.percentile(values, 90)),
        "p99_ms": float(np.percentile(values, 99)),
        "min_ms": float(values.min()),
        "max_ms": float(values.max()),
        "count": int(len(values)),
    }


def time_call(fn: Callable[[], Any], repeats: int = 100, warmup: int = 10) -> list[float]:
    """Latency samples (ms) of ``fn()`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - began) * 1e3)
    return samples


def stage_order(num_exits: int) -> list[str]:
    """Stage names in chain order: segment_0, exit_0, segment_1, exit_1, ..."""
    return [tn.stage_name(kind, k) for k in range(num_exits) for kind in (tn.SEGMENT, tn.EXIT)]


def stage_values(executor, feeds: dict[str, Any]) -> dict[str, Any]:
    """Every tensor of ``executor``'s chain for ``feeds``: each stage's real input values."""
    values = dict(feeds)
    for name in stage_order(executor.num_exits):
        values.update(executor.runners[name].run(values))
    return values


def stage_wall_times(executor, feeds: dict[str, Any], repeats: int = 200, warmup: int = 20,
                     nvtx: bool = False) -> dict[str, list[float]]:
    """Wall-time samples (ms) of every stage of ``executor``, each run alone on real values.

    The chain is run once on ``feeds`` (typically one sample) to get each stage's real input
    values; the stages are then timed round-robin, so slow drifts of the machine touch all of
    them alike. ``nvtx`` wraps each timed run in an NVTX range named after the stage.
    """
    values = stage_values(executor, feeds)
    names = stage_order(executor.num_exits)
    for _ in range(warmup):
        for name in names:
            executor.runners[name].run(values)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats):
        for name in names:
            runner = executor.runners[name]
            began = time.perf_counter()
            if nvtx:
                with nvtx_range(name):
                    runner.run(values)
            else:
                runner.run(values)
            samples[name].append((time.perf_counter() - began) * 1e3)
    return samples


def measure_stage_latency(
    executor, inputs: dict[str, np.ndarray], repeats: int = 200, warmup: int = 20
) -> dict[str, float]:
    """Median latency (ms) of every stage of ``executor``, each run alone on real values
    (:func:`stage_wall_times`); ``inputs`` are validated first.

    Returns:
        ``{stage name: median ms}``.
    """
    samples = stage_wall_times(executor, executor.validate_inputs(inputs), repeats, warmup)
    return {name: float(np.median(s)) for name, s in samples.items()}
