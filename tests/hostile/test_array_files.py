"""Item 1 of issue 20: array files that gave tracebacks or the wrong message (a 0-d array, a
truncated .npz, a negative size or an oversized header in a .npy) and the rest of their class:
every damaged, crafted or wrong-kind array file is one line naming the file, for every command
that reads one (`run --input`, `profile --inputs`, `calibrate --from`, the model's own
calibration set), and never a traceback."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trt_exit.errors import InputError
from trt_exit.fileio import NpyRows, load_arrays, sha256_file
from trt_exit.manifest import MANIFEST_NAME

from .conftest import assert_refused, cli


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def raw_npy(header: str, data: bytes = b"", version: int = 1) -> bytes:
    """A .npy with exactly this header text (padded as numpy pads it)."""
    length_bytes = 2 if version == 1 else 4
    header += " " * ((64 - (8 + length_bytes + len(header) + 1) % 64) % 64) + "\n"
    return (b"\x93NUMPY" + bytes([version, 0]) + len(header).to_bytes(length_bytes, "little")
            + header.encode("latin1") + data)


def npz_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


GOOD = np.zeros((4, 1, 8, 8), np.float32)
GOOD_NPZ = npz_bytes({"image.npy": npy_bytes(GOOD)})
HEADER = "{'descr': '<f4', 'fortran_order': False, 'shape': %s, }"

#: (name, file bytes, part of the message); the whole class, one example each.
CASES = [
    ("0-d npy", npy_bytes(np.float32(3)), "holds a single number (a 0-d array)"),
    ("0-d npz member", npz_bytes({"image.npy": npy_bytes(np.float32(3))}), "0-d array"),
    ("npz cut in half", GOOD_NPZ[: len(GOOD_NPZ) // 2], "damaged .npz archive"),
    ("npz cut in its data", GOOD_NPZ[:200], "damaged"),
    ("npz cut in its directory", GOOD_NPZ[:-10], "damaged .npz archive"),
    ("negative size", raw_npy(HEADER % "(-4, 1, 8, 8)", bytes(1024)), "negative size"),
    ("negative row size", raw_npy(HEADER % "(4, -1, 8, 8)", bytes(1024)), "negative size"),
    ("oversized header", raw_npy(HEADER % "(4, 1, 8, 8)" + " " * 20000, bytes(1024), 2),
     "header of 20"),
    ("header not a literal", raw_npy("{'descr': '<f4', 'shape': (4,) + (1,)}"), "header"),
    ("header wrong keys", raw_npy("{'descr': '<f4', 'shape': (4,)}"), "header"),
    ("header nested deep", raw_npy("(" * 3000 + ")" * 3000), "header"),
    ("unknown version", b"\x93NUMPY\x07\x00" + bytes(100), "version"),
    ("promises more data", raw_npy(HEADER % "(4000000, 1, 8, 8)", bytes(64)), "promises"),
    ("strings", npy_bytes(np.array(["a", "b"])), "not numbers"),
    ("structured", npy_bytes(np.zeros(3, dtype=[("a", "<f4"), ("b", "<i4")])), "not numbers"),
    ("complex", npy_bytes(np.zeros((2, 1, 8, 8), np.complex64)), "not numbers"),
    ("datetimes", npy_bytes(np.zeros(3, "datetime64[s]")), "not numbers"),
    ("objects in npz", npz_bytes({"image.npy": npy_bytes(np.array([{}], dtype=object))}),
     "pickled data"),
    ("a text member in npz", npz_bytes({"image.npy": npy_bytes(GOOD), "notes.txt": b"hi"}),
     "not an array"),
    ("empty npz", npz_bytes({}), "holds no arrays"),
    ("npz member not .npy", npz_bytes({"image.npy": b"hello"}), "x.npz[image] is a damaged"),
]


@pytest.mark.parametrize("name,data,message", CASES, ids=[c[0] for c in CASES])
def test_damaged_array_files_are_one_line_errors(model, tmp_path, name, data, message, capsys):
    path = tmp_path / "x.npz"
    path.write_bytes(data)
    for lazy in (False, True):
        with pytest.raises(InputError) as info:
            load_arrays(path, "input file", lazy=lazy)
        assert message in str(info.value) and "\n" not in str(info.value)
        if name != "objects in npz":
            assert "pickle" not in str(info.value)
    assert_refused(capsys, ["run", model, "--input", path], message, model, tmp_path)


def test_an_oversized_header_is_not_called_pickled_data(model, tmp_path, capsys):
    """numpy's refusal mentions allow_pickle; the old message then blamed pickled objects."""
    path = tmp_path / "padded.npy"
    path.write_bytes(raw_npy(HEADER % "(4, 1, 8, 8)" + " " * 20000, GOOD.tobytes(), 2))
    line = assert_refused(capsys, ["run", model, "--input", path], "more than numpy reads "
                                                                   "safely", model)
    assert "pickle" not in line


@pytest.mark.parametrize("command", ["profile", "calibrate"])
def test_other_commands_that_read_array_files(model, tmp_path, command, capsys):
    path = tmp_path / "x.npy"
    path.write_bytes(npy_bytes(np.float32(3)))
    args = {"profile": ["profile", model, "--inputs", path, "--out", tmp_path / "p"],
            "calibrate": ["calibrate", model, "--from", path]}[command]
    assert_refused(capsys, args, "0-d array", model, tmp_path)


def test_profile_reads_an_npz_of_inputs(model, digits, tmp_path, capsys):
    """`profile --inputs FILE.npz` failed with AttributeError (load_arrays returns a dict)."""
    path = tmp_path / "x.npz"
    np.savez(path, image=digits["test"].inputs["image"][:20])
    status, err = cli(capsys, "profile", model, "--inputs", path, "--samples", 3,
                      "--stage-repeats", 2, "--warmup", 0, "--out", tmp_path / "p")
    assert status == 0, err
    report = json.loads((tmp_path / "p" / "profile.json").read_text())
    assert report["end_to_end"]["batch"] == 1 and str(path) in report["inputs"]


def test_calibration_set_with_objects_in_the_model_directory(model, capsys):
    """A model directory's own calibration.npz (hash matching: whoever made the directory set
    it) holding an object array: `precision --precision int8` gave a ValueError traceback."""
    folder = model / "calibration"
    folder.mkdir()
    target = folder / "calibration.npz"
    target.write_bytes(npz_bytes({"image.npy": npy_bytes(np.array([{}] * 40, dtype=object))}))
    data = json.loads((model / MANIFEST_NAME).read_text())
    data["calibration"] = {"file": {"path": "calibration/calibration.npz",
                                    "sha256": sha256_file(target),
                                    "bytes": target.stat().st_size}, "samples": 40}
    (model / MANIFEST_NAME).write_text(json.dumps(data))
    assert_refused(capsys, ["precision", model, "--precision", "int8"], "pickled data", model)


# ------------------------------------------------------------------ property-based

SEEDS = [npy_bytes(np.arange(24, dtype=np.float32).reshape(2, 3, 4)),
         npy_bytes(np.asfortranarray(np.arange(24, dtype=np.float64).reshape(2, 3, 4))),
         npz_bytes({"image.npy": npy_bytes(GOOD), "audio.npy": npy_bytes(np.ones((4, 3), "<i2"))})]


def _compressed() -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, image=GOOD)
    return buffer.getvalue()


SEEDS.append(_compressed())


@st.composite
def damaged(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["cut", "header byte", "any byte", "insert"]))
        if kind == "cut" and data:
            data = data[: draw(st.integers(0, len(data) - 1))]
        elif kind in ("header byte", "any byte") and data:
            end = min(len(data), 140) if kind == "header byte" else len(data)
            data[draw(st.integers(0, end - 1))] = draw(st.integers(0, 255))
        elif kind == "insert":
            at = draw(st.integers(0, len(data)))
            data[at:at] = draw(st.binary(min_size=1, max_size=30))
    return bytes(data)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=damaged())
def test_any_damaged_array_file_is_arrays_of_numbers_or_an_input_error(tmp_path, data):
    path = tmp_path / "fuzz.bin"
    path.write_bytes(data)
    for lazy in (False, True):
        try:
            loaded = load_arrays(path, lazy=lazy)
        except InputError as exc:
            assert "\n" not in str(exc)
            continue
        for array in (loaded.values() if isinstance(loaded, dict) else [loaded]):
            if isinstance(array, NpyRows):
                try:
                    array = array[0 : len(array)]
                except InputError:
                    continue
            assert array.ndim >= 1 and array.dtype.kind in "biuf", (array.dtype, array.shape)


def test_a_good_file_still_loads(tmp_path):
    path = tmp_path / "x.npz"
    path.write_bytes(GOOD_NPZ)
    np.testing.assert_array_equal(load_arrays(path)["image"], GOOD)
    path = Path(tmp_path / "x.npy")
    np.save(path, np.asfortranarray(np.arange(24.0).reshape(2, 3, 4)))
    rows = load_arrays(path, lazy=True)
    np.testing.assert_array_equal(np.asarray(rows), np.arange(24.0).reshape(2, 3, 4))
