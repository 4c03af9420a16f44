"""The CUDA executor's plan: which stages and gates a policy runs, in the one order all three
strategies (graph, poll, eager) walk, and which strategy can run here.

Pure logic, no CUDA: :func:`plan_exits` turns a validated policy into an :class:`ExitPlan`,
:func:`chain_steps` lists its stages and gates (a gate before the plan's last exit "branches":
an IF node in a graph, a host wait in poll, a host decision in eager), :func:`conditional_nodes`
counts a graph's IF nodes, and :func:`choose_strategy` falls back only to a strategy that can
work.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from trt_exit import tensor_names as tn
from trt_exit.errors import ConfigError
from trt_exit.runtime.gate import GateParams
from trt_exit.runtime.policies import (
    AllExitsPolicy,
    DeadlinePolicy,
    FixedExitPolicy,
    Policy,
    ThresholdPolicy,
)


@dataclass(frozen=True)
class ExitPlan:
    """Which stages a policy runs and what each gate decides.

    Attributes:
        heads: Per exit: whether its head runs (enabled, or a state provider of one).
        gates: Per exit: the gate after it, or None where no decision is made there.
        last: The exit where every remaining sample stops (the final head or a fixed exit);
            segments after it are not run.
    """

    heads: tuple[bool, ...]
    gates: tuple[GateParams | None, ...]
    last: int

    @functools.cached_property
    def key(self) -> tuple:
        """Hashable identity (a captured graph is specific to it)."""
        return (self.heads, self.last,
                tuple(None if g is None else tuple(vars(g).values()) for g in self.gates))


def plan_exits(policy: Policy, num_exits: int,
               state_providers: list[list[int]] | None = None) -> ExitPlan:
    """The :class:`ExitPlan` of a validated policy (not :class:`AllExitsPolicy`).

    Args:
        policy: Threshold, deadline or fixed-exit policy, already validated.
        num_exits: Exits including the final head.
        state_providers: Per exit, the exits whose state its head reads (BoF histograms).

    Mirrors the host executor: disabled exits' heads are skipped unless a running head reads
    their state; a deadline runs every head and checks the budget at every early exit.
    """
    if isinstance(policy, AllExitsPolicy):
        raise ConfigError("AllExitsPolicy runs every stage; it has no exit plan")
    final = num_exits - 1
    providers = state_providers or [[] for _ in range(num_exits)]
    deadline = isinstance(policy, DeadlinePolicy)
    if isinstance(policy, FixedExitPolicy):
        last = policy.resolve(num_exits)
    elif isinstance(policy, ThresholdPolicy):
        last = final
    else:
        raise ConfigError(f"the CUDA executor does not know policy {type(policy).__name__}")
    heads = [deadline or policy.exit_enabled(k, num_exits) for k in range(num_exits)]
    for k in reversed(range(num_exits)):
        if heads[k]:
            for provider in providers[k]:
                heads[provider] = True
    gates: list[GateParams | None] = [None] * num_exits
    gates[last] = GateParams(last, force=True)
    if isinstance(policy, ThresholdPolicy):
        latency = policy.stage_latency_ms if deadline else {}
        for k in range(last):
            threshold = policy.thresholds[k]
            if threshold is None and not deadline:
                continue
            gate = GateParams(k, use_threshold=threshold is not None,
                              threshold=1.0 if threshold is None else float(threshold))
            if deadline:
                next_ms = latency.get(tn.stage_name(tn.SEGMENT, k + 1), 0.0) + latency.get(
                    tn.stage_name(tn.EXIT, k + 1), 0.0)
                gate = GateParams(k, gate.use_threshold, gate.threshold, deadline=True,
                                  budget_ns=int(round(policy.budget_ms * 1e6)),
                                  next_ns=int(round(next_ms * 1e6)))
            gates[k] = gate
    return ExitPlan(tuple(heads[: last + 1]) + (False,) * (final - last),
                    tuple(gates), last)


@dataclass(frozen=True)
class ChainStep:
    """One step of the exit chain as every strategy walks it.

    Attributes:
        stage: Stage name (``segment_k`` / ``exit_k``), or "" for a gate.
        gate: The gate's parameters (gates only).
        branches: A gate after which the rest of the chain runs only if some sample is still
            running: an IF node (graph), a host wait on the flag (poll), a host decision (eager).
    """

    stage: str = ""
    gate: GateParams | None = None
    branches: bool = False


def chain_steps(plan: ExitPlan) -> list[ChainStep]:
    """The stages and gates a plan runs, in order (the one walk all three strategies share)."""
    steps = []
    for k in range(plan.last + 1):
        steps.append(ChainStep(tn.stage_name(tn.SEGMENT, k)))
        if plan.heads[k]:
            steps.append(ChainStep(tn.stage_name(tn.EXIT, k)))
        gate = plan.gates[k]
        if gate is not None:
            steps.append(ChainStep(gate=gate, branches=k < plan.last))
    return steps


def conditional_nodes(plan: ExitPlan) -> int:
    """IF nodes in the graph of ``plan`` (one per gate that can stop the chain early)."""
    return sum(step.branches for step in chain_steps(plan))


def choose_strategy(requested: str, graph_reason: str, poll_reason: str) -> tuple[str, str]:
    """The strategy that can run, and why it is not the one requested ("" if it is).

    Args:
        requested: ``auto``, ``graph``, ``poll`` or ``eager``.
        graph_reason: Why graph cannot run here ("" if it can).
        poll_reason: Why poll cannot run here ("" if it can): its gate kernels do not load.

    Falls back only to a strategy that works: graph -> poll -> eager (eager needs no kernel).
    """
    if requested == "eager":
        return "eager", ""
    if requested in ("auto", "graph") and not graph_reason:
        return "graph", ""
    reasons = [graph_reason] if requested in ("auto", "graph") else []
    if not poll_reason:
        return "poll", "; ".join(reasons)
    return "eager", "; ".join(dict.fromkeys([*reasons, poll_reason]))
