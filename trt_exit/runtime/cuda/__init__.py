"""A small CUDA layer on NVIDIA's cuda-python (``cuda.bindings``), for the CUDA executor.

* :mod:`.api`: lazy import, one status check for every call (:func:`check`), device discovery.
* :mod:`.compat`: calls whose signatures differ between the CUDA 12.x and 13.x bindings.
* :mod:`.memory`: device, pinned and mapped-pinned buffers; ``__cuda_array_interface__`` views.
* :mod:`.stream`: streams and events.
* :mod:`.module`: NVRTC -> PTX (no GPU needed), module loading, kernel launch.
* :mod:`.graph`: stream capture, conditional IF nodes, instantiated graphs.

Every resource is an owner with ``close()`` and a context manager. Importing this package does
not import cuda-python; the first call does (``pip install 'trt-exit[cuda13]'`` on a CUDA 13
driver, ``'trt-exit[cuda12]'`` on a CUDA 12 driver; :func:`api.version_mismatch` says which).
"""

from trt_exit.runtime.cuda.api import (
    CONDITIONAL_NODES_DRIVER,
    CudaStatus,
    DeviceInfo,
    bindings,
    check,
    cuda_status,
    require_cuda,
    use_device,
)

__all__ = [
    "CONDITIONAL_NODES_DRIVER",
    "CudaStatus",
    "DeviceInfo",
    "bindings",
    "check",
    "cuda_status",
    "require_cuda",
    "use_device",
]
