"""Checkpoints: safetensors weights with the model config in the file's metadata.

safetensors stores tensors only, so loading a checkpoint can never run code (unlike pickle).
The config travels in the metadata, so ``load_checkpoint`` rebuilds the model without being told
what it is. So do the outputs of every exit of the saved model on a fixed input (the
*reference*): ``load_checkpoint`` recomputes them with the rebuilt model and refuses a rebuild that
computes something else, and export compares its ONNX graphs with them, so parity is checked
against the model that was trained, not only against its rebuild.

:func:`load_weights_into` reads pretrained weights of a plain module (a timm backbone) from a
safetensors file or a PyTorch state dict (``torch.load(weights_only=True)``, no code runs) and
checks them against the architecture.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from trt_exit.errors import ArtifactError
from trt_exit.fileio import atomic_path
from trt_exit.models.multi_exit import ModelConfig, MultiExitModel, build_model

CONFIG_KEY = "trt_exit.model_config"
EXTRA_KEY = "trt_exit.extra"
REFERENCE_KEY = "trt_exit.reference"
#: Seed and batch of the reference input (numpy PCG64: identical on every machine).
REFERENCE_SEED = 20261201
REFERENCE_BATCH = 2
#: A rebuilt model must reproduce the saved outputs within this, relative to max(1, |output|).
REFERENCE_RTOL = 1e-4


def reference_inputs(model: MultiExitModel) -> dict[str, "np.ndarray"]:
    """The fixed inputs the reference outputs are computed on, by input name."""
    import numpy as np

    generator = np.random.default_rng(REFERENCE_SEED)
    return {name: generator.standard_normal((REFERENCE_BATCH, *shape)).astype(np.float32)
            for name, shape in model.input_shapes().items()}


def reference_outputs(model: MultiExitModel) -> list["np.ndarray"]:
    """Every exit's output (eval mode, on the CPU, float32) on :func:`reference_inputs`."""
    import copy

    import torch

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    net = model if device.type == "cpu" else copy.deepcopy(model).cpu()
    training = net.training
    net.eval()
    try:
        inputs = {k: torch.from_numpy(v) for k, v in reference_inputs(net).items()}
        with torch.no_grad():
            outputs = net(*inputs.values())
    finally:
        net.train(training)
    return [o.float().numpy() for o in outputs]


def compare_with_reference(outputs: list, reference: dict[str, Any]) -> list[float]:
    """Max abs difference per exit between ``outputs`` and a stored reference record; inf where
    the shapes differ."""
    import numpy as np

    diffs = []
    for out, ref in zip(outputs, reference["outputs"]):
        ref = np.asarray(ref, dtype=np.float64)
        out = np.asarray(out, dtype=np.float64)
        diffs.append(float(np.abs(out - ref).max()) if out.shape == ref.shape else float("inf"))
    if len(outputs) != len(reference["outputs"]):
        diffs.append(float("inf"))
    return diffs


def reference_tolerance(reference: dict[str, Any]) -> float:
    import numpy as np

    scale = max([1.0] + [float(np.abs(np.asarray(r)).max()) for r in reference["outputs"]])
    return REFERENCE_RTOL * scale


def save_checkpoint(model: MultiExitModel, path: str | os.PathLike,
                    extra: dict[str, Any] | None = None) -> Path:
    """Writes ``model``'s weights and config to ``path`` (``.safetensors``) atomically.

    Args:
        model: The model.
        path: Destination file.
        extra: JSON-serializable information stored alongside (e.g. training history).
    """
    from safetensors.torch import save_model

    import torch

    metadata = {CONFIG_KEY: json.dumps(model.config.to_dict()),
                REFERENCE_KEY: json.dumps({
                    "seed": REFERENCE_SEED, "batch": REFERENCE_BATCH, "torch": torch.__version__,
                    "outputs": [o.tolist() for o in reference_outputs(model)]})}
    if extra:
        metadata[EXTRA_KEY] = json.dumps(extra)
    with atomic_path(path) as tmp:
        save_model(model, str(tmp), metadata=metadata)
    return Path(path)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The config and extra information stored in a checkpoint."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as exc:  # safetensors raises SafetensorError and others for bad files
        raise ArtifactError(f"{path} is not a readable safetensors checkpoint ({exc})") from exc
    if CONFIG_KEY not in metadata:
        raise ArtifactError(f"{path} is a safetensors file but not a trt_exit checkpoint "
                            f"(no {CONFIG_KEY!r} metadata)")
    from trt_exit.manifest_schema import check_model_config

    reference = _metadata_object(path, metadata, REFERENCE_KEY)
    if reference is not None:
        _check_reference(path, reference)
    config = _metadata_object(path, metadata, CONFIG_KEY)
    check_model_config(config, str(path), CONFIG_KEY, advice=_DAMAGED)
    return {"config": config,
            "extra": _metadata_object(path, metadata, EXTRA_KEY) or {},
            "reference": reference}


_DAMAGED = "the checkpoint is damaged or was not written by trt-exit: train it again"


def _check_reference(path: Path, reference: dict[str, Any]) -> None:
    """The reference outputs must be arrays of numbers (one per exit)."""
    import numpy as np

    outputs = reference.get("outputs")
    if not isinstance(outputs, list):
        raise ArtifactError(f"{path}: its {REFERENCE_KEY!r} metadata has no list of outputs; "
                            f"{_DAMAGED}")
    for k, output in enumerate(outputs):
        try:
            values = np.asarray(output, dtype=np.float64)  # null reads as NaN
        except (TypeError, ValueError):
            values = None
        if values is None or not np.isfinite(values).all():
            raise ArtifactError(f"{path}: its {REFERENCE_KEY!r} metadata: output {k} is not an "
                                f"array of finite numbers; {_DAMAGED}")


def _metadata_object(path: Path, metadata: dict[str, str], key: str) -> dict[str, Any] | None:
    """The JSON object stored under ``key`` in a checkpoint's metadata (None when absent),
    within the limits of :func:`trt_exit.manifest_schema.check_document`.

    Raises:
        ArtifactError: Not JSON, not an object, nested too deep, a number out of range.
    """
    from trt_exit.manifest_schema import check_document

    if key not in metadata:
        return None
    advice = _DAMAGED
    try:
        value = json.loads(metadata[key])
    except (ValueError, RecursionError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ArtifactError(f"{path}: its {key!r} metadata is not valid JSON ({reason}); "
                            f"{advice}") from None
    if not isinstance(value, dict):
        raise ArtifactError(f"{path}: its {key!r} metadata must be a JSON object, not "
                            f"{type(value).__name__}; {advice}")
    check_document(value, str(path), f"checkpoint metadata {key!r}", advice)
    return value


def load_checkpoint(path: str | os.PathLike) -> MultiExitModel:
    """Rebuilds the model stored at ``path`` and loads its weights (in eval mode).

    The rebuilt model is checked against the reference outputs saved with it (checkpoints
    written before references existed are loaded unchecked); the record stays on the model as
    ``trained_reference`` for export's parity check.

    Raises:
        ArtifactError: Unreadable file, weights that do not fit the config, or a rebuilt model
            that does not reproduce the saved one.
    """
    from safetensors.torch import load_model

    metadata = read_metadata(path)
    try:
        config = ModelConfig.from_dict(metadata["config"])
        _check_size(path, config)
        with warnings.catch_warnings():  # torch's notes on odd sizes: the error says enough
            warnings.simplefilter("ignore", UserWarning)
            model = build_model(config)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, ArithmeticError,
            AssertionError, MemoryError, RuntimeError) as exc:
        # The config is the checkpoint's own, as untrusted as its weights: a value of the wrong
        # type or size shows as one of these from the model's constructors (ConfigError too;
        # ArithmeticError: num_heads 0; AssertionError: timm's own checks of its arguments).
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise ArtifactError(f"{path}: its model config does not build a model ({reason}); the "
                            f"checkpoint is damaged or from another trt-exit version") from exc
    try:
        load_model(model, str(path), strict=True)
    except Exception as exc:  # safetensors raises RuntimeError listing every key
        if not _load_old_timm_layout(model, path):
            summary = " ".join(str(exc).split())
            raise ArtifactError(f"{path}: weights do not fit the stored config "
                                f"({summary[:300]}{'...' if len(summary) > 300 else ''})") from exc
    reference = metadata["reference"]
    if reference is not None:
        diffs = compare_with_reference(reference_outputs(model), reference)
        limit = reference_tolerance(reference)
        if not max(diffs) <= limit:
            worst = max(range(len(diffs)), key=diffs.__getitem__)
            raise ArtifactError(
                f"{path}: the model rebuilt from this checkpoint does not compute what the saved "
                f"model computed (exit {worst} differs by {diffs[worst]:.3g} > {limit:.3g} on the "
                f"reference input); the config does not rebuild it (a different timm/torch "
                f"version? saved with torch {reference.get('torch')})")
        model.trained_reference = reference
    return model.eval()


def _check_size(path: str | os.PathLike, config: ModelConfig) -> None:
    """Refuses a config that builds a model much larger than the weights in the file, before
    the model is built (a config with ``embed_dim: 10**9`` would otherwise exhaust memory): the
    model is built on PyTorch's ``meta`` device first, which allocates nothing."""
    import math

    import torch
    from safetensors import safe_open

    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Initializing zero-element tensors is a no-op"
            skeleton = build_model(config)
    except NotImplementedError:  # an operation meta tensors lack: build it for real
        return
    needed = sum(t.numel() for t in skeleton.state_dict().values())
    with safe_open(str(path), framework="pt") as handle:
        stored = sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())
    if needed > 2 * stored + 1_000_000:
        raise ArtifactError(f"{path}: its model config builds a model of {needed:,} values, but "
                            f"the file holds {stored:,}: the config does not belong to these "
                            f"weights (the checkpoint is damaged)")


def _load_old_timm_layout(model: MultiExitModel, path: str | os.PathLike) -> bool:
    """Checkpoints of timm ViTs written before the adapter kept its blocks only under
    ``backbone.model``: their block weights are stored as ``backbone.blocks.*``. Loads such a
    file (renaming those keys) and returns True; False for anything else."""
    from safetensors.torch import load_file

    if model.config.backbone != "timm":
        return False
    state = load_file(str(path))
    old = "backbone.blocks."
    if not any(key.startswith(old) for key in state):
        return False
    state = {("backbone.model.blocks." + k[len(old):] if k.startswith(old) else k): v
             for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        return False
    return True


# --------------------------------------------------------------------------- pretrained weights


def read_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Tensors of a safetensors file, or of a PyTorch state dict file loaded without pickle
    code (``torch.load(weights_only=True)``); a checkpoint dict holding the state dict under
    ``state_dict``, ``model`` or ``state_dict_ema`` is unwrapped."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # SafetensorError and others for damaged files
            raise ArtifactError(f"{path} is not a readable safetensors file ({exc})") from exc
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError (code in the file), EOFError, zip errors
        first_line = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise ArtifactError(f"{path} is not a plain PyTorch state dict loadable with "
                            f"weights_only=True ({type(exc).__name__}: {first_line}); convert "
                            f"it to .safetensors") from exc
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ArtifactError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return data


def state_mismatches(own: dict[str, Any], state: dict[str, Any]) -> str:
    """What keeps ``state`` from loading into a module whose state dict is ``own``: missing and
    unexpected keys and shape mismatches, the first few of each, on one line ("" when none)."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", shapes)):
        if items:
            problems.append(f"{len(items)} {label} ({', '.join(items[:3])}"
                            f"{', ...' if len(items) > 3 else ''})")
    return "; ".join(problems)


def load_weights_into(module: "torch.nn.Module", path: str | os.PathLike,
                      state: dict[str, Any] | None = None, hint: str = "") -> None:
    """Loads the weights file ``path`` (or its already read ``state``) into ``module``, all of
    them or nothing.

    Raises:
        ArtifactError: Missing or unexpected keys, or a shape that differs (the message names
            the first few, then ``hint`` or a question about the architecture), i.e. weights of
            another architecture.
    """
    state = read_state_dict(path) if state is None else state
    problems = state_mismatches(module.state_dict(), state)
    if problems:
        hint = hint or "is it a checkpoint of another architecture or class count?"
        raise ArtifactError(f"{path} does not fit {type(module).__name__}: {problems}; {hint}")
    module.load_state_dict(state, strict=True)
