"""Audiovisual crowd counting: do exits that hear count better when the picture is poor?

DISCO's premise (Hu et al. 2020), which SL-ViT's audiovisual exits build on: sound carries
evidence of how many people there are, and it matters most when the image is degraded (dark,
blurred, occluded). This module tests it on the generated ``synthetic_av_crowd`` set, and builds
small trained audiovisual models for other parts' tests.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from trt_exit.manifest import Manifest

#: Split sizes (train, val, test) of :func:`build_tiny_av_export`.
TINY_EXPORT_SAMPLES = (160, 48, 48)


def build_tiny_av_export(out_dir: str | os.PathLike, seed: int = 0,
                         samples: tuple[int, int, int] = TINY_EXPORT_SAMPLES,
                         epochs: int = 6) -> Manifest:
    """Trains ``multi_exit_av_crowd_tiny_test`` for a few seconds, exports and tunes it.

    A real audiovisual manifest for tests of everything downstream of export (executor, live
    pipeline): inputs ``image`` and ``audio``, ``preprocessing`` with both recipes, an
    audio-only exit, a visual-only exit and an audiovisual final head, thresholds tuned on the
    val split with ONNX Runtime. The model is barely trained: its counts are rough.

    Args:
        out_dir: Directory for ``manifest.json``, ``onnx/`` and the checkpoint.
        seed: Seed of the data, the initialization and training.
        samples: Train / val / test sizes of the generated data.
        epochs: Training epochs.

    Returns:
        The tuned manifest (saved in ``out_dir``).
    """
    from trt_exit.models import create_model
    from trt_exit.training.crowd_datasets import load_synthetic_av_crowd
    from trt_exit.training.trainer import TrainConfig, seed_everything, train
    from trt_exit.workflow import export_step, tune_step

    train_n, val_n, test_n = samples
    splits = load_synthetic_av_crowd(seed=seed, train=train_n, val=val_n, test=test_n)
    seed_everything(seed)
    model = create_model("multi_exit_av_crowd_tiny_test")
    train(model, splits["train"],
          TrainConfig(epochs=epochs, lr=3e-3, batch_size=32, warmup_epochs=1, augment_shift_px=0,
                      seed=seed, num_threads=1),
          progress=False)
    dataset_info: dict[str, Any] = {
        "name": "synthetic_av_crowd", "seed": seed,
        "options": {"train": train_n, "val": val_n, "test": test_n}}
    manifest = export_step(model, Path(out_dir), splits, dataset_info)
    return tune_step(manifest, splits["val"], profile_repeats=10)
