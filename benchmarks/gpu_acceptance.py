"""One prepared GPU acceptance run of the CUDA path, for a fresh machine with no network.

Written for an H100/H200 image with Python 3.12, PyTorch on CUDA 13 (driver 580), cuda-bindings,
CuPy, NVRTC, onnx, onnxruntime, timm and Nsight Compute (no nsys, no TensorRT). Within
:data:`BUDGET_S` (420 s, counted from the interpreter's start) it runs, each step in a process
group of its own with its own time limit, enforced (the whole group is killed):

1. ``environment``: records the GPU, driver, Python and packages (``nvidia-smi``, the installed
   distributions) and checks the driver against cuda-bindings and NVRTC (the CUDA layer's own
   check): ``environment.json``;
2. ``install``: installs what the machine lacks of trt_exit's requirements (setup.py's
   ``install_requires``, pytest, nvtx) from a folder of wheels carried in (``--wheels``),
   never from the network; trt_exit itself runs from this checkout (``PYTHONPATH``);
3. ``pytest-gpu``: ``pytest -m gpu tests/runtime`` (JUnit XML, one line per test in the log);
4. ``benchmark``: ``benchmarks/executor.py --check`` for both models at batch 1 and 8 (its JSON
   is rewritten after every model and batch size);
5. ``nsys``: an Nsight Systems capture of a short benchmark run, if ``nsys`` exists.

Every step's log, the benchmark's JSON and ``acceptance.json`` go into one folder (``--out``).
``acceptance.json`` is rewritten before and after every step (the step under way is
``"running"``), so a run killed from outside still says how far it got; a step past its time
limit is ``"timeout"``, named as such. ``--dry-run`` lists every step and checks what can be
checked without a GPU (files, tools, packages or wheels, the benchmark's options, that pytest
collects the GPU tests, that the limits fit the budget); CI runs it. To prepare the wheels on a
machine with network::

    python benchmarks/gpu_acceptance.py --download-wheels wheels/   # for Python 3.12, x86-64
    # carry wheels/ and this checkout to the GPU machine, then:
    bash benchmarks/gpu_acceptance.sh --wheels wheels/ --out acceptance-h200/
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime as _dt
import functools
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: The whole run, from the interpreter's start, ends within this many seconds (a GPU lease of
#: ~15 minutes also pays the machine's start and the transfers).
BUDGET_S = 420
#: Of the budget, kept back from the steps' limits: start-up, planning, killing a step that
#: overran and writing the summary.
MARGIN_S = 15
#: When this process started (the budget counts from here).
STARTED = time.monotonic()
#: Seconds a step gets to end after SIGTERM before its process group is killed.
KILL_GRACE_S = 3
#: Seconds ``nvidia-smi`` gets to answer (the environment step has 20 in all).
SMI_TIMEOUT_S = 10
#: Distributions the runs need beyond setup.py's install_requires.
EXTRA_REQUIREMENTS = ("pytest>=8", "nvtx>=0.2", "cuda-bindings>=12.6")
#: For --download-wheels: the GPU image's Python and platform.
WHEEL_PYTHON = "3.12"
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux2014_x86_64", "manylinux_2_17_x86_64")


@dataclass
class Step:
    """One step of the run.

    Attributes:
        name: Short name (also the log file's name).
        command: What runs (argv); empty for a step with nothing to run (skipped).
        timeout_s: Its share of :data:`BUDGET_S` (enforced: its process group is killed).
        needs_gpu: Only meaningful with a GPU (in a dry run: checked, not run).
        skip_reason: Why it will not run ("" if it will).
        checks: What the dry run verified, one line each.
        problems: What the dry run found wrong (any: the dry run fails).
    """

    name: str
    command: list[str]
    timeout_s: int
    needs_gpu: bool = True
    skip_reason: str = ""
    checks: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def requirement_name(requirement: str) -> str:
    """``"onnxruntime>=1.18; ..."`` -> ``"onnxruntime"``."""
    return re.split(r"[<>=!~;\[ ]", requirement.strip(), maxsplit=1)[0]


def requirements() -> list[str]:
    """setup.py's ``install_requires`` (read, not executed) and :data:`EXTRA_REQUIREMENTS`."""
    tree = ast.parse((REPO / "setup.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            return [*ast.literal_eval(node.value), *EXTRA_REQUIREMENTS]
    raise RuntimeError("setup.py has no install_requires")


def missing_distributions(wanted: list[str]) -> list[str]:
    """The requirements whose distribution is not installed (versions are not judged here:
    the image's torch and CUDA packages are what the run is about)."""
    missing = []
    for requirement in wanted:
        try:
            metadata.version(requirement_name(requirement))
        except metadata.PackageNotFoundError:
            missing.append(requirement)
    return missing


def wheel_for(requirement: str, wheels: Path | None) -> Path | None:
    """A wheel of ``requirement``'s distribution in ``wheels`` (names normalized as pip does)."""
    if wheels is None or not wheels.is_dir():
        return None
    name = re.sub(r"[-_.]+", "_", requirement_name(requirement)).lower()
    for wheel in sorted(wheels.glob("*.whl")):
        if re.sub(r"[-_.]+", "_", wheel.name.split("-")[0]).lower() == name:
            return wheel
    return None


def plan(out: Path, wheels: Path | None, python: str = sys.executable) -> list[Step]:
    """Every step of the run, in order; their limits add up to ``BUDGET_S - MARGIN_S``."""
    missing = missing_distributions(requirements())
    install = [python, "-m", "pip", "install", "--no-index", "--disable-pip-version-check"]
    if wheels is not None:
        install += ["--find-links", str(wheels)]
    bench = [python, str(REPO / "benchmarks" / "executor.py")]
    steps = [
        Step("environment", [python, str(Path(__file__).resolve()), "--environment",
                             "--out", str(out)], 20, needs_gpu=False),
        Step("install", install + missing if missing else [], 45, needs_gpu=False,
             skip_reason="" if missing else "every requirement is installed"),
        Step("pytest-gpu", [python, "-m", "pytest", "-m", "gpu", "tests/runtime", "-v", "-rs",
                            "-p", "no:cacheprovider", f"--junitxml={out / 'pytest-gpu.xml'}"],
             120),
        Step("benchmark", bench + ["--check", "--models", "multi_exit_vit_digits",
                                   "multi_exit_vit_small_patch16_224", "--batches", "1", "8",
                                   "--repeats", "200", "--warmup", "10",
                                   "--profile-repeats", "100", "--out", str(out)], 190),
    ]
    nsys = shutil.which("nsys")
    steps.append(Step(
        "nsys",
        [nsys or "nsys", "profile", "-t", "cuda,nvtx,osrt", "--cuda-graph-trace=node",
         "--force-overwrite=true", "-o", str(out / "executor-digits"), *bench,
         "--models", "multi_exit_vit_digits", "--batches", "1", "--repeats", "20",
         "--warmup", "5", "--profile-repeats", "20", "--out", str(out / "nsys-benchmark")],
        30, skip_reason="" if nsys else "nsys is not installed (Nsight Systems)"))
    return steps


def run_step(command: list[str], log: Path, timeout_s: float,
             env: dict[str, str]) -> tuple[int, float, bool]:
    """Runs ``command`` in a process group of its own, output to ``log``, for at most
    ``timeout_s``: then the group gets SIGTERM, and SIGKILL :data:`KILL_GRACE_S` later (a
    pytest or benchmark child is killed with its own children).

    Returns:
        ``(exit code, seconds, timed out)``; 127 if it could not start.
    """
    began = time.monotonic()
    with log.open("w", encoding="utf-8") as stream:
        stream.write("$ " + " ".join(command) + "\n")
        stream.flush()
        try:
            process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, cwd=REPO,
                                       env=env, start_new_session=True)
        except OSError as exc:
            stream.write(f"\n[gpu_acceptance] could not start: {exc}\n")
            return 127, time.monotonic() - began, False
        try:
            rc = process.wait(timeout=max(timeout_s, 1))
            return rc, time.monotonic() - began, False
        except subprocess.TimeoutExpired:
            _kill_group(process)
            stream.write(f"\n[gpu_acceptance] timed out after {timeout_s:.0f} s: killed\n")
            return 124, time.monotonic() - began, True


def _kill_group(process: subprocess.Popen) -> None:
    """SIGTERM to the process group, SIGKILL after :data:`KILL_GRACE_S` (and to what is left
    of the group either way)."""
    for sig, wait_s in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait_s)
            if sig == signal.SIGTERM:  # the leader ended: end its group's stragglers too
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
            break
        except subprocess.TimeoutExpired:
            continue


def environment(out: Path) -> dict:
    """What the machine is, and whether its driver fits the CUDA packages; writes
    ``environment.json``. Never raises: what could not be read is recorded as such."""
    info: dict = {"python": sys.version.split()[0], "executable": sys.executable,
                  "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            result = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total",
                                     "--format=csv,noheader"], capture_output=True, text=True,
                                    timeout=SMI_TIMEOUT_S)
            info["nvidia_smi"] = result.stdout.strip() or result.stderr.strip()
        except subprocess.TimeoutExpired:
            info["nvidia_smi"] = f"nvidia-smi did not answer within {SMI_TIMEOUT_S} s"
        except OSError as exc:
            info["nvidia_smi"] = f"nvidia-smi could not run: {exc}"
    info["tools"] = {t: shutil.which(t) for t in ("nvidia-smi", "nsys", "ncu")}
    try:
        info["packages"] = {requirement_name(r): _version(requirement_name(r))
                            for r in [*requirements(), "cupy-cuda13x", "timm",
                                      "nvidia-cuda-nvrtc", "cuda-pathfinder"]}
    except Exception as exc:  # noqa: BLE001 - the record says what went wrong
        info["packages"] = f"{type(exc).__name__}: {exc}"
    try:
        from trt_exit.runtime.cuda.api import cuda_status

        status = cuda_status()
        info["cuda"] = {"available": status.available, "reason": status.reason,
                        "driver": status.driver_version, "runtime": status.runtime_version}
        if status.available:
            from trt_exit.runtime.cuda.api import version_mismatch
            from trt_exit.runtime.cuda.module import nvrtc_library, nvrtc_version

            info["cuda"]["nvrtc"] = ".".join(map(str, nvrtc_version()))
            info["cuda"]["nvrtc_library"] = nvrtc_library()
            info["cuda"]["mismatch"] = version_mismatch(status.driver_version, 0,
                                                        nvrtc_version()[0])
    except Exception as exc:  # noqa: BLE001 - the record says what went wrong, the run goes on
        info["cuda"] = {"available": False, "reason": f"{type(exc).__name__}: {exc}"}
    try:
        (out / "environment.json").write_text(json.dumps(info, indent=2) + "\n",
                                              encoding="utf-8")
    except OSError as exc:
        info["written"] = f"environment.json could not be written: {exc}"
    return info


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def dry_run(steps: list[Step], out: Path, wheels: Path | None, python: str) -> None:
    """Fills each step's ``checks`` and ``problems`` without a GPU."""
    for step in steps:
        if step.name == "environment":
            probe = out / ".write-probe"
            try:
                probe.write_text("", encoding="utf-8")
                probe.unlink()
                step.checks.append(f"output folder {out} is writable")
            except OSError as exc:
                step.problems.append(f"output folder {out} is not writable: {exc}")
            for tool in ("nvidia-smi", "nsys", "ncu"):
                step.checks.append(f"{tool}: {shutil.which(tool) or 'not found'}")
        elif step.name == "install":
            for requirement in step.command[step.command.index("--disable-pip-version-check")
                                            + 1:] if step.command else []:
                if requirement.startswith("--") or requirement == str(wheels):
                    continue
                wheel = wheel_for(requirement, wheels)
                if wheel is None:
                    step.problems.append(f"{requirement} is not installed and no wheel of it is "
                                         f"in --wheels ({wheels}): carry one in "
                                         f"(--download-wheels)")
                else:
                    step.checks.append(f"{requirement}: {wheel.name}")
            if not step.command:
                step.checks.append(step.skip_reason)
        elif step.name == "pytest-gpu":
            result = _collect_gpu_tests(python)
            collected = re.search(r"(\d+)/\d+ tests collected|(\d+) tests? collected",
                                  result.stdout)
            count = next((int(g) for g in (collected.groups() if collected else ()) if g), 0)
            if result.returncode != 0 or count == 0:
                step.problems.append(f"pytest collects no GPU test (exit {result.returncode}): "
                                     f"{result.stdout[-500:]}{result.stderr[-500:]}")
            else:
                step.checks.append(f"pytest collects {count} GPU tests")
        elif step.name in ("benchmark", "nsys"):
            script = REPO / "benchmarks" / "executor.py"
            if not script.is_file():
                step.problems.append(f"{script} is missing")
                continue
            spec = importlib.util.spec_from_file_location("benchmark_executor", script)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            options = step.command[step.command.index(str(script)) + 1:]
            try:
                module.parse_args(options)
                step.checks.append("benchmarks/executor.py accepts " + " ".join(options))
            except SystemExit:
                step.problems.append(f"benchmarks/executor.py rejects {' '.join(options)}")
            models = module.parse_args(options).models if not step.problems else []
            unknown = [m for m in models if m not in module.MODELS]
            if unknown:
                step.problems.append(f"unknown models {unknown}")


@functools.lru_cache(maxsize=4)
def _collect_gpu_tests(python: str) -> subprocess.CompletedProcess:
    """``pytest --collect-only -m gpu tests/runtime`` (once per process: it imports torch)."""
    return subprocess.run([python, "-m", "pytest", "--collect-only", "-q", "-m", "gpu",
                           "tests/runtime", "-p", "no:cacheprovider"],
                          capture_output=True, text=True, cwd=REPO, env=_env(), timeout=300)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run(steps: list[Step], out: Path, summary: dict, budget_s: float = BUDGET_S,
        started: float = STARTED) -> list[dict]:
    """Runs the steps within ``budget_s`` of ``started`` (``MARGIN_S`` kept back), rewriting
    ``acceptance.json`` before and after each step; returns one record per step."""
    env = _env()
    deadline = started + budget_s - MARGIN_S
    records: list[dict] = []
    summary["steps"] = records
    for step in steps:
        record = {"name": step.name, "command": step.command, "status": "pending",
                  "timeout_s": step.timeout_s, "log": None, "rc": None, "seconds": 0.0}
        records.append(record)
        left = deadline - time.monotonic()
        if step.skip_reason or not step.command:
            record.update(status="skipped", reason=step.skip_reason or "nothing to run")
        elif left < 5:
            record.update(status="skipped",
                          reason=f"the time budget is spent ({budget_s:.0f} s in all)")
        else:
            limit = min(step.timeout_s, left)
            log = out / f"{step.name}.log"
            record.update(status="running", log=str(log), limit_s=round(limit, 1))
            write_summary(out, summary)
            rc, seconds, timed_out = run_step(step.command, log, limit, env)
            record.update(rc=rc, seconds=round(seconds, 1))
            if timed_out:
                cut = "its budget share" if limit >= step.timeout_s else "the run's time left"
                record.update(status="timeout",
                              reason=f"timed out after {limit:.0f} s ({cut}) and was killed")
            elif rc == 0:
                record["status"] = "ok"
            else:
                record.update(status="failed", reason=f"exit code {rc} (see {log.name})")
            _judge(step, record, out, log)
        print(f"[{record['status']:>7}] {step.name} ({record['seconds']} s)"
              + (f": {record.get('reason')}" if record.get("reason") else ""), flush=True)
        write_summary(out, summary)
    return records


def _judge(step: Step, record: dict, out: Path, log: Path) -> None:
    """What a finished step's own outputs add to its record."""
    if step.name == "environment":
        with contextlib.suppress(OSError, ValueError):
            record["cuda"] = json.loads(
                (out / "environment.json").read_text(encoding="utf-8")).get("cuda")
            record["environment"] = str(out / "environment.json")
        if record["status"] == "ok" and "environment" in record:
            log.unlink(missing_ok=True)  # environment.json holds everything it printed
            record["log"] = None
    elif step.name == "pytest-gpu":
        counts = junit_counts(out / "pytest-gpu.xml") or log_counts(log)
        record["tests"] = counts
        if record["status"] == "timeout":
            record["reason"] += (f"; {counts.get('passed', 0)} GPU tests passed and "
                                 f"{counts.get('failed', 0)} failed before that (see the log)")
        elif record["status"] == "ok" and counts.get("passed", 0) == 0:
            record.update(status="failed", reason="no GPU test passed (see the skips)")
    elif step.name == "benchmark":
        results = sorted(out.glob("executor-*.json"))
        record["results"] = [str(p) for p in results]
        if record["status"] == "timeout" and results:
            with contextlib.suppress(OSError, ValueError):
                done = json.loads(results[0].read_text(encoding="utf-8"))
                record["reason"] += ("; measured before that: " + ", ".join(
                    f"{m['model']} batch {b['batch']}"
                    for m in done.get("models", []) for b in m.get("batches", [])) or "nothing")


def log_counts(log: Path) -> dict[str, int]:
    """Passed / failed / skipped / error lines of a ``pytest -v`` log (for a run killed before
    it wrote its JUnit XML)."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    for line in text.splitlines():
        match = re.search(r"::\S+ (PASSED|FAILED|SKIPPED|ERROR)\b", line)
        if match:
            counts[match.group(1).lower()] += 1
    return counts


def write_summary(out: Path, summary: dict) -> None:
    """Writes ``acceptance.json`` atomically (a reader never sees half of it)."""
    summary["updated_s"] = round(time.monotonic() - STARTED, 1)
    temporary = out / ".acceptance.json.tmp"
    temporary.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, out / "acceptance.json")


def junit_counts(path: Path) -> dict[str, int]:
    """Tests, failures, errors, skipped and passed in a pytest JUnit XML file ({} if absent)."""
    import xml.etree.ElementTree as ElementTree

    if not path.is_file():
        return {}
    root = ElementTree.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def download_wheels(folder: Path) -> int:
    """Downloads wheels of every requirement (and their dependencies) for the GPU image's
    Python and platform into ``folder`` (run where there is network)."""
    folder.mkdir(parents=True, exist_ok=True)
    platforms = [a for p in WHEEL_PLATFORMS for a in ("--platform", p)]
    wanted = [r for r in requirements() if requirement_name(r) != "torch"]  # the image's torch
    command = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--dest",
               str(folder), "--python-version", WHEEL_PYTHON, *platforms, *wanted]
    print("$ " + " ".join(command), flush=True)
    return subprocess.run(command).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: acceptance-<UTC time>/ here)")
    parser.add_argument("--wheels", type=Path, default=None,
                        help="folder of wheels for what the machine lacks (no network is used)")
    parser.add_argument("--dry-run", action="store_true",
                        help="list and check every step without running them (no GPU needed)")
    parser.add_argument("--download-wheels", type=Path, metavar="FOLDER",
                        help="download the wheels to carry in, then exit (needs network)")
    parser.add_argument("--environment", action="store_true",
                        help="only record the environment into --out/environment.json (the "
                             "first step runs this)")
    args = parser.parse_args(argv)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # trt_exit runs from this checkout
    if args.download_wheels:
        return download_wheels(args.download_wheels)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = (args.out or Path(f"acceptance-{stamp}")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.environment:
        info = environment(out)
        print(json.dumps(info.get("cuda", {})))
        return 0
    steps = plan(out, args.wheels)
    summary: dict = {"created": stamp, "repo": str(REPO), "budget_s": BUDGET_S,
                     "margin_s": MARGIN_S, "dry_run": args.dry_run, "complete": False}
    if args.dry_run:
        dry_run(steps, out, args.wheels, sys.executable)
        for step in steps:
            state = "PROBLEM" if step.problems else ("skip" if step.skip_reason else "ok")
            print(f"[{state:>7}] {step.name} (timeout {step.timeout_s} s): "
                  f"{' '.join(step.command) or '(nothing to run)'}")
            for line in step.checks:
                print(f"           - {line}")
            for line in step.problems:
                print(f"           ! {line}")
        summary["steps"] = [asdict(s) for s in steps]
        summary["timeouts_s"] = sum(s.timeout_s for s in steps)
        over = budget_problem(steps)
        summary["problems"] = [over] if over else []
        if over:
            print(f"        ! {over}")
        summary["ok"] = not any(s.problems for s in steps) and not over
    else:
        run(steps, out, summary)
        summary["ok"] = all(r["status"] in ("ok", "skipped") for r in summary["steps"]) and \
            any(r["name"] == "benchmark" and r["status"] == "ok" for r in summary["steps"])
        summary["timed_out"] = [r["name"] for r in summary["steps"] if r["status"] == "timeout"]
    summary["complete"] = True
    write_summary(out, summary)
    print(f"{'dry run ' if args.dry_run else ''}{'ok' if summary['ok'] else 'FAILED'}; "
          f"wrote {out / 'acceptance.json'}")
    return 0 if summary["ok"] else 1


def budget_problem(steps: list[Step]) -> str:
    """Why the steps' limits do not fit the budget with its margin ("" if they do)."""
    total = sum(s.timeout_s for s in steps)
    if total + MARGIN_S > BUDGET_S:
        return (f"the steps' time limits add up to {total} s, more than the budget of "
                f"{BUDGET_S} s less its {MARGIN_S} s margin")
    return ""


if __name__ == "__main__":
    sys.exit(main())
