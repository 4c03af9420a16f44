"""Bring your own model and images: a timm backbone (weights from a file) with early exits,
trained on an image folder, written as a run directory the other commands read.

``trt-exit train --timm NAME [--checkpoint PATH] --data imagefolder://DIR --exits 4:slvit,...
--regime classifier_wise|copycat|end_to_end --out RUN`` calls :func:`train_timm_run`. RUN then
holds ``checkpoint.safetensors`` whose metadata records the timm name with every creation
argument, the exits, and the data spec (the folder, the split rule and seed, and the backbone's
data config), so ``trt-exit export RUN``, ``tune``, ``eval``, ``calibrate``, ``precision``,
``build``, ``run`` and ``count`` need no further options.

Run directories are never half-written: everything is written into ``RUN.partial/`` (which also
keeps a checkpoint after every epoch, the point ``--resume`` continues from) and renamed to RUN
when training has finished.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

from trt_exit.errors import ConfigError
from trt_exit.training.config import CLASSIFIER_WISE, END_TO_END, TrainConfig

COPYCAT = "copycat"
BYO_REGIMES = (CLASSIFIER_WISE, COPYCAT, END_TO_END)
PARTIAL_SUFFIX = ".partial"
EPOCH_STATE = "resume.pt"


def parse_timm_args(items: list[str] | None) -> dict[str, Any]:
    """``["act_layer=quick_gelu", "depth=4", "img_size=32"]`` -> creation kwargs; values are
    JSON when they parse as JSON (numbers, true/false, lists), text otherwise."""
    kwargs: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"bad --timm-arg {item!r}; use KEY=VALUE, e.g. act_layer=quick_gelu")
        try:
            kwargs[key] = json.loads(value)
        except ValueError:
            kwargs[key] = value
    return kwargs


def _partial_dir(out: Path, resume: bool) -> Path:
    partial = out.with_name(out.name + PARTIAL_SUFFIX)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; choose a new --out (runs are never "
                          f"overwritten)")
    if resume:
        if not (partial / EPOCH_STATE).is_file():
            raise ConfigError(f"nothing to resume: {partial / EPOCH_STATE} does not exist")
    elif partial.exists():
        raise ConfigError(f"{partial} holds an unfinished run: continue it with --resume, or "
                          f"delete it to start over")
    partial.mkdir(parents=True, exist_ok=True)
    return partial


def train_timm_run(out: str | os.PathLike, timm_name: str, data: str, exits: list,
                   regime: str, train: TrainConfig, checkpoint: str | None = None,
                   timm_args: dict[str, Any] | None = None,
                   input_size: list[int] | None = None, num_workers: int = 2,
                   resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Trains early exits on a timm backbone over an image folder; writes the run to ``out``.

    Args:
        out: The run directory (must not exist or be empty).
        timm_name: timm model name.
        data: ``imagefolder://DIR`` (or a CSV/JSONL file), see
            :mod:`trt_exit.training.image_folder`.
        exits: :class:`~trt_exit.models.ExitSpec` list (positions count the backbone's units).
        regime: ``classifier_wise`` (backbone frozen; ``train.backbone_epochs`` of backbone +
            head first), ``copycat`` (CopycatSL-ViT: exits imitate the final head for
            ``train.epochs``, then learn the labels for ``train.epochs``) or ``end_to_end``.
        train: Hyper-parameters (its ``regime`` is set from ``regime``).
        checkpoint: Pretrained weights of the timm model (safetensors or a state dict file).
        timm_args: timm creation arguments (recorded; e.g. ``{"act_layer": "quick_gelu"}``).
        input_size: (C, H, W) override of the backbone's data config.
        num_workers: DataLoader workers decoding images.
        resume: Continue the unfinished run in ``out.partial`` from its last epoch.
        progress: Show progress bars.

    Returns:
        A summary (per-exit validation metric, task, classes, checkpoint path, images skipped,
        and what was read off or resampled in the weights file).
    """
    from trt_exit.training.image_folder import data_path

    if regime not in BYO_REGIMES:
        raise ConfigError(f"unknown regime {regime!r}; choose one of {BYO_REGIMES}")
    if not exits:
        raise ConfigError("give the early exits with --exits BLOCK:TYPE,... (e.g. 4:slvit,8:slvit)")
    root = data_path(data)
    out = Path(out)
    partial = _partial_dir(out, resume)
    try:
        return _train_into(partial, out, root, timm_name, exits, regime, train, checkpoint,
                           timm_args, input_size, num_workers, resume, progress)
    except BaseException:
        # Keep a resume point; an attempt that failed before its first epoch leaves nothing.
        if not (partial / EPOCH_STATE).is_file():
            shutil.rmtree(partial, ignore_errors=True)
        raise


def _train_into(partial: Path, out: Path, root: Path, timm_name: str, exits: list, regime: str,
                train: TrainConfig, checkpoint: str | None, timm_args: dict[str, Any] | None,
                input_size: list[int] | None, num_workers: int, resume: bool,
                progress: bool) -> dict[str, Any]:
    import torch

    from trt_exit.models.checkpoint import save_checkpoint
    from trt_exit.models.timm_adapter import (
        CREATE_ARGS_ATTR,
        attach_exits,
        create_timm_model,
        default_input_size,
    )
    from trt_exit.training.copycat import CopycatConfig, copycat_train
    from trt_exit.training.image_folder import data_config
    from trt_exit.training.trainer import evaluate, seed_everything
    from trt_exit.training.trainer import train as train_model
    from trt_exit.workflow import CHECKPOINT_NAME, load_splits

    seed_everything(train.seed)
    model = create_timm_model(timm_name, checkpoint=checkpoint, **(timm_args or {}))
    config = data_config(model, input_size or default_input_size(model))
    options = {"root": str(root), **config, "num_workers": num_workers}
    splits = load_splits("imagefolder", train.seed, options)
    info = splits["train"].info
    task = splits["train"].task
    classes = info.get("class_names")
    # Regression (counts): the value and log b, the head's expected error, whose confidence
    # 1 / (1 + b) the exits use (trt_exit.models.confidence.PREDICTED_ERROR).
    outputs = len(classes) if task == "classification" else 2
    new_head = checkpoint is None
    if model.num_classes != outputs:
        model.reset_classifier(outputs)
        getattr(model, CREATE_ARGS_ATTR)["kwargs"]["num_classes"] = outputs
        new_head = True
    net = attach_exits(model, [e.after_block for e in exits], [e.type for e in exits],
                       [dict(e.options) for e in exits], task=task,
                       confidence="max_softmax" if task == "classification" else "predicted_error",
                       input_size=config["input_size"],
                       name=f"{timm_name.split('.')[0]}_exits")
    net.config.class_names = classes
    state_path = partial / EPOCH_STATE
    if resume:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        net.load_state_dict(state["model"])
    if torch.cuda.is_available():
        net.cuda()  # the trainer follows the model: CUDA with bf16 autocast (untested here)
    backbone_epochs = train.backbone_epochs
    if regime != END_TO_END and new_head and not backbone_epochs:
        raise ConfigError("the final head is untrained (random weights or a new class count): "
                          "give --backbone-epochs N to train backbone and head first, or use "
                          "--regime end_to_end")

    def save_epoch(phase: str, epoch: int, state: dict) -> None:
        """Called by the trainer after every epoch: the resume point (written atomically)."""
        tmp = state_path.with_suffix(".tmp")
        torch.save({**state, "phase": phase, "epoch": epoch}, tmp)
        os.replace(tmp, state_path)

    common = dict(val_set=splits["val"], progress=progress, epoch_callback=save_epoch,
                  resume_from=state_path if resume else None)
    history: dict[str, Any] = {}
    if regime == COPYCAT:
        resumed_phase = str(state["phase"]) if resume else ""
        in_copycat = resumed_phase.startswith(("imitation:", "finetune:"))
        if backbone_epochs and not in_copycat:
            history["backbone"] = train_model(net, splits["train"], dataclasses.replace(
                train, regime=CLASSIFIER_WISE, epochs=0), **common).to_dict()
        phase = dataclasses.replace(train, regime=CLASSIFIER_WISE, backbone_epochs=0)
        history["copycat"] = copycat_train(
            net, splits["train"], CopycatConfig(imitation=phase, finetune=phase), splits["val"],
            progress=progress, epoch_callback=save_epoch,
            resume_from=state_path if in_copycat else None)
    else:
        history["train"] = train_model(net, splits["train"],
                                       dataclasses.replace(train, regime=regime),
                                       **common).to_dict()
    net.cpu()
    val_metrics = evaluate(net, splits["val"])
    dataset = {"name": "imagefolder", "seed": train.seed, "options": options,
               "split": info.get("split"), "class_names": classes}
    save_checkpoint(net, partial / CHECKPOINT_NAME, extra={
        "dataset": dataset,
        "train": {**dataclasses.asdict(train), "regime": regime},
        "timm": {"model_name": timm_name, "weights": str(checkpoint) if checkpoint else None},
        "val_metrics": val_metrics,
        "skipped_images": {"train": splits["train"].skipped_images,
                           "val": splits["val"].info.get("skipped_images", 0),
                           "test": splits["test"].info.get("skipped_images", 0)},
        "history": history,
    })
    state_path.unlink(missing_ok=True)
    if out.exists():
        out.rmdir()  # empty (checked above)
    os.replace(partial, out)
    return {"val_metrics": val_metrics, "task": task, "classes": classes,
            "checkpoint": str(out / CHECKPOINT_NAME),
            "skipped_images": splits["train"].skipped_images,
            "weights": net.config.backbone_options.get("weights")}


def remove_partial(out: str | os.PathLike) -> None:
    """Deletes an unfinished run's ``.partial`` directory."""
    partial = Path(out).with_name(Path(out).name + PARTIAL_SUFFIX)
    shutil.rmtree(partial, ignore_errors=True)
