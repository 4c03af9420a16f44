"""The gate: its kernel source compiles to PTX with NVRTC (no GPU needed), and the host twin
decides as the host executor does."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from trt_exit.errors import CudaError
from trt_exit.runtime.gate import (
    BEGIN_ARG_TYPES,
    BEGIN_KERNEL,
    GATE_ARG_TYPES,
    GATE_KERNEL,
    GATE_SOURCE,
    GateParams,
    gate_on_host,
)


def _nvrtc_or_skip():
    pytest.importorskip("cuda.bindings", reason="cuda-python is not installed")
    from trt_exit.runtime.cuda.module import nvrtc_version

    try:
        return nvrtc_version()
    except CudaError as exc:
        pytest.skip(f"NVRTC is not available: {exc}")


@pytest.mark.parametrize("arch", [87, 90])  # Jetson Orin, H100 / H200
@pytest.mark.parametrize("conditional", [True, False])
def test_gate_kernels_compile_to_ptx(arch, conditional):
    _nvrtc_or_skip()
    from trt_exit.runtime.cuda.module import ptx_entries
    from trt_exit.runtime.gate import gate_ptx

    ptx = gate_ptx(arch, conditional).decode()
    assert ptx.endswith("\0")
    assert sorted(ptx_entries(ptx)) == sorted([BEGIN_KERNEL, GATE_KERNEL])
    assert f".target sm_{arch}" in ptx
    assert "%globaltimer" in ptx          # deadline mode reads the GPU's nanosecond timer
    assert "bar.red.or" in ptx            # __syncthreads_or: "is any sample still running"
    # Only the graph variant calls the device-runtime builtin (CUDA 12.4+ drivers resolve it).
    assert ("cudaGraphSetConditional" in ptx) is conditional


@pytest.mark.parametrize("kernel, arg_types", [(GATE_KERNEL, GATE_ARG_TYPES),
                                                (BEGIN_KERNEL, BEGIN_ARG_TYPES)])
def test_kernel_parameters_match_what_the_launcher_packs(kernel, arg_types):
    """Parameter by parameter, the PTX entry's types must be what the host packs (a mismatch
    would shift every later argument)."""
    _nvrtc_or_skip()
    from trt_exit.runtime.gate import gate_ptx

    ptx = gate_ptx(90, True).decode()
    entry = ptx[ptx.index(f".entry {kernel}("):]
    declared = [line.split()[1] for line in entry[: entry.index(")")].splitlines()
                if line.strip().startswith(".param")]
    packed = [".f32" if t is ctypes.c_float else f".u{8 * ctypes.sizeof(t)}" for t in arg_types]
    assert declared == packed


def test_compile_errors_carry_the_compiler_log():
    _nvrtc_or_skip()
    from trt_exit.runtime.cuda.module import compile_ptx

    with pytest.raises(CudaError, match="(?s)could not compile broken.cu.*error"):
        compile_ptx('extern "C" __global__ void k() { undeclared(); }', "broken.cu", 90)


def test_source_treats_nan_as_not_confident():
    # The comparison must be `c >= threshold` (false for NaN), never `!(c < threshold)`.
    assert "c >= threshold" in GATE_SOURCE
    assert "!(c <" not in GATE_SOURCE


def test_host_gate_thresholds_and_nan():
    conf = np.array([0.9, np.nan, 0.5, 0.2], np.float32)
    running = np.array([True, True, True, False])
    done = gate_on_host(GateParams(0, use_threshold=True, threshold=0.5), conf, running)
    # 0.9 and exactly-0.5 exit; NaN never does; sample 3 exited earlier and keeps that result.
    np.testing.assert_array_equal(done, [True, False, True, False])


def test_host_gate_forced_and_deadline_exits_take_everything_running():
    conf = np.array([np.nan, 0.1, 0.2], np.float32)
    running = np.array([True, True, False])
    forced = gate_on_host(GateParams(2, force=True), conf, running)
    np.testing.assert_array_equal(forced, [True, True, False])
    deadline = GateParams(0, use_threshold=False, deadline=True, budget_ns=10, next_ns=5)
    np.testing.assert_array_equal(gate_on_host(deadline, conf, running, over_budget=True),
                                  [True, True, False])
    np.testing.assert_array_equal(gate_on_host(deadline, conf, running, over_budget=False),
                                  [False, False, False])


def test_host_gate_compares_in_float32_like_the_kernel():
    # 0.1 is not a float32; the kernel receives float32(0.1), so the host twin must too.
    just_above = np.nextafter(np.float32(0.1), np.float32(1))
    conf = np.array([np.float32(0.1), just_above], np.float32)
    done = gate_on_host(GateParams(0, use_threshold=True, threshold=0.1), conf,
                        np.ones(2, bool))
    np.testing.assert_array_equal(done, [True, True])


@pytest.mark.parametrize("conditional", [True, False])
def test_a_known_gpu_gets_a_cubin_for_its_own_architecture(conditional):
    """A CUBIN loads without the driver's JIT, so an NVRTC newer than the driver within one CUDA
    major version can serve it (minor version compatibility: JetPack 6's CUDA 12.6 driver with
    pip's NVRTC 12.9)."""
    _nvrtc_or_skip()
    from trt_exit.runtime.cuda.module import ELF_MAGIC, supported_archs
    from trt_exit.runtime.gate import gate_image

    for capability in [(8, 7), (9, 0)]:  # Jetson Orin, H100 / H200
        if capability[0] * 10 + capability[1] not in supported_archs():
            continue
        image, target = gate_image(capability, conditional)
        assert target == f"sm_{capability[0]}{capability[1]}"
        assert image.startswith(ELF_MAGIC)
        assert BEGIN_KERNEL.encode() in image and GATE_KERNEL.encode() in image


def test_a_gpu_newer_than_nvrtc_gets_ptx_for_the_newest_older_target():
    _nvrtc_or_skip()
    from trt_exit.runtime.cuda.module import supported_archs
    from trt_exit.runtime.gate import gate_image

    newest = max(supported_archs())
    image, target = gate_image((newest // 10 + 5, 0), conditional=True)
    assert target == f"compute_{newest}"
    assert image.endswith(b"\0") and f".target sm_{newest}".encode() in image


def test_a_gpu_older_than_nvrtc_supports_is_a_clear_error():
    _nvrtc_or_skip()
    from trt_exit.runtime.gate import gate_image

    with pytest.raises(CudaError, match="cannot target compute capability 3.0"):
        gate_image((3, 0), conditional=False)
