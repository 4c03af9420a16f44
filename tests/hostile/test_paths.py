"""Item 3 of issue 20: OS path errors (a NUL byte, a file name over 255 bytes) escaped as
tracebacks. Every path option of every command is checked on parsing (an argparse error naming
the option), paths inside manifests and image lists are checked where they are read, and an OS
error on a path that still escapes is one line naming the path (the CLI's last resort)."""

from __future__ import annotations

import argparse
import errno
import json

import pytest

from trt_exit.cli import error_message
from trt_exit.commands.options import PATH, TEXT, URI
from trt_exit.errors import ManifestError
from trt_exit.manifest import MANIFEST_NAME, Manifest

from .conftest import assert_refused, snapshot, subcommands

LONG_NAME = "n" * 300


def _text_options():
    for name, sub in subcommands():
        for action in sub._actions:
            if action.nargs == 0 or action.choices or isinstance(action, argparse._HelpAction):
                continue
            if action.type in (None, str) or action.type in (PATH, URI, TEXT):
                yield name, sub, action


def test_every_text_option_says_what_it_holds():
    bare = [f"trt-exit {name} {'/'.join(a.option_strings) or a.dest}"
            for name, _, a in _text_options() if a.type not in (PATH, URI, TEXT)]
    assert not bare, ("text options without type=PATH, URI or TEXT (trt_exit.commands.options): "
                      f"{bare}")


PATH_OPTIONS = [(name, sub, action) for name, sub, action in _text_options()
                if action.type in (PATH, URI)]


def _command_line(name, sub, target, bad) -> list[str]:
    """A minimal command line of ``name`` with ``bad`` as the value of ``target`` (positionals
    first: an option with ``nargs="+"`` takes every word after it)."""
    options, positionals = [], []
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if action.option_strings:
            if action is target:
                options += [action.option_strings[-1], bad]
            elif action.required:
                options += [action.option_strings[-1], "x"]
        elif action is target:
            positionals.append(bad)
        elif action.nargs not in ("*", "?", argparse.REMAINDER):
            positionals.append("x")
    return [name, *positionals, *options]


@pytest.mark.parametrize("bad", [f"out/{LONG_NAME}", "out/\0x", "/" + "d/" * 2100],
                         ids=["name over 255 bytes", "NUL byte", "path over 4095 bytes"])
@pytest.mark.parametrize("name,sub,action", PATH_OPTIONS,
                         ids=[f"{n} {'/'.join(a.option_strings) or a.dest}"
                              for n, _, a in PATH_OPTIONS])
def test_every_path_option_refuses_what_no_file_system_takes(name, sub, action, bad, capsys,
                                                             tmp_path, monkeypatch):
    if action.type is URI and action.option_strings == ["--server"] and "\0" not in bad:
        pytest.skip("--server is a network URL: only a NUL byte is a path problem there")
    monkeypatch.chdir(tmp_path)
    args = _command_line(name, sub, action, bad)
    line = assert_refused(capsys, args, "argument ", tmp_path)
    shown = action.option_strings[-1] if action.option_strings else (action.metavar or action.dest)
    assert shown in line, line
    assert not list(tmp_path.iterdir()), "something was written"


@pytest.mark.parametrize("args", [
    ["run", "{model}", "--input", "{x}", "--output", "/tmp/" + LONG_NAME],
    ["run", "/tmp/" + LONG_NAME, "--input", "{x}"],
    ["eval", "{model}/" + LONG_NAME],
    ["train", "--out", "{tmp}/" + LONG_NAME + "/run"],
    ["export", "--out", "{tmp}/run", "--checkpoint", "/tmp/" + LONG_NAME],
    ["count", f"file:///tmp/{LONG_NAME}.mp4", "--engines", "{model}"],
], ids=["run --output", "run model dir", "eval model dir", "train --out", "export --checkpoint",
        "count input"])
def test_the_reported_examples(model, sample_file, tmp_path, args, capsys):
    args = [a.format(model=model, x=sample_file, tmp=tmp_path) for a in args]
    line = assert_refused(capsys, args, "255", model, tmp_path)
    assert "Traceback" not in line and not (tmp_path / "run").exists()


# ------------------------------------------------------------------ paths read from files


@pytest.mark.parametrize("path,message", [
    ("onnx/fp32/seg\u0000ment_0.onnx", "control character"),
    ("onnx/fp32/\udcff.onnx", "not valid Unicode"),
    ("onnx/" + "a" * 300 + ".onnx", "over 255 bytes"),
])
def test_paths_in_a_manifest(model, sample_file, path, message, capsys):
    data = json.loads((model / MANIFEST_NAME).read_text())
    data["stages"][0]["onnx"]["fp32"]["path"] = path
    (model / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=message):
        Manifest.load(model)
    assert_refused(capsys, ["run", model, "--input", sample_file], "stages[0].onnx.fp32.path",
                   model)


def test_a_nul_byte_in_an_image_list(tmp_path, images, capsys):
    pytest.importorskip("timm")
    images.write_class_folders(tmp_path / "images", per_class=4)
    rows = [f"images/class_{c}/{i}.{'png' if i % 2 else 'jpg'},{c}" for c in range(3)
            for i in range(4)]
    table = tmp_path / "list.csv"
    table.write_text("path,label\n" + "\n".join(rows) + "\nimages/class_0/0\0.png,0\n")
    assert_refused(capsys, ["train", "--out", tmp_path / "run", "--timm", "resnet18", "--data",
                            f"imagefolder://{table}", "--exits", "2:mlp", "--workers", "0"],
                   "list.csv:14: the image path", tmp_path / "images")


def test_a_path_inside_an_option_value_reaches_the_last_resort(tmp_path, capsys):
    """`--dataset-option root=PATH` is the loader's to read: the OS error it meets is one line
    that names the path and says what to do (cli.error_message)."""
    line = assert_refused(capsys, ["train", "--out", tmp_path / "run", "--dataset",
                                   "speech_commands", "--dataset-option",
                                   f"root={tmp_path}/{LONG_NAME}"],
                          "use a shorter name", tmp_path)
    assert "longer than 255 bytes" in line


def test_the_last_resort_takes_path_errors_only():
    assert "use a shorter name" in error_message(
        OSError(errno.ENAMETOOLONG, "File name too long", "/x/" + LONG_NAME))
    assert "free some space" in error_message(OSError(errno.ENOSPC, "No space left", "/x/y"))
    assert "line two" not in error_message(ValueError("embedded null byte"))
    assert error_message(ValueError("a bug")) is None  # bugs keep their traceback
    assert error_message(OSError(errno.EIO, "I/O error")) is None  # names no file
    assert error_message(KeyError("x")) is None


def test_a_multi_line_message_is_one_line():
    from trt_exit.errors import ArtifactError

    assert error_message(ArtifactError("first\nsecond\n\n  third")) == "first; second; third"


def test_model_directory_through_a_symlink_loop(tmp_path, capsys, sample_file):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    before = snapshot(tmp_path)
    assert_refused(capsys, ["run", tmp_path / "a" / "model", "--input", sample_file],
                   "manifest", tmp_path)
    assert_refused(capsys, ["run", tmp_path / "a", "--input", sample_file], "symlink loop",
                   tmp_path)
    assert snapshot(tmp_path) == before
