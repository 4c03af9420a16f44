"""Shared fixtures: a small model trained on the real digits, exported once per session."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from trt_exit.training.datasets import load_digits
from trt_exit.training.trainer import TrainConfig


@pytest.fixture(scope="session")
def digits():
    """The documented train / val / test splits of scikit-learn's digits."""
    return load_digits(seed=0)


#: A few epochs of the tiny test model: enough for exits to differ in confidence.
TINY_TRAIN = TrainConfig(epochs=6, lr=1e-2, warmup_epochs=0, weight_decay=0.0, batch_size=64, seed=0,
                         augment_shift_px=0)


@pytest.fixture(scope="session")
def tiny_model(digits):
    """``multi_exit_vit_tiny_test`` trained briefly on digits (an MLP exit and an SL-ViT exit)."""
    from trt_exit.models import create_model
    from trt_exit.training.trainer import seed_everything, train

    seed_everything(0)
    model = create_model("multi_exit_vit_tiny_test")
    train(model, digits["train"], TINY_TRAIN, progress=False)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_export(tiny_model, digits, tmp_path_factory) -> Path:
    """Directory with the tiny model exported (manifest.json + onnx/fp32), not tuned."""
    from trt_exit.workflow import export_step

    out = tmp_path_factory.mktemp("tiny_export")
    export_step(tiny_model, out, digits, {"name": "digits", "seed": 0, "options": {}})
    return out


@pytest.fixture(scope="session")
def tiny_tuned(tiny_export, digits, tmp_path_factory) -> Path:
    """A copy of ``tiny_export`` with a latency profile and tuned thresholds."""
    import shutil

    from trt_exit.manifest import Manifest
    from trt_exit.workflow import tune_step

    out = tmp_path_factory.mktemp("tiny_tuned") / "model"
    shutil.copytree(tiny_export, out)
    tune_step(Manifest.load(out), digits["val"], max_loss=0.02, profile_repeats=20)
    return out


@pytest.fixture
def fresh_copy(tmp_path):
    """Copies an export directory into a test's own tmp dir (for tests that damage files)."""
    import shutil

    def copy(src: Path) -> Path:
        dst = tmp_path / "copy"
        shutil.copytree(src, dst)
        return dst

    return copy


def torch_outputs(model, images: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        return [o.numpy() for o in model(torch.from_numpy(images))]


# --------------------------------------------------------------------------- image folders


class ImageFolderWriter:
    """Writes small labelled image folders (real PNG and JPEG files) for image-folder tests."""

    COLORS = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]

    def write_image(self, path: Path, color, rng, size=None, mode="RGB") -> Path:
        """One noisy image of ``color`` at a random size (or ``size``), PNG or JPEG by suffix."""
        from PIL import Image

        width, height = size or (int(rng.integers(20, 56)), int(rng.integers(20, 56)))
        pixels = np.clip(rng.normal(0, 30, (height, width, 3)) + color, 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        if mode != "RGB":
            image = image.convert(mode)
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        return path

    def write_class_folders(self, root: Path, per_class: int = 10, seed: int = 0) -> Path:
        """``root/<class>/<i>.png|jpg``: three colour classes, mixed sizes, grayscale / RGBA."""
        rng = np.random.default_rng(seed)
        for c, color in enumerate(self.COLORS):
            for i in range(per_class):
                mode = ("L", "RGBA", "RGB", "RGB")[i % 4]
                suffix = "png" if i % 2 else "jpg"
                self.write_image(root / f"class_{c}" / f"{i}.{suffix}", color, rng,
                                 mode="RGB" if suffix == "jpg" and mode == "RGBA" else mode)
        return root


@pytest.fixture(scope="session")
def images() -> ImageFolderWriter:
    """Writer of generated image folders (``images.write_class_folders(root)``)."""
    return ImageFolderWriter()


#: A tiny timm ViT trained by ``trt-exit train --timm`` (classes from the images' colours).
TINY_TIMM_ARGS = ["--timm", "vit_tiny_patch16_224", "--timm-arg", "img_size=32",
                  "--timm-arg", "patch_size=8", "--timm-arg", "depth=2",
                  "--timm-arg", "embed_dim=32", "--timm-arg", "num_heads=2"]


@pytest.fixture(scope="session")
def tiny_timm_args() -> list[str]:
    """``trt-exit train`` options of the tiny timm ViT (:data:`TINY_TIMM_ARGS`)."""
    return list(TINY_TIMM_ARGS)


@pytest.fixture(scope="session")
def timm_run(images, tmp_path_factory):
    """``(run directory, image root)``: a tiny timm ViT trained on 8 generated images per class
    (end to end, 2 epochs), exported and tuned through the CLI. Read-only: copy it to change it."""
    from trt_exit.cli import main

    base = tmp_path_factory.mktemp("timm_run")
    root = images.write_class_folders(base / "data", per_class=8)
    run = base / "run"
    steps = [["train", *TINY_TIMM_ARGS, "--data", f"imagefolder://{root}", "--exits", "1:slvit",
              "--regime", "end_to_end", "--epochs", "2", "--batch-size", "8", "--workers", "0",
              "--no-progress", "--out", str(run)],
             ["export", "--out", str(run)], ["tune", str(run), "--repeats", "3"]]
    for argv in steps:
        assert main(argv) == 0, argv
    return run, root
