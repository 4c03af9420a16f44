"""Plots of a ``trt-exit profile`` report (matplotlib, Agg: no display needed)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from trt_exit.fileio import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_profile_plots(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """One PNG with three panels: per-stage times (wall, and GPU where measured; bars are
    medians, whiskers p90), the end-to-end latency distribution with p50/p90/p99, and the
    exit histogram.

    Returns:
        The path written (atomically).
    """
    plt = _pyplot()
    stages = report["stages"]
    e2e = report["end_to_end"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    title = (f"{report['model']} - {report['backend']} {report['precision']}, "
             f"batch {e2e['batch']} - {report['machine'].get('cpu', '')}")
    fig.suptitle(title, fontsize=10)

    ax = axes[0]
    if stages:
        names = list(stages)
        x = np.arange(len(names))
        has_gpu = any("gpu" in s for s in stages.values())
        width = 0.4 if has_gpu else 0.7
        med = [stages[n]["wall"]["median_ms"] for n in names]
        p90 = [stages[n]["wall"]["p90_ms"] - stages[n]["wall"]["median_ms"] for n in names]
        colors = ["tab:blue" if stages[n]["kind"] == "segment" else "tab:green" for n in names]
        ax.bar(x - (width / 2 if has_gpu else 0), med, width, yerr=[np.zeros(len(p90)), p90],
               color=colors, capsize=3, label="wall (CPU clock)")
        if has_gpu:
            gmed = [stages[n].get("gpu", {}).get("median_ms", 0.0) for n in names]
            ax.bar(x + width / 2, gmed, width, color="tab:orange", label="GPU (CUDA events)")
        ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("ms (median, whisker p90)")
        ax.set_title("per stage (segments blue, exits green)", fontsize=9)
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "stages not exposed", ha="center", va="center")

    ax = axes[1]
    samples = np.asarray(e2e.get("latency_samples_ms", []), np.float64)
    if len(samples):
        lo, hi = max(samples.min(), 1e-4), max(samples.max(), 1e-4)
        if hi / lo > 20:  # a long tail (preemption, clock ramps): log scale shows both ends
            ax.hist(samples, bins=np.geomspace(lo, hi * 1.01, 60), color="tab:gray")
            ax.set_xscale("log")
        else:
            ax.hist(samples, bins=60, color="tab:gray")
        for p, style in ((50, "-"), (90, "--"), (99, ":")):
            value = e2e["latency"][f"p{p}_ms"]
            ax.axvline(value, color="tab:red", linestyle=style, label=f"p{p} {value:.3f} ms")
        ax.legend(fontsize=8)
    ax.set_xlabel("end-to-end latency per run (ms)")
    ax.set_ylabel("runs")
    ax.set_title(f"end to end: {e2e['runs']} runs, {e2e['achieved_fps']:.0f} runs/s", fontsize=9)

    ax = axes[2]
    hist = e2e["exit_histogram"]
    total = max(1, sum(hist))
    bars = ax.bar(range(len(hist)), [100 * n / total for n in hist], color="tab:green")
    for bar, n in zip(bars, hist):
        ax.annotate(str(n), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(hist)), [f"exit {k}" for k in range(len(hist))], fontsize=8)
    ax.set_ylabel("% of samples")
    ax.set_ylim(0, 110)
    ax.set_title(f"exits taken ({report['policy'].get('policy', '')})", fontsize=9)

    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
