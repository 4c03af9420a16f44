"""The package's import structure: no import cycles, and every module imports on its own.

* The import graph is read from the source (``ast``), counting every ``import`` of a
  ``trt_exit`` module, at module level or inside a function: a cycle through a lazy import is
  still two modules that each need the other.
* Every module is imported alone in a fresh interpreter in which no ``trt_exit`` module has been
  imported yet. To keep this fast, one helper process imports the heavy third-party libraries
  (torch, numpy, ...) once and forks a child per module; the children start with those already
  loaded, which cannot change whether a ``trt_exit`` module's own imports succeed. A module
  that only a host process can run may be listed in ``HOST_ONLY`` with the one module only that
  host provides; none is listed: Triton's Python-backend model imports the stub's
  ``triton_python_backend_utils`` when Triton calls it, so it too imports alone.
* Optional dependencies (TensorRT, CUDA bindings, PyTriton, sounddevice, OpenCV) are not
  imported by importing any module: they load lazily, where they are used.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "trt_exit"

#: Optional dependencies that no module may import at import time.
OPTIONAL = ("tensorrt", "cuda", "pycuda", "pytriton", "tritonclient", "sounddevice", "cv2", "gi")

#: Modules that only load inside a host process, with the module only that host provides: a
#: missing host module is accepted for them (any other failure is not).
HOST_ONLY: dict[str, str] = {}

#: Third-party libraries the helper imports before forking (when installed).
PRELOAD = ("numpy", "torch", "torch.nn.functional", "onnx", "onnxruntime", "scipy", "sklearn",
           "timm", "PIL.Image", "safetensors.torch", "tqdm.auto", "filelock", "matplotlib")


def module_files() -> dict[str, Path]:
    """Every module of the package by dotted name (packages by their ``__init__``)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its source.

    ``from pkg import sub`` counts as an import of ``pkg.sub`` when that is a module, else of
    ``pkg``; a package's ``__init__`` running before its submodules is not an edge (else every
    package that imports its own submodules would be a cycle).
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                found.add(sub if sub in modules else source)
    return {m for m in found if m in modules and m != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path = [start]
        stack = [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            step = next(stack[-1], None)
            if step is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(step) == 1:
                return path[path.index(step):] + [step]
            elif not state.get(step):
                state[step] = 1
                path.append(step)
                stack.append(iter(sorted(graph[step])))
    return None


def test_find_cycle_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_import_graph_edges_are_read_from_source(tmp_path):
    modules = {"p": tmp_path / "__init__.py", "p.a": tmp_path / "a.py", "p.b": tmp_path / "b.py"}
    modules["p.a"].write_text("from p import b\ndef f():\n    from . import b as again\n"
                              "    import p.b\nfrom p import something\n")
    assert imported_modules("p.a", modules["p.a"], modules) == {"p.b", "p"}


def test_package_has_no_import_cycle():
    modules = module_files()
    graph = {name: imported_modules(name, path, modules) for name, path in modules.items()}
    assert sum(map(len, graph.values())) > 100  # the graph was really read
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


_IMPORT_EACH = r"""
import importlib, json, os, sys, traceback
modules, preload, optional, host_only = json.loads(sys.argv[1])
for name in preload:
    try:
        importlib.import_module(name)
    except Exception:
        pass
assert not [m for m in sys.modules if m.split(".")[0] == "trt_exit"]
# Optional packages a third-party library loaded itself (torch may load cuda-python) are not ours.
optional = set(optional) - {m.split(".")[0] for m in sys.modules}
failures = {}
running = {}
def reap():
    pid, status = os.wait()
    name, read = running.pop(pid)
    message = os.read(read, 1 << 16).decode(errors="replace")
    os.close(read)
    if status:
        failures[name] = message or f"exit status {status}"
for name in modules:
    if len(running) >= 4:
        reap()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        code = 0
        try:
            importlib.import_module(name)
            loaded = sorted({m.split(".")[0] for m in sys.modules} & optional)
            if loaded:
                os.write(write, f"imports optional {loaded} at import time".encode())
                code = 1
        except ModuleNotFoundError as exc:
            if exc.name != host_only.get(name):
                os.write(write, traceback.format_exc()[-4000:].encode())
                code = 1
        except BaseException:
            os.write(write, traceback.format_exc()[-4000:].encode())
            code = 1
        os._exit(code)
    os.close(write)
    running[pid] = (name, read)
while running:
    reap()
print(json.dumps(failures))
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork (POSIX)")
def test_every_module_imports_alone_in_a_fresh_interpreter():
    names = sorted(module_files())
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH, json.dumps([names, PRELOAD, OPTIONAL, HOST_ONLY])],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    failures = json.loads(done.stdout.strip().splitlines()[-1])
    assert not failures, "\n\n".join(f"{name}:\n{text}" for name, text in failures.items())
