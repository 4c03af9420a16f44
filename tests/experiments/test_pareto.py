"""The early-exit vs static-model comparison: its geometry, and a toy-size end-to-end run."""

from __future__ import annotations

import contextlib
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
    config = dataclasses.replace(
        config, dataset_options={"digits_c": {"corruptions": "shift"}},
        train=dataclasses.replace(config.train, epochs=3),
        recipes=("end_to_end", "two_phase+ensemble+calibrate"))
    lines, timed = [], []

    @contextlib.contextmanager
    def timing_context():
        timed.append("entered")
        yield

    results = run_pareto(tmp_path, config, say=lines.append, command="test",
                         timing_context=timing_context)
    assert timed == ["entered"]  # once per dataset and seed, around the timing only
    data = results["datasets"]["digits_c"]
    # Every recipe has its operating points, verdicts and exits-vs-static rows; the first one
    # is the headline.
    assert list(data["recipes"]) == ["end_to_end", "two_phase+ensemble+calibrate"]
    assert data["multi_exit"] is data["recipes"]["end_to_end"]
    ensemble = data["recipes"]["two_phase+ensemble+calibrate"]
    assert ensemble["exit_types"] == ["ensemble", "ensemble", "vit_head"]
    assert ensemble["calibration"]["temperatures"][0] != 1.0
    assert [row["static_accuracy"] is not None for row in ensemble["exits_vs_static"]] == [
        True, False, True]  # static depths 1 and 3
    assert all(p["latency_ms"]["pooled"] > 0 for p in ensemble["operating_points"])
    assert "| two_phase+ensemble+calibrate |" in (tmp_path / "RESULTS.md").read_text()
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


def test_recipes_share_one_budget():
    from trt_exit.errors import ConfigError
    from trt_exit.models import ExitSpec
    from trt_exit.training.config import DEMO_TRAIN
    from trt_exit.training.recipes import make_recipe, static_train

    base = dataclasses.replace(DEMO_TRAIN, epochs=60)
    for name in ("end_to_end", "end_to_end+distill", "two_phase", "end_to_end+ensemble+calibrate",
                 "two_phase+ensemble+calibrate"):
        recipe = make_recipe(name, base)
        assert recipe.train.sample_epochs == 60 == static_train(base).sample_epochs, name
        assert recipe.train.lr == base.lr and recipe.train.batch_size == base.batch_size
    two = make_recipe("two_phase", base).train
    assert (two.regime, two.backbone_epochs, two.epochs, two.finetune_epochs) == (
        "classifier_wise", 42, 12, 6)
    assert two.distill_weight > 0 and two.finetune_lr == pytest.approx(base.lr / 10)
    assert make_recipe("end_to_end", base).train.distill_weight == 0
    specs = [ExitSpec(2, "mlp"), ExitSpec(4, "slvit", {"heads": 2})]
    assert make_recipe("end_to_end+ensemble", base).exits(specs) == [
        ExitSpec(2, "ensemble", {"base": "mlp", "base_options": {}}),
        ExitSpec(4, "ensemble", {"base": "slvit", "base_options": {"heads": 2}})]
    assert make_recipe("end_to_end", base).exits(specs) == specs
    for bad in ("fancy", "two_phase+fancy", "distill", "end_to_end+distill+distill"):
        with pytest.raises(ConfigError, match="unknown recipe"):
            make_recipe(bad, base)


def test_flops_count_the_heads_that_run_for_their_state():
    from trt_exit.experiments.pareto import _path_flops

    costs = {"segment_flops": [10.0, 10.0, 10.0], "exits": [{"flops": 1.0}, {"flops": 2.0},
                                                           {"flops": 4.0}]}
    # Exit 0 disabled: without state it never runs; when exit 1 reads its state, it does.
    np.testing.assert_allclose(_path_flops(costs, [None, 0.9]), [10, 22, 36])
    np.testing.assert_allclose(_path_flops(costs, [None, 0.9], [[], [0], []]), [11, 23, 37])
    np.testing.assert_allclose(_path_flops(costs, [None, None], [[], [0], []]), [10, 20, 34])


def test_seeds_are_averaged_floor_by_floor():
    from trt_exit.experiments.pareto import aggregate_seeds

    def run(seed, static_acc, point_acc):
        point = {"floor_points": 1.0, "thresholds": [0.5], "val_accuracy": point_acc,
                 "expected_latency_ms": 1.0, "accuracy": {"pooled": point_acc},
                 "latency_ms": {"pooled": 1.5}, "flops": {"pooled": 20.0},
                 "mean_exit_block": {"pooled": 3.0}, "exit_fractions": {"pooled": [0.5, 0.5]}}
        recipe = {"recipe": "end_to_end", "train": "", "exit_types": ["mlp", "vit_head"],
                  "exit_blocks": [2, 4], "train_seconds": 1.0, "calibration": None,
                  "exit_accuracy": {"pooled": [point_acc - 0.1, point_acc]},
                  "final_accuracy": {"pooled": point_acc}, "stage_latency_ms": {},
                  "operating_points": [point]}
        static = [{"blocks": b, "params": 1, "flops": 10.0 * b, "train_seconds": 1.0,
                   "accuracy": {"pooled": static_acc + 0.01 * b}, "latency_ms": {"pooled": 0.5 * b}}
                  for b in (2, 4)]
        data = {"dataset": {"name": "x"}, "seed": seed, "samples": {}, "groups": ["pooled"],
                "static": static, "recipes": {"end_to_end": recipe}}
        from trt_exit.experiments.pareto import _finish_dataset

        _finish_dataset(data)
        return data

    merged = aggregate_seeds([run(0, 0.80, 0.90), run(1, 0.90, 0.70)])
    assert merged["seeds"] == [0, 1]
    assert merged["static"][0]["accuracy"]["pooled"] == pytest.approx(0.87)
    point = merged["multi_exit"]["operating_points"][0]
    assert point["accuracy"]["pooled"] == pytest.approx(0.80)
    assert point["thresholds_per_seed"] == [[0.5], [0.5]]
    # Per seed: wins (0.90 vs 0.83 at 1.5 ms), loses (0.70 vs 0.93); on the means: loses
    # (0.80 vs 0.88).
    assert [v["pooled"]["latency_ms"] for v in merged["multi_exit"]["verdicts_per_seed"]] == [
        ["wins"], ["loses"]]
    assert merged["comparison"]["pooled"]["latency_ms"][0]["verdict"] == "loses"
