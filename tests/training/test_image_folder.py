"""Image folders through timm's data pipeline (issue 15, items 1 and 6): layouts, splits, bad
input, streaming training and resuming, calibration samples. Real PNG/JPEG files, tiny sizes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from trt_exit.errors import ConfigError

pytest.importorskip("timm", reason="timm is in the [dev] extra")

from trt_exit.training.image_folder import (  # noqa: E402
    ImageFolderSplit,
    find_images,
    load_image_folder,
    sample_stratified,
)

CONFIG = {"input_size": [3, 16, 16], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
          "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center"}


def _load(root, **options):
    return load_image_folder(seed=0, root=f"imagefolder://{root}", num_workers=0,
                             **{**CONFIG, **options})


def test_class_folders_split_by_seed_stratified(tmp_path, images):
    root = images.write_class_folders(tmp_path / "data", per_class=10)
    splits = _load(root)
    assert isinstance(splits["train"], ImageFolderSplit)  # streamed, not held as arrays
    assert [len(splits[s]) for s in ("train", "val", "test")] == [18, 6, 6]
    assert np.bincount(splits["val"].targets).tolist() == [2, 2, 2]
    assert splits["val"].inputs["image"].shape == (6, 3, 16, 16)  # mixed sizes, L and RGBA
    assert splits["val"].inputs["image"].dtype == np.float32
    assert splits["train"].info["class_names"] == ["class_0", "class_1", "class_2"]
    again = _load(root)
    assert splits["test"].info["split"] == again["test"].info["split"]
    np.testing.assert_array_equal(splits["test"].inputs["image"], again["test"].inputs["image"])
    # the colour is what the class is: the decoded red channel is highest for class_0 (its
    # grayscale images have three equal channels)
    red = splits["val"].inputs["image"][splits["val"].targets == 0]
    assert red[:, 0].mean() > red[:, 1].mean() and red[:, 0].mean() > red[:, 2].mean()


def test_split_folders_are_used_as_given(tmp_path, images):
    rng = np.random.default_rng(1)
    for split, count in (("train", 4), ("validation", 2), ("test", 1)):
        for c, color in enumerate(images.COLORS):
            for i in range(count):
                images.write_image(tmp_path / split / f"c{c}" / f"{i}.png", color, rng)
    lists, task, classes, rule = find_images(tmp_path)
    assert {s: len(v.paths) for s, v in lists.items()} == {"train": 12, "val": 6, "test": 3}
    assert task == "classification" and classes == ["c0", "c1", "c2"]
    assert "given as folders" in rule and "carved" not in rule


def test_csv_with_counts_is_regression_and_jsonl_lists_classes(tmp_path, images):
    rng = np.random.default_rng(2)
    rows = ["path,count,split"]
    for i in range(12):
        images.write_image(tmp_path / "img" / f"{i}.jpg", images.COLORS[i % 3], rng)
        rows.append(f"img/{i}.jpg,{i * 1.5},{'test' if i >= 10 else 'train'}")
    (tmp_path / "crowd.csv").write_text("\n".join(rows) + "\n")
    splits = load_image_folder(root=str(tmp_path / "crowd.csv"), num_workers=0, **CONFIG)
    assert splits["train"].task == "regression"
    assert splits["test"].targets.tolist() == [[15.0], [16.5]]
    assert len(splits["train"]) + len(splits["val"]) == 10
    lines = [json.dumps({"path": f"img/{i}.jpg", "label": ["red", "green", "blue"][i % 3]})
             for i in range(12)]
    (tmp_path / "list.jsonl").write_text("\n".join(lines))
    lists, task, classes, _ = find_images(tmp_path / "list.jsonl")
    assert task == "classification" and classes == ["blue", "green", "red"]


def test_bad_input_is_a_clear_error_or_a_counted_skip(tmp_path, images):
    root = images.write_class_folders(tmp_path / "data", per_class=6)
    (root / "class_1" / "truncated.jpg").write_bytes(
        (root / "class_1" / "0.jpg").read_bytes()[:200])
    (root / "class_2" / "not_an_image.png").write_bytes(b"hello")
    lists, _, _, _ = find_images(root)
    stream = ImageFolderSplit(lists["train"], CONFIG, "classification", "t", training=False,
                              num_workers=1)  # decoded in a worker process
    seen = sum(len(t) for _, t in stream.batches(8))
    assert seen + stream.skipped_images == len(lists["train"])
    every = ImageFolderSplit(
        type(lists["train"])([p for s in lists.values() for p in s.paths],
                             np.concatenate([s.targets for s in lists.values()])),
        CONFIG, "classification", "all", training=False, num_workers=0)
    list(every.batches(64))
    list(every.batches(64))  # counted once per image, not per pass
    assert every.skipped == {str(root / "class_1" / "truncated.jpg"),
                             str(root / "class_2" / "not_an_image.png")}
    (root / "empty_class").mkdir()
    with pytest.raises(ConfigError, match="class folder .*empty_class has no images"):
        find_images(root)
    with pytest.raises(ConfigError, match="has no class folders"):
        find_images((tmp_path / "nothing").mkdir() or tmp_path / "nothing")
    with pytest.raises(ConfigError, match="does not exist"):
        _load(tmp_path / "missing")


def test_stratified_sample_has_the_exact_size_and_class_shares():
    targets = np.array([0] * 50 + [1] * 30 + [2] * 20)

    class Split:
        pass

    split = Split()
    split.targets = targets
    picked = sample_stratified(split, 33, seed=3)
    assert len(picked) == len(set(picked)) == 33
    # shares 16.5, 9.9, 6.6: floors 16, 9, 6; the two largest remainders get the other two
    assert np.bincount(targets[picked]).tolist() == [16, 10, 7]


def test_streaming_training_and_resume(tmp_path, images):
    """The trainer takes a streamed split; an interrupted run continues after its last epoch."""
    from trt_exit.models.timm_adapter import attach_exits, create_timm_model
    from trt_exit.training.trainer import TrainConfig, train

    root = images.write_class_folders(tmp_path / "data", per_class=6)
    splits = _load(root)

    def model():
        torch.manual_seed(0)
        vit = create_timm_model("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=2,
                                embed_dim=16, num_heads=2, num_classes=3)
        return attach_exits(vit, [1], "slvit")

    config = TrainConfig(regime="end_to_end", epochs=3, batch_size=8, lr=1e-3, warmup_epochs=0)
    states = []

    class Stop(Exception):
        pass

    def save_then_stop(phase, epoch, state):
        torch.save({**state, "phase": phase, "epoch": epoch}, tmp_path / "state.pt")
        states.append(epoch)
        if epoch == 0:
            raise Stop

    net = model()
    with pytest.raises(Stop):
        train(net, splits["train"], config, progress=False, epoch_callback=save_then_stop)
    resumed = model()
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True)["model"])
    history = train(resumed, splits["train"], config, splits["val"], progress=False,
                    epoch_callback=save_then_stop, resume_from=str(tmp_path / "state.pt"))
    assert states == [0, 1, 2]
    assert len(history.phases[0]["loss"]) == 3  # epoch 0's loss carried over, 1 and 2 run now
