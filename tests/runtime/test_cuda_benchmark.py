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


def test_the_ideal_is_one_flat_graph_of_the_chains_work_at_each_depth(bench, digits_manifest):
    """Issue 22 item 5: the ideal at depth k is the chain's own work, captured as one flat graph
    (one launch: no host gap per piece), not a sum of pieces each timed alone (2k+5 launch gaps):
    the input copy, the begin kernel, segments and exits 0..k, their gates as the plain kernel
    and the result copy; exactly the graph's operations with its IF nodes taken out."""
    from trt_exit.manifest import Manifest
    from trt_exit.runtime.cuda_plan import graph_ops, plan_exits

    manifest = Manifest.load(digits_manifest)
    n = manifest.num_exits
    confidences = np.full((n, 4), 0.5)
    assert not hasattr(bench, "ideal_ms")  # the sum of separately launched pieces is gone
    for k, policy in bench.exit_depth_policies(confidences).items():
        policy.validate(n)
        plan = plan_exits(policy, n)
        flat = graph_ops(plan, ["image"], conditional=False, depth=k)
        described = [op.kind if op.kind in ("copy_input", "begin", "copy_results") else
                     op.name if op.kind == "stage" else f"gate_{op.gate.exit_k}" for op in flat]
        chain = [x for j in range(k + 1) for x in (f"segment_{j}", f"exit_{j}", f"gate_{j}")]
        assert described == ["copy_input", "begin", *chain, "copy_results"], k
        assert not any(op.opens_if for op in flat)
        # The graph strategy's operations up to that gate are the same work.
        graph = graph_ops(plan, ["image"])
        assert [(op.kind, op.name, op.gate) for op in graph[:len(flat) - 1]] == \
            [(op.kind, op.name, op.gate) for op in flat[:-1]]
        assert sum(op.opens_if for op in graph) == n - 1


def _results(graph_ms: float, eager_ms: float, syncs: int, device_ms: float | None = None,
             captures: int = 0, driver_ifs: int = 1) -> dict:
    rows = []
    for k in range(2):
        rows.append({"strategy": "graph", "ran_as": ["graph"], "exit": k, "exits_taken": [k],
                     "median_ms": graph_ms, "p99_ms": graph_ms,
                     "device_median_ms": graph_ms if device_ms is None else device_ms,
                     "host_syncs": [syncs], "expected_syncs": 1, "conditional_nodes_plan": 1,
                     "conditional_nodes": driver_ifs, "ideal_ms": 1.0})
        rows.append({"strategy": "eager", "ran_as": ["eager"], "exit": k, "exits_taken": [k],
                     "median_ms": eager_ms, "p99_ms": eager_ms, "device_median_ms": eager_ms,
                     "host_syncs": [k + 1], "expected_syncs": k + 1, "conditional_nodes_plan": 1,
                     "conditional_nodes": None, "ideal_ms": 1.0})
    return {"gpu": {"name": "Test GPU", "driver_cuda_version": "13.0"},
            "software": {"torch": "2.14.1", "cuda-bindings": "13.5.0"},
            "models": [{"model": "multi_exit_vit_digits", "num_exits": 2, "batches": [
                {"batch": 1, "rows": rows, "captures_while_timing": captures,
                 "full_graph": {"median_ms": 0.9, "p99_ms": 1.0, "device_median_ms": 0.8}}]}]}


def test_acceptance_rules(bench):
    assert bench.acceptance(_results(graph_ms=1.04, eager_ms=1.5, syncs=1)) == []
    slow = bench.acceptance(_results(graph_ms=1.04, eager_ms=1.5, syncs=1, device_ms=1.2))
    assert len(slow) == 2 and all("over the flat-graph ideal" in f for f in slow)
    chatty = bench.acceptance(_results(graph_ms=1.0, eager_ms=1.5, syncs=2))
    assert len(chatty) == 2 and all("host syncs" in f for f in chatty)
    not_faster = bench.acceptance(_results(graph_ms=1.0, eager_ms=0.99, syncs=1))
    assert not_faster == ["multi_exit_vit_digits batch 1 exit 1: graph (1.0000 ms) is not "
                          "faster than eager (0.9900 ms)"]
    recaptured = bench.acceptance(_results(graph_ms=1.0, eager_ms=1.5, syncs=1, captures=3))
    assert len(recaptured) == 1 and "3 captures while timing" in recaptured[0]
    # Issue 22 item 6: the count checked is the driver's, not the capture helper's own.
    no_ifs = bench.acceptance(_results(graph_ms=1.0, eager_ms=1.5, syncs=1, driver_ifs=0))
    assert len(no_ifs) == 2 and all("driver: 0" in f for f in no_ifs)
    unread = bench.acceptance(_results(graph_ms=1.0, eager_ms=1.5, syncs=1, driver_ifs=None))
    assert len(unread) == 2 and all("driver: None" in f for f in unread)


def test_table_lists_every_exit(bench):
    table = bench.format_table(_results(graph_ms=1.0, eager_ms=1.5, syncs=1, device_ms=0.95))
    lines = [line for line in table.splitlines() if line.startswith("| digits")]
    assert len(lines) == 2
    cells = [c.strip() for c in lines[1].split("|")]
    assert cells[5] == "0.950" and cells[6] == "1.000 / 1.000"   # graph device, graph wall
    assert cells[9] == "1/-/2" and cells[10] == "1"              # syncs, IF nodes
    assert lines[1].rstrip(" |").endswith("0.900")              # no-exit graph on the last row


def test_results_are_written_after_every_batch_and_model(bench, tmp_path):
    """Issue 22 item 2: a run cut short keeps what it measured: the JSON is rewritten after
    every batch size (``complete`` false), and completed with the verdict at the end."""
    import json

    path = tmp_path / "out" / "executor-test-gpu.json"
    recorder = bench.Recorder(path, {"benchmark": "executor", "gpu": {"name": "Test GPU"}})
    assert json.loads(path.read_text()) == {"benchmark": "executor", "gpu": {"name": "Test GPU"},
                                            "models": [], "complete": False}
    one = _results(graph_ms=1.0, eager_ms=1.5, syncs=1)["models"][0]
    recorder.model_progress({**one, "batches": one["batches"][:1]})
    recorder.model_progress({**one, "model": "other", "batches": []})
    recorder.model_progress(one)  # the first model again, later: replaced, not appended
    written = json.loads(path.read_text())
    assert [m["model"] for m in written["models"]] == ["other", "multi_exit_vit_digits"]
    assert written["complete"] is False and "acceptance" not in written
    recorder.finish(["a failure"])
    written = json.loads(path.read_text())
    assert written["complete"] is True
    assert written["acceptance"] == {"ok": False, "failures": ["a failure"]}


def test_progress_rows_are_printed_per_batch(bench):
    model = _results(graph_ms=1.0, eager_ms=1.5, syncs=1, device_ms=0.95)["models"][0]
    rows = bench.format_batch(model, model["batches"][0]).splitlines()
    assert len(rows) == 2 and rows[0].startswith("| digits | 1 | 0 | 1.000 | 0.950 |")
    assert len(bench.TABLE_HEADER.splitlines()[0].split("|")) == len(rows[0].split("|"))


def test_refuses_to_run_without_a_gpu(bench, capsys):
    from trt_exit.runtime.cuda.api import cuda_status

    if cuda_status().available:
        pytest.skip("a GPU is present")
    assert bench.main(["--models", "multi_exit_vit_digits"]) == 2
    assert "needs an NVIDIA GPU" in capsys.readouterr().err


def test_the_benchmarks_plumbing_runs_through_on_a_host_stand_in(bench, tmp_path, monkeypatch):
    """The first GPU run is rare and short: bench_model's bookkeeping (configurations, rounds,
    rows, the input-copy and host-wait sections, the progress JSON, acceptance and table) runs
    here through a stand-in of CudaExecutor that delegates to the host executor on the CPU.
    Only the plumbing is under test: the stand-in's timings mean nothing."""
    import json
    from types import SimpleNamespace

    import torch

    from trt_exit.runtime import cuda_executor
    from trt_exit.runtime.cuda import api
    from trt_exit.runtime.cuda_plan import plan_exits
    from trt_exit.runtime.executor import Executor

    class HostStandIn:
        def __init__(self, manifest, backend, max_batch, device_timing, policy,
                     graph_cache_size):
            self.inner = Executor(manifest, "torch", policy=policy,
                                  backend_options={"device": "cpu"})
            self.n = manifest.num_exits
            self.backend = SimpleNamespace(torch_device="cpu")
            self.captures, self.last_device_ms, self.graph_failures = 0, None, []
            self.sync_mode, self.sync_mode_basis = "auto", "stand-in"

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.inner.close()

        def graph_unavailable(self):
            return ""

        def describe(self):
            return {"executor": "stand-in", "strategies": {}}

        def plan(self, policy):
            policy.validate(self.n)
            return plan_exits(policy, self.n)

        def run(self, x, policy, strategy="graph"):
            results = self.inner.run(np.asarray(x), policy)
            results.strategy = strategy
            results.host_syncs = 1 if strategy == "graph" else int(results.exit_index.max()) + 1
            self.last_device_ms = results.latency_ms * 0.9
            return results

        def run_full_model(self, x, strategy="graph"):
            results = self.inner.run_full_model(np.asarray(x))
            results.strategy, results.host_syncs = strategy, 1
            self.last_device_ms = results.latency_ms * 0.9
            return results

        def profile_stages(self, x, repeats, chain_overheads):
            return {"segment_0": 0.1, "copy_inputs": 0.001}

        def time_flat_chain(self, x, policy, depth, repeats):
            return 0.01 * (depth + 1)

        def graph_census(self, policy, batch):
            return {"levels": [{"conditional": 1}] * (self.n - 1) + [{}], "unknown_bodies": 0}

    monkeypatch.setattr(cuda_executor, "CudaExecutor", HostStandIn)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    modes = []
    monkeypatch.setattr(api, "set_sync_mode", lambda mode: modes.append(mode) or mode)
    path = tmp_path / "executor-stand-in.json"
    recorder = bench.Recorder(path, {"gpu": {"name": "stand-in", "driver_cuda_version": "-"},
                                     "software": {}})
    model = bench.bench_model("multi_exit_vit_digits", [1, 2], list(bench.STRATEGIES),
                              repeats=3, warmup=1, profile_repeats=2,
                              on_batch=recorder.model_progress)
    assert [b["batch"] for b in model["batches"]] == [1, 2]
    first = model["batches"][0]
    assert len(first["rows"]) == 3 * model["num_exits"]
    assert {r["conditional_nodes"] for r in first["rows"] if r["strategy"] == "graph"} == \
        {model["num_exits"] - 1}
    assert set(first["input_copy"]) >= {"graph_same_input", "graph_alternating_inputs",
                                        "copy_gpu_ms", "bytes"}
    assert set(first["sync_modes"]) >= {"auto", "spin", "yield", "blocking"}
    assert "sync_modes" not in model["batches"][1]  # the first batch size only
    assert modes[-1] == "auto"  # the executor's own mode again at the end
    written = json.loads(path.read_text())
    assert written["complete"] is False and len(written["models"][0]["batches"]) == 2
    failures = bench.acceptance(written)
    assert not any("IF nodes" in f or "host syncs" in f for f in failures), failures
    assert bench.format_table(written).count("| digits |") == 2 * model["num_exits"]
