"""trt-exit profile on a real (tiny, tuned) model, the nsys recipe, Jetson state."""

from __future__ import annotations

import json
import os
import stat
import struct
import subprocess
import sys

import pytest

from trt_exit.cli import main
from trt_exit.errors import TrtExitError
from trt_exit.profiling import jetson, nsys


def test_profile_writes_json_and_plot_for_a_tuned_model(tiny_tuned, tmp_path, capsys):
    out = tmp_path / "prof"
    code = main(["profile", str(tiny_tuned), "--samples", "60", "--warmup", "5",
                 "--stage-repeats", "20", "--input-samples", "40", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "profile.json").read_text())
    num_exits = len(report["end_to_end"]["exit_histogram"])
    assert set(report["stages"]) == {f"{kind}_{k}" for k in range(num_exits)
                                     for kind in ("segment", "exit")}
    for stage in report["stages"].values():
        assert 0 < stage["wall"]["median_ms"] <= stage["wall"]["p90_ms"] <= stage["wall"]["max_ms"]
        assert "gpu" not in stage  # CPU backend: wall times only, and the report says why
    assert "no GPU time" in report["gpu_times"]
    e2e = report["end_to_end"]
    assert sum(e2e["exit_histogram"]) == 60 and e2e["achieved_fps"] > 0
    assert e2e["latency"]["p50_ms"] <= e2e["latency"]["p90_ms"] <= e2e["latency"]["p99_ms"]
    assert report["inputs"].startswith("digits") and report["machine"]["cpu_count"] >= 1
    assert report["jetson"] is None and report["cuda_profiler_range"] is False
    assert report["command"].startswith(f"trt-exit profile {tiny_tuned} --backend onnxruntime")
    assert "--samples 60" in report["command"]
    png = (out / "profile.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 1000 and height > 300
    printed = capsys.readouterr().out
    assert "end to end: p50" in printed and "segment_0" in printed


def test_profile_fixed_exit_policy_and_random_inputs(tiny_tuned, tmp_path):
    out = tmp_path / "fixed"
    assert main(["profile", str(tiny_tuned), "--policy", "fixed:0", "--inputs", "random",
                 "--samples", "20", "--warmup", "2", "--stage-repeats", "5", "--out",
                 str(out)]) == 0
    report = json.loads((out / "profile.json").read_text())
    assert report["end_to_end"]["exit_histogram"][0] == 20
    assert report["inputs"].startswith("random")


def test_profile_save_latency_enables_deadline_mode(tiny_tuned, fresh_copy, tmp_path):
    from trt_exit.manifest import Manifest

    model = fresh_copy(tiny_tuned)
    assert main(["profile", str(model), "--samples", "10", "--warmup", "2", "--stage-repeats",
                 "5", "--save-latency", "--out", str(tmp_path / "p")]) == 0
    profile = Manifest.load(model).latency_profile
    assert profile["source"] == "trt-exit profile" and len(profile["stages"]) >= 4
    assert main(["profile", str(model), "--budget-ms", "1000", "--samples", "10", "--warmup",
                 "2", "--stage-repeats", "3", "--out", str(tmp_path / "d")]) == 0
    report = json.loads((tmp_path / "d" / "profile.json").read_text())
    assert report["policy"]["policy"] == "deadline"


def test_profile_of_a_missing_manifest_is_one_line(tmp_path, capsys):
    assert main(["profile", str(tmp_path)]) == 2
    assert "no manifest" in capsys.readouterr().err


# --------------------------------------------------------------------------- nsys


def test_nsys_command_is_the_recommended_recipe():
    argv = nsys.nsys_command(["trt-exit", "profile", "runs/demo"], output="demo")
    assert argv == ["nsys", "profile", "-t", "cuda,nvtx,osrt", "--capture-range=cudaProfilerApi",
                    "--capture-range-end=stop", "--cuda-graph-trace=node", "-o", "demo",
                    "trt-exit", "profile", "runs/demo"]


def test_nsys_prints_the_command_where_nsys_is_absent(monkeypatch, capsys):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert main(["nsys", "-o", "rep", "--", "trt-exit", "profile", "my dir"]) == 0
    out = capsys.readouterr().out
    assert "not installed" in out
    assert ("TRT_EXIT_CUDA_PROFILER=1 nsys profile -t cuda,nvtx,osrt "
            "--capture-range=cudaProfilerApi --capture-range-end=stop --cuda-graph-trace=node "
            "-o rep trt-exit profile 'my dir'") in out


def fake_nsys(tmp_path, status: int):
    """An executable named nsys that records its arguments and environment."""
    script = tmp_path / "nsys"
    script.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/args\n"
                      f"echo \"$TRT_EXIT_CUDA_PROFILER\" > {tmp_path}/env\nexit {status}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_nsys_runs_it_with_the_capture_range_variable(tmp_path, monkeypatch):
    fake_nsys(tmp_path, 0)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert main(["nsys", "--", "python", "-c", "pass"]) == 0
    assert (tmp_path / "args").read_text().split()[-3:] == ["python", "-c", "pass"]
    assert (tmp_path / "env").read_text().strip() == "1"


def test_nsys_failure_is_reported(tmp_path):
    script = fake_nsys(tmp_path, 3)
    with pytest.raises(TrtExitError, match="status 3"):
        nsys.run_nsys(["true"], nsys=str(script))
    with pytest.raises(TrtExitError, match="nothing to profile"):
        nsys.run_nsys([])


def test_cuda_profiler_range_is_a_no_op_without_a_gpu(monkeypatch):
    monkeypatch.setenv(nsys.PROFILER_ENV, "1")
    assert nsys.profiler_range_wanted("onnxruntime")
    with nsys.cuda_profiler_range(True) as opened:
        assert opened is False
    monkeypatch.delenv(nsys.PROFILER_ENV)
    assert not nsys.profiler_range_wanted("onnxruntime") and nsys.profiler_range_wanted("tensorrt")


# --------------------------------------------------------------------------- Jetson

TEGRA = ("# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64, "
         "DATE: Fri Sep 13 04:36:44 UTC 2024\n# KERNEL_VARIANT: oot\n")
NVPMODEL = "NV Power Mode: MAXN\n0\n"
CLOCKS = """SOC family:tegra234  Machine:NVIDIA Jetson AGX Orin Developer Kit
Online CPUs: 0-11
cpu0: Online=1 Governor=schedutil MinFreq=729600 MaxFreq=2201600 CurrentFreq=2201600 IdleStates: WFI=1 c7=1
cpu1: Online=1 Governor=schedutil MinFreq=729600 MaxFreq=2201600 CurrentFreq=1420800 IdleStates: WFI=1 c7=1
GPU MinFreq=306000000 MaxFreq=1300500000 CurrentFreq=1300500000
EMC MinFreq=204000000 MaxFreq=3199000000 CurrentFreq=3199000000 FreqOverride=1
NV Power Mode: MAXN
"""


def test_jetson_detection_and_release(tmp_path):
    release = tmp_path / "nv_tegra_release"
    assert not jetson.is_jetson(release) and jetson.jetson_state(release) is None
    release.write_text(TEGRA)
    assert jetson.is_jetson(release)
    info = jetson.l4t_release(release)
    assert info["release"] == "36.4.0" and info["board"] == "generic" and info["eabi"] == "aarch64"


def test_power_mode_and_clock_parsing():
    assert jetson.parse_nvpmodel(NVPMODEL) == {"name": "MAXN", "id": 0}
    clocks = jetson.parse_jetson_clocks(CLOCKS)
    assert clocks["gpu_hz"] == 1300500000 and clocks["emc_hz"] == 3199000000
    assert clocks["cpus"]["cpu1"] == {"online": True, "hz": 1420800}


def test_jetson_state_runs_the_tools_and_checks_their_status(tmp_path, monkeypatch):
    release = tmp_path / "nv_tegra_release"
    release.write_text(TEGRA)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvpmodel").write_text(f"#!/bin/sh\nprintf '{NVPMODEL}'\n")
    (bin_dir / "jetson_clocks").write_text("#!/bin/sh\necho 'must be run as root' >&2\nexit 1\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    state = jetson.jetson_state(release)
    assert state["l4t"]["release"] == "36.4.0"
    assert state["nvpmodel"]["power_mode"] == {"name": "MAXN", "id": 0}
    assert state["jetson_clocks"]["returncode"] == 1
    assert "needs root" in state["jetson_clocks"]["error"]
    missing = jetson.run_tool(["no-such-tool-here"])
    assert "not found" in missing["error"]


def test_nsys_module_imports_without_cuda_python():
    # The recipe must be usable on a laptop: importing it pulls in nothing optional.
    code = ("import sys; import trt_exit.profiling.nsys, trt_exit.profiling.report; "
            "print('cuda' in sys.modules, 'cv2' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
