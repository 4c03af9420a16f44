"""Reading users' array files: one helper for `trt-exit run`, `profile` and `calibrate --from`."""

from __future__ import annotations

import numpy as np
import pytest

from trt_exit.errors import InputError
from trt_exit.fileio import load_arrays


def test_npz_gives_arrays_by_name_and_npy_one_array(tmp_path):
    image = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.savez(tmp_path / "x.npz", image=image, audio=image * 2)
    np.save(tmp_path / "x.npy", image)
    by_name = load_arrays(tmp_path / "x.npz")
    assert sorted(by_name) == ["audio", "image"]
    np.testing.assert_array_equal(by_name["audio"], image * 2)
    np.testing.assert_array_equal(load_arrays(tmp_path / "x.npy"), image)


def test_missing_damaged_and_pickled_files_are_input_errors(tmp_path):
    with pytest.raises(InputError, match=r"^input file .*nope.npy does not exist"):
        load_arrays(tmp_path / "nope.npy", "input file")
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    with pytest.raises(InputError, match="is not a .npy or .npz array file"):
        load_arrays(tmp_path / "bad.npy")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(InputError, match="is not a .npy or .npz array file"):
        load_arrays(tmp_path / "objects.npy")
