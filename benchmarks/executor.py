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
* the ideal: the GPU time of exactly the work the chain does at depth k, captured as **one flat
  CUDA graph** (the input copy, the begin kernel, segments and exits 0..k, their k+1 gates as
  the plain kernel without conditional nodes, the result copy) and timed with CUDA events
  around one launch: no host launch gap between pieces;
* the IF nodes of each graph as the driver holds them (``cuGraphGetNodes`` /
  ``cuGraphNodeGetType`` on the top graph and every conditional body), against the plan;
* a single CUDA graph of the whole model without exits (backbone + final head), same inputs;
* what feeding device inputs costs the graph (it copies them into its own buffer as its first
  nodes): the copy's GPU time alone, and the graph at exit 0 with the same input every run
  against alternating inputs (the copy node re-pointed before each launch);
* the host-wait modes (spin, yield, blocking, auto) for graph and eager at the deepest exit, on
  the first batch size.

Inputs alternate between two device buffers from run to run (graphs are cached per policy and
batch, whatever array is passed: after warm-up no capture may happen; the JSON counts them).
Runs are interleaved (every configuration once per round, in rotating order) so slow drifts of
the machine touch all of them alike. Progress is printed, and ``executor-<gpu>.json`` in
``--out`` rewritten, after every model and batch size (``"complete": false`` until the end), so
a run cut short keeps what it measured; then the table is printed. ``--check`` exits non-zero
unless the acceptance criteria hold (graph: one sync per inference, the IF nodes the plan needs
as the driver reports them, median device time within 5 % or 20 us of the flat-graph ideal,
faster than eager past the first exit at batch 1; no capture while timing).

Usage (on a machine with an NVIDIA GPU)::

    pip install torch==2.14.1 -e ".[cuda]"
    python benchmarks/executor.py            # both models, batch 1 and 8
    python benchmarks/executor.py --models multi_exit_vit_digits --batches 1 --repeats 50
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
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


def bench_model(model_name: str, batches: list[int], strategies: list[str], repeats: int,
                warmup: int, profile_repeats: int, on_batch=None) -> dict[str, Any]:
    """Every measurement of one model (see the module docstring).

    Args:
        on_batch: Called with the model's results so far after each batch size.
    """
    import torch

    from trt_exit.runtime.cuda.api import SYNC_MODES, set_sync_mode
    from trt_exit.runtime.cuda_executor import CudaExecutor, conditional_nodes
    from trt_exit.runtime.policies import AllExitsPolicy, FixedExitPolicy

    with tempfile.TemporaryDirectory(prefix="trt_exit_bench_") as tmp:
        manifest = torch_manifest(model_name, Path(tmp))
        n = manifest.num_exits
        # Exit-chain graphs are cached per (policy, batch); the no-exit graph per input address.
        cache = len(batches) * (n + 2) + 2
        with CudaExecutor(manifest, "torch", max_batch=max(batches), device_timing=True,
                          policy=FixedExitPolicy(-1), graph_cache_size=cache) as executor:
            if "graph" in strategies and executor.graph_unavailable():
                print(f"graph strategy unavailable: {executor.graph_unavailable()}",
                      file=sys.stderr)
            model = {"model": model_name, "num_exits": n,
                     "exit_blocks": [e.after_block for e in manifest.exits],
                     "backend": executor.describe(), "batches": []}
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
                _progress(f"{model_name} batch {batch}: stages and the flat-graph ideals")
                stage_ms = executor.profile_stages(buffers[0], repeats=profile_repeats,
                                                   chain_overheads=True)
                ideal = {k: executor.time_flat_chain(buffers[0], policies[k], depth=k,
                                                     repeats=profile_repeats)
                         for k in range(n)}
                configs = [(s, k) for s in strategies for k in range(n)] + [("full_graph", None)]

                def run(config, x):
                    strategy, k = config
                    if strategy == "full_graph":
                        return executor.run_full_model(x, strategy="graph")
                    return executor.run(x, policies[k], strategy=strategy)

                _progress(f"{model_name} batch {batch}: {warmup} warm-up and {repeats} timed "
                          f"rounds of {len(configs)} configurations")
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
                captures = executor.captures - captures_before
                rows = []
                for strategy in strategies:
                    for k in range(n):
                        config = (strategy, k)
                        census = executor.graph_census(policies[k], batch)
                        held = None if census is None else sum(
                            level.get("conditional", 0) for level in census["levels"])
                        rows.append({
                            "strategy": strategy, "ran_as": sorted(used_strategy[config]),
                            "exit": k, "exits_taken": sorted(exits[config]),
                            **_summary(wall[config]),
                            "device_median_ms": _median(device_ms[config]),
                            "host_syncs": sorted(syncs[config]),
                            "expected_syncs": 1 if strategy == "graph" else k + 1,
                            "conditional_nodes_plan": conditional_nodes(executor.plan(policies[k])),
                            "conditional_nodes": held if strategy == "graph" else None,
                            "graph_census": census if strategy == "graph" else None,
                            "ideal_ms": ideal[k]})
                full = ("full_graph", None)
                entry = {
                    "batch": batch, "stage_gpu_ms": stage_ms, "ideal_flat_graph_ms": ideal,
                    "rows": rows,
                    "thresholds": {k: p.thresholds for k, p in policies.items()},
                    "captures_while_timing": captures,
                    "full_graph": {**_summary(wall[full]),
                                   "device_median_ms": _median(device_ms[full]),
                                   "ran_as": sorted(used_strategy[full]),
                                   "host_syncs": sorted(syncs[full])},
                    "strategies": executor.describe()["strategies"],
                    "graph_failures": executor.graph_failures,
                }
                if "graph" in strategies:
                    entry["input_copy"] = input_copy_cost(executor, policies[0], buffers,
                                                          min(repeats, 100))
                    entry["input_copy"].update(copy_gpu_ms=stage_ms.get("copy_inputs"),
                                               bytes=int(np.prod(shape)) * 4 * batch)
                if batch == batches[0] and "graph" in strategies and "eager" in strategies:
                    _progress(f"{model_name} batch {batch}: host-wait modes")
                    entry["sync_modes"] = sync_mode_latency(
                        executor, policies[n - 1], buffers, min(repeats, 100), SYNC_MODES,
                        set_sync_mode)
                model["batches"].append(entry)
                model["backend"] = executor.describe()
                print(format_batch(model, entry), flush=True)
                if on_batch is not None:
                    on_batch(model)
            return model


def input_copy_cost(executor, policy, buffers, runs: int) -> dict[str, Any]:
    """What re-pointing the graph's input copy costs: the graph at ``policy``'s depth with the
    same tensor every run (its copy node is re-pointed only at the first) against alternating
    tensors (re-pointed before every launch), in alternating blocks of ``runs // 4`` runs."""
    wall: dict[str, list[float]] = {"same": [], "alternating": []}
    device: dict[str, list[float]] = {"same": [], "alternating": []}
    block = max(runs // 4, 1)
    for _ in range(4):
        for kind in ("same", "alternating"):
            for i in range(block):
                x = buffers[0] if kind == "same" else buffers[i % 2]
                result = executor.run(x, policy, strategy="graph")
                wall[kind].append(result.latency_ms)
                device[kind].append(executor.last_device_ms)
    return {"graph_same_input": {**_summary(wall["same"]),
                                 "device_median_ms": _median(device["same"])},
            "graph_alternating_inputs": {**_summary(wall["alternating"]),
                                         "device_median_ms": _median(device["alternating"])},
            "runs_each": 4 * block, "exit": 0}


def sync_mode_latency(executor, policy, buffers, rounds: int, modes, set_mode) -> dict:
    """Median wall latency of graph and eager under each host-wait mode (interleaved rounds),
    then the executor's own mode again."""
    from trt_exit.errors import CudaError

    own = executor.sync_mode
    wall = {(m, s): [] for m in modes for s in ("graph", "eager")}
    try:
        for r in range(rounds + 5):
            for mode in modes[r % len(modes):] + modes[:r % len(modes)]:
                set_mode(mode)
                for strategy in ("graph", "eager"):
                    result = executor.run(buffers[r % 2], policy, strategy=strategy)
                    if r >= 5:  # warm-up rounds first
                        wall[(mode, strategy)].append(result.latency_ms)
    except CudaError as exc:  # the driver refuses to change the mode of a live context
        return {"error": str(exc), "executor_default": own}
    finally:
        if own in modes:
            with contextlib.suppress(CudaError):
                set_mode(own)
    return {mode: {f"{s}_median_ms": _median(wall[(mode, s)]) for s in ("graph", "eager")}
            for mode in modes} | {"executor_default": own,
                                   "basis": executor.sync_mode_basis}


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def _progress(message: str) -> None:
    print(f"[executor.py {_dt.datetime.now():%H:%M:%S}] {message}", flush=True)


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
                wanted = model["num_exits"] - 1
                if row["conditional_nodes_plan"] != wanted or row["conditional_nodes"] != wanted:
                    failures.append(f"{where}: the graph should hold {wanted} IF nodes (plan: "
                                    f"{row['conditional_nodes_plan']}, driver: "
                                    f"{row['conditional_nodes']})")
                allowed = max(IDEAL_TOLERANCE * row["ideal_ms"], IDEAL_SLACK_MS)
                if row["device_median_ms"] is None or \
                        row["device_median_ms"] - row["ideal_ms"] > allowed:
                    failures.append(f"{where}: graph device median {row['device_median_ms']} "
                                    f"ms is more than {allowed * 1e3:.0f} us over the flat-graph "
                                    f"ideal {row['ideal_ms']:.4f} ms")
                eager = rows.get(("eager", k))
                if entry["batch"] == 1 and k > 0 and eager and row["median_ms"] >= eager["median_ms"]:
                    failures.append(f"{where}: graph ({row['median_ms']:.4f} ms) is not faster "
                                    f"than eager ({eager['median_ms']:.4f} ms)")
    return failures


TABLE_HEADER = ("| model | batch | exit | ideal | graph device | graph wall | poll wall | "
                "eager wall | syncs g/p/e | IF nodes | no-exit graph |\n"
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def format_batch(model: dict[str, Any], entry: dict[str, Any]) -> str:
    """The table rows of one model at one batch size (IF nodes: as the driver holds them in the
    graph, else the plan's count)."""
    short = model["model"].replace("multi_exit_vit_", "")
    rows = {(r["strategy"], r["exit"]): r for r in entry["rows"]}
    full = entry["full_graph"]
    lines = []
    for k in range(model["num_exits"]):
        graph = rows.get(("graph", k))
        device = graph["device_median_ms"] if graph else None
        cells = [f"{device:.3f}" if device is not None else "-"]
        for strategy in STRATEGIES:
            row = rows.get((strategy, k))
            cells.append(f"{row['median_ms']:.3f} / {row['p99_ms']:.3f}" if row else "-")
        syncs = "/".join(
            ",".join(map(str, rows[(s, k)]["host_syncs"])) if (s, k) in rows else "-"
            for s in STRATEGIES)
        any_row = next(r for (_, j), r in rows.items() if j == k)
        ifs = graph["conditional_nodes"] if graph and graph.get("conditional_nodes") is not None \
            else any_row.get("conditional_nodes_plan", any_row.get("conditional_nodes"))
        no_exit = f"{full['median_ms']:.3f}" if k == model["num_exits"] - 1 else ""
        lines.append(f"| {short} | {entry['batch']} | {k} | {any_row['ideal_ms']:.3f} | "
                     f"{' | '.join(cells)} | {syncs} | {ifs} | {no_exit} |")
    return "\n".join(lines)


def format_table(results: dict[str, Any]) -> str:
    """The results as a markdown table."""
    gpu = results["gpu"]["name"]
    lines = [f"GPU: {gpu}, driver CUDA {results['gpu']['driver_cuda_version']}, torch "
             f"{results['software'].get('torch')}, cuda-bindings "
             f"{results['software'].get('cuda-bindings')}; ms; wall: median / p99 of "
             f"CudaExecutor.run (input on the GPU, results read back to the host); device: "
             f"median GPU time (CUDA events); ideal: the same work as one flat graph",
             "", TABLE_HEADER]
    for model in results["models"]:
        for entry in model["batches"]:
            lines.append(format_batch(model, entry))
    return "\n".join(lines)


class Recorder:
    """Keeps ``executor-<gpu>.json`` current: rewritten (atomically) after every model and
    batch size with ``"complete": false``, and once more at the end with the acceptance
    verdict, so a run cut short keeps what it measured."""

    def __init__(self, path: Path, results: dict[str, Any]):
        self.path = path
        self.results = {**results, "models": [], "complete": False}
        self.write()

    def model_progress(self, model: dict[str, Any]) -> None:
        """Records ``model``'s results so far (replacing its earlier record)."""
        models = [m for m in self.results["models"] if m["model"] != model["model"]]
        self.results["models"] = [*models, model]
        self.write()

    def finish(self, failures: list[str]) -> None:
        self.results["acceptance"] = {"ok": not failures, "failures": failures}
        self.results["complete"] = True
        self.write()

    def write(self) -> None:
        from trt_exit.fileio import atomic_write_json

        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, self.results)


def _versions() -> dict[str, str | None]:
    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    from trt_exit.runtime.cuda.module import nvrtc_library, nvrtc_version

    packages = {p: version(p) for p in ("trt-exit", "torch", "cuda-bindings", "cuda-python",
                                        "numpy", "nvtx")}
    packages["nvrtc"] = ".".join(map(str, nvrtc_version()))
    packages["nvrtc_library"] = nvrtc_library()
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
    slug = re.sub(r"[^a-z0-9]+", "-", device.name.lower()).strip("-")
    path = args.out / f"executor-{slug}.json"
    recorder = Recorder(path, {
        "benchmark": "executor",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "gpu": device.to_dict(), "software": _versions(),
        "settings": {"batches": args.batches, "strategies": args.strategies,
                     "repeats": args.repeats, "warmup": args.warmup,
                     "profile_repeats": args.profile_repeats, "backend": "torch",
                     "precision": "fp32", "weights": "random (seed 0)",
                     "input": "two torch tensors on the GPU, alternating run to run (the graph "
                              "copies them into its own buffer as its first nodes; poll and "
                              "eager read them in place)",
                     "policy": "ThresholdPolicy per exit depth k: unreachable thresholds before "
                               "k, 0 from k on",
                     "latency": "wall time of CudaExecutor.run, results copied to the host",
                     "device": "CUDA events on the executor's stream around the run's work",
                     "host_syncs": "stream/event synchronizations counted by the CUDA layer",
                     "ideal": "the chain's work at depth k (input copy, begin kernel, segments "
                              "and exits 0..k, k+1 plain gate kernels, result copy) as one "
                              "flat CUDA graph, CUDA events around one launch, median",
                     "if_nodes": "conditional nodes the driver holds in the graph "
                                 "(cuGraphGetNodes / cuGraphNodeGetType, every body)"},
    })
    print(TABLE_HEADER, flush=True)
    for name in args.models:
        _progress(f"{name}: building the model and the executor")
        bench_model(name, args.batches, args.strategies, args.repeats, args.warmup,
                    args.profile_repeats, on_batch=recorder.model_progress)
        _progress(f"{name}: done; wrote {path}")
    failures = acceptance(recorder.results)
    recorder.finish(failures)
    print()
    print(format_table(recorder.results))
    print(f"\nacceptance: {'ok' if not failures else 'FAILED'}")
    for failure in failures:
        print(f"  - {failure}")
    print(f"wrote {path}")
    return 1 if args.check and failures else 0


if __name__ == "__main__":
    sys.exit(main())
