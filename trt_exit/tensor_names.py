"""Tensor and stage names: defined here once, used by export, build and run.

Every stage graph (ONNX, TensorRT engine) binds its tensors by these names, never by position.
A name means the same tensor in every graph it appears in: segment ``k`` writes
``tokens_k`` and segment ``k + 1`` and exit ``k`` read it, so the executor can hand one stage's
output buffer to the next stage as is.
"""

from __future__ import annotations

import re

#: Image input of the model, (B, C, H, W) float32, already preprocessed (see the manifest).
IMAGE = "image"
#: Audio input of audiovisual models: the window ending at the frame, see the manifest.
AUDIO = "audio"

#: Stage kinds.
SEGMENT = "segment"
EXIT = "exit"


def tokens(segment_index: int) -> str:
    """Hidden tokens (B, N, C) written by backbone segment ``segment_index``."""
    return f"tokens_{segment_index}"


def exit_output(exit_index: int) -> str:
    """Prediction of exit ``exit_index``: logits (B, classes) or regression values (B, outputs)."""
    return f"exit_{exit_index}_output"


def exit_confidence(exit_index: int) -> str:
    """Per-sample confidence (B,) in [0, 1] of exit ``exit_index``, computed in the graph."""
    return f"exit_{exit_index}_confidence"


def exit_state(exit_index: int) -> str:
    """State an exit hands to the next exit (e.g. the accumulated BoF histogram), (B, S)."""
    return f"exit_{exit_index}_state"


def stage_name(kind: str, index: int) -> str:
    """File and manifest name of a stage: ``segment_0``, ``exit_0``, ..."""
    if kind not in (SEGMENT, EXIT):
        raise ValueError(f"unknown stage kind {kind!r}; expected {SEGMENT!r} or {EXIT!r}")
    return f"{kind}_{index}"


#: The baseline graph: backbone and final head in one graph, no exit heads.
FULL_MODEL = "full"

#: The single early-exit graph: the whole exit chain in one graph with nested ``If`` nodes
#: (:mod:`trt_exit.export.early_exit_graph`); its file is ``onnx/<precision>/early_exit.onnx``.
EARLY_EXIT_GRAPH = "early_exit"
#: Its extra input: (E - 1,) float32, one confidence threshold per early exit, in exit order.
#: A graph input with an initializer of the same name, so the tuned thresholds are the default
#: and a caller may pass others. A value above 1 never exits there; the entry of an exit that
#: is not in the graph (disabled by tuning) is not read.
THRESHOLDS = "thresholds"
#: Its outputs: the output (B, K) float32 of the exit each sample took ...
EARLY_EXIT_OUTPUT = "output"
#: ... that exit's confidence (B,) float32 ...
EARLY_EXIT_CONFIDENCE = "confidence"
#: ... and the exit's index (B,) int64 (the final head is ``num_exits - 1``).
EARLY_EXIT_INDEX = "exit_index"

_EXIT_OUTPUT = re.compile(r"^exit_(\d+)_output$")


def exit_index_of_output(name: str) -> int | None:
    """Returns ``k`` for ``exit_k_output``, else None."""
    match = _EXIT_OUTPUT.match(name)
    return int(match.group(1)) if match else None
