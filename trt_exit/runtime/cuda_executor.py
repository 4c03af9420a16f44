"""The CUDA-stream executor: exit decisions on the GPU, one host synchronization per inference.

Stages run as :class:`~trt_exit.runtime.backends.base.DeviceStageRunner` s (the torch backend
on CUDA, or TensorRT) on one stream, over device buffers allocated once: every tensor name gets
one buffer of ``max_batch`` rows, so segment k's output buffer *is* segment k+1's input, and
stages that need scratch memory share one block sized to the largest. After each exit head a
gate kernel (:mod:`trt_exit.runtime.gate`) decides on the GPU which samples stop there, keeps
earlier results, and says whether anything is left to run. Three strategies drive the chain:

* ``graph``: the whole chain is one CUDA graph: after each gate a conditional IF node whose body
  is the rest of the chain (nested), so skipped stages are never even launched. One graph
  launch and one host synchronization per inference. Needs a CUDA 12.4+ driver.
* ``poll``: the gate writes its decision to mapped pinned memory; the host waits on an event
  after each exit before enqueuing the next segment (any CUDA version).
* ``eager``: the plain host loop: after each exit the confidence and output are copied back and
  the host decides (:func:`~trt_exit.runtime.gate.gate_on_host`). The reference, and the
  baseline benchmarks compare against.

The plan (which stages and gates run, in the order every strategy walks them) is
:mod:`trt_exit.runtime.cuda_plan`; each strategy is a module of
:mod:`trt_exit.runtime.cuda_strategies` (``graph``, ``poll``, ``eager``) over one ``Chain``
(the stream, buffers, gate kernels and enqueue steps they share). ``auto`` picks graph where
the driver supports conditional nodes, else poll, else eager (only a strategy that can work),
and logs a fallback at WARNING. When a policy's chain cannot run as a graph (a stage that
records events or calls host code inside a conditional body, a graph the driver reports other
than the plan needs, a first launch that fails) the executor logs why and polls that policy;
:meth:`CudaExecutor.describe` records it.

Batches are not compacted on the GPU: the chain continues for the whole batch while any sample
is still running, and samples that exited keep their earlier result. Results are identical
across strategies for the same input and policy (deadline decisions depend on time, so they are
identical only away from the budget).

Inputs are numpy arrays (staged through pinned memory), or any ``__cuda_array_interface__``
object (torch, CuPy, pycuda). Poll and eager read device inputs in place; a graph copies every
input into the executor's own buffer as its first nodes, and points a device input's copy at
the caller's array before each launch, so graphs are cached per (policy, batch) whatever array
a caller passes. Results stay valid on the GPU until the next run (``results.device``, which
exports the executor's stream); a consumer reading them asynchronously on another stream hands
them back with :meth:`CudaExecutor.wait_for_consumer`. Not thread-safe: one executor per
thread.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from trt_exit.errors import ConfigError, CudaError, CudaUnavailableError, InputError
from trt_exit.manifest import Manifest
from trt_exit.profiling.nvtx import nvtx_range
from trt_exit.runtime.backends.base import Backend, DeviceStageRunner
from trt_exit.runtime.cuda_plan import (  # noqa: F401  plan_exits, ExitPlan: public API here too
    ChainStep,
    ExitPlan,
    StrategySelector,
    chain_steps,
    choose_strategy,
    conditional_nodes,
    plan_exits,
)
from trt_exit.runtime.cuda_strategies.chain import Chain, DeviceResults  # noqa: F401  public
from trt_exit.runtime.cuda_strategies.eager import run_all_exits, run_eager
from trt_exit.runtime.cuda_strategies.graph import GraphStrategy, remember
from trt_exit.runtime.cuda_strategies.poll import run_poll
from trt_exit.runtime.executor import ExitResults, create_backend, default_policy, validate_inputs
from trt_exit.runtime.gate import GateParams
from trt_exit.runtime.policies import AllExitsPolicy, Policy

log = logging.getLogger(__name__)

STRATEGIES = ("graph", "poll", "eager")


# --------------------------------------------------------------------------- the executor


class CudaExecutor:
    """Runs a multi-exit model on the GPU with the exit decisions made on the GPU.

    Args:
        manifest: A :class:`Manifest` or the path of one.
        backend: ``"torch"`` (default, CUDA), ``"tensorrt"``, or a :class:`Backend` whose stage
            runners are :class:`DeviceStageRunner` s.
        precision: ``"fp32"``, ``"fp16"`` (or ``"int8"`` with TensorRT).
        policy: Default exit policy (default: the manifest's tuned thresholds).
        strategy: ``"auto"`` (graph where supported, else poll), ``"graph"``, ``"poll"`` or
            ``"eager"``.
        max_batch: Largest batch; buffers are allocated for it once.
        device: CUDA device ordinal.
        backend_options: Keyword options of the backend (the torch backend's device defaults to
            this executor's GPU).
        graph_cache_size: Captured graphs kept (one per policy and batch size; numpy and device
            inputs get separate graphs).
        device_timing: Time every run on the GPU too (:attr:`last_device_ms`): CUDA events on
            the executor's stream, one before the run's first work and one before its last
            synchronization.
        sync_mode: How the host waits for the GPU: ``"spin"`` (lowest latency, a busy core),
            ``"yield"``, ``"blocking"`` (sleeps on a primitive) or ``"auto"`` (the driver's
            heuristic). It is a flag of the GPU's primary context, so PyTorch and every other
            user of that GPU in the process wait the same way. Default: ``spin`` on Jetson,
            the driver's own choice elsewhere (:func:`~trt_exit.runtime.cuda.api.
            default_sync_mode`); :attr:`sync_mode` says what is in effect.

    Raises:
        CudaUnavailableError: No usable GPU (the message says what to use instead).
        ConfigError: A stage runner that cannot enqueue on a stream, outputs that are not
            float32, or a ``max_batch`` above what the runners support.
    """

    def __init__(self, manifest: Manifest | str | Path, backend: str | Backend = "torch",
                 precision: str = "fp32", policy: Policy | None = None, strategy: str = "auto",
                 max_batch: int = 8, device: int = 0,
                 backend_options: dict[str, Any] | None = None, graph_cache_size: int = 8,
                 device_timing: bool = False, sync_mode: str | None = None):
        from trt_exit.runtime.cuda.api import (
            current_sync_mode,
            default_sync_mode,
            set_sync_mode,
            sync_flag,
            use_device,
        )

        if strategy not in ("auto", *STRATEGIES):
            raise ConfigError(f"unknown strategy {strategy!r}; choose auto, graph, poll or eager")
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"max_batch must be a positive int, got {max_batch!r}")
        self.manifest = manifest if isinstance(manifest, Manifest) else Manifest.load(manifest)
        self.device_info = use_device(device)
        self.device = device
        default, basis = default_sync_mode(self.device_info.integrated)
        sync_flag(sync_mode or default)  # an unknown name fails before anything is allocated
        #: Why :attr:`sync_mode` (asked for, or the platform default and what it rests on).
        self.sync_mode_basis = "asked for" if sync_mode else basis
        if sync_mode is None and default == "auto":
            #: How the host waits for the GPU (``auto``, ``spin``, ``yield``, ``blocking``).
            self.sync_mode = current_sync_mode()  # the driver's (or the process's) choice
        elif sync_mode is not None:
            self.sync_mode = set_sync_mode(sync_mode)  # refused: CudaError, as asked
        else:
            try:
                self.sync_mode = set_sync_mode(default)
            except CudaError as exc:
                self.sync_mode = current_sync_mode()
                self.sync_mode_basis = f"the default {default} could not be set: {exc}"
                log.warning("CUDA executor: the %s host-wait mode could not be set (%s); "
                            "waiting in %s mode", default, exc, self.sync_mode)
        self.precision = precision
        self.max_batch = max_batch
        self.num_exits = self.manifest.num_exits
        self.graph_cache_size = max(int(graph_cache_size), 1)
        self.runners: dict[str, DeviceStageRunner] = {}
        self.chain: Chain | None = None
        self._graph: GraphStrategy | None = None
        self._kernel_reasons: dict[bool, str] = {}
        self._full = None
        self._device_timing = device_timing
        #: GPU time of the last run (ms) with ``device_timing``, else None.
        self.last_device_ms: float | None = None
        self._plans: dict[int, tuple[Policy, str, ExitPlan]] = {}
        options = dict(backend_options or {})
        if backend == "torch":
            options.setdefault("device", f"cuda:{device}")
        elif backend == "tensorrt":
            options.setdefault("device", device)
        self.policy = policy or default_policy(self.manifest, precision)
        self.policy.validate(self.num_exits)
        self.backend = create_backend(backend, **options)
        try:
            self._open_runners()
            self.chain = Chain(self.manifest, self.runners, max_batch, self.device_info,
                               device_timing)
        except BaseException:
            self.close()
            raise
        chain = self.chain
        # The chain's buffers, for callers that bind them (owned by the chain).
        self.stream, self.buffers, self.specs = chain.stream, chain.buffers, chain.specs
        self.num_outputs = chain.num_outputs
        self._graph = GraphStrategy(chain, [s.name for s in self.manifest.inputs],
                                    self.graph_cache_size)
        self._selector = StrategySelector(self.graph_unavailable,
                                          lambda: self.kernels_unavailable(conditional=False))
        self.strategy = self._selector.choose(strategy)
        #: Why :attr:`strategy` is not the one asked for ("" if it is), logged at WARNING.
        self.fallback_reason = self._selector.reason(strategy)

    @property
    def device_timing(self) -> bool:
        """Whether runs are timed on the GPU too (:attr:`last_device_ms`)."""
        return self._device_timing

    @device_timing.setter
    def device_timing(self, value: bool) -> None:
        self._device_timing = bool(value)
        if self.chain is not None:
            self.chain.device_timing = self._device_timing

    @property
    def captures(self) -> int:
        """Exit chains captured as graphs so far (each capture costs a warm-up and syncs)."""
        return self._graph.captures if self._graph is not None else 0

    # ------------------------------------------------------------------ setup

    def _open_runners(self) -> None:
        for stage in self.manifest.stages:
            runner = self.backend.open_stage(self.manifest, stage, self.precision)
            self.runners[stage.name] = runner
            if not isinstance(runner, DeviceStageRunner):
                raise ConfigError(
                    f"backend {self.backend.name!r} runs stages on the host only; the CUDA "
                    f"executor needs device stage runners (backend 'torch' on CUDA or "
                    f"'tensorrt'); use trt_exit.runtime.executor.Executor for this backend")
            limit = getattr(runner, "max_batch", None)
            if limit is not None and self.max_batch > int(limit):
                raise ConfigError(
                    f"max_batch {self.max_batch} exceeds stage {stage.name}'s limit of {limit} "
                    f"(its engine's optimization profile): rebuild the engines for a larger "
                    f"batch or lower max_batch")
        self._state_providers = [
            [int(t.name.split("_")[1]) for t in self.manifest.exit_stage(k).inputs
             if t.name.endswith("_state")]
            for k in range(self.num_exits)
        ]

    def kernels_unavailable(self, conditional: bool) -> str:
        """Why the gate kernels of graph (``conditional``) or poll mode cannot load ("" if they
        can): an NVRTC newer than the driver, no NVRTC, or a module the driver refuses."""
        if conditional not in self._kernel_reasons:
            reason = ""
            try:
                self.chain.gate_kernels(conditional)
            except CudaError as exc:
                reason = str(exc)
            variant = "graph" if conditional else "poll"
            self._kernel_reasons[conditional] = (
                f"the {variant}-mode gate kernel does not load: {reason}" if reason else "")
        return self._kernel_reasons[conditional]

    def graph_unavailable(self) -> str:
        """Why the graph strategy cannot run here ("" if it can)."""
        if not self.device_info.conditional_nodes:
            from trt_exit.runtime.cuda.api import format_version

            return (f"the driver supports CUDA {format_version(self.device_info.driver_version)}"
                    f"; conditional graph nodes need 12.4+ (JetPack 6.1+)")
        return self.kernels_unavailable(conditional=True)

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Releases graphs, runners, the backend, kernels and every buffer (in that order)."""
        from trt_exit.runtime.cuda.api import make_current

        with contextlib.suppress(CudaError):
            make_current(self.device)
        chain = getattr(self, "chain", None)
        if chain is not None and getattr(chain, "stream", None) is not None and \
                chain.stream.handle:
            with contextlib.suppress(CudaError):
                chain.stream.synchronize()
        if getattr(self, "_graph", None) is not None:
            self._graph.close()
        if self._full is not None:
            self._full["runner"].close()
            for graph in self._full["graphs"].values():
                graph.close()
            self._full = None
        for runner in self.runners.values():
            runner.close()
        self.runners.clear()
        self.backend.close()
        if chain is not None:
            chain.close()

    def __enter__(self) -> "CudaExecutor":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ------------------------------------------------------------------ inputs

    def _bind(self, inputs: Any) -> tuple[int, dict[str, int], list[str], list[int]]:
        """Validates inputs; stages host arrays in pinned memory.

        Returns:
            ``(batch, addresses, host input names, producer streams to wait for)``.
        """
        from trt_exit.runtime.cuda.memory import external_array

        fast = self._bind_one_device_array(inputs)
        if fast is not None:
            return fast
        feeds = validate_inputs(self.manifest, inputs, device_arrays=True)
        batch = 0
        addresses = dict(self.chain.addresses)
        host_inputs: list[str] = []
        producers: list[int] = []
        for name, value in feeds.items():
            spec = self.specs[name]
            if isinstance(value, np.ndarray):
                rows = value.shape[0]
            else:
                array = external_array(name, value, self.device)
                rows = array.shape[0]
                if array.dtype != np.dtype(spec.dtype):
                    raise InputError(f"input {name!r} has dtype {array.dtype}, expected "
                                     f"{spec.dtype}")
            if rows > self.max_batch:
                raise InputError(
                    f"input {name!r} has a batch of {rows}, more than this executor's max_batch "
                    f"of {self.max_batch} (its buffers and engines are sized for that): split "
                    f"the batch, or create the executor with max_batch={rows}")
            batch = rows
            if isinstance(value, np.ndarray):
                np.copyto(self.chain.staging[name].array(value.shape, value.dtype), value)
                host_inputs.append(name)
            else:
                addresses[name] = array.address
                if array.stream is not None:
                    producers.append(array.stream)
        return batch, addresses, host_inputs, producers

    def _bind_one_device_array(self, value: Any):
        """:meth:`_bind` for the streaming case: one device array for a one-input model,
        checked in one pass (the general path reads the array interface twice). None when the
        case does not apply."""
        from trt_exit.runtime.cuda.memory import external_array

        if len(self.manifest.inputs) != 1 or isinstance(value, (Mapping, np.ndarray)) or \
                hasattr(value, "__array_interface__"):
            return None
        try:
            interface = value.__cuda_array_interface__
        except AttributeError:  # e.g. a CPU torch tensor: the general path converts it
            return None
        spec = self.manifest.inputs[0]
        shape = tuple(interface["shape"])
        if len(shape) != len(spec.shape) or shape[1:] != tuple(spec.shape[1:]) or shape[0] < 1:
            return None  # the general path raises the detailed message
        array = external_array(spec.name, value, self.device, interface)
        if array.dtype != np.dtype(spec.dtype):
            raise InputError(f"input {spec.name!r} has dtype {array.dtype}, expected {spec.dtype}")
        if shape[0] > self.max_batch:
            raise InputError(
                f"input {spec.name!r} has a batch of {shape[0]}, more than this executor's "
                f"max_batch of {self.max_batch} (its buffers and engines are sized for that): "
                f"split the batch, or create the executor with max_batch={shape[0]}")
        addresses = dict(self.chain.addresses)
        addresses[spec.name] = array.address
        return int(shape[0]), addresses, [], [] if array.stream is None else [array.stream]

    # ------------------------------------------------------------------ running

    def plan(self, policy: Policy | None = None) -> ExitPlan:
        """The exit plan of ``policy`` (default: the executor's), cached per policy object and
        recomputed if its fields changed."""
        policy = policy or self.policy
        snapshot = repr(policy)  # dataclass fields: thresholds, exit, budget, latencies
        cached = self._plans.get(id(policy))
        if cached is not None and cached[0] is policy and cached[1] == snapshot:
            return cached[2]
        policy.validate(self.num_exits)  # normalizes thresholds: snapshot again
        snapshot = repr(policy)
        plan = plan_exits(policy, self.num_exits, self._state_providers)
        if len(self._plans) >= 64:
            self._plans.clear()
        self._plans[id(policy)] = (policy, snapshot, plan)
        return plan

    def run(self, inputs: Any, policy: Policy | None = None,
            strategy: str | None = None) -> ExitResults:
        """Runs one batch.

        Args:
            inputs: One array (B, ...) or a dict by input name: numpy (float32), or
                ``__cuda_array_interface__`` objects on this executor's GPU (read in place).
            policy: Overrides the executor's policy for this run.
            strategy: Overrides the executor's strategy for this run (``graph`` falls back to
                ``poll`` where graphs are not available, with the reason logged).

        Returns:
            Per-sample results; ``strategy`` and ``host_syncs`` (as counted by the CUDA layer)
            say how the run went.
        """
        from trt_exit.runtime.cuda.api import make_current
        from trt_exit.runtime.cuda.stream import host_syncs

        make_current(self.device)
        strategy = self._strategy(strategy)
        policy = policy or self.policy
        plan = None if isinstance(policy, AllExitsPolicy) else self.plan(policy)  # validates
        chain = self.chain
        syncs_before = host_syncs()
        began = time.perf_counter()
        chain.untimed()
        with nvtx_range(f"infer_{strategy}", "full"):
            batch, addresses, host_inputs, producers = self._bind(inputs)
            if plan is None:
                results = run_all_exits(chain, batch, addresses, host_inputs, producers)
                strategy = "eager"
            else:
                if strategy == "graph":
                    results = self._graph.run(plan, batch, addresses, host_inputs, producers)
                    if results is None:
                        strategy = "poll" if not self.kernels_unavailable(False) else "eager"
                if strategy == "poll":
                    results = run_poll(chain, plan, batch, addresses, host_inputs, producers)
                elif strategy == "eager":
                    results = run_eager(chain, plan, batch, addresses, host_inputs, producers,
                                        began)
        results.latency_ms = (time.perf_counter() - began) * 1e3
        results.strategy = strategy
        results.host_syncs = host_syncs() - syncs_before
        results.value_columns = self.manifest.value_columns
        self.last_device_ms = chain.device_ms()
        return results

    def _strategy(self, strategy: str | None) -> str:
        if strategy is None or strategy == "auto" or strategy == self.strategy:
            return self.strategy
        if strategy not in STRATEGIES:
            raise ConfigError(f"unknown strategy {strategy!r}; choose auto, graph, poll or eager")
        return self._selector.choose(strategy)

    def wait_for_consumer(self, stream: Any) -> None:
        """Orders this executor's next run after the work enqueued so far on ``stream``.

        Call it after enqueuing asynchronous reads of :attr:`ExitResults.device` on another
        stream: the next run overwrites those buffers on the executor's stream, and waits for
        the reads first (an event, no host wait). Not needed when that stream is synchronized
        before the next run, or when the results are only read on the host.

        Args:
            stream: The consumer's stream: a torch, CuPy or Numba stream, or a ``cudaStream_t``
                as an int.
        """
        from trt_exit.runtime.cuda.api import make_current
        from trt_exit.runtime.cuda.stream import stream_handle, wait_for_producer

        make_current(self.device)
        wait_for_producer(self.chain.stream, stream_handle(stream), self.chain.consumer_event)

    def graph_conditional_nodes(self) -> list[int]:
        """IF nodes of each cached exit-chain graph, as the driver reports them (for tests and
        benchmarks)."""
        return self._graph.conditional_nodes()

    def graph_census(self, policy: Policy | None = None, batch: int = 1) -> dict | None:
        """What the driver holds in the cached graph of ``policy`` at ``batch`` (node types per
        nesting level; :func:`~trt_exit.runtime.cuda.graph.census`), None if none is cached."""
        census = self._graph.census_of(self.plan(policy), batch)
        return None if census is None else census.to_dict()

    @property
    def graph_failures(self) -> list[str]:
        """Why policies' chains do not run as graphs (they poll), one reason per policy."""
        return list(self._graph.failures.values())

    # ------------------------------------------------------------------ baseline and profile

    def run_full_model(self, inputs: Any, strategy: str | None = None) -> ExitResults:
        """Runs the no-exit baseline (backbone and final head as one stage), as one CUDA graph
        with ``strategy="graph"`` (the default where graphs work), else enqueued directly.

        Its graphs read device inputs in place, so they are cached per input address (unlike
        the exit chain's, which copy their inputs in): it is the benchmarks' baseline."""
        from trt_exit.runtime.cuda.api import make_current
        from trt_exit.runtime.cuda.graph import GraphCapture
        from trt_exit.runtime.cuda.stream import host_syncs

        make_current(self.device)
        strategy = self._strategy(strategy)
        if self._full is None:
            runner = self.backend.open_full_model(self.manifest, self.precision)
            if not isinstance(runner, DeviceStageRunner):
                runner.close()
                raise ConfigError(f"backend {self.backend.name!r} cannot enqueue the full model")
            self._share_scratch(runner)
            self._full = {"runner": runner, "graphs": collections.OrderedDict(), "failed": ""}
        runner = self._full["runner"]
        syncs_before = host_syncs()
        began = time.perf_counter()
        self.chain.untimed()
        batch, addresses, host_inputs, producers = self._bind(inputs)
        final = self.num_exits - 1
        main = self.chain.stream.handle

        def enqueue(stream: int) -> None:
            self.chain.copy_inputs(stream, host_inputs, batch)
            with nvtx_range("full"):
                runner.enqueue(stream, addresses, batch)

        used = "eager"
        if strategy == "graph" and not self._full["failed"]:
            bound = tuple((s.name, addresses[s.name]) for s in self.manifest.inputs)
            key = (batch, bound, tuple(host_inputs))
            graph = self._full["graphs"].get(key)
            if graph is None:
                try:
                    self.chain.start(producers)
                    self.chain.untimed()
                    enqueue(main)  # warm-up outside the capture
                    self.chain.synchronize()
                    with GraphCapture(main, what="full model",
                                      context=self.device_info.context) as capture:
                        enqueue(main)
                    graph = capture.instantiate()
                    graph.upload(main)
                    remember(self._full["graphs"], key, graph, self.graph_cache_size)
                except CudaError as exc:  # CaptureError, or any failure while making the graph
                    if graph is not None:
                        graph.close()
                        graph = None
                    self._full["failed"] = str(exc)
                    log.warning("CUDA executor: the full model could not be captured (%s)", exc)
            if graph is not None:
                self.chain.start(producers)
                graph.launch(main)
                used = "graph"
        if used == "eager":
            self.chain.start(producers)
            enqueue(main)
        confidence, output = self.chain.readback(main, final, batch)
        self.chain.synchronize()
        self.last_device_ms = self.chain.device_ms()
        return ExitResults(np.full(batch, final, np.int32), output.copy(), confidence.copy(),
                           self.manifest.task, (time.perf_counter() - began) * 1e3,
                           strategy=used, host_syncs=host_syncs() - syncs_before,
                           value_columns=self.manifest.value_columns)

    def _share_scratch(self, runner: DeviceStageRunner) -> None:
        """Hands ``runner`` the shared scratch block, or a block of its own if it needs more."""
        from trt_exit.runtime.cuda.memory import DeviceBuffer

        need = runner.scratch_bytes()
        if need <= 0:
            return
        block = self.chain.scratch
        if block is None or block.size_bytes < need:
            block = self.chain.own(DeviceBuffer(need, f"{runner.name} scratch"))
        runner.set_scratch(block.address, block.size_bytes)

    def profile_stages(self, inputs: Any, repeats: int = 100, warmup: int = 10,
                       chain_overheads: bool = False) -> dict[str, float]:
        """Each stage's own GPU time (median ms), timed alone with CUDA events.

        Each stage is captured into a graph of its own where possible, so the time is the GPU
        work without host launch gaps; otherwise its direct enqueue is timed. The chain is first
        run once on ``inputs`` so every stage reads real values.

        Args:
            inputs: As for :meth:`run`.
            repeats: Timed launches per stage.
            warmup: Untimed launches first.
            chain_overheads: Also time what every chain adds to its stages, each alone in a
                graph: ``copy_inputs`` (the inputs copied into the executor's buffers, device to
                device for device inputs: the graph strategy's first nodes), ``gate_begin``
                (the begin kernel), ``gate`` (one gate kernel, threshold mode) and
                ``copy_results`` (the results copied to pinned host memory).
        """
        from trt_exit.runtime.cuda.api import make_current

        make_current(self.device)
        self.run(inputs, AllExitsPolicy())
        batch, addresses, host_inputs, _ = self._bind(inputs)
        times: dict[str, float] = {}
        for stage in self.manifest.stages:
            runner = self.runners[stage.name]
            times[stage.name] = self._time_alone(
                stage.name, lambda s, r=runner: r.enqueue(s, addresses, batch), repeats, warmup)
        if chain_overheads:
            chain = self.chain

            def copy_inputs(stream: int) -> None:
                for spec in self.manifest.inputs:
                    source = (chain.staging[spec.name].address if spec.name in host_inputs
                              else addresses[spec.name])
                    chain.copy_input(stream, spec.name, source, batch)

            times["copy_inputs"] = self._time_alone("copy_inputs", copy_inputs, repeats, warmup)
            kernels = self.chain.gate_kernels(conditional=False)
            params = GateParams(0, use_threshold=True, threshold=1.0)
            times["gate_begin"] = self._time_alone(
                "gate_begin", lambda s: self.chain.begin(kernels, s, batch), repeats, warmup)
            times["gate"] = self._time_alone(
                "gate", lambda s: self.chain.gate(kernels, s, params, batch), repeats, warmup)
            times["copy_results"] = self._time_alone(
                "copy_results", lambda s: self.chain.copy_results(s, batch), repeats, warmup)
        return times

    def time_flat_chain(self, inputs: Any, policy: Policy, depth: int, repeats: int = 100,
                        warmup: int = 10) -> float:
        """Median GPU time (ms) of exactly the work the chain does when every sample leaves at
        exit ``depth``, as one flat CUDA graph: the input copies, the begin kernel, the stages
        and gates of exits 0..depth (the plain gate kernel, no conditional node) and the result
        copy. One launch per timing, CUDA events around it: no host launch gaps between
        pieces. The graph strategy's device time at that depth is held to it.

        Raises:
            CudaError: The flat graph could not be made or run.
        """
        from trt_exit.runtime.cuda.api import make_current

        make_current(self.device)
        plan = self.plan(policy)
        batch, addresses, host_inputs, producers = self._bind(inputs)
        self.chain.start(producers)
        self.chain.untimed()
        graph = self._graph.capture(plan, batch, addresses, host_inputs, conditional=False,
                                    depth=depth)
        try:
            return self._time_launches(graph.graph.launch, repeats, warmup)
        finally:
            graph.close()

    def _time_alone(self, what: str, enqueue, repeats: int, warmup: int) -> float:
        """Median GPU time (ms) of ``enqueue(stream)``, captured alone in a graph if it can be."""
        from trt_exit.runtime.cuda.graph import GraphCapture

        main = self.chain.stream.handle
        graph = None
        try:
            with GraphCapture(main, what=what, context=self.device_info.context) as capture:
                enqueue(main)
            graph = capture.instantiate()
        except CudaError as exc:
            log.info("profiling %s without a graph: %s", what, exc)
        try:
            return self._time_launches(graph.launch if graph is not None else enqueue, repeats,
                                       warmup)
        finally:
            if graph is not None:
                graph.close()

    def _time_launches(self, launch, repeats: int, warmup: int) -> float:
        """Median GPU time (ms) of ``launch(stream)``: CUDA events on the executor's stream
        around each launch, one host wait each."""
        from trt_exit.runtime.cuda.stream import Event

        main = self.chain.stream.handle
        samples = []
        with Event(timing=True) as start, Event(timing=True) as end:
            for i in range(warmup + repeats):
                start.record(main)
                launch(main)
                end.record(main)
                end.synchronize()
                if i >= warmup:
                    samples.append(end.elapsed_ms(start))
        return float(np.median(samples))

    def describe(self) -> dict[str, Any]:
        """Device, backend and strategies, for reports: the default strategy and why it is not
        the one asked for, how every other requested strategy ran, and why a policy's chain
        could not run as a graph."""
        ran_as = {requested: {"strategy": chosen, "reason": reason}
                  for requested, (chosen, reason) in self._selector.choices.items()}
        return {"executor": "cuda", "strategy": self.strategy,
                "fallback_reason": self.fallback_reason, "strategies": ran_as,
                "graph_failures": sorted(set(self._graph.failures.values())),
                "sync_mode": self.sync_mode, "sync_mode_basis": self.sync_mode_basis,
                "max_batch": self.max_batch, "device": self.device_info.to_dict(),
                **self.backend.describe()}


def create_executor(manifest: Manifest | str | Path, backend: str = "torch",
                    precision: str = "fp32", policy: Policy | None = None,
                    strategy: str = "auto", fallback: bool = True, **options: Any):
    """The CUDA executor where a GPU is usable, else (with ``fallback``) the host executor.

    Without a GPU the reason is logged and the host :class:`~trt_exit.runtime.executor.Executor`
    runs the same model with ONNX Runtime (``tensorrt`` requested) or torch on the CPU
    (``torch`` requested), under the same policy.

    Raises:
        CudaUnavailableError: No GPU and ``fallback`` is False.
    """
    from trt_exit.runtime.cuda.api import cuda_status
    from trt_exit.runtime.executor import Executor

    status = cuda_status()
    if status.available:
        return CudaExecutor(manifest, backend, precision, policy, strategy, **options)
    if not fallback:
        raise CudaUnavailableError(f"{status.reason}; the CUDA executor needs an NVIDIA GPU")
    host_backend = "torch" if backend == "torch" else "onnxruntime"
    backend_options = {"device": "cpu"} if host_backend == "torch" else {}
    log.warning("no usable GPU (%s): running on the CPU with the host executor (%s backend)",
                status.reason, host_backend)
    return Executor(manifest, host_backend, precision, policy, backend_options=backend_options)
