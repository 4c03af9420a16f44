"""Reshape targets computed at run time, folded into constants.

PyTorch's TorchScript exporter writes ``x.reshape(B, N, 3, H, D)`` with a dynamic batch as a
small graph of its own: ``Shape(x)``, one ``Gather`` and ``Unsqueeze`` per dimension, a
``Concat``, then the ``Reshape``. With one or two microseconds per node in ONNX Runtime on a
CPU, those shape nodes cost about as much as the arithmetic of a small ViT block (the demo
model: 28 of segment 0's 84 nodes after ONNX Runtime's own optimizations). ONNX Runtime folds
them only when every dimension is static; the batch dimension is not.

This pass evaluates the integer shape arithmetic symbolically (each dimension a number, or the
name of a symbolic dimension such as ``batch``, from ONNX shape inference) and replaces a
``Reshape`` target by a constant when all its entries are known numbers but one: that one
becomes ``-1``. This is exact for any input: a reshape keeps the element count, so the one
unknown entry is the count divided by the product of the others (all positive). Nodes left
without consumers are removed. Nothing else changes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: Integer vectors are followed through these ops (everything else is "unknown").
_FOLLOWED = ("Constant", "Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Slice", "Cast",
             "Identity", "Reshape", "ConstantOfShape", "Mul", "Equal", "Where")


class _Symbol(str):
    """A dimension known only by name (``batch``): never a number, always >= 0. ``source`` is
    where it was read: ``(tensor, axis)`` of the ``Shape`` node that read it."""

    source: tuple[str, int]

    @classmethod
    def of(cls, name: str, source: tuple[str, int]) -> "_Symbol":
        symbol = cls(name)
        symbol.source = source
        return symbol


def _dims(value_info) -> list | None:
    tensor = value_info.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    out = []
    for axis, dim in enumerate(tensor.shape.dim):
        if dim.HasField("dim_value"):
            out.append(int(dim.dim_value))
        else:  # symbolic or anonymous: known by where it is read
            out.append(_Symbol.of(dim.dim_param or "?", (value_info.name, axis)))
    return out


def _constant(node) -> np.ndarray | None:
    from onnx import numpy_helper

    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_int":
            return np.array(attr.i, np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), np.int64)
    return None


def _attr(node, name: str, default: Any = None) -> Any:
    from onnx import helper

    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _array(values: Any) -> np.ndarray:
    """Numbers as an int64 array; with a symbol among them, an object array."""
    array = np.array(values, dtype=object)
    if any(isinstance(v, _Symbol) for v in array.reshape(-1)):
        return array
    return array.astype(np.int64)


def _evaluate(node, args: list, opset: int) -> Any:
    """The node's single output as a numpy array (numbers) or an object array holding
    numbers and symbols; None when not followed or not known."""
    op = node.op_type
    if op == "Constant":
        value = _constant(node)
        return value if value is not None and value.dtype.kind in "iu" else None
    if op == "Shape":
        dims = args[0]
        if dims is None:
            return None
        start, end = _attr(node, "start", 0), _attr(node, "end", None)
        return _array(dims[start:end])
    if op == "ConstantOfShape":
        shape = args[0]
        value = _constant(node)
        value = np.zeros(1, np.float32) if value is None else value
        if shape is None or shape.dtype == object or value.dtype.kind not in "iu":
            return None
        return np.full(tuple(shape), value.reshape(-1)[0], np.int64)
    if op == "Where":
        condition = args[0]
        if condition is None or condition.dtype != bool or any(a is None for a in args[1:]):
            return None
        return _array(np.where(condition, args[1].astype(object), args[2].astype(object)))
    if op == "Equal":
        if any(a is None or a.ndim > 1 for a in args):
            return None
        a, b = np.broadcast_arrays(args[0].astype(object), args[1].astype(object))
        out = []
        for x, y in zip(a.reshape(-1), b.reshape(-1)):
            if isinstance(x, _Symbol) or isinstance(y, _Symbol):
                number = y if isinstance(x, _Symbol) else x
                if isinstance(number, _Symbol) or number >= 0:
                    return None  # a dimension may equal any number >= 0
                out.append(False)  # a dimension is never negative
            else:
                out.append(x == y)
        return np.array(out, bool).reshape(a.shape)
    if op == "Mul":
        if any(a is None or a.dtype == object for a in args):
            return None
        return args[0] * args[1]
    if any(a is None for a in args[:1]):
        return None
    data = args[0]
    if op in ("Identity", "Cast"):
        if op == "Cast" and _attr(node, "to") not in (6, 7):  # int32, int64
            return None
        return data
    if op == "Gather":
        indices = args[1]
        if indices is None or indices.dtype == object or data.ndim != 1 or _attr(node, "axis", 0):
            return None
        return _array(data[indices.astype(np.int64)])
    if op in ("Unsqueeze", "Squeeze"):
        axes = args[1] if opset >= 13 and len(args) > 1 else np.array(_attr(node, "axes", []))
        if axes is None or axes.dtype == object:
            return None
        if op == "Unsqueeze":
            return data.reshape(-1) if data.ndim == 0 and list(axes) == [0] else None
        return data.reshape(()) if data.shape == (1,) else None
    if op == "Concat":
        if _attr(node, "axis") != 0 or any(a is None or a.ndim != 1 for a in args):
            return None
        return _array(np.concatenate([a.astype(object) for a in args]))
    if op == "Slice":
        if len(args) < 3 or any(a is None or a.dtype == object for a in args[1:]):
            return None
        starts, ends = args[1], args[2]
        axes = args[3] if len(args) > 3 else np.array([0])
        steps = args[4] if len(args) > 4 else np.array([1])
        if data.ndim != 1 or list(axes) not in ([0], [-1]) or len(starts) != 1 or \
                list(steps) != [1]:
            return None
        return _array(data[int(starts[0]):int(np.clip(ends[0], -2**62, 2**62))])
    if op == "Reshape":
        shape = args[1]
        if shape is None or shape.dtype == object or data.ndim != 1 or list(shape) != [-1]:
            return None
        return data
    return None


def _reshape_target(target: np.ndarray, data_dims: list | None) -> np.ndarray | None:
    """A constant equivalent of a run-time ``Reshape`` target, or None.

    All entries known but one symbol: that one becomes -1. A symbol and a -1 where the symbol
    is a dimension of the reshaped tensor itself whose other dimensions are static: the -1 is
    what that tensor's other dimensions leave, and the symbol becomes -1.
    """
    symbols = [i for i, v in enumerate(target) if isinstance(v, _Symbol)]
    known = [int(v) for v in target if not isinstance(v, _Symbol)]
    if len(symbols) != 1 or any(v == 0 or v < -1 for v in known):
        return None
    out = np.array([-1 if isinstance(v, _Symbol) else int(v) for v in target], np.int64)
    if -1 not in known:
        return out
    symbol = target[symbols[0]]
    if known.count(-1) != 1 or data_dims is None:
        return None
    static = [d for d in data_dims if not isinstance(d, _Symbol)]
    own = [d for d in data_dims if isinstance(d, _Symbol)]
    if len(own) != 1 or own[0].source != symbol.source:
        return None  # the symbol is not the reshaped tensor's only dynamic dimension
    rest = int(np.prod(static, dtype=np.int64))
    fixed = int(np.prod([v for v in known if v != -1], dtype=np.int64))
    if fixed <= 0 or rest % fixed:
        return None
    out[[i for i, v in enumerate(target) if not isinstance(v, _Symbol) and v == -1]] = rest // fixed
    return out


def fold_reshape_targets(model) -> tuple[Any, int]:
    """Returns a copy of ``model`` (an ``onnx.ModelProto`` without subgraphs) with its shape
    arithmetic folded, and how many node inputs were replaced.

    ``Reshape`` targets become constants (see :func:`_reshape_target`); other shape vectors
    computed at run time (an ``Expand`` target) become a ``Shape`` read of each dynamic
    dimension and one ``Concat``, reading the same dimension of the same tensor as before.
    """
    import onnx
    from onnx import helper, numpy_helper

    model_copy = onnx.ModelProto()
    model_copy.CopyFrom(model)
    model = model_copy
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    graph = inferred.graph
    infos = [*graph.input, *graph.value_info, *graph.output]
    dims = {v.name: _dims(v) for v in infos}
    elem_type = {v.name: v.type.tensor_type.elem_type for v in infos}
    constants = {t.name for t in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    values: dict[str, Any] = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
                              if t.data_type in (6, 7)}  # int32 / int64
    for node in model.graph.node:
        if node.op_type not in _FOLLOWED or len(node.output) != 1:
            continue
        if node.op_type == "Shape":
            args = [dims.get(node.input[0])]
        else:
            args = [values.get(name) if name else None for name in node.input]
        result = _evaluate(node, args, opset)
        if result is not None:
            values[node.output[0]] = result

    existing = {t.name for t in model.graph.initializer} | {
        o for n in model.graph.node for o in n.output}

    def fresh(name: str) -> str:
        while name in existing:
            name += "_"
        existing.add(name)
        return name

    def constant(array: np.ndarray, like: str) -> str:
        name = fresh(f"{like}__folded")
        model.graph.initializer.append(numpy_helper.from_array(array, name))
        return name

    replaced = 0
    nodes = []
    for node in model.graph.node:
        if not any(o in values for o in node.output):  # not itself shape arithmetic
            for i, name in enumerate(node.input):
                value = values.get(name)
                if value is None or name in constants or elem_type.get(name) != 7:
                    continue  # only int64 vectors computed at run time
                if node.op_type == "Reshape" and i == 1 and not _attr(node, "allowzero", 0):
                    folded = _reshape_target(value, dims.get(node.input[0])) \
                        if value.ndim == 1 and value.dtype == object else None
                    if folded is not None:
                        node.input[i] = constant(folded, name)
                        replaced += 1
                    continue
                if value.dtype != object:
                    node.input[i] = constant(value.astype(np.int64), name)
                    replaced += 1
                elif value.ndim == 1 and opset >= 15:
                    pieces, run = [], []
                    for v in value:
                        if isinstance(v, _Symbol):
                            if run:
                                pieces.append(constant(np.array(run, np.int64), name))
                                run = []
                            tensor, axis = v.source
                            piece = fresh(f"{name}__dim_{len(pieces)}")
                            nodes.append(helper.make_node("Shape", [tensor], [piece],
                                                          name=piece, start=axis, end=axis + 1))
                            pieces.append(piece)
                        else:
                            run.append(int(v))
                    if run:
                        pieces.append(constant(np.array(run, np.int64), name))
                    if len(pieces) > 1:
                        target = fresh(f"{name}__rebuilt")
                        nodes.append(helper.make_node("Concat", pieces, [target], name=target,
                                                      axis=0))
                    else:
                        target = pieces[0]
                    node.input[i] = target
                    replaced += 1
        nodes.append(node)
    if replaced:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        _remove_dead_nodes(model.graph)
    return model, replaced


def _remove_dead_nodes(graph) -> None:
    """Removes nodes none of whose outputs are read (by a node or as a graph output), and
    initializers nothing reads."""
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output if o):
            keep.append(node)
            needed.update(i for i in node.input if i)
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    inputs = {i.name for i in graph.input}
    initializers = [t for t in graph.initializer if t.name in needed or t.name in inputs]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
