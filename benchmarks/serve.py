"""Load test of ``trt-exit serve``: N concurrent clients against one server vs. one in-process
executor per client, on loopback, bounded in requests and time.

    python benchmarks/serve.py --digits runs/demo            # builds the tiny AV crowd model
    python benchmarks/serve.py --digits runs/demo --av DIR --clients 1 4 16 64

For each model (the digits demo model, the AV crowd model) one ``trt-exit serve`` runs on
127.0.0.1 (ONNX Runtime, one instance, one intra-op thread). For each client count N, N client
threads each send batch-1 requests one after the other (gRPC, ``RemoteExecutor``) until the
level's request budget or time limit is spent; then the same N threads each run their own
in-process :class:`~trt_exit.runtime.executor.Executor` (one intra-op thread) on the same
samples. The two modes alternate round by round (server, in-process, server, ...), so load from
other jobs on the machine falls on both. Recorded per mode and level: throughput, p50/p99
latency, exit histogram, errors, lost responses (sent but not answered), samples whose exit or
output differ from a reference executor run, and for the server the batch sizes Triton formed
(its statistics endpoint). Writes ``benchmarks/results/serve-cpu.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent


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

    manifest = Manifest.load(model_dir)
    samples = model_samples(name, manifest, args.samples)
    with Executor(manifest) as executor:
        reference = executor.run(samples)  # batched reference; every sample its own exit
    ports = ServerPorts.free()
    server = ServerProcess.serve(model_dir, ports, manifest.name, log_dir / f"serve-{name}.log",
                                 "--max-batch", str(args.max_batch),
                                 "--max-queue-delay-us", str(args.max_queue_delay_us))
    executors: list = []
    levels = []
    with server:
        for clients in args.clients:
            while len(executors) < clients:
                executors.append(Executor(manifest, backend_options={"threads": 1}))
            remotes = [RemoteExecutor(ports.grpc_url, manifest, timeout_s=30) for _ in range(clients)]
            for _ in range(2):  # warm-up: server and executors
                run_clients(lambda c: remotes[c], clients, samples, clients * 4, 30)
                run_clients(lambda c: executors[c], clients, samples, clients * 4, 30)
            rounds = {"server": [], "in_process": []}
            stats_before = batch_stats(ports.http, manifest.name)
            mismatches = {"server": 0, "in_process": 0}
            for _ in range(args.rounds):  # interleaved: noise from other jobs hits both modes
                for mode in ("server", "in_process"):
                    make = (lambda c: remotes[c]) if mode == "server" else (lambda c: executors[c])
                    result = run_clients(make, clients, samples, args.requests, args.time_limit_s)
                    mismatches[mode] += check_outputs(result, reference)
                    rounds[mode].append(result)
            stats_after = batch_stats(ports.http, manifest.name)
            for remote in remotes:
                remote.close()
            formed = {b: n - stats_before.get(b, 0) for b, n in sorted(stats_after.items())
                      if n - stats_before.get(b, 0) > 0}
            level = {"clients": clients}
            for mode in ("server", "in_process"):
                level[mode] = merge_rounds(rounds[mode])
                level[mode]["mismatches"] = mismatches[mode]
            level["server"]["batches_formed"] = formed
            level["server"]["mean_batch"] = (sum(b * n for b, n in formed.items())
                                             / max(1, sum(formed.values())))
            level["speedup"] = level["server"]["throughput_per_s"] / level["in_process"][
                "throughput_per_s"]
            levels.append(level)
            print_level(name, level)
        status = server.stop()
    for executor in executors:
        executor.close()
    return {"model": manifest.name, "model_dir": str(model_dir), "num_exits": manifest.num_exits,
            "reference_exit_histogram": np.bincount(reference.exit_index,
                                                    minlength=manifest.num_exits).tolist(),
            "server_exit_status": status, "levels": levels}


def print_level(name: str, level: dict) -> None:
    s, p = level["server"], level["in_process"]
    print(f"{name:>7} {level['clients']:>3} | server {s['throughput_per_s']:>7.0f}/s "
          f"p50 {s['p50_ms']:>6.2f} p99 {s['p99_ms']:>7.2f} ms batch {s['mean_batch']:>5.1f} "
          f"err {s['errors']} lost {s['lost']} diff {s['mismatches']} | per-client executors "
          f"{p['throughput_per_s']:>7.0f}/s p50 {p['p50_ms']:>6.2f} p99 {p['p99_ms']:>7.2f} ms "
          f"err {p['errors']} lost {p['lost']} diff {p['mismatches']} | x{level['speedup']:.2f}",
          flush=True)


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
            "what": "trt-exit serve (PyTriton, ONNX Runtime, 1 instance, 1 thread) vs one "
                    "in-process Executor per client (1 thread each); batch-1 requests in a "
                    "closed loop per client thread; modes interleaved round by round",
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
           for mode in ("server", "in_process")
           if lv[mode]["errors"] or lv[mode]["lost"] or lv[mode]["mismatches"]]
    if bad:
        print(f"errors, lost responses or mismatches at {bad}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
