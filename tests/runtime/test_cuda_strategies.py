"""Issue 22's executor fixes where their logic runs without a GPU: the strategies in their own
modules, fallbacks logged at WARNING and recorded, the IF nodes counted from what the driver
reports, a failing first graph launch dropped for poll, graphs keyed on (policy, batch) with
the inputs copied in by the graph, result views that export the executor's stream, gate
kernels resolved before any capture, the host-wait mode, and JetPack's NVRTC.

Calls into the CUDA libraries are real: without a driver they fail as they would on a broken
machine (``cudaErrorInsufficientDriver``, or cuda-pathfinder finding no ``libcuda``). Where a
GPU resource is needed (a stream, a loaded module) a small stand-in takes its place; the GPU
tests in test_cuda_executor.py run the same paths for real.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest

from trt_exit.errors import ConfigError, CudaError, InputError
from trt_exit.runtime.policies import FixedExitPolicy, ThresholdPolicy

pytest.importorskip("cuda.bindings", reason="cuda-python is not installed")


# --------------------------------------------------------------------------- 13. modules


def test_each_strategy_has_its_own_module_and_the_public_api_stays():
    from trt_exit.runtime import cuda_executor
    from trt_exit.runtime.cuda_strategies import chain, eager, graph, poll

    assert callable(poll.run_poll) and callable(eager.run_eager)
    assert callable(eager.run_all_exits) and isinstance(graph.GraphStrategy, type)
    assert cuda_executor.DeviceResults is chain.DeviceResults
    for name in ("CudaExecutor", "create_executor", "plan_exits", "ExitPlan", "chain_steps",
                 "conditional_nodes", "choose_strategy", "STRATEGIES"):
        assert hasattr(cuda_executor, name), name
    executor = cuda_executor.CudaExecutor
    assert not any(hasattr(executor, n) for n in ("_run_graph", "_run_poll", "_run_eager",
                                                  "_capture", "_warm_up"))


# --------------------------------------------------------------------------- 4. fallbacks


def test_a_fallback_is_logged_at_warning_once_and_kept(caplog):
    from trt_exit.runtime.cuda_plan import StrategySelector

    asked = []

    def graph_reason():
        asked.append("graph")
        return "the driver supports CUDA 12.2; conditional graph nodes need 12.4+"

    selector = StrategySelector(graph_reason, lambda: "")
    with caplog.at_level(logging.WARNING):
        assert selector.choose("auto") == "poll"
        assert selector.choose("auto") == "poll"
        assert selector.choose("eager") == "eager"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "using the poll strategy instead of graph" in \
        warnings[0].getMessage()
    assert asked == ["graph"]  # asked once
    assert selector.reason("auto").startswith("the driver supports CUDA 12.2")
    assert selector.choices["auto"][0] == "poll" and selector.reason("eager") == ""


def test_the_profile_records_the_executors_strategy_and_its_runs(tiny_export, digits):
    from trt_exit.profiling.report import ProfileConfig, format_profile, profile_executor
    from trt_exit.runtime.executor import Executor

    class Recorded(Executor):
        """The host executor, reporting what a CUDA executor that fell back would."""

        def describe(self):
            return {"executor": "cuda", "strategy": "poll", "fallback_reason": "old driver",
                    "graph_failures": ["the graph's first launch failed: X"]}

        def run(self, inputs, policy=None):
            results = super().run(inputs, policy)
            results.strategy = "poll"
            return results

    images = {"image": digits["test"].inputs["image"][:8]}
    with Recorded(tiny_export, policy=FixedExitPolicy(0)) as executor:
        report = profile_executor(executor, images, "onnxruntime",
                                  ProfileConfig(samples=5, warmup=1, stage_repeats=2))
    assert report["executor"]["strategy"] == "poll"
    assert report["executor"]["fallback_reason"] == "old driver"
    assert report["end_to_end"]["strategies"] == {"poll": 5}
    text = format_profile(report)
    assert "CUDA executor: poll strategy (runs: poll: 5); fell back: old driver" in text
    assert "graph failure: the graph's first launch failed: X" in text
    with Executor(tiny_export, policy=FixedExitPolicy(0)) as host:
        plain = profile_executor(host, images, "onnxruntime",
                                 ProfileConfig(samples=2, warmup=0, stage_repeats=1))
    assert plain["executor"] == {"executor": "Executor"}
    assert plain["end_to_end"]["strategies"] == {"stages": 2}  # the host executor's (issue 21)


# --------------------------------------------------------------------------- 6. IF nodes


def _driver_tree(levels: list[list[str]]):
    """A graph as the driver would report it: ``levels[i]`` lists the node types of the graph
    at nesting level i, whose one conditional node's body is level i + 1."""
    graphs = {f"g{i}": [f"g{i}n{j}" for j in range(len(kinds))]
              for i, kinds in enumerate(levels)}
    kinds = {f"g{i}n{j}": kind for i, level in enumerate(levels) for j, kind in enumerate(level)}
    bodies = {}
    for i, level in enumerate(levels):
        for j, kind in enumerate(level):
            if kind == "conditional" and i + 1 < len(levels):
                bodies[f"g{i}n{j}"] = f"g{i + 1}"

    class Node(str):
        def __int__(self):
            return hash(self)

    nodes_of = {g: [Node(n) for n in nodes] for g, nodes in graphs.items()}
    return ("g0", {hash(n): b for n, b in bodies.items()}, lambda g: nodes_of[g],
            lambda node: kinds[str(node)])


def test_if_nodes_are_counted_from_what_the_driver_holds():
    from trt_exit.runtime.cuda.graph import census
    from trt_exit.runtime.cuda_plan import graph_mismatch, plan_exits

    plan = plan_exits(ThresholdPolicy([0.5, 0.5, 0.5]), 4)  # 3 IF nodes, nested
    good = census(*_driver_tree([
        ["memcpy", "kernel", "kernel", "kernel", "conditional", "memcpy"],
        ["kernel", "kernel", "conditional"],
        ["kernel", "kernel", "conditional"],
        ["kernel", "kernel", "kernel"]]))
    assert good.per_level("conditional") == [1, 1, 1, 0] and good.conditional_nodes == 3
    assert good.levels[0] == {"memcpy": 2, "kernel": 3, "conditional": 1}
    assert graph_mismatch(plan, good) == ""
    # A body captured without its nested IF node (the capture's own counter would still say 3).
    shallow = census(*_driver_tree([["kernel", "conditional"], ["kernel", "conditional"],
                                    ["kernel", "kernel"]]))
    assert "IF nodes [1, 1, 0] per nesting level, the plan needs [1, 1, 1, 0]" in \
        graph_mismatch(plan, shallow)
    empty_body = census(*_driver_tree([["kernel", "conditional"], ["kernel", "conditional"],
                                       ["kernel", "conditional"], []]))
    assert "levels [3]" in graph_mismatch(plan, empty_body)
    root, bodies, nodes_of, type_of = _driver_tree([["kernel", "conditional"], ["kernel"]])
    stranger = census(root, {}, nodes_of, type_of)  # a conditional node nobody added
    assert stranger.unknown_bodies == 1
    assert "did not add" in graph_mismatch(plan_exits(ThresholdPolicy([0.5]), 2), stranger)


def test_the_driver_census_uses_real_binding_calls():
    """graph_nodes / node_type reach the driver through the installed bindings (on a machine
    without one: the driver library is not found; a wrong argument list would be a TypeError)."""
    from cuda.bindings import driver

    from trt_exit.runtime.cuda.api import cuda_status
    from trt_exit.runtime.cuda.graph import graph_nodes, node_type

    if cuda_status().available:
        pytest.skip("a GPU is present: the no-driver path cannot be observed")
    with pytest.raises(RuntimeError):
        graph_nodes(driver.CUgraph(0))
    with pytest.raises(RuntimeError):
        node_type(driver.CUgraphNode(0))


# --------------------------------------------------------------------------- 7, 9: the graph


class _Stream:
    handle = 0x5EED


class _Chain:
    """Stands in for the executor's Chain (buffers on a GPU); records what the strategy does."""

    def __init__(self):
        self.stream = _Stream()
        self.addresses = {"image": 0x1000}
        self.calls: list[str] = []

    def start(self, producers):
        self.calls.append("start")

    def untimed(self):
        pass

    def synchronize(self):
        self.calls.append("synchronize")

    def input_bytes(self, name, batch):
        return 256 * batch

    def results(self, batch, with_device):
        return SimpleNamespace(batch=batch)


def _null_graph(launches: int = 0):
    """A GraphExec of a null executable graph: every call on it fails in the real runtime."""
    from cuda.bindings import runtime

    from trt_exit.runtime.cuda.graph import GraphCensus, GraphExec

    graph = GraphExec.__new__(GraphExec)
    graph.what, graph.census, graph.conditional_nodes = "probe", GraphCensus(()), 0
    graph.launches, graph._template, graph.copy_sources = launches, None, {}
    graph._exec = runtime.cudaGraphExec_t()
    return graph


def test_a_failing_first_launch_drops_the_graph_and_polls(caplog):
    from trt_exit.runtime.cuda_plan import plan_exits
    from trt_exit.runtime.cuda_strategies.graph import ChainGraph, GraphStrategy

    strategy = GraphStrategy(_Chain(), ["image"], cache_size=4)
    plan = plan_exits(ThresholdPolicy([0.5]), 2)
    key = strategy.key(plan, 1, [])
    strategy.graphs[key] = ChainGraph(_null_graph(), {}, 1)
    with caplog.at_level(logging.WARNING):
        assert strategy.run(plan, 1, {"image": 0x2000}, [], []) is None  # the caller polls
    assert key not in strategy.graphs
    assert "first launch failed" in strategy.failures[plan.key]
    assert "cudaGraphLaunch" in strategy.failures[plan.key]
    assert any("polling for this policy" in r.getMessage() for r in caplog.records
               if r.levelno == logging.WARNING)
    # Later runs of that plan poll without trying the graph again.
    assert strategy.run(plan, 1, {"image": 0x2000}, [], []) is None
    assert strategy.captures == 0


def test_a_failing_later_launch_raises():
    from trt_exit.runtime.cuda_plan import plan_exits
    from trt_exit.runtime.cuda_strategies.graph import ChainGraph, GraphStrategy

    strategy = GraphStrategy(_Chain(), ["image"], cache_size=4)
    plan = plan_exits(ThresholdPolicy([0.5]), 2)
    strategy.graphs[strategy.key(plan, 1, [])] = ChainGraph(_null_graph(launches=3), {}, 1)
    with pytest.raises(CudaError, match="cudaGraphLaunch"):
        strategy.run(plan, 1, {"image": 0x2000}, [], [])


def test_graphs_are_keyed_by_policy_and_batch_not_by_input_address():
    from trt_exit.runtime.cuda_plan import plan_exits
    from trt_exit.runtime.cuda_strategies.graph import GraphStrategy

    strategy = GraphStrategy(_Chain(), ["image", "audio"], cache_size=4)
    plan = plan_exits(ThresholdPolicy([0.5]), 2)
    device = strategy.key(plan, 4, [])
    assert device == strategy.key(plan, 4, [])  # addresses play no part
    assert strategy.key(plan, 4, ["image"]) != device  # a numpy input: its own graph
    assert strategy.key(plan, 8, []) != device
    assert strategy.key(plan_exits(ThresholdPolicy([0.6]), 2), 4, []) != device


def test_a_device_inputs_copy_node_follows_the_callers_array():
    """The graph's copy node is re-pointed (cudaGraphExecMemcpyNodeSetParams1D, a real call
    that fails here without a driver) only when the address changed; a failed re-pointing
    drops the graph and polls."""
    from trt_exit.runtime.cuda_plan import plan_exits
    from trt_exit.runtime.cuda_strategies.graph import ChainGraph, GraphStrategy

    strategy = GraphStrategy(_Chain(), ["image"], cache_size=4)
    plan = plan_exits(ThresholdPolicy([0.5]), 2)
    key = strategy.key(plan, 2, [])
    graph = _null_graph(launches=5)
    graph.copy_sources[7] = 0x2000  # node 7 reads the caller's array at 0x2000 already
    chain_graph = ChainGraph(graph, {"image": 7}, 2)
    strategy.point_copies(chain_graph, {"image": 0x2000})  # unchanged: no driver call
    strategy.graphs[key] = chain_graph
    assert strategy.run(plan, 2, {"image": 0x3000}, [], []) is None
    assert "input copy could not be pointed" in strategy.failures[plan.key]
    assert "cudaGraphExecMemcpyNodeSetParams1D" in strategy.failures[plan.key]
    assert key not in strategy.graphs


def test_flat_and_conditional_graphs_copy_every_input_first():
    from trt_exit.runtime.cuda_plan import graph_ops, plan_exits

    plan = plan_exits(FixedExitPolicy(1), 3)
    ops = graph_ops(plan, ["image", "audio"])
    assert [op.kind for op in ops[:3]] == ["copy_input", "copy_input", "begin"]
    assert [op.name for op in ops[:2]] == ["image", "audio"]
    assert ops[-1].kind == "copy_results" and not any(op.opens_if for op in ops)


# --------------------------------------------------------------------------- 8. result views


def test_result_views_export_the_executors_stream():
    from trt_exit.runtime.cuda.memory import DeviceView, external_array

    view = DeviceView(0, (2, 10), np.dtype(np.float32), stream=0x5EED)
    interface = view.__cuda_array_interface__
    assert interface["version"] == 3 and interface["stream"] == 0x5EED
    # Another executor handed such a view orders itself after that stream.
    assert external_array("image", view, device=0).stream == 0x5EED
    assert DeviceView(0, (1,), np.dtype(np.int32)).__cuda_array_interface__["stream"] is None


def test_consumer_streams_are_taken_as_their_libraries_hand_them_out():
    import ctypes

    from trt_exit.runtime.cuda.stream import stream_handle

    assert stream_handle(0x1234) == 0x1234
    assert stream_handle(0) == 1  # the default stream is the legacy default stream
    assert stream_handle(SimpleNamespace(cuda_stream=0x42)) == 0x42     # torch.cuda.Stream
    assert stream_handle(SimpleNamespace(ptr=0x43)) == 0x43             # cupy.cuda.Stream
    assert stream_handle(SimpleNamespace(handle=ctypes.c_void_p(0x44))) == 0x44  # numba
    with pytest.raises(InputError, match="not a CUDA stream"):
        stream_handle("stream")
    with pytest.raises(InputError):
        stream_handle(True)


# --------------------------------------------------------------------------- 10. lazy loading


def test_gate_kernels_resolve_both_entry_points_when_created(monkeypatch):
    """Under CUDA_MODULE_LOADING=LAZY a kernel loads at cuModuleGetFunction: both must be
    resolved when GateKernels is made, not first inside a stream capture. NVRTC compiles the
    real source; only the module loader (which needs a GPU) is a stand-in."""
    from trt_exit.runtime import gate

    resolved = []

    class LoadedModule:
        def __init__(self, image, what):
            self.image = image

        def function(self, name):
            resolved.append(name)

        def close(self):
            pass

    monkeypatch.setattr(gate, "Module", LoadedModule)
    kernels = gate.GateKernels((9, 0), conditional=True)
    assert sorted(resolved) == sorted([gate.BEGIN_KERNEL, gate.GATE_KERNEL])
    assert kernels.target == "sm_90"


# --------------------------------------------------------------------------- 11. host waits


def test_sync_modes_and_their_defaults():
    from cuda.bindings import runtime

    from trt_exit.runtime.cuda.api import SYNC_MODES, default_sync_mode, sync_flag

    assert default_sync_mode(integrated=True)[0] == "spin"
    assert "assumed" in default_sync_mode(integrated=True)[1]
    assert default_sync_mode(integrated=False)[0] == "auto"
    assert [sync_flag(m) for m in SYNC_MODES] == [
        runtime.cudaDeviceScheduleAuto, runtime.cudaDeviceScheduleSpin,
        runtime.cudaDeviceScheduleYield, runtime.cudaDeviceScheduleBlockingSync]
    with pytest.raises(ConfigError, match="choose auto, spin, yield, blocking"):
        sync_flag("busy")


def test_setting_the_sync_mode_calls_the_runtime():
    from trt_exit.runtime.cuda.api import cuda_status, set_sync_mode

    if cuda_status().available:
        pytest.skip("a GPU is present: the GPU tests set it for real")
    with pytest.raises(CudaError, match=r"cudaSetDeviceFlags \(spin\) failed"):
        set_sync_mode("spin")


# --------------------------------------------------------------------------- 12. NVRTC


def test_jetpacks_own_nvrtc_is_found_on_a_jetson_only(tmp_path):
    from trt_exit.runtime.cuda.module import jetpack_nvrtc

    release = tmp_path / "nv_tegra_release"
    lib = tmp_path / "cuda" / "lib64"
    lib.mkdir(parents=True)
    for name in ("libnvrtc.so", "libnvrtc.so.12", "libnvrtc.so.12.6.68",
                 "libnvrtc-builtins.so.12.6"):
        (lib / name).write_bytes(b"")
    assert jetpack_nvrtc(release, [lib]) is None  # no /etc/nv_tegra_release: not a Jetson
    release.write_text("# R36 (release), REVISION: 4.3, GCID: 1, BOARD: generic, EABI: aarch64\n")
    assert jetpack_nvrtc(release, [tmp_path / "absent", lib]) == lib / "libnvrtc.so.12"
    assert jetpack_nvrtc(release, [tmp_path / "absent"]) is None


def test_a_gate_module_that_does_not_load_is_a_warning_with_the_versions(caplog):
    """NVRTC compiles the real gate for sm_90 (no GPU needed); loading it fails here (no
    driver), as a refused CUBIN would on a Jetson: the reason names every version involved."""
    from trt_exit.runtime.cuda.api import binding_version, cuda_status
    from trt_exit.runtime.cuda.module import nvrtc_version
    from trt_exit.runtime.gate import load_gate_kernels

    if cuda_status().available:
        pytest.skip("a GPU is present: the module would load")
    nvrtc = ".".join(map(str, nvrtc_version()))
    driver = nvrtc_version()[0] * 1000  # a driver of NVRTC's own major version
    with caplog.at_level(logging.WARNING), pytest.raises(CudaError) as raised:
        load_gate_kernels((9, 0), conditional=True, driver_version=driver)
    message = str(raised.value)
    assert f"NVRTC {nvrtc}" in message and "compiled sm_90" in message
    assert f"the driver supports CUDA {driver // 1000}.0" in message
    assert f"cuda-bindings {'.'.join(map(str, binding_version()))}" in message
    assert any("gate kernels do not load" in r.getMessage() and f"NVRTC {nvrtc}" in
               r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    # NVRTC of a newer major version than the driver: refused before anything is loaded.
    with pytest.raises(CudaError, match="writes kernels that a CUDA"):
        load_gate_kernels((8, 7), conditional=False, driver_version=(driver // 1000 - 1) * 1000
                          + 60)
