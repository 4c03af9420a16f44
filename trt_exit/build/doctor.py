"""``trt-exit doctor``: what this machine has, and whether TensorRT computes what ONNX Runtime does.

The report lists Python, trt_exit, ONNX Runtime, TensorRT, cuda-python, the CUDA driver and
runtime, the GPU, the JetPack / L4T release on a Jetson (``/etc/nv_tegra_release``) and whether
OpenCV can open GStreamer pipelines (CSI cameras).

The self-test builds the tiny test model (``multi_exit_vit_tiny_test``, seeded random weights),
exports it, writes its FP16 and INT8 graphs (INT8 calibrated on seeded random inputs) and runs
every exit with ONNX Runtime on the CPU: that proves the ONNX Runtime path. Where TensorRT can
run (TensorRT and a usable GPU), it builds an engine per stage in every precision and compares
every exit's output and confidence with ONNX Runtime's on the same graphs, within
:data:`TOLERANCES`. Any failure makes the command exit non-zero.
"""

from __future__ import annotations

import platform
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from trt_exit.build.trt_api import TENSORRT_HINT, tensorrt_version
from trt_exit.errors import TrtExitError

#: Allowed difference between TensorRT and ONNX Runtime on the same graph, per precision:
#: ``|trt - ort| <= atol + rtol * max|ort|`` over every exit's output and confidence.
#: FP32: TensorRT uses TF32 tensor cores for FP32 matrix multiplies on Ampere and later (Orin),
#: about 1e-3 relative per product. FP16: TensorRT accumulates FP16 layers in FP16 where ONNX
#: Runtime's CPU kernels compute in FP32 between FP16 tensors. INT8: the two requantize and fuse
#: Q/DQ differently (rounding of scales, int32 accumulators vs. fused epilogues).
TOLERANCES = {
    "fp32": {"atol": 5e-3, "rtol": 5e-3},
    "fp16": {"atol": 2e-2, "rtol": 2e-2},
    "int8": {"atol": 6e-2, "rtol": 6e-2},
}
SELF_TEST_MODEL = "multi_exit_vit_tiny_test"
SELF_TEST_SAMPLES = 16
#: L4T major.minor -> JetPack release.
JETPACK_OF_L4T = {"36.3": "6.0", "36.4": "6.1 / 6.2", "38.2": "7.0", "38.4": "7.1"}


@dataclass
class Check:
    """One line of the doctor's verdict.

    Attributes:
        name: What was checked.
        ok: True, False, or None when it could not run here (not a failure).
        detail: Numbers or the reason.
    """

    name: str
    ok: bool | None
    detail: str = ""


@dataclass
class DoctorReport:
    """Environment and checks."""

    environment: dict[str, Any] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.ok is False]

    def to_dict(self) -> dict[str, Any]:
        return {"environment": self.environment,
                "checks": [c.__dict__ for c in self.checks]}


def _version(*packages: str) -> str | None:
    for package in packages:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return None


def _jetson() -> dict[str, Any] | None:
    from trt_exit.profiling.jetson import DEVICE_MODEL, l4t_release

    release = l4t_release()
    if release is None:
        return None
    version = release.get("release", "")
    info = {"l4t": version, "jetpack": JETPACK_OF_L4T.get(".".join(version.split(".")[:2]),
                                                           "unknown (see the L4T release)")}
    try:
        info["model"] = DEVICE_MODEL.read_text(errors="replace").strip("\0\n ")
    except OSError:
        pass
    return info


def _opencv() -> dict[str, Any]:
    from trt_exit.errors import MissingDependencyError

    try:
        from trt_exit.pipelines.opencv_support import gstreamer_available, import_cv2

        cv2 = import_cv2()
        return {"version": cv2.__version__, "gstreamer": gstreamer_available()}
    except MissingDependencyError:
        return {"version": None, "gstreamer": False}


def environment() -> dict[str, Any]:
    """Everything the report prints, without raising for anything missing."""
    import onnxruntime as ort

    from trt_exit import __version__

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "trt_exit": __version__,
        "onnxruntime": {"version": ort.__version__, "providers": ort.get_available_providers()},
        "tensorrt": tensorrt_version(),
        "cuda_python": _version("cuda-python", "cuda-bindings"),
        "jetson": _jetson(),
        "opencv": _opencv(),
    }
    try:
        from trt_exit.runtime.cuda.api import cuda_status, format_version, use_device

        status = cuda_status()
        env["cuda"] = {"available": status.available, "reason": status.reason,
                       "driver": format_version(status.driver_version) if status.driver_version else None,
                       "runtime": format_version(status.runtime_version) if status.runtime_version else None,
                       "devices": status.device_count}
        env["gpu"] = use_device(0).to_dict() if status.available else None
    except TrtExitError as exc:  # cuda-python missing
        env["cuda"] = {"available": False, "reason": str(exc)}
        env["gpu"] = None
    return env


def format_environment(env: dict[str, Any]) -> str:
    """The environment as aligned lines."""
    cuda = env.get("cuda", {})
    gpu = env.get("gpu")
    jetson = env.get("jetson")
    opencv = env.get("opencv", {})
    rows = [
        ("python", f"{env['python']} ({env['platform']})"),
        ("trt_exit", env["trt_exit"]),
        ("onnxruntime", f"{env['onnxruntime']['version']} "
                        f"({', '.join(env['onnxruntime']['providers'])})"),
        ("tensorrt", env["tensorrt"] or "not installed"),
        ("cuda-python", env.get("cuda_python") or "not installed"),
        ("CUDA driver", cuda.get("driver") or f"unavailable ({cuda.get('reason', '')})"),
        ("CUDA runtime", cuda.get("runtime") or "unknown"),
        ("GPU", f"{gpu['name']} (sm {gpu['compute_capability']}, "
                f"{gpu['total_memory_bytes'] / 2**30:.1f} GiB)" if gpu else "none"),
        ("Jetson", f"{jetson.get('model', 'Jetson')}: L4T {jetson['l4t']}, JetPack "
                   f"{jetson['jetpack']}" if jetson else "no (/etc/nv_tegra_release absent)"),
        ("OpenCV", f"{opencv['version']}, GStreamer {'yes' if opencv['gstreamer'] else 'no'}"
                   if opencv.get("version") else "not installed"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _within(reference: np.ndarray, candidate: np.ndarray, tolerance: dict[str, float]) -> tuple[bool, float, float]:
    diff = float(np.max(np.abs(candidate.astype(np.float64) - reference.astype(np.float64))))
    limit = tolerance["atol"] + tolerance["rtol"] * float(np.max(np.abs(reference)))
    return bool(np.isfinite(diff) and diff <= limit), diff, limit


def _all_exits(manifest, backend: str, precision: str, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from trt_exit.runtime.executor import Executor
    from trt_exit.runtime.policies import AllExitsPolicy

    with Executor(manifest, backend, precision, policy=AllExitsPolicy()) as executor:
        results = executor.run(images)
    return results.all_outputs, results.all_confidences


def tiny_model_dir(out_dir: Path, precisions: tuple[str, ...]):
    """Exports the seeded tiny test model into ``out_dir`` with graphs in ``precisions``;
    returns ``(manifest, test inputs)``."""
    import torch

    from trt_exit.export import calibration as calib
    from trt_exit.export.onnx_export import export_model
    from trt_exit.export.precision import create_precision_graphs
    from trt_exit.models import create_model

    torch.manual_seed(0)
    model = create_model(SELF_TEST_MODEL).eval()
    rng = np.random.default_rng(0)
    shapes = model.input_shapes()
    sample = {n: rng.standard_normal((8, *s)).astype(np.float32) for n, s in shapes.items()}
    manifest = export_model(model, out_dir, sample_inputs=sample)
    low = tuple(p for p in precisions if p != "fp32")
    if low:
        calibration = calib.CalibrationSet(
            {n: rng.standard_normal((64, *s)).astype(np.float32) for n, s in shapes.items()},
            {"kind": "random", "seed": 0, "note": "trt-exit doctor self-test"})
        manifest = create_precision_graphs(manifest, low, calibration)
    images = rng.standard_normal((SELF_TEST_SAMPLES, *shapes["image"])).astype(np.float32)
    return manifest, images


def run_doctor(self_test: bool = True, precisions: tuple[str, ...] = ("fp32", "fp16", "int8"),
               work_dir: str | Path | None = None) -> DoctorReport:
    """The environment, and (``self_test``) the ONNX Runtime and TensorRT self-tests.

    Args:
        self_test: Run the self-tests (a few seconds on the CPU; engine builds take longer).
        precisions: Precisions to test.
        work_dir: Where the tiny model and its engines go (default: a temporary directory).
    """
    report = DoctorReport(environment())
    env = report.environment
    trt_ok = env["tensorrt"] is not None
    gpu_ok = bool(env.get("cuda", {}).get("available"))
    if not trt_ok:
        report.checks.append(Check("tensorrt", None, "not installed. " + TENSORRT_HINT))
    elif not gpu_ok:
        report.checks.append(Check("tensorrt", None, f"TensorRT {env['tensorrt']} is installed but "
                                   f"cannot run here: {env['cuda'].get('reason')}"))
    if not self_test:
        return report
    with tempfile.TemporaryDirectory(prefix="trt-exit-doctor-") as tmp:
        root = Path(work_dir) if work_dir else Path(tmp)
        try:
            manifest, images = tiny_model_dir(root / "tiny", precisions)
        except TrtExitError as exc:
            report.checks.append(Check("export tiny model", False, str(exc)))
            return report
        reference = {}
        for precision in precisions:
            try:
                reference[precision] = _all_exits(manifest, "onnxruntime", precision, images)
                finite = all(np.isfinite(a).all() for a in reference[precision])
                report.checks.append(Check(f"onnxruntime {precision}", finite,
                                           f"{manifest.num_exits} exits on {len(images)} samples"
                                           + ("" if finite else ": NaN/Inf outputs")))
            except TrtExitError as exc:
                report.checks.append(Check(f"onnxruntime {precision}", False, str(exc)))
        if not (trt_ok and gpu_ok):
            return report
        from trt_exit.build.builder import build_engines
        from trt_exit.build.config import BatchProfile, BuildConfig

        for precision in precisions:
            name = f"tensorrt {precision} vs onnxruntime"
            try:
                build_engines(manifest, BuildConfig(precisions=(precision,),
                                                    profile=BatchProfile(1, 4, SELF_TEST_SAMPLES)),
                              progress=False)
                outputs, confidences = _all_exits(manifest, "tensorrt", precision, images)
            except TrtExitError as exc:
                report.checks.append(Check(name, False, str(exc)))
                continue
            ref_outputs, ref_confidences = reference[precision]
            tolerance = TOLERANCES[precision]
            ok_o, diff_o, limit_o = _within(ref_outputs, outputs, tolerance)
            ok_c, diff_c, limit_c = _within(ref_confidences, confidences, tolerance)
            report.checks.append(Check(
                name, ok_o and ok_c,
                f"max |diff| outputs {diff_o:.2e} (limit {limit_o:.2e}), confidences "
                f"{diff_c:.2e} (limit {limit_c:.2e})"))
    return report


def format_checks(report: DoctorReport) -> str:
    """One line per check: ``ok`` / ``FAIL`` / ``skip``."""
    lines = []
    for check in report.checks:
        mark = {True: "ok  ", False: "FAIL", None: "skip"}[check.ok]
        lines.append(f"[{mark}] {check.name}: {check.detail}")
    return "\n".join(lines)
