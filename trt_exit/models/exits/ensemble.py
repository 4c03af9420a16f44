"""Cumulative exit ensembles (Zero Time Waste, Wołczyk et al., NeurIPS 2021): an exit's
prediction combines its own head's with those of the exits before it.

Each ``ensemble`` exit wraps an ordinary exit head (its ``base``, any stateless family, MLP by
default) and outputs a weighted geometric ensemble of its own and every earlier ensemble exit's
base predictions, ZTW style::

    log q_k = sum_{j <= k} w_kj * log_softmax(z_j) + b_k      (softmax of this is q_k)

with learned weights ``w_kj`` (one per member, per exit) and a learned per-class bias ``b_k``.
The earlier members' log-probabilities arrive through the exit-state mechanism the BoF family
uses (``exit_{k}_state``, :mod:`trt_exit.tensor_names`): exit ``k`` reads the stack of its
predecessors' log-probabilities, (B, k * K), appends its own and hands (B, (k + 1) * K) on. So
the ensemble is computed *inside* each exported exit graph, every backend runs it, and the
stage interface and executors are unchanged (an executor runs an ensemble exit's predecessors
whenever it runs that exit, as it does for BoF).

Our choices: the final head stays an ordinary head, not a member (the full model stays the
static model it was, and the no-exit baseline the same cost); the weights start at 1 for the
exit's own member and 0 for the others, so an untrained ensemble is its own head; the earlier
members' log-probabilities enter detached, so exit ``k``'s loss trains its own head and
ensemble weights, never its predecessors' heads (ZTW trains the ensembles with the heads
before them fixed); ZTW's cascading of features between heads is left out.
"""

from __future__ import annotations

import torch
from torch import nn

from trt_exit.errors import ConfigError
from trt_exit.models.exits.base import (
    CLASSIFICATION,
    ExitContext,
    ExitHead,
    create_exit,
    exit_class,
    register_exit,
)

_SHARED_KEY = "ensemble"


@register_exit("ensemble")
class EnsembleExit(ExitHead):
    """A base exit head and the learned geometric ensemble of it with the ensemble exits before.

    ``forward(tokens, state=previous)`` returns ``(ensemble logits, members)``: ``members`` is
    every member's log-probabilities so far, (B, level * K); the model's first ensemble exit
    takes no state.

    Args:
        context: Where the exit is attached.
        base: The registered exit family of its own head (stateless; default ``"mlp"``).
        base_options: Options of the base head.
        confidence: Confidence measure of the ensemble's output.
    """

    carries_state = True

    def __init__(self, context: ExitContext, base: str = "mlp", base_options: dict | None = None,
                 confidence: str = "max_softmax"):
        super().__init__(context, confidence)
        if context.task != CLASSIFICATION:
            raise ConfigError("ensemble exits combine class probabilities: classification only")
        if exit_class(base).carries_state:
            raise ConfigError(f"an ensemble exit's base must be a stateless exit family, not "
                              f"{base!r}")
        shared = context.shared
        if "bof" in shared:
            raise ConfigError("a model's state-carrying exits must all be of one kind: ensemble "
                              "and bof exits cannot be mixed")
        self.base_type = base
        self.base_options = dict(base_options or {})
        self.base = create_exit(base, context, confidence=confidence, **self.base_options)
        self.uses_audio = self.base.uses_audio
        levels = shared.setdefault(_SHARED_KEY, {"levels": 0})
        levels["levels"] += 1
        #: 1 for the model's first ensemble exit, 2 for the second, ...: its members.
        self.level = levels["levels"]
        weights = torch.zeros(self.level)
        weights[-1] = 1.0
        self.member_weights = nn.Parameter(weights)  # (L,)
        self.bias = nn.Parameter(torch.zeros(context.num_outputs))  # (K,)

    def forward(self, tokens, audio=None, state=None):
        own = self.base(tokens, audio=audio).float().log_softmax(dim=-1)  # (B, K)
        if self.level == 1:
            members = own[:, None]  # (B, 1, K)
        else:
            if state is None:
                raise ConfigError(
                    f"ensemble exit at level {self.level} needs the members of the ensemble "
                    f"exits before it (state); run the model's exits in order")
            earlier = state.detach().reshape(-1, self.level - 1, own.shape[-1])  # (B, L-1, K)
            members = torch.cat([earlier, own[:, None]], dim=1)  # (B, L, K)
        logits = (members * self.member_weights[None, :, None]).sum(dim=1) + self.bias  # (B, K)
        return logits, members.flatten(1)  # (B, K), (B, L * K)

    def options(self) -> dict:
        return {"base": self.base_type, "base_options": dict(self.base_options)}
