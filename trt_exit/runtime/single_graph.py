"""The ``single_graph`` strategy of the host executor: the whole exit chain in one
``session.run`` of ONNX Runtime (see :mod:`trt_exit.export.early_exit_graph`).

A policy maps to a :class:`~trt_exit.export.early_exit_graph.ChainPlan` (which exits decide,
where the chain ends) and a thresholds vector fed to the graph's thresholds input. The graph
file of the manifest serves its own plan (the tuned one); another plan (a policy that disables
other exits, a fixed exit) is composed in memory from the verified stage graphs once and kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from trt_exit import tensor_names as tn
from trt_exit.errors import ConfigError, StageError
from trt_exit.export.early_exit_graph import ChainPlan, plan_chain
from trt_exit.manifest import Manifest, check_graph_io, ort_type_name
from trt_exit.runtime.policies import DeadlinePolicy, FixedExitPolicy, Policy, ThresholdPolicy

class StaleGraphError(StageError):
    """The single graph does not hold the stage graphs the manifest lists (``plan``: the one
    it holds)."""

    def __init__(self, message: str, plan: ChainPlan):
        super().__init__(message)
        self.plan = plan


#: The host executor's strategies (``auto``: the tuner's choice, see :func:`auto_max_batch`).
STRATEGIES = ("auto", "stages", "single_graph")


def supports(policy: Policy) -> bool:
    """Whether a policy can run as one graph: thresholds or a fixed exit (not deadlines, which
    read the clock between stages, nor all exits, which returns every exit's output)."""
    return isinstance(policy, (ThresholdPolicy, FixedExitPolicy)) and not isinstance(
        policy, DeadlinePolicy)


def policy_plan(manifest: Manifest, policy: Policy) -> tuple[ChainPlan, np.ndarray]:
    """The chain a policy runs and the thresholds to feed (+inf where no exit decides)."""
    n = manifest.num_exits
    thresholds = np.full(n - 1, np.inf, np.float32)
    if isinstance(policy, FixedExitPolicy):
        return plan_chain(manifest, None, final=policy.resolve(n)), thresholds
    if not supports(policy):
        raise ConfigError(f"{type(policy).__name__} cannot run as one graph (it needs the "
                          f"stages one by one): use strategy 'stages'")
    plan = plan_chain(manifest, policy.thresholds)
    for k in plan.decisions:
        thresholds[k] = policy.thresholds[k]
    return plan, thresholds


class SingleGraphRunner:
    """One early-exit graph in an ONNX Runtime session.

    Its inputs, outputs and thresholds input are checked against the manifest on load; its
    plan comes from the graph's metadata.

    Args:
        manifest: The model.
        source: The graph file (already checked against its sha256) or its bytes.
        name: What it is, for messages.
        threads: Intra-op threads.
        precision: Also check that the graph was built from the stage graphs of this precision
            that the manifest lists now (their sha256s, recorded in the graph): a stage graph
            replaced since makes the single graph stale.
    """

    def __init__(self, manifest: Manifest, source: Path | bytes, name: str, threads: int = 1,
                 precision: str | None = None):
        import json

        from trt_exit.export.early_exit_graph import META_SOURCES, ChainPlan
        from trt_exit.runtime.backends.onnxruntime import open_session

        self.name = name
        self.session = open_session(source, threads, what=name)
        inputs, outputs = manifest.early_exit_graph_io()

        def declared(args) -> dict[str, tuple[str, list | None]]:
            return {a.name: (ort_type_name(a.type),
                             [d if isinstance(d, int) else None for d in a.shape]
                             if a.shape is not None else None) for a in args}

        check_graph_io(name, name, inputs, outputs, declared(self.session.get_inputs()),
                       declared(self.session.get_outputs()))
        overridable = declared(self.session.get_overridable_initializers())
        expected = ("float32", [manifest.num_exits - 1])
        if overridable.get(tn.THRESHOLDS) != expected:
            raise StageError(f"{name}: its {tn.THRESHOLDS} input is "
                             f"{overridable.get(tn.THRESHOLDS, 'missing')}, expected float32 "
                             f"({manifest.num_exits - 1},) with a default; re-export the model")
        meta = self.session.get_modelmeta().custom_metadata_map
        self.plan = ChainPlan.from_metadata(meta)
        if self.plan is None:
            raise StageError(f"{name} records no exit plan in its metadata; re-export the model")
        if precision is not None:
            try:
                sources = json.loads(meta.get(META_SOURCES, "null"))
            except ValueError:
                sources = None
            current = {stage.name: stage.onnx[precision].sha256 for stage in manifest.stages
                       if precision in stage.onnx}
            if not isinstance(sources, dict) or any(current.get(stage) != sha
                                                    for stage, sha in sources.items()):
                raise StaleGraphError(
                    f"{name} was built from other {precision} stage graphs than {manifest.path} "
                    f"lists now; write it anew with trt-exit tune {manifest.root} (or trt-exit "
                    f"precision), or run the stages (--strategy stages)", self.plan)
        self._input_names = [t.name for t in inputs]
        self._output_names = [t.name for t in outputs]

    def run(self, feeds: Mapping[str, Any], thresholds: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(output (B, K), confidence (B,), exit index (B,) int64)`` of one batch."""
        inputs = {name: feeds[name] for name in self._input_names}
        inputs[tn.THRESHOLDS] = thresholds
        try:
            output, confidence, index = self.session.run(self._output_names, inputs)
        except Exception as exc:  # ORT's own exception types
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StageError(f"{self.name} failed in ONNX Runtime: {message}") from exc
        return output, confidence, index

    def close(self) -> None:
        self.session = None


def auto_max_batch(manifest: Manifest, precision: str, backend: str) -> int:
    """The largest batch ``strategy="auto"`` runs as the single graph (0: none): up to the
    largest batch at which the tuner measured it faster on this precision
    (``manifest.tuning[precision]["strategy"]``), on ONNX Runtime, where the graph exists;
    the stages otherwise. (The executor also keeps to the stages for a policy whose plan is
    not the one the graph file holds.)"""
    if backend != "onnxruntime" or precision not in manifest.early_exit_graph:
        return 0
    choice = manifest.tuning.get(precision, {}).get("strategy") or {}
    if choice.get("default") != "single_graph":
        return 0
    return int(choice.get("single_graph_max_batch", 1))


#: Batch sizes the tuner times both strategies at.
CHOICE_BATCHES = (1, 8, 64)


def compare_strategies(executor, inputs: dict[str, np.ndarray],
                       batches: tuple[int, ...] = CHOICE_BATCHES, passes: int = 2,
                       warmup: int = 10, max_batches: int = 128) -> dict[str, Any]:
    """Times ``stages`` and ``single_graph`` under the executor's policy, interleaved batch by
    batch (rotating which goes first), and says which is faster where.

    Args:
        executor: A host executor on ONNX Runtime whose manifest has the single graph of its
            precision.
        inputs: Samples by input name, (N, ...); each batch size cuts them into batches.
        batches: Batch sizes to time (those above N are left out).
        passes: Timed passes over the samples per batch size.
        warmup: Untimed runs of each strategy first.
        max_batches: At most this many batches per size (the first samples), which bounds the
            time a large split or a large model takes.

    Returns:
        ``{"default", "single_graph_max_batch", "mean_latency_ms": {batch: {strategy: ms}},
        "why", ...}``: ``default`` is the faster one at batch 1, and the single graph serves
        batches up to the largest measured size at which it stayed faster (ONNX Runtime's
        single graph does not compact a batch, so at larger batches the stages, which do, may
        win).
    """
    count = len(next(iter(inputs.values())))
    sizes = [b for b in batches if b <= count] or [1]
    means: dict[str, dict[str, float]] = {}
    for size in sizes:
        parts = [{k: v[i : i + size] for k, v in inputs.items()}
                 for i in range(0, count - size + 1, size)][:max_batches]
        names = ["stages", "single_graph"]
        for i in range(warmup):
            for name in names:
                executor.run(parts[i % len(parts)], strategy=name)
        times: dict[str, list[float]] = {name: [] for name in names}
        for p in range(passes):
            for i, part in enumerate(parts):
                for name in (names if (i + p) % 2 == 0 else names[::-1]):
                    times[name].append(executor.run(part, strategy=name).latency_ms)
        means[str(size)] = {name: float(np.mean(t)) for name, t in times.items()}
    faster = [means[str(s)]["single_graph"] < means[str(s)]["stages"] for s in sizes]
    default = "single_graph" if faster[0] else "stages"
    slower_at = next((size for size, ok in zip(sizes, faster) if not ok), None)
    largest = max([s for s in sizes if slower_at is None or s < slower_at], default=0)
    one = means[str(sizes[0])]
    why = (f"batch {sizes[0]}: single graph {one['single_graph']:.3f} ms vs stages "
           f"{one['stages']:.3f} ms mean over {min(count, max_batches * sizes[0])} samples")
    if default == "single_graph":
        why += f"; the single graph serves batches up to {largest}"
        if slower_at is not None:
            why += f" (at batch {slower_at} the stages, which compact the batch, were faster)"
    return {"default": default, "single_graph_max_batch": largest, "mean_latency_ms": means,
            "samples": count, "max_batches": max_batches, "passes": passes, "threads": getattr(executor.backend, "threads", 1),
            "measured": "interleaved per batch, rotating order, after warm-up", "why": why}
