"""Threshold tuning: constraint kept, optimum found, disabled exits, regression."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from trt_exit.errors import ConfigError
from trt_exit.runtime.tuning import _Evaluator, per_sample_loss, stage_costs, tune_thresholds

STAGES = {"segment_0": 1.0, "exit_0": 0.2, "segment_1": 1.0, "exit_1": 0.2,
          "segment_2": 1.0, "exit_2": 0.2}


def _problem(n=120, seed=0):
    """Three exits; early exits are right on confident samples, wrong on the others."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 4, n)
    conf = rng.uniform(0, 1, (3, n))
    outputs = np.zeros((3, n, 4))
    for k in range(3):
        correct = conf[k] > (0.6 - 0.3 * k) if k < 2 else np.ones(n, bool)
        predicted = np.where(correct, targets, (targets + 1) % 4)
        outputs[k, np.arange(n), predicted] = 1.0
    return outputs, conf, targets


def _brute_force(outputs, conf, targets, max_loss):
    losses = per_sample_loss(outputs, targets, "classification")
    segments, heads = stage_costs(STAGES, 3)
    evaluate = _Evaluator(conf, losses, segments, heads)
    candidates = [np.append(np.unique(conf[k]), np.inf) for k in range(2)]
    combos = np.array(list(itertools.product(*candidates)))
    loss, latency, _ = evaluate(combos)
    ok = loss <= losses[-1].mean() + max_loss + 1e-12
    return latency[ok].min()


@pytest.mark.parametrize("max_loss", [0.0, 0.02, 0.1])
def test_tuner_finds_the_brute_force_optimum(max_loss):
    outputs, conf, targets = _problem()
    result = tune_thresholds(outputs, conf, targets, "classification", STAGES, max_loss=max_loss)
    best = result.best
    assert best.metric >= result.final_metric - max_loss - 1e-12
    assert best.expected_latency_ms == pytest.approx(_brute_force(outputs, conf, targets, max_loss))
    assert all(t is None or 0.0 <= t <= 1.0 for t in best.thresholds)
    assert sum(best.exit_fractions) == pytest.approx(1.0)
    assert best.expected_latency_ms <= result.full_chain_latency_ms


def test_useless_exits_are_disabled():
    outputs, conf, targets = _problem()
    outputs[:2] = 0.0  # early exits always predict class 0
    outputs[:2, :, 0] = 1.0
    conf[:2] = 1.0
    result = tune_thresholds(outputs, conf, targets, "classification", STAGES, max_loss=0.0)
    assert result.best.thresholds == [None, None]
    assert result.best.exit_fractions == [0.0, 0.0, 1.0]
    assert result.best.expected_latency_ms == pytest.approx(3.2)  # segments + final head only


def test_nan_confidences_never_exit():
    outputs, conf, targets = _problem()
    conf[0] = np.nan
    result = tune_thresholds(outputs, conf, targets, "classification", STAGES, max_loss=0.5)
    assert result.best.exit_fractions[0] == 0.0


def test_regression_uses_mae():
    rng = np.random.default_rng(0)
    targets = rng.uniform(0, 50, (80, 1))
    outputs = np.stack([targets + rng.normal(0, s, targets.shape) for s in (5.0, 2.0, 0.5)])
    conf = np.stack([np.full(80, 0.9), np.full(80, 0.9), np.full(80, 0.9)])
    result = tune_thresholds(outputs, conf, targets, "regression", STAGES)
    assert result.metric_name == "mae"
    assert result.best.metric <= result.final_metric * 1.05 + 1e-9  # default: +5% MAE


def test_bad_tuning_inputs():
    outputs, conf, targets = _problem()
    with pytest.raises(ConfigError, match="tuning needs"):
        tune_thresholds(outputs, conf[:2], targets, "classification", STAGES)
    with pytest.raises(ConfigError, match="no entry for stage"):
        tune_thresholds(outputs, conf, targets, "classification", {"segment_0": 1.0})
