"""Image folders through timm's data pipeline (issue 15, items 1 and 6): layouts, splits, bad
input, streaming training and resuming, calibration samples. Real PNG/JPEG files, tiny sizes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from trt_exit.errors import ConfigError, InputError

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


# --------------------------------------------------------------------------- issue 20


def test_a_flat_class_tree_is_recorded_as_such(tmp_path, images):
    """Item 16: a folder of class folders was recorded as 'given as folders: train'."""
    root = images.write_class_folders(tmp_path / "data", per_class=5)
    _, _, _, rule = find_images(root)
    assert rule.startswith("one folder per class, no split folders;"), rule
    assert "given as folders" not in rule and "out of train" not in rule
    assert "val and test carved out of all images by seed 0" in rule
    rng = np.random.default_rng(0)
    for split in ("train", "validation"):
        for c, color in enumerate(images.COLORS):
            images.write_image(tmp_path / "split" / split / f"c{c}" / "0.png", color, rng)
    _, _, _, rule = find_images(tmp_path / "split")
    assert rule.startswith("given as folders: train (train/), val (validation/); test carved "
                           "out of train by seed 0"), rule


def _table(tmp_path, images, header, values, suffix=".csv"):
    rng = np.random.default_rng(3)
    lines = [header] if suffix == ".csv" else []
    for i, value in enumerate(values):
        images.write_image(tmp_path / "img" / f"{i}.png", images.COLORS[i % 3], rng)
        lines.append(f"img/{i}.png,{value}" if suffix == ".csv" else value.replace(
            "PATH", f"img/{i}.png"))
    path = tmp_path / f"list{suffix}"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("header, bad, message", [
    ("path,count", "nan", "count 'nan' is not a finite number"),
    ("path,count", "inf", "count 'inf' is not a finite number"),
    ("path,value", "-Infinity", "value '-Infinity' is not a finite number"),
    ("path,value", "1e39", "value '1e39' is not a finite number"),  # inf as float32
    ("path,count", "", "count '' is not a finite number"),
    ("path,count", "12 people", "count .12 people. is not a finite number"),
    ("path,count", "-2", "count '-2' is negative"),
    ("path,label", "", "label '' is not a class name"),
    ("path,label", "  ", "label .  . is not a class name"),
])
def test_table_targets_must_be_finite_numbers_or_names(tmp_path, images, header, bad, message):
    """Item 7: a CSV count of nan was accepted (and trained on)."""
    good = "3" if header != "path,label" else "cat"
    other = "4" if header != "path,label" else "dog"
    path = _table(tmp_path, images, header, [good, other, bad, good])
    with pytest.raises(ConfigError, match=f"list.csv:4: {message}"):
        find_images(path)


@pytest.mark.parametrize("row, message", [
    ('{"path": "PATH", "count": NaN}', "count nan is not a finite number"),
    ('{"path": "PATH", "count": true}', "count True is not a finite number"),
    ('{"path": "PATH", "count": [3]}', "count \\[3\\] is not a finite number"),
    ('{"path": "PATH", "label": null}', "label None is not a class name"),
    ('{"path": "PATH", "label": false}', "label False is not a class name"),
    ('{"path": "PATH"}', "label None is not a class name"),
    ('{"label": "cat"}', "every row needs a 'path'"),
    ('["PATH", "cat"]', "every row needs a 'path'"),
    ('{"path": 7, "label": "cat"}', "every row needs a 'path'"),
])
def test_jsonl_rows_of_the_wrong_kind_are_one_clear_error(tmp_path, images, row, message):
    """Item 7, beyond the example: rows that used to give KeyError / TypeError tracebacks."""
    first = ('{"path": "PATH", "label": "cat"}' if "label" in row or "count" not in row
             else '{"path": "PATH", "count": 1}')
    path = _table(tmp_path, images, None, [first, first.replace("cat", "dog"), row],
                  suffix=".jsonl")
    with pytest.raises(ConfigError, match=f"list.jsonl:3: {message}"):
        find_images(path)


def test_one_class_is_refused(tmp_path, images):
    """Item 7: a single class folder trained a one-class 'classifier'."""
    root = images.write_class_folders(tmp_path / "data", per_class=6)
    for extra in ("class_1", "class_2"):
        for f in (root / extra).iterdir():
            f.unlink()
        (root / extra).rmdir()
    with pytest.raises(ConfigError, match="holds one class \\('class_0'\\); a classifier needs "
                                          "at least two"):
        _load(root)
    path = _table(tmp_path, images, "path,label", ["cat"] * 6)
    with pytest.raises(ConfigError, match="holds one class \\('cat'\\)"):
        _load(path)
    # one class of images is still a calibration / run source (no classifier is trained on it)
    assert len(find_images(root)[0]["train"]) > 0


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_class_whose_every_image_is_unreadable_is_an_error(tmp_path, images, split):
    """Item 7: the class was only counted in 'skipped N' and the model never saw it."""
    root = images.write_class_folders(tmp_path / "data", per_class=10)
    lists, _, _, _ = find_images(root)
    doomed = [p for p, t in zip(lists[split].paths, lists[split].targets) if t == 1]
    for i, path in enumerate(doomed):  # not images / truncated images
        data = b"not an image" if i % 2 else open(path, "rb").read()[:100]
        open(path, "wb").write(data)
    if split == "val":  # decoded when the dataset loads
        with pytest.raises(InputError, match="imagefolder/val: none of the 2 images of class "
                                             "'class_1' could be decoded .*remove the class"):
            _load(root)
        return
    splits = _load(root)
    with pytest.raises(InputError, match="imagefolder/train: none of the 6 images of class "
                                         "'class_1' could be decoded"):
        list(splits["train"].batches(8))
    # some images of a class failing is still a counted skip
    (root / "class_1" / "extra.png").write_bytes(open(root / "class_0" / "1.png", "rb").read())
    splits = _load(root)
    assert sum(len(t) for _, t in splits["train"].batches(8)) >= 12


def test_calibration_from_a_folder_replaces_unreadable_draws(tmp_path, images):
    """Item 15: an unreadable image drawn gave 255 samples for 256."""
    from types import SimpleNamespace

    from trt_exit.training.image_folder import calibration_from_folder

    root = images.write_class_folders(tmp_path / "data", per_class=12)
    for name in ("0.jpg", "3.png", "4.jpg"):
        (root / "class_2" / name).write_bytes(b"junk")
    manifest = SimpleNamespace(model={"dataset": {"options": CONFIG}}, preprocessing={},
                               path="manifest.json")
    for size, per_class in ((9, [3, 3, 3]), (33, [12, 12, 9]), (34, [12, 12, 9])):
        inputs, origin = calibration_from_folder(manifest, f"imagefolder://{root}", size)
        assert len(inputs["image"]) == min(size, 33), size
        assert origin["skipped_images"] <= 3
    # the class shares hold: the replacements come from the same class while it has images
    stream = ImageFolderSplit(find_images(root)[0]["train"], CONFIG, "classification", "t",
                              training=False, num_workers=0)
    from trt_exit.training.image_folder import sample_decodable

    every = len(stream)
    sample = sample_decodable(stream, every, seed=1)
    assert len(sample) == every - sum(
        p.endswith(("class_2/0.jpg", "class_2/3.png", "class_2/4.jpg"))
        for p in stream.images.paths)
    sample = sample_decodable(stream, 12, seed=1)
    assert len(sample) == 12 and np.bincount(sample.targets).tolist() == [4, 4, 4]
