"""benchmarks/executor.py: the parts that run without a GPU (the torch-only manifest it builds,
the threshold policies that force each exit depth, its ideal, acceptance rules and table), and
its refusal without one."""

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


@pytest.fixture(scope="module")
def digits_manifest(bench, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_digits")
    bench.torch_manifest("multi_exit_vit_digits", root)
    return root


def test_torch_manifest_runs_on_the_torch_backend(digits_manifest):
    from trt_exit.manifest import Manifest
    from trt_exit.models.checkpoint import load_checkpoint
    from trt_exit.runtime.executor import Executor
    from trt_exit.runtime.policies import AllExitsPolicy

    tmp_path = digits_manifest
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


def test_policies_force_each_exit_depth_through_gated_if_nodes(bench, digits_manifest):
    """The benchmark's policy for depth k makes the graph hold one IF node per early exit (the
    gates decide: no FixedExitPolicy shortcut), and every sample of both input buffers exits at
    exactly k (checked with the host executor, which decides as the gate kernel does)."""
    from trt_exit.manifest import Manifest
    from trt_exit.runtime.cuda_executor import chain_steps, conditional_nodes, plan_exits
    from trt_exit.runtime.executor import Executor
    from trt_exit.runtime.policies import AllExitsPolicy

    manifest = Manifest.load(digits_manifest)
    n = manifest.num_exits
    rng = np.random.default_rng(1)
    buffers = [rng.normal(size=(8, 1, 8, 8)).astype(np.float32) for _ in range(2)]
    with Executor(manifest, "torch", policy=AllExitsPolicy(),
                  backend_options={"device": "cpu"}) as executor:
        confidences = np.concatenate([executor.run(x).all_confidences for x in buffers], axis=1)
        policies = bench.exit_depth_policies(confidences)
        assert sorted(policies) == list(range(n))
        for k, policy in policies.items():
            plan = plan_exits(policy, n)
            assert conditional_nodes(plan) == n - 1, k
            gates = [s.gate for s in chain_steps(plan) if not s.stage]
            assert [g.exit_k for g in gates] == list(range(n)) and gates[-1].force
            assert all(g.use_threshold for g in gates[:-1])
            for x in buffers:
                assert (executor.run(x, policy).exit_index == k).all(), (k, policy)
    with pytest.raises(ValueError, match="reaches confidence"):
        bench.forcing_thresholds(np.array([[0.2, 1.0], [0.5, 0.5]]), 1)


def test_the_ideal_counts_gates_and_the_result_copy(bench):
    stage_ms = {"segment_0": 1.0, "exit_0": 0.5, "segment_1": 2.0, "exit_1": 0.25,
                "gate": 0.01, "gate_begin": 0.002, "copy_results": 0.003}
    assert bench.ideal_ms(stage_ms, 0) == pytest.approx(1.5 + 0.01 + 0.005)
    assert bench.ideal_ms(stage_ms, 1) == pytest.approx(3.75 + 0.02 + 0.005)


def _results(graph_ms: float, eager_ms: float, syncs: int, device_ms: float | None = None,
             captures: int = 0) -> dict:
    rows = []
    for k in range(2):
        rows.append({"strategy": "graph", "ran_as": ["graph"], "exit": k, "exits_taken": [k],
                     "median_ms": graph_ms, "p99_ms": graph_ms,
                     "device_median_ms": graph_ms if device_ms is None else device_ms,
                     "host_syncs": [syncs], "expected_syncs": 1, "conditional_nodes": 1,
                     "ideal_ms": 1.0})
        rows.append({"strategy": "eager", "ran_as": ["eager"], "exit": k, "exits_taken": [k],
                     "median_ms": eager_ms, "p99_ms": eager_ms, "device_median_ms": eager_ms,
                     "host_syncs": [k + 1], "expected_syncs": k + 1, "conditional_nodes": 1,
                     "ideal_ms": 1.0})
    return {"gpu": {"name": "Test GPU", "driver_cuda_version": "13.0"},
            "software": {"torch": "2.14.1", "cuda-bindings": "13.5.0"},
            "models": [{"model": "multi_exit_vit_digits", "num_exits": 2, "batches": [
                {"batch": 1, "rows": rows, "graph_conditional_nodes": [1],
                 "captures_while_timing": captures,
                 "full_graph": {"median_ms": 0.9, "p99_ms": 1.0, "device_median_ms": 0.8}}]}]}


def test_acceptance_rules(bench):
    assert bench.acceptance(_results(graph_ms=1.04, eager_ms=1.5, syncs=1)) == []
    slow = bench.acceptance(_results(graph_ms=1.04, eager_ms=1.5, syncs=1, device_ms=1.2))
    assert len(slow) == 2 and all("over the ideal" in f for f in slow)
    chatty = bench.acceptance(_results(graph_ms=1.0, eager_ms=1.5, syncs=2))
    assert len(chatty) == 2 and all("host syncs" in f for f in chatty)
    not_faster = bench.acceptance(_results(graph_ms=1.0, eager_ms=0.99, syncs=1))
    assert not_faster == ["multi_exit_vit_digits batch 1 exit 1: graph (1.0000 ms) is not "
                          "faster than eager (0.9900 ms)"]
    recaptured = bench.acceptance(_results(graph_ms=1.0, eager_ms=1.5, syncs=1, captures=3))
    assert len(recaptured) == 1 and "3 captures while timing" in recaptured[0]
    no_ifs = _results(graph_ms=1.0, eager_ms=1.5, syncs=1)
    no_ifs["models"][0]["batches"][0]["graph_conditional_nodes"] = [0]
    assert len(bench.acceptance(no_ifs)) == 2


def test_table_lists_every_exit(bench):
    table = bench.format_table(_results(graph_ms=1.0, eager_ms=1.5, syncs=1, device_ms=0.95))
    lines = [line for line in table.splitlines() if line.startswith("| digits")]
    assert len(lines) == 2
    cells = [c.strip() for c in lines[1].split("|")]
    assert cells[5] == "0.950" and cells[6] == "1.000 / 1.000"   # graph device, graph wall
    assert cells[9] == "1/-/2" and cells[10] == "1"              # syncs, IF nodes
    assert lines[1].rstrip(" |").endswith("0.900")              # no-exit graph on the last row


def test_refuses_to_run_without_a_gpu(bench, capsys):
    from trt_exit.runtime.cuda.api import cuda_status

    if cuda_status().available:
        pytest.skip("a GPU is present")
    assert bench.main(["--models", "multi_exit_vit_digits"]) == 2
    assert "needs an NVIDIA GPU" in capsys.readouterr().err
