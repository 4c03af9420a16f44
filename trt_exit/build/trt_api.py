"""The TensorRT Python API as trt_exit uses it: one lazy import and the list of names used.

TensorRT's native libraries cannot be installed on this project's CI, so its Python API is
checked there by *inspection*: ``pytest -m trt_api`` installs the real TensorRT 10.3 and 11.4
Python bindings (``tensorrt-cu12-bindings`` / ``tensorrt-cu13-bindings``), loads them over a
stub of their ten native entry points, and checks that

* every name in :data:`USED_API` exists in both versions (methods with a compatible signature,
  properties settable where the code sets them, enum members);
* the modules in :data:`TENSORRT_MODULES` use no TensorRT name that is not declared here (their
  source is parsed: ``trt.X.Y`` chains, method calls, property reads and writes);
* no other module of trt_exit imports TensorRT.

So a misspelt name, a name TensorRT 11 removed (``BuilderFlag.FP16``,
``ICudaEngine.device_memory_size``) or a changed signature fails CI, not a user's Jetson. Code
that talks to TensorRT binds the module to the name ``trt`` (``trt = import_tensorrt(...)``),
and does not reuse TensorRT member names (``log``, ``code``, ``node_name``...) for other
objects' attributes: the check cannot tell the receiver's type, so a declared name always means
TensorRT's.
"""

from __future__ import annotations

from trt_exit.errors import require

#: How to get TensorRT, appended to every "TensorRT is missing" error.
TENSORRT_HINT = (
    "That works on x86 machines with an NVIDIA GPU. On a Jetson, TensorRT comes with JetPack "
    "instead (JetPack 6.1/6.2: TensorRT 10.3; JetPack 7.2.2+: TensorRT 11.4; sudo apt-get "
    "install nvidia-tensorrt python3-libnvinfer), installed for the system Python only: create "
    "the virtual environment with 'python3 -m venv --system-site-packages'. Without TensorRT the "
    "ONNX Runtime path still works everywhere (trt-exit eval / run --backend onnxruntime), and "
    "trt-exit precision writes and measures FP16 and INT8 graphs on any CPU"
)

#: Modules that call TensorRT (their source is checked against :data:`USED_API`).
TENSORRT_MODULES = (
    "trt_exit/build/steps.py",
    "trt_exit/build/builder.py",
    "trt_exit/runtime/backends/tensorrt_backend.py",
)

#: Every TensorRT name trt_exit uses, by owner (``tensorrt`` is the module itself; nested
#: owners are dotted). Names present in TensorRT 10.3 *and* 11.4 only. Constructors are checked
#: through their class (``trt.Builder(logger)``); methods our subclasses override (``ILogger.log``)
#: are listed under the TensorRT base class.
USED_API: dict[str, tuple[str, ...]] = {
    "tensorrt": (
        "__version__", "init_libnvinfer_plugins", "nptype",
        "ILogger", "Builder", "OnnxParser", "Runtime",
        "NetworkDefinitionCreationFlag", "BuilderFlag", "MemoryPoolType", "DeviceType",
        "ExecutionContextAllocationStrategy", "TensorIOMode", "ProfilingVerbosity",
        "LayerInformationFormat",
    ),
    "ILogger": ("__init__", "log", "Severity"),
    "ILogger.Severity": ("ERROR", "WARNING", "INFO", "VERBOSE"),
    "Builder": ("create_network", "create_builder_config",
                "create_optimization_profile", "build_serialized_network", "num_DLA_cores"),
    "INetworkDefinition": ("num_inputs", "get_input"),
    "ITensor": ("name",),
    "OnnxParser": ("parse_from_file", "num_errors", "get_error"),
    "ParserError": ("code", "desc", "node", "node_name", "node_operator"),
    "IBuilderConfig": ("set_memory_pool_limit", "set_flag", "add_optimization_profile",
                       "create_timing_cache", "set_timing_cache", "get_timing_cache",
                       "default_device_type", "DLA_core", "builder_optimization_level",
                       "profiling_verbosity"),
    "IOptimizationProfile": ("set_shape",),
    "ITimingCache": ("serialize",),
    "NetworkDefinitionCreationFlag": ("STRONGLY_TYPED",),
    "BuilderFlag": ("GPU_FALLBACK", "VERSION_COMPATIBLE"),
    "MemoryPoolType": ("WORKSPACE",),
    "DeviceType": ("DLA",),
    "Runtime": ("deserialize_cuda_engine", "engine_host_code_allowed"),
    "ICudaEngine": ("num_io_tensors", "get_tensor_name", "get_tensor_mode", "get_tensor_dtype",
                    "get_tensor_profile_shape", "create_execution_context",
                    "device_memory_size_v2", "create_engine_inspector"),
    "EngineInspector": ("get_engine_information",),
    "ProfilingVerbosity": ("DETAILED",),
    "LayerInformationFormat": ("JSON",),
    "IExecutionContext": ("set_device_memory", "set_input_shape", "set_tensor_address",
                          "execute_async_v3"),
    "ExecutionContextAllocationStrategy": ("USER_MANAGED",),
    "TensorIOMode": ("INPUT", "OUTPUT"),
}


def import_tensorrt(purpose: str):
    """The ``tensorrt`` module, or a :class:`~trt_exit.errors.MissingDependencyError` that says
    how to get it (JetPack on a Jetson) and that the ONNX Runtime path works without it.

    Args:
        purpose: What needs TensorRT, for the message (e.g. ``"trt-exit build"``).
    """
    return require("tensorrt", "tensorrt", purpose, TENSORRT_HINT)


def tensorrt_version() -> str | None:
    """The installed TensorRT version, or None (without raising) if it cannot be imported."""
    try:
        import tensorrt
    except ImportError:
        return None
    return str(tensorrt.__version__)
