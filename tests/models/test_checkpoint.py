"""Checkpoints are safetensors with the config inside; loading runs no code."""

from __future__ import annotations

import pickle

import pytest
import torch

from trt_exit.errors import ArtifactError
from trt_exit.models import create_model
from trt_exit.models.checkpoint import load_checkpoint, read_metadata, save_checkpoint


def test_round_trip_reproduces_outputs(tmp_path):
    model = create_model("multi_exit_vit_tiny_test").eval()
    path = save_checkpoint(model, tmp_path / "m.safetensors", extra={"note": "x"})
    again = load_checkpoint(path)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        for a, b in zip(model(x), again(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert read_metadata(path)["extra"] == {"note": "x"}
    assert path.read_bytes()[8:9] == b"{"  # safetensors: 8-byte header length, then JSON


def test_pickle_files_are_refused(tmp_path):
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"weights": 1}))
    with pytest.raises(ArtifactError, match="not a readable safetensors checkpoint"):
        load_checkpoint(path)


def test_safetensors_without_config_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ArtifactError, match="not a trt_exit checkpoint"):
        load_checkpoint(path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")
