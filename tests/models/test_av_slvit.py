"""The audiovisual SL-ViT exit, its regression confidence, and the registered crowd models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trt_exit import tensor_names as tn
from trt_exit.errors import ConfigError
from trt_exit.models import confidence as confidence_measures
from trt_exit.models import create_model, model_config
from trt_exit.models.audiovisual import AV_CROWD_LOG_MEL, av_crowd_config
from trt_exit.models.exits import ExitContext, create_exit
from trt_exit.models.exits.av_slvit import PREDICTED_ERROR, predicted_error_confidence
from trt_exit.pipelines.audio_features import LogMelConfig

AUDIO_SHAPE = (1, 32, 64)


def _context(task: str = "regression", num_outputs: int = 2, audio_shape=AUDIO_SHAPE):
    return ExitContext(embed_dim=16, num_heads=2, num_tokens=13, num_prefix_tokens=1,
                       grid_size=(3, 4), num_outputs=num_outputs, task=task,
                       audio_shape=audio_shape)


def _inputs(batch: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 13, 16, generator=generator),
            torch.randn(batch, *AUDIO_SHAPE, generator=generator))


@pytest.mark.parametrize("modality", ["audio", "visual", "audiovisual"])
def test_exit_reads_exactly_its_modalities(modality):
    torch.manual_seed(0)
    head = create_exit("av_slvit", _context(), modality=modality, value_offset=20.0,
                       value_scale=20.0).eval()
    assert head.uses_audio == (modality != "visual")
    tokens, audio = _inputs()
    other_tokens, other_audio = _inputs(seed=1)
    with torch.no_grad():
        out = head(tokens, audio=audio)
        assert out.shape == (3, 2)
        conf = head.confidence(out)
        assert conf.shape == (3,) and bool(((conf > 0) & (conf <= 1)).all())
        token_effect = (head(other_tokens, audio=audio) - out).abs().max().item()
        audio_effect = (head(tokens, audio=other_audio) - out).abs().max().item()
    assert (token_effect > 1e-4) == (modality != "audio")
    assert (audio_effect > 1e-4) == (modality != "visual")


def test_output_scaling_and_prediction():
    head = create_exit("av_slvit", _context(), value_offset=20.0, value_scale=20.0)
    torch.nn.init.zeros_(head.fc.weight)
    torch.nn.init.zeros_(head.fc.bias)
    out = head(*_inputs()[:1], audio=_inputs()[1])
    # A zero linear output means the offset as the count and b = value_scale.
    assert torch.allclose(out[:, 0], torch.full((3,), 20.0))
    assert torch.allclose(out[:, 1], torch.full((3,), math.log(20.0)))
    assert head.prediction(out).shape == (3, 1)
    assert torch.allclose(head.prediction(out), out[:, :1])


def test_predicted_error_confidence_is_one_over_one_plus_b():
    log_b = torch.tensor([-20.0, 0.0, math.log(3.0), 30.0])
    output = torch.stack([torch.zeros(4), log_b], dim=1)
    conf = predicted_error_confidence(output)
    assert torch.allclose(conf, 1.0 / (1.0 + log_b.exp()), atol=1e-6)
    assert conf[0] > 0.99 and abs(conf[1] - 0.5) < 1e-6 and conf[3] < 1e-6
    assert PREDICTED_ERROR in confidence_measures.REGRESSION_MEASURES
    assert torch.allclose(confidence_measures.compute(PREDICTED_ERROR, output), conf)


def test_loss_trains_the_count_by_l1_and_the_scale_by_laplace_nll():
    head = create_exit("av_slvit", _context(), value_offset=20.0, value_scale=20.0)
    target = torch.tensor([[10.0], [30.0]])
    output = torch.tensor([[14.0, math.log(4.0)], [30.0, math.log(4.0)]], requires_grad=True)
    loss = head.loss(output, target)
    loss.backward()
    # Count gradient: the L1 term only (sign / scale / batch), not scaled by 1 / b.
    assert output.grad[0, 0].item() == pytest.approx(1.0 / 20.0 / 2.0)
    # Scale gradient: d/dlog_b (log_b + e / b) = 1 - e / b, averaged over the batch.
    assert output.grad[0, 1].item() == pytest.approx((1.0 - 4.0 / 4.0) / 2.0, abs=1e-6)
    assert output.grad[1, 1].item() == pytest.approx((1.0 - 0.0) / 2.0)
    # The NLL is lowest when b matches the error.
    def nll(b):
        out = torch.tensor([[14.0, math.log(b)]])
        return head.loss(out, torch.tensor([[10.0]])).item()
    assert nll(4.0) < nll(1.0) and nll(4.0) < nll(16.0)


def test_classification_variant_gives_logits():
    head = create_exit("av_slvit", _context("classification", 5), modality="audiovisual")
    tokens, audio = _inputs()
    out = head(tokens, audio=audio)
    assert out.shape == (3, 5)
    assert head.confidence_measure == "max_softmax"
    assert head.prediction(out) is out
    assert head.loss(out, torch.tensor([0, 1, 4])).ndim == 0


@pytest.mark.parametrize("options, match", [
    ({"modality": "smell"}, "modality"),
    ({"audio_patch": [5, 8]}, "divide"),
    ({"value_scale": 0.0}, "value_scale"),
    ({"confidence": "max_softmax"}, "does not apply to regression"),
])
def test_bad_options_are_config_errors(options, match):
    with pytest.raises(ConfigError, match=match):
        create_exit("av_slvit", _context(), **options)


def test_context_errors_say_what_to_do():
    with pytest.raises(ConfigError, match="num_outputs >= 2"):
        create_exit("av_slvit", _context(num_outputs=1))
    with pytest.raises(ConfigError, match="audio_shape"):
        create_exit("av_slvit", _context(audio_shape=None), modality="audio")
    create_exit("av_slvit", _context(audio_shape=None), modality="visual")  # needs no audio


def test_registered_crowd_configs():
    for name in ("multi_exit_av_crowd", "multi_exit_av_crowd_tiny_test"):
        config = model_config(name)
        assert config.task == "regression" and config.num_outputs == 2
        assert config.confidence == PREDICTED_ERROR
        assert set(config.preprocessing) == {"image", "audio"}
        assert config.preprocessing["image"]["size"] == [96, 128]
        assert LogMelConfig.from_dict(config.preprocessing["audio"]) == AV_CROWD_LOG_MEL
        assert tuple(config.audio_shape) == AV_CROWD_LOG_MEL.shape
    model = create_model("multi_exit_av_crowd_tiny_test")
    assert model.input_names() == [tn.IMAGE, tn.AUDIO]
    assert model.input_shapes() == {tn.IMAGE: (3, 96, 128), tn.AUDIO: (1, 32, 64)}
    assert [head.modality for head in model.exits] == ["audio", "visual", "audiovisual"]
    outputs = model(torch.randn(2, 3, 96, 128), torch.randn(2, 1, 32, 64))
    assert [tuple(o.shape) for o in outputs] == [(2, 2)] * 3


def test_checkpoint_round_trip(tmp_path):
    from trt_exit.models.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    config = av_crowd_config("av_roundtrip", embed_dim=16, depth=2, num_heads=2, patch_size=32,
                             exits=[(1, "audiovisual")], head_modality="visual", exit_dim=8,
                             audio_patch=(16, 16))
    from trt_exit.models.multi_exit import build_model

    model = build_model(config).eval()
    save_checkpoint(model, tmp_path / "m.safetensors")
    again = load_checkpoint(tmp_path / "m.safetensors")
    image, audio = torch.randn(2, 3, 96, 128), torch.randn(2, 1, 32, 64)
    with torch.no_grad():
        for a, b in zip(model(image, audio), again(image, audio)):
            assert torch.equal(a, b)
    assert again.exits[0].options() == model.exits[0].options()
    assert np.array_equal(again.exits[0].audio_patch, (16, 16))


def test_conv_stem_vit_keeps_the_vit_token_layout():
    from trt_exit.models.audiovisual import ConvStem, ConvStemViT
    from trt_exit.models.vit import ViTConfig

    backbone = ConvStemViT(ViTConfig(img_size=(96, 128), patch_size=16, in_chans=3, embed_dim=32,
                                     depth=2, num_heads=2))
    assert backbone.patch_embed.channels == [16, 32, 32]
    assert backbone.grid_size == (6, 8) and backbone.num_tokens == 49
    assert backbone.embed(torch.randn(2, 3, 96, 128)).shape == (2, 49, 32)
    with pytest.raises(ConfigError, match="power-of-two"):
        ConvStem((96, 96), 12, 3, 32)
    with pytest.raises(ConfigError, match="stem channels"):
        ConvStem((96, 96), 16, 3, 32, channels=[8, 8])


def test_feature_map_backbones_are_refused_clearly():
    from trt_exit.models.multi_exit import ExitSpec, build_model

    config = model_config("multi_exit_cnn_tiny_test",
                          exits=[ExitSpec(1, "av_slvit", {"modality": "visual"})])
    with pytest.raises(ConfigError, match="reads tokens"):
        build_model(config)
