"""Your own model and images from the command line (issue 15): a timm checkpoint file and a
generated image folder through train, export, tune, calibrate and eval; bad input is one line
and leaves no run directory behind."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm", reason="timm is in the [dev] extra")

from trt_exit.cli import main  # noqa: E402

VIT_ARGS = ["--timm-arg", "img_size=32", "--timm-arg", "patch_size=8", "--timm-arg", "depth=4",
            "--timm-arg", "embed_dim=32", "--timm-arg", "num_heads=2",
            "--timm-arg", "num_classes=3"]
VIT_KWARGS = dict(img_size=32, patch_size=8, depth=4, embed_dim=32, num_heads=2, num_classes=3)


def _weights_file(tmp_path, name, suffix=".safetensors", **kwargs):
    """A random-weight timm model saved to a file (the 'pretrained checkpoint')."""
    from safetensors.torch import save_file

    torch.manual_seed(7)
    model = timm.create_model(name, **kwargs).eval()
    path = tmp_path / f"{name}{suffix}"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    return model, path


def _run(*argv):
    return main([str(a) for a in argv])


@pytest.mark.parametrize("case, args, message", [
    ("name", ["--timm", "deit_tiny_patch16_2244"], "is not a timm model name"),
    ("depth", ["--timm", "vit_tiny_patch16_224", *VIT_ARGS, "--exits", "4:slvit"],
     "between 1 and 3"),
    ("family", ["--timm", "resnet18", "--input-size", "3,32,32", "--exits", "2:mlp"],
     "'mlp' exit reads tokens"),
    ("untrained head", ["--timm", "resnet18", "--input-size", "3,32,32", "--exits",
                        "2:cnn_ignore"], "final head is untrained"),
    ("weights", ["--timm", "resnet18", "--input-size", "3,32,32", "--exits", "2:cnn_ignore",
                 "--checkpoint", "WEIGHTS"], "does not fit ResNet"),
    ("data", ["--timm", "resnet18", "--data", "imagefolder:///nonexistent/dir"], "does not exist"),
    ("size", ["--timm", "vit_tiny_patch16_224", *VIT_ARGS, "--input-size", "3,64,64"],
     "does not run on a (3, 64, 64) input"),
])
def test_bad_input_is_one_line_and_leaves_nothing(case, args, message, tmp_path, images, capsys):
    root = images.write_class_folders(tmp_path / "data", per_class=4)
    _, weights = _weights_file(tmp_path, "test_resnet", num_classes=3)
    args = [str(weights) if a == "WEIGHTS" else a for a in args]
    if "--data" not in args:
        args += ["--data", f"imagefolder://{root}"]
    if "--exits" not in args:
        args += ["--exits", "1:slvit"]
    rc = _run("train", *args, "--epochs", 1, "--no-progress", "--workers", 0,
              "--out", tmp_path / "run")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


def test_an_existing_run_is_never_overwritten(tmp_path, images, capsys):
    root = images.write_class_folders(tmp_path / "data", per_class=4)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("mine")
    rc = _run("train", "--timm", "resnet18", "--data", f"imagefolder://{root}", "--exits",
              "2:cnn_ignore", "--out", tmp_path / "run")
    assert rc == 2 and "exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "run" / "keep.txt").read_text() == "mine"


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["vit", "cnn"])
def test_own_model_and_images_end_to_end(backbone, tmp_path, images, capsys):
    """train (classifier-wise, weights from a file) -> export -> tune -> calibrate -> eval."""
    root = images.write_class_folders(tmp_path / "data", per_class=20)  # 36 / 12 / 12
    if backbone == "vit":
        source, weights = _weights_file(tmp_path, "vit_tiny_patch16_224", **VIT_KWARGS)
        model_args = ["--timm", "vit_tiny_patch16_224", *VIT_ARGS,
                      "--exits", "1:slvit,2:cnn_ignore"]
    else:
        source, weights = _weights_file(tmp_path, "resnet18", ".pth", num_classes=3)
        model_args = ["--timm", "resnet18", "--timm-arg", "num_classes=3",
                      "--input-size", "3,32,32",
                      "--exits", "2:slvit_cnn,4:cnn_ignore"]
    run = tmp_path / "run"
    assert _run("train", *model_args, "--checkpoint", weights, "--data", f"imagefolder://{root}",
                "--regime", "classifier_wise", "--epochs", 6, "--batch-size", 8, "--lr", 3e-3,
                "--workers", 1, "--no-progress", "--out", run) == 0
    assert not (tmp_path / "run.partial").exists()
    for argv in (["export", "--out", run], ["tune", run, "--repeats", 5],
                 ["calibrate", run, "--size", 32],  # from the run's own (streamed) train split
                 ["calibrate", run, "--from", f"imagefolder://{root}", "--size", 32],
                 ["eval", run, "--passes", 1, "--out", tmp_path / "report.json"]):
        assert _run(*argv) == 0, argv
    capsys.readouterr()
    manifest = json.loads((run / "manifest.json").read_text())
    report = json.loads((tmp_path / "report.json").read_text())
    assert manifest["parity"]["fp32"]["max_output_diff"] <= 1e-4
    assert manifest["parity"]["fp32"]["trained_model"]["ok"]
    assert manifest["calibration"]["origin"]["kind"] == "imagefolder"
    assert report["samples"] == 12 and len(report["exits"]) == 3
    # classifier-wise keeps the pretrained backbone and head: the final exit is the timm model
    # from the weights file, on the test images as the run preprocessed them
    from trt_exit.runtime.executor import Executor
    from trt_exit.runtime.policies import AllExitsPolicy
    from trt_exit.workflow import load_splits

    info = manifest["model"]["dataset"]
    test = load_splits(info["name"], info["seed"], info["options"])["test"]
    with Executor(str(run), policy=AllExitsPolicy()) as executor:
        outputs = executor.run(test.inputs).all_outputs
    with torch.no_grad():
        expected = source(torch.from_numpy(test.inputs["image"])).numpy()
    assert np.abs(outputs[-1] - expected).max() <= 1e-4
    # and the exits learned the colours (chance is 1/3)
    assert max(e["accuracy"] for e in report["exits"][:-1]) >= 0.6, report["exits"]


def test_counts_from_a_csv_train_as_regression_with_predicted_error(tmp_path, images):
    """A user's own crowd images: path,count rows; exits predict the count and its error."""
    rng = np.random.default_rng(0)
    rows = ["path,count"]
    for i in range(24):
        images.write_image(tmp_path / "img" / f"{i}.png", images.COLORS[i % 3], rng)
        rows.append(f"img/{i}.png,{i % 7}")
    (tmp_path / "counts.csv").write_text("\n".join(rows) + "\n")
    run = tmp_path / "run"
    assert _run("train", "--timm", "test_resnet", "--input-size", "3,32,32", "--data",
                f"imagefolder://{tmp_path / 'counts.csv'}", "--exits", "1:cnn_ignore",
                "--regime", "end_to_end", "--epochs", 2, "--batch-size", 8, "--workers", 0,
                "--no-progress", "--out", run) == 0
    assert _run("export", "--out", run) == 0
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["model"]["task"] == "regression"
    assert manifest["model"]["num_outputs"] == 2 and manifest["model"]["value_columns"] == 1
    assert {e["confidence"] for e in manifest["exits"]} == {"predicted_error"}


@pytest.mark.parametrize("regime, extra, fail_at, after", [
    # end_to_end, 3 epochs: stops while validating epoch 1; then epochs 1, 2 and the checkpoint
    ("end_to_end", ["--epochs", 3], 2, 3),
    # copycat: backbone epoch 0, imitation 0 | imitation 1 (stops), then imitation 1, fine-tuning
    # 0 and 1, and the checkpoint
    ("copycat", ["--epochs", 2, "--backbone-epochs", 1], 3, 4),
])
def test_an_interrupted_run_resumes_after_its_last_epoch(regime, extra, fail_at, after, tmp_path,
                                                         images, monkeypatch, capsys):
    import trt_exit.training.trainer as trainer
    from trt_exit.errors import TrtExitError
    from trt_exit.models.checkpoint import read_metadata

    root = images.write_class_folders(tmp_path / "data", per_class=4)
    run = tmp_path / "run"
    args = ["train", "--timm", "test_resnet", "--input-size", "3,32,32", "--data",
            f"imagefolder://{root}", "--exits", "1:cnn_ignore", "--regime", regime, *extra,
            "--batch-size", 8, "--workers", 0, "--no-progress", "--out", run]
    evaluate, calls = trainer.evaluate, []

    def fails_in_the_second_epoch(*a, **k):
        calls.append(1)
        if calls == [1] * fail_at:
            raise TrtExitError("interrupted")
        return evaluate(*a, **k)

    monkeypatch.setattr(trainer, "evaluate", fails_in_the_second_epoch)
    assert _run(*args) == 2
    partial = tmp_path / "run.partial"
    assert not run.exists() and (partial / "resume.pt").is_file()
    assert _run(*args) == 2 and "continue it with --resume" in capsys.readouterr().err
    calls.clear()
    calls.append("skip the failure")
    assert _run(*args, "--resume") == 0
    assert len(calls) - 1 == after  # validations after resuming: no finished epoch ran again
    assert not partial.exists()
    history = read_metadata(run / "checkpoint.safetensors")["extra"]["history"]
    if regime == "end_to_end":
        phase = history["train"]["phases"][0]
        assert len(phase["loss"]) == len(phase["val"]) == 3  # epoch 0 before, 1 and 2 after
    else:
        imitation = history["copycat"]["imitation"]["phases"][0]
        assert len(imitation["loss"]) == 2 and "backbone" not in history
