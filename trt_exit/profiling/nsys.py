"""The Nsight Systems recipe, and the CUDA profiler capture range the app opens for it.

``trt-exit nsys -- <command>`` runs::

    nsys profile -t cuda,nvtx,osrt --capture-range=cudaProfilerApi --capture-range-end=stop \\
        --cuda-graph-trace=node -o report <command>

* ``-t cuda,nvtx,osrt``: CUDA API and kernels, trt_exit's NVTX ranges (domain ``trt_exit``:
  every stage, gate and copy; ``preprocess`` / ``infer`` / ``sink`` per frame of ``count``),
  and OS runtime calls (where the host waits).
* ``--capture-range=cudaProfilerApi --capture-range-end=stop``: record only between the app's
  ``cudaProfilerStart`` and ``cudaProfilerStop``, i.e. the measured region after model loading
  and warm-up (:func:`cuda_profiler_range`), so the report is small and starts where it matters.
* ``--cuda-graph-trace=node``: show the kernels inside CUDA graphs (the CUDA executor's *graph*
  strategy) instead of one opaque graph launch.

The capture range calls the CUDA runtime through cuda-python; it is opened when a GPU backend
runs (``torch``, ``tensorrt``) or when ``TRT_EXIT_CUDA_PROFILER=1`` (which ``trt-exit nsys``
sets), and is a no-op where cuda-python or a GPU is missing. NVTX ranges need the ``nvtx``
package (``pip install nvtx``); without it they are no-ops and the timeline shows CUDA only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import subprocess
from typing import Iterator, Sequence

from trt_exit.errors import TrtExitError

log = logging.getLogger(__name__)

#: Environment variable that asks the app to open the CUDA profiler capture range.
PROFILER_ENV = "TRT_EXIT_CUDA_PROFILER"
GPU_BACKENDS = ("torch", "tensorrt")


def nsys_command(command: Sequence[str], output: str = "report", trace: str = "cuda,nvtx,osrt",
                 extra: Sequence[str] = ()) -> list[str]:
    """The recommended ``nsys profile`` command line around ``command``."""
    return ["nsys", "profile", "-t", trace, "--capture-range=cudaProfilerApi",
            "--capture-range-end=stop", "--cuda-graph-trace=node", "-o", output, *extra,
            *command]


def format_command(argv: Sequence[str]) -> str:
    """``argv`` as one shell-quoted line."""
    return shlex.join(list(argv))


def run_nsys(command: Sequence[str], output: str = "report", extra: Sequence[str] = (),
             dry_run: bool = False, nsys: str | None = None) -> int:
    """Runs ``command`` under Nsight Systems, or prints the command where nsys is absent.

    Args:
        command: The program to profile (e.g. ``["trt-exit", "profile", "runs/demo"]``).
        output: Report name (``report.nsys-rep``).
        extra: More ``nsys profile`` options.
        dry_run: Only print the command.
        nsys: Path of the nsys executable (default: found on PATH).

    Returns:
        nsys's exit status (0 when only printed).

    Raises:
        TrtExitError: nsys ran and failed (its exit status is in the message).
    """
    if not command:
        raise TrtExitError("nothing to profile: give the command after --, e.g. trt-exit nsys "
                           "-- trt-exit profile runs/demo --backend tensorrt")
    argv = nsys_command(command, output, extra=extra)
    executable = nsys or shutil.which("nsys")
    line = format_command([f"{PROFILER_ENV}=1", *argv])
    if dry_run or executable is None:
        if executable is None and not dry_run:
            print("nsys (Nsight Systems) is not installed here; run this where it is (on a "
                  "Jetson it comes with JetPack: /opt/nvidia/nsight-systems/*/bin/nsys):")
        print(line)
        return 0
    argv[0] = executable
    env = dict(os.environ, **{PROFILER_ENV: "1"})
    print(f"running: {line}", flush=True)
    done = subprocess.run(argv, env=env, check=False)
    if done.returncode != 0:
        raise TrtExitError(f"nsys exited with status {done.returncode}; see its output above")
    print(f"wrote {output}.nsys-rep; open it in Nsight Systems, or: nsys stats {output}.nsys-rep")
    return 0


def profiler_range_wanted(backend: str) -> bool:
    """Whether to open the CUDA profiler capture range for a run on ``backend``."""
    return backend in GPU_BACKENDS or os.environ.get(PROFILER_ENV, "") not in ("", "0")


def _cuda_runtime():
    """cuda-python's runtime module with a usable GPU, or None."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        return None
    try:
        status, count = runtime.cudaGetDeviceCount()
    except RuntimeError:  # the driver library itself is missing
        return None
    if int(status) != 0 or count < 1:
        return None
    return runtime


@contextlib.contextmanager
def cuda_profiler_range(enabled: bool = True) -> Iterator[bool]:
    """``cudaProfilerStart`` / ``cudaProfilerStop`` around the measured region.

    Yields whether the range was opened (False without cuda-python, without a GPU, or when not
    ``enabled``). Return codes are checked: a failing start or stop is a :class:`TrtExitError`.
    """
    runtime = _cuda_runtime() if enabled else None
    if runtime is None:
        if enabled and os.environ.get(PROFILER_ENV):
            log.warning("%s is set but cuda-python or a GPU is missing: no capture range "
                        "(nsys --capture-range=cudaProfilerApi will record nothing)", PROFILER_ENV)
        yield False
        return
    _check(runtime.cudaProfilerStart(), "cudaProfilerStart")
    try:
        yield True
    finally:
        _check(runtime.cudaProfilerStop(), "cudaProfilerStop")


def _check(result, call: str) -> None:
    # cuda-python returns (status, *values); a call without values returns (status,).
    status = result[0] if isinstance(result, tuple) else result
    if int(status) != 0:
        raise TrtExitError(f"{call} failed: {getattr(status, 'name', status)}")
