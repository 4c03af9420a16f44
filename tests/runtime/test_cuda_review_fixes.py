"""The review fixes of the GPU path, where their logic runs without a GPU: device inputs'
producer streams, the driver vs. bindings/NVRTC major versions and the strategy fallback, the
gate's explicit set-condition flag, capture-time failures, the executor's own context, one
TensorRT execution context per batch size, and the chain every strategy walks (how many IF
nodes a graph holds). On a GPU, tests/runtime/test_cuda_executor.py checks them end to end."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from trt_exit.errors import CudaError, InputError
from trt_exit.manifest import TensorSpec
from trt_exit.runtime.policies import FixedExitPolicy, ThresholdPolicy

pytest.importorskip("cuda.bindings", reason="cuda-python is not installed")

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- 1. device inputs


class _Interface:
    """A device array as a third-party producer exports it (pycuda, CuPy, Numba)."""

    def __init__(self, **extra):
        self.__cuda_array_interface__ = {"shape": (2, 3), "typestr": "<f4",
                                         "data": (0, False), **extra}


@pytest.mark.parametrize("extra, expected", [
    ({"version": 2}, 1),                      # v2 has no stream: the legacy default stream
    ({"version": 3}, None),                   # v3 without the key: no synchronization needed
    ({"version": 3, "stream": None}, None),   # v3, explicitly none
    ({"version": 3, "stream": 1}, 1),         # legacy default stream
    ({"version": 3, "stream": 2}, 2),         # per-thread default stream
    ({"version": 3, "stream": 0x5EED}, 0x5EED),
])
def test_device_inputs_name_the_stream_to_order_after(extra, expected):
    from trt_exit.runtime.cuda.memory import external_array

    value = _Interface(**extra)
    # A zero address is not looked up (no driver needed); the stream rule is the same.
    assert external_array("image", value, device=0).stream == expected


def test_torch_tensors_are_ordered_after_torchs_current_stream():
    import torch

    from trt_exit.runtime.cuda.memory import producer_stream

    # torch exports interface version 2 (no stream key) and writes on its current stream; on
    # the CPU there is no CUDA tensor, so check what torch exports and the rule's source.
    if torch.cuda.is_available():
        tensor = torch.zeros(2, device="cuda")
        expected = torch.cuda.current_stream().cuda_stream or 1
        assert producer_stream(tensor, tensor.__cuda_array_interface__) == expected
    else:
        source = (REPO / "trt_exit/runtime/cuda/memory.py").read_text()
        assert "torch.cuda.current_stream(value.device).cuda_stream" in source


# --------------------------------------------------------------------------- 3. versions


def _extras() -> dict:
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "extras_require":
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no extras_require")


@pytest.mark.parametrize("driver, bindings, nvrtc, problem", [
    (12060, 13, None, "cuda-bindings 13.x needs a CUDA 13 driver"),   # JetPack 6 + pip's 13.x
    (12080, 12, 13, "NVRTC 13.x writes kernels"),                     # R570 server, NVRTC 13
    (12060, 12, 12, ""),                                              # JetPack 6 with cu12
    (13000, 13, 13, ""),
    (13020, 12, 12, ""),                                              # older packages: fine
])
def test_driver_and_package_major_versions(driver, bindings, nvrtc, problem):
    from trt_exit.runtime.cuda.api import version_mismatch

    message = version_mismatch(driver, bindings, nvrtc)
    assert (message == "") is (problem == "")
    if problem:
        assert problem in message
        assert "pip install 'trt-exit[cuda12]'" in message  # the one command that fixes it


def test_the_install_commands_name_extras_that_exist():
    from trt_exit.runtime.cuda.api import CUDA_EXTRAS

    extras = _extras()
    for major, command in CUDA_EXTRAS.items():
        name = command.split("[")[1].split("]")[0]
        pins = " ".join(extras[name])
        assert f"cuda-bindings[all]>={major}" in pins
        assert f"<{major + 1}" in pins
    assert extras["cuda"] == extras["cuda13"]  # plain .[cuda]: the newest drivers


@pytest.mark.parametrize("requested, graph, poll, expected", [
    ("auto", "", "", ("graph", "")),
    ("auto", "old driver", "", ("poll", "old driver")),
    # Graph's and poll's gate kernels fail alike (NVRTC newer than the driver): not poll.
    ("auto", "no kernel", "no kernel", ("eager", "no kernel")),
    ("graph", "old driver", "no kernel", ("eager", "old driver; no kernel")),
    ("poll", "", "no kernel", ("eager", "no kernel")),
    ("poll", "ignored", "", ("poll", "")),
    ("eager", "x", "y", ("eager", "")),
])
def test_fallback_only_to_a_strategy_that_works(requested, graph, poll, expected):
    from trt_exit.runtime.cuda_executor import choose_strategy

    assert choose_strategy(requested, graph, poll) == expected


# --------------------------------------------------------------------------- 6. the gate


def test_the_gate_sets_the_condition_by_an_explicit_flag():
    from trt_exit.runtime.gate import GATE_SOURCE, GateParams, gate_arguments

    addresses = dict(confidence=1, output=2, exit_index=3, result_confidence=4,
                     result_output=5, start_ns=6, batch=1, num_outputs=10)
    with_zero_handle = gate_arguments(GateParams(0), handle=0, **addresses)
    without = gate_arguments(GateParams(0), handle=None, **addresses)
    # Parameters 6 and 7: the handle, then whether to set it. A handle of value 0 is a handle.
    assert with_zero_handle[6:8] == [0, 1]
    assert without[6:8] == [0, 0]
    assert "if (set_condition) cudaGraphSetConditional" in GATE_SOURCE
    assert "handle != 0" not in GATE_SOURCE


# --------------------------------------------------------------------------- 10. capture failures


def test_a_failing_end_of_capture_is_a_capture_error():
    from trt_exit.runtime.cuda.graph import CaptureError, GraphCapture

    capture = GraphCapture(0, what="probe")
    capture._open.append(0)  # as after cuStreamBeginCapture
    # Stream 0 is not capturing (with a driver: an error status; without: no libcuda).
    with pytest.raises(CaptureError, match="ending the capture of probe failed"):
        capture.__exit__(None, None, None)
    assert capture._open == []  # every open capture was ended


def test_a_failing_upload_is_a_capture_error():
    from cuda.bindings import runtime

    from trt_exit.runtime.cuda.graph import CaptureError, GraphExec

    graph = GraphExec.__new__(GraphExec)  # a null graph: the upload fails
    graph.what, graph._exec = "probe", runtime.cudaGraphExec_t()
    with pytest.raises(CaptureError, match="uploading probe failed"):
        graph.upload(0)


# --------------------------------------------------------------------------- 11. own context


def test_conditional_handles_and_if_nodes_use_the_executors_context():
    from trt_exit.runtime.cuda.graph import GraphCapture

    context = object()
    assert GraphCapture(0, context=context)._context() is context
    executor = (REPO / "trt_exit/runtime/cuda_executor.py").read_text()
    graph = (REPO / "trt_exit/runtime/cuda_strategies/graph.py").read_text()
    assert executor.count("context=self.device_info.context") >= 2  # full model, profile
    assert "context=chain.device_info.context" in graph  # the exit chain
    assert "make_current(self.device)" in executor


# --------------------------------------------------------------------------- 2. TensorRT contexts


class _Context:
    """Stands in for a TensorRT execution context: records what is set on it."""

    def __init__(self):
        self.shapes: dict[str, tuple] = {}
        self.memory = None

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def set_device_memory(self, address, size):
        self.memory = (address, size)


def test_each_batch_size_gets_its_own_tensorrt_context_sharing_one_scratch_block():
    from trt_exit.runtime.backends.tensorrt_backend import ExecutionContexts

    made = []

    def create():
        made.append(_Context())
        return made[-1]

    contexts = ExecutionContexts(create, [TensorSpec("image", [-1, 1, 8, 8])], "segment_0",
                                 lambda: "")
    one = contexts.for_batch(1)
    contexts.set_scratch(0x1000, 4096)
    eight = contexts.for_batch(8)
    assert one is not eight and contexts.for_batch(1) is one and len(contexts) == 2
    # Capturing at batch 8 leaves the context a batch-1 graph replays on untouched.
    assert one.shapes == {"image": (1, 1, 8, 8)} and eight.shapes == {"image": (8, 1, 8, 8)}
    assert one.memory == eight.memory == (0x1000, 4096)
    contexts.set_scratch(0x2000, 8192)
    assert one.memory == eight.memory == (0x2000, 8192)


def test_a_context_tensorrt_cannot_make_or_shape_is_a_clear_error():
    from trt_exit.runtime.backends.tensorrt_backend import ExecutionContexts

    spec = [TensorSpec("image", [-1, 1, 8, 8])]
    with pytest.raises(CudaError, match="could not create an execution context \\(out of"):
        ExecutionContexts(lambda: None, spec, "exit_0", lambda: "out of memory").for_batch(1)

    class Refusing(_Context):
        def set_input_shape(self, name, shape):
            return False

    with pytest.raises(InputError, match="rejected input shape"):
        ExecutionContexts(Refusing, spec, "exit_0", lambda: "").for_batch(2)


# --------------------------------------------------------------------------- the chain


@pytest.mark.parametrize("policy, num_exits, steps, ifs", [
    (ThresholdPolicy([0.5, 0.5, 0.5]), 4,
     "s0 e0 G s1 e1 G s2 e2 G s3 e3 g", 3),
    (ThresholdPolicy([None, 0.5]), 3, "s0 s1 e1 G s2 e2 g", 1),
    (FixedExitPolicy(1), 4, "s0 s1 e1 g", 0),
])
def test_every_strategy_walks_one_chain(policy, num_exits, steps, ifs):
    from trt_exit.runtime.cuda_executor import chain_steps, conditional_nodes, plan_exits

    plan = plan_exits(policy, num_exits)
    described = []
    for step in chain_steps(plan):
        if step.stage:
            kind, index = step.stage.split("_")
            described.append(f"{kind[0]}{index}")
        else:
            described.append("G" if step.branches else "g")
    assert " ".join(described) == steps
    assert conditional_nodes(plan) == ifs
