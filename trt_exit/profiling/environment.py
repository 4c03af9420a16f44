"""What machine and software a measurement came from, for reports and results files."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Any


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), or the platform's processor."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """Host, CPU, core count and the versions of the packages that shape the numbers."""
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in
                     ("trt-exit", "torch", "onnx", "onnxruntime", "numpy", "timm", "tensorrt",
                      "cuda-python", "nvidia-modelopt")
                     if _version(name)},
    }
