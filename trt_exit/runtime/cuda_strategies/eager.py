"""The eager strategy: the plain host loop, the reference every benchmark compares against.

After each exit head its confidence and output are copied back, the host waits, and
:func:`~trt_exit.runtime.gate.gate_on_host` decides which samples stop there. Needs no kernel of
its own. :func:`run_all_exits` runs every stage and reads every exit back (``AllExitsPolicy``).
"""

from __future__ import annotations

import time

import numpy as np

from trt_exit import tensor_names as tn
from trt_exit.runtime.cuda_plan import ExitPlan, chain_steps
from trt_exit.runtime.cuda_strategies.chain import Chain
from trt_exit.runtime.executor import ExitResults
from trt_exit.runtime.gate import gate_on_host


def run_eager(chain: Chain, plan: ExitPlan, batch: int, addresses: dict[str, int],
              host_inputs: list[str], producers: list[int], began: float) -> ExitResults:
    """One host wait per exit evaluated; ``began``: the run's start (``perf_counter``), which
    deadline gates measure the elapsed time from."""
    main = chain.stream.handle
    chain.start(producers)
    chain.copy_inputs(main, host_inputs, batch)
    exit_index = np.full(batch, -1, np.int32)
    output = np.zeros((batch, chain.num_outputs), np.float32)
    confidence = np.zeros(batch, np.float32)
    running = np.ones(batch, dtype=bool)
    for step in chain_steps(plan):
        if step.stage:
            chain.stage(step.stage, main, addresses, batch)
            continue
        gate = step.gate
        k = gate.exit_k
        conf_k, out_k = chain.readback(main, k, batch)
        chain.synchronize()
        over = gate.deadline and (
            (time.perf_counter() - began) * 1e9 + gate.next_ns > gate.budget_ns)
        done = gate_on_host(gate, conf_k, running, over)
        exit_index[done] = k
        output[done] = out_k[done]
        confidence[done] = conf_k[done]
        running &= ~done
        if not running.any():
            break
    return ExitResults(exit_index, output, confidence, chain.manifest.task, 0.0)


def run_all_exits(chain: Chain, batch: int, addresses: dict[str, int], host_inputs: list[str],
                  producers: list[int]) -> ExitResults:
    """Every segment and exit head, every exit's confidence and output read back; one wait."""
    main = chain.stream.handle
    chain.start(producers)
    chain.copy_inputs(main, host_inputs, batch)
    views = []
    for k in range(chain.num_exits):
        chain.stage(tn.stage_name(tn.SEGMENT, k), main, addresses, batch)
        chain.stage(tn.stage_name(tn.EXIT, k), main, addresses, batch)
        views.append(chain.readback(main, k, batch))
    chain.synchronize()
    confidences = np.stack([c.copy() for c, _ in views])
    outputs = np.stack([o.copy() for _, o in views])
    final = chain.num_exits - 1
    return ExitResults(np.full(batch, final, np.int32), outputs[-1].copy(),
                       confidences[-1].copy(), chain.manifest.task, 0.0, outputs, confidences)
