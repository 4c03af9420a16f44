"""The CUDA layer against both cuda-python generations users run it with: cuda-bindings 12.9
(what ``cuda-python>=12.6,<13`` installs, for JetPack 6 / CUDA 12.6 drivers; Dockerfile.jetson)
and 13.0 (JetPack 7 / CUDA 13). No GPU is needed: only attributes and signatures are read.

Every ``driver.X.Y``, ``runtime.X`` and ``nvrtc.X`` chain in the modules that use
``cuda.bindings`` is found with ``ast``; each must exist in both versions, and each direct call
must fit the callable's parameters there (positional count and keyword names). Calls whose
argument list differs between the versions go through ``compat.edge_data_call``, which passes the
function object rather than calling it, so they are checked by ``test_cuda_layer.py`` instead.

The wheels (~10 MB each) are installed with ``pip --no-deps --target`` into ``<repo>/.cuda_api``
(git-ignored, reused). Without network access set ``TRT_EXIT_CUDA_API_OFFLINE=1`` to skip.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "trt_exit"
CACHE = Path(os.environ.get("TRT_EXIT_CUDA_API_CACHE", REPO / ".cuda_api"))
INSPECT = Path(__file__).with_name("inspect_cuda_bindings.py")
ROOTS = ("driver", "runtime", "nvrtc")
#: Versions checked: the newest 12.x (JetPack 6) and the first 13.x (JetPack 7).
VERSIONS = ("12.9.10", "13.0.3")
PATHFINDER = "cuda-pathfinder==1.9.0"
#: A name that exists in neither version: the checker must report it.
MISSPELT = "driver.cuStreamBeginCaptur"
#: Fields of binding structs the layer reads or writes on instances (which ``ast`` cannot tie
#: to a type): struct -> attribute paths, each of which must appear in the layer's source.
STRUCT_FIELDS = {
    "driver.CUgraphNodeParams": ["type", "conditional.handle", "conditional.type",
                                 "conditional.size", "conditional.ctx", "conditional.phGraph_out"],
    "runtime.cudaDeviceProp": ["name", "major", "minor", "totalGlobalMem", "integrated"],
    "runtime.cudaPointerAttributes": ["type", "device"],
}


@dataclass(frozen=True)
class Use:
    where: str
    chain: str
    call: tuple[int, tuple[str, ...], bool] | None  # positional count, keywords, *args/**kwargs


def binding_modules() -> list[Path]:
    """The modules that get the bindings (``bindings()`` or ``from cuda.bindings import``)."""
    return sorted(p for p in PACKAGE.rglob("*.py")
                  if "bindings()" in (text := p.read_text()) or "from cuda.bindings import" in text)


def _chain(node: ast.Attribute) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id in ROOTS:
        return ".".join([node.id, *reversed(parts)])
    return None


def uses() -> list[Use]:
    found = []
    for path in binding_modules():
        tree = ast.parse(path.read_text(), str(path))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or isinstance(parents.get(node), ast.Attribute):
                continue
            chain = _chain(node)
            if chain is None:
                continue
            parent = parents.get(node)
            call = None
            if isinstance(parent, ast.Call) and parent.func is node:
                starred = any(isinstance(a, ast.Starred) for a in parent.args) or any(
                    k.arg is None for k in parent.keywords)
                call = (sum(not isinstance(a, ast.Starred) for a in parent.args),
                        tuple(k.arg for k in parent.keywords if k.arg), starred)
            found.append(Use(f"{path.relative_to(REPO)}:{node.lineno}", chain, call))
    return found


def _give_up(message: str) -> None:
    if os.environ.get("TRT_EXIT_CUDA_API_OFFLINE"):
        pytest.skip(f"TRT_EXIT_CUDA_API_OFFLINE is set: {message}")
    pytest.fail(f"{message}\n(set TRT_EXIT_CUDA_API_OFFLINE=1 to skip these checks on a machine "
                f"without network access)", pytrace=False)


def _install(version: str) -> Path:
    site = CACHE / version / "site"
    if (site / "cuda" / "bindings" / "driver.pxd").is_file():
        return site
    site.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".site-", dir=site.parent))
    try:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
             "--disable-pip-version-check", "--no-compile", "--target", str(staging),
             f"cuda-bindings=={version}", PATHFINDER],
            capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            _give_up(f"pip install cuda-bindings=={version} failed:\n{result.stderr[-3000:]}")
        shutil.rmtree(site, ignore_errors=True)
        os.replace(staging, site)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return site


@pytest.fixture(scope="module")
def used() -> list[Use]:
    return uses()


@pytest.fixture(scope="module", params=VERSIONS)
def bindings(request, used) -> dict:
    site = _install(request.param)
    chains = sorted({u.chain for u in used} | {MISSPELT})
    # -S: only the wheel under test (and the standard library) is importable.
    result = subprocess.run([sys.executable, "-S", str(INSPECT), str(site), json.dumps(chains),
                             json.dumps(STRUCT_FIELDS)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["version"] == request.param
    return report


def test_the_scan_finds_the_layers_calls(used):
    chains = {u.chain for u in used}
    # A few that every strategy needs; if these vanish the scan is broken, not the code.
    for expected in ("driver.cuLaunchKernel", "runtime.cudaMemcpyAsync",
                     "driver.cuGraphConditionalHandleCreate", "nvrtc.nvrtcCompileProgram"):
        assert expected in chains
    assert len(chains) > 50


def test_every_name_exists(bindings, used):
    found = bindings["found"]
    missing = [f"{u.where}: {u.chain}" for u in used if found[u.chain] is None]
    assert not missing, f"not in cuda-bindings {bindings['version']}:\n" + "\n".join(missing)


def test_every_direct_call_fits_the_signature(bindings, used):
    found = bindings["found"]
    wrong = []
    for u in used:
        params = found[u.chain]
        if u.call is None or not isinstance(params, list) or not params:
            continue  # not called here, a class, or a signature Cython does not expose
        positional, keywords, starred = u.call
        if not starred and positional > len(params):
            wrong.append(f"{u.where}: {u.chain} called with {positional} arguments, takes {params}")
        for keyword in keywords:
            if keyword not in params:
                wrong.append(f"{u.where}: {u.chain} has no parameter {keyword!r} ({params})")
    assert not wrong, f"cuda-bindings {bindings['version']}:\n" + "\n".join(wrong)


def test_the_checker_reports_a_misspelt_name(bindings):
    assert bindings["found"][MISSPELT] is None


def test_declared_struct_fields_are_the_ones_the_layer_uses():
    source = "\n".join(p.read_text() for p in binding_modules())
    for struct, paths in STRUCT_FIELDS.items():
        for path in paths:
            assert f".{path}" in source, f"{struct}.{path} is declared but not used"


def test_struct_fields_exist(bindings):
    missing = [f"{struct}.{path}" for struct, paths in bindings["struct_paths"].items()
               for path, present in paths.items() if not present]
    assert not missing, f"not in cuda-bindings {bindings['version']}: {missing}"


def test_the_conditional_node_parameters_can_be_filled_in(bindings):
    assert bindings["conditional_params"] is None, bindings["conditional_params"]
