"""Item 4 of issue 20: `train --dataset-option scene=1` (AttributeError deep in the generator),
a safetensors checkpoint whose metadata is not JSON (JSONDecodeError at export), and the rest of
their classes: every dataset option is checked against the type its loader declares, and a
checkpoint's metadata and model config are as untrusted as its weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trt_exit.errors import ConfigError
from trt_exit.training.datasets import load_dataset

from .conftest import assert_refused


@pytest.mark.parametrize("option,message", [
    ("scene=1", "option 'scene' takes a CrowdSceneConfig settings object"),
    ("preprocessing={}", "option 'preprocessing' takes an object"),
    ("train=lots", "option 'train' takes an integer, got 'lots'"),
    ("degraded_fraction=nan", "option 'degraded_fraction' takes a finite number"),
], ids=lambda value: value if "=" in value else "")
def test_dataset_options_from_the_command_line(tmp_path, option, message, capsys):
    assert_refused(capsys, ["train", "--out", tmp_path / "run", "--dataset", "synthetic_av_crowd",
                            "--model", "multi_exit_av_crowd_tiny_test", "--dataset-option", option,
                            "--no-progress"], message, tmp_path)
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()


@pytest.mark.parametrize("name,options,message", [
    ("digits_c", {"corruptions": 5}, "takes text, got 5"),
    ("digits_c", {"train_corrupted_fraction": True}, "takes a number, got True"),
    ("synthetic_av_crowd", {"train": 8.5}, "takes an integer, got 8.5"),
    ("synthetic_av_crowd", {"scene": {"max_count": 3}}, "CrowdSceneConfig settings object"),
    ("disco", {"root": ["a"]}, "takes text"),
    ("disco", {"splits": "train,val"}, "takes a list of 3"),
    ("synthetic_audio", {"per_class": [1, 2, "x"]}, "takes a list of integers"),
])
def test_dataset_options_from_a_manifest_or_checkpoint(name, options, message):
    """Options recorded in JSON (a manifest's model.dataset, a checkpoint's metadata) must have
    the declared type already; before, they reached the loader as they were."""
    with pytest.raises(ConfigError, match=message):
        load_dataset(name, seed=0, **options)


def test_text_options_convert_to_the_declared_type():
    from trt_exit.training.datasets import _LOADERS, _loader_options

    converted = _loader_options("disco", _LOADERS["disco"],
                                {"splits": "a, b ,c", "limit": "3", "root": "/data"})
    assert converted == {"splits": ("a", "b", "c"), "limit": 3, "root": "/data"}
    assert _loader_options("speech_commands", _LOADERS["speech_commands"],
                           {"limit_per_class": "none"}) == {"limit_per_class": None}


# ------------------------------------------------------------------ checkpoint metadata


@pytest.fixture
def checkpoint(tiny_export, tmp_path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    target = run / "checkpoint.safetensors"
    target.write_bytes((tiny_export / "checkpoint.safetensors").read_bytes())
    return target


def _rewrite(path: Path, change) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
    tensors = load_file(str(path))
    change(metadata)
    save_file(tensors, str(path), metadata=metadata)


def _config(**changes):
    def change(metadata):
        config = json.loads(metadata["trt_exit.model_config"])
        config.update(changes)
        metadata["trt_exit.model_config"] = json.dumps(config)
    return change


def _backbone(**changes):
    def change(metadata):
        config = json.loads(metadata["trt_exit.model_config"])
        config["backbone_options"].update(changes)
        metadata["trt_exit.model_config"] = json.dumps(config)
    return change


METADATA = [
    ("config not JSON", lambda m: m.update({"trt_exit.model_config": "{not json"}),
     "'trt_exit.model_config' metadata is not valid JSON"),
    ("extra not JSON", lambda m: m.update({"trt_exit.extra": "nope"}),
     "'trt_exit.extra' metadata is not valid JSON"),
    ("reference not JSON", lambda m: m.update({"trt_exit.reference": "[1,"}),
     "'trt_exit.reference' metadata is not valid JSON"),
    ("extra a list", lambda m: m.update({"trt_exit.extra": "[1]"}), "must be a JSON object"),
    ("reference without outputs", lambda m: m.update({"trt_exit.reference": "{}"}),
     "no list of outputs"),
    ("extra nested deep", lambda m: m.update({"trt_exit.extra": '{"a": ' + "[" * 900 + "]" * 900
                                                                + "}"}), "deep"),
    ("extra 1e400", lambda m: m.update({"trt_exit.extra": '{"dataset": 1e400}'}),
     "must be a finite number"),
    ("dataset a string", lambda m: m.update({"trt_exit.extra": '{"dataset": "digits"}'}),
     "trt_exit.extra.dataset must be an object"),
    ("dataset without seed",
     lambda m: m.update({"trt_exit.extra": '{"dataset": {"name": "digits"}}'}),
     "trt_exit.extra.dataset lacks seed"),
    ("config exits not objects", _config(exits=[5]), "model_config.exits[0] must be an object"),
    ("config exit options text", _config(exits=[{"after_block": 1, "type": "mlp", "options": "x"}]),
     "its model config does not build a model"),
    ("config image size text", _backbone(img_size="x"),
     "its model config does not build a model"),
    ("config width 40000", _backbone(embed_dim=40000), "the file holds"),
    ("config width 10^9", _backbone(embed_dim=10**9), "does not build a model"),
    ("config depth 2^31", _backbone(depth=2**31), "backbone_options.depth must be <= 1000"),
    ("config no heads", _backbone(num_heads=0), "does not build a model"),
    ("config preprocessing a list", _config(preprocessing=[1]),
     "trt_exit.model_config.preprocessing must be an object"),
    ("config name a path", _config(name="../x"), "is not a model name"),
    ("config std zero", _config(preprocessing={"mean": 0.5, "std": 0}),
     "preprocessing.std must be > 0"),
    ("reference of text", lambda m: m.update({"trt_exit.reference": json.dumps(
        {"outputs": [[["a"]]]})}), "output 0 is not an array of finite numbers"),
    ("reference with null", lambda m: m.update({"trt_exit.reference": json.dumps(
        {"outputs": [[[1.0, None]]]})}), "output 0 is not an array of finite numbers"),
]


@pytest.mark.parametrize("label,change,message", METADATA, ids=[m[0] for m in METADATA])
def test_checkpoint_metadata_is_checked_before_it_is_used(checkpoint, label, change, message,
                                                          capsys):
    _rewrite(checkpoint, change)
    assert_refused(capsys, ["export", "--out", checkpoint.parent], message, checkpoint.parent)
    assert not (checkpoint.parent / "manifest.json").exists()
