"""Benchmark of the CUDA executor's strategies against the ideal and a no-exit CUDA graph.

For each model (the digits demo model and a ViT-S/16-sized one, random weights), batch size,
strategy (graph, poll, eager) and forced exit depth, on one GPU with the torch backend:

* median and p99 wall latency of ``CudaExecutor.run`` (input already on the GPU, results read
  back to the host), and the host synchronizations per inference;
* the ideal: the sum of the stages' own GPU times for that exit depth (segments 0..k and exit
  k), each stage captured alone in a CUDA graph and timed with CUDA events;
* a single CUDA graph of the whole model without exits (backbone + final head), same inputs.

Runs are interleaved (every configuration once per round, in rotating order) so slow drifts of
the machine touch all of them alike. Writes ``benchmarks/results/executor-<gpu>.json`` and
prints a table; ``--check`` exits non-zero unless the acceptance criteria hold (graph: one sync
per inference, median within 5 % or 20 us of the ideal, faster than eager past the first exit
at batch 1).

Usage (on a machine with an NVIDIA GPU)::

    pip install torch==2.14.1 -e ".[cuda]"
    python benchmarks/executor.py            # both models, batch 1 and 8
    python benchmarks/executor.py --models multi_exit_vit_digits --batches 1 --repeats 50
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import platform
import re
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent
MODELS = ("multi_exit_vit_digits", "multi_exit_vit_small_patch16_224")
STRATEGIES = ("graph", "poll", "eager")
#: Acceptance: graph within this fraction of the ideal, or this many ms, whichever is larger.
IDEAL_TOLERANCE = 0.05
IDEAL_SLACK_MS = 0.020


def torch_manifest(model_name: str, out_dir: Path, seed: int = 0):
    """A manifest + checkpoint for a randomly initialized registered model, without ONNX graphs:
    everything the torch backend needs (stage tensor specs, the full-model I/O, the weights)."""
    import torch

    from trt_exit.export.stages import full_model_io, split_stages
    from trt_exit.manifest import ExitEntry, FileRef, Manifest, TensorSpec
    from trt_exit.models import create_model
    from trt_exit.models.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    model = create_model(model_name).eval()
    shapes = model.input_shapes()
    example = {name: torch.randn(2, *shape) for name, shape in shapes.items()}
    stages = split_stages(model, example)
    _, full_inputs, full_outputs = full_model_io(model, example)
    checkpoint = save_checkpoint(model, out_dir / "checkpoint.safetensors")
    config = model.config
    exits = [ExitEntry(index=k, after_block=model.exit_blocks[k], type=head.type_name,
                       confidence=head.confidence_measure,
                       threshold=None if k < model.num_exits - 1 else 0.0)
             for k, head in enumerate(model.exits)]
    manifest = Manifest(
        model={"name": config.name, "task": config.task, "num_outputs": config.num_outputs,
               "config": config.to_dict(),
               "checkpoint": dataclasses.asdict(FileRef.of(checkpoint, out_dir))},
        inputs=[TensorSpec(n, [-1, *s]) for n, s in shapes.items()],
        stages=[s.entry for s in stages], exits=exits,
        full_model={"inputs": full_inputs, "outputs": full_outputs},
        root=out_dir.resolve())
    manifest.save()
    return manifest


def _summary(samples: list[float]) -> dict[str, float]:
    values = np.asarray(samples)
    return {"median_ms": float(np.median(values)), "p99_ms": float(np.percentile(values, 99))}


def bench_model(model_name: str, batches: list[int], strategies: list[str], repeats: int,
                warmup: int, profile_repeats: int) -> dict[str, Any]:
    """Every measurement of one model (see the module docstring)."""
    import torch

    from trt_exit.runtime.cuda_executor import CudaExecutor
    from trt_exit.runtime.policies import FixedExitPolicy

    with tempfile.TemporaryDirectory(prefix="trt_exit_bench_") as tmp:
        manifest = torch_manifest(model_name, Path(tmp))
        n = manifest.num_exits
        with CudaExecutor(manifest, "torch", max_batch=max(batches),
                          policy=FixedExitPolicy(-1)) as executor:
            used = [s if s != "graph" or not executor.graph_unavailable() else "poll"
                    for s in strategies]
            if used != strategies:
                print(f"graph strategy unavailable: {executor.graph_unavailable()}",
                      file=sys.stderr)
            per_batch = []
            for batch in batches:
                shape = manifest.inputs[0].shape[1:]
                x = torch.randn(batch, *shape, device=executor.backend.torch_device)
                torch.cuda.synchronize()
                stage_ms = executor.profile_stages(x, repeats=profile_repeats)
                configs = [(s, k) for s in strategies for k in range(n)] + [("full_graph", None)]
                policies = {k: FixedExitPolicy(k) for k in range(n)}

                def run(config):
                    strategy, k = config
                    if strategy == "full_graph":
                        return executor.run_full_model(x, strategy="graph")
                    return executor.run(x, policies[k], strategy=strategy)

                for _ in range(warmup):
                    for config in configs:
                        run(config)
                latency = {c: [] for c in configs}
                syncs = {c: set() for c in configs}
                used_strategy = {c: set() for c in configs}
                for r in range(repeats):
                    shift = r % len(configs)
                    for config in configs[shift:] + configs[:shift]:
                        result = run(config)
                        latency[config].append(result.latency_ms)
                        syncs[config].add(result.host_syncs)
                        used_strategy[config].add(result.strategy)
                rows = []
                for strategy in strategies:
                    for k in range(n):
                        ideal = sum(stage_ms[f"segment_{j}"] for j in range(k + 1)) + \
                            stage_ms[f"exit_{k}"]
                        config = (strategy, k)
                        rows.append({"strategy": strategy, "ran_as": sorted(used_strategy[config]),
                                     "exit": k, **_summary(latency[config]),
                                     "host_syncs": sorted(syncs[config]), "ideal_ms": ideal})
                full = ("full_graph", None)
                per_batch.append({
                    "batch": batch, "stage_gpu_ms": stage_ms, "rows": rows,
                    "full_graph": {**_summary(latency[full]), "ran_as": sorted(used_strategy[full]),
                                   "host_syncs": sorted(syncs[full])},
                })
            return {"model": model_name, "num_exits": n,
                    "exit_blocks": [e.after_block for e in manifest.exits],
                    "backend": executor.describe(), "batches": per_batch}


def acceptance(results: dict[str, Any]) -> list[str]:
    """Failed acceptance criteria, as sentences (empty: all hold)."""
    failures = []
    for model in results["models"]:
        for entry in model["batches"]:
            rows = {(r["strategy"], r["exit"]): r for r in entry["rows"]}
            for (strategy, k), row in rows.items():
                if strategy != "graph":
                    continue
                where = f"{model['model']} batch {entry['batch']} exit {k}"
                if row["ran_as"] != ["graph"]:
                    failures.append(f"{where}: graph ran as {row['ran_as']}")
                if row["host_syncs"] != [1]:
                    failures.append(f"{where}: graph made {row['host_syncs']} host syncs")
                allowed = max(IDEAL_TOLERANCE * row["ideal_ms"], IDEAL_SLACK_MS)
                if row["median_ms"] - row["ideal_ms"] > allowed:
                    failures.append(f"{where}: graph median {row['median_ms']:.4f} ms is more "
                                    f"than {allowed * 1e3:.0f} us over the ideal "
                                    f"{row['ideal_ms']:.4f} ms")
                eager = rows.get(("eager", k))
                if entry["batch"] == 1 and k > 0 and eager and row["median_ms"] >= eager["median_ms"]:
                    failures.append(f"{where}: graph ({row['median_ms']:.4f} ms) is not faster "
                                    f"than eager ({eager['median_ms']:.4f} ms)")
    return failures


def format_table(results: dict[str, Any]) -> str:
    """The results as a markdown table."""
    gpu = results["gpu"]["name"]
    lines = [f"GPU: {gpu}, driver CUDA {results['gpu']['driver_cuda_version']}, torch "
             f"{results['software'].get('torch')}, cuda-bindings "
             f"{results['software'].get('cuda-bindings')}; latency in ms (median / p99), input "
             f"on the GPU, results read back to the host", "",
             "| model | batch | exit | ideal | graph | poll | eager | syncs g/p/e | no-exit graph |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for model in results["models"]:
        short = model["model"].replace("multi_exit_vit_", "")
        for entry in model["batches"]:
            rows = {(r["strategy"], r["exit"]): r for r in entry["rows"]}
            full = entry["full_graph"]
            for k in range(model["num_exits"]):
                cells = []
                for strategy in STRATEGIES:
                    row = rows.get((strategy, k))
                    cells.append(f"{row['median_ms']:.3f} / {row['p99_ms']:.3f}" if row else "-")
                syncs = "/".join(
                    ",".join(map(str, rows[(s, k)]["host_syncs"])) if (s, k) in rows else "-"
                    for s in STRATEGIES)
                ideal = next(r["ideal_ms"] for (_, j), r in rows.items() if j == k)
                no_exit = f"{full['median_ms']:.3f}" if k == model["num_exits"] - 1 else ""
                lines.append(f"| {short} | {entry['batch']} | {k} | {ideal:.3f} | "
                             f"{' | '.join(cells)} | {syncs} | {no_exit} |")
    return "\n".join(lines)


def _versions() -> dict[str, str | None]:
    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    from trt_exit.runtime.cuda.module import nvrtc_version

    packages = {p: version(p) for p in ("trt-exit", "torch", "cuda-bindings", "cuda-python",
                                        "numpy", "nvtx")}
    packages["nvrtc"] = ".".join(map(str, nvrtc_version()))
    packages["python"] = platform.python_version()
    return packages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--repeats", type=int, default=200, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=20, help="untimed rounds first")
    parser.add_argument("--profile-repeats", type=int, default=200,
                        help="timed launches per stage for the ideal")
    parser.add_argument("--out", type=Path, default=ROOT / "results",
                        help="directory for executor-<gpu>.json")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 unless the acceptance criteria hold")
    args = parser.parse_args(argv)

    from trt_exit.runtime.cuda.api import cuda_status, use_device

    status = cuda_status()
    if not status.available:
        print(f"benchmarks/executor.py needs an NVIDIA GPU: {status.reason}", file=sys.stderr)
        return 2
    device = use_device(0)
    results = {
        "benchmark": "executor",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "gpu": device.to_dict(), "software": _versions(),
        "settings": {"batches": args.batches, "strategies": args.strategies,
                     "repeats": args.repeats, "warmup": args.warmup,
                     "profile_repeats": args.profile_repeats, "backend": "torch",
                     "precision": "fp32", "weights": "random (seed 0)",
                     "input": "torch tensor on the GPU (read in place)",
                     "latency": "wall time of CudaExecutor.run, results copied to the host",
                     "ideal": "sum of the stages' GPU times, each stage alone in a CUDA graph, "
                              "CUDA events, median"},
        "models": [bench_model(m, args.batches, args.strategies, args.repeats, args.warmup,
                               args.profile_repeats) for m in args.models],
    }
    failures = acceptance(results)
    results["acceptance"] = {"ok": not failures, "failures": failures}
    args.out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", device.name.lower()).strip("-")
    path = args.out / f"executor-{slug}.json"
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(format_table(results))
    print(f"\nacceptance: {'ok' if not failures else 'FAILED'}")
    for failure in failures:
        print(f"  - {failure}")
    print(f"wrote {path}")
    return 1 if args.check and failures else 0


if __name__ == "__main__":
    sys.exit(main())
