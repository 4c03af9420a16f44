"""The single early-exit graph against the staged chain and the no-exit graph, on the CPU.

For a tuned model directory (the demo's), on its test split, with ONNX Runtime and one intra-op
thread, after a warm-up, three sets of variants, each interleaved batch by batch in rotating
order (more sessions in one rotation evict each other's code and data from the CPU's caches and
slow every variant alike, so the sets run one after another):

1. plain ONNX Runtime (``session.run`` only): the single graph; the staged chain as a plain
   Python loop of stage sessions deciding after each exit (with compaction, as the executor);
   the no-exit graph;
2. the **per-exit-path limit** (plain ONNX Runtime), beside the single graph and the no-exit
   graph: for each exit k a straight graph (no decisions) of exactly the path to it (segments
   up to k, the heads of the deciding exits before it), composed from the same stage graphs;
   each batch runs the path its deepest sample needs: what one call would cost if it knew in
   advance where to stop. (Each path runs as often as its exit is taken, as the single graph's
   branches do: timing every path on every batch instead keeps the rare paths' weights in the
   caches, which the single graph's rare branches do not have, and flatters the limit.)
3. through trt_exit's executor (what ``Executor.run`` costs, input checks included): strategy
   ``single_graph``, strategy ``stages`` and the no-exit graph (``run_full_model``);
4. at batch 1, single-graph variants that show what each cut is worth: without folding the
   shape arithmetic, ONNX Runtime's graph optimization at ``extended`` and ``basic`` instead of
   ``all``, and the thresholds as a constant (not overridable, so ONNX Runtime can fold them).

Then ONNX Runtime's profiler on the single graph at batch 1: time per op type, per ``If`` and
per part (segments, exit heads, decisions). Writes JSON and prints the tables::

    python benchmarks/single_graph.py runs/demo --out benchmarks/results/single-graph-cpu.json
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np


def sessions(manifest, precision: str, threads: int):
    """Plain ONNX Runtime sessions and the plans of the ablations and the path graphs."""
    import onnxruntime as ort

    from trt_exit import tensor_names as tn
    from trt_exit.export.early_exit_graph import (
        ChainPlan,
        compose_early_exit_graph,
        default_thresholds,
        plan_chain,
    )
    from trt_exit.runtime.backends.onnxruntime import session_options

    def session(source, level=None):
        options = session_options(threads)
        if level is not None:
            options.graph_optimization_level = level
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])

    thresholds = manifest.thresholds(precision)
    plan = plan_chain(manifest, thresholds)
    defaults = default_thresholds(manifest, plan, thresholds)
    graph_path = str(manifest.early_exit_graph_path(precision))
    unfolded = compose_early_exit_graph(manifest, precision, plan, defaults, fold_shapes=False)
    constant = compose_early_exit_graph(manifest, precision, plan, defaults)
    kept = [i for i in constant.graph.input if i.name != tn.THRESHOLDS]
    del constant.graph.input[:]
    constant.graph.input.extend(kept)  # the initializer stays: a constant ONNX Runtime folds
    levels = ort.GraphOptimizationLevel
    plain = {
        "single graph": session(graph_path),
        "no-exit": session(str(manifest.full_model_path(precision))),
    }
    ablations = {
        "as built (folded shapes, optimization all)": plain["single graph"],
        "shape arithmetic not folded": session(unfolded.SerializeToString()),
        "optimization extended": session(graph_path, levels.ORT_ENABLE_EXTENDED),
        "optimization basic": session(graph_path, levels.ORT_ENABLE_BASIC),
        "thresholds constant (folded by ORT)": session(constant.SerializeToString()),
    }
    paths = {}
    for k in range(manifest.num_exits):
        heads = tuple(sorted({*(d for d in plan.decisions if d < k), k,
                              *plan_chain(manifest, None, final=k).heads}))
        path = compose_early_exit_graph(manifest, precision, ChainPlan((), heads, k),
                                        np.full(manifest.num_exits - 1, np.inf, np.float32))
        paths[k] = session(path.SerializeToString())
    return plain, ablations, paths, plan


class PlainStages:
    """The staged chain as a plain loop of ONNX Runtime calls (no trt_exit in the loop): one
    session per stage, the first confident exit wins, the batch compacted as the executor
    does. The same decisions as the single graph; what a user re-implementing the executor
    would write."""

    def __init__(self, manifest, precision: str, threads: int, thresholds):
        import onnxruntime as ort

        from trt_exit.runtime.backends.onnxruntime import session_options

        self.stages = []  # (session, input names, output names, exit index or None)
        for stage in manifest.stages:
            session = ort.InferenceSession(str(manifest.onnx_path(stage, precision)),
                                           session_options(threads),
                                           providers=["CPUExecutionProvider"])
            k = stage.index if stage.kind == "exit" else None
            self.stages.append((session, stage.input_names(), stage.output_names(), k))
        self.final = manifest.num_exits - 1
        self.thresholds = [None if t is None else np.float32(t) for t in thresholds]

    def __call__(self, feeds: dict) -> tuple:
        values = dict(feeds)
        batch = len(next(iter(feeds.values())))
        rows = np.arange(batch)
        index = np.zeros(batch, np.int64)
        output = confidence = None
        for session, inputs, outputs, k in self.stages:
            if k is not None and k < self.final and self.thresholds[k] is None:
                continue  # a disabled exit (no BoF state to hand on in this benchmark's model)
            values.update(zip(outputs, session.run(outputs, {n: values[n] for n in inputs})))
            if k is None:
                continue
            conf = values[outputs[1]]
            done = np.ones(len(rows), bool) if k == self.final else conf >= self.thresholds[k]
            if done.any():
                out = values[outputs[0]]
                if output is None:
                    output = np.zeros((batch, out.shape[1]), out.dtype)
                    confidence = np.zeros(batch, np.float32)
                output[rows[done]], confidence[rows[done]] = out[done], conf[done]
                index[rows[done]] = k
                if done.all():
                    return output, confidence, index
                keep = ~done
                values = {n: v[keep] for n, v in values.items()}
                rows = rows[keep]
        return output, confidence, index


def interleaved(batches: list[dict], variants: dict, passes: int, warmup: int) -> dict:
    """Wall time (ms) of every variant on every batch: ``{name: (passes, batches)}``."""
    names = list(variants)
    for i in range(warmup):
        for name in names:
            variants[name](batches[i % len(batches)], i % len(batches))
    times = {name: np.zeros((passes, len(batches))) for name in names}
    for p in range(passes):
        for b, batch in enumerate(batches):
            shift = (b + p) % len(names)
            for name in names[shift:] + names[:shift]:
                began = time.perf_counter()
                variants[name](batch, b)
                times[name][p, b] = (time.perf_counter() - began) * 1e3
    return times


def ort_profile(session_source: str, threads: int, inputs: dict, plan) -> dict:
    """ONNX Runtime's profiler on the single graph, batch 1, one run per sample."""
    import onnxruntime as ort

    from trt_exit.runtime.backends.onnxruntime import session_options

    options = session_options(threads)
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as folder:
        options.profile_file_prefix = str(Path(folder) / "ort")
        session = ort.InferenceSession(session_source, options, providers=["CPUExecutionProvider"])
        count = len(next(iter(inputs.values())))
        for i in range(count):
            session.run(None, {k: v[i : i + 1] for k, v in inputs.items()})
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e["dur"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    decision = re.compile(r"^exit_\d+/(threshold|stop|go|any_go|continue|if|output|confidence|"
                          r"exit_index|merge_\w+|stop_rows)_kernel_time$")
    by_op, calls, parts, ifs = defaultdict(float), defaultdict(int), defaultdict(float), {}
    for e in nodes:
        op, name, dur = e["args"].get("op_name", "?"), e["name"], e["dur"]
        if op == "If":
            ifs.setdefault(name[: -len("_kernel_time")], []).append(dur)
            continue  # inclusive of its branch's nodes, which are counted themselves
        by_op[op] += dur
        calls[op] += 1
        if decision.match(name):
            parts["decisions (threshold, compare, any, If branches' merges)"] += dur
        elif name.startswith("segment_"):
            parts["segments"] += dur
        elif name.startswith("exit_"):
            parts["exit heads"] += dur
        else:
            parts["nodes renamed by ORT's fusions (segments and heads)"] += dur
    n = len(runs)
    node_total = sum(by_op.values())
    return {
        "runs": n, "note": "profiler on: every node is timed, which adds its own overhead",
        "model_run_us": float(np.mean(runs)),
        "kernel_us_per_run": node_total / n,
        "outside_kernels_us_per_run": float(np.mean(runs)) - node_total / n,
        "by_op_us_per_run": {op: round(d / n, 2) for op, d in
                             sorted(by_op.items(), key=lambda kv: -kv[1])},
        "calls_per_run": {op: round(c / n, 2) for op, c in calls.items()},
        "parts_us_per_run": {k: round(v / n, 2) for k, v in parts.items()},
        "if_nodes": {name: {"calls_per_run": len(d) / n, "inclusive_us_per_call": float(np.mean(d))}
                     for name, d in ifs.items()},
        "decisions_in_graph": list(plan.decisions),
    }


def run(model_dir: str, precision: str, batches: list[int], passes: int, warmup: int,
        threads: int, profile: bool, samples: int | None = None) -> dict:
    from trt_exit.manifest import Manifest
    from trt_exit.profiling.environment import machine_info
    from trt_exit.runtime.executor import Executor, default_policy
    from trt_exit.workflow import dataset_of, evenly_spaced, load_splits

    manifest = Manifest.load(model_dir)
    info = dataset_of(manifest)
    test = load_splits(info["name"], info["seed"], info.get("options"))["test"]
    test = test.subset(evenly_spaced(len(test), samples))
    inputs = {name: np.ascontiguousarray(v) for name, v in test.inputs.items()}
    count = len(test)
    plain, ablations, paths, plan = sessions(manifest, precision, threads)
    policy = default_policy(manifest, precision)
    staged = PlainStages(manifest, precision, threads, manifest.thresholds(precision))
    load_before = __import__("os").getloadavg()[0]
    report = {"model": manifest.name, "model_dir": str(manifest.root), "precision": precision,
              "samples": count, "threads": threads, "passes": passes, "warmup": warmup,
              "policy": policy.describe(), "plan": {"decisions": list(plan.decisions),
                                                    "final": plan.final}, "batches": {}}
    with Executor(manifest, "onnxruntime", precision,
                  backend_options={"threads": threads}) as executor:
        exits_all = executor.run(inputs, policy, "stages").exit_index
        for size in batches:
            parts = [{k: v[i : i + size] for k, v in inputs.items()}
                     for i in range(0, count - size + 1, size)]
            deepest = [int(exits_all[i : i + size].max()) for i in range(0, count - size + 1, size)]
            for i, part in enumerate(parts):  # the plain loop decides as the graph does
                _, _, graph_index = plain["single graph"].run(None, part)
                np.testing.assert_array_equal(staged(part)[2], graph_index)
                np.testing.assert_array_equal(graph_index, exits_all[i * size : (i + 1) * size])
            # Sets of variants, each interleaved in itself (more sessions in one rotation evict
            # each other's code and data from the caches and slow every variant alike).
            sets = [{
                "plain ORT: single graph": lambda x, b: plain["single graph"].run(None, x),
                "plain ORT: staged chain": lambda x, b: staged(x),
                "plain ORT: no-exit": lambda x, b: plain["no-exit"].run(None, x),
            }, {
                "limit set: single graph": lambda x, b: plain["single graph"].run(None, x),
                "limit set: no-exit": lambda x, b: plain["no-exit"].run(None, x),
                "limit set: per-exit-path limit": lambda x, b: paths[deepest[b]].run(None, x),
            }, {
                "single graph": lambda x, b: executor.run(x, policy, "single_graph"),
                "stages": lambda x, b: executor.run(x, policy, "stages"),
                "no-exit": lambda x, b: executor.run_full_model(x),
            }]
            if size == 1:
                sets.append({f"ablation: {name}": (lambda s: lambda x, b: s.run(None, x))(s)
                             for name, s in ablations.items()})
            rounds = max(passes, -(-passes * 45 // len(parts)))  # >= ~45 batches per size
            times = {}
            for variants in sets:
                times.update(interleaved(parts, variants, rounds, warmup))
            means = {name: float(t.mean()) for name, t in times.items()}
            entry = {"batches": len(parts), "passes": rounds, "mean_ms": means,
                     "p50_ms": {name: float(np.median(t)) for name, t in times.items()}}
            entry["ratios"] = {
                "single graph / stages": means["single graph"] / means["stages"],
                "single graph / no-exit": means["single graph"] / means["no-exit"],
                "stages / no-exit": means["stages"] / means["no-exit"],
                "plain ORT: single graph / staged chain":
                    means["plain ORT: single graph"] / means["plain ORT: staged chain"],
                "plain ORT: single graph / no-exit":
                    means["plain ORT: single graph"] / means["plain ORT: no-exit"],
                "limit set: single graph / no-exit":
                    means["limit set: single graph"] / means["limit set: no-exit"],
                "limit set: limit / no-exit":
                    means["limit set: per-exit-path limit"] / means["limit set: no-exit"],
                "limit set: single graph / limit":
                    means["limit set: single graph"] / means["limit set: per-exit-path limit"],
            }
            if size == 1:
                per_exit = {}
                for k in range(manifest.num_exits):
                    rows = exits_all == k
                    if rows.any():
                        per_exit[str(k)] = {
                            "samples": int(rows.sum()),
                            **{name: float(times[name][:, rows].mean()) for name in
                               ("single graph", "stages", "plain ORT: single graph",
                                "plain ORT: staged chain", "limit set: single graph",
                                "limit set: per-exit-path limit")}}
                entry["per_exit_ms"] = per_exit
            report["batches"][str(size)] = entry
    report["exit_fractions"] = (np.bincount(exits_all, minlength=manifest.num_exits)
                                / count).tolist()
    # The rough limit of the issue: each sample's path at its share of the backbone's blocks
    # (no exit heads, no per-call or per-node overhead), as a fraction of the no-exit graph.
    depth = manifest.exits[-1].after_block
    report["block_share_limit_ratio"] = float(sum(
        f * manifest.exits[k].after_block / depth for k, f in enumerate(report["exit_fractions"])))
    if profile:
        report["ort_profile_batch_1"] = ort_profile(
            str(manifest.early_exit_graph_path(precision)), threads, inputs, plan)
    report["load_average_1min"] = {"before": load_before,
                                   "after": __import__("os").getloadavg()[0]}
    report["machine"] = machine_info()
    return report


def format_report(report: dict) -> str:
    lines = [f"{report['model']} {report['precision']}, {report['samples']} test samples, "
             f"ONNX Runtime {report['threads']} intra-op thread(s), exit fractions "
             f"{', '.join(f'{f:.3f}' for f in report['exit_fractions'])}; mean ms per batch", ""]
    lines.append(f"{'batch':>5} | {'plain ORT: single graph':>23} {'staged chain':>12} "
                 f"{'no-exit':>8} | {'graph/staged':>12} {'graph/no-exit':>13} | "
                 f"{'limit set: graph/no-exit':>24} {'limit/no-exit':>13} {'graph/limit':>11}")
    for size, entry in report["batches"].items():
        m, r = entry["mean_ms"], entry["ratios"]
        lines.append(
            f"{size:>5} | {m['plain ORT: single graph']:23.3f} {m['plain ORT: staged chain']:12.3f} "
            f"{m['plain ORT: no-exit']:8.3f} | {r['plain ORT: single graph / staged chain']:12.2f} "
            f"{r['plain ORT: single graph / no-exit']:13.2f} | "
            f"{r['limit set: single graph / no-exit']:24.2f} {r['limit set: limit / no-exit']:13.2f} "
            f"{r['limit set: single graph / limit']:11.2f}")
    lines += ["", f"{'batch':>5} | {'Executor: single_graph':>22} {'stages':>8} "
                  f"{'no-exit':>8} | {'graph/stages':>12} {'graph/no-exit':>13}"]
    for size, entry in report["batches"].items():
        m, r = entry["mean_ms"], entry["ratios"]
        lines.append(f"{size:>5} | {m['single graph']:22.3f} {m['stages']:8.3f} {m['no-exit']:8.3f} "
                     f"| {r['single graph / stages']:12.2f} {r['single graph / no-exit']:13.2f}")
    one = report["batches"].get("1")
    if one:
        lines += ["", "batch 1 by the exit taken (mean ms): exit, samples | plain ORT single graph, "
                      "staged chain | limit set: single graph, path | Executor single_graph, stages"]
        for k, e in one["per_exit_ms"].items():
            lines.append(f"  {k} {e['samples']:4d} | {e['plain ORT: single graph']:.3f} "
                         f"{e['plain ORT: staged chain']:.3f} | {e['limit set: single graph']:.3f} "
                         f"{e['limit set: per-exit-path limit']:.3f} | {e['single graph']:.3f} "
                         f"{e['stages']:.3f}")
        lines += ["", "batch 1, plain ORT, single graph variants (mean ms, interleaved among "
                      "themselves):"]
        for name, ms in one["mean_ms"].items():
            if name.startswith("ablation: "):
                lines.append(f"  {name[len('ablation: '):]}: {ms:.4f}")
    prof = report.get("ort_profile_batch_1")
    if prof:
        lines += ["", f"ORT profiler, batch 1 (profiler on: {prof['model_run_us']:.1f} us per "
                      f"run, {prof['kernel_us_per_run']:.1f} us in kernels):"]
        lines += [f"  {k}: {v:.1f} us" for k, v in prof["parts_us_per_run"].items()]
        lines += [f"  If {k}: {v['calls_per_run']:.2f} calls/run, {v['inclusive_us_per_call']:.1f} "
                  f"us per call incl. branch" for k, v in prof["if_nodes"].items()]
    lines.append(f"\nblock-share estimate of the limit (each path at its share of the backbone's "
                 f"blocks, nothing else): {report['block_share_limit_ratio']:.2f} x no-exit")
    lines.append(f"load average (1 min) before / after: {report['load_average_1min']['before']:.2f}"
                 f" / {report['load_average_1min']['after']:.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="tuned model directory (e.g. runs/demo)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "int8"))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--passes", type=int, default=5, help="timed passes over the test split")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--samples", type=int,
                        help="time this many evenly spaced test samples (default: all; MNIST's "
                             "10,000 take long)")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--out", help="write the JSON here")
    args = parser.parse_args()
    if args.samples is not None and args.samples < 1:
        parser.error("--samples must be at least 1")
    report = run(args.model_dir, args.precision, args.batches, args.passes, args.warmup,
                 args.threads, not args.no_profile, args.samples)
    report["command"] = "python benchmarks/single_graph.py " + " ".join(
        __import__("shlex").quote(a) for a in __import__("sys").argv[1:])
    if args.out:
        from trt_exit.fileio import atomic_write_json

        atomic_write_json(args.out, report)
    print(format_report(report))
    if args.out:
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
