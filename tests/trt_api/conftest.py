"""Provisions the real TensorRT 10.3 and 11.4 Python bindings for the API conformance tests.

TensorRT's native libraries cannot be installed here (their packages download from a host CI
cannot reach), but the bindings wheels install from PyPI and import once their ten native entry
points exist. For each version this fixture, once per cache directory:

1. ``pip install --no-deps --target`` the bindings wheel (~1.2 MB) into
   ``<repo>/.trt_api/<wheel>/site`` (git-ignored; reused by later runs);
2. compiles ``stub_tensorrt.c`` with gcc into ``libnvinfer.so.N``, ``libnvinfer_plugin.so.N`` and
   ``libnvonnxparser.so.N``;
3. runs ``inspect_bindings.py`` in a subprocess (both versions import as ``tensorrt_bindings``,
   and ``LD_LIBRARY_PATH`` must be set before the process starts) and returns its JSON.

If the wheels cannot be installed the tests **fail** with pip's output: CI has PyPI, so a failure
there means something real changed (a yanked wheel, a broken index), and a silently skipped
conformance check would let a misspelt TensorRT name through. To work offline, run once online
(the cache is reused), run ``pytest -m "not trt_api"``, or set ``TRT_EXIT_TRT_API_OFFLINE=1``
to turn the failure into a skip with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CACHE = Path(os.environ.get("TRT_EXIT_TRT_API_CACHE", REPO / ".trt_api"))

#: TensorRT versions the project supports on Jetson, and their bindings wheels (cp311).
VERSIONS = {
    "10.3": {"package": "tensorrt-cu12-bindings", "version": "10.3.0", "soname": "10"},
    "11.4": {"package": "tensorrt-cu13-bindings", "version": "11.4.0.106", "soname": "11"},
}
LIBRARIES = ("libnvinfer", "libnvinfer_plugin", "libnvonnxparser")


def _give_up(message: str) -> None:
    if os.environ.get("TRT_EXIT_TRT_API_OFFLINE"):
        pytest.skip(f"TRT_EXIT_TRT_API_OFFLINE is set: {message}")
    pytest.fail(f"{message}\n(set TRT_EXIT_TRT_API_OFFLINE=1 to skip the TensorRT API checks "
                f"on a machine without network access)", pytrace=False)


def _run(command: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, **kwargs)
    except (OSError, subprocess.TimeoutExpired) as exc:
        _give_up(f"{what} could not run: {exc}")
    if result.returncode != 0:
        _give_up(f"{what} failed (exit {result.returncode}):\n{result.stdout[-2000:]}"
                 f"\n{result.stderr[-3000:]}")
    return result


def _install(spec: dict[str, str], home: Path) -> Path:
    site = home / "site"
    if (site / "tensorrt_bindings" / "tensorrt.so").is_file():
        return site
    home.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".site-", dir=home))
    try:
        _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
              "--disable-pip-version-check", "--no-compile", "--target", str(staging),
              f"{spec['package']}=={spec['version']}"],
             f"pip install {spec['package']}=={spec['version']}")
        if not (staging / "tensorrt_bindings" / "tensorrt.so").is_file():
            _give_up(f"{spec['package']}=={spec['version']} installed without "
                     f"tensorrt_bindings/tensorrt.so")
        shutil.rmtree(site, ignore_errors=True)
        os.replace(staging, site)  # another run may have raced us: both are complete
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return site


def _stubs(spec: dict[str, str], home: Path) -> Path:
    lib = home / "lib"
    wanted = [lib / f"{name}.so.{spec['soname']}" for name in LIBRARIES]
    source = HERE / "stub_tensorrt.c"
    if all(p.is_file() and p.stat().st_mtime >= source.stat().st_mtime for p in wanted):
        return lib
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        _give_up("no C compiler (gcc) to build the TensorRT stub libraries")
    lib.mkdir(parents=True, exist_ok=True)
    for target in wanted:
        tmp = target.with_name(f".{target.name}.tmp")
        _run([compiler, "-shared", "-fPIC", "-O0", "-o", str(tmp), str(source)],
             f"compiling {target.name}")
        os.replace(tmp, target)
    return lib


@pytest.fixture(scope="session", params=sorted(VERSIONS), ids=lambda v: f"trt{v}")
def trt_bindings_api(request) -> dict:
    """The API of one TensorRT version's real Python bindings, as ``inspect_bindings.py``
    describes it (``{"version", "members": {owner: {name: description}}}``)."""
    spec = VERSIONS[request.param]
    home = CACHE / f"{spec['package']}-{spec['version']}"
    site = _install(spec, home)
    lib = _stubs(spec, home)
    out = home / "api.json"
    env = dict(os.environ, PYTHONPATH=str(site),
               LD_LIBRARY_PATH=os.pathsep.join(filter(None, [str(lib),
                                                             os.environ.get("LD_LIBRARY_PATH")])))
    _run([sys.executable, str(HERE / "inspect_bindings.py"), str(out)],
         f"importing TensorRT {spec['version']} bindings over the stubs", env=env, cwd=str(home))
    api = json.loads(out.read_text(encoding="utf-8"))
    if not api["version"].startswith(request.param):
        pytest.fail(f"expected TensorRT {request.param}, the wheel says {api['version']}")
    return api
