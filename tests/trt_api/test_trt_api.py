"""TensorRT API conformance: every TensorRT name the code uses exists in 10.3 and 11.4, with a
signature that accepts how the code calls it, and the code uses no undeclared TensorRT name.

The used names are derived from the source (``ast``) of the modules in
``trt_api.TENSORRT_MODULES``: ``trt.X.Y`` chains (the module is always bound to ``trt``), and
every ``obj.attr`` read, write and call. Each attribute must be one of

* declared in ``trt_api.USED_API`` (then checked against both versions: exists, is a method
  where it is called, a settable property where it is assigned, not a method where it is read);
* a known non-TensorRT name: defined somewhere in trt_exit, or an attribute of the builtins,
  numpy, pathlib, logging, datetime, tqdm, ...; and then not a TensorRT-only name.

Anything else is a misspelling (or an undeclared TensorRT API) and fails.
"""

from __future__ import annotations

import ast
import builtins
import collections
import contextlib
import dataclasses
import datetime
import functools
import hashlib
import itertools
import json
import logging
import math
import os
import pathlib
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from trt_exit.build import trt_api

pytestmark = pytest.mark.trt_api

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "trt_exit"
#: CUDA runtime/driver names (cudaMemcpyAsync, cuInit) are the CUDA layer's to check.
CUDA_NAME = re.compile(r"^(cuda|cu)[A-Z]")


@dataclass(frozen=True)
class Use:
    """One use of an attribute in a TensorRT module.

    Attributes:
        where: ``file:line``.
        chain: For ``trt.A.B``: ``("A", "B")``; None for an attribute of another object.
        attr: The attribute name (last element of the chain).
        call: ``(positional count, keyword names, has *args/**kwargs)`` if it is called.
        store: It is assigned to.
    """

    where: str
    chain: tuple[str, ...] | None
    attr: str
    call: tuple[int, tuple[str, ...], bool] | None
    store: bool


def _dotted(node: ast.AST) -> list[str] | None:
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return [node.id, *reversed(names)]
    return None


def tensorrt_uses(path: Path, root: Path = REPO) -> list[Use]:
    """Every attribute use in ``path`` (outermost ``trt.`` chains; other attributes one by one,
    except ``self.x``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    uses = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        parent = parents.get(node)
        dotted = _dotted(node)
        in_trt_chain = dotted is not None and dotted[0] == "trt"
        if in_trt_chain and isinstance(parent, ast.Attribute):
            continue  # the outermost attribute of the chain records it
        if not in_trt_chain and isinstance(node.value, ast.Name) and node.value.id == "self":
            continue
        if isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Name) and \
                node.value.func.id == "super":
            continue  # our own base classes
        call = None
        if isinstance(parent, ast.Call) and parent.func is node:
            starred = any(isinstance(a, ast.Starred) for a in parent.args) or \
                any(k.arg is None for k in parent.keywords)
            call = (len(parent.args), tuple(k.arg for k in parent.keywords if k.arg), starred)
        where = f"{path.relative_to(root)}:{node.lineno}"
        uses.append(Use(where, tuple(dotted[1:]) if in_trt_chain else None, node.attr, call,
                        isinstance(node.ctx, ast.Store)))
    return uses


@dataclass(frozen=True)
class Override:
    """A method of our subclass of a TensorRT class (``class L(trt.ILogger): def log(...)``)."""

    where: str
    base: str
    name: str
    positional: int  # parameters after self


def tensorrt_overrides(path: Path, root: Path = REPO) -> list[Override]:
    """Methods defined in subclasses of ``trt.X`` in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef):
            continue
        for base in node.bases:
            dotted = _dotted(base)
            if not dotted or dotted[0] != "trt":
                continue
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name != "__init__":
                    found.append(Override(f"{path.relative_to(root)}:{item.lineno}",
                                          ".".join(dotted[1:]), item.name,
                                          len(item.args.args) - 1))
    return found


def override_problems(api: dict, overrides: list[Override]) -> list[str]:
    """Our overrides must override a declared TensorRT method taking as many arguments."""
    problems = []
    for override in overrides:
        if override.name.startswith("_") or override.name not in trt_api.USED_API.get(override.base, ()):
            continue  # our own helper method, not an override
        member = api["members"].get(override.base, {}).get(override.name)
        if member is None or member["kind"] != "method":
            problems.append(f"{override.where}: {override.base}.{override.name} is not a method "
                            f"of TensorRT {api['version']}")
            continue
        counts = {len(sig) - 1 for sig in member.get("signatures") or []}
        if override.positional not in counts:
            problems.append(f"{override.where}: {override.base}.{override.name} takes "
                            f"{sorted(counts)} arguments in TensorRT {api['version']}, the "
                            f"override {override.positional}")
    return problems


def _defined_names() -> set[str]:
    """Every name trt_exit defines: functions, classes, attributes, fields, keywords."""
    names: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
            elif isinstance(node, ast.Assign):
                names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def known_names() -> set[str]:
    """Attribute names that are not TensorRT's: trt_exit's own and common libraries'."""
    import tqdm

    owners = [str, bytes, bytearray, list, dict, set, tuple, int, float, object, memoryview,
              Exception, np, np.ndarray, np.dtype, np.generic, np.random.Generator,
              np.lib.npyio.NpzFile, pathlib.Path, os, os.path, os.stat_result, time, json, logging,
              logging.Logger, dataclasses, datetime, datetime.datetime, datetime.timezone, re,
              re.Match, tqdm.tqdm, type, builtins, shutil, tempfile, contextlib, hashlib, math,
              itertools, functools, collections]
    names = {name for owner in owners for name in dir(owner)}
    return names | _defined_names()


def _tensorrt_attributes(api: dict) -> set[str]:
    return {name for members in api["members"].values() for name in members}


def _call_fits(signatures, call: tuple[int, tuple[str, ...], bool], bound: bool) -> bool:
    """Whether one overload accepts ``call`` (``bound``: ``self`` is already supplied)."""
    if signatures is None:
        return False
    positional, keywords, starred = call
    for overload in signatures:
        params = overload[1:] if bound and overload and overload[0][0] == "self" else overload
        names = [p[0] for p in params]
        if starred and positional <= len(params):
            return True
        if positional > len(params) or any(k not in names[positional:] for k in keywords):
            continue
        if all(i < positional or name in keywords or has_default
               for i, (name, has_default) in enumerate(params)):
            return True
    return False


def _check_member(api: dict, owner: str, use: Use, bound: bool) -> str | None:
    """None if ``owner.attr`` exists in ``api`` and suits ``use``, else the problem."""
    member = api["members"].get(owner, {}).get(use.attr)
    version = api["version"]
    if member is None:
        return f"{owner}.{use.attr} does not exist in TensorRT {version}"
    kind = member["kind"]
    if use.store and not (kind == "property" and member.get("settable")):
        return f"{owner}.{use.attr} is not a settable property in TensorRT {version} ({kind})"
    if use.call is not None:
        if kind == "property":
            return f"{owner}.{use.attr} is a property in TensorRT {version}, not a method"
        if kind == "value":
            return f"{owner}.{use.attr} is a value in TensorRT {version}, not callable"
        if not _call_fits(member.get("signatures"), use.call, bound):
            return (f"{owner}.{use.attr}{use.call[:2]} matches no signature of TensorRT "
                    f"{version}: {member.get('signatures')}")
    elif kind == "method" and not use.store:
        return f"{owner}.{use.attr} is a method in TensorRT {version} but is read, not called"
    return None


def _owners(attr: str) -> list[str]:
    return [owner for owner, members in trt_api.USED_API.items() if attr in members]


def _all_uses() -> list[Use]:
    return [use for module in trt_api.TENSORRT_MODULES for use in tensorrt_uses(REPO / module)]


def conformance_problems(api: dict, uses: list[Use]) -> list[str]:
    """Every problem of ``uses`` (see :func:`tensorrt_uses`) against one version's API."""
    problems = []
    known = known_names()
    tensorrt_names = _tensorrt_attributes(api)
    for use in uses:
        if use.chain is not None:
            owner = "tensorrt"
            for depth, name in enumerate(use.chain):
                if name not in trt_api.USED_API.get(owner, ()):
                    problems.append(f"{use.where}: trt.{'.'.join(use.chain[:depth + 1])} is not "
                                    f"declared in trt_api.USED_API[{owner!r}]")
                    break
                last = depth == len(use.chain) - 1
                step = Use(use.where, use.chain, name, use.call if last else None,
                           use.store and last)
                member = api["members"].get(owner, {}).get(name)
                if last and member is not None and member["kind"] == "class" and step.call:
                    if not _call_fits(member.get("signatures"), step.call, bound=True):
                        problems.append(f"{use.where}: trt.{'.'.join(use.chain)}{step.call[:2]} "
                                        f"matches no constructor of TensorRT {api['version']}")
                    break
                problem = _check_member(api, owner, step, bound=False)
                if problem:
                    problems.append(f"{use.where}: {problem}")
                    break
                owner = name if owner == "tensorrt" else f"{owner}.{name}"
            continue
        if CUDA_NAME.match(use.attr):
            continue
        owners = _owners(use.attr)
        if owners:
            results = [_check_member(api, owner, use, bound=True) for owner in owners]
            if all(results):
                problems.append(f"{use.where}: " + "; ".join(results))
        elif use.attr in tensorrt_names and use.attr not in known:
            problems.append(f"{use.where}: {use.attr} is a TensorRT API not declared in "
                            f"trt_api.USED_API")
        elif use.attr not in known:
            problems.append(f"{use.where}: {use.attr!r} is neither a TensorRT {api['version']} "
                            f"name nor a known Python/numpy/trt_exit name: misspelt?")
    return problems


# --------------------------------------------------------------------------- tests


def _all_overrides() -> list[Override]:
    return [o for module in trt_api.TENSORRT_MODULES for o in tensorrt_overrides(REPO / module)]


def test_code_uses_only_tensorrt_names_that_exist(trt_bindings_api):
    problems = conformance_problems(trt_bindings_api, _all_uses())
    problems += override_problems(trt_bindings_api, _all_overrides())
    assert not problems, "\n".join(problems)


def test_every_declared_name_exists(trt_bindings_api):
    members = trt_bindings_api["members"]
    missing = [f"{owner}.{name}" for owner, names in trt_api.USED_API.items()
               for name in names if name not in members.get(owner, {})]
    assert not missing, f"missing in TensorRT {trt_bindings_api['version']}: {missing}"


def test_every_declared_name_is_used():
    used = set()
    for use in _all_uses():
        if use.chain is not None:
            owner = "tensorrt"
            for name in use.chain:
                used.add((owner, name))
                owner = name if owner == "tensorrt" else f"{owner}.{name}"
        else:
            used.update((owner, use.attr) for owner in _owners(use.attr))
    used.update((o.base, o.name) for o in _all_overrides())
    declared = {(owner, name) for owner, names in trt_api.USED_API.items() for name in names}
    assert not declared - used, f"declared but not used (remove them): {sorted(declared - used)}"


def test_only_the_declared_modules_import_tensorrt():
    allowed = {*trt_api.TENSORRT_MODULES, "trt_exit/build/trt_api.py"}
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(REPO).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            imported = (isinstance(node, ast.Import) and any(a.name.split(".")[0] == "tensorrt"
                                                            for a in node.names)) or \
                (isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "tensorrt")
            called = isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id == "import_tensorrt"
            dynamic = isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id == "getattr" and node.args and isinstance(node.args[0], ast.Name) \
                and node.args[0].id == "trt"
            if (imported or called) and rel not in allowed or dynamic:
                offenders.append(f"{rel}:{node.lineno}")
    assert not offenders, (f"TensorRT used outside trt_api.TENSORRT_MODULES (or through "
                           f"getattr, which the conformance check cannot see): {offenders}")


def test_the_checker_catches_misspelt_undeclared_and_removed_names(trt_bindings_api, tmp_path,
                                                                 monkeypatch):
    """The check can fail: a misspelt method, an undeclared flag, and a declared flag that
    TensorRT 11 removed (present in 10.3)."""
    bad = tmp_path / "bad_module.py"
    bad.write_text(
        "def f(trt, context, config):\n"
        "    context.set_tensor_adress('x', 0)\n"
        "    config.set_flag(trt.BuilderFlag.TF32)\n"
        "    config.set_flag(trt.BuilderFlag.FP16)\n", encoding="utf-8")
    declared = dict(trt_api.USED_API)
    declared["BuilderFlag"] = (*declared["BuilderFlag"], "FP16")
    monkeypatch.setattr(trt_api, "USED_API", declared)
    problems = conformance_problems(trt_bindings_api, tensorrt_uses(bad, tmp_path))
    assert any("'set_tensor_adress' is neither" in p for p in problems), problems
    assert any("trt.BuilderFlag.TF32 is not declared" in p for p in problems), problems
    removed = [p for p in problems if "BuilderFlag.FP16 does not exist" in p]
    assert bool(removed) == trt_bindings_api["version"].startswith("11"), problems
