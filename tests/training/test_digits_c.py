"""digits-C: deterministic, registered, severities ordered, the clean part equal to digits."""

from __future__ import annotations

import numpy as np
import pytest

from trt_exit.errors import ConfigError
from trt_exit.training.datasets import dataset_names, load_dataset, load_digits
from trt_exit.training.digits_c import CORRUPTIONS, SEVERITIES, corrupt


@pytest.fixture(scope="module")
def digits_c():
    return load_dataset("digits_c", seed=0)


def test_registered_and_layout(digits_c, digits):
    assert "digits_c" in dataset_names()
    copies = 1 + len(CORRUPTIONS) * len(SEVERITIES)
    for split in ("val", "test"):
        data = digits_c[split]
        assert len(data) == copies * len(digits[split]) and data.task == "classification"
        clean = data.meta["severity"] == 0
        # The clean copies are exactly the digits split (same preprocessing, same order).
        np.testing.assert_array_equal(data.inputs["image"][clean], digits[split].inputs["image"])
        np.testing.assert_array_equal(data.targets, np.tile(digits[split].targets, copies))
        np.testing.assert_array_equal(np.bincount(data.meta["severity"]),
                                      [len(digits[split])] + [len(CORRUPTIONS) * len(digits[split])] * 5)
    train = digits_c["train"]
    assert len(train) == len(digits["train"])
    assert set(np.unique(train.meta["severity"])) == {0, 1, 2}  # clean plus mild only
    assert abs(np.mean(train.meta["severity"] > 0) - 0.5) < 0.01
    x = digits_c["test"].inputs["image"]
    assert x.dtype == np.float32 and x.min() >= -1.0 and x.max() <= 1.0


def test_deterministic_from_the_seed(digits_c):
    again = load_dataset("digits_c", seed=0)
    for split in ("train", "test"):
        np.testing.assert_array_equal(again[split].inputs["image"], digits_c[split].inputs["image"])
    other = load_dataset("digits_c", seed=1)
    assert not np.array_equal(other["test"].inputs["image"], digits_c["test"].inputs["image"])


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_distortion_grows_with_severity(digits_c, corruption):
    """Mean absolute pixel change from the clean image, strictly increasing in severity."""
    test = digits_c["test"]
    x, meta = test.inputs["image"], test.meta
    clean = x[meta["severity"] == 0]
    index = CORRUPTIONS.index(corruption)
    change = [float(np.abs(x[(meta["corruption"] == index) & (meta["severity"] == s)] - clean).mean())
              for s in SEVERITIES]
    assert all(a < b for a, b in zip(change, change[1:])), change
    assert change[0] > 0.01


def test_subset_keeps_meta_and_options_are_checked(digits_c):
    part = digits_c["test"].subset(np.array([0, 400, 9000]))
    assert list(part.meta["severity"]) == [0, 1, 5]
    only = load_dataset("digits_c", corruptions="shift,contrast", train_corrupted_fraction="0")
    assert len(only["val"]) == 11 * 360 and not only["train"].meta["severity"].any()
    with pytest.raises(ConfigError, match="unknown"):
        load_dataset("digits_c", corruptions="fog")
    with pytest.raises(ConfigError, match="severity"):
        corrupt(np.zeros((1, 8, 8)), "shift", 6, np.random.default_rng(0))
