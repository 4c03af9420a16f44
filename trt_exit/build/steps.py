"""Build steps, Polygraphy style: small callables named ``XFromY`` that do nothing until called,
each with a plain-function twin.

    network = NetworkFromOnnxPath("onnx/fp16/segment_0.onnx", specs)
    engine = EngineBytesFromNetwork(network, BuildConfig(precisions=("fp16",)))
    SaveEngine(engine, "engines/segment_0.fp16.engine")()

or, eagerly, ``save_engine(engine_bytes_from_network(network_from_onnx_path(path, specs),
config).engine, target)``.

The network is always created ``STRONGLY_TYPED``: each tensor keeps the type the ONNX graph
gives it (FP16 casts, INT8 Q/DQ), on TensorRT 10.3 and 11.x alike.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from trt_exit.build import preflight
from trt_exit.build.config import BuildConfig
from trt_exit.build.errors import EngineBuildError, OnnxParseError
from trt_exit.build.trt_api import import_tensorrt
from trt_exit.errors import ArtifactError, ConfigError
from trt_exit.fileio import atomic_write_bytes
from trt_exit.manifest import TensorSpec

log = logging.getLogger("trt_exit.tensorrt")

_SEVERITY_NAMES = ("internal error", "error", "warning", "info", "verbose")


def make_logger(min_severity: str = "WARNING"):
    """A TensorRT logger that forwards to Python logging (``trt_exit.tensorrt``) and keeps every
    error and warning, so a failed step can say what TensorRT said.

    Args:
        min_severity: ``ERROR``, ``WARNING``, ``INFO`` or ``VERBOSE``.
    """
    trt = import_tensorrt("TensorRT logging")
    severities = trt.ILogger.Severity
    threshold = int({"ERROR": severities.ERROR, "WARNING": severities.WARNING,
                     "INFO": severities.INFO, "VERBOSE": severities.VERBOSE}[min_severity])
    errors_up_to = int(severities.WARNING)

    class CapturingLogger(trt.ILogger):
        """Keeps ``(severity, message)`` of errors and warnings in :attr:`messages`."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[tuple[str, str]] = []

        def log(self, severity, msg) -> None:
            level = int(severity)
            name = _SEVERITY_NAMES[min(level, len(_SEVERITY_NAMES) - 1)]
            if level <= errors_up_to:
                self.messages.append((name, str(msg)))
            if level <= threshold:
                emit = log.error if level <= 1 else log.warning if level == 2 else log.debug
                emit("TensorRT %s: %s", name, msg)

        def errors(self) -> str:
            """What TensorRT reported as errors (or warnings, if there were no errors)."""
            picked = [m for s, m in self.messages if s != "warning"] or \
                [m for _, m in self.messages]
            return "; ".join(picked[-5:]) or "(TensorRT logged no error)"

    return CapturingLogger()


# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class ParserIssue:
    """One error of TensorRT's ONNX parser.

    Field names differ from ``trt.ParserError``'s methods on purpose: in TensorRT modules a
    TensorRT member name means TensorRT (see :mod:`trt_exit.build.trt_api`).

    Attributes:
        node_index: Index of the failing node in the graph (-1: not tied to a node).
        onnx_node: Its name.
        onnx_op: Its op type.
        error_code: TensorRT's error code (e.g. ``ErrorCode.UNSUPPORTED_NODE``).
        message: What the parser said.
    """

    node_index: int
    onnx_node: str
    onnx_op: str
    error_code: str
    message: str


def format_parser_issues(path: str | os.PathLike, issues: list[ParserIssue]) -> str:
    """The message of an :class:`OnnxParseError`: one line per failing node."""
    lines = []
    for issue in issues:
        where = (f"node {issue.node_index} {issue.onnx_node!r} (op {issue.onnx_op})"
                 if issue.node_index >= 0 else "the graph")
        lines.append(f"{where}: {issue.message} [{issue.error_code}]")
    return (f"TensorRT's ONNX parser cannot import {path}: " + "; ".join(lines or ["(no detail)"])
            + ". If the op is new, a newer TensorRT may parse it; otherwise change the model so "
              "that it exports without it")


def _parser_issues(parser) -> list[ParserIssue]:
    issues = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        issues.append(ParserIssue(int(error.node()), str(error.node_name()),
                                  str(error.node_operator()), str(error.code()),
                                  str(error.desc())))
    return issues


@dataclass
class ParsedNetwork:
    """A strongly typed TensorRT network parsed from ONNX, with what keeps it alive.

    Attributes:
        path: The ONNX file.
        inputs: The manifest's specs of the graph inputs (for the optimization profile).
        builder: The ``trt.Builder`` that owns the network.
        network: The ``trt.INetworkDefinition``.
        parser: The ``trt.OnnxParser`` (holds the weights the network refers to).
        logger: The capturing logger (see :func:`make_logger`).
    """

    path: Path
    inputs: list[TensorSpec]
    builder: Any
    network: Any
    parser: Any
    logger: Any


def network_from_onnx_path(path: str | os.PathLike, inputs: list[TensorSpec],
                           logger=None) -> ParsedNetwork:
    """Parses an ONNX file into a strongly typed TensorRT network.

    Args:
        path: The ONNX graph.
        inputs: Its inputs as the manifest describes them (names must match the graph's).
        logger: A logger from :func:`make_logger` (default: a new one).

    Raises:
        OnnxParseError: The preflight check or TensorRT's parser rejected the graph; the message
            names each failing node and op.
        ArtifactError: The graph's inputs differ from the manifest's.
    """
    trt = import_tensorrt("Building TensorRT engines")
    path = Path(path)
    preflight.check_parsable(path)
    logger = logger or make_logger()
    trt.init_libnvinfer_plugins(logger, "")
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        raise OnnxParseError(format_parser_issues(path, _parser_issues(parser)))
    graph_inputs = sorted(network.get_input(i).name for i in range(network.num_inputs))
    if graph_inputs != sorted(t.name for t in inputs):
        raise ArtifactError(f"{path}: graph inputs {graph_inputs} differ from the manifest's "
                            f"{sorted(t.name for t in inputs)}; re-export the model")
    return ParsedNetwork(path, list(inputs), builder, network, parser, logger)


class NetworkFromOnnxPath:
    """Lazy :func:`network_from_onnx_path`."""

    def __init__(self, path: str | os.PathLike, inputs: list[TensorSpec], logger=None):
        self.path = Path(path)
        self.inputs = inputs
        self.logger = logger

    def __call__(self) -> ParsedNetwork:
        return network_from_onnx_path(self.path, self.inputs, self.logger)


# --------------------------------------------------------------------------- building


@dataclass
class EngineBuild:
    """A serialized engine and what its build produced.

    Attributes:
        engine: The serialized engine (a TensorRT plan).
        timing_cache: The builder's timing cache after the build (to persist and reuse).
        seconds: Build time.
    """

    engine: bytes
    timing_cache: bytes
    seconds: float
    notes: list[str] = field(default_factory=list)


def builder_config(parsed: ParsedNetwork, config: BuildConfig, timing_cache: bytes | None = None):
    """A ``trt.IBuilderConfig`` for ``config``: workspace limit, the batch profile on every input,
    the timing cache, DLA, version compatibility and optimization level.

    Raises:
        ConfigError: DLA asked for on a device without one (or a core it does not have).
    """
    trt = import_tensorrt("Building TensorRT engines")
    builder = parsed.builder
    settings = builder.create_builder_config()
    settings.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_mib << 20)
    profile = builder.create_optimization_profile()
    for spec in parsed.inputs:
        minimum, optimum, maximum = config.profile.shapes(spec)
        profile.set_shape(spec.name, minimum, optimum, maximum)
    settings.add_optimization_profile(profile)
    cache = settings.create_timing_cache(timing_cache or b"")
    if not settings.set_timing_cache(cache, False):
        log.warning("the timing cache does not match this device or TensorRT; starting a new one")
        settings.set_timing_cache(settings.create_timing_cache(b""), False)
    if config.dla_core is not None:
        cores = builder.num_DLA_cores
        if config.dla_core >= cores:
            raise ConfigError(
                f"DLA core {config.dla_core} asked for, but this device has {cores} DLA cores "
                f"(Jetson AGX Orin and Orin NX have 2, Orin Nano none); build without --dla-core")
        settings.default_device_type = trt.DeviceType.DLA
        settings.DLA_core = config.dla_core
        if config.gpu_fallback:
            settings.set_flag(trt.BuilderFlag.GPU_FALLBACK)
        # Layer details in the plan, so that dla_layers() can tell where each layer runs.
        settings.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if config.version_compatible:
        # The lean runtime stays in the plan (no EXCLUDE_LEAN_RUNTIME): the loader then needs
        # only engine_host_code_allowed (tensorrt_backend), not IRuntime.load_runtime.
        settings.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if config.optimization_level is not None:
        settings.builder_optimization_level = config.optimization_level
    return settings


def engine_bytes_from_network(parsed: ParsedNetwork, config: BuildConfig,
                              timing_cache: bytes | None = None) -> EngineBuild:
    """Builds and serializes the engine of a parsed network.

    Raises:
        EngineBuildError: TensorRT could not build it; the message carries TensorRT's errors.
    """
    settings = builder_config(parsed, config, timing_cache)
    began = time.perf_counter()
    serialized = parsed.builder.build_serialized_network(parsed.network, settings)
    seconds = time.perf_counter() - began
    if serialized is None:
        raise EngineBuildError(
            f"TensorRT could not build an engine from {parsed.path}: {parsed.logger.errors()}. "
            f"Try a larger --workspace-mib, or build without --dla-core")
    cache = settings.get_timing_cache().serialize()
    return EngineBuild(bytes(memoryview(serialized)), bytes(memoryview(cache)), seconds)


class EngineBytesFromNetwork:
    """Lazy :func:`engine_bytes_from_network`; ``network`` may be a loader (e.g.
    :class:`NetworkFromOnnxPath`) or a :class:`ParsedNetwork`."""

    def __init__(self, network: ParsedNetwork | Callable[[], ParsedNetwork], config: BuildConfig,
                 timing_cache: bytes | None = None):
        self.network = network
        self.config = config
        self.timing_cache = timing_cache

    def __call__(self) -> EngineBuild:
        network = self.network if isinstance(self.network, ParsedNetwork) else self.network()
        return engine_bytes_from_network(network, self.config, self.timing_cache)


def count_dla_layers(information: str) -> tuple[int, int]:
    """``(DLA layers, all layers)`` in an engine inspector's JSON (``LayerInformationFormat.JSON``).

    A layer counts as DLA when its description mentions DLA (layer type, name or tactic: with
    ``ProfilingVerbosity.DETAILED`` TensorRT describes each layer's placement there); the
    reformat layers to and from DLA memory do too. Our reading of the inspector's output: not
    yet checked against a DLA engine on a Jetson.
    """
    import json

    layers = json.loads(information or "{}").get("Layers", [])
    dla = sum("DLA" in (layer if isinstance(layer, str) else json.dumps(layer))
              for layer in layers)
    return dla, len(layers)


def dla_layers(engine: bytes, logger) -> tuple[int, int]:
    """``(DLA layers, all layers)`` of a serialized engine (engine inspector; needs the GPU it
    was built for)."""
    trt = import_tensorrt("Inspecting TensorRT engines")
    runtime = trt.Runtime(logger)
    deserialized = runtime.deserialize_cuda_engine(engine)
    if deserialized is None:
        raise EngineBuildError(f"TensorRT could not load the engine it just built: "
                               f"{logger.errors()}")
    inspector = deserialized.create_engine_inspector()
    return count_dla_layers(inspector.get_engine_information(trt.LayerInformationFormat.JSON))


def save_engine(engine: bytes | EngineBuild, path: str | os.PathLike) -> Path:
    """Writes a serialized engine atomically (never a half-written engine file)."""
    data = engine.engine if isinstance(engine, EngineBuild) else engine
    if not data:
        raise EngineBuildError(f"refusing to write an empty engine to {path}")
    return atomic_write_bytes(path, data)


class SaveEngine:
    """Lazy :func:`save_engine`; ``engine`` may be a loader (e.g. :class:`EngineBytesFromNetwork`)."""

    def __init__(self, engine: bytes | EngineBuild | Callable[[], EngineBuild],
                 path: str | os.PathLike):
        self.engine = engine
        self.path = Path(path)

    def __call__(self) -> Path:
        engine = self.engine() if callable(self.engine) else self.engine
        return save_engine(engine, self.path)
