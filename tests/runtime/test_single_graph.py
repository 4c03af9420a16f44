"""The single early-exit graph at run time: the documented plain-onnxruntime snippet, the host
executor's ``single_graph`` / ``auto`` strategies, the tuner's choice, and the CLI."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trt_exit.cli import main
from trt_exit.errors import ConfigError
from trt_exit.manifest import Manifest
from trt_exit.runtime.executor import Executor
from trt_exit.runtime.policies import (
    AllExitsPolicy,
    DeadlinePolicy,
    FixedExitPolicy,
    ThresholdPolicy,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "executor.md"

#: Runs the snippet with ``trt_exit`` unimportable and saves what it computed.
RUNNER = """
import sys
sys.modules["trt_exit"] = None  # importing trt_exit now fails: the snippet must not need it
namespace = {}
exec(compile(open("snippet.py").read(), "snippet.py", "exec"), namespace)
import numpy as np
np.savez("result.npz", output=namespace["output"], confidence=namespace["confidence"],
         exit_index=namespace["exit_index"])
"""


def documented_snippet() -> str:
    """The Python block after the snippet marker in docs/executor.md."""
    text = DOC.read_text(encoding="utf-8")
    match = re.search(r"<!-- the plain-onnxruntime snippet[^>]*-->\s*```python\n(.*?)```", text,
                      re.S)
    assert match, "docs/executor.md lost its plain-onnxruntime snippet"
    return match.group(1)


def test_the_documented_snippet_runs_on_plain_onnxruntime(tiny_tuned, digits, tmp_path):
    snippet = documented_snippet()
    code = [line for line in snippet.splitlines() if line.strip() and not line.startswith("#")]
    assert len(code) == 5  # "the five lines of Python"
    demo = tmp_path / "runs" / "demo"
    shutil.copytree(tiny_tuned, demo)  # the snippet's path, with the test's model in it
    images = digits["test"].inputs["image"][:64]
    np.save(tmp_path / "images.npy", images)
    (tmp_path / "snippet.py").write_text(snippet)
    done = subprocess.run([sys.executable, "-I", "-c", RUNNER], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = np.load(tmp_path / "result.npz")
    with Executor(tiny_tuned) as executor:  # the stages, deciding in Python
        expected = executor.run(images, strategy="stages")
    np.testing.assert_array_equal(result["exit_index"], expected.exit_index)
    np.testing.assert_array_equal(result["output"].argmax(1), expected.prediction)
    np.testing.assert_allclose(result["output"], expected.output, rtol=0, atol=1e-5)
    assert len(set(expected.exit_index.tolist())) > 1  # the decisions were not all alike


def test_the_tuner_measures_both_strategies_and_records_its_choice(tiny_tuned):
    choice = Manifest.load(tiny_tuned).tuning["fp32"]["strategy"]
    assert choice["default"] in ("stages", "single_graph")
    assert set(choice["mean_latency_ms"]) == {"1", "8", "64"}
    for means in choice["mean_latency_ms"].values():
        assert set(means) == {"stages", "single_graph"} and min(means.values()) > 0
    one = choice["mean_latency_ms"]["1"]
    assert (choice["default"] == "single_graph") == (one["single_graph"] < one["stages"])
    assert "batch 1" in choice["why"] and choice["threads"] == 1


def test_auto_takes_the_recorded_choice_up_to_its_batch(tiny_tuned, fresh_copy, digits):
    root = fresh_copy(tiny_tuned)
    manifest = Manifest.load(root)
    images = digits["test"].inputs["image"][:16]
    manifest.tuning["fp32"]["strategy"] = {"default": "single_graph", "single_graph_max_batch": 8}
    manifest.save()
    with Executor(root) as executor:
        assert executor.run(images[:1]).strategy == "single_graph"
        assert executor.run(images[:8]).strategy == "single_graph"
        assert executor.run(images[:9]).strategy == "stages"
        # a plan other than the file's: auto keeps to the stages (it was not measured)
        assert executor.run(images[:1], FixedExitPolicy(0)).strategy == "stages"
        assert executor.run(images[:1], AllExitsPolicy()).strategy == "stages"
        # asked for explicitly, another plan is composed in memory
        fixed = executor.run(images, FixedExitPolicy(0), strategy="single_graph")
        assert fixed.strategy == "single_graph" and (fixed.exit_index == 0).all()
        np.testing.assert_allclose(fixed.output, executor.run(images, FixedExitPolicy(0),
                                                              strategy="stages").output,
                                   rtol=0, atol=1e-5)
    manifest.tuning["fp32"]["strategy"]["default"] = "stages"
    manifest.save()
    with Executor(root) as executor:
        assert executor.run(images[:1]).strategy == "stages"


def test_policies_and_backends_the_single_graph_cannot_serve(tiny_tuned, digits):
    images = digits["test"].inputs["image"][:2]
    with pytest.raises(ConfigError, match="unknown strategy"):
        Executor(tiny_tuned, strategy="graph")
    with pytest.raises(ConfigError, match="ONNX Runtime, not the torch backend"):
        Executor(tiny_tuned, "torch", backend_options={"device": "cpu"}, strategy="single_graph")
    with Executor(tiny_tuned, strategy="single_graph") as executor:
        with pytest.raises(ConfigError, match="AllExitsPolicy needs the stages"):
            executor.run(images, AllExitsPolicy())
        deadline = DeadlinePolicy([None, None], budget_ms=1.0, stage_latency_ms={"segment_1": 1})
        with pytest.raises(ConfigError, match="DeadlinePolicy needs the stages"):
            executor.run(images, deadline)
        assert executor.run(images, ThresholdPolicy([0.5, 0.5])).strategy == "single_graph"


def test_run_command_gives_the_same_lines_with_either_strategy(tiny_tuned, digits, tmp_path,
                                                              capsys):
    images = tmp_path / "x.npy"
    np.save(images, digits["test"].inputs["image"][:50])
    lines = {}
    for strategy in ("stages", "single_graph"):
        out = tmp_path / f"{strategy}.jsonl"
        assert main(["run", str(tiny_tuned), "--input", str(images), "--output", str(out),
                     "--strategy", strategy, "--chunk", "7"]) == 0
        lines[strategy] = [json.loads(line) for line in out.read_text().splitlines()]
    for a, b in zip(lines["stages"], lines["single_graph"]):
        assert (a["sample"], a["exit"], a["prediction"]) == (b["sample"], b["exit"], b["prediction"])
        assert a["confidence"] == pytest.approx(b["confidence"], abs=1e-6)
    assert main(["run", str(tiny_tuned), "--input", str(images), "--policy", "all",
                 "--strategy", "single_graph"]) == 2
    assert "needs the stages" in capsys.readouterr().err
