"""Cutting a multi-exit model into stages: one module per backbone segment and per exit.

Stage order is segment_0, exit_0, segment_1, exit_1, ..., segment_N, exit_N (the final head).
Each stage module takes and returns plain tensors in the order of its :class:`StageEntry`'s
``inputs`` and ``outputs``, whose names come from :mod:`trt_exit.tensor_names`. The same modules
are exported to ONNX and run by the torch backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from trt_exit import tensor_names as tn
from trt_exit.manifest import StageEntry, TensorSpec
from trt_exit.models.multi_exit import MultiExitModel


class SegmentStage(nn.Module):
    """Backbone segment ``index``: image (index 0) or tokens in, tokens out."""

    def __init__(self, model: MultiExitModel, index: int):
        super().__init__()
        self.model = model
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.run_segment(self.index, x)


class ExitStage(nn.Module):
    """Exit ``index``: tokens (and audio / previous state if the head reads them) in;
    output, confidence (and state for the next exit) out."""

    def __init__(self, model: MultiExitModel, index: int, reads_audio: bool, reads_state: bool,
                 writes_state: bool):
        super().__init__()
        self.model = model
        self.index = index
        self.reads_audio = reads_audio
        self.reads_state = reads_state
        self.writes_state = writes_state

    def forward(self, tokens: torch.Tensor, *extra: torch.Tensor):
        extra_list = list(extra)
        audio = extra_list.pop(0) if self.reads_audio else None
        state = extra_list.pop(0) if self.reads_state else None
        head = self.model.exits[self.index]
        output, state = self.model.run_exit(self.index, tokens, audio, state)
        confidence = head.confidence(output)
        if self.writes_state:
            return output, confidence, state
        return output, confidence


class FullModelStage(nn.Module):
    """The no-exit baseline: every segment and the final head in one graph.

    Early exits are skipped, except state-carrying exits whose state the final head reads.
    """

    def __init__(self, model: MultiExitModel):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, *extra: torch.Tensor):
        model = self.model
        audio = extra[0] if extra else (x if model.backbone_input == tn.AUDIO else None)
        final = model.num_exits - 1
        needs_state = model.exits[final].carries_state
        state = None
        for index in range(model.num_exits):
            x = model.run_segment(index, x)
            if index == final:
                output, _ = model.run_exit(index, x, audio, state)
            elif needs_state and model.exits[index].carries_state:
                _, state = model.run_exit(index, x, audio, state)
        return output, model.exits[final].confidence(output)


@dataclass
class Stage:
    """A stage's manifest entry (without files yet) and its module."""

    entry: StageEntry
    module: nn.Module


def _spec(name: str, tensor: torch.Tensor) -> TensorSpec:
    return TensorSpec(name=name, shape=[-1, *tensor.shape[1:]], dtype=str(tensor.dtype).split(".")[-1])


def _state_links(model: MultiExitModel) -> tuple[dict[int, int], set[int]]:
    """For each state-reading exit, the exit whose state it reads; and the exits that write."""
    reads: dict[int, int] = {}
    writes: set[int] = set()
    previous = None
    for index, head in enumerate(model.exits):
        if head.carries_state:
            if previous is not None:
                reads[index] = previous
                writes.add(previous)
            previous = index
    return reads, writes


@torch.no_grad()
def split_stages(model: MultiExitModel, example: dict[str, torch.Tensor]) -> list[Stage]:
    """Cuts ``model`` into stages, with tensor specs taken from a run on ``example``.

    Args:
        model: The model (put in eval mode here).
        example: Example model inputs by name (``image``, and ``audio`` for AV models).

    Returns:
        Stages in execution order: segment_0, exit_0, segment_1, ...
    """
    model.eval()
    reads, writes = _state_links(model)
    stages: list[Stage] = []
    values: dict[str, torch.Tensor] = dict(example)
    first_input = model.backbone_input
    x = example[first_input]
    for index in range(model.num_exits):
        seg_in = first_input if index == 0 else tn.tokens(index - 1)
        segment = SegmentStage(model, index)
        x = segment(x)
        values[tn.tokens(index)] = x
        start, end = model.segment_blocks(index)
        stages.append(Stage(StageEntry(
            name=tn.stage_name(tn.SEGMENT, index), kind=tn.SEGMENT, index=index,
            blocks=[start, end], inputs=[_spec(seg_in, values[seg_in])],
            outputs=[_spec(tn.tokens(index), x)]), segment))

        head = model.exits[index]
        input_names = [tn.tokens(index)]
        if head.uses_audio:
            input_names.append(tn.AUDIO)
        if index in reads:
            input_names.append(tn.exit_state(reads[index]))
        stage = ExitStage(model, index, head.uses_audio, index in reads, index in writes)
        results = stage(*[values[n] for n in input_names])
        output_names = [tn.exit_output(index), tn.exit_confidence(index)]
        if index in writes:
            output_names.append(tn.exit_state(index))
        values.update(zip(output_names, results))
        stages.append(Stage(StageEntry(
            name=tn.stage_name(tn.EXIT, index), kind=tn.EXIT, index=index, blocks=[end, end],
            inputs=[_spec(n, values[n]) for n in input_names],
            outputs=[_spec(n, values[n]) for n in output_names],
            exit_type=head.type_name), stage))
    return stages


def full_model_io(model: MultiExitModel, example: dict[str, torch.Tensor]) -> tuple[
        FullModelStage, list[TensorSpec], list[TensorSpec]]:
    """The baseline module with its input and output specs."""
    module = FullModelStage(model).eval()
    names = [model.backbone_input]
    if model.exits[-1].uses_audio and tn.AUDIO not in names:
        names.append(tn.AUDIO)
    with torch.no_grad():
        output, confidence = module(*[example[n] for n in names])
    final = model.num_exits - 1
    inputs = [_spec(n, example[n]) for n in names]
    outputs = [_spec(tn.exit_output(final), output), _spec(tn.exit_confidence(final), confidence)]
    return module, inputs, outputs
