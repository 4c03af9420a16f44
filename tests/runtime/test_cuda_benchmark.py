"""benchmarks/executor.py: the parts that run without a GPU (the torch-only manifest it builds,
its acceptance rules and table), and its refusal without one."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "executor.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_executor", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_torch_manifest_runs_on_the_torch_backend(bench, tmp_path):
    from trt_exit.manifest import Manifest
    from trt_exit.models.checkpoint import load_checkpoint
    from trt_exit.runtime.executor import Executor
    from trt_exit.runtime.policies import AllExitsPolicy

    bench.torch_manifest("multi_exit_vit_digits", tmp_path)
    manifest = Manifest.load(tmp_path)
    assert manifest.num_exits == 4 and manifest.precisions() == []
    images = np.random.default_rng(0).normal(size=(3, 1, 8, 8)).astype(np.float32)
    with Executor(manifest, "torch", policy=AllExitsPolicy(),
                  backend_options={"device": "cpu"}) as executor:
        results = executor.run(images)
        full = executor.run_full_model(images)
    import torch

    model = load_checkpoint(tmp_path / "checkpoint.safetensors")
    with torch.no_grad():
        expected = [o.numpy() for o in model(torch.from_numpy(images))]
    np.testing.assert_allclose(results.all_outputs, np.stack(expected), atol=1e-5)
    np.testing.assert_allclose(full.output, expected[-1], atol=1e-5)


def _results(graph_ms: float, eager_ms: float, syncs: int) -> dict:
    rows = []
    for k in range(2):
        rows.append({"strategy": "graph", "ran_as": ["graph"], "exit": k, "median_ms": graph_ms,
                     "p99_ms": graph_ms, "host_syncs": [syncs], "ideal_ms": 1.0})
        rows.append({"strategy": "eager", "ran_as": ["eager"], "exit": k, "median_ms": eager_ms,
                     "p99_ms": eager_ms, "host_syncs": [k + 1], "ideal_ms": 1.0})
    return {"gpu": {"name": "Test GPU", "driver_cuda_version": "13.0"},
            "software": {"torch": "2.14.1", "cuda-bindings": "13.5.0"},
            "models": [{"model": "multi_exit_vit_digits", "num_exits": 2, "batches": [
                {"batch": 1, "rows": rows, "full_graph": {"median_ms": 0.9, "p99_ms": 1.0}}]}]}


def test_acceptance_rules(bench):
    assert bench.acceptance(_results(graph_ms=1.04, eager_ms=1.5, syncs=1)) == []
    slow = bench.acceptance(_results(graph_ms=1.2, eager_ms=1.5, syncs=1))
    assert len(slow) == 2 and all("over the ideal" in f for f in slow)
    chatty = bench.acceptance(_results(graph_ms=1.0, eager_ms=1.5, syncs=2))
    assert len(chatty) == 2 and all("host syncs" in f for f in chatty)
    not_faster = bench.acceptance(_results(graph_ms=1.0, eager_ms=0.99, syncs=1))
    assert not_faster == ["multi_exit_vit_digits batch 1 exit 1: graph (1.0000 ms) is not "
                          "faster than eager (0.9900 ms)"]


def test_table_lists_every_exit(bench):
    table = bench.format_table(_results(graph_ms=1.0, eager_ms=1.5, syncs=1))
    lines = [line for line in table.splitlines() if line.startswith("| digits")]
    assert len(lines) == 2
    assert lines[1].split("|")[5].strip() == "1.000 / 1.000"   # graph column, exit 1
    assert lines[1].rstrip(" |").endswith("0.900")              # no-exit graph on the last row


def test_refuses_to_run_without_a_gpu(bench, capsys):
    from trt_exit.runtime.cuda.api import cuda_status

    if cuda_status().available:
        pytest.skip("a GPU is present")
    assert bench.main(["--models", "multi_exit_vit_digits"]) == 2
    assert "needs an NVIDIA GPU" in capsys.readouterr().err
