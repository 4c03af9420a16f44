"""`trt-exit run` on N samples: time and peak memory against N (issue 12, item 9).

    python benchmarks/run_scaling.py                         # N = 10^3 ... 10^6, tiny model
    python benchmarks/run_scaling.py --sizes 1000 100000 --model DIR

Builds (unless ``--model``) the tiny test ViT trained one epoch on digits, exported and tuned;
writes N digits test images (tiled) as one .npy; then for each N runs ``trt-exit run DIR --input
x.npy --output out.jsonl`` in a fresh process (ONNX Runtime, one thread) and records the wall
time of the command, seconds per sample, and the process's peak RSS. Prints a table and writes
``benchmarks/results/run-scaling-cpu.json``. Linear time: seconds per sample stays flat as N
grows; flat memory: peak RSS does not grow with N (inputs are memory-mapped and run in chunks
of ``--chunk`` samples, results are streamed to the file).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent

# Peak RSS from VmHWM: getrusage's ru_maxrss survives fork and exec, so a child would report
# this (larger) benchmark process's peak.
CHILD = """
import json, sys, time
began = time.perf_counter()
from trt_exit.cli import main
status = main(sys.argv[1:])
seconds = time.perf_counter() - began
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status")
               if line.startswith("VmHWM:"))
print(json.dumps({"status": status, "seconds": seconds, "peak_rss_mb": peak_kb / 1024}),
      file=sys.stderr)
"""


def tiny_tuned_model(out_dir: Path) -> Path:
    """The tiny test model, one epoch on digits, exported and tuned."""
    from trt_exit.manifest import Manifest
    from trt_exit.models import create_model
    from trt_exit.training.datasets import load_digits
    from trt_exit.training.trainer import TrainConfig, seed_everything, train
    from trt_exit.workflow import export_step, tune_step

    splits = load_digits(seed=0)
    seed_everything(0)
    model = create_model("multi_exit_vit_tiny_test")
    train(model, splits["train"], TrainConfig(epochs=3, lr=1e-2, warmup_epochs=0, batch_size=64,
                                              seed=0), progress=False)
    export_step(model.eval(), out_dir, splits, {"name": "digits", "seed": 0, "options": {}})
    tune_step(Manifest.load(out_dir), splits["val"], max_loss=0.02, profile_repeats=20)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="tuned model directory (default: build the tiny one)")
    parser.add_argument("--sizes", type=int, nargs="+",
                        default=[1_000, 10_000, 100_000, 1_000_000])
    parser.add_argument("--chunk", type=int, default=None, help="trt-exit run --chunk")
    parser.add_argument("--out", default=str(ROOT / "results" / "run-scaling-cpu.json"))
    args = parser.parse_args(argv)

    import numpy as np

    from trt_exit.fileio import atomic_write_json
    from trt_exit.profiling.environment import machine_info
    from trt_exit.training.datasets import load_digits

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    rows = []
    with tempfile.TemporaryDirectory(prefix="run-scaling-") as tmp:
        tmp = Path(tmp)
        model = Path(args.model) if args.model else tiny_tuned_model(tmp / "model")
        images = load_digits(seed=0)["test"].inputs["image"]
        for n in args.sizes:
            x = tmp / "x.npy"
            data = np.lib.format.open_memmap(x, mode="w+", dtype=np.float32,
                                             shape=(n, *images.shape[1:]))
            for start in range(0, n, len(images)):
                data[start : start + len(images)] = images[: n - start]
            data.flush()
            del data
            out = tmp / "out.jsonl"
            command = ["run", str(model), "--input", str(x), "--output", str(out)]
            if args.chunk:
                command += ["--chunk", str(args.chunk)]
            result = subprocess.run([sys.executable, "-c", CHILD, *command], env=env,
                                    capture_output=True, text=True)
            if result.returncode != 0:
                print(result.stderr, file=sys.stderr)
                return 1
            measured = json.loads(result.stderr.strip().splitlines()[-1])
            lines = sum(1 for _ in open(out, encoding="utf-8"))
            if measured["status"] != 0 or lines != n:
                print(f"N={n}: status {measured['status']}, {lines} lines", file=sys.stderr)
                return 1
            row = {"samples": n, "seconds": round(measured["seconds"], 3),
                   "us_per_sample": round(1e6 * measured["seconds"] / n, 2),
                   "peak_rss_mb": round(measured["peak_rss_mb"], 1)}
            rows.append(row)
            print(f"N={n:>9,}  {row['seconds']:9.2f} s  {row['us_per_sample']:9.2f} us/sample  "
                  f"peak RSS {row['peak_rss_mb']:7.1f} MB", flush=True)
            x.unlink()
            out.unlink()
    from trt_exit.runtime import DEFAULT_CHUNK

    report = {"benchmark": "trt-exit run on N samples (issue 12, item 9)",
              "model": "multi_exit_vit_tiny_test, digits, onnxruntime fp32, 1 thread, tuned "
                       "thresholds" if not args.model else args.model,
              "chunk": args.chunk or DEFAULT_CHUNK, "rows": rows,
              "time_per_sample_ratio_largest_vs_smallest_over_10k": _ratio(rows),
              "command": "python benchmarks/run_scaling.py " + " ".join(argv or sys.argv[1:]),
              "machine": machine_info(),
              "note": "wall time of the whole command in a fresh process (imports included, "
                      "which dominate at small N); peak RSS of that process"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


def _ratio(rows: list[dict]) -> float | None:
    """us/sample at the largest N over that at the smallest N >= 10,000 (1.0 = linear)."""
    big = [r for r in rows if r["samples"] >= 10_000]
    if len(big) < 2:
        return None
    return round(big[-1]["us_per_sample"] / big[0]["us_per_sample"], 3)


if __name__ == "__main__":
    sys.exit(main())
