"""How fast ``trt-exit serve`` and its camera clients recover: readiness at start, a clean stop,
and ``trt-exit count --server`` through a rolling restart and through a crash, on loopback.

    python benchmarks/serve_recovery.py                 # builds the tiny AV crowd model; ~2 min
    python benchmarks/serve_recovery.py --av DIR --repeats 5

Each repeat:

1. **start**: from launching ``trt-exit serve`` to ``GET /v2/health/ready`` answering 200, and to
   ``GET /v2/models/<name>/ready`` answering 200 (both polled every 20 ms);
2. **restart**: ``trt-exit count synthetic://crowd ... --server grpc://...`` runs at 25 FPS
   (``--realtime``, a queue long enough that no frame is dropped); once it has written 20 lines
   the server gets SIGTERM, and a new server is launched on the same ports as soon as the old
   one has exited. Recorded: the stop (SIGTERM to exit), the longest pause between two JSON
   lines (the clients' outage), and the delay from the new server's model being ready to the
   next line;
3. **crash**: the same with SIGKILL of the server's whole process group (trt-exit serve,
   tritonserver, the Python backend) instead of SIGTERM; the new server first removes what the
   killed one left;
4. **kill**: SIGKILL of the ``trt-exit serve`` process alone: its tritonserver gets SIGTERM from
   the kernel (PyTriton's parent-death signal) and shuts down with requests in flight that the
   dead process will never answer; the new server kills it (it still holds the ports).

Every run must write every frame's line, in order, and exit 0. Writes
``benchmarks/results/serve-recovery-cpu.json`` and prints a table; exit status 1 on a lost line
or a failed run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent
MODEL = "multi_exit_av_crowd_tiny_test"
FRAMES = 400  # 16 s at 25 FPS: the outage falls inside the run
HOWS = ("restart", "crash", "kill")


def _ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as reply:
            return reply.status == 200
    except OSError:
        return False


def launch(model_dir: Path, ports, log: Path, home: Path) -> tuple[subprocess.Popen, dict]:
    """``trt-exit serve`` in its own session; returns it and its readiness times (s)."""
    env = {**os.environ, "PYTRITON_HOME": str(home)}
    began = time.monotonic()
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "trt_exit", "serve", str(model_dir), "--http-port",
             str(ports.http), "--grpc-port", str(ports.grpc), "--metrics-port", str(ports.metrics)],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    times = {}
    while "model_ready_s" not in times:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}; see {log}")
        if time.monotonic() - began > 180:
            raise SystemExit(f"server not ready in 180 s; see {log}")
        now = time.monotonic() - began
        if "health_ready_s" not in times and _ok(f"{ports.http_url}/v2/health/ready"):
            times["health_ready_s"] = now
        if _ok(f"{ports.http_url}/v2/models/{MODEL}/ready"):
            times["model_ready_s"] = now
        time.sleep(0.02)
    return process, times


class LineClock(threading.Thread):
    """Polls a JSONL file every 5 ms and keeps the arrival time of each line."""

    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.path, self.arrivals, self.done = path, [], threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                lines = self.path.read_bytes().count(b"\n")
            except OSError:
                lines = 0
            now = time.monotonic()
            self.arrivals += [now] * (lines - len(self.arrivals))
            time.sleep(0.005)


def outage(model_dir: Path, work: Path, how: str, repeat: int) -> dict:
    """One count run through a SIGTERM (``how="restart"``) or SIGKILL (``"crash"``) of its
    server and a new server on the same ports."""
    from trt_exit.serving.process import ServerPorts

    ports, home = ServerPorts.free(), Path(tempfile.mkdtemp(prefix="pytriton-"))
    name = f"{how}{repeat}"
    out = work / f"{name}.jsonl"
    old, start = launch(model_dir, ports, work / f"{name}-old.log", home)
    count = subprocess.Popen(
        [sys.executable, "-m", "trt_exit", "count", "synthetic://crowd", f"jsonl://{out}",
         "--audio", "synthetic://crowd", "--no-status", "--engines", str(model_dir), "--server",
         ports.grpc_url, "--realtime", "--input-rate", "25", "--queue-frames", "2000",
         "--max-frames", str(FRAMES)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    clock = LineClock(out)
    clock.start()
    while len(clock.arrivals) < 20:
        if count.poll() is not None:
            raise SystemExit(f"count exited early: {count.communicate()[1]}")
        time.sleep(0.01)
    signalled = time.monotonic()
    if how == "restart":
        old.send_signal(signal.SIGTERM)
    elif how == "crash":
        os.killpg(old.pid, signal.SIGKILL)
    else:
        old.send_signal(signal.SIGKILL)
    status = old.wait(timeout=60)
    stop_s = time.monotonic() - signalled
    launched = time.monotonic()
    new, new_start = launch(model_dir, ports, work / f"{name}-new.log", home)
    ready = launched + new_start["model_ready_s"]
    _, err = count.communicate(timeout=300)
    clock.done.set()
    clock.join()
    new.send_signal(signal.SIGTERM)
    new.wait(timeout=60)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    arrivals = clock.arrivals
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    longest = max(range(len(gaps)), key=gaps.__getitem__)
    return {
        "server_start": start, "stop_s": stop_s, "old_exit_status": status,
        "new_server_start": new_start,
        "outage_s": gaps[longest],
        # from the new server's model answering /ready (polled every 20 ms) to the first line
        # after the outage; the client polls every 0.25-1 s
        "ready_to_first_line_s": arrivals[longest + 1] - ready,
        "count_status": count.returncode, "lines": len(lines),
        "lost_lines": FRAMES - len(lines),
        "in_order": [r["frame"] for r in lines] == list(range(len(lines))),
        "count_stderr_tail": err.strip().splitlines()[-3:],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--av", type=Path, help="AV crowd model directory (default: build the "
                                                "tiny test model)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "serve-recovery-cpu.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="serve-recovery-"))
    model_dir = args.av
    if model_dir is None:
        from trt_exit.experiments.av_crowd import build_tiny_av_export

        model_dir = build_tiny_av_export(work / "av", seed=0).root
    runs = []
    for repeat in range(args.repeats):
        for how in HOWS:  # interleaved: load from other jobs falls on all of them
            result = outage(Path(model_dir), work, how, repeat)
            result.update(how=how, repeat=repeat)
            runs.append(result)
            print(f"{how} {repeat}: stop {result['stop_s']:.2f} s, outage "
                  f"{result['outage_s']:.2f} s, ready to first line "
                  f"{result['ready_to_first_line_s']:.2f} s, lines {result['lines']}/{FRAMES}, "
                  f"count exit {result['count_status']}", flush=True)
    failed = [r for r in runs if r["lost_lines"] or not r["in_order"] or r["count_status"] != 0]

    def median(how: str, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["how"] == how)

    starts = [r["server_start"] for r in runs]
    summary = {
        "health_ready_s": statistics.median(s["health_ready_s"] for s in starts),
        "model_ready_s": statistics.median(s["model_ready_s"] for s in starts),
        "model_after_health_s": statistics.median(s["model_ready_s"] - s["health_ready_s"]
                                                  for s in starts),
        **{f"{how}_{key}": median(how, key) for how in HOWS
           for key in ("stop_s", "outage_s", "ready_to_first_line_s")},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": os.uname().nodename, "cpus": os.cpu_count(),
                                    "frames": FRAMES, "summary": summary, "runs": runs},
                                   indent=2) + "\n")
    print(f"\nmedians over {args.repeats} repeats ({len(starts)} server starts):")
    print(f"  start: /v2/health/ready {summary['health_ready_s']:.2f} s, "
          f"/v2/models/{MODEL}/ready {summary['model_ready_s']:.2f} s "
          f"({summary['model_after_health_s']:.2f} s later)")
    for how, what in zip(HOWS, ("SIGTERM", "SIGKILL of the process group",
                                "SIGKILL of trt-exit serve alone")):
        print(f"  {how} ({what}): server gone after {summary[f'{how}_stop_s']:.2f} s; clients "
              f"paused {summary[f'{how}_outage_s']:.2f} s; first line "
              f"{summary[f'{how}_ready_to_first_line_s']:.2f} s after the new server was ready")
    print(f"wrote {args.out}")
    if failed:
        print(f"FAILED: {len(failed)} run(s) lost lines or did not exit 0", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
