"""Run-time compilation (NVRTC -> CUBIN or PTX), module loading and kernel launch (driver API).

Compiling needs no GPU (NVRTC is a plain library: ``nvidia-cuda-nvrtc``), so kernel sources are
checked in CPU-only CI. :func:`compile_for_device` picks the image a GPU loads best: a CUBIN for
its own architecture when this NVRTC knows it (no JIT at load time, and CUDA's minor version
compatibility lets an NVRTC newer than the driver within one major version produce it: NVRTC
12.9 for JetPack 6's CUDA 12.6 driver), else PTX for the newest older target, which the driver
JIT-compiles (and which it refuses when NVRTC is newer than the driver).

On a Jetson, JetPack's own NVRTC (``/usr/local/cuda``) is preferred over a pip wheel's
(:func:`prefer_jetpack_nvrtc`): it matches the driver exactly, whereas a CUBIN from pip's newer
NVRTC 12.9 on JetPack 6's CUDA 12.6 driver relies on minor version compatibility, which NVIDIA
does not confirm for Tegra.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from trt_exit.errors import CudaError
from trt_exit.profiling.jetson import TEGRA_RELEASE, is_jetson
from trt_exit.runtime.cuda.api import bindings, check

#: Where JetPack (L4T) installs the CUDA toolkit's libraries, NVRTC among them.
JETPACK_CUDA_LIBS = ("/usr/local/cuda/lib64", "/usr/local/cuda/targets/aarch64-linux/lib")


def jetpack_nvrtc(release_file: str | os.PathLike = TEGRA_RELEASE,
                  folders: Sequence[str | os.PathLike] = JETPACK_CUDA_LIBS) -> Path | None:
    """JetPack's own ``libnvrtc.so.<major>`` on a Jetson; None elsewhere or where it is absent
    (a JetPack without the CUDA toolkit)."""
    if not is_jetson(release_file):
        return None
    for folder in folders:
        libraries = sorted(Path(folder).glob("libnvrtc.so.*"))
        for library in libraries:
            if re.fullmatch(r"libnvrtc\.so\.\d+", library.name):
                return library
    return None


@functools.lru_cache(maxsize=1)
def prefer_jetpack_nvrtc() -> str | None:
    """Loads JetPack's NVRTC (:func:`jetpack_nvrtc`) before cuda-bindings looks for one, so that
    it is the NVRTC the gate kernels are compiled with; returns its path (None: not a Jetson,
    or no JetPack NVRTC, or it did not load).

    cuda-bindings finds its libraries with cuda-pathfinder, which takes a library already
    loaded in the process over a pip wheel's; call this before the first NVRTC call.
    """
    library = jetpack_nvrtc()
    if library is None:
        return None
    try:
        ctypes.CDLL(str(library), mode=os.RTLD_GLOBAL)
    except OSError:
        return None
    return str(library)


def nvrtc_library() -> str | None:
    """Path of the NVRTC library cuda-bindings uses (None if cuda-pathfinder cannot tell)."""
    prefer_jetpack_nvrtc()
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib
    except ImportError:  # cuda-bindings older than 12.9: no cuda-pathfinder
        return None
    try:
        return load_nvidia_dynamic_lib("nvrtc").abs_path
    except Exception:  # noqa: BLE001 - pathfinder's not-found errors vary by version
        return None


def nvrtc_version() -> tuple[int, int]:
    """``(major, minor)`` of the NVRTC library the bindings load (JetPack's own on a Jetson
    where it is installed, :func:`prefer_jetpack_nvrtc`).

    Raises:
        CudaError: NVRTC cannot be loaded (``pip install nvidia-cuda-nvrtc``, or the cu12
            package on JetPack 6).
    """
    prefer_jetpack_nvrtc()
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
    return _compile(source, name, f"compute_{arch}", options)


@functools.lru_cache(maxsize=16)
def compile_cubin(source: str, name: str, arch: int, options: tuple[str, ...] = ()) -> bytes:
    """Compiles CUDA C++ ``source`` to a CUBIN (machine code) for ``sm_<arch>`` (no GPU needed);
    arguments and errors as :func:`compile_ptx`."""
    return _compile(source, name, f"sm_{arch}", options)


def compile_for_device(source: str, name: str, compute_capability: tuple[int, int],
                       options: tuple[str, ...] = ()) -> tuple[bytes, str]:
    """The image of ``source`` that a GPU of ``compute_capability`` loads best, and its target.

    Returns:
        ``(image, target)``: a CUBIN and ``"sm_XY"`` when this NVRTC can target the GPU itself,
        else NUL-terminated PTX and ``"compute_XY"`` for the newest target below it.

    Raises:
        CudaError: NVRTC is missing, cannot target this GPU at all, or the source does not
            compile.
    """
    wanted = compute_capability[0] * 10 + compute_capability[1]
    if wanted in supported_archs():
        return compile_cubin(source, name, wanted, options), f"sm_{wanted}"
    arch = choose_arch(compute_capability)
    return compile_ptx(source, name, arch, options), f"compute_{arch}"


def _compile(source: str, name: str, target: str, options: tuple[str, ...]) -> bytes:
    """NVRTC: PTX for a ``compute_XY`` target, a CUBIN for ``sm_XY``."""
    _, _, nvrtc = bindings()
    nvrtc_version()
    cubin = target.startswith("sm_")
    program = check(nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], []),
                    f"nvrtcCreateProgram({name})")
    try:
        flags = [f"--gpu-architecture={target}", "--std=c++17", "-default-device", *options]
        encoded = [f.encode() for f in flags]
        status = nvrtc.nvrtcCompileProgram(program, len(encoded), encoded)[0]
        if int(status) != 0:
            raise CudaError(f"NVRTC could not compile {name} for {target} "
                            f"({' '.join(flags)}):\n{_program_log(nvrtc, program)}")
        if cubin:
            size = check(nvrtc.nvrtcGetCUBINSize(program), "nvrtcGetCUBINSize")
        else:
            size = check(nvrtc.nvrtcGetPTXSize(program), "nvrtcGetPTXSize")
        # NVRTC writes into the buffer: it must be mutable (a bytes object is not, and a short
        # one may be an interned singleton shared by the whole process).
        image = bytearray(size)
        if cubin:
            check(nvrtc.nvrtcGetCUBIN(program, image), "nvrtcGetCUBIN")
        else:
            check(nvrtc.nvrtcGetPTX(program, image), "nvrtcGetPTX")
        return bytes(image)
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


ELF_MAGIC = b"\x7fELF"


class Module:
    """A loaded module (``cuModuleLoadData`` of a CUBIN or PTX) and its kernels, on the current
    context.

    Raises:
        CudaError: The driver cannot load the image (a CUBIN for another GPU, or PTX from a newer
            NVRTC than the driver: install the NVRTC matching the driver's CUDA version).
    """

    def __init__(self, image: bytes, what: str = "module"):
        driver, _, _ = bindings()
        self.what = what
        if image.startswith(ELF_MAGIC):
            hint = "a CUBIN must be for this GPU's architecture"
            self._image = image
        else:
            hint = ("the driver could not JIT its PTX; the NVRTC that wrote it must not be newer "
                    "than the driver")
            self._image = image if image.endswith(b"\0") else image + b"\0"
        self._module = check(driver.cuModuleLoadData(self._image),
                             f"cuModuleLoadData ({what}: {hint})")
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
