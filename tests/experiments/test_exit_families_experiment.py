"""``trt-exit experiment``: a smoke-sized run writes consistent results and real plots, and the
audiovisual dataset is handed to the crowd-counting experiment."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from trt_exit.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    """``trt-exit experiment --quick`` restricted to three families (both backbones)."""
    out = tmp_path_factory.mktemp("experiment")
    status = main(["experiment", "--out", str(out), "--quick",
                   "--families", "mlp,bof,copycat_slvit,slvit_cnn"])
    assert status == 0
    return out


def test_results_have_one_row_per_family_and_position(quick_run):
    from trt_exit.models import build_model, model_config
    from trt_exit.models.flops import model_costs

    results = json.loads((quick_run / "results.json").read_text())
    assert results["command"].startswith("trt-exit experiment --out")
    assert set(results["backbones"]) == {"vit", "cnn"}
    expected = {("vit", f, p) for f in ("mlp", "bof", "copycat_slvit") for p in (1, 2)}
    expected |= {("cnn", f, p) for f in ("slvit_cnn", "bof") for p in (1, 2)}
    expected |= {("vit", "final_head", 3), ("cnn", "final_head", 3)}
    rows = results["rows"]
    assert {(r["backbone"], r["family"], r["position"]) for r in rows} == expected
    assert len(rows) == len(expected)
    # The FLOPs of one block are what FlopCounterMode says for the backbone's block.
    vit = build_model(model_config("multi_exit_vit_tiny_test", exits=[]))
    block = model_costs(vit)["block_flops"][0]
    for row in rows:
        assert row["metric"] == "accuracy" and 0.0 <= row["value"] <= 1.0
        assert row["exit_params"] > 0 and row["exit_flops"] > 0
        assert row["cumulative_flops"] >= row["backbone_flops"] + row["exit_flops"]
        if row["backbone"] == "vit":
            assert row["block_flops"] == block
            assert row["backbone_flops"] == results["backbones"]["vit"]["embed_flops"] + \
                row["position"] * block
    bof = {r["position"]: r for r in rows if r["backbone"] == "vit" and r["family"] == "bof"}
    # The second BoF exit also pays for the first one's histogram.
    assert bof[2]["cumulative_flops"] == bof[2]["backbone_flops"] + bof[2]["exit_flops"] + \
        bof[1]["exit_flops"]
    assert [p["beta"] for p in results["bof_stopping"]["vit"]] == sorted(
        p["beta"] for p in results["bof_stopping"]["vit"])


def test_head_to_head_has_every_seed(quick_run):
    results = json.loads((quick_run / "results.json").read_text())
    h2h = results["head_to_head"]
    assert h2h["position"] == 1 and h2h["seeds"] == [0, 1]
    assert [f["family"] for f in h2h["families"]] == ["mlp", "copycat_slvit"]
    for family in h2h["families"]:
        assert len(family["accuracy"]) == 2
        assert min(family["accuracy"]) <= family["mean"] <= max(family["accuracy"])


def test_plots_are_pngs(quick_run):
    results = json.loads((quick_run / "results.json").read_text())
    assert results["plots"] == ["accuracy_vs_position.png", "accuracy_vs_flops.png"]
    for name in results["plots"]:
        data = (quick_run / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_markdown_table_lists_every_family(quick_run):
    from trt_exit.experiments.exit_families import results_markdown

    text = results_markdown(json.loads((quick_run / "results.json").read_text()))
    for family in ("| mlp |", "| bof |", "| copycat_slvit |", "| slvit_cnn |", "| 0.80 |"):
        assert family in text


def test_unknown_family_is_a_clear_error(tmp_path, capsys):
    assert main(["experiment", "--out", str(tmp_path), "--quick", "--families", "nope"]) == 2
    assert "unknown exit families ['nope']" in capsys.readouterr().err


def test_av_crowd_dataset_goes_to_the_av_experiment(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("trt_exit.experiments.av_crowd")
    fake.run_av_experiment = lambda out_dir, seed, quick: calls.append((out_dir, seed, quick)) or {}
    monkeypatch.setitem(sys.modules, "trt_exit.experiments.av_crowd", fake)
    status = main(["experiment", "--out", str(tmp_path), "--dataset", "synthetic_av_crowd",
                   "--seed", "4", "--quick"])
    assert status == 0
    assert calls == [(tmp_path, 4, True)]


def test_missing_av_experiment_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "trt_exit.experiments.av_crowd", None)
    assert main(["experiment", "--out", str(tmp_path), "--dataset", "synthetic_av_crowd"]) == 2
    assert "trt_exit.experiments.av_crowd" in capsys.readouterr().err
