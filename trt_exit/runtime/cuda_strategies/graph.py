"""The graph strategy: the whole exit chain as one CUDA graph, one launch and one host wait.

After each gate that can stop the chain early comes a conditional IF node whose body is the
rest of the chain (nested), so stages after the exit every sample took are never launched. The
gate kernel sets the node's condition (``cudaGraphSetConditional``): the decision never reaches
the host. Needs a CUDA 12.4+ driver.

A graph is specific to its plan (the gates' parameters are kernel arguments), its batch size and
its input addresses; graphs are cached (least recently used first out). Capturing runs the
chain once first on every stream the capture uses (lazy allocations happen then, not during
the capture). Anything that fails while the graph is made raises
:class:`~trt_exit.runtime.cuda.graph.CaptureError` or another
:class:`~trt_exit.errors.CudaError`: the plan is remembered as not capturable, and :meth:`run`
returns None so the executor polls instead.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from typing import Any

from trt_exit.errors import CudaError
from trt_exit.profiling.nvtx import nvtx_range
from trt_exit.runtime.cuda_plan import ChainStep, ExitPlan, chain_steps, conditional_nodes
from trt_exit.runtime.cuda_strategies.chain import Chain
from trt_exit.runtime.executor import ExitResults

log = logging.getLogger(__name__)


def remember(cache: collections.OrderedDict, key: tuple, graph: Any, size: int) -> None:
    """Caches ``graph`` under ``key``, closing the least recently used beyond ``size``."""
    cache[key] = graph
    while len(cache) > size:
        _, old = cache.popitem(last=False)
        old.close()  # not in flight: every run ends with a synchronization


class GraphStrategy:
    """Captures, caches and launches exit-chain graphs.

    Args:
        chain: The executor's stream, buffers and enqueue steps.
        inputs: The model's input names (what a graph is bound to).
        cache_size: Graphs kept.
    """

    def __init__(self, chain: Chain, inputs: list[str], cache_size: int):
        self.chain = chain
        self.inputs = inputs
        self.cache_size = max(int(cache_size), 1)
        self.graphs: collections.OrderedDict[tuple, Any] = collections.OrderedDict()
        #: Why a plan could not be captured, by plan key (such plans are polled).
        self.failures: dict[tuple, str] = {}
        #: Exit chains captured so far (each capture costs a warm-up and syncs).
        self.captures = 0

    def run(self, plan: ExitPlan, batch: int, addresses: dict[str, int],
            host_inputs: list[str], producers: list[int]) -> ExitResults | None:
        """One graph launch, one synchronization; None if the chain cannot be captured."""
        chain = self.chain
        bound = tuple((name, addresses[name]) for name in self.inputs)
        key = (plan.key, batch, bound, tuple(host_inputs))
        graph = self.graphs.get(key)
        if graph is None:
            if plan.key in self.failures:
                return None
            # The capture's warm-up reads the inputs: order it after their producers first.
            chain.start(producers)
            chain.untimed()
            try:
                graph = self._capture(plan, batch, addresses, host_inputs)
            except CudaError as exc:  # CaptureError, or any failure while making the graph
                self.failures[plan.key] = str(exc)
                log.warning("CUDA executor: the exit chain could not be captured as a CUDA "
                            "graph (%s); polling for this policy instead", exc)
                return None
            self.captures += 1
            remember(self.graphs, key, graph, self.cache_size)
        else:
            self.graphs.move_to_end(key)
        chain.start(producers)
        with nvtx_range("graph_launch"):
            graph.launch(chain.stream.handle)
        chain.synchronize()
        return chain.results(batch, with_device=True)

    def conditional_nodes(self) -> list[int]:
        """IF nodes of each cached graph (as captured; for tests and benchmarks)."""
        return [graph.conditional_nodes for graph in self.graphs.values()]

    def close(self) -> None:
        for graph in self.graphs.values():
            graph.close()
        self.graphs.clear()

    # ------------------------------------------------------------------ capture

    def _warm_up(self, steps: list[ChainStep], batch: int, addresses: dict[str, int],
                 streams: list[int]) -> None:
        """Runs the chain's stages once on every stream the capture will use, so that lazy
        allocations (TensorRT's first run, PyTorch's per-stream workspaces) happen before
        capturing, not during it."""
        from trt_exit.runtime.cuda.stream import stream_wait

        chain = self.chain
        main = chain.stream.handle
        for stream in streams:  # one after another: each waits for the previous one
            chain.sync_event.record(main)
            stream_wait(stream, chain.sync_event)
            for step in steps:
                if step.stage:
                    chain.stage(step.stage, stream, addresses, batch)
            chain.sync_event.record(stream)
            stream_wait(main, chain.sync_event)
        chain.synchronize()

    def _capture(self, plan: ExitPlan, batch: int, addresses: dict[str, int],
                 host_inputs: list[str]) -> Any:
        from trt_exit.runtime.cuda.graph import CaptureError, GraphCapture

        chain = self.chain
        kernels = chain.gate_kernels(conditional=True)
        main = chain.stream.handle
        steps = chain_steps(plan)
        levels = conditional_nodes(plan)
        streams = [main] + [chain.body_stream(level) for level in range(1, levels + 1)]
        chain.copy_inputs(main, host_inputs, batch)
        self._warm_up(steps, batch, addresses, streams)
        with GraphCapture(main, what=f"exit chain (batch {batch})",
                          context=chain.device_info.context) as capture:
            chain.begin(kernels, main, batch)
            chain.copy_inputs(main, host_inputs, batch)
            with contextlib.ExitStack() as bodies:
                stream, level = main, 0
                for step in steps:
                    if step.stage:
                        chain.stage(step.stage, stream, addresses, batch)
                    elif not step.branches:
                        chain.gate(kernels, stream, step.gate, batch)
                    else:
                        handle = capture.conditional_handle(stream)
                        chain.gate(kernels, stream, step.gate, batch, handle=handle)
                        level += 1
                        stream = bodies.enter_context(
                            capture.if_body(stream, handle, streams[level]))
            chain.copy_results(main, batch)
        graph = capture.instantiate()
        if graph.conditional_nodes != levels:
            graph.close()
            raise CaptureError(f"the graph holds {graph.conditional_nodes} IF nodes, the plan "
                               f"{levels}")
        try:
            graph.upload(main)
        except CaptureError:
            graph.close()
            raise
        return graph
