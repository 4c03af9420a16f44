"""Build settings: what ``trt-exit build`` asks TensorRT for."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from trt_exit.errors import ConfigError
from trt_exit.manifest import PRECISIONS, TensorSpec

log = logging.getLogger(__name__)
#: How version-compatible engines carry TensorRT's lean runtime (recorded in the cache key): in
#: the plan itself, so a later TensorRT of the same major deserializes them with
#: ``engine_host_code_allowed`` and nothing else (``EXCLUDE_LEAN_RUNTIME`` would make every
#: loader call ``IRuntime.load_runtime`` with the building version's lean library).
LEAN_RUNTIME_EMBEDDED = "embedded"


@dataclass(frozen=True)
class BatchProfile:
    """The optimization profile of the dynamic batch dimension (every other dimension is fixed).

    TensorRT picks kernels for ``opt_batch`` and accepts any batch in
    ``[min_batch, max_batch]``. Early exiting is for the streaming case, so the default is
    tuned for batch 1 and accepts up to 8.
    """

    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 8

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ConfigError(
                f"batch profile needs 1 <= min <= opt <= max; got min {self.min_batch}, opt "
                f"{self.opt_batch}, max {self.max_batch}")

    def shapes(self, spec: TensorSpec) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) shapes of ``spec`` (its ``-1`` batch dimension filled in)."""
        if not spec.shape or spec.shape[0] != -1 or any(d < 1 for d in spec.shape[1:]):
            raise ConfigError(f"tensor {spec.name} has shape {spec.shape}; the build expects a "
                              f"dynamic batch (-1) followed by fixed dimensions")
        rest = tuple(spec.shape[1:])
        return ((self.min_batch, *rest), (self.opt_batch, *rest), (self.max_batch, *rest))

    @property
    def static(self) -> bool:
        """One batch size only (what DLA needs)."""
        return self.min_batch == self.max_batch

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class BuildConfig:
    """Settings of one ``trt-exit build``.

    Attributes:
        precisions: Which graphs to build (``fp32``, ``fp16``, ``int8``): each needs its ONNX
            graphs in the manifest.
        profile: Batch optimization profile.
        workspace_mib: Limit of TensorRT's tactic workspace pool (MiB).
        timing_cache: Timing cache file, read before and written after the build (default
            ``engines/timing.<key>.cache`` next to the manifest); shared between builds of
            every model on the same device and TensorRT version.
        dla_core: Build for this DLA core (Jetson AGX Orin / Orin NX), None for the GPU. DLA
            runs static shapes only (with a dynamic batch profile TensorRT silently puts every
            layer on the GPU), so the profile becomes static at ``opt_batch``.
        gpu_fallback: With ``dla_core``: layers the DLA cannot run go to the GPU.
        version_compatible: Engines that later TensorRT versions of the same major can run
            (``BuilderFlag.VERSION_COMPATIBLE``; slower to load, a little slower to run).
        optimization_level: TensorRT builder optimization level 0-5 (None: TensorRT's default, 3).
        rebuild: Build even when a cached engine with the same key exists.
        device: CUDA device ordinal to build on.
    """

    precisions: tuple[str, ...] = ("fp16",)
    profile: BatchProfile = field(default_factory=BatchProfile)
    workspace_mib: int = 1024
    timing_cache: Path | None = None
    dla_core: int | None = None
    gpu_fallback: bool = True
    version_compatible: bool = False
    optimization_level: int | None = None
    rebuild: bool = False
    device: int = 0

    def __post_init__(self) -> None:
        self.precisions = tuple(dict.fromkeys(self.precisions))
        unknown = [p for p in self.precisions if p not in PRECISIONS]
        if unknown or not self.precisions:
            raise ConfigError(f"unknown precision(s) {unknown or '(none)'}; choose from "
                              f"{', '.join(PRECISIONS)}")
        if self.workspace_mib < 1:
            raise ConfigError(f"workspace must be at least 1 MiB, got {self.workspace_mib}")
        if self.dla_core is not None and self.dla_core < 0:
            raise ConfigError(f"DLA core must be >= 0, got {self.dla_core}")
        if self.dla_core is not None and not self.profile.static:
            batch = self.profile.opt_batch
            log.info("DLA needs static shapes: building for batch %d only (--opt-batch)", batch)
            self.profile = BatchProfile(batch, batch, batch)
        if self.optimization_level is not None and not 0 <= self.optimization_level <= 5:
            raise ConfigError(f"optimization level must be 0-5, got {self.optimization_level}")
        if self.timing_cache is not None:
            self.timing_cache = Path(self.timing_cache)

    def engine_options(self) -> dict:
        """The settings that change what engine is built (part of the cache key)."""
        options = {"profile": self.profile.to_dict(), "dla_core": self.dla_core,
                   "gpu_fallback": self.gpu_fallback if self.dla_core is not None else None,
                   "version_compatible": self.version_compatible,
                   "optimization_level": self.optimization_level}
        if self.version_compatible:
            options["lean_runtime"] = LEAN_RUNTIME_EMBEDDED
        return options
