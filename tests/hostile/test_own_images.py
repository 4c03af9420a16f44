"""Your own model and images, as careless users give them (issue 20, items 7, 12 and 15):
degenerate image data, checkpoints of another architecture, unreadable calibration images."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from .conftest import assert_refused, cli

pytest.importorskip("timm", reason="timm is in the [dev] extra")


def _train(args, root, out, *extra):
    return ["train", *args, "--data", f"imagefolder://{root}", "--exits", "1:slvit",
            "--regime", "end_to_end", "--epochs", 1, "--batch-size", 8, "--workers", 0,
            "--no-progress", "--out", out, *extra]


def _counts_csv(tmp_path, images, counts):
    rng = np.random.default_rng(0)
    rows = ["path,count"]
    for i, count in enumerate(counts):
        images.write_image(tmp_path / "img" / f"{i}.png", images.COLORS[i % 3], rng)
        rows.append(f"img/{i}.png,{count}")
    (tmp_path / "counts.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "counts.csv"


@pytest.mark.parametrize("case, message", [
    ("one class", "holds one class ('class_0'); a classifier needs at least two"),
    ("count nan", "counts.csv:5: count 'nan' is not a finite number"),
    ("count -inf", "counts.csv:5: count '-inf' is not a finite number"),
    ("class unreadable", "imagefolder/train: none of the 6 images of class 'class_1' could be "
                         "decoded"),
])
def test_degenerate_image_data_is_refused_and_leaves_no_run(tmp_path, images, case, message,
                                                             tiny_timm_args, capsys):
    root = images.write_class_folders(tmp_path / "data", per_class=10)
    source = root
    if case == "one class":
        for name in ("class_1", "class_2"):
            shutil.rmtree(root / name)
    elif case.startswith("count"):
        source = _counts_csv(tmp_path, images, [1, 2, 3, case.split()[1], 5, 6, 7, 8, 9])
    else:  # every training image of class_1 unreadable; its val/test images are fine
        from trt_exit.training.image_folder import find_images

        lists = find_images(root)[0]
        for path, target in zip(lists["train"].paths, lists["train"].targets):
            if target == 1:
                open(path, "wb").write(b"not an image")
    assert_refused(capsys, _train(tiny_timm_args, source, tmp_path / "run"), message, tmp_path)
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


def test_a_checkpoint_of_another_depth_names_the_arguments(tmp_path, images, capsys):
    import timm
    from safetensors.torch import save_file

    root = images.write_class_folders(tmp_path / "data", per_class=4)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                              patch_size=8, depth=3, embed_dim=48, num_heads=2)
    weights = tmp_path / "mine.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    args = ["--timm", "vit_tiny_patch16_224", "--timm-arg", "num_heads=2"]  # depth, width?
    line = assert_refused(capsys, _train(args, root, tmp_path / "run", "--checkpoint", weights,
                                         "--backbone-epochs", 1),
                          "add the creation argument(s) depth=3 embed_dim=48 num_heads=H",
                          tmp_path)
    assert "mine.safetensors does not fit VisionTransformer" in line
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


@pytest.mark.parametrize("size", [32, 40])
def test_calibration_from_a_folder_with_unreadable_images_has_the_exact_size(
        timm_run, tmp_path, images, size, capsys):
    run, _ = timm_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    root = images.write_class_folders(tmp_path / "calib", per_class=15)
    for name in ("0.jpg", "1.png", "2.jpg", "5.png"):
        (root / "class_1" / name).write_bytes(b"unreadable")
    status, err = cli(capsys, "calibrate", copy, "--from", f"imagefolder://{root}", "--size",
                      size)
    assert status == 0, err
    record = json.loads((copy / "manifest.json").read_text())["calibration"]
    assert record["samples"] == size
    assert 0 < record["origin"]["skipped_images"] <= 4
    with np.load(copy / "calibration" / "calibration.npz") as data:
        assert data["image"].shape == (size, 3, 32, 32)
