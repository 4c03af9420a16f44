"""Load test of ``trt-exit serve``: N concurrent clients against one server vs. one in-process
executor per client, on loopback, bounded in requests and time.

    python benchmarks/serve.py --digits runs/demo            # builds the tiny AV crowd model
    python benchmarks/serve.py --digits runs/demo --av DIR --clients 1 4 16 64

For each model (the digits demo model, the AV crowd model) two servers run on 127.0.0.1, both
ONNX Runtime with one model instance and one intra-op thread: ``trt-exit serve`` (PyTriton)
and the ``trt-exit triton-repo`` repository on the ``tritonserver`` bundled with PyTriton
(Python backend, no PyTriton hop). For each client count N, N client threads each send batch-1
requests one after the other (gRPC, ``RemoteExecutor``) until the round's request budget or
time limit is spent; the third mode gives the same N threads each their own in-process
:class:`~trt_exit.runtime.executor.Executor` (one intra-op thread) on the same samples. The
modes alternate round by round, so load from other jobs on the machine falls on all of them.
Recorded per mode and level: throughput, p50/p99 latency, exit histogram, errors, lost
responses (sent but not answered), samples whose exit or output differ from a reference
executor run, and for the servers the batch sizes Triton formed (its statistics endpoint).
Writes ``benchmarks/results/serve-cpu.json`` and prints a table; exit status 1 on any error,
lost response or mismatch.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
#: server: trt-exit serve (PyTriton); repo: trt-exit triton-repo on the tritonserver bundled with
#: PyTriton (Python backend); in_process: one Executor per client thread.
MODES = ("server", "repo", "in_process")


def model_samples(name: str, manifest, count: int) -> dict[str, np.ndarray]:
    """Real inputs: the digits test split, or the synthetic AV crowd test split."""
    if name == "digits":
        from trt_exit.training.datasets import load_digits

        inputs = load_digits(seed=0)["test"].inputs
    else:
        from trt_exit.training.crowd_datasets import load_synthetic_av_crowd

        inputs = load_synthetic_av_crowd(seed=1, train=1, val=1, test=count)["test"].inputs
    names = [spec.name for spec in manifest.inputs]
    return {n: np.ascontiguousarray(inputs[n][:count]) for n in names}


def run_clients(make_runner, clients: int, samples: dict[str, np.ndarray], requests: int,
                time_limit_s: float) -> dict:
    """``clients`` threads, each with its own runner, each sending its share of ``requests``
    batch-1 requests in a closed loop; returns what happened."""
    total = len(next(iter(samples.values())))
    per_client = math.ceil(requests / clients)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    exits: list[dict[int, int]] = [{} for _ in range(clients)]
    outputs: list[dict[int, tuple[int, np.ndarray]]] = [{} for _ in range(clients)]
    errors: list[list[str]] = [[] for _ in range(clients)]
    sent = [0] * clients
    runners = [make_runner(c) for c in range(clients)]
    start_barrier = threading.Barrier(clients + 1)
    deadline = [0.0]

    def client(c: int) -> None:
        runner = runners[c]
        start_barrier.wait()
        for j in range(per_client):
            if time.perf_counter() > deadline[0]:
                break
            i = (c * per_client + j) % total
            feeds = {name: value[i:i + 1] for name, value in samples.items()}
            sent[c] += 1
            began = time.perf_counter()
            try:
                r = runner.run(feeds)
            except Exception as exc:  # counted, reported
                errors[c].append(f"{type(exc).__name__}: {exc}")
                continue
            latencies[c].append((time.perf_counter() - began) * 1e3)
            k = int(r.exit_index[0])
            exits[c][k] = exits[c].get(k, 0) + 1
            outputs[c][i] = (k, np.asarray(r.output[0]))

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    began = time.perf_counter()
    deadline[0] = began + time_limit_s
    start_barrier.wait()
    for t in threads:
        t.join(timeout=time_limit_s + 60)
    wall_s = time.perf_counter() - began
    hung = sum(t.is_alive() for t in threads)
    answered = sum(len(x) for x in latencies)
    all_latencies = np.concatenate([np.asarray(x) for x in latencies]) if answered else np.zeros(1)
    histogram: dict[int, int] = {}
    for e in exits:
        for k, n in e.items():
            histogram[k] = histogram.get(k, 0) + n
    merged: dict[int, tuple[int, np.ndarray]] = {}
    for o in outputs:
        merged.update(o)
    return {
        "requests_sent": sum(sent), "answered": answered,
        "errors": sum(len(e) for e in errors),
        "lost": sum(sent) - answered - sum(len(e) for e in errors),
        "hung_clients": hung,
        "first_error": next((e[0] for e in errors if e), None),
        "wall_s": wall_s, "throughput_per_s": answered / wall_s,
        "p50_ms": float(np.percentile(all_latencies, 50)),
        "p99_ms": float(np.percentile(all_latencies, 99)),
        "exit_histogram": [histogram.get(k, 0) for k in range(max(histogram, default=-1) + 1)],
        "_outputs": merged,
    }


def group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of a process group."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after the name: state, ppid, pgrp, ...
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def executor_batch_costs(executor, samples: dict[str, np.ndarray], sizes=(1, 4, 16, 64),
                         repeats: int = 30) -> dict[int, float]:
    """Median wall ms per sample of one executor run at each batch size (the batching gain a
    server could have at most, before any transport)."""
    out = {}
    for size in sizes:
        feeds = {name: value[:size] for name, value in samples.items()}
        for _ in range(3):
            executor.run(feeds)
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            executor.run(feeds)
            times.append((time.perf_counter() - began) * 1e3)
        out[size] = float(np.median(times)) / size
    return out


def batch_stats(http_port: int, model: str) -> dict[int, int]:
    """Executions per batch size so far (Triton's statistics endpoint)."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(f"127.0.0.1:{http_port}")
    try:
        stats = client.get_inference_statistics(model)["model_stats"][0]["batch_stats"]
    finally:
        client.close()
    return {int(s["batch_size"]): int(s["compute_infer"]["count"]) for s in stats}


def merge_rounds(rounds: list[dict]) -> dict:
    """Totals over rounds (throughput from the summed answers and wall time)."""
    out = {key: sum(r[key] for r in rounds) for key in
           ("requests_sent", "answered", "errors", "lost", "hung_clients", "wall_s")}
    out["throughput_per_s"] = out["answered"] / out["wall_s"]
    answered = max(1, out["answered"])
    # CPU per answered request: this process (client threads, or the in-process executors) and
    # the server's processes (trt-exit serve or tritonserver, their Python-backend stubs).
    out["client_cpu_ms_per_request"] = 1e3 * sum(r["client_cpu_s"] for r in rounds) / answered
    out["server_cpu_ms_per_request"] = 1e3 * sum(r["server_cpu_s"] for r in rounds) / answered
    out["throughput_per_round"] = [round(r["throughput_per_s"], 1) for r in rounds]
    out["p50_ms"] = float(np.median([r["p50_ms"] for r in rounds]))
    out["p99_ms"] = float(max(r["p99_ms"] for r in rounds))
    width = max(len(r["exit_histogram"]) for r in rounds)
    out["exit_histogram"] = [sum(r["exit_histogram"][k] if k < len(r["exit_histogram"]) else 0
                                 for r in rounds) for k in range(width)]
    out["first_error"] = next((r["first_error"] for r in rounds if r["first_error"]), None)
    return out


def check_outputs(result: dict, reference) -> int:
    """Samples whose exit differs from the reference run, or whose output is off by > 1e-4."""
    bad = 0
    for i, (k, output) in result.pop("_outputs").items():
        if k != int(reference.exit_index[i]) or not np.allclose(output, reference.output[i],
                                                                rtol=1e-4, atol=1e-4):
            bad += 1
    return bad


def bench_model(name: str, model_dir: Path, args, log_dir: Path) -> dict:
    from trt_exit.manifest import Manifest
    from trt_exit.runtime.executor import Executor
    from trt_exit.serving.client import RemoteExecutor
    from trt_exit.serving.process import ServerPorts, ServerProcess
    from trt_exit.serving.repository import RepositoryConfig, write_repository

    manifest = Manifest.load(model_dir)
    samples = model_samples(name, manifest, args.samples)
    with Executor(manifest) as executor:
        reference = executor.run(samples)  # batched reference; every sample its own exit
        batch_costs = executor_batch_costs(executor, samples)
    print(f"{name}: one executor run, ms per sample at batch " + ", ".join(
        f"{b}: {ms:.3f}" for b, ms in batch_costs.items()), flush=True)
    repo = log_dir / f"repo-{name}"
    write_repository(RepositoryConfig(model_dir, repo, max_batch=args.max_batch,
                                      max_queue_delay_us=args.max_queue_delay_us))
    servers = {
        "server": ServerProcess.serve(model_dir, ServerPorts.free(), manifest.name,
                                      log_dir / f"serve-{name}.log",
                                      "--max-batch", str(args.max_batch),
                                      "--max-queue-delay-us", str(args.max_queue_delay_us)),
        "repo": ServerProcess.tritonserver(repo, ServerPorts.free(), manifest.name,
                                           log_dir / f"tritonserver-{name}.log",
                                           log_dir / "tritonserver"),
    }
    executors: list = []
    levels = []
    with servers["server"], servers["repo"]:
        for clients in args.clients:
            while len(executors) < clients:
                executors.append(Executor(manifest, backend_options={"threads": 1}))
            runners = {mode: [RemoteExecutor(server.ports.grpc_url, manifest, timeout_s=30)
                              for _ in range(clients)] for mode, server in servers.items()}
            runners["in_process"] = executors[:clients]
            for _ in range(2):  # warm-up: servers and executors
                for mode in MODES:
                    run_clients(lambda c: runners[mode][c], clients, samples, clients * 4, 30)
            rounds: dict[str, list] = {mode: [] for mode in MODES}
            mismatches = dict.fromkeys(MODES, 0)
            stats_before = {mode: batch_stats(s.ports.http, manifest.name)
                            for mode, s in servers.items()}
            for _ in range(args.rounds):  # interleaved: noise from other jobs hits every mode
                for mode in MODES:
                    server_cpu = group_cpu_s(servers[mode].process.pid) if mode in servers else 0
                    client_cpu = time.process_time()
                    result = run_clients(lambda c: runners[mode][c], clients, samples,
                                         args.requests, args.time_limit_s)
                    result["client_cpu_s"] = time.process_time() - client_cpu
                    result["server_cpu_s"] = (group_cpu_s(servers[mode].process.pid) - server_cpu
                                              if mode in servers else 0.0)
                    mismatches[mode] += check_outputs(result, reference)
                    rounds[mode].append(result)
            level = {"clients": clients}
            for mode in MODES:
                level[mode] = merge_rounds(rounds[mode])
                level[mode]["mismatches"] = mismatches[mode]
            for mode, server in servers.items():
                after = batch_stats(server.ports.http, manifest.name)
                formed = {b: n - stats_before[mode].get(b, 0) for b, n in sorted(after.items())
                          if n - stats_before[mode].get(b, 0) > 0}
                level[mode]["batches_formed"] = formed
                level[mode]["mean_batch"] = (sum(b * n for b, n in formed.items())
                                             / max(1, sum(formed.values())))
                for remote in runners[mode]:
                    remote.close()
                level[f"{mode}_vs_in_process"] = (level[mode]["throughput_per_s"]
                                                  / level["in_process"]["throughput_per_s"])
            levels.append(level)
            print_level(name, level)
        status = {mode: server.stop() for mode, server in servers.items()}
        leftovers = {mode: server.leftovers for mode, server in servers.items()}
    for executor in executors:
        executor.close()
    return {"model": manifest.name, "model_dir": str(model_dir), "num_exits": manifest.num_exits,
            "reference_exit_histogram": np.bincount(reference.exit_index,
                                                    minlength=manifest.num_exits).tolist(),
            "executor_ms_per_sample_by_batch": batch_costs,
            "server_exit_status": status, "processes_left_after_stop": leftovers,
            "levels": levels}


def print_level(name: str, level: dict) -> None:
    parts = []
    for mode in MODES:
        r = level[mode]
        batch = f" batch {r['mean_batch']:4.1f}" if "mean_batch" in r else ""
        parts.append(f"{mode} {r['throughput_per_s']:6.0f}/s p50 {r['p50_ms']:6.2f} "
                     f"p99 {r['p99_ms']:7.2f} ms{batch} cpu/req {r['client_cpu_ms_per_request']:.2f}"
                     f"+{r['server_cpu_ms_per_request']:.2f} ms err {r['errors']} "
                     f"lost {r['lost']} diff {r['mismatches']}")
    print(f"{name:>6} {level['clients']:>3} | " + " | ".join(parts), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--digits", default="runs/demo",
                        help="digits model directory (trt-exit demo --out runs/demo)")
    parser.add_argument("--av", help="AV crowd model directory (default: build the tiny one)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--requests", type=int, default=600,
                        help="requests per round and mode (split among the clients)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per mode")
    parser.add_argument("--time-limit-s", type=float, default=20.0, help="per round and mode")
    parser.add_argument("--samples", type=int, default=256, help="distinct inputs cycled")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-queue-delay-us", type=int, default=1000)
    parser.add_argument("--out", default=str(ROOT / "results" / "serve-cpu.json"))
    args = parser.parse_args(argv)

    from trt_exit.fileio import atomic_write_json
    from trt_exit.profiling.environment import machine_info

    digits = Path(args.digits)
    if not (digits / "manifest.json").is_file():
        parser.error(f"no digits model at {digits}: run trt-exit demo --out {digits} first")
    models = {}
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        tmp = Path(tmp)
        av = Path(args.av) if args.av else None
        if av is None:
            from trt_exit.experiments.av_crowd import build_tiny_av_export

            av = build_tiny_av_export(tmp / "av", seed=0).root
        started = time.time()
        for name, path in (("digits", digits), ("av", av)):
            models[name] = bench_model(name, path, args, tmp)
        result = {
            "what": "trt-exit serve (PyTriton) and trt-exit triton-repo on the bundled "
                    "tritonserver (Python backend), each ONNX Runtime with 1 instance and 1 "
                    "intra-op thread, vs one in-process Executor per client (1 thread each); "
                    "batch-1 gRPC requests in a closed loop per client thread; modes "
                    "interleaved round by round",
            "machine": machine_info(),
            "shared_machine_note": "2-core x86-64 CPU shared with other jobs during the run: "
                                   "absolute numbers are noisy, compare modes within a level",
            "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
            "duration_s": time.time() - started,
            "models": models,
        }
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    bad = [(m, lv["clients"]) for m, r in models.items() for lv in r["levels"]
           for mode in MODES
           if lv[mode]["errors"] or lv[mode]["lost"] or lv[mode]["mismatches"]]
    if bad:
        print(f"errors, lost responses or mismatches at {bad}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
