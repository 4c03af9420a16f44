"""``trt-exit triton-repo``: a Triton model repository for a stock ``tritonserver``.

Layout written (``<name>`` is the manifest's model name unless given)::

    REPO/
      README.md                how to start it
      <name>/
        config.pbtxt           Python backend; inputs/outputs from the manifest; dynamic
                               batching; instance group CPU or GPU; max batch (engine profile)
        1/
          model.py             imports trt_exit.serving.triton_model.TritonPythonModel
          model/               manifest.json and the files it lists (unless --reference)
      <name>_onnx/             with --onnxruntime-model: the single early-exit graph for
        config.pbtxt           Triton's own onnxruntime backend (no Python in the request path)
        1/model.onnx

The repository is written next to its final place and renamed into it, so an interrupted
export leaves nothing half-written; an existing ``REPO`` is refused.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from trt_exit.errors import ConfigError
from trt_exit.fileio import check_folder_outside, check_output_dir, sha256_file
from trt_exit.manifest import MANIFEST_NAME, Manifest
from trt_exit.serving.model_io import (
    TensorIO,
    resolve_max_batch,
    served_inputs,
    served_model_name,
    served_outputs,
)

MODEL_PY = '''"""Triton Python-backend model: a trt_exit early-exit model (written by trt-exit triton-repo).

The early-exit chain runs in trt_exit's executor; install trt_exit in the Python environment the
server's Python backend uses (see ../../README.md).
"""

from trt_exit.serving.triton_model import TritonPythonModel  # noqa: F401
'''

BACKENDS_ON_GPU = ("torch", "tensorrt")


@dataclass
class RepositoryConfig:
    """What ``trt-exit triton-repo`` writes.

    Attributes:
        model_dir: The model directory (``manifest.json`` ...).
        out: The repository directory to create.
        model_name: Name in the repository (default: the manifest's model name).
        backend / precision / threads / policy: How the model runs (as ``trt-exit serve``).
        max_batch: Max batch (default: the engines' profile, or 16 for ONNX Runtime).
        max_queue_delay_us: Dynamic batcher's queue delay.
        instance_kind: ``auto`` (GPU for torch/tensorrt, else CPU), ``cpu`` or ``gpu``.
        instances: Instances (per GPU for ``gpu``).
        reference: Point at ``model_dir`` by absolute path instead of copying its files.
        onnxruntime_model: Also write ``<name>_onnx``: the model's single early-exit graph of
            ``precision`` for Triton's onnxruntime backend (CPU instances, the tuned thresholds).
    """

    model_dir: str | os.PathLike
    out: str | os.PathLike
    model_name: str | None = None
    backend: str = "onnxruntime"
    precision: str = "fp32"
    threads: int = 1
    policy: str | None = None
    max_batch: int | None = None
    max_queue_delay_us: int = 1000
    instance_kind: str = "auto"
    instances: int = 1
    reference: bool = False
    onnxruntime_model: bool = False


def _tensor_block(io: TensorIO) -> str:
    dims = ", ".join(str(d) for d in io.dims)
    return f'  {{\n    name: "{io.name}"\n    data_type: TYPE_{io.triton_dtype}\n    dims: [ {dims} ]\n  }}'


def config_pbtxt(manifest: Manifest, config: RepositoryConfig, name: str, max_batch: int,
                 model_dir: str) -> str:
    """The model's ``config.pbtxt`` (protobuf text format)."""
    kind = config.instance_kind
    if kind == "auto":
        kind = "gpu" if config.backend in BACKENDS_ON_GPU else "cpu"
    if kind not in ("cpu", "gpu"):
        raise ConfigError(f"--instance-kind must be auto, cpu or gpu, not {kind!r}")
    if kind == "cpu" and config.backend in BACKENDS_ON_GPU:
        raise ConfigError(f"--backend {config.backend} runs on a GPU: use --instance-kind gpu "
                          f"(or --backend onnxruntime for CPU instances)")
    if config.instances < 1:
        raise ConfigError(f"--instances must be at least 1, got {config.instances}")
    parameters = {"model_dir": model_dir, "backend": config.backend,
                  "precision": config.precision, "policy": config.policy or "",
                  "threads": str(config.threads)}
    lines = [
        f'name: "{name}"',
        'backend: "python"',
        f"max_batch_size: {max_batch}",
        "input [\n" + ",\n".join(_tensor_block(io) for io in served_inputs(manifest)) + "\n]",
        "output [\n" + ",\n".join(_tensor_block(io) for io in served_outputs(manifest)) + "\n]",
        f"dynamic_batching {{\n  max_queue_delay_microseconds: {config.max_queue_delay_us}\n}}",
        f"instance_group [\n  {{\n    count: {config.instances}\n    kind: KIND_{kind.upper()}\n  }}\n]",
    ]
    for key, value in parameters.items():
        lines.append(f'parameters: {{\n  key: "{key}"\n  value: {{ string_value: "{value}" }}\n}}')
    return "\n".join(lines) + "\n"


#: Suffix of the onnxruntime-backend model's name.
ONNX_SUFFIX = "_onnx"


def _graph_tensors(path: Path) -> tuple[list[TensorIO], list[TensorIO]]:
    """The single graph's inputs (those without a default) and outputs, per sample (the batch
    dimension dropped), read from the ONNX file itself."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    defaults = {t.name for t in model.graph.initializer}

    def tensors(values) -> list[TensorIO]:
        out = []
        for value in values:
            if value.name in defaults:
                continue
            tensor = value.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
            if not dims or dims[0] != -1 or any(d < 1 for d in dims[1:]):
                raise ConfigError(f"{path}: {value.name} has shape {dims}; Triton's batching "
                                  f"needs a dynamic batch first and fixed dimensions after it")
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
            out.append(TensorIO(value.name, tuple(dims[1:]), dtype))
        return out

    return tensors(model.graph.input), tensors(model.graph.output)


def onnxruntime_config_pbtxt(graph: Path, config: RepositoryConfig, name: str,
                             max_batch: int) -> str:
    """``config.pbtxt`` of the single early-exit graph on Triton's onnxruntime backend.

    Tensors are read from the graph. A per-sample scalar (confidence, exit index: (B,) in the
    graph) is declared as dims ``[ 1 ]`` with ``reshape: { shape: [ ] }``, as Triton requires.
    The thresholds input has a default (the tuned thresholds) and no batch dimension, so it is
    not an input of the served model.
    """
    if config.instances < 1:
        raise ConfigError(f"--instances must be at least 1, got {config.instances}")

    def block(io: TensorIO) -> str:
        if io.dims:
            return _tensor_block(io)
        text = _tensor_block(TensorIO(io.name, (1,), io.dtype))
        return text[: -len("\n  }")] + "\n    reshape: { shape: [ ] }\n  }"

    inputs, outputs = _graph_tensors(graph)
    lines = [
        f'name: "{name}"',
        'backend: "onnxruntime"',
        f"max_batch_size: {max_batch}",
        "input [\n" + ",\n".join(block(io) for io in inputs) + "\n]",
        "output [\n" + ",\n".join(block(io) for io in outputs) + "\n]",
        f"dynamic_batching {{\n  max_queue_delay_microseconds: {config.max_queue_delay_us}\n}}",
        f"instance_group [\n  {{\n    count: {config.instances}\n    kind: KIND_CPU\n  }}\n]",
    ]
    for key, value in (("intra_op_thread_count", config.threads), ("inter_op_thread_count", 1)):
        lines.append(f'parameters: {{\n  key: "{key}"\n  value: {{ string_value: "{value}" }}\n}}')
    return "\n".join(lines) + "\n"


def manifest_files(manifest: Manifest) -> list[Path]:
    """Every file the manifest lists (graphs of every precision, engines, checkpoint), relative
    to its directory, after checking each against its sha256."""
    from trt_exit.manifest import FileRef

    refs: list[tuple[FileRef, str]] = []
    for stage in manifest.stages:
        refs += [(ref, f"{stage.name} ({p})") for p, ref in stage.onnx.items()]
        refs += [(FileRef(**record["file"]), f"{stage.name} engine {key}")
                 for key, record in stage.engines.items() if "file" in record]
    refs += [(ref, f"full model ({p})") for p, ref in manifest.full_model.get("onnx", {}).items()]
    refs += [(ref, f"early-exit graph ({p})") for p, ref in manifest.early_exit_graph.items()]
    refs += [(FileRef(**record["file"]), f"full model engine {key}")
             for key, record in manifest.full_model.get("engines", {}).items() if "file" in record]
    if manifest.model.get("checkpoint"):
        refs.append((FileRef(**manifest.model["checkpoint"]), "checkpoint"))
    root = manifest.root.resolve()
    files = []
    for ref, what in refs:
        path = manifest.verified_path(ref, what)
        if not path.is_relative_to(root):
            raise ConfigError(f"{manifest.path}: {what} is outside the model directory ({path})")
        files.append(path.relative_to(root))
    return files


def readme(name: str, config: RepositoryConfig, max_batch: int, kind: str) -> str:
    """The repository's README.md."""
    gpu = kind == "gpu"
    return f"""# Triton model repository: `{name}` (written by `trt-exit triton-repo`)

A Python-backend model that runs the early-exit chain of a trt_exit model with trt_exit's own
executor ({config.backend}, {config.precision}): each sample of a dynamic batch (max batch
{max_batch}) leaves at its own exit.

## Start it

The server's Python backend must import `trt_exit`: install it (with the `onnxruntime` /
`tensorrt` / `cuda` extras the backend needs) into the Python environment the backend runs.

    tritonserver --model-repository=$PWD

for example in NVIDIA's container (`nvcr.io/nvidia/tritonserver:<yy.mm>-py3`, mount this
directory and `pip install trt-exit` inside it first), or on a Jetson with the Triton release for
JetPack. Without a Triton install, `trt-exit tritonserver --model-repository=$PWD` runs the
tritonserver bundled with nvidia-pytriton (`pip install 'trt-exit[serve]'`). If Python was not
installed by the system (pyenv, conda) and loading fails with
`'_thread.RLock' object has no attribute '_recursion_count'`, put that Python's library
directory first: `export LD_LIBRARY_PATH=$(python3 -c "import sysconfig;
print(sysconfig.get_config_var('LIBDIR'))"):$LD_LIBRARY_PATH`.

## Inputs and outputs

See `{name}/config.pbtxt`. Outputs per sample: `output` (the taken exit's logits or values),
`exit_index` (0-based), `confidence`, `prediction` (class or values). A request with NaN or Inf
values gets an error response of its own; wrong shapes and dtypes are refused by Triton.

## Metrics

Triton's Prometheus endpoint (port 8002 by default, `/metrics`) has the standard
`nv_inference_*` counters and `trt_exit_exit_samples_total{{model="{name}",exit="K"}}`, the
samples answered at each exit.

## Settings

`{name}/config.pbtxt` parameters: `backend`, `precision`, `policy` (`trt-exit run --policy`
spelling; empty = tuned thresholds), `threads`, `model_dir`. Instance group: {kind.upper()}
({"the CUDA executor, one graph per batch" if gpu else "ONNX Runtime on the CPU"}).
"""


def onnx_readme(name: str, config: RepositoryConfig) -> str:
    """The README section on the onnxruntime-backend model."""
    model = name + ONNX_SUFFIX
    return f"""
## `{model}`: the single graph on Triton's onnxruntime backend

`{model}/1/model.onnx` is the model's whole exit chain as one ONNX graph ({config.precision}):
Triton's own onnxruntime backend runs it, with no Python in the request path and dynamic
batching (max queue delay {config.max_queue_delay_us} us). Outputs per sample: `output`,
`confidence` and `exit_index` (INT64). The exit thresholds are the graph's defaults, the tuned
ones: re-run `trt-exit tune` and write the repository anew to change them. A batch runs until
its least confident sample exits (the batch is not compacted), so at large batches the Python
model above may be faster; `trt-exit tune` records where the single graph stops being faster
(`tuning.<precision>.strategy` in the manifest). CPU instances ({config.instances}, intra-op
threads {config.threads}): the single graph is the CPU artifact (docs/executor.md).
"""


def write_repository(config: RepositoryConfig) -> Path:
    """Writes the repository; returns the model's directory in it.

    Every option is checked as ``trt-exit serve`` checks it (the policy against the model, the
    model name) before anything is written.

    Raises:
        ConfigError: ``out`` exists, or an option is invalid.
        OutputError: ``out`` lies inside the model directory.
        ArtifactError / ManifestError: A model file is missing or does not match its hash.
    """
    from trt_exit.commands.spine import parse_policy

    manifest = Manifest.load(config.model_dir)
    out = Path(config.out)
    if out.exists() or out.is_symlink():
        raise ConfigError(f"{out} already exists; choose a new --out directory (the "
                          f"repository is written whole)")
    check_output_dir(out.parent, "--out")  # exists and is writable; not created silently
    check_folder_outside(out, manifest.root, "--out", "write the repository outside it")
    parse_policy(config.policy, manifest)  # the model runs it: refused here, not at load
    name = served_model_name(manifest, config.model_name)
    max_batch = resolve_max_batch(manifest, config.backend, config.precision, config.max_batch)
    if config.precision not in manifest.precisions() and config.backend != "tensorrt":
        raise ConfigError(f"{manifest.path} has no {config.precision} graphs (has: "
                          f"{', '.join(manifest.precisions())}); choose one with --precision")
    files = [] if config.reference else manifest_files(manifest)
    model_dir = str(manifest.root.resolve()) if config.reference else "model"
    text = config_pbtxt(manifest, config, name, max_batch, model_dir)
    kind = "gpu" if "KIND_GPU" in text else "cpu"
    graph = onnx_text = None
    if config.onnxruntime_model:
        graph = manifest.early_exit_graph_path(config.precision)  # sha256 checked
        onnx_text = onnxruntime_config_pbtxt(graph, config, name + ONNX_SUFFIX, max_batch)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        version = staging / name / "1"
        version.mkdir(parents=True)
        (staging / name / "config.pbtxt").write_text(text)
        (version / "model.py").write_text(MODEL_PY)
        (staging / "README.md").write_text(readme(name, config, max_batch, kind) + (
            onnx_readme(name, config) if graph is not None else ""))
        if graph is not None:
            (staging / (name + ONNX_SUFFIX) / "1").mkdir(parents=True)
            (staging / (name + ONNX_SUFFIX) / "config.pbtxt").write_text(onnx_text)
            shutil.copy2(graph, staging / (name + ONNX_SUFFIX) / "1" / "model.onnx")
            if sha256_file(staging / (name + ONNX_SUFFIX) / "1" / "model.onnx") != \
                    manifest.early_exit_graph[config.precision].sha256:
                raise ConfigError(f"{graph} changed while it was copied; run the command again")
        if not config.reference:
            target = version / "model"
            for rel in files:
                (target / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(manifest.root / rel, target / rel)
            shutil.copy2(manifest.path, target / MANIFEST_NAME)
            Manifest.load(target, verify=True)  # the copy is complete and intact
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out / name
