"""cuda-python (``cuda.bindings``) imported lazily, one status check for every call, and device
discovery.

Every binding call returns ``(status, *values)``; :func:`check` turns a failed status into a
:class:`~trt_exit.errors.CudaError` naming the call and the error, and returns the values. The
bindings are an optional dependency (``pip install 'trt-exit[cuda]'``; torch's CUDA wheels pull
them in too), so nothing here is imported before it is used.

Without a GPU the runtime reports an error code (``cudaGetDeviceCount`` ->
``cudaErrorInsufficientDriver`` / ``cudaErrorNoDevice``) while ``cuInit`` *raises*
(cuda-pathfinder cannot find ``libcuda``): :func:`cuda_status` folds both into one answer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from trt_exit.errors import CudaError, CudaUnavailableError, require

#: Oldest driver with conditional graph nodes (IF / WHILE): CUDA 12.4 (JetPack 6.1).
CONDITIONAL_NODES_DRIVER = 12040
_PURPOSE = "The CUDA executor"
_HINT = ("torch's CUDA wheels install it too; on a CUDA 12 driver (JetPack 6, R550-R575 "
         "servers) install 'trt-exit[cuda12]', on a CUDA 13 driver (R580+) 'trt-exit[cuda13]'")
#: The one-command install of the CUDA layer for each driver major version (setup.py extras).
CUDA_EXTRAS = {12: "pip install 'trt-exit[cuda12]'", 13: "pip install 'trt-exit[cuda13]'"}


def install_for_driver(driver_version: int) -> str:
    """The command that installs cuda-bindings and NVRTC of the driver's CUDA major version."""
    major = driver_version // 1000
    return CUDA_EXTRAS.get(major, f"pip install 'cuda-bindings[all]=={major}.*'")


def version_mismatch(driver_version: int, bindings_major: int,
                     nvrtc_major: int | None = None) -> str:
    """Why the installed CUDA Python packages cannot work with this driver ("" if they can).

    A driver runs code built for its own CUDA major version or older: cuda-bindings 13 (its
    runtime) and NVRTC 13 (its CUBIN and PTX) need a CUDA 13 driver (R580+); JetPack 6 (CUDA
    12.6) and servers on R550-R575 need the 12.x packages. Older packages on a newer driver are
    fine.

    Args:
        driver_version: What ``cuDriverGetVersion`` reports (e.g. 12060); 0 if unknown.
        bindings_major: Major version of ``cuda.bindings``.
        nvrtc_major: Major version of the NVRTC library, None if not checked.
    """
    if driver_version <= 0:
        return ""
    driver_major = driver_version // 1000
    install = install_for_driver(driver_version)
    if bindings_major > driver_major:
        return (f"cuda-bindings {bindings_major}.x needs a CUDA {bindings_major} driver, but this "
                f"driver supports CUDA {format_version(driver_version)}: install the CUDA "
                f"{driver_major} packages ({install}, which pins cuda-bindings<{driver_major + 1}"
                f"), or update the NVIDIA driver")
    if nvrtc_major is not None and nvrtc_major > driver_major:
        return (f"NVRTC {nvrtc_major}.x writes kernels that a CUDA "
                f"{format_version(driver_version)} driver cannot load: install the CUDA "
                f"{driver_major} NVRTC ({install}), or update the NVIDIA driver")
    return ""


def driver_version_or_zero() -> int:
    """``cuDriverGetVersion`` without ``cuInit`` (0 when there is no driver library)."""
    driver, _, _ = bindings()
    try:
        status, version = driver.cuDriverGetVersion()
    except RuntimeError:  # cuda-pathfinder found no libcuda
        return 0
    return int(version) if _is_success(status) else 0


@functools.lru_cache(maxsize=None)
def bindings() -> tuple[Any, Any, Any]:
    """``(driver, runtime, nvrtc)`` modules of ``cuda.bindings``.

    Raises:
        MissingDependencyError: cuda-python is not installed.
    """
    require("cuda.bindings", "cuda", _PURPOSE, _HINT)
    from cuda.bindings import driver, nvrtc, runtime

    return driver, runtime, nvrtc


def binding_version() -> tuple[int, int]:
    """Major and minor version of the installed ``cuda.bindings`` (e.g. ``(13, 0)``)."""
    require("cuda.bindings", "cuda", _PURPOSE, _HINT)
    import cuda.bindings

    major, minor = (int(p) for p in cuda.bindings.__version__.split(".")[:2])
    return major, minor


def _is_success(status: Any) -> bool:
    # cudaSuccess, CUDA_SUCCESS and NVRTC_SUCCESS are all the value 0 of their enums.
    return int(status) == 0


def error_text(status: Any) -> str:
    """``name (description)`` of a runtime, driver or NVRTC status, as far as it can be told."""
    driver, runtime, nvrtc = bindings()
    name = getattr(status, "name", str(status))
    try:
        if isinstance(status, runtime.cudaError_t):
            described = runtime.cudaGetErrorString(status)[1]
        elif isinstance(status, nvrtc.nvrtcResult):
            described = nvrtc.nvrtcGetErrorString(status)[1]
        else:
            described = driver.cuGetErrorString(status)[1]
    except RuntimeError:  # the driver library itself is missing: the name is all there is
        described = None
    if isinstance(described, bytes):
        described = described.decode(errors="replace")
    return f"{name} ({described})" if described and described != name else name


def check(result: Any, call: str) -> Any:
    """Checks the status of a binding call and returns its values.

    Args:
        result: What the binding returned: ``(status, *values)``.
        call: What was called, for the message (e.g. ``"cudaMalloc(4096)"``).

    Returns:
        None for no values, the value for one, else the tuple of values.

    Raises:
        CudaError: The status is not success; the message names ``call`` and the error.
    """
    status, *values = result if isinstance(result, tuple) else (result,)
    if not _is_success(status):
        raise CudaError(f"{call} failed: {error_text(status)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


@dataclass(frozen=True)
class CudaStatus:
    """Whether CUDA can be used here, and why not.

    Attributes:
        available: A GPU and a working driver were found.
        reason: Why not (empty when available).
        device_count: GPUs visible to the runtime.
        driver_version: CUDA version the driver supports (e.g. 12060), 0 if unknown.
        runtime_version: CUDA version of the runtime in the bindings, 0 if unknown.
    """

    available: bool
    reason: str
    device_count: int = 0
    driver_version: int = 0
    runtime_version: int = 0

    @property
    def conditional_nodes(self) -> bool:
        """Whether the driver supports conditional graph nodes (CUDA 12.4+)."""
        return self.available and self.driver_version >= CONDITIONAL_NODES_DRIVER


def cuda_status() -> CudaStatus:
    """Probes the bindings, the driver and the devices without raising."""
    try:
        driver, runtime, _ = bindings()
    except ImportError as exc:
        return CudaStatus(False, str(exc))
    runtime_version = runtime.cudaRuntimeGetVersion()
    runtime_version = runtime_version[1] if _is_success(runtime_version[0]) else 0
    mismatch = version_mismatch(driver_version_or_zero(), binding_version()[0])
    if mismatch:
        return CudaStatus(False, mismatch, runtime_version=runtime_version)
    status, count = runtime.cudaGetDeviceCount()
    if not _is_success(status):
        return CudaStatus(False, f"no usable NVIDIA GPU: cudaGetDeviceCount returned "
                                 f"{error_text(status)}", runtime_version=runtime_version)
    if count < 1:
        return CudaStatus(False, "no NVIDIA GPU is visible (check CUDA_VISIBLE_DEVICES)",
                          runtime_version=runtime_version)
    try:
        check(driver.cuInit(0), "cuInit(0)")
        version = check(driver.cuDriverGetVersion(), "cuDriverGetVersion()")
    except (CudaError, RuntimeError) as exc:  # RuntimeError: cuda-pathfinder found no libcuda
        return CudaStatus(False, f"the NVIDIA driver cannot be used: {exc}", count,
                          runtime_version=runtime_version)
    return CudaStatus(True, "", count, int(version), runtime_version)


def require_cuda() -> CudaStatus:
    """:func:`cuda_status`, raising if CUDA is not usable.

    Raises:
        CudaUnavailableError: With the reason and what to use instead.
    """
    status = cuda_status()
    if not status.available:
        raise CudaUnavailableError(
            f"{status.reason}. The CUDA executor needs an NVIDIA GPU; on this machine use the "
            f"host executor: Executor(manifest, backend='onnxruntime') (or backend='torch' with "
            f"backend_options={{'device': 'cpu'}})"
        )
    return status


#: How a host thread waits for the GPU (``cudaDeviceSchedule*``), by name.
SYNC_MODES = ("auto", "spin", "yield", "blocking")
#: The default per platform, and on what it rests (see :func:`default_sync_mode`).
SYNC_MODE_DEFAULTS = {
    "integrated": ("spin", "assumed, not measured here: on Jetson the driver's auto mode may "
                           "pick blocking sync on low-power profiles (CUDA docs), which cost "
                           "~15 % latency (llama.cpp#16585, autoware_universe#10523)"),
    "discrete": ("auto", "the driver's heuristic (spins while the process has no more CUDA "
                         "contexts than CPU cores); benchmarks/executor.py measures every mode"),
}


def default_sync_mode(integrated: bool) -> tuple[str, str]:
    """The host-wait mode the executor uses unless told otherwise, and why.

    Args:
        integrated: The GPU shares memory with the CPU (Jetson; ``cudaDeviceProp.integrated``).

    Returns:
        ``(mode, basis)``: ``spin`` on integrated GPUs, ``auto`` (the driver's heuristic) on
        discrete ones; ``basis`` says whether that was measured or assumed.
    """
    return SYNC_MODE_DEFAULTS["integrated" if integrated else "discrete"]


def sync_flag(mode: str) -> int:
    """The ``cudaDeviceSchedule*`` flag of a mode name (:data:`SYNC_MODES`).

    Raises:
        ConfigError: An unknown mode.
    """
    from trt_exit.errors import ConfigError

    if mode not in SYNC_MODES:
        raise ConfigError(f"unknown sync mode {mode!r}; choose {', '.join(SYNC_MODES)}")
    _, runtime, _ = bindings()
    return {"auto": runtime.cudaDeviceScheduleAuto, "spin": runtime.cudaDeviceScheduleSpin,
            "yield": runtime.cudaDeviceScheduleYield,
            "blocking": runtime.cudaDeviceScheduleBlockingSync}[mode]


def set_sync_mode(mode: str) -> str:
    """Sets how host threads wait for the current GPU (its primary context: PyTorch and every
    other user of the context in this process wait the same way) and reads it back.

    ``cudaSetDeviceFlags`` on a device whose primary context exists overwrites its flags (as
    the CUDA 12.9 and 13.x runtimes document it; much older runtimes refused with
    ``cudaErrorSetOnActiveProcess``, which surfaces here as a :class:`CudaError`); only the
    scheduling bits are passed (mapped pinned memory is implicit for the runtime).

    Returns:
        The mode now in effect, as read back with ``cudaGetDeviceFlags``.

    Raises:
        ConfigError: An unknown mode.
        CudaError: The driver refused.
    """
    _, runtime, _ = bindings()
    check(runtime.cudaSetDeviceFlags(sync_flag(mode)), f"cudaSetDeviceFlags ({mode})")
    return current_sync_mode()


def current_sync_mode() -> str:
    """How host threads wait for the current GPU now (:data:`SYNC_MODES`)."""
    _, runtime, _ = bindings()
    flags = int(check(runtime.cudaGetDeviceFlags(), "cudaGetDeviceFlags"))
    schedule = flags & int(runtime.cudaDeviceScheduleMask)
    names = {int(sync_flag(m)): m for m in SYNC_MODES}
    return names.get(schedule, f"flags {schedule:#x}")


@dataclass(frozen=True)
class DeviceInfo:
    """The GPU an executor runs on.

    Attributes:
        index: CUDA device ordinal.
        name: Marketing name (e.g. ``NVIDIA H100 80GB HBM3``).
        compute_capability: ``(major, minor)``.
        driver_version: CUDA version the driver supports (e.g. 12060).
        runtime_version: CUDA version of the bindings' runtime.
        total_memory_bytes: Global memory.
        integrated: The GPU shares memory with the CPU (a Jetson).
        context: Its primary context (``CUcontext``): where the executor creates conditional
            handles and IF nodes, whatever is current when it does.
    """

    index: int
    name: str
    compute_capability: tuple[int, int]
    driver_version: int
    runtime_version: int
    total_memory_bytes: int
    integrated: bool = False
    context: Any = field(default=None, compare=False, repr=False)

    @property
    def conditional_nodes(self) -> bool:
        return self.driver_version >= CONDITIONAL_NODES_DRIVER

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name,
                "compute_capability": ".".join(map(str, self.compute_capability)),
                "driver_cuda_version": format_version(self.driver_version),
                "runtime_cuda_version": format_version(self.runtime_version),
                "total_memory_bytes": self.total_memory_bytes, "integrated": self.integrated}


def format_version(version: int) -> str:
    """12060 -> ``"12.6"``."""
    return f"{version // 1000}.{(version % 1000) // 10}"


def use_device(index: int = 0) -> DeviceInfo:
    """Makes GPU ``index`` current on this thread (retaining its primary context, the one
    PyTorch and TensorRT use too) and describes it.

    Raises:
        CudaUnavailableError: No GPU, or no GPU ``index``.
    """
    status = require_cuda()
    if not 0 <= index < status.device_count:
        raise CudaUnavailableError(
            f"GPU {index} does not exist: {status.device_count} visible (indices 0.."
            f"{status.device_count - 1})")
    _, runtime, _ = bindings()
    check(runtime.cudaSetDevice(index), f"cudaSetDevice({index})")
    check(runtime.cudaFree(0), "cudaFree(0) (creating the primary context)")
    driver, _, _ = bindings()
    context = check(driver.cuCtxGetCurrent(), "cuCtxGetCurrent")
    props = check(runtime.cudaGetDeviceProperties(index), f"cudaGetDeviceProperties({index})")
    name = props.name
    name = name.split(b"\0")[0].decode() if isinstance(name, bytes) else str(name)
    return DeviceInfo(index, name, (int(props.major), int(props.minor)), status.driver_version,
                      status.runtime_version, int(props.totalGlobalMem), bool(props.integrated),
                      context)


def make_current(index: int) -> None:
    """Makes GPU ``index`` (its primary context) current on this thread if it is not: other code
    on the thread (PyTorch on another GPU) may have changed it since :func:`use_device`."""
    _, runtime, _ = bindings()
    if check(runtime.cudaGetDevice(), "cudaGetDevice") != index:
        check(runtime.cudaSetDevice(index), f"cudaSetDevice({index})")
