"""The graph strategy: the whole exit chain as one CUDA graph, one launch and one host wait.

The graph's first nodes copy the inputs into the executor's own input buffers (from pinned
staging for numpy inputs, device to device for ``__cuda_array_interface__`` inputs); then come
the begin kernel, the stages and the gates. After each gate that can stop the chain early comes
a conditional IF node whose body is the rest of the chain (nested), so stages after the exit
every sample took are never launched: the gate kernel sets the node's condition
(``cudaGraphSetConditional``) and the decision never reaches the host. Needs a CUDA 12.4+
driver.

A graph is specific to its plan (the gates' parameters are kernel arguments), its batch size
and which inputs come from the host. A device input's copy node is pointed at the caller's
array before each launch (``cudaGraphExecMemcpyNodeSetParams1D``, only when the address
changed), so a caller passing a fresh tensor every call reuses the same graph. Graphs are
cached, least recently used first out.

What can go wrong, and what happens (the plan is then polled, and :attr:`GraphStrategy.failures`
and a WARNING say why):

* making the graph (capture, instantiation, upload, a graph the driver reports other than the
  plan needs: :func:`~trt_exit.runtime.cuda_plan.graph_mismatch`);
* pointing a copy node at a new input address;
* the graph's first launch or the synchronization after it (the broken graph is closed and
  dropped). A later launch that fails raises: that graph worked before.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

from trt_exit.errors import CudaError
from trt_exit.profiling.nvtx import nvtx_range
from trt_exit.runtime.cuda_plan import ChainStep, ExitPlan, chain_steps, graph_mismatch, graph_ops
from trt_exit.runtime.cuda_strategies.chain import Chain
from trt_exit.runtime.executor import ExitResults

log = logging.getLogger(__name__)


def remember(cache: collections.OrderedDict, key: tuple, graph: Any, size: int) -> None:
    """Caches ``graph`` under ``key``, closing the least recently used beyond ``size``."""
    cache[key] = graph
    while len(cache) > size:
        _, old = cache.popitem(last=False)
        old.close()  # not in flight: every run ends with a synchronization


@dataclass
class ChainGraph:
    """A captured exit chain and the copy nodes of its device inputs.

    Attributes:
        graph: The instantiated graph (:class:`~trt_exit.runtime.cuda.graph.GraphExec`).
        copies: The memcpy node that copies each device input in, by input name.
        batch: The batch size it was captured for.
    """

    graph: Any
    copies: dict[str, Any] = field(default_factory=dict)
    batch: int = 0

    @property
    def census(self):
        return self.graph.census

    def close(self) -> None:
        self.graph.close()


class GraphStrategy:
    """Captures, caches and launches exit-chain graphs.

    Args:
        chain: The executor's stream, buffers and enqueue steps.
        inputs: The model's input names, in the manifest's order.
        cache_size: Graphs kept.
    """

    def __init__(self, chain: Chain, inputs: list[str], cache_size: int):
        self.chain = chain
        self.inputs = list(inputs)
        self.cache_size = max(int(cache_size), 1)
        self.graphs: collections.OrderedDict[tuple, ChainGraph] = collections.OrderedDict()
        #: Why a plan's chain does not run as a graph, by plan key (such plans are polled).
        self.failures: dict[tuple, str] = {}
        #: Exit chains captured so far (each capture costs a warm-up and syncs).
        self.captures = 0

    def key(self, plan: ExitPlan, batch: int, host_inputs: list[str]) -> tuple:
        """A graph's cache key: plan, batch and which inputs come from the host (not where a
        device input lives: the copy node follows it)."""
        return (plan.key, batch, tuple(name in host_inputs for name in self.inputs))

    def run(self, plan: ExitPlan, batch: int, addresses: dict[str, int],
            host_inputs: list[str], producers: list[int]) -> ExitResults | None:
        """One graph launch, one synchronization; None where this plan's chain does not run
        as a graph (the reason is in :attr:`failures`)."""
        chain = self.chain
        key = self.key(plan, batch, host_inputs)
        graph = self.graphs.get(key)
        if graph is None:
            if plan.key in self.failures:
                return None
            # The capture's warm-up reads the inputs: order it after their producers first.
            chain.start(producers)
            chain.untimed()
            try:
                graph = self.capture(plan, batch, addresses, host_inputs)
            except CudaError as exc:  # CaptureError, or any failure while making the graph
                self._fail(plan, f"the exit chain could not be captured as a CUDA graph: {exc}")
                return None
            self.captures += 1
            remember(self.graphs, key, graph, self.cache_size)
        else:
            self.graphs.move_to_end(key)
        try:
            self.point_copies(graph, addresses)
        except CudaError as exc:
            self._drop(key, plan, f"the graph's input copy could not be pointed at the new "
                                  f"input: {exc}")
            return None
        chain.start(producers)
        first = graph.graph.launches == 0
        try:
            with nvtx_range("graph_launch"):
                graph.graph.launch(chain.stream.handle)
            chain.synchronize()
        except CudaError as exc:
            if not first:
                raise
            self._drop(key, plan, f"the graph's first launch failed: {exc}")
            return None
        return chain.results(batch, with_device=True)

    def point_copies(self, graph: ChainGraph, addresses: dict[str, int]) -> None:
        """Points the graph's device-input copy nodes at this run's arrays."""
        chain = self.chain
        for name, node in graph.copies.items():
            graph.graph.set_copy(node, chain.addresses[name], addresses[name],
                                 chain.input_bytes(name, graph.batch))

    def census_of(self, plan: ExitPlan, batch: int):
        """What the driver holds in a cached graph of ``plan`` at ``batch`` (the most recently
        used, whatever its inputs' kind), None if there is none."""
        for key in reversed(self.graphs):
            if key[0] == plan.key and key[1] == batch:
                return self.graphs[key].census
        return None

    def conditional_nodes(self) -> list[int]:
        """IF nodes of each cached graph, as the driver reports them."""
        return [graph.graph.conditional_nodes for graph in self.graphs.values()]

    def close(self) -> None:
        for graph in self.graphs.values():
            graph.close()
        self.graphs.clear()

    def _fail(self, plan: ExitPlan, reason: str) -> None:
        self.failures[plan.key] = reason
        log.warning("CUDA executor: %s; polling for this policy instead", reason)

    def _drop(self, key: tuple, plan: ExitPlan, reason: str) -> None:
        """Closes and forgets a graph that cannot run, and polls its plan from now on."""
        graph = self.graphs.pop(key, None)
        if graph is not None:
            with contextlib.suppress(CudaError):  # a broken graph may not close cleanly
                graph.close()
        self._fail(plan, reason)

    # ------------------------------------------------------------------ capture

    def _copy_in(self, stream: int, batch: int, addresses: dict[str, int],
                 host_inputs: list[str]) -> None:
        """Enqueues copying every input into the executor's buffers (outside a capture: the
        warm-up then reads real values)."""
        for name in self.inputs:
            self.chain.copy_input(stream, name, self._source(name, addresses, host_inputs),
                                  batch)

    def _source(self, name: str, addresses: dict[str, int], host_inputs: list[str]) -> int:
        return self.chain.staging[name].address if name in host_inputs else addresses[name]

    def _warm_up(self, steps: list[ChainStep], batch: int, streams: list[int]) -> None:
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
                    chain.stage(step.stage, stream, chain.addresses, batch)
            chain.sync_event.record(stream)
            stream_wait(main, chain.sync_event)
        chain.synchronize()

    def capture(self, plan: ExitPlan, batch: int, addresses: dict[str, int],
                host_inputs: list[str], conditional: bool = True,
                depth: int | None = None) -> ChainGraph:
        """Captures ``plan``'s chain (:func:`~trt_exit.runtime.cuda_plan.graph_ops`), checks
        what the driver holds against the plan and uploads it.

        Args:
            plan: The plan.
            batch: Rows.
            addresses: This run's input addresses (device inputs are copied from there).
            host_inputs: Inputs staged in pinned memory.
            conditional: IF nodes after branching gates (the graph strategy); False: one flat
                graph with the plain gate kernels (the benchmark's ideal).
            depth: Stop after this exit's gate (flat graphs).

        Raises:
            CudaError: Anything failed (:class:`~trt_exit.runtime.cuda.graph.CaptureError`
                for the capture itself and for a graph other than the plan needs).
        """
        from trt_exit.runtime.cuda.graph import CaptureError, GraphCapture, node_type

        chain = self.chain
        kernels = chain.gate_kernels(conditional=conditional)
        main = chain.stream.handle
        ops = graph_ops(plan, self.inputs, conditional, depth)
        levels = sum(op.opens_if for op in ops)
        streams = [main] + [chain.body_stream(level) for level in range(1, levels + 1)]
        self._copy_in(main, batch, addresses, host_inputs)
        self._warm_up(chain_steps(plan), batch, streams)
        copies: dict[str, Any] = {}
        what = f"exit chain (batch {batch}{'' if conditional else ', flat'})"
        with GraphCapture(main, what=what, context=chain.device_info.context) as capture:
            with contextlib.ExitStack() as bodies:
                stream, level = main, 0
                for op in ops:
                    if op.kind == "copy_input":
                        chain.copy_input(main, op.name,
                                         self._source(op.name, addresses, host_inputs), batch)
                        if op.name not in host_inputs:
                            copies[op.name] = capture.last_node(main)
                    elif op.kind == "begin":
                        chain.begin(kernels, main, batch)
                    elif op.kind == "stage":
                        chain.stage(op.name, stream, chain.addresses, batch)
                    elif op.kind == "gate" and op.opens_if:
                        handle = capture.conditional_handle(stream)
                        chain.gate(kernels, stream, op.gate, batch, handle=handle)
                        level += 1
                        stream = bodies.enter_context(
                            capture.if_body(stream, handle, streams[level]))
                    elif op.kind == "gate":
                        chain.gate(kernels, stream, op.gate, batch)
                    elif op.kind == "copy_results":
                        bodies.close()  # back on the main stream, after the outermost IF node
                        chain.copy_results(main, batch)
        graph = ChainGraph(capture.instantiate(), copies, batch)
        try:
            problem = (graph_mismatch(plan, graph.census) if conditional else
                       "" if graph.census.conditional_nodes == 0 else
                       f"the flat graph holds {graph.census.conditional_nodes} IF nodes")
            wrong = [name for name, node in copies.items() if node_type(node) != "memcpy"]
            if wrong:
                problem = f"the copies of inputs {wrong} were not captured as memcpy nodes"
            if problem:
                raise CaptureError(f"{what}: {problem}")
            for name, node in copies.items():  # what each copy node reads as captured
                graph.graph.copy_sources[int(node)] = addresses[name]
            graph.graph.upload(main)
        except BaseException:
            with contextlib.suppress(CudaError):
                graph.close()
            raise
        return graph
