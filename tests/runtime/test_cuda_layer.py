"""The CUDA layer without a GPU: status checks, error paths, and the 12.x/13.x binding shims.

These run against the cuda-python bindings installed with torch (13.x in CI). The calls that
need a driver are made for real: on a machine without one they must fail with the documented
error (a status code from the runtime, an exception from the driver loader), never a TypeError
from a wrong argument list.
"""

from __future__ import annotations

import inspect

import pytest

from trt_exit.errors import CudaError, CudaUnavailableError

cuda_bindings = pytest.importorskip("cuda.bindings", reason="cuda-python is not installed")

from cuda.bindings import driver, runtime  # noqa: E402

from trt_exit.runtime.cuda import compat  # noqa: E402
from trt_exit.runtime.cuda.api import binding_version, check, cuda_status, require_cuda  # noqa: E402

STATUS = cuda_status()
no_gpu_only = pytest.mark.skipif(STATUS.available, reason="a GPU is present: the no-GPU error "
                                                          "paths cannot be observed")


def test_check_returns_values_and_names_failures():
    assert check((runtime.cudaError_t.cudaSuccess,), "nothing") is None
    assert check((runtime.cudaError_t.cudaSuccess, 7), "one") == 7
    assert check((runtime.cudaError_t.cudaSuccess, 7, 8), "two") == (7, 8)
    with pytest.raises(CudaError, match=r"cudaMalloc\(64\) failed: cudaErrorMemoryAllocation"):
        check((runtime.cudaError_t.cudaErrorMemoryAllocation, None), "cudaMalloc(64)")
    with pytest.raises(CudaError, match="CUDA_ERROR_INVALID_VALUE"):
        check((driver.CUresult.CUDA_ERROR_INVALID_VALUE,), "cuSomething")


@no_gpu_only
def test_without_gpu_the_runtime_reports_an_error_code():
    status, _count = runtime.cudaGetDeviceCount()
    assert status != runtime.cudaError_t.cudaSuccess
    assert not STATUS.available
    assert "cudaGetDeviceCount" in STATUS.reason
    assert not STATUS.conditional_nodes


@no_gpu_only
def test_without_gpu_cuinit_raises_and_status_folds_it_in():
    with pytest.raises(RuntimeError):
        driver.cuInit(0)
    with pytest.raises(CudaUnavailableError, match="backend='onnxruntime'"):
        require_cuda()


@no_gpu_only
def test_without_gpu_allocations_fail_with_a_named_call():
    from trt_exit.runtime.cuda.memory import DeviceBuffer
    from trt_exit.runtime.cuda.stream import Stream

    with pytest.raises(CudaError, match=r"cudaMalloc\(16\) for probe failed"):
        DeviceBuffer(16, "probe")
    with pytest.raises(CudaError, match="cudaStreamCreateWithFlags"):
        Stream()


def test_capture_info_unpacks_both_binding_layouts():
    graph, deps = object(), ["node"]
    status = driver.CUstreamCaptureStatus.CU_STREAM_CAPTURE_STATUS_ACTIVE
    cuda12 = (status, 1, graph, deps, 1)                  # status, id, graph, deps, count
    cuda13 = (status, 1, graph, deps, ["edge"], 1)        # ... edge data before the count
    assert compat.unpack_capture_info(cuda12) == (status, graph, deps)
    assert compat.unpack_capture_info(cuda13) == (status, graph, deps)
    with pytest.raises(ValueError):
        compat.unpack_capture_info((status, 1, graph))


def test_edge_data_detection_matches_the_installed_bindings():
    major, _ = binding_version()
    # CUDA 13 merged the edge-data variants into the plain names; 12.x kept them in _v2.
    assert compat.takes_edge_data(driver.cuGraphAddNode) is (major >= 13)
    assert compat.takes_edge_data(driver.cuStreamUpdateCaptureDependencies) is (major >= 13)
    assert compat.takes_edge_data(runtime.cudaGraphAddNode) is (major >= 13)
    # Both majors take dependency data here.
    assert compat.takes_edge_data(driver.cuStreamBeginCaptureToGraph)
    if major < 13:
        assert compat.takes_edge_data(driver.cuGraphAddNode_v2)


def _signature_twin(names: list[str]):
    """A plain function with the given parameter names that returns its arguments."""
    namespace: dict = {}
    exec(f"def twin({', '.join(names)}): return ({', '.join(names)},)", namespace)  # noqa: S102
    return namespace["twin"]


# Parameter names of cuGraphAddNode as printed by inspect.signature on the real 12.9 and 13.x
# bindings (cuda-bindings 12.9.10 and 13.5.0).
CU_GRAPH_ADD_NODE_12 = ["hGraph", "dependencies", "numDependencies", "nodeParams"]
CU_GRAPH_ADD_NODE_13 = ["hGraph", "dependencies", "dependencyData", "numDependencies", "nodeParams"]


@pytest.mark.parametrize("names, expected", [
    (CU_GRAPH_ADD_NODE_12, ("g", ["a", "b"], 2, "p")),
    (CU_GRAPH_ADD_NODE_13, ("g", ["a", "b"], None, 2, "p")),
])
def test_edge_data_call_builds_each_major_versions_argument_list(names, expected):
    assert compat.edge_data_call(_signature_twin(names), ("g",), ["a", "b"], ("p",)) == expected


def test_installed_bindings_accept_the_argument_lists_we_build():
    """Calls into the real bindings: argument parsing happens before the driver is reached, so
    a wrong argument list is a TypeError on any machine; without a driver the call then fails
    loading libcuda (RuntimeError), with one it returns an error status (nothing is capturing)."""
    flags = driver.CUstreamUpdateCaptureDependencies_flags.CU_STREAM_SET_CAPTURE_DEPENDENCIES
    params = driver.CUgraphNodeParams()
    calls = [
        lambda: compat.edge_data_call(driver.cuStreamUpdateCaptureDependencies, (0,), [], (flags,)),
        lambda: compat.edge_data_call(driver.cuGraphAddNode, (driver.CUgraph(0),), [], (params,)),
        lambda: compat.edge_data_call(
            driver.cuStreamBeginCaptureToGraph, (0, driver.CUgraph(0)), [],
            (driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_RELAXED,)),
    ]
    for call in calls:
        try:
            result = call()
        except TypeError as exc:  # the argument list does not fit the installed signature
            pytest.fail(f"argument list rejected: {exc}")
        except RuntimeError:
            assert not STATUS.available
        else:
            assert result[0] != driver.CUresult.CUDA_SUCCESS


def test_every_binding_the_layer_calls_exists():
    """Names used by trt_exit.runtime.cuda, checked against the installed bindings."""
    used_driver = ["cuStreamGetCaptureInfo", "cuGraphAddNode", "cuStreamUpdateCaptureDependencies",
                   "cuStreamBeginCaptureToGraph", "cuStreamBeginCapture", "cuStreamEndCapture",
                   "cuGraphConditionalHandleCreate", "cuCtxGetCurrent", "cuGraphDestroy",
                   "cuModuleLoadData", "cuModuleGetFunction", "cuModuleUnload", "cuLaunchKernel",
                   "CU_GRAPH_COND_ASSIGN_DEFAULT", "CUgraphNodeParams", "cuInit",
                   "cuDriverGetVersion", "cuGetErrorString"]
    used_runtime = ["cudaMalloc", "cudaFree", "cudaHostAlloc", "cudaFreeHost",
                    "cudaHostGetDevicePointer", "cudaMemcpyAsync", "cudaMemsetAsync",
                    "cudaStreamCreateWithFlags", "cudaStreamDestroy", "cudaStreamSynchronize",
                    "cudaStreamWaitEvent", "cudaEventCreateWithFlags", "cudaEventRecord",
                    "cudaEventSynchronize", "cudaEventElapsedTime", "cudaEventDestroy",
                    "cudaGraphInstantiate", "cudaGraphUpload", "cudaGraphLaunch",
                    "cudaGraphExecDestroy", "cudaPointerGetAttributes", "cudaSetDevice",
                    "cudaGetDeviceProperties", "cudaGetDeviceCount", "cudaRuntimeGetVersion",
                    "cudaGetErrorString", "cudaHostAllocMapped", "cudaEventDisableTiming",
                    "cudaStreamNonBlocking"]
    missing = [n for n in used_driver if not hasattr(driver, n)]
    missing += [n for n in used_runtime if not hasattr(runtime, n)]
    assert not missing
    assert len(inspect.signature(driver.cuLaunchKernel).parameters) == 11
