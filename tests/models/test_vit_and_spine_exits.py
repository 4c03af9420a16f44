"""ViT backbone, the spine's exit heads and the multi-exit model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trt_exit.errors import ConfigError
from trt_exit.models import ExitSpec, ModelConfig, ViTConfig, VisionTransformer, build_model, create_model
from trt_exit.models.confidence import ENTROPY, MAX_SOFTMAX, check, compute
from trt_exit.models.exits import ExitContext, create_exit, exit_types


@pytest.mark.parametrize("img_size,patch,tokens", [(8, 2, 17), ((8, 12), 4, 7), (32, 4, 65), (4, 4, 2)])
def test_vit_token_layout_for_any_image_size(img_size, patch, tokens):
    vit = VisionTransformer(ViTConfig(img_size=img_size, patch_size=patch, in_chans=3,
                                      embed_dim=16, depth=2, num_heads=2))
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    x = torch.randn(3, 3, h, w)
    out = vit.embed(x)
    assert out.shape == (3, tokens, 16) == (3, vit.num_tokens, 16)
    inter = vit.forward_intermediates(x, [1, 2])
    assert len(inter) == 2 and inter[-1].shape == out.shape


@pytest.mark.parametrize("kwargs,message", [
    (dict(img_size=8, patch_size=3), "must divide the image size"),
    (dict(embed_dim=10, num_heads=4), "must divide embed_dim"),
    (dict(depth=0), "depth must be at least 1"),
])
def test_vit_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        VisionTransformer(ViTConfig(**kwargs))


def _context(task="classification", outputs=10):
    return ExitContext(embed_dim=16, num_heads=2, num_tokens=17, num_prefix_tokens=1,
                       grid_size=(4, 4), num_outputs=outputs, task=task)


@pytest.mark.parametrize("exit_type", ["mlp", "slvit", "vit_head"])
def test_spine_exit_heads_map_tokens_to_outputs(exit_type):
    head = create_exit(exit_type, _context())
    out = head(torch.randn(5, 17, 16))
    assert out.shape == (5, 10)
    conf = head.confidence(out)
    assert conf.shape == (5,) and bool(((conf >= 0) & (conf <= 1)).all())
    # options() recreates an equivalent head
    again = create_exit(exit_type, _context(), **head.options())
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in head.parameters())


def test_unknown_exit_type_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown exit type 'nope'.*mlp.*slvit"):
        create_exit("nope", _context())
    assert {"mlp", "slvit", "vit_head"} <= set(exit_types())


def test_bad_exit_options_are_a_config_error():
    with pytest.raises(ConfigError, match="bad options"):
        create_exit("mlp", _context(), width=3)


def test_confidence_measures():
    logits = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    ms = compute(MAX_SOFTMAX, logits)
    ent = compute(ENTROPY, logits)
    assert ms[0] > 0.99 and abs(float(ms[1]) - 1 / 3) < 1e-6
    assert ent[0] > 0.99 and abs(float(ent[1])) < 1e-6  # uniform: zero confidence
    with pytest.raises(ConfigError, match="does not apply to regression"):
        check(MAX_SOFTMAX, "regression")


def test_exit_context_rejects_inconsistent_layout():
    with pytest.raises(ConfigError, match="patch grid"):
        ExitContext(embed_dim=16, num_heads=2, num_tokens=10, num_prefix_tokens=1,
                    grid_size=(4, 4), num_outputs=10)


def test_multi_exit_segments_chain_to_forward():
    model = create_model("multi_exit_vit_tiny_test").eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        outputs = model(x)
        tokens, chained = x, []
        for k in range(model.num_exits):
            tokens = model.run_segment(k, tokens)
            chained.append(model.run_exit(k, tokens)[0])
    assert len(outputs) == model.num_exits == 3
    for a, b in zip(outputs, chained):
        torch.testing.assert_close(a, b)
    # the segments partition the blocks
    ranges = [model.segment_blocks(k) for k in range(model.num_exits)]
    assert ranges == [(0, 1), (1, 2), (2, 3)]


@pytest.mark.parametrize("positions", [[0], [2, 2], [3, 1], [5]])
def test_bad_exit_positions(positions):
    config = ModelConfig(name="bad", backbone_options=dict(img_size=8, patch_size=2, embed_dim=16,
                                                            depth=3, num_heads=2),
                         exits=[ExitSpec(b, "mlp") for b in positions])
    with pytest.raises(ConfigError):
        build_model(config)


def test_unknown_model_name():
    with pytest.raises(ConfigError, match="registered models"):
        create_model("no_such_model")


def test_config_round_trip():
    config = create_model("multi_exit_vit_digits").config
    again = ModelConfig.from_dict(config.to_dict())
    assert again == config
    with pytest.raises(ConfigError, match="unknown model config keys"):
        ModelConfig.from_dict({**config.to_dict(), "bogus": 1})
