"""benchmarks/gpu_acceptance.py --dry-run: every step of the prepared GPU run is listed and
checked on a CPU machine (its options, the GPU tests pytest collects, the wheels to carry in)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_acceptance.py"


@pytest.fixture(scope="module")
def acceptance():
    spec = importlib.util.spec_from_file_location("gpu_acceptance", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_the_dry_run_lists_and_checks_every_step(acceptance, tmp_path, capsys):
    missing = acceptance.missing_distributions(acceptance.requirements())
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    if missing:  # without them carried in, the dry run names each one and fails
        assert acceptance.main(["--dry-run", "--out", str(tmp_path / "a"),
                                "--wheels", str(wheels)]) == 1
        report = json.loads((tmp_path / "a" / "acceptance.json").read_text())
        problems = next(s for s in report["steps"] if s["name"] == "install")["problems"]
        assert len(problems) == len(missing)
        for requirement in missing:  # the dry run checks names only: a file of that name
            name = acceptance.requirement_name(requirement).replace("-", "_")
            (wheels / f"{name}-1.0-py3-none-any.whl").write_bytes(b"")
    capsys.readouterr()
    assert acceptance.main(["--dry-run", "--out", str(tmp_path / "b"),
                            "--wheels", str(wheels)]) == 0
    report = json.loads((tmp_path / "b" / "acceptance.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == ["environment", "install", "pytest-gpu", "benchmark", "nsys"]
    assert report["ok"] and report["complete"] and report["problems"] == []
    assert report["timeouts_s"] + acceptance.MARGIN_S <= acceptance.BUDGET_S
    assert any("pytest collects" in c and "GPU tests" in c for c in steps["pytest-gpu"]["checks"])
    bench = steps["benchmark"]["command"]
    assert "--check" in bench and bench[bench.index("--batches") + 1:][:2] == ["1", "8"]
    assert {"multi_exit_vit_digits", "multi_exit_vit_small_patch16_224"} <= set(bench)
    printed = capsys.readouterr().out
    assert all(name in printed for name in steps) and "dry run ok" in printed


def test_the_dry_run_catches_an_option_the_benchmark_does_not_take(acceptance, tmp_path,
                                                                   monkeypatch):
    real_plan = acceptance.plan

    def broken(out, wheels, python=None):
        steps = real_plan(out, wheels)
        steps[3].command.append("--no-such-option")
        return steps

    monkeypatch.setattr(acceptance, "plan", broken)
    monkeypatch.setattr(acceptance, "missing_distributions", lambda wanted: [])
    assert acceptance.main(["--dry-run", "--out", str(tmp_path)]) == 1
    report = json.loads((tmp_path / "acceptance.json").read_text())
    assert any("rejects" in p for s in report["steps"] for p in s["problems"])


def test_wheels_are_matched_by_normalized_distribution_name(acceptance, tmp_path):
    (tmp_path / "scikit_learn-1.6.1-cp312-cp312-manylinux_2_17_x86_64.whl").write_bytes(b"")
    assert acceptance.wheel_for("scikit-learn>=1.3", tmp_path).name.startswith("scikit_learn")
    assert acceptance.wheel_for("nvtx>=0.2", tmp_path) is None
    assert acceptance.requirement_name("cuda-bindings[all]>=13,<14") == "cuda-bindings"


def test_a_gpu_test_run_where_everything_skipped_counts_as_failed(acceptance, tmp_path):
    xml = tmp_path / "pytest-gpu.xml"
    xml.write_text('<testsuites><testsuite name="pytest" errors="0" failures="1" skipped="3" '
                   'tests="6"></testsuite></testsuites>')
    assert acceptance.junit_counts(xml) == {"tests": 6, "failures": 1, "errors": 0,
                                            "skipped": 3, "passed": 2}
    assert acceptance.junit_counts(tmp_path / "absent.xml") == {}


# --------------------------------------------------------------------------- issue 22: evidence


def test_the_step_limits_fit_the_budget_with_a_margin(acceptance, tmp_path):
    """Item 1: the limits of every step, the environment step included (now a process of its
    own with an enforced limit), add up to at most the budget less a margin for start-up and the
    summary, and the budget itself leaves room in a ~15-minute lease (~420 s)."""
    steps = acceptance.plan(tmp_path, None)
    assert all(step.command or step.skip_reason for step in steps)
    assert steps[0].name == "environment" and "--environment" in steps[0].command
    assert acceptance.BUDGET_S <= 420 and acceptance.MARGIN_S >= 10
    assert sum(s.timeout_s for s in steps) + acceptance.MARGIN_S <= acceptance.BUDGET_S
    assert acceptance.budget_problem(steps) == ""
    steps[3].timeout_s += acceptance.MARGIN_S
    assert "more than the budget" in acceptance.budget_problem(steps)


def _python_step(acceptance, name: str, code: str, timeout_s: int):
    return acceptance.Step(name, [sys.executable, "-c", code], timeout_s, needs_gpu=False)


def test_a_slow_run_keeps_its_evidence(acceptance, tmp_path, capsys, monkeypatch):
    """Items 1 and 3: a step that sleeps past its limit is killed with its children and named
    as timed out; acceptance.json is written before and after every step (a run killed from
    outside still says how far it got); the completed steps' logs and JSON stay."""
    out = tmp_path / "out"
    out.mkdir()
    first = _python_step(acceptance, "first", (
        "import json, pathlib; pathlib.Path(r'%s').write_text(json.dumps({'measured': 1}));"
        "print('first step done')" % (out / "first.json")), 30)
    # The slow step copies acceptance.json as it is while it runs, starts a grandchild (as
    # pytest and the benchmark do) and sleeps far past its 2 s limit.
    slow = _python_step(acceptance, "slow", (
        "import shutil, subprocess, sys, time, pathlib;"
        "shutil.copy(r'%s', r'%s');"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
        "pathlib.Path(r'%s').write_text(str(child.pid));"
        "print('sleeping', flush=True); time.sleep(60)"
        % (out / "acceptance.json", out / "mid-run.json", out / "grandchild.pid")), 2)
    after = _python_step(acceptance, "after", "print('after')", 30)
    monkeypatch.setattr(acceptance, "plan", lambda out, wheels: [first, slow, after])
    assert acceptance.main(["--out", str(out)]) == 1
    written = json.loads((out / "acceptance.json").read_text())
    records = written["steps"]
    assert [r["status"] for r in records] == ["ok", "timeout", "ok"]
    assert written["timed_out"] == ["slow"] and written["complete"] and not written["ok"]
    assert "timed out after 2 s" in records[1]["reason"] and records[1]["rc"] == 124
    assert records[1]["seconds"] < 2 + acceptance.KILL_GRACE_S + 5
    mid = json.loads((out / "mid-run.json").read_text())
    assert [(s["name"], s["status"]) for s in mid["steps"]] == [("first", "ok"),
                                                                ("slow", "running")]
    assert json.loads((out / "first.json").read_text()) == {"measured": 1}
    assert "first step done" in (out / "first.log").read_text()
    assert "sleeping" in (out / "slow.log").read_text()
    assert "timed out after 2 s" in (out / "slow.log").read_text()
    pid = int((out / "grandchild.pid").read_text())
    status = Path(f"/proc/{pid}/status")
    alive = status.is_file() and "\nState:\tZ" not in status.read_text()
    assert not alive, "the timed-out step's child is still running"
    assert "[timeout] slow" in capsys.readouterr().out


def test_a_run_out_of_budget_cuts_the_step_and_skips_the_rest(acceptance, tmp_path,
                                                              monkeypatch):
    monkeypatch.setattr(acceptance, "MARGIN_S", 1)
    long = _python_step(acceptance, "long", "import time; time.sleep(60)", 60)
    never = _python_step(acceptance, "never", "print('ran')", 30)
    summary: dict = {}
    began = time.monotonic()
    records = acceptance.run([long, never], tmp_path, summary, budget_s=7, started=began)
    assert records[0]["status"] == "timeout"
    assert "the run's time left" in records[0]["reason"]
    assert records[1]["status"] == "skipped" and "budget is spent" in records[1]["reason"]
    assert time.monotonic() - began < 7 + acceptance.KILL_GRACE_S


def test_a_killed_pytest_step_is_a_timeout_not_a_run_without_gpu(acceptance, tmp_path):
    """Item 3: a pytest step killed by its limit writes no JUnit XML; its record says it timed
    out and how many tests had passed (from the -v log), not "no GPU test passed"."""
    log = tmp_path / "pytest-gpu.log"
    log.write_text("tests/runtime/test_a.py::test_one PASSED [ 10%]\n"
                   "tests/runtime/test_a.py::test_two[graph] PASSED [ 20%]\n"
                   "tests/runtime/test_b.py::test_three FAILED [ 30%]\n")
    step = acceptance.Step("pytest-gpu", ["pytest"], 120)
    record = {"status": "timeout", "reason": "timed out after 120 s (its budget share) and was "
                                             "killed"}
    acceptance._judge(step, record, tmp_path, log)
    assert record["status"] == "timeout"
    assert "2 GPU tests passed and 1 failed" in record["reason"]
    assert "no GPU test passed" not in record["reason"]
    everything_skipped = {"status": "ok"}
    log.write_text("tests/runtime/test_a.py::test_one SKIPPED (needs a GPU)\n")
    acceptance._judge(step, everything_skipped, tmp_path, log)
    assert everything_skipped["status"] == "failed"
    assert everything_skipped["reason"] == "no GPU test passed (see the skips)"


def test_the_environment_step_survives_an_nvidia_smi_that_hangs(acceptance, tmp_path,
                                                                 monkeypatch):
    """Item 3: environment() is documented never to raise; nvidia-smi past its timeout used to
    raise TimeoutExpired out of it."""
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\nsleep 30\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(acceptance, "SMI_TIMEOUT_S", 1)
    info = acceptance.environment(tmp_path)
    assert info["nvidia_smi"] == "nvidia-smi did not answer within 1 s"
    assert json.loads((tmp_path / "environment.json").read_text())["nvidia_smi"] == \
        info["nvidia_smi"]
