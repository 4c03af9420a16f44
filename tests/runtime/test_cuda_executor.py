"""The CUDA executor: exit plans and the no-GPU paths on any machine; the strategies on a GPU.

GPU tests are marked ``gpu`` and skip with the reason when no usable NVIDIA GPU is present. On
a GPU they check what the issue promises: identical results across graph / poll / eager on
random inputs with thresholds that send samples out at every exit, one host synchronization
per inference for graph, device inputs read in place, NaN confidences never exiting early, and
clear errors for bad input.
"""

from __future__ import annotations

import numpy as np
import pytest

from trt_exit.errors import ConfigError, CudaUnavailableError, InputError
from trt_exit.runtime.cuda_executor import create_executor, plan_exits
from trt_exit.runtime.policies import (
    AllExitsPolicy,
    DeadlinePolicy,
    FixedExitPolicy,
    ThresholdPolicy,
)


def _gpu_reason() -> str:
    try:
        from trt_exit.runtime.cuda.api import cuda_status
    except ImportError as exc:  # pragma: no cover - depends on the environment
        return f"cuda-python is not installed ({exc})"
    status = cuda_status()
    if not status.available:
        return f"needs an NVIDIA GPU: {status.reason}"
    import torch

    if not torch.cuda.is_available():
        return "needs PyTorch with CUDA for the torch backend"
    return ""


GPU_REASON = _gpu_reason()
needs_gpu = pytest.mark.skipif(bool(GPU_REASON), reason=GPU_REASON or "GPU present")
no_gpu_only = pytest.mark.skipif(not GPU_REASON, reason="a GPU is present: the no-GPU path "
                                                        "cannot be observed")


# --------------------------------------------------------------------------- plans (any machine)


def test_threshold_plan_gates_enabled_exits_and_forces_the_final_head():
    plan = plan_exits(ThresholdPolicy([0.7, None, 0.9]), 4)
    assert plan.last == 3
    assert plan.heads == (True, False, True, True)
    assert [g is not None for g in plan.gates] == [True, False, True, True]
    assert plan.gates[0].use_threshold and plan.gates[0].threshold == 0.7
    assert plan.gates[3].force and not plan.gates[0].force


def test_fixed_plan_runs_only_up_to_its_exit():
    plan = plan_exits(FixedExitPolicy(1), 4)
    assert plan.last == 1
    assert plan.heads == (False, True, False, False)
    assert [g is not None for g in plan.gates] == [False, True, False, False]
    assert plan.gates[1].force
    assert plan_exits(FixedExitPolicy(-1), 4).last == 3


def test_state_providers_run_their_heads_without_a_gate():
    # Exit 2 reads exit 1's state (BoF): exit 1's head runs although its exit is disabled.
    plan = plan_exits(ThresholdPolicy([None, None]), 3, state_providers=[[], [], [1]])
    assert plan.heads == (False, True, True)
    assert plan.gates[1] is None


def test_deadline_plan_checks_the_budget_at_every_early_exit():
    latency = {"segment_1": 0.5, "exit_1": 0.25, "segment_2": 1.0, "exit_2": 0.125}
    policy = DeadlinePolicy([None, 0.8], budget_ms=2.0, stage_latency_ms=latency)
    policy.validate(3)
    plan = plan_exits(policy, 3)
    assert plan.heads == (True, True, True)
    first, second = plan.gates[0], plan.gates[1]
    assert first.deadline and not first.use_threshold
    assert first.budget_ns == 2_000_000 and first.next_ns == 750_000
    assert second.use_threshold and second.threshold == 0.8 and second.next_ns == 1_125_000


def test_plans_differ_exactly_when_graphs_must():
    assert plan_exits(ThresholdPolicy([0.5]), 2).key == plan_exits(ThresholdPolicy([0.5]), 2).key
    assert plan_exits(ThresholdPolicy([0.5]), 2).key != plan_exits(ThresholdPolicy([0.6]), 2).key
    with pytest.raises(ConfigError):
        plan_exits(AllExitsPolicy(), 2)


# --------------------------------------------------------------------------- no GPU


@no_gpu_only
def test_without_gpu_the_cuda_executor_says_what_to_use(tiny_export):
    from trt_exit.runtime.cuda_executor import CudaExecutor

    with pytest.raises(CudaUnavailableError, match="Executor\\(manifest, backend='onnxruntime'\\)"):
        CudaExecutor(tiny_export)


@no_gpu_only
def test_without_gpu_create_executor_falls_back_to_the_host(tiny_export, digits, caplog):
    from trt_exit.runtime.executor import Executor

    images = digits["test"].inputs["image"][:16]
    with caplog.at_level("WARNING"):
        executor = create_executor(tiny_export, "torch", policy=FixedExitPolicy(0))
    with executor, Executor(tiny_export, policy=FixedExitPolicy(0)) as reference:
        assert isinstance(executor, Executor) and executor.backend.name == "torch"
        np.testing.assert_allclose(executor.run(images).output, reference.run(images).output,
                                   atol=1e-4)
    assert "no usable GPU" in caplog.text
    with pytest.raises(CudaUnavailableError):
        create_executor(tiny_export, fallback=False)


# --------------------------------------------------------------------------- on a GPU

STRATEGIES = ("graph", "poll", "eager")


@pytest.fixture(scope="module")
def gpu_executor(tiny_export):
    from trt_exit.runtime.cuda_executor import CudaExecutor

    with CudaExecutor(tiny_export, "torch", max_batch=16, policy=FixedExitPolicy(-1)) as executor:
        yield executor


@pytest.fixture(scope="module")
def random_images():
    return np.random.default_rng(0).normal(size=(16, 1, 8, 8)).astype(np.float32)


def _spread_thresholds(confidences: np.ndarray) -> list[float]:
    """Thresholds that send some samples out at every early exit and leave some for the final
    head, each at least 1e-4 away from every confidence (no ties decided by rounding)."""
    n_early = confidences.shape[0] - 1
    running = np.ones(confidences.shape[1], bool)
    thresholds = []
    for k in range(n_early):
        candidates = np.sort(confidences[k][running])
        # Between the two middle values: about half the still-running samples exit here.
        middle = len(candidates) // 2
        threshold = float((candidates[middle - 1] + candidates[middle]) / 2)
        assert np.abs(confidences[k] - threshold).min() > 1e-4
        thresholds.append(threshold)
        running &= confidences[k] < threshold
    return thresholds


@pytest.mark.gpu
@needs_gpu
def test_strategies_agree_and_every_exit_is_taken(gpu_executor, random_images):
    everything = gpu_executor.run(random_images, AllExitsPolicy())
    policy = ThresholdPolicy(_spread_thresholds(everything.all_confidences))
    results = {s: gpu_executor.run(random_images, policy, strategy=s) for s in STRATEGIES}
    assert results["graph"].strategy == "graph", gpu_executor.graph_unavailable()
    taken = np.bincount(results["eager"].exit_index, minlength=gpu_executor.num_exits)
    assert (taken > 0).all(), f"thresholds left an exit unused: {taken}"
    for strategy in ("graph", "poll"):
        np.testing.assert_array_equal(results[strategy].exit_index, results["eager"].exit_index)
        np.testing.assert_array_equal(results[strategy].output, results["eager"].output)
        np.testing.assert_array_equal(results[strategy].confidence, results["eager"].confidence)
    # Each sample's output is the output of the exit it took.
    rows = np.arange(len(random_images))
    np.testing.assert_array_equal(results["graph"].output,
                                  everything.all_outputs[results["graph"].exit_index, rows])


@pytest.mark.gpu
@needs_gpu
def test_results_match_the_host_executor_on_onnxruntime(gpu_executor, tiny_export, digits):
    from trt_exit.runtime.executor import Executor

    images = digits["test"].inputs["image"][:16]
    policy = ThresholdPolicy([0.6, 0.6])
    with Executor(tiny_export, "onnxruntime", policy=policy) as host:
        expected = host.run(images)
        everything = host.run(images, AllExitsPolicy())
    got = gpu_executor.run(images, policy, strategy="graph")
    # Samples whose early-exit confidences are all clear of the threshold (ONNX Runtime and
    # PyTorch on the GPU differ by ~1e-6) must decide the same way.
    clear = (np.abs(everything.all_confidences[:-1] - 0.6) > 1e-3).all(axis=0)
    assert clear.sum() >= 8
    np.testing.assert_array_equal(got.exit_index[clear], expected.exit_index[clear])
    np.testing.assert_allclose(got.output[clear], expected.output[clear], atol=1e-3)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("exit_k", [0, 1, 2])
def test_graph_synchronizes_once_per_inference(gpu_executor, random_images, exit_k):
    policy = FixedExitPolicy(exit_k)
    gpu_executor.run(random_images[:1], policy, strategy="graph")  # captures
    for _ in range(3):
        results = gpu_executor.run(random_images[:1], policy, strategy="graph")
        assert results.strategy == "graph" and results.host_syncs == 1
        assert results.exit_index.tolist() == [exit_k]
    polled = gpu_executor.run(random_images[:1], policy, strategy="poll")
    assert polled.host_syncs == 1  # a fixed exit needs no decision from the host


@pytest.mark.gpu
@needs_gpu
def test_poll_waits_once_per_early_exit_evaluated(gpu_executor, random_images):
    never = ThresholdPolicy([1.0, 1.0])  # max-softmax confidence of a random model stays < 1
    results = gpu_executor.run(random_images[:4], never, strategy="poll")
    assert (results.exit_index == gpu_executor.num_exits - 1).all()
    assert results.host_syncs == (gpu_executor.num_exits - 1) + 1


@pytest.mark.gpu
@needs_gpu
def test_device_inputs_are_read_in_place(gpu_executor, random_images):
    import torch

    on_gpu = torch.from_numpy(random_images).cuda()
    policy = ThresholdPolicy([0.3, 0.3])
    for strategy in STRATEGIES:
        from_host = gpu_executor.run(random_images, policy, strategy=strategy)
        from_device = gpu_executor.run(on_gpu, policy, strategy=strategy)
        np.testing.assert_array_equal(from_device.exit_index, from_host.exit_index)
        np.testing.assert_array_equal(from_device.output, from_host.output)
    device = gpu_executor.run(on_gpu, policy, strategy="graph").device
    np.testing.assert_array_equal(torch.as_tensor(device.exit_index, device="cuda").cpu().numpy(),
                                  from_host.exit_index)


@pytest.mark.gpu
@needs_gpu
def test_nan_confidence_never_exits_early(gpu_executor, random_images):
    import torch

    images = torch.from_numpy(random_images[:4].copy()).cuda()
    images[1:3] = float("nan")  # device inputs are not scanned for NaN: the model sees them
    always = ThresholdPolicy([0.0, 0.0])  # every finite confidence exits at exit 0
    for strategy in STRATEGIES:
        results = gpu_executor.run(images, always, strategy=strategy)
        assert results.exit_index.tolist() == [0, 2, 2, 0], strategy


@pytest.mark.gpu
@needs_gpu
def test_deadline_budget_decides_on_the_gpu(gpu_executor, random_images):
    latency = {name: 1000.0 for name in gpu_executor.runners}  # every stage "takes" 1 s
    tight = DeadlinePolicy([None, None], budget_ms=1.0, stage_latency_ms=latency)
    loose = DeadlinePolicy([None, None], budget_ms=1e9, stage_latency_ms=latency)
    for strategy in STRATEGIES:
        assert (gpu_executor.run(random_images, tight, strategy=strategy).exit_index == 0).all()
        assert (gpu_executor.run(random_images, loose, strategy=strategy).exit_index == 2).all()


@pytest.mark.gpu
@needs_gpu
def test_bad_inputs_are_clear_errors(gpu_executor, random_images, tiny_export):
    import torch

    from trt_exit.runtime.cuda_executor import CudaExecutor

    big = np.zeros((17, 1, 8, 8), np.float32)
    with pytest.raises(InputError, match="max_batch of 16"):
        gpu_executor.run(big)
    with pytest.raises(InputError, match="dtype"):
        gpu_executor.run(torch.zeros((2, 1, 8, 8), dtype=torch.float64, device="cuda"))
    with pytest.raises(InputError, match="C-contiguous"):
        gpu_executor.run(torch.zeros((2, 1, 8, 16), device="cuda")[..., ::2])
    with pytest.raises(ConfigError, match="in \\[0, 1\\]"):
        gpu_executor.run(random_images, ThresholdPolicy([1.5, 0.5]))
    if torch.cuda.device_count() > 1:
        with pytest.raises(InputError, match="GPU 1"):
            gpu_executor.run(torch.zeros((2, 1, 8, 8), device="cuda:1"))
    with pytest.raises(ConfigError, match="strategy"):
        CudaExecutor(tiny_export, strategy="fast")


@pytest.mark.gpu
@needs_gpu
def test_full_model_graph_and_stage_profile(gpu_executor, random_images):
    full = gpu_executor.run_full_model(random_images[:2], strategy="graph")
    final = gpu_executor.run(random_images[:2], FixedExitPolicy(-1), strategy="eager")
    np.testing.assert_allclose(full.output, final.output, atol=1e-4)
    assert full.host_syncs <= 2
    profile = gpu_executor.profile_stages(random_images[:1], repeats=5, warmup=2)
    assert set(profile) == set(gpu_executor.runners)
    assert all(ms > 0 for ms in profile.values())


# --------------------------------------------------------------------------- review fixes, on a GPU


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_inputs_written_on_a_torch_side_stream_are_waited_for(gpu_executor, random_images,
                                                             strategy):
    """torch exports no stream: the executor orders itself after torch's current stream."""
    import torch

    policy = ThresholdPolicy([0.3, 0.3])
    expected = gpu_executor.run(random_images[:4], policy, strategy="eager")
    side = torch.cuda.Stream()
    source = torch.from_numpy(random_images[:4]).cuda()
    torch.cuda.synchronize()
    for _ in range(3):
        with torch.cuda.stream(side):
            x = torch.full_like(source, float("nan"))
            torch.cuda._sleep(20_000_000)  # ~10 ms of GPU time before the real values land
            x.copy_(source)
            got = gpu_executor.run(x, policy, strategy=strategy)
        np.testing.assert_array_equal(got.exit_index, expected.exit_index)
        np.testing.assert_array_equal(got.output, expected.output)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("exit_k", [0, 1, 2])
def test_threshold_forced_exits_sync_once_in_graph_and_per_exit_elsewhere(
        gpu_executor, random_images, exit_k):
    """Thresholds unreachable before exit k and 0 at k: the graph has its IF nodes and the gate
    sets their conditions; poll and eager pay one host wait per exit evaluated."""
    n = gpu_executor.num_exits
    thresholds = [1.0] * exit_k + [0.0] * (n - 1 - exit_k)
    policy = ThresholdPolicy(thresholds)
    everything = gpu_executor.run(random_images[:1], AllExitsPolicy())
    assert (everything.all_confidences[:exit_k] < 1.0).all()  # 1.0 is out of reach there
    gpu_executor.device_timing = True
    try:
        for strategy, syncs in (("graph", 1), ("poll", exit_k + 1), ("eager", exit_k + 1)):
            gpu_executor.run(random_images[:1], policy, strategy=strategy)  # captures
            results = gpu_executor.run(random_images[:1], policy, strategy=strategy)
            assert results.strategy == strategy
            assert results.exit_index.tolist() == [exit_k]
            assert results.host_syncs == syncs, strategy
            assert gpu_executor.last_device_ms is not None and gpu_executor.last_device_ms > 0
    finally:
        gpu_executor.device_timing = False
    assert n - 1 in gpu_executor.graph_conditional_nodes()


@pytest.mark.gpu
@needs_gpu
def test_the_executor_makes_its_own_gpu_current(tiny_export, random_images):
    import torch

    from trt_exit.runtime.cuda_executor import CudaExecutor

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    with CudaExecutor(tiny_export, "torch", device=1, max_batch=4) as executor:
        torch.cuda.set_device(0)  # someone else on this thread switches GPU
        results = executor.run(random_images[:4], ThresholdPolicy([0.3, 0.3]), strategy="graph")
        assert results.strategy == "graph"
        reference = executor.run(random_images[:4], ThresholdPolicy([0.3, 0.3]),
                                 strategy="eager")
        np.testing.assert_array_equal(results.exit_index, reference.exit_index)


@pytest.mark.gpu
@needs_gpu
def test_fp16_runs_without_autocast_on_the_gpu(tiny_export, random_images):
    from trt_exit.runtime.cuda_executor import CudaExecutor

    with CudaExecutor(tiny_export, "torch", precision="fp16", max_batch=4) as fp16, \
            CudaExecutor(tiny_export, "torch", max_batch=4) as fp32:
        policy = FixedExitPolicy(-1)
        half = fp16.run(random_images[:4], policy, strategy="graph")
        full = fp32.run(random_images[:4], policy, strategy="graph")
    assert half.strategy == "graph"
    np.testing.assert_allclose(half.output, full.output, atol=2e-2)
    assert not np.array_equal(half.output, full.output)


# --------------------------------------------------------------------------- issue 22, on a GPU


@pytest.mark.gpu
@needs_gpu
def test_fresh_device_tensors_reuse_one_graph(gpu_executor, random_images):
    """Item 9: the graph copies device inputs in as its first nodes, so a caller passing a new
    tensor every call gets one capture per (policy, batch), not one per call."""
    import torch

    policy = ThresholdPolicy([0.3, 0.3])
    expected = gpu_executor.run(random_images[:4], policy, strategy="eager")
    gpu_executor.run(torch.from_numpy(random_images[:4]).cuda(), policy, strategy="graph")
    captures = gpu_executor.captures
    for _ in range(4):
        fresh = torch.from_numpy(random_images[:4].copy()).cuda()  # a new address each time
        got = gpu_executor.run(fresh, policy, strategy="graph")
        assert got.strategy == "graph" and got.host_syncs == 1
        np.testing.assert_array_equal(got.exit_index, expected.exit_index)
        np.testing.assert_array_equal(got.output, expected.output)
    assert gpu_executor.captures == captures


@pytest.mark.gpu
@needs_gpu
def test_the_driver_holds_the_plans_if_nodes(gpu_executor, random_images):
    """Item 6: the IF nodes are counted from what the driver reports, level by level."""
    policy = ThresholdPolicy([0.3, 0.3])
    assert gpu_executor.run(random_images[:2], policy, strategy="graph").strategy == "graph"
    census = gpu_executor.graph_census(policy, 2)
    levels = [level.get("conditional", 0) for level in census["levels"]]
    assert levels == [1, 1, 0], census
    assert all(level.get("kernel", 0) > 0 for level in census["levels"])
    assert census["levels"][0].get("memcpy", 0) >= 2  # the input copied in, the results out


@pytest.mark.gpu
@needs_gpu
def test_device_results_wait_for_a_consumer_handed_back(gpu_executor, random_images):
    """Item 8: the result views export the executor's stream, and a consumer that hands them
    back with wait_for_consumer is not overwritten by the next run."""
    import torch

    first = gpu_executor.run(random_images[:4], FixedExitPolicy(0), strategy="graph")
    device = first.device
    assert device.output.__cuda_array_interface__["stream"] == gpu_executor.stream.handle
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # the consumer's read starts ~25 ms late
        copy = torch.as_tensor(device.output, device="cuda").clone()
    gpu_executor.wait_for_consumer(side)
    gpu_executor.run(random_images[8:12], FixedExitPolicy(2), strategy="graph")  # overwrites
    side.synchronize()
    np.testing.assert_array_equal(copy.cpu().numpy(), first.output)


@pytest.mark.gpu
@needs_gpu
def test_a_failing_first_launch_falls_back_to_poll(tiny_export, random_images, monkeypatch,
                                                   caplog):
    """Item 7: a graph whose first launch fails is closed and dropped, the reason recorded, and
    the run polls (same results as eager)."""
    from trt_exit.errors import CudaError
    from trt_exit.runtime.cuda.graph import GraphExec
    from trt_exit.runtime.cuda_executor import CudaExecutor

    def failing_launch(self, stream):
        self.launches += 1
        raise CudaError("cudaGraphLaunch (probe) failed: cudaErrorLaunchFailure (simulated)")

    policy = ThresholdPolicy([0.3, 0.3])
    with CudaExecutor(tiny_export, "torch", max_batch=4) as executor:
        expected = executor.run(random_images[:4], policy, strategy="eager")
        monkeypatch.setattr(GraphExec, "launch", failing_launch)
        with caplog.at_level("WARNING"):
            got = executor.run(random_images[:4], policy, strategy="graph")
        assert got.strategy == "poll"
        np.testing.assert_array_equal(got.exit_index, expected.exit_index)
        assert executor.graph_census(policy, 4) is None  # dropped
        assert any("first launch failed" in f for f in executor.describe()["graph_failures"])
        assert "first launch failed" in caplog.text
        monkeypatch.undo()
        assert executor.run(random_images[:4], policy, strategy="graph").strategy == "poll"


@pytest.mark.gpu
@needs_gpu
def test_flat_chain_ideal_and_sync_modes(tiny_export, random_images):
    """Items 5 and 11: the flat-graph ideal runs, and the host-wait mode is an option that is
    applied, read back and reported."""
    from trt_exit.runtime.cuda.api import set_sync_mode
    from trt_exit.runtime.cuda_executor import CudaExecutor

    policy = ThresholdPolicy([1.0, 0.0])  # exit 1 for every sample
    try:
        with CudaExecutor(tiny_export, "torch", max_batch=2, sync_mode="spin",
                          device_timing=True) as executor:
            assert executor.sync_mode == "spin"
            assert executor.describe()["sync_mode"] == "spin"
            assert executor.describe()["sync_mode_basis"] == "asked for"
            ideal = executor.time_flat_chain(random_images[:2], policy, depth=1, repeats=20)
            assert 0 < ideal < 1000
            assert executor.run(random_images[:2], policy, strategy="graph").host_syncs >= 1
            assert executor.last_device_ms > 0
            assert set_sync_mode("blocking") == "blocking"
            assert executor.run(random_images[:2], policy, strategy="graph").host_syncs == 1
    finally:
        set_sync_mode("auto")


@pytest.mark.gpu
@needs_gpu
def test_gate_kernels_are_loaded_before_any_capture(gpu_executor):
    """Item 10: under lazy module loading (the default) both kernels are loaded when the
    GateKernels are made."""
    from cuda.bindings import driver

    from trt_exit.runtime.gate import BEGIN_KERNEL, GATE_KERNEL

    if not hasattr(driver, "cuFuncIsLoaded") or gpu_executor.device_info.driver_version < 12040:
        pytest.skip("cuFuncIsLoaded needs CUDA 12.4+")
    kernels = gpu_executor.chain.gate_kernels(conditional=True)
    loaded = driver.CUfunctionLoadingState.CU_FUNCTION_LOADING_STATE_LOADED
    for name in (BEGIN_KERNEL, GATE_KERNEL):
        status, state = driver.cuFuncIsLoaded(kernels.module.function(name))
        assert int(status) == 0 and state == loaded, name


@pytest.mark.gpu
@needs_gpu
def test_the_profile_records_the_cuda_strategy(gpu_executor, random_images):
    """Item 4: profile.json says which strategy ran and why it is not another."""
    from trt_exit.profiling.report import ProfileConfig, profile_executor

    report = profile_executor(gpu_executor, {"image": random_images[:8]}, "torch",
                              ProfileConfig(samples=5, warmup=1, stage_repeats=2),
                              ThresholdPolicy([0.3, 0.3]))
    assert report["executor"]["strategy"] == "graph"
    assert report["end_to_end"]["strategies"] == {"graph": 5}
    assert report["executor"]["sync_mode"] in ("auto", "spin", "yield", "blocking")
