"""Items 7 and 8 of issue 12: every numeric option has a range; no NaN or Infinity reaches a
JSON file; ``--policy thresholds`` on an untuned model says to run ``trt-exit tune``."""

from __future__ import annotations

import json

import pytest

from trt_exit.errors import OutputError
from trt_exit.manifest import Manifest

from .conftest import assert_refused, snapshot, subcommands


def test_no_command_has_an_unchecked_numeric_option():
    bare = [f"trt-exit {name} {'/'.join(a.option_strings)}"
            for name, sub in subcommands() for a in sub._actions if a.type in (int, float)]
    assert not bare, f"numeric options without a range (use trt_exit.commands.options): {bare}"


BAD_NUMBERS = [
    ("tune", "--repeats", "0"), ("tune", "--repeats", "-3"), ("tune", "--max-drop", "nan"),
    ("tune", "--max-drop", "-1"), ("tune", "--max-drop", "inf"), ("eval", "--passes", "0"),
    ("demo", "--max-drop", "101"), ("train", "--lr", "nan"), ("train", "--lr", "0"),
    ("train", "--epochs", "0"), ("train", "--batch-size", "-1"), ("count", "--queue-frames", "0"),
    ("count", "--max-frames", "0"), ("count", "--duration-s", "0"),
    ("count", "--reconnect-s", "nan"), ("count", "--input-rate", "-5"),
    ("count", "--budget-ms", "inf"), ("profile", "--samples", "0"), ("profile", "--batch", "0"),
    ("profile", "--threads", "0"), ("run", "--chunk", "0"), ("build", "--max-batch", "0"),
    ("calibrate", "--size", "0"), ("precision", "--percentile", "nan"),
    ("tune", "--floor-confidence", "0.3"), ("tune", "--floor-confidence", "1"),
    ("demo", "--floor-confidence", "nan"),
]


@pytest.mark.parametrize("command,option,value", BAD_NUMBERS)
def test_out_of_range_numbers_are_one_clear_error(model, command, option, value, capsys,
                                                  sample_file):
    args = {"tune": [model], "eval": [model], "demo": ["--out", model / "demo"],
            "train": ["--out", model / "train"], "count": ["synthetic://crowd", "--engines", model],
            "profile": [model], "run": [model, "--input", sample_file], "build": [model],
            "calibrate": [model], "precision": [model]}[command]
    assert_refused(capsys, [command, *args, option, value], f"argument {option}: must be", model)
    assert not (model / "demo").exists() and not (model / "train").exists()


def test_nan_never_reaches_the_manifest(model):
    manifest = Manifest.load(model)
    before = snapshot(model)
    manifest.latency_profile["stages"]["segment_0"] = float("nan")
    with pytest.raises(OutputError, match=r"latency_profile\.stages\.segment_0"):
        manifest.save()
    assert snapshot(model) == before


def test_tune_step_refuses_zero_repeats(model, digits):
    from trt_exit.errors import ConfigError
    from trt_exit.workflow import evaluate_step, tune_step

    with pytest.raises(ConfigError, match="profile_repeats"):
        tune_step(Manifest.load(model), digits["val"], profile_repeats=0)
    with pytest.raises(ConfigError, match="passes"):
        evaluate_step(Manifest.load(model), digits["test"], passes=0)
    from trt_exit.runtime.tuning import tune_thresholds

    with pytest.raises(ConfigError, match="max_loss"):
        import numpy as np

        tune_thresholds(np.zeros((2, 3, 4)), np.zeros((2, 3)), np.zeros(3, int), "classification",
                        {"segment_0": 1, "segment_1": 1, "exit_0": 1, "exit_1": 1}, float("nan"))


@pytest.mark.parametrize("policy", [None, "thresholds"])
def test_thresholds_policy_on_an_untuned_model(untuned, sample_file, policy, capsys):
    args = ["run", untuned, "--input", sample_file] + (["--policy", policy] if policy else [])
    assert_refused(capsys, args, "run trt-exit tune", untuned)
    assert_refused(capsys, ["profile", untuned, "--inputs", "random", "--samples", "1"],
                   "run trt-exit tune", untuned)


def test_an_untuned_model_runs_with_an_explicit_exit(untuned, sample_file, capsys):
    from .conftest import cli

    status, err = cli(capsys, "run", untuned, "--input", sample_file, "--policy", "fixed:-1")
    assert status == 0, err


def test_run_writes_strict_json(model, sample_file, tmp_path, capsys):
    from .conftest import cli

    out = tmp_path / "out.jsonl"
    status, err = cli(capsys, "run", model, "--input", sample_file, "--output", out)
    assert status == 0, err
    for line in out.read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in the output"))
