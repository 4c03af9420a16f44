"""``trt-exit build``: one TensorRT engine per stage (and for the baseline graph), cached by key.

For each precision asked for and each stage in execution order, then the no-exit baseline:

1. verify the ONNX graph against the manifest's sha256;
2. compute the cache key (:func:`trt_exit.build.target.engine_key`); if the manifest records an
   engine with that key and its file matches its sha256, keep it (no rebuild);
3. otherwise parse (:class:`~trt_exit.build.steps.NetworkFromOnnxPath`), build
   (:class:`~trt_exit.build.steps.EngineBytesFromNetwork`) and write the engine atomically
   (:class:`~trt_exit.build.steps.SaveEngine`), persist the timing cache, and record the engine in
   the manifest (saved after every engine, so an interrupted build keeps what it finished).

The timing cache is one file per TensorRT version and GPU (``engines/timing.<target>.cache`` by
default): every stage's build reads what the previous ones measured, and the next build of any
model on this device starts from it.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trt_exit import tensor_names as tn
from trt_exit.build.config import BuildConfig
from trt_exit.build.steps import (
    EngineBytesFromNetwork,
    NetworkFromOnnxPath,
    SaveEngine,
    dla_layers,
    make_logger,
)
from trt_exit.build.target import ENGINE_DIR, Target, engine_filename, engine_key
from trt_exit.build.trt_api import import_tensorrt
from trt_exit.errors import ManifestError
from trt_exit.fileio import atomic_write_bytes, sha256_file
from trt_exit.manifest import FileRef, Manifest, TensorSpec

log = logging.getLogger(__name__)


@dataclass
class BuildJob:
    """One engine to build: a graph of the manifest in one precision.

    Attributes:
        name: Stage name, or ``full`` for the baseline graph.
        precision: ``fp32``, ``fp16`` or ``int8``.
        onnx: The graph's manifest entry.
        inputs: The graph's inputs.
        records: Where its engine records live (the stage's ``engines`` dict, or the baseline's).
    """

    name: str
    precision: str
    onnx: FileRef
    inputs: list[TensorSpec]
    records: dict[str, dict[str, Any]]


@dataclass
class BuildSummary:
    """What one ``trt-exit build`` did."""

    target: Target
    built: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    seconds: float = 0.0
    timing_cache: Path | None = None
    warnings: list[str] = field(default_factory=list)


def _check_dla(label: str, engine: bytes, logger, summary: BuildSummary) -> dict[str, int]:
    """Counts the engine's DLA layers; warns (and notes in the summary) when there are none:
    TensorRT then runs the whole stage on the GPU although DLA was asked for."""
    on_dla, total = dla_layers(engine, logger)
    if on_dla == 0:
        message = (f"{label}: no layer of the engine runs on the DLA ({total} layers on the "
                   f"GPU): the stage's ops are not DLA-capable at this precision (DLA runs fp16 "
                   f"and int8 convolutions, not transformer attention); build without "
                   f"--dla-core, or with --no-gpu-fallback to make this an error")
        log.warning(message)
        summary.warnings.append(message)
    return {"dla_layers": on_dla, "layers": total}


def require_tensorrt(purpose: str) -> str:
    """Imports TensorRT (or raises the error that says how to get it); returns its version."""
    trt = import_tensorrt(purpose)
    return str(trt.__version__)


def current_target(device: int = 0) -> tuple[Target, dict[str, Any]]:
    """This machine's TensorRT version and GPU ``device`` (made current), and the GPU's details.

    Raises:
        MissingDependencyError: TensorRT or cuda-python is not installed.
        CudaUnavailableError: No usable GPU.
    """
    trt = import_tensorrt("Building TensorRT engines")
    from trt_exit.runtime.cuda.api import use_device

    info = use_device(device)
    target = Target(str(trt.__version__), info.name,
                    f"{info.compute_capability[0]}.{info.compute_capability[1]}")
    return target, info.to_dict()


def build_jobs(manifest: Manifest, precisions: tuple[str, ...]) -> list[BuildJob]:
    """Every (graph, precision) to build, stages in execution order, then the baseline.

    Raises:
        ManifestError: A precision has no ONNX graphs yet (the message says how to make them).
    """
    jobs = []
    for precision in precisions:
        missing = [s.name for s in manifest.stages if precision not in s.onnx]
        if missing or precision not in manifest.full_model.get("onnx", {}):
            make = ("trt-exit export" if precision == "fp32" else
                    f"trt-exit precision {manifest.root} --precision {precision}")
            raise ManifestError(f"{manifest.path} has no {precision} ONNX graphs (missing for "
                                f"{', '.join(missing) or tn.FULL_MODEL}); create them first: {make}")
        for stage in manifest.stages:
            jobs.append(BuildJob(stage.name, precision, stage.onnx[precision], stage.inputs,
                                 stage.engines))
        full = manifest.full_model
        jobs.append(BuildJob(tn.FULL_MODEL, precision, full["onnx"][precision], full["inputs"],
                             full.setdefault("engines", {})))
    return jobs


def _cached(manifest: Manifest, job: BuildJob, key: str) -> bool:
    record = job.records.get(key)
    if not record:
        return False
    path = manifest.resolve(FileRef(**record["file"]))
    return path.is_file() and path.stat().st_size == record["file"]["bytes"] and \
        sha256_file(path) == record["file"]["sha256"]


def deploy_copy(manifest: Manifest, out_dir: str | Path) -> Manifest:
    """The model directory copied to ``out_dir`` to build into (e.g. ``engines/<model>``).

    Copies the manifest and every file it lists (ONNX graphs of every precision, the
    calibration set, the checkpoint), each verified and written atomically, skipping files
    already there with the right hash. Engines are not copied; engines and engine records
    already in ``out_dir`` are kept, so a rebuild there reuses its cache.

    Returns:
        The copy's manifest (saved), or ``manifest`` itself if ``out_dir`` is its directory.
    """
    import shutil

    from trt_exit.fileio import atomic_path
    from trt_exit.manifest import MANIFEST_NAME

    out = Path(out_dir).resolve()
    if out == manifest.root.resolve():
        return manifest
    previous = Manifest.load(out) if (out / MANIFEST_NAME).is_file() else None
    refs = [(ref, f"{s.name} ({p})") for s in manifest.stages for p, ref in s.onnx.items()]
    refs += [(ref, f"full ({p})") for p, ref in manifest.full_model.get("onnx", {}).items()]
    refs += [(ref, f"early-exit graph ({p})") for p, ref in manifest.early_exit_graph.items()]
    for record, what in ((manifest.calibration.get("file"), "calibration set"),
                         (manifest.model.get("checkpoint"), "checkpoint")):
        if record:
            refs.append((FileRef(**record), what))
    for ref, what in refs:
        source = manifest.verified_path(ref, what)
        target = out / ref.path
        if target.is_file() and sha256_file(target) == ref.sha256:
            continue
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
    copy = Manifest.from_dict(manifest.to_dict(), out)
    # Engines are not copied (they belong to the device that built them): the copy lists the
    # engines already built in ``out`` only.
    old = {s.name: s.engines for s in previous.stages} if previous else {}
    for stage in copy.stages:
        stage.engines = dict(old.get(stage.name, {}))
    copy.full_model["engines"] = dict(previous.full_model.get("engines", {})) if previous else {}
    copy.build = dict(previous.build) if previous else {}
    copy.save()
    return copy


def _relative(path: Path, root: Path) -> str:
    """``path`` relative to the manifest's directory when inside it (the directory moves as a
    whole), else absolute."""
    path, root = Path(path).resolve(), Path(root).resolve()
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def default_timing_cache(manifest: Manifest, target: Target) -> Path:
    """``engines/timing.<target>.cache`` next to the manifest."""
    return manifest.root / ENGINE_DIR / f"timing.{target.slug()}.cache"


def build_engines(manifest: Manifest, config: BuildConfig, progress: bool = True) -> BuildSummary:
    """Builds (or finds cached) engines for every stage and the baseline; updates the manifest.

    Args:
        manifest: The model, with ONNX graphs of every precision in ``config.precisions``.
        config: Build settings.
        progress: Show a progress bar over the engines.

    Returns:
        What was built and what was reused.
    """
    from trt_exit.progress import progress_bar

    jobs = build_jobs(manifest, config.precisions)
    target, device = current_target(config.device)
    summary = BuildSummary(target)
    cache_path = config.timing_cache or default_timing_cache(manifest, target)
    summary.timing_cache = cache_path
    timing_cache = cache_path.read_bytes() if cache_path.is_file() else None
    logger = make_logger()
    began = time.perf_counter()
    bar = progress_bar(jobs, desc="TensorRT engines", unit="engine", enabled=progress,
                       lines=True)
    for job in bar:
        label = f"{job.name}.{job.precision}"
        bar.set_postfix_str(label)
        onnx_path = manifest.verified_path(job.onnx, f"{job.name} ({job.precision})")
        key = engine_key(job.onnx.sha256, job.precision, target, config.engine_options())
        if not config.rebuild and _cached(manifest, job, key):
            summary.cached.append(label)
            continue
        engine_path = manifest.root / engine_filename(job.name, key)
        network = NetworkFromOnnxPath(onnx_path, job.inputs, logger)
        build = EngineBytesFromNetwork(network, config, timing_cache)()
        placement = {}
        if config.dla_core is not None:
            placement = _check_dla(label, build.engine, logger, summary)
        SaveEngine(build, engine_path)()
        timing_cache = build.timing_cache
        atomic_write_bytes(cache_path, timing_cache)
        job.records[key] = {
            "precision": job.precision,
            "file": dataclasses.asdict(FileRef.of(engine_path, manifest.root)),
            "onnx_sha256": job.onnx.sha256,
            "target": target.to_dict(),
            **config.engine_options(),
            "workspace_mib": config.workspace_mib,
            **placement,
            "build_seconds": round(build.seconds, 3),
            "built": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        manifest.save()
        summary.built.append(label)
    summary.seconds = time.perf_counter() - began
    manifest.build = {
        **manifest.build,
        "target": target.to_dict(),
        "device": device,
        "timing_cache": _relative(cache_path, manifest.root),
        "last": {"precisions": list(config.precisions), **config.engine_options(),
                 "workspace_mib": config.workspace_mib, "built": summary.built,
                 "cached": summary.cached, "seconds": round(summary.seconds, 3),
                 "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")},
    }
    manifest.save()
    return summary
