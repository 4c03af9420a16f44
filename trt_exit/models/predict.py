"""Running a multi-exit model over in-memory arrays (no training, no gradients).

Kept beside the models, not in the trainer, so that model code (e.g. the BoF exits' activation
calibration) can run a model without depending on the training package.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from trt_exit import tensor_names as tn


def forward_inputs(model, inputs: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """``model``'s outputs (one per exit) for inputs by tensor name (image or audio, and the
    audio of audiovisual models), moved to the device of the model's parameters."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    inputs = {name: value.to(device) for name, value in inputs.items()}
    return model(inputs[model.backbone_input], inputs.get(tn.AUDIO))


@torch.no_grad()
def predict_exits(model, inputs: Mapping[str, np.ndarray], batch_size: int = 256) -> list[np.ndarray]:
    """Outputs of every exit in eval mode: a list of (N, num_outputs) float32 arrays.

    Args:
        model: A :class:`~trt_exit.models.MultiExitModel`.
        inputs: Model inputs by tensor name, each (N, ...).
        batch_size: Samples per forward pass.
    """
    model.eval()
    tensors = {name: torch.from_numpy(np.ascontiguousarray(v)) for name, v in inputs.items()}
    count = len(next(iter(tensors.values())))
    chunks: list[list[np.ndarray]] = [[] for _ in range(model.num_exits)]
    for start in range(0, count, batch_size):
        batch = {k: v[start : start + batch_size] for k, v in tensors.items()}
        for k, out in enumerate(forward_inputs(model, batch)):
            chunks[k].append(out.float().cpu().numpy())
    return [np.concatenate(c) for c in chunks]


def is_streaming(dataset) -> bool:
    """A split that streams batches (image folders) rather than holding arrays."""
    return callable(getattr(dataset, "batches", None)) and not hasattr(dataset, "inputs")


@torch.no_grad()
def predict_with_targets(model, dataset, batch_size: int = 256
                         ) -> tuple[list[np.ndarray], np.ndarray]:
    """Outputs of every exit on ``dataset`` and the targets they belong to (a streaming split
    may skip undecodable images, so its targets come from the batches)."""
    if not is_streaming(dataset):
        return predict_exits(model, dataset.inputs, batch_size), dataset.targets
    model.eval()
    chunks: list[list[np.ndarray]] = [[] for _ in range(model.num_exits)]
    targets = []
    for batch, batch_targets in dataset.batches(batch_size, shuffle=False, training=False):
        for k, out in enumerate(forward_inputs(model, batch)):
            chunks[k].append(out.float().cpu().numpy())
        targets.append(batch_targets.numpy())
    if not targets:
        from trt_exit.errors import ConfigError

        raise ConfigError(f"{dataset.name}: none of its samples could be read")
    return [np.concatenate(c) for c in chunks], np.concatenate(targets)
