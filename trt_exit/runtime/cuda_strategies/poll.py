"""The poll strategy: stages enqueued one by one, one host wait per gate evaluated.

Each gate writes its decision ("some sample is still running") to a flag in mapped pinned
memory, and the results are copied back behind it; the host waits for the stream and reads the
flag before it enqueues the next segment. Works on any CUDA driver (no conditional nodes); the
gate kernels must load (NVRTC not newer than the driver).
"""

from __future__ import annotations

import numpy as np

from trt_exit.runtime.cuda_plan import ExitPlan, chain_steps
from trt_exit.runtime.cuda_strategies.chain import Chain
from trt_exit.runtime.executor import ExitResults


def run_poll(chain: Chain, plan: ExitPlan, batch: int, addresses: dict[str, int],
             host_inputs: list[str], producers: list[int]) -> ExitResults:
    """One host wait per gate evaluated: the results are copied back behind every gate, so the
    wait that reads a "stop" flag also delivers them."""
    kernels = chain.gate_kernels(conditional=False)
    main = chain.stream.handle
    flags = chain.flags.array((chain.num_exits,), np.uint32)
    chain.start(producers)
    chain.begin(kernels, main, batch)
    chain.copy_inputs(main, host_inputs, batch)
    for step in chain_steps(plan):
        if step.stage:
            chain.stage(step.stage, main, addresses, batch)
            continue
        k = step.gate.exit_k
        chain.gate(kernels, main, step.gate, batch,
                   flag=chain.flags.device_address + 4 * k if step.branches else 0)
        chain.copy_results(main, batch)
        chain.synchronize()
        if not step.branches or not flags[k]:
            break
    return chain.results(batch, with_device=True)
