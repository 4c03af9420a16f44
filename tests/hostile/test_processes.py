"""Items 1 and 10 of issue 12 with real processes: concurrent writers of one manifest lose
nothing; what a SIGKILLed writer leaves is removed by the next write, what a live writer holds
is not."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trt_exit.manifest import MANIFEST_NAME, Manifest, merge_changes

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


WRITER = """
import random, sys, time
from trt_exit.manifest import Manifest
root, who, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = random.Random(who)
for j in range(count):
    manifest = Manifest.load(root)
    time.sleep(rng.uniform(0, 0.004))  # read ... modify ... write, interleaved with the others
    manifest.export.setdefault("writers", {})[f"{who}-{j}"] = j
    manifest.exits[0].options[f"{who}-{j}"] = True
    manifest.save()
"""


def test_concurrent_writers_lose_no_update(model):
    writers, count = 4, 12
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(model), f"w{i}", str(count)],
                              env=_env(), stderr=subprocess.PIPE, text=True)
             for i in range(writers)]
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    manifest = Manifest.load(model, verify=True)
    expected = {f"w{i}-{j}" for i in range(writers) for j in range(count)}
    assert set(manifest.export["writers"]) == expected
    assert expected <= set(manifest.exits[0].options)
    assert not [p.name for p in model.iterdir() if p.name.endswith(".tmp")]


def test_tune_and_precision_at_once_keep_both(model):
    """The issue's reproduction: `trt-exit precision D --precision fp16 & trt-exit tune D`."""
    run = [sys.executable, "-m", "trt_exit"]
    before = Manifest.load(model)
    old_profile = before.latency_profile["statistic"]
    procs = [subprocess.Popen(run + ["precision", str(model), "--precision", "fp16"], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
             subprocess.Popen(run + ["tune", str(model), "--repeats", "3"], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    after = Manifest.load(model, verify=True)
    assert "fp16" in after.precisions()  # precision's change
    assert after.latency_profile["statistic"] == "median of 3" != old_profile  # tune's change
    assert after.tuning["fp32"]["stage_latency_ms"] == after.latency_profile["stages"]


def test_merge_applies_only_this_writers_changes():
    base = {"a": 1, "b": {"x": 1, "y": 2}, "l": [{"t": 1}, {"t": 2}], "gone": 1}
    theirs = {"a": 1, "b": {"x": 5, "y": 2, "z": 3}, "l": [{"t": 1, "e": 1}, {"t": 2}], "gone": 1}
    ours = {"a": 2, "b": {"x": 1, "y": 7}, "l": [{"t": 1}, {"t": 9}]}
    assert merge_changes(base, theirs, ours) == {
        "a": 2, "b": {"x": 5, "y": 7, "z": 3}, "l": [{"t": 1, "e": 1}, {"t": 9}]}
    assert merge_changes({"v": 1}, {"v": 2}, {"v": 3}) == {"v": 3}  # both changed: ours wins
    assert merge_changes({}, {"new": {"a": 1}}, {"new": {"b": 2}}) == {"new": {"a": 1, "b": 2}}


# ------------------------------------------------------------------ item 10: leftovers

HOLDER = """
import sys, time
from trt_exit.fileio import atomic_path, make_staging_dir
root = sys.argv[1]
with atomic_path(root + "/manifest.json") as tmp:
    tmp.write_text("half a manifest")
    staging = make_staging_dir(root, ".export-")
    (staging / "segment_0.onnx").write_bytes(b"partial")
    print(tmp.name, staging.name, flush=True)
    time.sleep(120)
"""


def _holder(model: Path) -> tuple[subprocess.Popen, Path, Path]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(model)], env=_env(),
                            stdout=subprocess.PIPE, text=True)
    tmp_name, staging_name = proc.stdout.readline().split()
    return proc, model / tmp_name, model / staging_name


def test_a_killed_writers_leftovers_go_a_live_writers_stay(model):
    manifest_before = (model / MANIFEST_NAME).read_bytes()
    dead, dead_tmp, dead_staging = _holder(model)
    live, live_tmp, live_staging = _holder(model)
    try:
        dead.send_signal(signal.SIGKILL)
        dead.wait(timeout=30)
        assert dead_tmp.exists() and dead_staging.is_dir()  # what a kill leaves
        assert (model / MANIFEST_NAME).read_bytes() == manifest_before  # never half-written
        manifest = Manifest.load(model)
        manifest.export["touched"] = True
        manifest.save()  # the next write cleans up, under the lock
        assert not dead_tmp.exists() and not dead_staging.exists()
        assert live_tmp.exists() and live_staging.is_dir()  # its owner still works on them
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait(timeout=30)
    Manifest.load(model).save()
    assert not live_tmp.exists() and not live_staging.exists()
    assert Manifest.load(model, verify=True).export["touched"] is True


def test_a_killed_export_leaves_nothing_after_the_next_one(model, tmp_path):
    """SIGKILL a real `trt-exit export` while it stages graphs; the next write removes them."""
    proc = subprocess.Popen([sys.executable, "-m", "trt_exit", "export", "--out", str(model)],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not list(model.glob(".export-*")) and time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"export finished before it could be killed: {proc.stderr.read()}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert list(model.glob(".export-*")), "the kill left no staging folder to clean"
    Manifest.load(model, verify=True).save()
    assert not list(model.glob(".export-*")) and not list(model.rglob("*.tmp"))
    json.loads((model / MANIFEST_NAME).read_text())


def test_a_killed_output_writer_is_cleaned_by_the_next_write_of_that_file(tmp_path):
    """`run --output` writes outside any model directory: the next write of the same file
    removes what a killed one left."""
    from trt_exit.fileio import atomic_write_text

    out = tmp_path / "results.jsonl"
    code = ("import sys, time\nfrom trt_exit.fileio import atomic_path\n"
            "with atomic_path(sys.argv[1]) as tmp:\n"
            "    tmp.write_text('partial')\n    print(tmp.name, flush=True)\n    time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], env=_env(),
                            stdout=subprocess.PIPE, text=True)
    leftover = tmp_path / proc.stdout.readline().strip()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert leftover.exists() and not out.exists()
    atomic_write_text(out, "complete\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl"]


def test_a_writer_waits_for_the_lock_then_gives_up_clearly(model, monkeypatch):
    import trt_exit.manifest as manifest_module

    code = ("import sys, time\nfrom trt_exit.manifest import manifest_lock\n"
            "with manifest_lock(sys.argv[1]):\n"
            "    print('held', flush=True)\n    time.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(model)], env=_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        monkeypatch.setattr(manifest_module, "LOCK_TIMEOUT_S", 0.3)
        manifest = Manifest.load(model)  # readers take no lock
        manifest.export["late"] = True
        before = (model / MANIFEST_NAME).read_bytes()
        with pytest.raises(manifest_module.ManifestError, match="another trt-exit command"):
            manifest.save()
        assert (model / MANIFEST_NAME).read_bytes() == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    manifest.save()  # the kill released the lock
    assert Manifest.load(model).export["late"] is True
