"""`run` and `eval` on image files, with the evaluation transform the manifest records (issue 20,
item 17): the same inputs, and so the same predictions, as the model's own evaluation data."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

timm = pytest.importorskip("timm", reason="timm is in the [dev] extra")

from trt_exit.cli import main  # noqa: E402
from trt_exit.manifest import Manifest  # noqa: E402


def _cli(*argv):
    return main([str(a) for a in argv])


def _records(capsys):
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()
            if line.startswith("{")]


def _test_split(run):
    """The run's test split as `eval` loads it, and the image file of every sample."""
    from trt_exit.training.image_folder import find_images
    from trt_exit.workflow import dataset_of, load_splits

    info = dataset_of(Manifest.load(run))
    test = load_splits(info["name"], info["seed"], info["options"])["test"]
    lists, _, _, _ = find_images(
        __import__("pathlib").Path(info["options"]["root"]), info["seed"])
    return test, lists["test"].paths


def test_the_manifest_records_the_whole_evaluation_transform(timm_run):
    """The formula left out the resize to H / crop_pct and the centre crop; the numbers come from
    the backbone's pretrained config, not from a copy."""
    run, _ = timm_run
    pre = Manifest.load(run).preprocessing
    cfg = timm.create_model("vit_tiny_patch16_224", pretrained=False).pretrained_cfg
    assert pre["crop_pct"] == cfg["crop_pct"] and pre["interpolation"] == cfg["interpolation"]
    assert pre["mean"] == list(cfg["mean"]) and pre["std"] == list(cfg["std"])
    size = int(32 / cfg["crop_pct"])  # 35
    assert pre["eval_transform"] == [
        {"op": "Resize", "size": size, "max_size": None, "interpolation": cfg["interpolation"],
         "antialias": True},
        {"op": "CenterCrop", "size": [32, 32]},
        {"op": "MaybeToTensor"},
        {"op": "Normalize", "mean": list(cfg["mean"]), "std": list(cfg["std"])}]
    assert f"resize the shorter side to {size} px" in pre["formula"]
    assert "crop the centre 32x32 px" in pre["formula"]
    assert pre["decode"] == "PIL.Image.open(file).convert('RGB')"
    assert pre["timm"] == timm.__version__


def test_the_recorded_formula_reproduces_the_evaluation_inputs(timm_run):
    """Following the manifest's steps with Pillow and numpy alone (no timm, no torchvision)
    gives the arrays `eval` ran on: the docs' recipe is complete."""
    from PIL import Image

    run, _ = timm_run
    pre = Manifest.load(run).preprocessing
    resize, crop, _, normalize = pre["eval_transform"]
    test, paths = _test_split(run)
    made = []
    for path in paths:
        image = Image.open(path).convert("RGB")
        w, h = image.size
        short = resize["size"]
        size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        image = image.resize(size, Image.BICUBIC)
        ch, cw = crop["size"]
        left, top = int(round((size[0] - cw) / 2.0)), int(round((size[1] - ch) / 2.0))
        pixels = np.asarray(image.crop((left, top, left + cw, top + ch)), np.float32) / 255
        x = (pixels - np.float32(normalize["mean"])) / np.float32(normalize["std"])
        made.append(x.transpose(2, 0, 1))
    np.testing.assert_allclose(np.stack(made), test.inputs["image"], rtol=0, atol=1e-6)


def test_run_on_an_image_file_gives_the_prediction_eval_gives(timm_run, capsys):
    from trt_exit.runtime.executor import Executor
    from trt_exit.runtime.policies import AllExitsPolicy
    from trt_exit.training.image_folder import ImageList
    from trt_exit.training.image_inputs import image_batches

    run, _ = timm_run
    manifest = Manifest.load(run)
    test, paths = _test_split(run)
    with Executor(run) as executor:
        tuned = executor.run(test.inputs).records()
        every = executor.run(test.inputs, AllExitsPolicy()).records()
    for i, path in enumerate(paths):
        # the very array eval ran on
        (batch, _), = list(image_batches(manifest, ImageList([path], np.zeros(1)), 1))
        np.testing.assert_array_equal(batch[0], test.inputs["image"][i])
        assert _cli("run", run, "--input", path) == 0
        (record,) = _records(capsys)
        assert record["path"] == path
        assert record["exit"] == tuned[i]["exit"]
        assert record["prediction"] == tuned[i]["prediction"]
        assert record["confidence"] == pytest.approx(tuned[i]["confidence"], abs=1e-6)
    # and all of them at once, with every exit's output
    assert _cli("run", run, "--input", *paths, "--policy", "all", "--workers", 0) == 0
    records = _records(capsys)
    assert [r["prediction"] for r in records] == [r["prediction"] for r in every]
    # eval reads the same images from the folder it was trained on: the same report
    assert _cli("eval", run, "--passes", 1, "--out", run.parent / "own.json") == 0
    assert _cli("eval", run, "--data", run.parent / "data", "--split", "test", "--passes", 1,
                "--out", run.parent / "folder.json") == 0
    own = json.loads((run.parent / "own.json").read_text())
    folder = json.loads((run.parent / "folder.json").read_text())
    for key in ("samples", "final_accuracy"):
        assert own[key] == folder[key]
    assert own["early_exit"]["exit_fractions"] == folder["early_exit"]["exit_fractions"]
    assert [e["accuracy"] for e in own["exits"]] == [e["accuracy"] for e in folder["exits"]]


def test_run_takes_folders_and_imagefolder_uris(timm_run, tmp_path, capsys):
    run, root = timm_run
    assert _cli("run", run, "--input", f"imagefolder://{root}", "--output",
                tmp_path / "all.jsonl", "--chunk", 5, "--workers", 1) == 0
    records = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    paths = sorted(str(p) for p in root.rglob("*.*"))
    assert [r["path"] for r in records] == paths and len(paths) == 24
    assert [r["label"] for r in records] == [p.split("/")[-2] for p in paths]
    assert [r["sample"] for r in records] == list(range(24))
    capsys.readouterr()
    assert _cli("run", run, "--input", root / "class_1", "--chunk", 3) == 0
    folder = _records(capsys)
    assert [r["path"] for r in folder] == [p for p in paths if "/class_1/" in p]
    assert "label" not in folder[0]
    by_path = {r["path"]: r for r in records}
    assert all(r["prediction"] == by_path[r["path"]]["prediction"] for r in folder)


@pytest.mark.parametrize("case, message", [
    ("not an image", "is not an image Pillow can read"),
    ("truncated", "could not be decoded (a truncated or damaged image; 4 earlier images had run)"),
    ("text file", "notes.txt is not a .npy or .npz array file"),
    ("text file among images", "notes.txt is not an image (.jp"),
    ("missing", "does not exist"),
    ("empty folder", "holds no images"),
])
def test_bad_image_inputs_are_one_line_and_write_nothing(timm_run, tmp_path, case, message,
                                                         capsys):
    run, root = timm_run
    folder = tmp_path / "in"
    shutil.copytree(root / "class_0", folder)
    source = folder
    if case == "not an image":
        (folder / "5.png").write_bytes(b"hello")
    elif case == "truncated":
        data = (folder / "4.jpg").read_bytes()  # the header reads, the pixels do not
        (folder / "4.jpg").write_bytes(data[: len(data) * 3 // 4])
    elif case.startswith("text file"):
        source = tmp_path / "notes.txt"
        source.write_text("hello")
    elif case == "missing":
        source = tmp_path / "nothing.png"
    else:
        source = tmp_path / "empty"
        source.mkdir()
    out = tmp_path / "out.jsonl"
    sources = [folder, source] if case == "text file among images" else [source]
    status = _cli("run", run, "--input", *sources, "--output", out, "--chunk", 2, "--workers", 0)
    err = capsys.readouterr().err.strip()
    assert status == 2 and message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_image_inputs_need_a_model_that_records_its_transform(tiny_tuned, timm_run, capsys):
    _, root = timm_run
    status = _cli("run", tiny_tuned, "--input", root / "class_0" / "0.jpg")
    err = capsys.readouterr().err
    assert status == 2 and "records no image transform" in err and "give preprocessed arrays" \
        in err


def test_eval_maps_the_folders_classes_by_name(timm_run, tmp_path, capsys):
    """A folder with only some of the classes (their indices would shift if sorted anew), and a
    folder with a class the model does not know."""
    run, root = timm_run
    shutil.copytree(root / "class_2", tmp_path / "some" / "class_2")
    assert _cli("eval", run, "--data", f"imagefolder://{tmp_path / 'some'}", "--passes", 1,
                "--out", tmp_path / "r.json") == 0
    report = json.loads((tmp_path / "r.json").read_text())
    capsys.readouterr()
    assert _cli("run", run, "--input", tmp_path / "some", "--policy", "all") == 0
    hits = np.mean([r["prediction"] == 2 for r in _records(capsys)])
    assert report["exits"][-1]["accuracy"] == pytest.approx(hits)
    shutil.copytree(root / "class_0", tmp_path / "some" / "cat")
    assert _cli("eval", run, "--data", tmp_path / "some") == 2
    assert "classes ['cat'] the model does not know" in capsys.readouterr().err


def test_export_takes_the_run_as_tune_eval_and_run_do(timm_run, tmp_path, capsys):
    run, _ = timm_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    assert _cli("export", copy) == 0
    assert _cli("export", "--out", copy) == 0
    assert _cli("export", copy, "--out", copy) == 0
    capsys.readouterr()
    assert _cli("export", copy, "--out", tmp_path / "other") == 2
    assert "two output directories" in capsys.readouterr().err
    assert _cli("export") == 2
    assert "give the run directory" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    (lambda pre: pre["eval_transform"][0].update(size=99), "builds another evaluation transform"),
    (lambda pre: pre.update(eval_transform=[{"size": 3}]), "preprocessing.eval_transform[0].op"),
    (lambda pre: pre.update(eval_transform="resize"),
     "preprocessing.eval_transform must be a list"),
])
def test_a_recorded_transform_that_is_not_what_timm_builds_is_refused(timm_run, tmp_path, change,
                                                                     message, capsys):
    """A manifest edited by hand (or written by another timm) does not silently decode images
    otherwise than its model was evaluated."""
    run, root = timm_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    data = json.loads((copy / "manifest.json").read_text())
    change(data["preprocessing"])
    data["model"]["dataset"]["options"].pop("crop_pct")  # the preprocessing record decides
    (copy / "manifest.json").write_text(json.dumps(data))
    assert _cli("run", copy, "--input", root / "class_0" / "0.jpg") == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
