"""Training regimes for multi-exit models (Multi-Exit ViT, section "training").

* ``end_to_end``: backbone and every exit trained together; the final head's loss weighs 2x.
* ``classifier_wise``: the backbone (and final head) are frozen and only the early exits learn.
  When the backbone is not trained yet, ``backbone_epochs`` first train backbone + final head.

Options on top of either (:class:`~trt_exit.training.config.TrainConfig`): self-distillation of
every early exit from the final head (``distill_weight``, ``distill_temperature``); a joint
fine-tune of everything at a low learning rate after the main phases (``finetune_epochs``,
``finetune_lr``); per-exit temperature calibration on the validation split at the end
(``calibrate``). The two-phase recipe is ``classifier_wise`` with ``backbone_epochs`` (a static
model first), distillation in the exits phase, and optionally the fine-tune.

Everything is seeded; progress is shown with tqdm.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from trt_exit.errors import ConfigError
from trt_exit.models.exits import CLASSIFICATION
from trt_exit.models.multi_exit import MultiExitModel
from trt_exit.models.predict import (  # noqa: F401  predict_with_targets: the trainer's API
    forward_inputs,
    is_streaming,
    predict_with_targets,
)
from trt_exit.models.predict import predict_exits as predict_inputs
from trt_exit.training.config import (  # noqa: F401  TrainConfig and the regimes: the trainer's API
    CLASSIFIER_WISE,
    END_TO_END,
    REGIMES,
    TrainConfig,
)
from trt_exit.training.datasets import Dataset
from trt_exit.training.losses import exit_weights, multi_exit_loss


#: ``epoch_callback(phase, epoch, state)`` after every epoch; ``state`` (model, optimizer,
#: generator, record) saved with ``torch.save`` is what ``train(resume_from=...)`` continues from.
EpochCallback = Callable[[str, int, dict[str, Any]], None]
#: ``targets_fn(model, inputs, targets) -> one target per exit``; see CopycatSL-ViT.
TargetsFn = Callable[[MultiExitModel, dict[str, torch.Tensor], torch.Tensor], list[torch.Tensor]]


@dataclass
class TrainHistory:
    """What happened during training: per-epoch loss and validation metrics, wall time."""

    phases: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    #: Per-exit temperatures fitted after training (``TrainConfig.calibrate``), else None.
    calibration: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def seed_everything(seed: int) -> None:
    """Seeds Python's, numpy's and torch's generators."""
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translates each image by up to ``max_shift`` pixels, filling with edge values."""
    if max_shift <= 0:
        return images
    batch, _, height, width = images.shape
    padded = F.pad(images, (max_shift,) * 4, mode="replicate")  # (B, C, H+2s, W+2s)
    offsets = torch.randint(0, 2 * max_shift + 1, (batch, 2), generator=generator)
    return torch.stack(
        [padded[i, :, dy : dy + height, dx : dx + width] for i, (dy, dx) in enumerate(offsets.tolist())]
    )


def random_affine(images: torch.Tensor, rotate_deg: float, scale: float, shift_px: int,
                  generator: torch.Generator) -> torch.Tensor:
    """Rotates, zooms and translates each image at random (bilinear, edge values outside)."""
    batch, _, height, width = images.shape
    u = torch.rand(batch, 4, generator=generator) * 2 - 1  # uniform in [-1, 1]
    angle = u[:, 0] * rotate_deg * math.pi / 180
    zoom = 1 + u[:, 1] * scale
    # affine_grid works in [-1, 1] coordinates: one pixel is 2 / size.
    tx = torch.round(u[:, 2] * shift_px) * 2 / width
    ty = torch.round(u[:, 3] * shift_px) * 2 / height
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _to_torch(dataset: Dataset) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    inputs = {name: torch.from_numpy(np.ascontiguousarray(v)) for name, v in dataset.inputs.items()}
    return inputs, torch.from_numpy(np.ascontiguousarray(dataset.targets))


def _device(model: MultiExitModel) -> torch.device:
    """Where the model's parameters are (training follows the model: move it to a GPU first)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _forward(model: MultiExitModel, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Every exit's output, float32; on a CUDA model under bfloat16 autocast (mixed precision:
    matmuls and convolutions in bf16, reductions and the losses in fp32; no loss scaling
    needed for bf16). Not run on a GPU in this project's CI: it has none."""
    device = _device(model)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        outputs = forward_inputs(model, _to_device(inputs, device))
    return [o.float() for o in outputs]


def predict_exits(model: MultiExitModel, dataset, batch_size: int = 256) -> list[np.ndarray]:
    """Outputs of every exit on ``dataset``: a list of (N, num_outputs) float32 arrays."""
    return predict_with_targets(model, dataset, batch_size)[0]


def exit_metric(output: np.ndarray, targets: np.ndarray, task: str, columns: int | None = None) -> float:
    """Accuracy (classification) or mean absolute error (regression) of one exit's output."""
    if task == CLASSIFICATION:
        return float(np.mean(output.argmax(axis=1) == targets))
    targets = targets.reshape(len(targets), -1)
    return float(np.mean(np.abs(output[:, : targets.shape[1]] - targets)))


def metric_name(task: str) -> str:
    """``"accuracy"`` (higher is better) or ``"mae"`` (lower is better)."""
    return "accuracy" if task == CLASSIFICATION else "mae"


def evaluate(model: MultiExitModel, dataset) -> list[float]:
    """Per-exit metric on ``dataset`` (see :func:`exit_metric`); arrays or a streaming split."""
    outputs, targets = predict_with_targets(model, dataset)
    return [exit_metric(out, targets, dataset.task) for out in outputs]


def _set_trainable(model: MultiExitModel, train_backbone: bool, exit_mask: Sequence[bool]) -> list:
    model.backbone.requires_grad_(train_backbone)
    params = [p for p in model.backbone.parameters()] if train_backbone else []
    for head, trainable in zip(model.exits, exit_mask):
        head.requires_grad_(trainable)
        if trainable:
            params.extend(head.parameters())
    # Exits may share modules (the BoF family's classifier): keep each parameter once.
    unique = {id(p): p for p in params}
    return list(unique.values())


def _adamw(groups: list[dict[str, Any]], lr: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per step where torch has it for ``device`` (CPU and CUDA
    since torch 2.4): the per-parameter loop costs more than the math for small models (on the
    demo model, 6 of ~45 ms per step on 2 CPU cores)."""
    params = [p for g in groups for p in g["params"]]
    if device.type in ("cpu", "cuda") and all(p.dtype.is_floating_point for p in params):
        try:
            return torch.optim.AdamW(groups, lr=lr, fused=True)
        except (RuntimeError, TypeError):  # an older torch without the fused kernel here
            pass
    return torch.optim.AdamW(groups, lr=lr)


def _train_batches(train_set, config: TrainConfig, generator: torch.Generator):
    """One epoch of shuffled, augmented training batches: ``(inputs by name, targets)``.

    Array datasets are indexed here and augmented with the recipe's affine / shift; streaming
    splits (image folders) are shuffled by a seed drawn from ``generator`` and augmented by their
    own (timm) transform in the DataLoader workers.
    """
    from trt_exit import tensor_names as tn

    if is_streaming(train_set):
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        yield from train_set.batches(config.batch_size, shuffle=True, seed=seed)
        return
    inputs, targets = _to_torch(train_set)
    order = torch.randperm(len(train_set), generator=generator)
    for start in range(0, len(train_set), config.batch_size):
        idx = order[start : start + config.batch_size]
        batch = {k: v[idx] for k, v in inputs.items()}
        if tn.IMAGE not in batch:
            pass  # image augmentation only; spectrogram backbones bring their own
        elif config.augment_rotate_deg or config.augment_scale:
            batch[tn.IMAGE] = random_affine(batch[tn.IMAGE], config.augment_rotate_deg,
                                            config.augment_scale, config.augment_shift_px,
                                            generator)
        elif config.augment_shift_px:
            batch[tn.IMAGE] = random_shift(batch[tn.IMAGE], config.augment_shift_px, generator)
        yield batch, targets[idx]


def _run_phase(
    model: MultiExitModel,
    name: str,
    train_set: Dataset,
    val_set: Dataset | None,
    config: TrainConfig,
    epochs: int,
    train_backbone: bool,
    weights: list[float],
    generator: torch.Generator,
    progress: bool,
    targets_fn: TargetsFn | None,
    epoch_callback: EpochCallback | None = None,
    resume: dict[str, Any] | None = None,
) -> dict[str, Any]:
    from trt_exit.progress import progress_bar

    exit_mask = [w > 0 for w in weights]
    device = _device(model)
    params = _set_trainable(model, train_backbone, exit_mask)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = _adamw([{"params": decay, "weight_decay": config.weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}], config.lr, device)
    steps_per_epoch = math.ceil(len(train_set) / config.batch_size)
    total_steps = max(epochs * steps_per_epoch, 1)
    warmup = config.warmup_epochs * steps_per_epoch

    def lr_at(step: int) -> float:
        if step < warmup:
            return config.lr * (step + 1) / warmup
        progress_frac = (step - warmup) / max(total_steps - warmup, 1)
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress_frac))

    record: dict[str, Any] = {"phase": name, "epochs": epochs, "loss": [], "val": [],
                              "val_every_epochs": config.val_every_epochs}
    step = 0
    first = 0
    if resume is not None:  # continue after the last finished epoch of this phase
        optimizer.load_state_dict(resume["optimizer"])
        generator.set_state(resume["generator"])
        record = resume["record"]
        first = int(resume["epoch"]) + 1
        step = first * steps_per_epoch
    bar = progress_bar(range(first, epochs), desc=f"train {name}", unit="epoch",
                       enabled=progress, lines=True)  # off a terminal: a line per epoch
    for epoch in bar:
        model.train()
        if not train_backbone:
            model.backbone.eval()  # frozen: no dropout / drop-path noise
        epoch_loss = 0.0
        seen = 0
        images = progress_bar(desc="epoch", total=len(train_set), unit="img",
                              enabled=progress)  # throughput (img/s); nothing off a terminal
        for batch, batch_targets in _train_batches(train_set, config, generator):
            batch, batch_targets = _to_device(batch, device), batch_targets.to(device)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            outputs = _forward(model, batch)
            per_exit = targets_fn(model, batch, batch_targets) if targets_fn else batch_targets
            loss = multi_exit_loss(model, outputs, per_exit, weights, config.label_smoothing,
                                   config.distill_weight, config.distill_temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            epoch_loss += loss.item() * len(batch_targets)
            seen += len(batch_targets)
            images.update(len(batch_targets))
            step += 1
        images.close()
        if seen == 0:
            raise ConfigError(f"{train_set.name}: no training sample could be read")
        record["loss"].append(epoch_loss / seen)
        postfix = {"loss": f"{record['loss'][-1]:.3f}"}
        if val_set is not None and ((epoch + 1) % config.val_every_epochs == 0 or epoch + 1 == epochs):
            metrics = evaluate(model, val_set)
            record["val"].append(metrics)
            postfix["val"] = " ".join(f"{m:.3f}" for m in metrics)
        bar.set_postfix(postfix)
        if epoch_callback is not None:
            epoch_callback(name, epoch, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "generator": generator.get_state(), "record": record})
    bar.close()
    model.requires_grad_(True)
    skipped = getattr(train_set, "skipped_images", 0)
    if skipped:
        record["skipped_images"] = skipped
    return record


def train(
    model: MultiExitModel,
    train_set: Dataset,
    config: TrainConfig | None = None,
    val_set: Dataset | None = None,
    progress: bool = True,
    targets_fn: TargetsFn | None = None,
    epoch_callback: EpochCallback | None = None,
    resume_from: str | dict[str, Any] | None = None,
) -> TrainHistory:
    """Trains ``model`` in place under ``config.regime``.

    Args:
        model: The model to train.
        train_set: Training split.
        config: Hyper-parameters (defaults: :class:`TrainConfig`).
        val_set: If given, per-exit validation metrics are recorded after every epoch.
        progress: Show tqdm progress bars.
        targets_fn: Replaces the dataset targets per exit (CopycatSL-ViT's imitation phase).
        epoch_callback: Called after every epoch with the state to resume from.
        resume_from: A file ``epoch_callback``'s state was saved to (``torch.save``), or that
            state itself: its
            phase continues after its epoch, earlier phases are skipped. The model's weights
            must already be loaded from it.

    Returns:
        The training history.
    """
    config = config or TrainConfig()
    config.validate()
    if train_set.task != model.task:
        raise ConfigError(f"dataset {train_set.name} is {train_set.task}, the model is {model.task}")
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    # Outputs saved with a loaded checkpoint describe the weights before this training; so do
    # calibrated temperatures: training starts from the raw logits (calibrate again after).
    model.__dict__.pop("trained_reference", None)
    for head in model.exits:
        head.temperature.fill_(1.0)
    seed_everything(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    history = TrainHistory()
    began = time.perf_counter()
    n = model.num_exits
    if config.calibrate and val_set is None:
        raise ConfigError("calibrate=True fits the exits' temperatures on a validation split: "
                          "pass val_set")
    joint = exit_weights(n, config.final_weight)
    if config.regime == END_TO_END:
        phases = [(END_TO_END, config.epochs, True, joint, targets_fn, config)]
    else:
        # The backbone phase trains a static model (backbone + final head) without distillation:
        # there is no teacher yet.
        phases = [("backbone", config.backbone_epochs, True, [0.0] * (n - 1) + [1.0], None,
                   dataclasses.replace(config, distill_weight=0.0))
                  ] if config.backbone_epochs else []
        phases.append(("exits", config.epochs, False, [1.0] * (n - 1) + [0.0], targets_fn, config))
    if config.finetune_epochs:
        phases.append(("finetune", config.finetune_epochs, True, joint, targets_fn,
                       dataclasses.replace(config, lr=config.finetune_lr, warmup_epochs=0)))
    resume = None
    if resume_from is not None:
        resume = (resume_from if isinstance(resume_from, dict) else
                  torch.load(resume_from, map_location="cpu", weights_only=True))
        names = [p[0] for p in phases]
        if resume.get("phase") not in names:
            raise ConfigError(f"{resume_from} resumes phase {resume.get('phase')!r}, which this "
                              f"recipe does not have ({names})")
        phases = phases[names.index(resume["phase"]):]
    for name, epochs, train_backbone, weights, fn, phase_config in phases:
        history.phases.append(_run_phase(
            model, name, train_set, val_set, phase_config, epochs, train_backbone, weights,
            generator, progress, fn, epoch_callback,
            resume if resume and resume["phase"] == name else None))
    model.eval()
    if config.calibrate:
        from trt_exit.training.calibration import calibrate_temperatures

        history.calibration = calibrate_temperatures(model, val_set)
    history.seconds = time.perf_counter() - began
    return history
