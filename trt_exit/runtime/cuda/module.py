"""Run-time compilation (NVRTC -> PTX), module loading and kernel launch (driver API).

:func:`compile_ptx` needs no GPU (NVRTC is a plain library: ``nvidia-cuda-nvrtc``), so kernel
sources are checked in CPU-only CI. Loading (:class:`Module`) JIT-compiles the PTX for the
current GPU through the driver.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from typing import Any, Sequence

from trt_exit.errors import CudaError
from trt_exit.runtime.cuda.api import bindings, check


def nvrtc_version() -> tuple[int, int]:
    """``(major, minor)`` of the NVRTC library the bindings load.

    Raises:
        CudaError: NVRTC cannot be loaded (``pip install nvidia-cuda-nvrtc``, or the cu12
            package on JetPack 6).
    """
    _, _, nvrtc = bindings()
    try:
        return tuple(check(nvrtc.nvrtcVersion(), "nvrtcVersion"))  # type: ignore[return-value]
    except RuntimeError as exc:  # cuda-pathfinder: libnvrtc not found
        raise CudaError(
            f"NVRTC (the CUDA run-time compiler) cannot be loaded: {exc}. Install it with "
            f"pip install 'nvidia-cuda-nvrtc==13.*' (or 'nvidia-cuda-nvrtc-cu12' for CUDA 12 / "
            f"JetPack 6)") from exc


def supported_archs() -> list[int]:
    """Compute capabilities NVRTC can target, as ints (``[75, 80, ..., 120]``)."""
    _, _, nvrtc = bindings()
    nvrtc_version()
    count = check(nvrtc.nvrtcGetNumSupportedArchs(), "nvrtcGetNumSupportedArchs")
    return sorted(int(a) for a in check(nvrtc.nvrtcGetSupportedArchs(), "nvrtcGetSupportedArchs"))[:count]


def choose_arch(compute_capability: tuple[int, int]) -> int:
    """The newest NVRTC target not newer than the GPU (PTX JIT-compiles forward)."""
    wanted = compute_capability[0] * 10 + compute_capability[1]
    archs = [a for a in supported_archs() if a <= wanted]
    if not archs:
        raise CudaError(
            f"this NVRTC ({'.'.join(map(str, nvrtc_version()))}) cannot target compute "
            f"capability {wanted / 10:.1f}: install the nvidia-cuda-nvrtc that matches the "
            f"GPU's CUDA version (cu12 for older GPUs and JetPack 6)")
    return archs[-1]


@functools.lru_cache(maxsize=16)
def compile_ptx(source: str, name: str, arch: int, options: tuple[str, ...] = ()) -> bytes:
    """Compiles CUDA C++ ``source`` to PTX for ``compute_<arch>`` (no GPU needed).

    Args:
        source: Kernel source; entry points should be ``extern "C"`` to keep their names.
        name: Program name for messages (e.g. ``"gate.cu"``).
        arch: Target, e.g. 90 for ``compute_90``.
        options: Extra NVRTC options (e.g. ``("-DFLAG=1",)``).

    Returns:
        NUL-terminated PTX, ready for :class:`Module`.

    Raises:
        CudaError: NVRTC is missing, or the source does not compile (with the compiler log).
    """
    _, _, nvrtc = bindings()
    nvrtc_version()
    program = check(nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], []),
                    f"nvrtcCreateProgram({name})")
    try:
        flags = [f"--gpu-architecture=compute_{arch}", "--std=c++17", "-default-device",
                 *options]
        encoded = [f.encode() for f in flags]
        status = nvrtc.nvrtcCompileProgram(program, len(encoded), encoded)[0]
        if int(status) != 0:
            raise CudaError(f"NVRTC could not compile {name} for compute_{arch} "
                            f"({' '.join(flags)}):\n{_program_log(nvrtc, program)}")
        size = check(nvrtc.nvrtcGetPTXSize(program), "nvrtcGetPTXSize")
        # NVRTC writes into the buffer: it must be mutable (a bytes object is not, and a short
        # one may be an interned singleton shared by the whole process).
        ptx = bytearray(size)
        check(nvrtc.nvrtcGetPTX(program, ptx), "nvrtcGetPTX")
        return bytes(ptx)
    finally:
        nvrtc.nvrtcDestroyProgram(program)


def _program_log(nvrtc: Any, program: Any) -> str:
    size = check(nvrtc.nvrtcGetProgramLogSize(program), "nvrtcGetProgramLogSize")
    log = bytearray(size)
    check(nvrtc.nvrtcGetProgramLog(program, log), "nvrtcGetProgramLog")
    return bytes(log).rstrip(b"\0").decode(errors="replace")


def ptx_entries(ptx: bytes | str) -> list[str]:
    """Names of the ``.entry`` kernels in PTX text."""
    text = ptx.decode(errors="replace") if isinstance(ptx, bytes) else ptx
    names = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] in (".visible", ".weak") and parts[1] == ".entry":
            names.append(parts[2].split("(")[0])
    return names


# Kernel argument types: how a Python value becomes the bytes the kernel parameter holds.
POINTER = ctypes.c_uint64
INT32 = ctypes.c_int32
UINT32 = ctypes.c_uint32
INT64 = ctypes.c_int64
UINT64 = ctypes.c_uint64
FLOAT32 = ctypes.c_float


@dataclass
class KernelArgs:
    """Packed kernel arguments: keeps the values alive while the launch reads them."""

    values: list
    pointers: Any

    @property
    def address(self) -> int:
        """``void**`` for ``cuLaunchKernel``'s ``kernelParams``."""
        return ctypes.addressof(self.pointers)


def pack_args(args: Sequence[tuple[Any, type]]) -> KernelArgs:
    """Packs ``(value, ctypes type)`` pairs into a ``void*[]`` of pointers to the values."""
    values = [kind(value) for value, kind in args]
    pointers = (ctypes.c_void_p * max(len(values), 1))(
        *[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values])
    return KernelArgs(values, pointers)


class Module:
    """A loaded PTX module (``cuModuleLoadData``) and its kernels, on the current context.

    Raises:
        CudaError: The driver cannot JIT the PTX (e.g. PTX from a newer NVRTC than the driver:
            install the NVRTC matching the driver's CUDA version).
    """

    def __init__(self, ptx: bytes, what: str = "module"):
        driver, _, _ = bindings()
        self.what = what
        self._ptx = ptx if ptx.endswith(b"\0") else ptx + b"\0"
        self._module = check(driver.cuModuleLoadData(self._ptx),
                             f"cuModuleLoadData ({what}: the driver could not JIT its PTX; the "
                             f"NVRTC that wrote it must not be newer than the driver)")
        self._functions: dict[str, Any] = {}

    def function(self, name: str) -> Any:
        """The ``CUfunction`` of kernel ``name``."""
        if name not in self._functions:
            driver, _, _ = bindings()
            self._functions[name] = check(driver.cuModuleGetFunction(self._module, name.encode()),
                                          f"cuModuleGetFunction({name})")
        return self._functions[name]

    def launch(self, name: str, stream: int, grid: int, block: int,
               args: Sequence[tuple[Any, type]], shared_bytes: int = 0) -> None:
        """Launches kernel ``name`` on ``stream`` with a 1-D grid and block (captured as a
        kernel node when the stream is capturing)."""
        driver, _, _ = bindings()
        packed = pack_args(args)
        check(driver.cuLaunchKernel(self.function(name), grid, 1, 1, block, 1, 1, shared_bytes,
                                    stream, packed.address, 0), f"cuLaunchKernel({name})")

    def close(self) -> None:
        if self._module is not None:
            driver, _, _ = bindings()
            module, self._module = self._module, None
            self._functions.clear()
            check(driver.cuModuleUnload(module), f"cuModuleUnload ({self.what})")

    def __enter__(self) -> "Module":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
