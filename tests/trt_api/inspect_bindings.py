"""Describes the TensorRT Python API of the installed bindings as JSON (run in a subprocess).

Usage: ``python inspect_bindings.py OUT.json`` with the bindings (``tensorrt_bindings``) on
``PYTHONPATH`` and the stub native libraries on ``LD_LIBRARY_PATH``. It only imports the module
and reads attributes, docstrings and signatures: nothing calls into the (stubbed) libraries.

Output::

    {"version": "10.3.0",
     "members": {"tensorrt": {"Builder": {"kind": "class"}, "nptype": {"kind": "function",
                 "signatures": [[["trt_type", false]]]}, ...},
                 "Builder": {"create_network": {"kind": "method",
                             "signatures": [[["self", false], ["flags", true]]]}, ...},
                 "ILogger.Severity": {"ERROR": {"kind": "value"}, ...}, ...}}

A signature is a list of ``[parameter name, has default]``; a pybind11 method has one per
overload (from its docstring), ``null`` when the docstring gives none.
"""

from __future__ import annotations

import inspect
import json
import re
import sys


def _split_params(text: str) -> list[str]:
    params, depth, current = [], 0, ""
    for char in text:
        if char in "([{<":
            depth += 1
        elif char in ")]}>":
            depth -= 1
        if char == "," and depth == 0:
            params.append(current.strip())
            current = ""
        else:
            current += char
    if current.strip():
        params.append(current.strip())
    return params


def _parse_param(param: str) -> list:
    name = param.split(":", 1)[0].split("=", 1)[0].strip()
    return [name, "=" in param]


def _doc_signatures(name: str, doc: str | None):
    """Overloads from a pybind11 docstring: ``name(a: T, b: U = 1) -> R`` lines."""
    if not doc:
        return None
    pattern = re.compile(rf"^(?:\d+\.\s+)?{re.escape(name)}\((.*)\)\s*(?:->.*)?$")
    found = []
    for line in doc.splitlines():
        match = pattern.match(line.strip())
        if match:
            found.append([_parse_param(p) for p in _split_params(match.group(1))])
    overloads = [s for s in found if [p[0] for p in s] != ["*args", "**kwargs"]]
    return overloads or (found or None)


def _signatures(name: str, value):
    try:
        signature = inspect.signature(value)
    except (TypeError, ValueError):
        return _doc_signatures(name, getattr(value, "__doc__", None))
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in signature.parameters.values()):
        return _doc_signatures(name, getattr(value, "__doc__", None)) or \
            [[[p.name, p.default is not p.empty] for p in signature.parameters.values()]]
    return [[[p.name, p.default is not p.empty] for p in signature.parameters.values()]]


def _describe(name: str, raw, owner):
    if isinstance(raw, property):
        return {"kind": "property", "settable": raw.fset is not None}
    if inspect.isclass(raw):
        init = inspect.getattr_static(raw, "__init__", None)
        return {"kind": "class", "signatures": _signatures("__init__", init) if init else None}
    if owner is not None and isinstance(raw, owner):
        return {"kind": "value"}  # an enum member
    if isinstance(raw, (staticmethod, classmethod)):
        return {"kind": "method", "signatures": _signatures(name, raw.__func__)}
    if callable(raw):
        kind = "method" if owner is not None else "function"
        return {"kind": kind, "signatures": _signatures(name, raw)}
    if type(raw).__name__ in ("instancemethod", "method_descriptor", "wrapper_descriptor"):
        return {"kind": "method", "signatures": _signatures(name, raw)}
    # pybind11 properties are plain `property` objects (caught above); other descriptors
    # (e.g. enum `name` in older pybind11) behave like read-only properties.
    if hasattr(raw, "__get__") and not callable(raw):
        return {"kind": "property", "settable": hasattr(raw, "__set__")}
    return {"kind": "value"}


def describe_class(cls, qualname: str, out: dict, depth: int = 0) -> None:
    members = {}
    for name in dir(cls):
        if name.startswith("__") and name != "__init__":
            continue
        raw = inspect.getattr_static(cls, name)
        members[name] = _describe(name, raw, cls)
        if inspect.isclass(raw) and depth < 2 and raw is not cls:
            describe_class(raw, f"{qualname}.{name}", out, depth + 1)
    out[qualname] = members


def main(path: str) -> None:
    import tensorrt_bindings as trt

    members: dict[str, dict] = {"tensorrt": {}}
    for name in dir(trt):
        if name.startswith("__") and name != "__version__":
            continue
        value = getattr(trt, name)
        if inspect.isclass(value):
            members["tensorrt"][name] = _describe(name, value, None)
            describe_class(value, name, members)
        elif inspect.ismodule(value):
            members["tensorrt"][name] = {"kind": "module"}
        elif callable(value):
            members["tensorrt"][name] = {"kind": "function", "signatures": _signatures(name, value)}
        else:
            members["tensorrt"][name] = {"kind": "value"}
    with open(path, "w", encoding="utf-8") as handle:
        json.dump({"version": trt.__version__, "members": members}, handle, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
