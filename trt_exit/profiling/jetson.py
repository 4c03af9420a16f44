"""Jetson detection, and the clocks and power mode a measurement was taken under.

A Jetson's latency depends on its power mode (``nvpmodel``) and on whether ``jetson_clocks``
pinned the clocks at their maximum, so every profile taken on one records both. Detection reads
``/etc/nv_tegra_release`` (present on every L4T system, and in L4T containers).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

TEGRA_RELEASE = Path("/etc/nv_tegra_release")
DEVICE_MODEL = Path("/proc/device-tree/model")


def is_jetson(release_file: str | os.PathLike = TEGRA_RELEASE) -> bool:
    """Whether this is a Jetson (L4T), by ``/etc/nv_tegra_release``."""
    return Path(release_file).is_file()


def l4t_release(release_file: str | os.PathLike = TEGRA_RELEASE) -> dict[str, str] | None:
    """L4T release from ``/etc/nv_tegra_release``, e.g. ``{"release": "36.4.0", ...}``.

    The first line reads ``# R36 (release), REVISION: 4.0, GCID: ..., BOARD: generic,
    EABI: aarch64, DATE: ...``.
    """
    path = Path(release_file)
    try:
        first = path.read_text(encoding="utf-8", errors="replace").splitlines()[0]
    except (OSError, IndexError):
        return None
    info: dict[str, str] = {"line": first.lstrip("# ").strip()}
    major = re.search(r"R(\d+)\s*\(release\)", first)
    revision = re.search(r"REVISION:\s*([\d.]+)", first)
    if major:
        info["release"] = major.group(1) + ("." + revision.group(1) if revision else "")
    for key in ("GCID", "BOARD", "EABI", "DATE"):
        match = re.search(rf"{key}:\s*([^,]+)", first)
        if match:
            info[key.lower()] = match.group(1).strip()
    return info


def run_tool(command: list[str], timeout_s: float = 10.0) -> dict[str, Any]:
    """Runs a query tool and returns ``{"command", "returncode", "output"}`` or an ``error``.

    Never raises: a tool that is missing, needs root, or fails is recorded as such (the profile
    is still worth having), with the return code checked and kept.
    """
    record: dict[str, Any] = {"command": " ".join(command)}
    if shutil.which(command[0]) is None:
        record["error"] = f"{command[0]} not found on PATH"
        return record
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        record["error"] = str(exc)
        return record
    record["returncode"] = done.returncode
    record["output"] = (done.stdout + done.stderr).strip()
    if done.returncode != 0:
        record["error"] = (f"exit status {done.returncode}" +
                           (" (jetson_clocks --show needs root: run with sudo)"
                            if "jetson_clocks" in command[0] else ""))
    return record


def parse_nvpmodel(output: str) -> dict[str, Any]:
    """``nvpmodel -q`` output (``NV Power Mode: MAXN\\n0``) as ``{"name", "id"}``."""
    info: dict[str, Any] = {}
    match = re.search(r"NV Power Mode:\s*(\S+)", output)
    if match:
        info["name"] = match.group(1)
    ids = [line.strip() for line in output.splitlines() if line.strip().isdigit()]
    if ids:
        info["id"] = int(ids[-1])
    return info


def parse_jetson_clocks(output: str) -> dict[str, Any]:
    """The CPU/GPU/EMC lines of ``jetson_clocks --show``: online CPUs with their current
    frequency, the GPU's and the memory controller's current frequency."""
    info: dict[str, Any] = {}
    cpus = {}
    for match in re.finditer(r"^(cpu\d+):\s*Online=(\d)\s.*?CurrentFreq=(\d+)", output, re.M):
        cpus[match.group(1)] = {"online": match.group(2) == "1", "hz": int(match.group(3))}
    if cpus:
        info["cpus"] = cpus
    gpu = re.search(r"^GPU\s.*?CurrentFreq=(\d+)", output, re.M)
    if gpu:
        info["gpu_hz"] = int(gpu.group(1))
    emc = re.search(r"^EMC\s.*?CurrentFreq=(\d+)", output, re.M)
    if emc:
        info["emc_hz"] = int(emc.group(1))
    return info


def jetson_state(release_file: str | os.PathLike = TEGRA_RELEASE) -> dict[str, Any] | None:
    """Power mode and clocks of this Jetson, or None on any other machine."""
    if not is_jetson(release_file):
        return None
    state: dict[str, Any] = {"l4t": l4t_release(release_file)}
    try:
        state["model"] = DEVICE_MODEL.read_text(encoding="utf-8", errors="replace").strip("\x00\n ")
    except OSError:
        pass
    nvpmodel = run_tool(["nvpmodel", "-q"])
    if "output" in nvpmodel and "error" not in nvpmodel:
        nvpmodel["power_mode"] = parse_nvpmodel(nvpmodel["output"])
    state["nvpmodel"] = nvpmodel
    clocks = run_tool(["jetson_clocks", "--show"])
    if "output" in clocks and "error" not in clocks:
        clocks["clocks"] = parse_jetson_clocks(clocks["output"])
    state["jetson_clocks"] = clocks
    return state
