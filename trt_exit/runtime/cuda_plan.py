"""The CUDA executor's plan: which stages and gates a policy runs, in the one order all three
strategies (graph, poll, eager) walk, and which strategy can run here.

Pure logic, no CUDA: :func:`plan_exits` turns a validated policy into an :class:`ExitPlan`,
:func:`chain_steps` lists its stages and gates (a gate before the plan's last exit "branches":
an IF node in a graph, a host wait in poll, a host decision in eager), :func:`conditional_nodes`
counts a graph's IF nodes, :func:`choose_strategy` falls back only to a strategy that can
work, and :class:`StrategySelector` says why at WARNING (an unconfigured logger shows it).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Callable

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

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class GraphOp:
    """One operation of an exit-chain graph, in capture order.

    Attributes:
        kind: ``copy_input`` (an input into the executor's buffer), ``begin`` (the begin
            kernel), ``stage``, ``gate`` or ``copy_results`` (the results to pinned memory).
        name: The input's or stage's name.
        gate: A gate's parameters.
        opens_if: A gate that sets the condition of an IF node whose body holds every later
            operation but the result copy (the graph strategy); False: the plain gate kernel.
    """

    kind: str
    name: str = ""
    gate: GateParams | None = None
    opens_if: bool = False


def graph_ops(plan: ExitPlan, inputs: list[str], conditional: bool = True,
              depth: int | None = None) -> list[GraphOp]:
    """The operations of ``plan``'s graph: copy every input in, the begin kernel, the chain's
    stages and gates (:func:`chain_steps`), the result copy.

    Args:
        plan: The plan.
        inputs: The model's input names.
        conditional: A branching gate opens an IF node (the graph strategy). Without, every
            gate is the plain kernel and nothing is conditional: one flat graph.
        depth: Stop after the gate of this exit: the work the chain does when every sample
            leaves there. With ``conditional=False`` that is the ideal the benchmark holds the
            graph strategy to at exit depth ``depth``.
    """
    ops = [GraphOp("copy_input", name) for name in inputs] + [GraphOp("begin")]
    for step in chain_steps(plan):
        if step.stage:
            ops.append(GraphOp("stage", step.stage))
            continue
        last = step.gate.exit_k == depth
        ops.append(GraphOp("gate", gate=step.gate,
                           opens_if=conditional and step.branches and not last))
        if last:
            break
    ops.append(GraphOp("copy_results"))
    return ops


def conditional_nodes(plan: ExitPlan) -> int:
    """IF nodes in the graph of ``plan`` (one per gate that can stop the chain early)."""
    return sum(step.branches for step in chain_steps(plan))


def expected_if_levels(plan: ExitPlan) -> list[int]:
    """IF nodes a graph of ``plan`` holds at each nesting level: one in the top graph and in
    every body but the innermost (each body is the rest of the chain), none in the innermost."""
    return [1] * conditional_nodes(plan) + [0]


def graph_mismatch(plan: ExitPlan, census) -> str:
    """Why a captured graph does not hold what ``plan`` needs ("" if it does).

    Args:
        plan: The plan it was captured from.
        census: What the driver holds (:class:`~trt_exit.runtime.cuda.graph.GraphCensus`):
            IF nodes per level as :func:`expected_if_levels` says, every IF node's body known,
            and kernels at every level (each holds a gate at least).
    """
    expected = expected_if_levels(plan)
    found = census.per_level("conditional")
    if census.unknown_bodies:
        return (f"the driver reports {census.unknown_bodies} conditional nodes the capture did "
                f"not add")
    if found != expected:
        return (f"the driver holds IF nodes {found} per nesting level, the plan needs "
                f"{expected}")
    empty = [level for level, kernels in enumerate(census.per_level("kernel")) if not kernels]
    if empty:
        return f"nesting levels {empty} of the graph hold no kernel (a gate at least belongs there)"
    return ""


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


class StrategySelector:
    """Chooses the strategy a request runs as and keeps why (:func:`choose_strategy`).

    A fallback (``auto`` or ``graph`` polling, anything running ``eager``) is logged at WARNING,
    once per (requested, chosen) pair: Python's unconfigured logging shows WARNING and hides
    INFO, and a fallback changes what a user measures.

    Args:
        graph_reason: Why the graph strategy cannot run here ("" if it can); asked lazily.
        poll_reason: Why the poll strategy cannot run here ("" if it can); asked lazily.
    """

    def __init__(self, graph_reason: Callable[[], str], poll_reason: Callable[[], str]):
        self._graph_reason = graph_reason
        self._poll_reason = poll_reason
        #: Per requested strategy: ``(chosen, reason)``; reason "" when it runs as requested.
        self.choices: dict[str, tuple[str, str]] = {}

    def choose(self, requested: str) -> str:
        """The strategy ``requested`` runs as here (``auto``, ``graph``, ``poll`` or
        ``eager``)."""
        if requested in self.choices:
            return self.choices[requested][0]
        graph_reason = self._graph_reason() if requested in ("auto", "graph") else ""
        poll_reason = self._poll_reason() if graph_reason or requested == "poll" else ""
        chosen, reason = choose_strategy(requested, graph_reason, poll_reason)
        self.choices[requested] = (chosen, reason)
        if reason:
            log.warning("CUDA executor: using the %s strategy instead of %s: %s", chosen,
                        "graph" if requested == "auto" else requested, reason)
        return chosen

    def reason(self, requested: str) -> str:
        """Why ``requested`` does not run as itself ("" if it does, or was never asked)."""
        return self.choices.get(requested, ("", ""))[1]
