"""The whole exit chain as one ONNX graph with nested ``If`` nodes.

The stage graphs (:mod:`trt_exit.export.onnx_export`) need trt_exit's executor to drive them.
This module composes the stage graphs of one precision into a single model that any ONNX
Runtime runs (C++, C#, Java, JavaScript, mobile builds, Triton's onnxruntime backend), making
every exit decision inside one ``session.run``::

    segment_0 .. exit_a                       (the first deciding exit a, and what it needs)
    stop_a = exit_a_confidence >= thresholds[a]          (NaN is never confident)
    go_a = not stop_a;  If any(go_a):
        then: segment_a+1 .. exit_b;  stop_b = ...;  go_b = go_a and not stop_b;  If any(go_b):
                  then: ... the final head
                  else: exit_b's results
              output = Where(stop_a, exit_a_output, <the results of the If above>)   (also the
              confidence and the exit index)
        else: exit_a's output, confidence and index

So a batch goes on while any sample still running is unconfident, and samples that stopped keep
their results: per sample, the same exit and output as the host executor
(:class:`trt_exit.runtime.executor.Executor`) for every batch size (it does not compact the
batch). Samples that stopped earlier are not compared again (``go`` carries who still runs).

Inputs: the model's inputs, and :data:`~trt_exit.tensor_names.THRESHOLDS` (E - 1,) float32, a
graph input with an initializer of the same name holding the tuned thresholds, so callers may
pass others without re-exporting. Outputs: :data:`~trt_exit.tensor_names.EARLY_EXIT_OUTPUT`
(B, K), :data:`~trt_exit.tensor_names.EARLY_EXIT_CONFIDENCE` (B,) and
:data:`~trt_exit.tensor_names.EARLY_EXIT_INDEX` (B,) int64.

Which exits the graph holds is fixed when it is built (:class:`ChainPlan`): an exit disabled by
tuning has no head and no decision in the graph (its threshold entry is not read), as in the
host executor, which does not run it; a head whose output another running stage reads (a state
handed from exit to exit, ``exit_k_state``) runs without deciding. Stages are wired by their
tensor names (:mod:`trt_exit.tensor_names`), never by position or model family: each stage's
internal names get the stage's name as a prefix, the names between stages stay as they are, and
a nested branch reads what an outer scope computed by name.

Before composing, each stage graph's run-time shape arithmetic is folded
(:mod:`trt_exit.export.shape_folding`; exact, and about a quarter of a small ViT segment's
nodes), except in Q/DQ graphs (see :data:`_QDQ`). The threshold input cannot be folded (ONNX
Runtime does not treat an overridable initializer as a constant): each decision costs a Gather,
a comparison, a Where, a ReduceMax, a Cast and the If (measured in benchmarks/README.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from trt_exit import tensor_names as tn
from trt_exit.errors import ConfigError
from trt_exit.manifest import Manifest, StageEntry

#: Protobuf cannot hold a model above 2 GB in one file.
_MAX_BYTES = 2**31 - 1
#: Graphs with these ops keep their shape arithmetic: with constant ``Reshape`` targets, ONNX
#: Runtime fuses more of the Q/DQ pairs into integer kernels, which round differently from the
#: stage graphs it must agree with (measured on the demo's INT8 graphs: up to 0.03 in a logit).
_QDQ = ("QuantizeLinear", "DequantizeLinear")
#: ``metadata_props`` keys the graph records its plan under (read back by the executor).
META_DECISIONS = "trt_exit.decision_exits"
META_HEADS = "trt_exit.exit_heads"
META_FINAL = "trt_exit.final_exit"
META_SOURCES = "trt_exit.source_sha256"


@dataclass(frozen=True)
class ChainPlan:
    """What one early-exit graph holds.

    Attributes:
        decisions: Early exits whose confidence is compared with its threshold, in order.
        heads: Exit heads that run: the deciding exits, the final one, and every head whose
            output a running stage reads (a state handed along).
        final: The exit every sample still running takes at the end: the model's final head,
            or the exit of a fixed-exit policy.
    """

    decisions: tuple[int, ...]
    heads: tuple[int, ...]
    final: int

    def to_metadata(self) -> dict[str, str]:
        return {META_DECISIONS: ",".join(map(str, self.decisions)),
                META_HEADS: ",".join(map(str, self.heads)), META_FINAL: str(self.final)}

    @classmethod
    def from_metadata(cls, props: dict[str, str]) -> "ChainPlan | None":
        """The plan recorded in a graph's metadata, or None if it records none."""
        try:
            def ints(text: str) -> tuple[int, ...]:
                return tuple(int(v) for v in text.split(",") if v)

            return cls(ints(props[META_DECISIONS]), ints(props[META_HEADS]),
                       int(props[META_FINAL]))
        except (KeyError, ValueError):
            return None


def plan_chain(manifest: Manifest, thresholds: Sequence[float | None] | None = None,
               final: int | None = None) -> ChainPlan:
    """The chain a policy runs: which exits decide, which heads run, where it ends.

    Args:
        manifest: The model.
        thresholds: One per early exit, None where the exit is disabled (its head does not
            run); None for no early decision at all (an untuned model, a fixed exit).
        final: The exit that ends the chain (default: the model's final head).

    Raises:
        ConfigError: ``thresholds`` has the wrong length, ``final`` is out of range, or a stage
            reads a tensor that no earlier stage writes.
    """
    n = manifest.num_exits
    final = n - 1 if final is None else final
    if not 0 <= final < n:
        raise ConfigError(f"exit {final} is out of range for a model with {n} exits")
    if thresholds is not None and len(thresholds) != n - 1:
        raise ConfigError(f"expected {n - 1} thresholds (one per early exit), got "
                          f"{len(thresholds)}")
    decisions = tuple(k for k in range(final)
                      if thresholds is not None and thresholds[k] is not None)
    order = {stage.name: i for i, stage in enumerate(manifest.stages)}
    producer = {t.name: stage for stage in manifest.stages for t in stage.outputs}
    needed = {tn.stage_name(tn.SEGMENT, k) for k in range(final + 1)}
    needed |= {tn.stage_name(tn.EXIT, k) for k in (*decisions, final)}
    model_inputs = {spec.name for spec in manifest.inputs}
    pending = list(needed)
    while pending:
        stage = manifest.stage(pending.pop())
        for tensor in stage.inputs:
            if tensor.name in model_inputs:
                continue
            source = producer.get(tensor.name)
            if source is None or order[source.name] >= order[stage.name]:
                raise ConfigError(f"{manifest.path}: stage {stage.name} reads {tensor.name}, "
                                  f"which no earlier stage writes; re-export the model")
            if source.name not in needed:
                needed.add(source.name)
                pending.append(source.name)
    heads = tuple(k for k in range(final + 1) if tn.stage_name(tn.EXIT, k) in needed)
    return ChainPlan(decisions, heads, final)


def default_thresholds(manifest: Manifest, plan: ChainPlan,
                       thresholds: Sequence[float | None] | None) -> np.ndarray:
    """The graph's default for its thresholds input: the given thresholds at the deciding
    exits, +inf (never) elsewhere."""
    values = np.full(manifest.num_exits - 1, np.inf, np.float32)
    for k in plan.decisions:
        values[k] = np.float32(thresholds[k])
    return values


class _Composer:
    """Builds the graph of one plan from the stage graphs of one precision."""

    def __init__(self, manifest: Manifest, precision: str, plan: ChainPlan,
                 fold_shapes: bool = True):
        import onnx

        self.onnx = onnx
        self.fold_shapes = fold_shapes
        self.manifest = manifest
        self.plan = plan
        self.opsets: dict[str, int] = {}
        self.ir_version = 4  # initializers that are also inputs (overridable defaults)
        self.sources: dict[str, str] = {}
        self.stages: dict[str, Any] = {}
        names = [tn.stage_name(tn.SEGMENT, k) for k in range(plan.final + 1)]
        names += [tn.stage_name(tn.EXIT, k) for k in plan.heads]
        for name in names:
            stage = manifest.stage(name)
            path = manifest.onnx_path(stage, precision)  # sha256 checked
            self.sources[name] = stage.onnx[precision].sha256
            self.stages[name] = self._load(stage, path)
        specs = {t.name: t for t in manifest.exit_stage(plan.final).outputs}
        self.output_spec = specs[tn.exit_output(plan.final)]
        for k in plan.decisions:
            spec = next(t for t in manifest.exit_stage(k).outputs if t.name == tn.exit_output(k))
            if spec.shape[1:] != self.output_spec.shape[1:]:
                raise ConfigError(f"{manifest.path}: exit {k} outputs {spec.shape[1:]} values per "
                                  f"sample, exit {plan.final} {self.output_spec.shape[1:]}; one "
                                  f"graph needs every exit to output the same shape")

    def _load(self, stage: StageEntry, path: Path):
        """One stage graph, checked against the manifest, with its internal names prefixed."""
        from onnx import inliner

        from trt_exit.manifest import check_onnx_io

        from trt_exit.export.shape_folding import fold_reshape_targets

        check_onnx_io(stage.name, path, stage.inputs, stage.outputs)
        model = self.onnx.load(str(path))
        if model.functions:
            model = inliner.inline_local_functions(model)
        if self.fold_shapes and not any(n.op_type in _QDQ for n in model.graph.node):
            model, _ = fold_reshape_targets(model)
        graph = model.graph
        if graph.sparse_initializer:
            raise ConfigError(f"{path}: sparse initializers are not supported in the single "
                              f"early-exit graph; re-export the model")
        for opset in model.opset_import:
            have = self.opsets.setdefault(opset.domain, opset.version)
            if have != opset.version:
                raise ConfigError(f"{path}: opset {opset.domain or 'ai.onnx'} {opset.version}, "
                                  f"other stages {have}: the stage graphs of one precision must "
                                  f"share their opsets; re-export the model")
        self.ir_version = max(self.ir_version, model.ir_version)
        keep = set(stage.input_names()) | set(stage.output_names())
        prefix = f"{stage.name}/"

        def rename(name: str) -> str:
            return name if not name or name in keep else prefix + name

        nodes = []
        for i, node in enumerate(graph.node):
            if any(attr.g.node or attr.graphs for attr in node.attribute):
                raise ConfigError(f"{path}: node {node.name or i} ({node.op_type}) has a "
                                  f"subgraph; stage graphs with control flow cannot be nested")
            copy = self.onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = prefix + (node.name or f"{node.op_type}_{i}")
            copy.input[:] = [rename(n) for n in node.input]
            copy.output[:] = [rename(n) for n in node.output]
            nodes.append(copy)
        initializers = []
        for tensor in graph.initializer:
            copy = self.onnx.TensorProto()
            copy.CopyFrom(tensor)
            copy.name = rename(tensor.name)
            initializers.append(copy)
        return nodes, initializers

    # ------------------------------------------------------------------ graph pieces

    def _value(self, name: str, elem_type: int, dims: list) -> Any:
        return self.onnx.helper.make_tensor_value_info(name, elem_type, dims)

    def _outputs(self, names: Sequence[str]) -> list:
        """Value infos of (output, confidence, exit index) named ``names``."""
        from onnx import TensorProto, helper

        dtype = helper.np_dtype_to_tensor_dtype(np.dtype(self.output_spec.dtype))
        return [self._value(names[0], dtype, ["batch", *self.output_spec.shape[1:]]),
                self._value(names[1], TensorProto.FLOAT, ["batch"]),
                self._value(names[2], TensorProto.INT64, ["batch"])]

    @staticmethod
    def _index(name: str, value: int, shape: Sequence[int] = ()) -> Any:
        from onnx import numpy_helper

        return numpy_helper.from_array(np.full(shape, value, np.int64), name)

    def _scope(self, start: int, alive: str | None, results: Sequence[str]):
        """Nodes and initializers from segment ``start`` to the next deciding exit (whose
        ``If`` writes ``results``) or to the final exit.

        Returns:
            ``(nodes, initializers, names)``: ``names`` are ``results`` when the scope ends in
            an ``If``, else the final exit's output and confidence and the name of a scalar
            holding its index.
        """
        from onnx import TensorProto, helper

        nodes: list = []
        initializers: list = []
        for k in range(start, self.plan.final + 1):
            for name in (tn.stage_name(tn.SEGMENT, k), tn.stage_name(tn.EXIT, k)):
                if name in self.stages:
                    stage_nodes, stage_initializers = self.stages[name]
                    nodes += stage_nodes
                    initializers += stage_initializers
            if k == self.plan.final:
                index = f"exit_{k}/index"
                initializers.append(self._index(index, k))
                return nodes, initializers, (tn.exit_output(k), tn.exit_confidence(k), index)
            if k not in self.plan.decisions:
                continue
            # stop: confident (a NaN confidence never is); go: still running and not confident.
            p = f"exit_{k}/"
            initializers += [self._index(p + "position", k), self._index(p + "index", k)]
            nodes += [
                helper.make_node("Gather", [tn.THRESHOLDS, p + "position"], [p + "threshold"],
                                 name=p + "threshold", axis=0),
                helper.make_node("GreaterOrEqual", [tn.exit_confidence(k), p + "threshold"],
                                 [p + "stop"], name=p + "stop"),
            ]
            initializers.append(self.onnx.numpy_helper.from_array(np.float32(0.0), p + "zero"))
            if alive is None:
                initializers.append(self.onnx.numpy_helper.from_array(np.float32(1.0), p + "one"))
                running = p + "one"
            else:
                running = alive
            # go (B,) float: 1 for samples that still run after this exit, 0 for the others.
            nodes += [
                helper.make_node("Where", [p + "stop", p + "zero", running], [p + "go"],
                                 name=p + "go"),
                helper.make_node("ReduceMax", [p + "go"], [p + "any_go"], name=p + "any_go",
                                 keepdims=0),
                helper.make_node("Cast", [p + "any_go"], [p + "continue"], name=p + "continue",
                                 to=TensorProto.BOOL),
            ]
            inner = [f"exit_{k}/then_{r}" for r in ("output", "confidence", "exit_index")]
            deeper = [f"exit_{k}/deeper_{r}" for r in ("output", "confidence", "exit_index")]
            then_nodes, then_initializers, found = self._scope(k + 1, p + "go", deeper)
            then_nodes += [
                helper.make_node("Unsqueeze", [p + "stop", p + "axis"], [p + "stop_rows"],
                                 name=p + "stop_rows"),
                helper.make_node("Where", [p + "stop_rows", tn.exit_output(k), found[0]],
                                 [inner[0]], name=p + "merge_output"),
                helper.make_node("Where", [p + "stop", tn.exit_confidence(k), found[1]],
                                 [inner[1]], name=p + "merge_confidence"),
                helper.make_node("Where", [p + "stop", p + "index", found[2]], [inner[2]],
                                 name=p + "merge_exit_index"),
            ]
            then_initializers.append(self._index(p + "axis", 1, (1,)))
            done = [f"exit_{k}/else_{r}" for r in ("output", "confidence", "exit_index")]
            else_nodes = [
                helper.make_node("Identity", [tn.exit_output(k)], [done[0]], name=p + "output"),
                helper.make_node("Identity", [tn.exit_confidence(k)], [done[1]],
                                 name=p + "confidence"),
                helper.make_node("Where", [p + "stop", p + "index", p + "index"], [done[2]],
                                 name=p + "exit_index"),
            ]
            then_graph = helper.make_graph(then_nodes, f"after_exit_{k}", [],
                                           self._outputs(inner), then_initializers)
            else_graph = helper.make_graph(else_nodes, f"stop_at_exit_{k}", [],
                                           self._outputs(done))
            nodes.append(helper.make_node("If", [p + "continue"], list(results), name=p + "if",
                                          then_branch=then_graph, else_branch=else_graph))
            return nodes, initializers, tuple(results)
        raise AssertionError("unreachable: the chain ends at the final exit")

    def build(self, thresholds: np.ndarray, doc: str):
        from onnx import TensorProto, helper, numpy_helper

        results = (tn.EARLY_EXIT_OUTPUT, tn.EARLY_EXIT_CONFIDENCE, tn.EARLY_EXIT_INDEX)
        nodes, initializers, found = self._scope(0, None, results)
        if tuple(found) != results:  # no deciding exit: name the final exit's results
            final_index = found[2]
            nodes += [
                helper.make_node("Identity", [found[0]], [results[0]], name="output"),
                helper.make_node("Identity", [found[1]], [results[1]], name="confidence"),
                helper.make_node("Shape", [found[1]], ["final/batch"], name="final/batch"),
                helper.make_node("ConstantOfShape", ["final/batch"], [results[2]],
                                 name="exit_index",
                                 value=numpy_helper.from_array(
                                     np.array([self.plan.final], np.int64))),
            ]
            initializers = [t for t in initializers if t.name != final_index]
        inputs = [self._value(spec.name, helper.np_dtype_to_tensor_dtype(np.dtype(spec.dtype)),
                              ["batch", *spec.shape[1:]]) for spec in self.manifest.inputs]
        inputs.append(self._value(tn.THRESHOLDS, TensorProto.FLOAT, [len(thresholds)]))
        inputs[-1].doc_string = ("one confidence threshold per early exit, in exit order; a "
                                 "sample stops at the first deciding exit whose confidence is >= "
                                 "its threshold (above 1: never); entries of exits not in this "
                                 "graph are not read")
        initializers.append(numpy_helper.from_array(thresholds.astype(np.float32),
                                                    tn.THRESHOLDS))
        graph = helper.make_graph(nodes, f"{self.manifest.name}_early_exit", inputs,
                                  self._outputs(results), initializers)
        model = helper.make_model(
            graph, producer_name="trt_exit", doc_string=doc,
            opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(self.opsets.items())])
        model.ir_version = self.ir_version
        meta = {**self.plan.to_metadata(), META_SOURCES: json.dumps(self.sources, sort_keys=True)}
        helper.set_model_props(model, meta)
        return model


def compose_early_exit_graph(manifest: Manifest, precision: str, plan: ChainPlan,
                             thresholds: np.ndarray, fold_shapes: bool = True):
    """The single early-exit graph of ``plan`` (an ``onnx.ModelProto``), from the stage graphs
    of ``precision`` (each checked against its sha256 and the manifest first), with
    ``thresholds`` as the default of its thresholds input. ``fold_shapes=False`` keeps the
    stage graphs' shape arithmetic (to measure what folding it saves).

    Raises:
        ConfigError: The stage graphs cannot be composed (differing opsets, exits with
            different output shapes, control flow inside a stage) or the result is above 2 GB.
        ArtifactError: A stage graph is missing, damaged or does not match the manifest.
    """
    import onnx

    composer = _Composer(manifest, precision, plan, fold_shapes)
    doc = (f"{manifest.name} ({precision}): the exit chain in one graph (trt_exit). Inputs: "
           f"{', '.join(s.name for s in manifest.inputs)} and {tn.THRESHOLDS} (default: the "
           f"tuned thresholds). Outputs: {tn.EARLY_EXIT_OUTPUT}, {tn.EARLY_EXIT_CONFIDENCE}, "
           f"{tn.EARLY_EXIT_INDEX}. Deciding exits: {list(plan.decisions) or 'none'}; final "
           f"exit {plan.final}.")
    model = composer.build(np.asarray(thresholds, np.float32), doc)
    if model.ByteSize() > _MAX_BYTES:
        raise ConfigError(f"the single early-exit graph of {manifest.name} would exceed "
                          f"protobuf's 2 GB limit; run the stage graphs instead")
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # onnx's ValidationError / InferenceError
        raise ConfigError(f"the single early-exit graph of {manifest.name} ({precision}) does "
                          f"not pass the ONNX checker: {exc}") from exc
    return model
