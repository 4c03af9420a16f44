"""benchmarks/gpu_acceptance.py --dry-run: every step of the prepared GPU run is listed and
checked on a CPU machine (its options, the GPU tests pytest collects, the wheels to carry in)."""

from __future__ import annotations

import importlib.util
import json
import sys
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
    assert report["ok"] and report["timeouts_s"] <= acceptance.BUDGET_S
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
