"""One prepared GPU acceptance run of the CUDA path, for a fresh machine with no network.

Written for an H100/H200 image with Python 3.12, PyTorch on CUDA 13 (driver 580), cuda-bindings,
CuPy, NVRTC, onnx, onnxruntime, timm and Nsight Compute (no nsys, no TensorRT). In about 8
minutes at most it:

1. ``environment``: records the GPU, driver, Python and packages (``nvidia-smi``, ``pip freeze``)
   and checks the driver against cuda-bindings and NVRTC (the CUDA layer's own check);
2. ``install``: installs what the machine lacks of trt_exit's requirements (setup.py's
   ``install_requires``, pytest, nvtx) from a folder of wheels carried in (``--wheels``),
   never from the network; trt_exit itself runs from this checkout (``PYTHONPATH``);
3. ``pytest-gpu``: ``pytest -m gpu tests/runtime``;
4. ``benchmark``: ``benchmarks/executor.py --check`` for both models at batch 1 and 8;
5. ``nsys``: an Nsight Systems capture of a short benchmark run, if ``nsys`` exists.

Logs, the benchmark's JSON and ``acceptance.json`` (every step: command, status, exit code,
seconds, log) go into one folder (``--out``). ``--dry-run`` lists every step and checks what can
be checked without a GPU (files, tools, packages or wheels, the benchmark's options, that
pytest collects the GPU tests); CI runs it. To prepare the wheels on a machine with network::

    python benchmarks/gpu_acceptance.py --download-wheels wheels/   # for Python 3.12, x86-64
    # carry wheels/ and this checkout to the GPU machine, then:
    bash benchmarks/gpu_acceptance.sh --wheels wheels/ --out acceptance-h200/
"""

from __future__ import annotations

import argparse
import ast
import datetime as _dt
import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: The whole run must end within this many seconds (the GPU machine's lease).
BUDGET_S = 480
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
        command: What runs (argv), empty for a step done in this process.
        timeout_s: Its share of :data:`BUDGET_S`.
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
    """Every step of the run, in order."""
    missing = missing_distributions(requirements())
    install = [python, "-m", "pip", "install", "--no-index", "--disable-pip-version-check"]
    if wheels is not None:
        install += ["--find-links", str(wheels)]
    bench = [python, str(REPO / "benchmarks" / "executor.py")]
    steps = [
        Step("environment", [], 30, needs_gpu=False),
        Step("install", install + missing if missing else [], 60, needs_gpu=False,
             skip_reason="" if missing else "every requirement is installed"),
        Step("pytest-gpu", [python, "-m", "pytest", "-m", "gpu", "tests/runtime", "-rs",
                            "-p", "no:cacheprovider", f"--junitxml={out / 'pytest-gpu.xml'}"],
             120),
        Step("benchmark", bench + ["--check", "--models", "multi_exit_vit_digits",
                                   "multi_exit_vit_small_patch16_224", "--batches", "1", "8",
                                   "--repeats", "200", "--warmup", "10",
                                   "--profile-repeats", "100", "--out", str(out)], 210),
    ]
    nsys = shutil.which("nsys")
    steps.append(Step(
        "nsys",
        [nsys or "nsys", "profile", "-t", "cuda,nvtx,osrt", "--cuda-graph-trace=node",
         "--force-overwrite=true", "-o", str(out / "executor-digits"), *bench,
         "--models", "multi_exit_vit_digits", "--batches", "1", "--repeats", "20",
         "--warmup", "5", "--profile-repeats", "20", "--out", str(out / "nsys-benchmark")],
        60, skip_reason="" if nsys else "nsys is not installed (Nsight Systems)"))
    return steps


def _run(command: list[str], log: Path, timeout_s: float, env: dict[str, str]) -> tuple[int, float]:
    began = time.monotonic()
    with log.open("w", encoding="utf-8") as stream:
        stream.write("$ " + " ".join(command) + "\n")
        stream.flush()
        try:
            rc = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, cwd=REPO,
                                env=env, timeout=max(timeout_s, 1)).returncode
        except subprocess.TimeoutExpired:
            stream.write(f"\n[gpu_acceptance] timed out after {timeout_s:.0f} s\n")
            rc = 124
        except OSError as exc:
            stream.write(f"\n[gpu_acceptance] could not start: {exc}\n")
            rc = 127
    return rc, time.monotonic() - began


def environment(out: Path) -> dict:
    """What the machine is, and whether its driver fits the CUDA packages (never raises)."""
    info: dict = {"python": sys.version.split()[0], "executable": sys.executable,
                  "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    smi = shutil.which("nvidia-smi")
    if smi:
        result = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total",
                                 "--format=csv,noheader"], capture_output=True, text=True,
                                timeout=20)
        info["nvidia_smi"] = result.stdout.strip() or result.stderr.strip()
    info["tools"] = {t: shutil.which(t) for t in ("nvidia-smi", "nsys", "ncu")}
    info["packages"] = {requirement_name(r): _version(requirement_name(r))
                        for r in [*requirements(), "cupy-cuda13x", "timm", "nvidia-cuda-nvrtc"]}
    try:
        from trt_exit.runtime.cuda.api import cuda_status

        status = cuda_status()
        info["cuda"] = {"available": status.available, "reason": status.reason,
                        "driver": status.driver_version, "runtime": status.runtime_version}
        if status.available:
            from trt_exit.runtime.cuda.api import version_mismatch
            from trt_exit.runtime.cuda.module import nvrtc_version

            info["cuda"]["nvrtc"] = ".".join(map(str, nvrtc_version()))
            info["cuda"]["mismatch"] = version_mismatch(status.driver_version, 0,
                                                        nvrtc_version()[0])
    except Exception as exc:  # noqa: BLE001 - the record says what went wrong, the run goes on
        info["cuda"] = {"available": False, "reason": f"{type(exc).__name__}: {exc}"}
    (out / "environment.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
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
            step.checks.append(f"output folder {out} is writable")
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


def run(steps: list[Step], out: Path) -> list[dict]:
    """Runs the steps within :data:`BUDGET_S`; returns one record per step."""
    env = _env()
    deadline = time.monotonic() + BUDGET_S
    records = []
    for step in steps:
        record = {"name": step.name, "command": step.command, "log": None, "rc": None,
                  "seconds": 0.0}
        left = deadline - time.monotonic()
        if step.skip_reason:
            record.update(status="skipped", reason=step.skip_reason)
        elif left < 5:
            record.update(status="skipped", reason="the time budget is spent")
        elif step.name == "environment":
            began = time.monotonic()
            info = environment(out)
            record.update(status="ok", log=str(out / "environment.json"),
                          seconds=round(time.monotonic() - began, 1),
                          cuda=info.get("cuda"))
        else:
            log = out / f"{step.name}.log"
            rc, seconds = _run(step.command, log, min(step.timeout_s, left), env)
            record.update(status="ok" if rc == 0 else "failed", rc=rc, log=str(log),
                          seconds=round(seconds, 1))
            if step.name == "pytest-gpu":
                record["tests"] = junit_counts(out / "pytest-gpu.xml")
                if record["tests"].get("passed", 0) == 0:  # all skipped: no GPU was used
                    record.update(status="failed", reason="no GPU test passed (see the skips)")
        print(f"[{record['status']:>7}] {step.name} ({record['seconds']} s)"
              + (f": {record.get('reason')}" if record.get("reason") else ""), flush=True)
        records.append(record)
    return records


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
    args = parser.parse_args(argv)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # trt_exit runs from this checkout
    if args.download_wheels:
        return download_wheels(args.download_wheels)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = (args.out or Path(f"acceptance-{stamp}")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    steps = plan(out, args.wheels)
    summary: dict = {"created": stamp, "repo": str(REPO), "budget_s": BUDGET_S,
                     "dry_run": args.dry_run}
    if args.dry_run:
        dry_run(steps, out, args.wheels, sys.executable)
        for step in steps:
            state = "PROBLEM" if step.problems else ("skip" if step.skip_reason else "ok")
            print(f"[{state:>7}] {step.name} (timeout {step.timeout_s} s): "
                  f"{' '.join(step.command) or '(in process)'}")
            for line in step.checks:
                print(f"           - {line}")
            for line in step.problems:
                print(f"           ! {line}")
        summary["steps"] = [asdict(s) for s in steps]
        summary["ok"] = not any(s.problems for s in steps)
        summary["timeouts_s"] = sum(s.timeout_s for s in steps)
    else:
        summary["steps"] = run(steps, out)
        summary["ok"] = all(r["status"] in ("ok", "skipped") for r in summary["steps"]) and \
            any(r["name"] == "benchmark" and r["status"] == "ok" for r in summary["steps"])
    (out / "acceptance.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"{'dry run ' if args.dry_run else ''}{'ok' if summary['ok'] else 'FAILED'}; "
          f"wrote {out / 'acceptance.json'}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
