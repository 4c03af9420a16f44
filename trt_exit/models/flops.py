"""Parameter and FLOP counts of a model's parts: exits, backbone blocks, the whole chain.

FLOPs are counted by PyTorch itself, with :class:`torch.utils.flop_counter.FlopCounterMode`,
on one forward pass of one sample; nothing is hand-counted. What that counter counts, and so what
every number here means:

* matrix products and convolutions only (``mm``, ``addmm``, ``bmm``, ``matmul``, ``convolution``,
  scaled-dot-product attention): two FLOPs per multiply-accumulate;
* element-wise work (GELU, softmax, LayerNorm, additions, pooling, ``cdist``-style distances
  written with element-wise ops) counts zero. For the small heads here that is a few percent at
  most, and it is the same convention as the FLOP tables of the papers this project follows.

All functions run the module in eval mode under ``torch.no_grad()`` and restore its mode.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``module``, each shared tensor counted once.

    Args:
        module: Any module.
        trainable_only: Count only parameters with ``requires_grad``.
    """
    seen: dict[int, int] = {}
    for param in module.parameters():
        if trainable_only and not param.requires_grad:
            continue
        seen[id(param)] = param.numel()
    return int(sum(seen.values()))


def count_flops(fn: Callable[..., Any] | nn.Module, *args: Any, **kwargs: Any) -> int:
    """FLOPs (2 x multiply-accumulates of matmuls and convolutions) of one call ``fn(*args)``.

    Args:
        fn: A module or any callable running torch ops.
        *args: Positional arguments of the call (give them a batch of one sample to get
            per-sample FLOPs).
        **kwargs: Keyword arguments of the call.

    Returns:
        The total counted by :class:`~torch.utils.flop_counter.FlopCounterMode`.
    """
    from torch.utils.flop_counter import FlopCounterMode

    module = fn if isinstance(fn, nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            fn(*args, **kwargs)
        return int(counter.get_total_flops())
    finally:
        if module is not None:
            module.train(was_training)


def _example_inputs(model) -> dict[str, torch.Tensor]:
    """One random sample of every model input (FLOPs do not depend on the values)."""
    generator = torch.Generator().manual_seed(0)
    return {name: torch.randn((1, *shape), generator=generator)
            for name, shape in model.input_shapes().items()}


def _features_before_exits(model, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The tensors each exit of ``model`` reads (one sample)."""
    x = inputs[model.backbone_input]
    features = []
    with torch.no_grad():
        for index in range(model.num_exits):
            x = model.run_segment(index, x)
            features.append(x)
    return features


def model_costs(model, inputs: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Per-sample FLOPs and parameters of every part of a :class:`MultiExitModel`.

    Args:
        model: The multi-exit model.
        inputs: One sample of every input by name, batch 1 (random when None).

    Returns:
        A JSON-ready dict:

        * ``embed_flops``: the embedding (patch projection, or a CNN stem);
        * ``block_flops``: one per backbone block (blocks of one backbone usually cost the same);
        * ``segment_flops``: one per segment (segment 0 includes the embedding);
        * ``exits``: one dict per exit (final head last) with ``params``, ``flops`` and
          ``cumulative_flops`` (every segment up to the exit, plus this exit head only);
        * ``backbone_params``.
    """
    from trt_exit import tensor_names as tn

    inputs = inputs if inputs is not None else _example_inputs(model)
    audio = inputs.get(tn.AUDIO)
    image = inputs[model.backbone_input]
    backbone = model.backbone
    embed_flops = count_flops(backbone.embed, image)
    with torch.no_grad():
        x = backbone.embed(image)
    block_flops = []
    for block in backbone.blocks:
        block_flops.append(count_flops(block, x))
        with torch.no_grad():
            x = block(x)
    features = _features_before_exits(model, inputs)
    segment_flops = []
    for index in range(model.num_exits):
        start, end = model.segment_blocks(index)
        segment_flops.append((embed_flops if index == 0 else 0) + sum(block_flops[start:end]))
    exits = []
    state = None
    for index, head in enumerate(model.exits):
        flops = count_flops(lambda: model.run_exit(index, features[index], audio, state))
        with torch.no_grad():
            _, state = model.run_exit(index, features[index], audio, state)
        exits.append({
            "index": index,
            "after_block": model.exit_blocks[index],
            "type": head.type_name,
            "params": count_params(head),
            "flops": flops,
            "cumulative_flops": sum(segment_flops[: index + 1]) + flops,
        })
    return {
        "embed_flops": embed_flops,
        "block_flops": block_flops,
        "segment_flops": segment_flops,
        "exits": exits,
        "backbone_params": count_params(backbone),
        "flop_convention": "2 x multiply-accumulates of matmuls and convolutions, per sample "
                           "(torch.utils.flop_counter.FlopCounterMode); element-wise ops count 0",
    }
