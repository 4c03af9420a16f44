"""The early-exit vs static-model comparison: its geometry, and a toy-size end-to-end run."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from trt_exit.experiments.pareto import (
    frontier_at,
    quick_config,
    run_pareto,
    static_model_config,
    stratified_subset,
    upper_hull,
    verdict,
)


def test_static_frontier_is_the_upper_hull():
    # (latency, accuracy): (2, 0.80) lies under the chord from (1, 0.80) to (3, 0.95)... no:
    # the chord at 2 is 0.875, so (2, 0.80) is dropped; (4, 0.90) is dominated by (3, 0.95).
    hull = upper_hull([(3, 0.95), (1, 0.80), (2, 0.80), (4, 0.90)])
    assert hull == [(1, 0.80), (3, 0.95)]
    assert frontier_at(hull, 0.5) is None
    assert frontier_at(hull, 2) == pytest.approx(0.875)
    assert frontier_at(hull, 10) == 0.95
    assert verdict(0.9, frontier_at(hull, 2)) == "wins"
    assert verdict(0.85, 0.875) == "loses" and verdict(0.5, None) == "no static rival"


def test_static_model_is_the_truncated_backbone_without_exits():
    config = static_model_config("multi_exit_vit_digits", 4)
    assert config.exits == [] and config.backbone_options["depth"] == 4
    assert config.backbone_options["embed_dim"] == 64


def test_stratified_subset_covers_every_cell(digits):
    from trt_exit.training.datasets import load_dataset

    test = load_dataset("digits_c", corruptions="shift")["test"]
    chosen = stratified_subset(test, 3, 99, seed=0)
    cells = test.meta["corruption"][chosen] * 10 + test.meta["severity"][chosen]
    assert np.array_equal(np.unique(cells, return_counts=True)[1], [3] * 6)
    assert len(stratified_subset(digits["test"], 0, 2, seed=0)) == 20


def test_toy_comparison_writes_results_plots_and_table(tmp_path):
    config = quick_config()
    config = dataclasses.replace(config, dataset_options={"digits_c": {"corruptions": "shift"}})
    lines = []
    results = run_pareto(tmp_path, config, say=lines.append, command="test")
    data = results["datasets"]["digits_c"]
    assert data["groups"] == ["pooled"] + [f"severity_{s}" for s in range(6)]
    assert [s["blocks"] for s in data["static"]] == [1, 3]
    points = data["multi_exit"]["operating_points"]
    assert [p["floor_points"] for p in points] == [0.0, 5.0]
    for p in points:
        for group in data["groups"]:
            assert sum(p["exit_fractions"][group]) == pytest.approx(1.0)
            assert p["latency_ms"][group] > 0 and p["flops"][group] > 0
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["datasets"]["digits_c"]["comparison"]["pooled"]["latency_ms"][0]["verdict"] in (
        "wins", "loses", "ties", "no static rival")
    for name in on_disk["plots"]:
        assert (tmp_path / name).stat().st_size > 1000
    assert "| floor (points) |" in (tmp_path / "RESULTS.md").read_text()
