"""Benchmark of the CUDA executor's strategies against the ideal and a no-exit CUDA graph.

For each model (the digits demo model and a ViT-S/16-sized one, random weights), batch size,
strategy (graph, poll, eager) and exit depth k, on one GPU with the torch backend:

* the exit is forced through **thresholds**, as in real use: unreachable at every exit before k
  (above every confidence those exits give the benchmark's inputs), 0 from k on. So the graph
  holds its conditional IF nodes (one per early exit) and the gate kernels set their conditions;
  poll and eager wait for the host once per exit evaluated (k + 1), graph once;
* median and p99 wall latency of ``CudaExecutor.run`` (input already on the GPU, results read
  back to the host), its median device time (CUDA events on the executor's stream, from before
  the first work to before the last synchronization), and the host synchronizations the CUDA
  layer counted;
* the ideal: the GPU time of exactly the work the graph does at depth k, each piece captured
  alone in a CUDA graph and timed with CUDA events: the begin kernel, segments and exits 0..k,
  k+1 gate kernels and the copy of the results to the host;
* a single CUDA graph of the whole model without exits (backbone + final head), same inputs.

Inputs alternate between two device buffers from run to run, so rebinding costs show (graphs
are cached per input address: after warm-up no capture may happen; the JSON counts them).
Runs are interleaved (every configuration once per round, in rotating order) so slow drifts of
the machine touch all of them alike. Writes ``executor-<gpu>.json`` into ``--out`` and prints a
table; ``--check`` exits non-zero unless the acceptance criteria hold (graph: one sync per
inference, the IF nodes the plan needs, median device time within 5 % or 20 us of the ideal,
faster than eager past the first exit at batch 1; no capture while timing).

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


def forcing_thresholds(confidences: np.ndarray, exit_k: int) -> list[float]:
    """Early-exit thresholds that send every sample out at exit ``exit_k``.

    Args:
        confidences: (exits, samples) confidences of every exit on every input the policy will
            see (all the benchmark's input buffers).
        exit_k: The exit depth to force (the final head: every early exit unreachable).

    Returns:
        One threshold per early exit: halfway between the highest confidence seen there and 1
        (unreachable, with a margin for run-to-run differences) before ``exit_k``, 0 from it on.

    Raises:
        ValueError: An exit before ``exit_k`` is (almost) fully confident on some input, so no
            threshold in [0, 1] keeps every sample from exiting there.
    """
    thresholds = []
    for j in range(confidences.shape[0] - 1):
        if j >= exit_k:
            thresholds.append(0.0)
            continue
        highest = float(np.max(confidences[j]))
        if not highest < 1.0 - 1e-4:
            raise ValueError(f"exit {j} reaches confidence {highest} on the benchmark's inputs: "
                             f"no threshold keeps it from being taken")
        thresholds.append((highest + 1.0) / 2)
    return thresholds


def exit_depth_policies(confidences: np.ndarray) -> dict[int, Any]:
    """One :class:`ThresholdPolicy` per exit depth (:func:`forcing_thresholds`)."""
    from trt_exit.runtime.policies import ThresholdPolicy

    return {k: ThresholdPolicy(forcing_thresholds(confidences, k))
            for k in range(confidences.shape[0])}


def ideal_ms(stage_ms: dict[str, float], exit_k: int) -> float:
    """GPU time of the work the graph does at depth ``exit_k``: the begin kernel, segments and
    exit heads 0..k, a gate after each exit, and the copy of the results."""
    return (stage_ms["gate_begin"] + stage_ms["copy_results"]
            + sum(stage_ms[f"segment_{j}"] + stage_ms[f"exit_{j}"] + stage_ms["gate"]
                  for j in range(exit_k + 1)))


def bench_model(model_name: str, batches: list[int], strategies: list[str], repeats: int,
                warmup: int, profile_repeats: int) -> dict[str, Any]:
    """Every measurement of one model (see the module docstring)."""
    import torch

    from trt_exit.runtime.cuda_executor import CudaExecutor, conditional_nodes
    from trt_exit.runtime.policies import AllExitsPolicy, FixedExitPolicy

    with tempfile.TemporaryDirectory(prefix="trt_exit_bench_") as tmp:
        manifest = torch_manifest(model_name, Path(tmp))
        n = manifest.num_exits
        # Graphs are cached per (policy, batch, input address): room for all of them.
        cache = len(batches) * n * 2 + 2
        with CudaExecutor(manifest, "torch", max_batch=max(batches), device_timing=True,
                          policy=FixedExitPolicy(-1), graph_cache_size=cache) as executor:
            if "graph" in strategies and executor.graph_unavailable():
                print(f"graph strategy unavailable: {executor.graph_unavailable()}",
                      file=sys.stderr)
            per_batch = []
            for batch in batches:
                shape = manifest.inputs[0].shape[1:]
                device = executor.backend.torch_device
                generator = torch.Generator(device=device).manual_seed(batch)
                buffers = [torch.randn(batch, *shape, device=device, generator=generator)
                           for _ in range(2)]
                torch.cuda.synchronize()
                confidences = np.concatenate(
                    [executor.run(x, AllExitsPolicy()).all_confidences for x in buffers], axis=1)
                policies = exit_depth_policies(confidences)
                stage_ms = executor.profile_stages(buffers[0], repeats=profile_repeats,
                                                   chain_overheads=True)
                configs = [(s, k) for s in strategies for k in range(n)] + [("full_graph", None)]

                def run(config, x):
                    strategy, k = config
                    if strategy == "full_graph":
                        return executor.run_full_model(x, strategy="graph")
                    return executor.run(x, policies[k], strategy=strategy)

                calls = 0
                for _ in range(warmup):
                    for config in configs:
                        run(config, buffers[calls % 2])
                        calls += 1
                captures_before = executor.captures
                wall = {c: [] for c in configs}
                device_ms = {c: [] for c in configs}
                syncs = {c: set() for c in configs}
                exits = {c: set() for c in configs}
                used_strategy = {c: set() for c in configs}
                for r in range(repeats):
                    shift = r % len(configs)
                    for config in configs[shift:] + configs[:shift]:
                        result = run(config, buffers[calls % 2])
                        calls += 1
                        wall[config].append(result.latency_ms)
                        device_ms[config].append(executor.last_device_ms)
                        syncs[config].add(result.host_syncs)
                        exits[config].update(int(e) for e in np.unique(result.exit_index))
                        used_strategy[config].add(result.strategy)
                rows = []
                for strategy in strategies:
                    for k in range(n):
                        config = (strategy, k)
                        rows.append({
                            "strategy": strategy, "ran_as": sorted(used_strategy[config]),
                            "exit": k, "exits_taken": sorted(exits[config]),
                            **_summary(wall[config]),
                            "device_median_ms": float(np.median(device_ms[config])),
                            "host_syncs": sorted(syncs[config]),
                            "expected_syncs": 1 if strategy == "graph" else k + 1,
                            "conditional_nodes": conditional_nodes(executor.plan(policies[k])),
                            "ideal_ms": ideal_ms(stage_ms, k)})
                full = ("full_graph", None)
                per_batch.append({
                    "batch": batch, "stage_gpu_ms": stage_ms, "rows": rows,
                    "thresholds": {k: p.thresholds for k, p in policies.items()},
                    "graph_conditional_nodes": sorted(set(executor.graph_conditional_nodes())),
                    "captures_while_timing": executor.captures - captures_before,
                    "full_graph": {**_summary(wall[full]),
                                   "device_median_ms": float(np.median(device_ms[full])),
                                   "ran_as": sorted(used_strategy[full]),
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
            where_batch = f"{model['model']} batch {entry['batch']}"
            if entry.get("captures_while_timing"):
                failures.append(f"{where_batch}: {entry['captures_while_timing']} captures while "
                                f"timing (graphs must be reused across the two input buffers)")
            rows = {(r["strategy"], r["exit"]): r for r in entry["rows"]}
            for (strategy, k), row in rows.items():
                where = f"{where_batch} exit {k}"
                if row["ran_as"] != [strategy]:
                    failures.append(f"{where}: {strategy} ran as {row['ran_as']}")
                if row.get("exits_taken", [k]) != [k]:
                    failures.append(f"{where}: {strategy} took exits {row['exits_taken']}")
                if row["host_syncs"] != [row["expected_syncs"]]:
                    failures.append(f"{where}: {strategy} made {row['host_syncs']} host syncs, "
                                    f"expected {row['expected_syncs']}")
                if strategy != "graph":
                    continue
                if row["conditional_nodes"] != model["num_exits"] - 1 or \
                        row["conditional_nodes"] not in entry.get("graph_conditional_nodes", []):
                    failures.append(f"{where}: the graph should hold {model['num_exits'] - 1} "
                                    f"IF nodes (plan: {row['conditional_nodes']}, captured: "
                                    f"{entry.get('graph_conditional_nodes')})")
                allowed = max(IDEAL_TOLERANCE * row["ideal_ms"], IDEAL_SLACK_MS)
                if row["device_median_ms"] - row["ideal_ms"] > allowed:
                    failures.append(f"{where}: graph device median {row['device_median_ms']:.4f} "
                                    f"ms is more than {allowed * 1e3:.0f} us over the ideal "
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
             f"{results['software'].get('cuda-bindings')}; ms; wall: median / p99 of "
             f"CudaExecutor.run (input on the GPU, results read back to the host); device: "
             f"median GPU time (CUDA events)", "",
             "| model | batch | exit | ideal | graph device | graph wall | poll wall | "
             "eager wall | syncs g/p/e | IF nodes | no-exit graph |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for model in results["models"]:
        short = model["model"].replace("multi_exit_vit_", "")
        for entry in model["batches"]:
            rows = {(r["strategy"], r["exit"]): r for r in entry["rows"]}
            full = entry["full_graph"]
            for k in range(model["num_exits"]):
                graph = rows.get(("graph", k))
                cells = [f"{graph['device_median_ms']:.3f}" if graph else "-"]
                for strategy in STRATEGIES:
                    row = rows.get((strategy, k))
                    cells.append(f"{row['median_ms']:.3f} / {row['p99_ms']:.3f}" if row else "-")
                syncs = "/".join(
                    ",".join(map(str, rows[(s, k)]["host_syncs"])) if (s, k) in rows else "-"
                    for s in STRATEGIES)
                any_row = next(r for (_, j), r in rows.items() if j == k)
                no_exit = f"{full['median_ms']:.3f}" if k == model["num_exits"] - 1 else ""
                lines.append(f"| {short} | {entry['batch']} | {k} | {any_row['ideal_ms']:.3f} | "
                             f"{' | '.join(cells)} | {syncs} | {any_row['conditional_nodes']} | "
                             f"{no_exit} |")
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (also checked by ``gpu_acceptance.py --dry-run``)."""
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
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

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
                     "input": "two torch tensors on the GPU, alternating run to run (read in "
                              "place)",
                     "policy": "ThresholdPolicy per exit depth k: unreachable thresholds before "
                               "k, 0 from k on",
                     "latency": "wall time of CudaExecutor.run, results copied to the host",
                     "device": "CUDA events on the executor's stream around the run's work",
                     "host_syncs": "stream/event synchronizations counted by the CUDA layer",
                     "ideal": "begin kernel + segments and exits 0..k + k+1 gate kernels + "
                              "result copy, each alone in a CUDA graph, CUDA events, median"},
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
