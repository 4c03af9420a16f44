"""``trt-exit profile``: per-stage and end-to-end latency of a manifest, with its exits.

What is measured (batch 1 unless asked otherwise, after a warm-up):

* **per-stage wall time**: each stage alone on real intermediate values (the chain is run once
  to get them), round-robin over the stages so slow drifts of the machine touch all alike;
* **per-stage GPU time** (GPU backends only): CUDA events recorded on the stream that does the
  work, around each stage; on the CPU there is no GPU time and the report says so;
* **end to end**: every sample run through the executor under its exit policy; p50/p90/p99
  latency, the exit histogram, and the achieved rate (samples / wall time of the whole loop,
  including the host work between runs).

The measured loop runs inside the CUDA profiler capture range (:mod:`trt_exit.profiling.nsys`)
with NVTX ranges, so ``trt-exit nsys -- trt-exit profile DIR`` records exactly it.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from trt_exit.errors import ConfigError
from trt_exit.profiling.environment import machine_info
from trt_exit.profiling.jetson import jetson_state
from trt_exit.profiling.nsys import cuda_profiler_range, profiler_range_wanted
from trt_exit.profiling.nvtx import available as nvtx_available
from trt_exit.profiling.nvtx import nvtx_range
from trt_exit.profiling.timers import stage_order, stage_values, stage_wall_times, summarize_ms

log = logging.getLogger(__name__)

PERCENTILES = (50, 90, 99)


@dataclass
class ProfileConfig:
    """What ``trt-exit profile`` measures.

    Attributes:
        samples: End-to-end runs timed (cycling through the inputs).
        warmup: Untimed runs first (per stage, and end to end).
        stage_repeats: Timed runs of each stage alone.
        batch: Samples per run.
    """

    samples: int = 300
    warmup: int = 20
    stage_repeats: int = 100
    batch: int = 1


def percentiles_ms(samples_ms) -> dict[str, float]:
    """p50/p90/p99, mean, min and max of latency samples (ms)."""
    values = np.asarray(samples_ms, np.float64)
    out = {f"p{p}_ms": float(np.percentile(values, p)) for p in PERCENTILES}
    out.update(mean_ms=float(values.mean()), min_ms=float(values.min()),
               max_ms=float(values.max()), count=int(len(values)))
    return out


def stage_gpu_times(executor, backend: str, feeds: dict[str, Any], repeats: int,
                    warmup: int) -> tuple[dict[str, list[float]] | None, str]:
    """GPU-time samples (ms) of each stage, or None with the reason there are none.

    The executor may provide its own (``executor.gpu_stage_times_ms(feeds, repeats, warmup)``:
    the CUDA executor times its stream with CUDA events); for the torch backend the events are
    recorded on torch's current stream, which is the one its stage runners use.
    """
    own = getattr(executor, "gpu_stage_times_ms", None)
    if callable(own):
        return own(feeds, repeats=repeats, warmup=warmup), "CUDA events on the executor's stream"
    if backend != "torch":
        if backend == "onnxruntime":
            return None, "CPU backend (onnxruntime): no GPU time; wall times only"
        return None, f"the {backend} executor does not report GPU times"
    import torch

    if not torch.cuda.is_available():
        return None, "torch backend on the CPU: no GPU time"
    values = stage_values(executor, feeds)
    names = stage_order(executor.num_exits)
    for _ in range(warmup):
        for name in names:
            executor.runners[name].run(values)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats):
        events = []
        for name in names:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            executor.runners[name].run(values)
            end.record()
            events.append((name, start, end))
        torch.cuda.synchronize()
        for name, start, end in events:
            samples[name].append(float(start.elapsed_time(end)))
    return samples, "CUDA events on torch's current stream around each stage (includes copies)"


def end_to_end(executor, inputs: dict[str, np.ndarray], config: ProfileConfig,
               policy=None) -> dict[str, Any]:
    """Latency, exits and achieved rate of ``config.samples`` runs under ``policy``."""
    total = len(next(iter(inputs.values())))
    batch = config.batch

    def feeds(i: int) -> dict[str, np.ndarray]:
        start = (i * batch) % max(1, total - batch + 1)
        return {name: v[start:start + batch] for name, v in inputs.items()}

    for i in range(config.warmup):
        executor.run(feeds(i), policy)
    latencies, walls, exits = [], [], []
    strategies: dict[str, int] = {}
    began = time.perf_counter()
    for i in range(config.samples):
        x = feeds(i)
        t0 = time.perf_counter()
        with nvtx_range("run"):
            results = executor.run(x, policy)
        walls.append((time.perf_counter() - t0) * 1e3)
        latencies.append(float(results.latency_ms))
        exits.extend(int(e) for e in np.asarray(results.exit_index).reshape(-1))
        if getattr(results, "strategy", None):
            strategies[results.strategy] = strategies.get(results.strategy, 0) + 1
    elapsed = time.perf_counter() - began
    histogram = np.bincount(exits, minlength=executor.num_exits).tolist()
    return {
        "runs": config.samples,
        "batch": batch,
        "latency": percentiles_ms(latencies),
        "wall_per_run": percentiles_ms(walls),
        "exit_histogram": histogram,
        "exit_fractions": [n / max(1, len(exits)) for n in histogram],
        "achieved_fps": config.samples * batch / elapsed,
        # CUDA executor: how many runs each strategy drove (a fallback shows here).
        "strategies": strategies,
        "elapsed_s": elapsed,
        "latency_samples_ms": [round(v, 4) for v in latencies],
    }


def profile_executor(executor, inputs: dict[str, np.ndarray], backend: str,
                     config: ProfileConfig | None = None, policy=None,
                     input_source: str = "") -> dict[str, Any]:
    """The full profile of an open executor on ``inputs`` (arrays by input name, N samples).

    Returns:
        A JSON-ready report (see the module docstring); ``plots.save_profile_plots`` draws it.
    """
    config = config or ProfileConfig()
    manifest = executor.manifest
    available = len(next(iter(inputs.values())))
    if config.batch > available:
        raise ConfigError(f"batch {config.batch} (--batch) is more than the {available} input "
                          f"samples ({input_source or 'the inputs'}); use a batch of at most "
                          f"{available}, or more input samples (--input-samples, --inputs)")
    one = {name: v[:config.batch] for name, v in inputs.items()}
    report: dict[str, Any] = {
        "model": manifest.name,
        "manifest": str(manifest.path),
        "backend": backend,
        "backend_info": executor.backend.describe() if hasattr(executor, "backend") else {},
        "precision": getattr(executor, "precision", None),
        "policy": (policy or executor.policy).describe(),
        "inputs": input_source,
        "config": asdict(config),
        "nvtx": nvtx_available(),
        "stages": {},
    }
    # Other work on the machine shows up in the tails (p99); the load says how much there was.
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    with cuda_profiler_range(profiler_range_wanted(backend)) as capturing:
        report["cuda_profiler_range"] = capturing
        if hasattr(executor, "runners"):
            wall = stage_wall_times(executor, one, config.stage_repeats, config.warmup,
                                    nvtx=True)
            gpu, gpu_note = stage_gpu_times(executor, backend, one, config.stage_repeats,
                                            config.warmup)
            for name, samples in wall.items():
                entry = {"kind": name.split("_")[0], "wall": summarize_ms(samples)}
                if gpu is not None:
                    entry["gpu"] = summarize_ms(gpu[name])
                report["stages"][name] = entry
            report["gpu_times"] = gpu_note
        else:
            report["gpu_times"] = "this executor does not expose its stages"
        report["end_to_end"] = end_to_end(executor, inputs, config, policy)
    # After the runs: the CUDA executor's strategy, why it fell back, and graph failures.
    describe = getattr(executor, "describe", None)
    report["executor"] = describe() if callable(describe) else {
        "executor": type(executor).__name__}
    if load_before is not None:
        report["load_average_1min"] = {"before": load_before[0], "after": os.getloadavg()[0]}
    report["machine"] = machine_info()
    report["jetson"] = jetson_state()
    return report


def format_profile(report: dict[str, Any]) -> str:
    """The report as a table."""
    e2e = report["end_to_end"]
    lat = e2e["latency"]
    lines = [f"{report['model']}: {report['backend']} {report['precision']}, batch "
             f"{e2e['batch']}, {e2e['runs']} runs on {report['inputs']}", ""]
    has_gpu = any("gpu" in s for s in report["stages"].values())
    header = f"{'stage':<12}{'wall p50':>10}{'p90':>9}{'p99':>9}"
    if has_gpu:
        header += f"{'gpu p50':>10}{'p90':>9}"
    lines.append(header)
    for name, stage in report["stages"].items():
        w = stage["wall"]
        row = f"{name:<12}{w['median_ms']:>8.3f}ms{w['p90_ms']:>7.3f}ms{w['p99_ms']:>7.3f}ms"
        if "gpu" in stage:
            g = stage["gpu"]
            row += f"{g['median_ms']:>8.3f}ms{g['p90_ms']:>7.3f}ms"
        lines.append(row)
    if not has_gpu:
        lines.append(f"(GPU time: {report.get('gpu_times')})")
    total = max(1, sum(e2e["exit_histogram"]))
    lines += [
        "",
        f"end to end: p50 {lat['p50_ms']:.3f} ms, p90 {lat['p90_ms']:.3f} ms, p99 "
        f"{lat['p99_ms']:.3f} ms; achieved {e2e['achieved_fps']:.1f} samples/s",
        "exits: " + ", ".join(f"{k}: {n} ({100 * n / total:.0f}%)"
                              for k, n in enumerate(e2e["exit_histogram"])),
    ]
    executor = report.get("executor") or {}
    if executor.get("strategy"):
        ran = ", ".join(f"{s}: {n}" for s, n in e2e.get("strategies", {}).items())
        lines.append(f"CUDA executor: {executor['strategy']} strategy (runs: {ran or '-'})"
                     + (f"; fell back: {executor['fallback_reason']}"
                        if executor.get("fallback_reason") else ""))
        for failure in executor.get("graph_failures", []):
            lines.append(f"  graph failure: {failure}")
    if report.get("jetson"):
        mode = report["jetson"].get("nvpmodel", {}).get("power_mode", {})
        lines.append(f"Jetson: {report['jetson'].get('model', '?')}, power mode "
                     f"{mode.get('name', '?')}")
    return "\n".join(lines)
