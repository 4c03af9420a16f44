"""The gate kernel: the exit decision, made on the GPU after every exit head.

Two kernels, compiled at run time with NVRTC (to PTX for the GPU's compute capability):

* ``trt_exit_begin`` starts an inference: marks every sample as still running
  (``exit_index = -1``) and stamps the start time from the GPU's global nanosecond timer
  (``%globaltimer``) for deadline mode.
* ``trt_exit_gate`` runs after exit ``k``: each sample still running whose confidence reaches
  the threshold (or every one, at a forced exit: the final head, a fixed exit, or when the next
  segment and exit no longer fit in the deadline budget) takes exit ``k``: its exit index,
  confidence and output row are written to the result buffers; samples that exited earlier keep
  their result. Then it sets the decision "run the next stage" (some sample is still running):
  ``cudaGraphSetConditional`` on the IF node's handle in graph mode (an explicit flag says
  whether there is one), and/or a flag in mapped
  pinned memory that the host reads in poll mode.

NaN confidences are never confident (``NaN >= t`` is false), as in the host executor. The
deadline test is the host executor's: ``elapsed + latency(segment k+1) + latency(exit k+1) >
budget``.

The kernels are built twice: with ``TRT_EXIT_CONDITIONAL`` (graph mode; the kernel calls
``cudaGraphSetConditional``, which only CUDA 12.4+ drivers resolve) and without (poll mode, any
driver). One block does the whole batch: batches are small, and a block-wide reduction
(``__syncthreads_or``) tells whether any sample is still running.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from trt_exit.errors import CudaError
from trt_exit.profiling.jetson import is_jetson
from trt_exit.runtime.cuda.module import (
    FLOAT32,
    INT32,
    INT64,
    POINTER,
    UINT64,
    Module,
    compile_for_device,
    compile_ptx,
)

log = logging.getLogger(__name__)

BEGIN_KERNEL = "trt_exit_begin"
GATE_KERNEL = "trt_exit_gate"
#: Threads of the single block that runs each kernel.
BLOCK_THREADS = 256
#: NVRTC option that enables ``cudaGraphSetConditional`` (graph mode).
CONDITIONAL_OPTION = "-DTRT_EXIT_CONDITIONAL=1"

GATE_PROGRAM = "trt_exit_gate.cu"
GATE_SOURCE = r"""
// trt_exit gate kernels; see trt_exit/runtime/gate.py for what they decide.
typedef unsigned long long cudaGraphConditionalHandle;
#ifdef TRT_EXIT_CONDITIONAL
// Device-runtime builtin (cuda_device_runtime_api.h, CUDA 12.4+), declared here so NVRTC needs
// no CUDA headers; the driver resolves it when it JIT-compiles the PTX.
extern "C" __device__ __cudart_builtin__ void cudaGraphSetConditional(
    cudaGraphConditionalHandle handle, unsigned int value);
#endif

__device__ __forceinline__ unsigned long long global_timer_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

extern "C" __global__ void trt_exit_begin(int* exit_index, int batch,
                                          unsigned long long* start_ns) {
  if (threadIdx.x == 0 && start_ns != nullptr) *start_ns = global_timer_ns();
  for (int i = threadIdx.x; i < batch; i += blockDim.x) exit_index[i] = -1;
}

extern "C" __global__ void trt_exit_gate(
    const float* confidence,        // (B,) this exit's confidence
    const float* output,            // (B, K) this exit's output
    int* exit_index,                // (B,) result: exit taken, -1 while running
    float* result_confidence,       // (B,) result
    float* result_output,           // (B, K) result
    unsigned int* flag,             // poll mode: mapped pinned decision flag, else null
    cudaGraphConditionalHandle handle,  // graph mode: the next IF node's handle
    int set_condition,              // 1: set `handle` (graph mode); 0: there is no handle
    const unsigned long long* start_ns,  // begin kernel's timestamp
    int batch, int num_outputs, int exit_k,
    int use_threshold, float threshold, int force,
    int deadline, long long budget_ns, long long next_ns) {
  __shared__ int over_budget;
  if (threadIdx.x == 0) {
    int over = 0;
    if (deadline) {
      long long elapsed = (long long)(global_timer_ns() - *start_ns);
      over = elapsed + next_ns > budget_ns;
    }
    over_budget = over;
  }
  __syncthreads();
  int running = 0;
  for (int i = threadIdx.x; i < batch; i += blockDim.x) {
    if (exit_index[i] >= 0) continue;  // exited earlier: keeps that result
    float c = confidence[i];
    // NaN >= threshold is false: a NaN confidence never exits by confidence.
    int done = force || over_budget || (use_threshold && c >= threshold);
    if (done) {
      exit_index[i] = exit_k;
      result_confidence[i] = c;
    } else {
      running = 1;
    }
  }
  running = __syncthreads_or(running);  // also makes the exit_index writes visible block-wide
  int total = batch * num_outputs;
  for (int e = threadIdx.x; e < total; e += blockDim.x) {
    if (exit_index[e / num_outputs] == exit_k) result_output[e] = output[e];
  }
  if (threadIdx.x == 0) {
    unsigned int go_on = running ? 1u : 0u;
    if (flag != nullptr) *(volatile unsigned int*)flag = go_on;
#ifdef TRT_EXIT_CONDITIONAL
    if (set_condition) cudaGraphSetConditional(handle, go_on);
#endif
  }
}
"""


#: Argument types of the kernels, in the order of their parameters in GATE_SOURCE.
BEGIN_ARG_TYPES = (POINTER, INT32, POINTER)
GATE_ARG_TYPES = (POINTER, POINTER, POINTER, POINTER, POINTER, POINTER, UINT64, INT32, POINTER,
                  INT32, INT32, INT32, INT32, FLOAT32, INT32, INT32, INT64, INT64)


def _options(conditional: bool) -> tuple[str, ...]:
    return (CONDITIONAL_OPTION,) if conditional else ()


def gate_ptx(arch: int, conditional: bool) -> bytes:
    """PTX of the gate kernels for ``compute_<arch>`` (NVRTC; no GPU needed).

    Args:
        arch: Compute capability as an int (87 for Orin, 90 for H100/H200).
        conditional: Build the graph-mode variant (calls ``cudaGraphSetConditional``).
    """
    return compile_ptx(GATE_SOURCE, GATE_PROGRAM, arch, _options(conditional))


def gate_image(compute_capability: tuple[int, int], conditional: bool) -> tuple[bytes, str]:
    """The gate kernels for a GPU: a CUBIN for its architecture where NVRTC knows it, else PTX
    (:func:`trt_exit.runtime.cuda.module.compile_for_device`); returns ``(image, target)``."""
    return compile_for_device(GATE_SOURCE, GATE_PROGRAM, compute_capability,
                              _options(conditional))


@dataclass
class GateParams:
    """What the gate of one exit decides with (all kernel arguments, so a captured graph
    holds them; a different policy means a different graph).

    Attributes:
        exit_k: Exit index.
        use_threshold: Whether the confidence threshold applies (None threshold: it does not).
        threshold: Confidence threshold in [0, 1].
        force: Every running sample exits here (final head, fixed exit).
        deadline: Check the time budget.
        budget_ns: Budget of one inference, in nanoseconds.
        next_ns: Profiled latency of segment k+1 plus exit k+1, in nanoseconds.
    """

    exit_k: int
    use_threshold: bool = False
    threshold: float = 1.0
    force: bool = False
    deadline: bool = False
    budget_ns: int = 0
    next_ns: int = 0


def gate_on_host(params: GateParams, confidence: np.ndarray, running: np.ndarray,
                 over_budget: bool = False) -> np.ndarray:
    """The gate's decision on the host (the eager strategy, and the kernel's reference).

    Args:
        params: The exit's gate parameters.
        confidence: (B,) this exit's confidence.
        running: (B,) bool, samples that have not exited yet.
        over_budget: Deadline mode: the next segment and exit no longer fit in the budget.

    Returns:
        (B,) bool: the samples that take this exit now.
    """
    if params.force or (params.deadline and over_budget):
        done = np.ones(len(confidence), dtype=bool)
    elif params.use_threshold:
        with np.errstate(invalid="ignore"):
            done = confidence >= np.float32(params.threshold)  # NaN >= t is False
    else:
        done = np.zeros(len(confidence), dtype=bool)
    return done & running


def gate_arguments(params: GateParams, *, confidence: int, output: int, exit_index: int,
                   result_confidence: int, result_output: int, start_ns: int, batch: int,
                   num_outputs: int, flag: int = 0, handle: Any = None) -> list:
    """The values of ``trt_exit_gate``'s parameters, in the order of :data:`GATE_ARG_TYPES`.

    Whether the gate sets a graph condition is an explicit flag (``handle`` is not None): a
    ``cudaGraphConditionalHandle`` is an opaque value, and 0 may be a valid one.
    """
    set_condition = handle is not None
    return [confidence, output, exit_index, result_confidence, result_output, flag,
            int(handle) if set_condition else 0, int(set_condition), start_ns, batch,
            num_outputs, params.exit_k, int(params.use_threshold), float(params.threshold),
            int(params.force), int(params.deadline), int(params.budget_ns), int(params.next_ns)]


class GateKernels:
    """The gate kernels loaded on the current GPU.

    Args:
        compute_capability: The GPU's, e.g. ``(9, 0)``.
        conditional: Load the graph-mode variant (needs a CUDA 12.4+ driver).
    """

    def __init__(self, compute_capability: tuple[int, int], conditional: bool):
        self.conditional = conditional
        image, self.target = gate_image(compute_capability, conditional)
        self.module = Module(image, f"gate kernels ({'graph' if conditional else 'poll'} "
                                    f"variant, {self.target})")
        # Resolve both kernels now: under lazy loading (CUDA_MODULE_LOADING=LAZY, the default
        # since CUDA 12.2) a module's kernels load at cuModuleGetFunction, which must not
        # happen for the first time inside a stream capture (the graph strategy's first use).
        try:
            for name in (BEGIN_KERNEL, GATE_KERNEL):
                self.module.function(name)
        except BaseException:
            self.module.close()
            raise

    def begin(self, stream: int, exit_index: int, batch: int, start_ns: int) -> None:
        """Enqueues ``trt_exit_begin``."""
        self.module.launch(BEGIN_KERNEL, stream, 1, BLOCK_THREADS,
                           list(zip((exit_index, batch, start_ns), BEGIN_ARG_TYPES)))

    def gate(self, stream: int, params: GateParams, *, confidence: int, output: int,
             exit_index: int, result_confidence: int, result_output: int, start_ns: int,
             batch: int, num_outputs: int, flag: int = 0, handle: Any = None) -> None:
        """Enqueues ``trt_exit_gate`` for one exit (addresses are device pointers; ``handle``:
        the conditional handle to set, None for none)."""
        if handle is not None and not self.conditional:
            raise ValueError("the poll variant of the gate cannot set a graph condition")
        values = gate_arguments(params, confidence=confidence, output=output,
                                exit_index=exit_index, result_confidence=result_confidence,
                                result_output=result_output, start_ns=start_ns, batch=batch,
                                num_outputs=num_outputs, flag=flag, handle=handle)
        self.module.launch(GATE_KERNEL, stream, 1, BLOCK_THREADS,
                           list(zip(values, GATE_ARG_TYPES)))

    def close(self) -> None:
        self.module.close()

    def __enter__(self) -> "GateKernels":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def load_gate_kernels(compute_capability: tuple[int, int], conditional: bool,
                      driver_version: int) -> GateKernels:
    """:class:`GateKernels` for the current GPU, or why not, with the versions involved.

    Args:
        compute_capability: The GPU's, e.g. ``(8, 7)`` on Orin.
        conditional: The graph-mode variant.
        driver_version: What ``cuDriverGetVersion`` reports (e.g. 12060).

    Raises:
        CudaError: NVRTC is newer (major version) than the driver, or is missing, or the kernels
            do not compile or load. A compile or load failure is also logged at WARNING with the
            NVRTC (version and library), its target, the driver's CUDA version and
            cuda-bindings' version: a CUBIN from a newer NVRTC of the driver's major version
            relies on minor version compatibility, which NVIDIA does not confirm for Jetson.
    """
    from trt_exit.runtime.cuda.api import binding_version, format_version, version_mismatch
    from trt_exit.runtime.cuda.module import jetpack_nvrtc, nvrtc_library, nvrtc_version

    mismatch = version_mismatch(driver_version, 0, nvrtc_version()[0])
    if mismatch:
        raise CudaError(mismatch)
    target = "?"
    try:
        _, target = gate_image(compute_capability, conditional)
        return GateKernels(compute_capability, conditional)
    except (CudaError, RuntimeError) as exc:  # RuntimeError: a CUDA library not found
        versions = (f"NVRTC {'.'.join(map(str, nvrtc_version()))} "
                    f"({nvrtc_library() or 'library path unknown'}) compiled {target} for "
                    f"compute capability {'.'.join(map(str, compute_capability))}; the driver "
                    f"supports CUDA {format_version(driver_version)}; cuda-bindings "
                    f"{'.'.join(map(str, binding_version()))}")
        hint = ""
        if jetpack_nvrtc() is None and is_jetson():
            hint = ("; on a Jetson, install JetPack's CUDA toolkit (its NVRTC in /usr/local/cuda "
                    "matches the driver and is preferred over a pip wheel's)")
        message = f"{exc} [{versions}]{hint}"
        log.warning("the %s-mode gate kernels do not load: %s",
                    "graph" if conditional else "poll", message)
        raise CudaError(message) from exc
