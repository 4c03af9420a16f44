"""Threshold tuning: the fastest operating point that keeps the metric within a floor.

Inputs are every exit's outputs on a validation split (from an all-exits run) and the measured
per-stage latency. For a threshold vector, a sample takes the first exit whose confidence reaches
its threshold and pays the latency of every segment and every *enabled* exit head up to there.
The tuner minimizes the expected latency subject to the metric staying within ``max_loss`` of
the final exit's (default for classification: at most 0.5 accuracy points below it).

An exit may also be disabled (threshold None): its head is then not run at all, which is worth
it when too few samples would leave there to pay for it.

With ``floor_confidence`` (e.g. 0.95) the floor must hold at that one-sided confidence level
over the tuning split's sampling noise rather than on the split itself: the mean per-sample loss
difference against the final exit plus z standard errors (normal approximation, z = 1.645 at
0.95) must stay within ``max_loss``. The plain rule picks the fastest point that just meets the
floor on a few hundred samples and so, on unseen data, tends to land below it (the demo's
digits: see the README); the bound grows with how often the early exit disagrees with the final
one, so it holds back exactly where the split is too small to tell. With only a handful of
disagreements on the split the normal approximation is itself optimistic: it lowers the chance
of breaking the floor on new data, it does not bound it (tests/runtime/test_tuning.py measures
both rules on fresh samples).

Search: exhaustive over a per-exit grid of confidence quantiles sized to ~1e5 combinations
(4e7 / samples on splits over 400 samples: its cost is combinations x samples), then
coordinate descent over every distinct confidence value (1,024 quantiles per exit on larger
splits) until no step improves.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from trt_exit import tensor_names as tn
from trt_exit.runtime import DEFAULT_FLOOR_CONFIDENCE  # noqa: F401  part of this module's API
from trt_exit.errors import ConfigError

#: Default allowed metric loss: 0.5 accuracy points for classification.
DEFAULT_MAX_ACCURACY_DROP = 0.005
#: Default allowed MAE increase for regression, relative to the final exit's MAE.
DEFAULT_MAX_MAE_INCREASE_FRACTION = 0.05
#: Per-sample values evaluated at once (combinations x samples), bounding the search's memory.
_CHUNK_VALUES = 1 << 22
#: Candidate thresholds per exit in the coordinate descent: every distinct confidence value up
#: to this many, else this many quantiles (the search costs candidates x samples per step, so
#: every distinct value of a 10,000-sample split would cost 10,000 x 10,000).
_FINE_CANDIDATES = 1024
#: Combinations x samples of the coarse grid at most (1e5 combinations up to 400 samples).
_GRID_VALUES = 40_000_000


@dataclass
class OperatingPoint:
    """One threshold setting and what it gives on the tuning split.

    Attributes:
        thresholds: Per early exit: a confidence threshold in [0, 1], or None (disabled).
        metric: Accuracy (classification) or MAE (regression) on the tuning split.
        expected_latency_ms: Mean latency per sample predicted from the stage profile.
        exit_fractions: Fraction of samples leaving at each exit (final head last).
        allowed_loss: The metric loss this point was tuned for.
    """

    thresholds: list[float | None]
    metric: float
    expected_latency_ms: float
    exit_fractions: list[float]
    allowed_loss: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"thresholds": self.thresholds, "metric": self.metric,
                "expected_latency_ms": self.expected_latency_ms,
                "exit_fractions": self.exit_fractions, "allowed_loss": self.allowed_loss}


@dataclass
class TuningResult:
    """The chosen operating point and the trade-off curve around it."""

    best: OperatingPoint
    final_metric: float
    full_chain_latency_ms: float
    metric_name: str
    points: list[OperatingPoint] = field(default_factory=list)
    floor_confidence: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"best": self.best.to_dict(), "final_metric": self.final_metric,
                "full_chain_latency_ms": self.full_chain_latency_ms,
                "metric": self.metric_name, "points": [p.to_dict() for p in self.points],
                "floor_confidence": self.floor_confidence}


def per_sample_loss(outputs: np.ndarray, targets: np.ndarray, task: str) -> np.ndarray:
    """(E, N) loss per exit and sample: 1 - correct (classification) or |error| (regression)."""
    if task == "classification":
        return (outputs.argmax(axis=2) != targets[None, :]).astype(np.float64)
    targets = targets.reshape(len(targets), -1)
    return np.abs(outputs[:, :, : targets.shape[1]] - targets[None]).mean(axis=2)


def stage_costs(stage_latency_ms: dict[str, float], num_exits: int) -> tuple[np.ndarray, np.ndarray]:
    """Latency of each segment and each exit head, (E,) each, from a stage profile."""
    try:
        segments = np.array([stage_latency_ms[tn.stage_name(tn.SEGMENT, k)] for k in range(num_exits)])
        heads = np.array([stage_latency_ms[tn.stage_name(tn.EXIT, k)] for k in range(num_exits)])
    except KeyError as exc:
        raise ConfigError(f"the latency profile has no entry for stage {exc.args[0]}") from None
    return segments.astype(np.float64), heads.astype(np.float64)


class _Evaluator:
    """Evaluates many threshold combinations at once (vectorized over combinations).

    ``z`` > 0 adds z standard errors of the mean per-sample loss difference against the final
    exit to the loss the floor is checked on (``bound``); ``loss`` stays the plain mean.
    """

    def __init__(self, confidences: np.ndarray, losses: np.ndarray, segments: np.ndarray,
                 heads: np.ndarray, z: float = 0.0,
                 state_providers: Sequence[Sequence[int]] | None = None):
        self.conf = np.where(np.isnan(confidences), -np.inf, confidences)  # NaN: never confident
        self.loss = losses
        self.segments = segments
        self.heads = heads
        self.e1 = confidences.shape[0] - 1
        self.z = z
        self.providers = [list(p) for p in state_providers] if state_providers else None
        # (E, N) squared per-sample loss difference to the final exit (the bound's variance).
        self.squares = np.square(losses - losses[-1][None, :])

    def __call__(self, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """thresholds (M, E-1), inf = disabled. Returns loss (M,), bound (M,) and latency (M,),
        computed in chunks of combinations that bound the memory per call."""
        n = self.conf.shape[1]
        step = max(1, _CHUNK_VALUES // n)
        parts = [self.with_exits(thresholds[i : i + step])[:3]
                 for i in range(0, len(thresholds), step)]
        return tuple(np.concatenate(p) for p in zip(*parts))

    def with_exits(self, thresholds: np.ndarray, each_sample: bool = False
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """As calling it, in one piece, plus (with ``each_sample``) each sample's exit (M, N).

        Exit by exit, the samples still running that pass the threshold leave; their summed
        losses (and squared loss differences to the final exit, for the bound) are one
        matrix-vector product per exit."""
        m, n = thresholds.shape[0], self.conf.shape[1]
        running = np.ones((m, n), bool)
        counts = np.zeros((m, self.e1 + 1))
        loss_sum = np.zeros(m)
        squares_sum = np.zeros(m)
        exits = np.full((m, n), self.e1, np.intp) if each_sample else None
        for k in range(self.e1 + 1):
            if k < self.e1:
                leave = running & (self.conf[k][None, :] >= thresholds[:, k][:, None])  # (M, N)
                running &= ~leave
                if each_sample:
                    exits[leave] = k
            else:
                leave = running  # the final exit takes every sample left
            weights = leave.astype(np.float64)
            counts[:, k] = weights.sum(axis=1)
            loss_sum += weights @ self.loss[k]
            if self.z:
                squares_sum += weights @ self.squares[k]
        loss = loss_sum / n
        bound = loss
        if self.z:
            variance = np.maximum(squares_sum / n - (loss - self.loss[-1].mean()) ** 2, 0.0)
            bound = loss + self.z * np.sqrt(variance / n)
        enabled = np.concatenate([np.isfinite(thresholds), np.ones((m, 1), bool)], axis=1)
        if self.providers:  # a running head runs the heads whose state it reads (as executors do)
            for k in reversed(range(self.e1 + 1)):
                for provider in self.providers[k]:
                    enabled[:, provider] |= enabled[:, k]
        cumulative = np.cumsum(self.segments[None, :] + self.heads[None, :] * enabled, axis=1)
        latency = (counts * cumulative).sum(axis=1) / n
        return loss, bound, latency, exits


def state_providers(manifest) -> list[list[int]]:
    """Per exit of ``manifest``, the exits whose state (``exit_k_state``) its graph reads."""
    return [[int(t.name.split("_")[1]) for t in manifest.exit_stage(k).inputs
             if t.name.endswith("_state")] for k in range(manifest.num_exits)]


def _candidates(conf: np.ndarray, limit: int | None) -> np.ndarray:
    values = np.unique(conf[np.isfinite(conf)])
    if limit is not None and len(values) > limit:
        values = np.unique(np.quantile(values, np.linspace(0.0, 1.0, limit)))
    return np.append(values, np.inf)  # inf: exit disabled


def _choose(loss: np.ndarray, latency: np.ndarray, allowed: float) -> int | None:
    ok = np.flatnonzero(loss <= allowed + 1e-12)
    if len(ok) == 0:
        return None
    # Lowest latency; ties broken by lower loss.
    order = np.lexsort((loss[ok], latency[ok]))
    return int(ok[order[0]])


def tune_thresholds(
    outputs: np.ndarray,
    confidences: np.ndarray,
    targets: np.ndarray,
    task: str,
    stage_latency_ms: dict[str, float],
    max_loss: float | None = None,
    max_combinations: int = 100_000,
    curve_losses: Sequence[float] | None = None,
    floor_confidence: float | None = None,
    state_providers: Sequence[Sequence[int]] | None = None,
) -> TuningResult:
    """Chooses per-exit thresholds minimizing expected latency under a metric floor.

    Args:
        outputs: (E, N, K) every exit's outputs on the tuning split.
        confidences: (E, N) every exit's confidence.
        targets: (N,) class indices or (N, K) regression targets.
        task: ``"classification"`` or ``"regression"``.
        stage_latency_ms: Latency of each stage by name (segment_k, exit_k).
        max_loss: Allowed metric loss against the final exit: accuracy points as a fraction
            (default 0.005) or MAE units (default 5% of the final exit's MAE).
        max_combinations: Size of the exhaustive coarse grid (at most 4e7 / samples).
        curve_losses: Allowed losses for the trade-off curve stored with the result.
        floor_confidence: One-sided confidence level in [0.5, 1) at which the floor must hold
            over the split's sampling noise (see the module docstring); None checks the floor
            on the split itself.
        state_providers: Per exit, the exits whose state it reads (:func:`state_providers`):
            their heads run whenever it runs, enabled or not, and are charged as such.

    Returns:
        The best operating point and the trade-off curve.
    """
    outputs = np.asarray(outputs)
    confidences = np.asarray(confidences, dtype=np.float64)
    num_exits, n = confidences.shape
    if outputs.shape[:2] != (num_exits, n) or len(targets) != n or n == 0:
        raise ConfigError(
            f"tuning needs outputs (E, N, K), confidences (E, N) and N targets; got "
            f"{outputs.shape}, {confidences.shape} and {len(targets)}"
        )
    losses = per_sample_loss(outputs, np.asarray(targets), task)
    final_loss = float(losses[-1].mean())
    if max_loss is None:
        max_loss = (DEFAULT_MAX_ACCURACY_DROP if task == "classification"
                    else DEFAULT_MAX_MAE_INCREASE_FRACTION * final_loss)
    if not np.isfinite(max_loss) or max_loss < 0:
        raise ConfigError(f"max_loss must be a finite number >= 0, got {max_loss}")
    z = _z_score(floor_confidence)
    segments, heads = stage_costs(stage_latency_ms, num_exits)
    evaluate = _Evaluator(confidences, losses, segments, heads, z, state_providers)
    e1 = num_exits - 1

    def point(thresholds: np.ndarray, allowed: float) -> OperatingPoint:
        loss, _, latency, exits = evaluate.with_exits(thresholds[None, :], each_sample=True)
        fractions = np.bincount(exits[0], minlength=num_exits) / n
        metric = 1.0 - loss[0] if task == "classification" else loss[0]
        return OperatingPoint(
            thresholds=[None if np.isinf(t) else float(t) for t in thresholds],
            metric=float(metric), expected_latency_ms=float(latency[0]),
            exit_fractions=[float(f) for f in fractions], allowed_loss=float(allowed))

    full_chain = float(np.sum(segments + heads))
    if e1 == 0:
        best = point(np.zeros(0), max_loss)
        return TuningResult(best, float(1 - final_loss if task == "classification" else final_loss),
                            full_chain, "accuracy" if task == "classification" else "mae", [best],
                            floor_confidence)

    # Coarse exhaustive grid, smaller on large splits (its cost is combinations x samples).
    combinations = max(2 ** e1, min(max_combinations, _GRID_VALUES // n))
    per_exit = max(2, int(combinations ** (1.0 / e1)) - 1)
    grids = [_candidates(confidences[k], per_exit) for k in range(e1)]
    combos = np.array(list(itertools.product(*grids)), dtype=np.float64)  # (M, E-1)
    _, coarse_bound, coarse_latency = evaluate(combos)

    fine = [_candidates(confidences[k], _FINE_CANDIDATES) for k in range(e1)]

    def refine(start: np.ndarray, allowed: float) -> np.ndarray:
        current = start.copy()
        _, bound, latency = evaluate(current[None, :])
        best_key = (latency[0], bound[0])
        for _ in range(20):
            improved = False
            for k in range(e1):
                trial = np.repeat(current[None, :], len(fine[k]), axis=0)
                trial[:, k] = fine[k]
                _, bound, latency = evaluate(trial)
                i = _choose(bound, latency, allowed)
                if i is not None and (latency[i], bound[i]) < best_key:
                    best_key = (latency[i], bound[i])
                    current = trial[i]
                    improved = True
            if not improved:
                break
        return current

    def best_for(allowed: float) -> OperatingPoint:
        limit = final_loss + allowed
        i = _choose(coarse_bound, coarse_latency, limit)
        start = combos[i] if i is not None else np.full(e1, np.inf)  # all disabled: final only
        return point(refine(start, limit), allowed)

    curve = sorted(set(curve_losses or [0.0, max_loss / 2, max_loss, 2 * max_loss, 4 * max_loss,
                                        10 * max_loss]) | {max_loss})
    points = [best_for(a) for a in curve]
    best = points[curve.index(max_loss)]
    metric_name = "accuracy" if task == "classification" else "mae"
    final_metric = 1.0 - final_loss if task == "classification" else final_loss
    return TuningResult(best, float(final_metric), full_chain, metric_name, points,
                        floor_confidence)


def _z_score(floor_confidence: float | None) -> float:
    """Standard normal quantile of a one-sided confidence level (0 for None)."""
    if floor_confidence is None:
        return 0.0
    if (isinstance(floor_confidence, bool) or not isinstance(floor_confidence, (int, float))
            or not 0.5 <= floor_confidence < 1.0):
        raise ConfigError(f"floor_confidence must be a level in [0.5, 1), e.g. 0.95, got "
                          f"{floor_confidence!r}")
    from statistics import NormalDist

    return NormalDist().inv_cdf(float(floor_confidence))
