"""Bag-of-Features exits (Passalis, Raitoharju, Tefas, Gabbouj, Pattern Recognition 2020):
hierarchical early exits that share one histogram space and one classifier.

Each BoF exit treats the features at one position of the backbone as a bag of local feature
vectors (the patch tokens of a ViT, or the pixels of a CNN feature map) and turns them into a
histogram over a learned codebook:

1. similarity: the distance of every local feature to every codeword,
2. soft membership: ``softmax(-distance / sigma)`` over the codewords (a normalized RBF kernel,
   one learned ``sigma`` per codeword), so each feature's memberships sum to 1,
3. spatial pooling: the mean membership over the positions, a histogram summing to 1.

Histograms are *added* across exits: exit ``k`` receives the sum of the histograms of the BoF
exits before it as its ``state``, adds its own, and hands the new sum on, so every exit refines
one shared histogram space. One classifier, kept in the model's ``context.shared``, is *reused*
by every BoF exit. It reads the running *mean* histogram (the sum divided by the exit's level
``k + 1``), so it sees inputs on one scale at every level; this normalization is our choice.

Stopping rule: exit when the exit's maximum activation exceeds ``beta`` times that exit's mean
maximum activation on the training data. We take "activation" to be the softmax probabilities of
the classifier's output (positive, so the ratio is well defined; our choice), and express the
rule as a confidence in [0, 1) so the normal threshold machinery applies unchanged::

    r = max_k softmax(output)_k / mean_activation     (mean_activation measured on training data)
    confidence = r / (1 + r)                          (monotone in r)
    exit  <=>  r >= beta  <=>  confidence >= beta / (1 + beta)   (see beta_threshold)

``mean_activation`` is a buffer of each exit (exported with its graph); it is 1 until
:func:`measure_mean_activations` sets it from the training data after training.

Our other choices: a LayerNorm on the local features first; codebook of ``codewords`` (default
64) vectors initialized from a unit normal, or from real features with
:func:`init_codebooks_from_data` (the paper initializes with k-means; a random sample of
features is the cheap version); the shared classifier is a LayerNorm over the histogram and one
linear layer (see :class:`SharedClassifier`); the class token of a
ViT is not a local feature and is left out. The shared classifier fixes the histogram size, so
every BoF exit of a model must have the same ``codewords``. Levels are counted in the order the
exits are built (block order), so a model's BoF exits must be its only state-carrying exits.

Checkpoints, training and export handle the shared classifier: ``safetensors`` stores the
shared tensor once, the trainer optimizes each parameter once, and each exit's ONNX graph gets
its own copy of the classifier's weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from trt_exit.errors import ConfigError
from trt_exit.models.exits.base import ExitContext, ExitHead, register_exit
from trt_exit.models.exits.layout import MAP, TOKENS, local_features, require_layout

#: The confidence measure name recorded in manifests for the paper's stopping rule.
ACTIVATION_RATIO = "bof_activation_ratio"
#: ``stopping`` options: the paper's rule, or the model's ordinary confidence measure.
STOPPING_RULES = ("activation_ratio", "standard")
_SHARED_KEY = "bof"


def beta_threshold(beta: float) -> float:
    """The confidence threshold equivalent to the paper's "max activation >= beta x mean"."""
    if not beta >= 0:
        raise ConfigError(f"beta must be >= 0, got {beta!r}")
    return float(beta / (1.0 + beta))


class BoFLayer(nn.Module):
    """Codebook similarity -> soft membership -> spatially pooled histogram.

    Args:
        dim: Width of the local features.
        codewords: Number of codewords M (the histogram size).
    """

    def __init__(self, dim: int, codewords: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.codebook = nn.Parameter(torch.randn(codewords, dim))  # (M, C)
        self.log_sigma = nn.Parameter(torch.zeros(codewords))  # (M,)

    def memberships(self, features: torch.Tensor) -> torch.Tensor:
        """(B, P, C) local features -> (B, P, M) soft memberships (each row sums to 1)."""
        x = self.norm(features)  # (B, P, C)
        squared = ((x * x).sum(-1, keepdim=True) - 2.0 * x @ self.codebook.t()
                   + (self.codebook * self.codebook).sum(-1))  # (B, P, M)
        distance = squared.clamp_min(1e-6).sqrt()  # (B, P, M)
        return (-distance * torch.exp(-self.log_sigma)).softmax(dim=-1)  # (B, P, M)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.memberships(features).mean(dim=1)  # (B, M)


class SharedClassifier(nn.Module):
    """The classifier every BoF exit of a model reuses: LayerNorm over the histogram, Linear.

    The LayerNorm is our choice: histograms of soft memberships sit close to uniform (every
    entry near 1 / M) and differ between samples by a few percent of that, which a plain linear
    layer learns to read only very slowly; normalizing each histogram over its codewords puts
    those differences on a scale of one.
    """

    def __init__(self, codewords: int, num_outputs: int):
        super().__init__()
        self.codewords = codewords
        self.norm = nn.LayerNorm(codewords, eps=1e-6)
        self.fc = nn.Linear(codewords, num_outputs)

    def forward(self, histogram: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(histogram))  # (B, K)


@register_exit("bof")
class BoFExit(ExitHead):
    """A BoF layer, the running histogram of the BoF exits so far, and the shared classifier.

    ``forward(tokens, state=previous_sum)`` returns ``(logits, new_sum)``: the first BoF exit of
    a model takes no state.

    Args:
        context: Where the exit is attached (ViT tokens or CNN feature maps).
        codewords: Codebook size M; the same for every BoF exit of a model.
        stopping: ``"activation_ratio"`` (the paper's rule, see the module docstring) or
            ``"standard"`` (the model's ordinary confidence measure on the shared classifier).
        confidence: The ordinary confidence measure (used with ``stopping="standard"``).
    """

    carries_state = True

    def __init__(self, context: ExitContext, codewords: int = 64,
                 stopping: str = "activation_ratio", confidence: str = "max_softmax"):
        super().__init__(context, confidence)
        self.layout = require_layout(context, self.type_name, TOKENS, MAP)
        if stopping not in STOPPING_RULES:
            raise ConfigError(f"unknown BoF stopping rule {stopping!r}; choose one of "
                              f"{STOPPING_RULES}")
        if codewords < 2:
            raise ConfigError(f"a BoF codebook needs at least 2 codewords, got {codewords}")
        self.codewords = int(codewords)
        self.stopping = stopping
        if stopping == "activation_ratio":
            self.confidence_measure = ACTIVATION_RATIO
        self.bof = BoFLayer(context.embed_dim, self.codewords)
        if "ensemble" in context.shared:
            raise ConfigError("a model's state-carrying exits must all be of one kind: bof and "
                              "ensemble exits cannot be mixed")
        shared = context.shared.setdefault(_SHARED_KEY, {})
        if "classifier" not in shared:
            shared["classifier"] = SharedClassifier(self.codewords, context.num_outputs)
            shared["levels"] = 0
        elif shared["classifier"].codewords != self.codewords:
            raise ConfigError(
                f"every BoF exit of a model shares one classifier, so all need the same number of "
                f"codewords: {shared['classifier'].codewords} and {self.codewords} were given"
            )
        shared["levels"] += 1
        #: 1 for the model's first BoF exit, 2 for the second, ...
        self.level = shared["levels"]
        self.classifier = shared["classifier"]
        self.register_buffer("mean_activation", torch.ones(()))

    def forward(self, tokens, audio=None, state=None):
        if state is None and self.level > 1:
            raise ConfigError(
                f"BoF exit at level {self.level} needs the histogram sum of the BoF exits before "
                f"it (state); run the model's exits in order"
            )
        features = local_features(tokens, self.context, self.layout)  # (B, P, C)
        histogram = self.bof(features)  # (B, M)
        total = histogram if state is None else state + histogram  # (B, M)
        return self.classifier(total / self.level), total  # (B, K), (B, M)

    def confidence(self, output: torch.Tensor) -> torch.Tensor:
        if self.stopping == "standard":
            return super().confidence(output)
        activation = output.float().softmax(dim=-1).amax(dim=-1)  # (B,)
        ratio = activation / self.mean_activation
        return ratio / (1.0 + ratio)

    def options(self) -> dict:
        return {"codewords": self.codewords, "stopping": self.stopping}


def bof_exits(model) -> list[int]:
    """Indices of the BoF exits of a :class:`MultiExitModel`."""
    return [k for k, head in enumerate(model.exits) if isinstance(head, BoFExit)]


@torch.no_grad()
def measure_mean_activations(model, dataset, batch_size: int = 256) -> dict[int, float]:
    """Sets each BoF exit's ``mean_activation`` to its mean max-softmax on ``dataset``.

    Call it after training, on the training split (the paper's reference), before export.

    Args:
        model: A :class:`MultiExitModel` with BoF exits.
        dataset: A :class:`~trt_exit.training.datasets.Dataset` (no augmentation is applied).
        batch_size: Samples per forward pass.

    Returns:
        ``{exit index: mean activation}``.
    """
    from trt_exit.models.predict import predict_exits

    indices = bof_exits(model)
    if not indices:
        raise ConfigError("the model has no BoF exits to calibrate")
    outputs = predict_exits(model, dataset.inputs, batch_size)
    measured = {}
    for k in indices:
        probabilities = torch.from_numpy(outputs[k]).softmax(dim=-1)
        value = float(probabilities.amax(dim=-1).mean())
        model.exits[k].mean_activation.fill_(value)
        measured[k] = value
    return measured


@torch.no_grad()
def init_codebooks_from_data(model, inputs: dict[str, Any], seed: int = 0) -> None:
    """Initializes every BoF codebook with randomly chosen local features of real inputs.

    Args:
        model: A :class:`MultiExitModel` with BoF exits.
        inputs: Model inputs by name, a batch (e.g. 256 training samples), numpy or torch.
        seed: Seed of the choice of features.
    """
    indices = bof_exits(model)
    if not indices:
        raise ConfigError("the model has no BoF exits to initialize")
    tensors = {k: torch.as_tensor(v) for k, v in inputs.items()}
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    x = tensors[model.backbone_input]
    for index in range(model.num_exits):
        x = model.run_segment(index, x)
        if index in indices:
            head = model.exits[index]
            features = head.bof.norm(local_features(x, head.context, head.layout))
            pool = features.reshape(-1, features.shape[-1])  # (B*P, C)
            if len(pool) < head.codewords:
                raise ConfigError(f"{len(pool)} local features cannot seed {head.codewords} "
                                  f"codewords; pass more samples")
            chosen = torch.randperm(len(pool), generator=generator)[: head.codewords]
            head.bof.codebook.copy_(pool[chosen])
    model.train(was_training)
