"""The audiovisual crowd-counting experiment at smoke-test size, and its helpers."""

from __future__ import annotations

import json

import numpy as np

from trt_exit.experiments.av_crowd import (
    CONDITIONS,
    condition_masks,
    mae_by_condition,
    results_markdown,
    risk_coverage,
    run_av_experiment,
)


def test_mae_by_condition_and_masks():
    labels = np.array(["clean", "dark", "clean", "occluded"])
    masks = condition_masks(labels)
    assert masks["degraded"].tolist() == [False, True, False, True]
    mae = mae_by_condition(np.array([1.0, 5.0, 3.0, 0.0]), np.array([[0.0], [0.0], [0.0], [2.0]]),
                           labels)
    assert mae["clean"] == 2.0 and mae["dark"] == 5.0 and mae["degraded"] == 3.5
    assert mae["all"] == 2.75 and np.isnan(mae["blur"])


def test_risk_coverage_orders_by_confidence():
    errors = np.array([4.0, 1.0, 3.0, 2.0])
    confidence = np.array([0.1, 0.9, 0.2, 0.8])  # ranks the errors perfectly
    assert risk_coverage(confidence, errors, np.array([0.25, 0.5, 1.0])) == [1.0, 1.5, 2.5]
    assert risk_coverage(-confidence, errors, np.array([0.25]))[0] == 4.0


def test_quick_run_writes_results_and_plots(tmp_path):
    lines = []
    results = run_av_experiment(tmp_path, seed=0, quick=True, log=lines.append)
    assert (tmp_path / "results.json").is_file()
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["experiment"] == "av_crowd" and on_disk["quick"] is True
    for name in results["plots"]:
        assert (tmp_path / name).stat().st_size > 1000
    rows = results["modalities"]["rows"]
    assert {(r["modality"], r["after_block"]) for r in rows} == {
        (m, b) for m in ("audio", "visual", "audiovisual") for b in (1, 2)}
    for row in rows:
        assert set(row["test_mae"]) == set(CONDITIONS)
        assert all(np.isfinite(v) for v in row["test_mae"].values())
        assert row["exit_flops"] > 0
    # The audiovisual exit does more work than either single-modality exit.
    flops = {r["modality"]: r["exit_flops"] for r in rows if r["after_block"] == 1}
    assert flops["audiovisual"] > max(flops["audio"], flops["visual"])
    deployed = results["deployed"]
    assert (tmp_path / "deploy" / "manifest.json").is_file()
    assert len(deployed["confidence"]) == 3
    assert abs(sum(deployed["early_exit"]["exit_fractions_by_condition"]["all"]) - 1) < 1e-9
    assert "| audiovisual | 1 |" in results_markdown(results)
    assert any("audiovisual" in line for line in lines)
