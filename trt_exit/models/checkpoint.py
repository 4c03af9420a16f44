"""Checkpoints: safetensors weights with the model config in the file's metadata.

safetensors stores tensors only, so loading a checkpoint can never run code (unlike pickle).
The config travels in the metadata, so ``load_checkpoint`` rebuilds the model without being told
what it is.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from trt_exit.errors import ArtifactError
from trt_exit.fileio import atomic_path
from trt_exit.models.multi_exit import ModelConfig, MultiExitModel, build_model

CONFIG_KEY = "trt_exit.model_config"
EXTRA_KEY = "trt_exit.extra"


def save_checkpoint(model: MultiExitModel, path: str | os.PathLike,
                    extra: dict[str, Any] | None = None) -> Path:
    """Writes ``model``'s weights and config to ``path`` (``.safetensors``) atomically.

    Args:
        model: The model.
        path: Destination file.
        extra: JSON-serializable information stored alongside (e.g. training history).
    """
    from safetensors.torch import save_model

    metadata = {CONFIG_KEY: json.dumps(model.config.to_dict())}
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
    return {"config": json.loads(metadata[CONFIG_KEY]),
            "extra": json.loads(metadata.get(EXTRA_KEY, "{}"))}


def load_checkpoint(path: str | os.PathLike) -> MultiExitModel:
    """Rebuilds the model stored at ``path`` and loads its weights (in eval mode)."""
    from safetensors.torch import load_model

    metadata = read_metadata(path)
    model = build_model(ModelConfig.from_dict(metadata["config"]))
    try:
        missing, unexpected = load_model(model, str(path), strict=True)
    except Exception as exc:
        raise ArtifactError(f"{path}: weights do not fit the stored config ({exc})") from exc
    return model.eval()
