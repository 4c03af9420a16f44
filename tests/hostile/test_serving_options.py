"""Item 5 of issue 20: `triton-repo` checked less than `serve`: `--policy thresholds:nan,0.5,0.5`
and `--policy fixed:99` wrote a repository the served model refuses to load, and `--out
M/onnx/repo` wrote the repository inside the model directory. Both commands (and run, profile
and the Triton model itself) now read --policy through one function that checks it against the
model, and the served name through another."""

from __future__ import annotations

import pytest

from trt_exit.errors import ConfigError

from .conftest import assert_refused

BAD_POLICIES = [("thresholds:nan,0.5", "is nan"), ("fixed:99", "out of range"),
                ("fixed:-9", "out of range"), ("thresholds:0.5", "expected 2 thresholds"),
                ("thresholds:1.5,0.2", "confidences in [0, 1]"),
                ("thresholds:-0.1,off", "confidences in [0, 1]"), ("deadline:abc", "bad policy"),
                ("sometimes", "bad policy")]


@pytest.mark.parametrize("policy,message", BAD_POLICIES, ids=[p for p, _ in BAD_POLICIES])
def test_triton_repo_refuses_policies_the_model_cannot_run(model, tmp_path, policy, message,
                                                           capsys):
    assert_refused(capsys, ["triton-repo", model, "--out", tmp_path / "repo", "--policy", policy],
                   message, model, tmp_path)
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("command", ["run", "profile"])
@pytest.mark.parametrize("policy,message", BAD_POLICIES[:3], ids=[p for p, _ in BAD_POLICIES[:3]])
def test_the_same_reading_for_every_command(model, sample_file, tmp_path, command, policy,
                                            message, capsys):
    args = {"run": ["run", model, "--input", sample_file],
            "profile": ["profile", model, "--out", tmp_path / "p", "--samples", "1"]}[command]
    assert_refused(capsys, [*args, "--policy", policy], f"--policy {policy}", model)


def test_deadline_needs_a_latency_profile_in_triton_repo_too(untuned, tmp_path, capsys):
    assert_refused(capsys, ["triton-repo", untuned, "--out", tmp_path / "repo", "--policy",
                            "deadline:5"], "latency", untuned, tmp_path)


@pytest.mark.parametrize("inside", ["onnx/repo", "repo", "engines/repo", "onnx/fp32/repo"])
def test_the_repository_is_never_written_inside_the_model(model, inside, capsys):
    (model / "engines").mkdir(exist_ok=True)
    assert_refused(capsys, ["triton-repo", model, "--out", model / inside],
                   "inside the model directory", model)
    assert not (model / inside).exists()


def test_through_a_symlink_into_the_model(model, tmp_path, capsys):
    (tmp_path / "link").symlink_to(model / "onnx")
    assert_refused(capsys, ["triton-repo", model, "--out", tmp_path / "link" / "repo"],
                   "inside the model directory", model)


@pytest.mark.parametrize("name", ["a/b", "..", "x y", "n" * 201, "tab\there"])
def test_served_names_must_be_model_names(model, tmp_path, name, capsys):
    assert_refused(capsys, ["triton-repo", model, "--out", tmp_path / "repo", "--model-name",
                            name], "is not a model name", model, tmp_path)
    from trt_exit.serving.pytriton_server import ModelServer, ServeConfig

    with pytest.raises(ConfigError, match="is not a model name"):
        ModelServer(ServeConfig(model_dir=model, model_name=name))


def test_a_good_repository_is_still_written(model, tmp_path, capsys):
    from .conftest import cli

    status, err = cli(capsys, "triton-repo", model, "--out", tmp_path / "repo", "--policy",
                      "thresholds:0.5,off", "--model-name", "tiny-v1.2")
    assert status == 0, err
    config = (tmp_path / "repo" / "tiny-v1.2" / "config.pbtxt").read_text()
    assert 'string_value: "thresholds:0.5,off"' in config


@pytest.mark.parametrize("inside", ["engines/copy", "onnx", "copy"])
def test_build_out_is_never_inside_the_model_either(model, inside, capsys, monkeypatch):
    import trt_exit.build.builder as builder

    monkeypatch.setattr(builder, "require_tensorrt", lambda purpose: None)  # reach the check
    assert_refused(capsys, ["build", model, "--out", model / inside],
                   "inside the model directory", model)
    assert not (model / "engines" / "copy").exists() and not (model / "copy").exists()
