"""The synthetic_av_crowd dataset and the DISCO folder loader."""

from __future__ import annotations

import json

import numpy as np
import pytest

from trt_exit import tensor_names as tn
from trt_exit.errors import ArtifactError, ConfigError
from trt_exit.models.audiovisual import AV_CROWD_LOG_MEL, av_crowd_preprocessing
from trt_exit.pipelines.audio_features import log_mel
from trt_exit.pipelines.preprocess import image_to_input
from trt_exit.training.audio_datasets import write_wav
from trt_exit.training.crowd_datasets import load_disco, plan_scenes, read_head_count
from trt_exit.training.crowd_synth import CrowdSceneConfig, render_scene
from trt_exit.training.datasets import load_dataset


@pytest.fixture(scope="module")
def small():
    return load_dataset("synthetic_av_crowd", seed=0, train=24, val=8, test=8)


def test_splits_have_the_documented_inputs_and_targets(small):
    assert set(small) == {"train", "val", "test"}
    for split, size in (("train", 24), ("val", 8), ("test", 8)):
        data = small[split]
        assert len(data) == size and data.task == "regression"
        assert data.inputs[tn.IMAGE].shape == (size, 3, 96, 128)
        assert data.inputs[tn.AUDIO].shape == (size, *AV_CROWD_LOG_MEL.shape)
        assert data.targets.shape == (size, 1) and data.targets.dtype == np.float32
        assert all(v.dtype == np.float32 for v in data.inputs.values())
    plan = plan_scenes(0, "train", 24)
    assert np.array_equal(small["train"].targets[:, 0], plan.counts)


def test_samples_are_what_the_live_pipeline_would_compute(small):
    # Sample i is rendered from default_rng([seed, split, i]) and preprocessed by the same two
    # functions (and the same recipes) the live pipeline uses.
    plan = plan_scenes(0, "val", 8)
    i = 5
    image, audio = render_scene(int(plan.counts[i]), np.random.default_rng([0, 1, i]),
                                CrowdSceneConfig(), plan.degradations[i])
    spec = av_crowd_preprocessing()
    assert np.allclose(small["val"].inputs[tn.IMAGE][i], image_to_input(image, spec["image"]))
    assert np.allclose(small["val"].inputs[tn.AUDIO][i], log_mel(audio, AV_CROWD_LOG_MEL),
                       atol=1e-4)


def test_plans_are_seeded_and_mix_degradations():
    a = plan_scenes(3, "test", 400)
    b = plan_scenes(3, "test", 400)
    assert np.array_equal(a.counts, b.counts) and a.degradations == b.degradations
    assert not np.array_equal(a.counts, plan_scenes(3, "val", 400).counts)
    labels = a.degradation_labels()
    fractions = {k: float(np.mean(labels == k)) for k in ("clean", "dark", "blur", "occluded")}
    assert 0.4 < fractions["clean"] < 0.6
    assert all(0.1 < fractions[k] < 0.25 for k in ("dark", "blur", "occluded"))
    assert a.counts.min() >= 0 and a.counts.max() <= 40
    with pytest.raises(ConfigError):
        plan_scenes(0, "holdout", 10)


def _write_disco(root, counts_per_split, formats):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, counts in counts_per_split.items():
        folder = root / split
        folder.mkdir(parents=True)
        for i, count in enumerate(counts):
            stem = f"{split}_{i:03d}"
            Image.fromarray(rng.integers(0, 255, (108, 192, 3), dtype=np.uint8)).save(folder / f"{stem}.jpg")
            write_wav(folder / f"{stem}.wav", 0.1 * rng.standard_normal(22050), 22050)
            points = rng.uniform(0, 100, (count, 2))
            fmt = formats[i % len(formats)]
            if fmt == "npy":
                np.save(folder / f"{stem}.npy", points)
            elif fmt == "json":
                (folder / f"{stem}.json").write_text(json.dumps(points.tolist()))
            else:
                np.savetxt(folder / f"{stem}.txt", points)


def test_disco_layout_loads(tmp_path):
    counts = {"train": [3, 0, 12], "val": [5], "test": [7, 1]}
    _write_disco(tmp_path, counts, ["npy", "json", "txt"])
    splits = load_disco(root=str(tmp_path))
    for split, expected in counts.items():
        data = splits[split]
        assert data.inputs[tn.IMAGE].shape == (len(expected), 3, 96, 128)
        assert data.inputs[tn.AUDIO].shape == (len(expected), 1, 32, 64)
        assert data.targets[:, 0].tolist() == expected
    assert load_dataset("disco", root=str(tmp_path), limit=1)["train"].targets.shape == (1, 1)


def test_disco_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="root"):
        load_disco()
    with pytest.raises(ArtifactError, match="does not exist"):
        load_disco(root=str(tmp_path))
    _write_disco(tmp_path, {"train": [2], "val": [2], "test": [2]}, ["npy"])
    (tmp_path / "val" / "val_000.wav").unlink()
    with pytest.raises(ArtifactError, match="audio"):
        load_disco(root=str(tmp_path))


def test_head_count_formats(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"count": 17}))
    assert read_head_count(tmp_path / "a.json") == 17
    np.save(tmp_path / "b.npy", np.zeros((0, 2)))
    assert read_head_count(tmp_path / "b.npy") == 0
    from scipy.io import savemat

    savemat(tmp_path / "c.mat", {"image_info": {"location": np.ones((9, 2))}})
    assert read_head_count(tmp_path / "c.mat") == 9
    (tmp_path / "d.json").write_text("not json")
    with pytest.raises(ArtifactError):
        read_head_count(tmp_path / "d.json")
