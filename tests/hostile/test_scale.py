"""Item 9 of issue 12: writing results is linear in the batch, and `trt-exit run` runs large
inputs in chunks (the same results as one batch). The timing up to 10^6 samples is
benchmarks/run_scaling.py; here only what fits in a test."""

from __future__ import annotations

import gc
import json
import time

import numpy as np
import pytest

from trt_exit.errors import InputError
from trt_exit.runtime.executor import Executor, ExitResults

from .conftest import cli


def _results(n: int, task: str = "classification") -> ExitResults:
    rng = np.random.default_rng(0)
    return ExitResults(rng.integers(0, 3, n).astype(np.int32),
                       rng.standard_normal((n, 10)).astype(np.float32),
                       rng.random(n).astype(np.float32), task, 1.0)


def _seconds(n: int) -> float:
    results = _results(n)
    gc.disable()  # a collection landing in one run but not the other is noise here
    try:
        began = time.perf_counter()
        results.records()
        return time.perf_counter() - began
    finally:
        gc.enable()


def test_records_are_linear_in_the_batch():
    _seconds(1000)  # warm-up
    small = min(_seconds(2_000) for _ in range(5))
    large = min(_seconds(40_000) for _ in range(5))
    # 20x the samples: linear is ~20x (up to ~40x measured on a loaded machine: allocator and
    # caches); the old per-sample argmax over the whole batch is ~400x.
    assert large / small < 150, (small, large)


def test_records_match_a_per_sample_computation():
    results = _results(7)
    results.confidence[2] = np.nan
    records = results.records()
    assert [r["prediction"] for r in records] == [int(np.argmax(row)) for row in results.output]
    assert records[2]["confidence"] is None
    regression = _results(3, "regression")
    regression.output[1, 4] = np.inf
    values = regression.records()
    assert values[1]["prediction"][4] is None and values[0]["prediction"][4] == pytest.approx(
        float(regression.output[0, 4]))


def test_chunks_give_the_same_results_as_one_batch(model, digits, tmp_path, capsys):
    images = digits["test"].inputs["image"][:50]
    x = tmp_path / "x.npy"
    np.save(x, images)
    outputs = {}
    for chunk in (7, 1024):
        out = tmp_path / f"chunk{chunk}.jsonl"
        status, err = cli(capsys, "run", model, "--input", x, "--output", out, "--chunk", chunk)
        assert status == 0, err
        outputs[chunk] = [json.loads(line) for line in out.read_text().splitlines()]
    assert outputs[7] == outputs[1024]
    assert [r["sample"] for r in outputs[7]] == list(range(50))
    with Executor(model) as executor:
        whole = executor.run(images).records()
    assert [{k: v for k, v in r.items() if k != "sample"} for r in outputs[7]] == whole


def test_a_bad_sample_in_the_last_chunk_fails_before_any_output(model, digits, tmp_path, capsys):
    images = digits["test"].inputs["image"][:20].copy()
    images[-1, 0, 0, 0] = np.nan
    x = tmp_path / "x.npy"
    np.save(x, images)
    out = tmp_path / "out.jsonl"
    status, err = cli(capsys, "run", model, "--input", x, "--output", out, "--chunk", 4)
    assert status == 2 and "NaN or Inf" in err and not out.exists()
    status, _ = cli(capsys, "run", model, "--input", x, "--chunk", 4)
    assert status == 2 and capsys.readouterr().out == ""
    with Executor(model) as executor, pytest.raises(InputError, match="different numbers"):
        list(executor.run_chunks({"image": images, "extra": images[:3]}, 4))
