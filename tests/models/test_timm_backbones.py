"""Exits on timm backbones beyond plain ViTs: EVA, DeiT3, BEiT, ResNet, ConvNeXt, EfficientNet,
MobileNetV3 (issue 15, item 3), and pretrained weights from a file (item 4). Tiny configs only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trt_exit.errors import ArtifactError, ConfigError

timm = pytest.importorskip("timm", reason="timm is in the [dev] extra")

from trt_exit.models.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from trt_exit.models.timm_adapter import attach_exits, create_timm_model  # noqa: E402

SMALL_VIT = dict(img_size=32, patch_size=8, depth=3, embed_dim=32, num_heads=2, num_classes=5)
CNN_INPUT = (3, 32, 32)
#: name, creation arguments, input size, exit positions, exit families
BACKBONES = {
    "vit": ("vit_tiny_patch16_224", SMALL_VIT, None, [2], ["mlp"]),
    "deit3": ("deit3_small_patch16_224", SMALL_VIT, None, [1, 2], ["mlp", "cnn_project"]),
    "eva02": ("eva02_tiny_patch14_224", dict(img_size=28, depth=3, num_classes=5), None,
              [1, 2], ["slvit", "vitee"]),
    "beit": ("beit_base_patch16_224", SMALL_VIT, None, [2], ["cnn_add"]),
    "resnet": ("resnet18", dict(num_classes=5), CNN_INPUT, [2, 5], ["slvit_cnn", "cnn_ignore"]),
    "convnext": ("test_convnext", dict(num_classes=5), CNN_INPUT, [1, 4], ["bof", "bof"]),
    "efficientnet": ("test_efficientnet", dict(num_classes=5), CNN_INPUT, [1, 3],
                     ["slvit_cnn", "cnn_ignore"]),
    "mobilenetv3": ("mobilenetv3_small_050", dict(num_classes=5), CNN_INPUT, [3, 8],
                    ["slvit_cnn", "cnn_ignore"]),
}


def _build(key):
    name, kwargs, size, blocks, families = BACKBONES[key]
    torch.manual_seed(0)
    timm_model = create_timm_model(name, **kwargs).eval()
    return timm_model, attach_exits(timm_model, blocks, families, input_size=size).eval()


@pytest.mark.parametrize("key", sorted(BACKBONES))
def test_final_exit_reproduces_timm_and_checkpoint_round_trips(key, tmp_path):
    timm_model, model = _build(key)
    x = torch.randn(2, *model.backbone.input_size)
    with torch.no_grad():
        outputs = model(x)
        reference = timm_model(x)
    assert len(outputs) == len(BACKBONES[key][3]) + 1
    assert all(o.shape == (2, 5) for o in outputs)
    torch.testing.assert_close(outputs[-1], reference, rtol=0, atol=1e-5)
    again = load_checkpoint(save_checkpoint(model, tmp_path / "m.safetensors"))
    with torch.no_grad():
        for a, b in zip(outputs, again(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cnn_exits_see_the_width_and_grid_of_their_stage():
    _, model = _build("resnet")
    # resnet18 on 32x32: stem 8x8 (stride 4); units 1-2 width 64 at 8x8, 3-4 width 128 at 4x4, ...
    first, second = model.exits[0].context, model.exits[1].context
    assert (first.embed_dim, first.grid_size) == (64, (8, 8))
    assert (second.embed_dim, second.grid_size) == (256, (2, 2))
    assert model.backbone.feature_layout == "map"


@pytest.mark.parametrize("key", ["vit", "resnet", "eva02", "convnext"])  # convnext: BoF state
def test_exported_stages_match_pytorch(key, tmp_path):
    from trt_exit.export.onnx_export import export_model
    from trt_exit.runtime.executor import Executor
    from trt_exit.runtime.policies import AllExitsPolicy

    timm_model, model = _build(key)
    x = np.random.default_rng(0).standard_normal((3, *model.backbone.input_size)).astype(np.float32)
    manifest = export_model(model, tmp_path / "export", sample_inputs={"image": x})
    assert manifest.parity["fp32"]["max_output_diff"] <= 1e-4
    with Executor(manifest, policy=AllExitsPolicy()) as executor:
        results = executor.run(x)
    with torch.no_grad():
        reference = timm_model(torch.from_numpy(x)).numpy()
    assert np.abs(results.all_outputs[-1] - reference).max() <= 1e-4


def test_layout_decides_the_exit_families():
    timm_model = create_timm_model("resnet18", num_classes=5)
    with pytest.raises(ConfigError, match="'mlp' exit reads tokens.*feature maps"):
        attach_exits(timm_model, [2], "mlp", input_size=CNN_INPUT)
    vit = create_timm_model("vit_tiny_patch16_224", **SMALL_VIT)
    with pytest.raises(ConfigError, match="'slvit_cnn' exit reads map"):
        attach_exits(vit, [1], "slvit_cnn")


def test_unsupported_models_and_positions_are_clear_errors():
    byob = create_timm_model("test_byobnet", num_classes=5)
    with pytest.raises(ConfigError, match="ByobNet is not a family.*supported: .*ResNet"):
        attach_exits(byob, [1], "cnn_ignore", input_size=CNN_INPUT)
    resnet = create_timm_model("resnet18", num_classes=5)
    with pytest.raises(ConfigError, match="exit position 9 is outside 1..7.*8 units"):
        attach_exits(resnet, [9], "cnn_ignore", input_size=CNN_INPUT)
    with pytest.raises(ConfigError, match="strictly increasing"):
        attach_exits(resnet, [4, 2], "cnn_ignore", input_size=CNN_INPUT)


# --------------------------------------------------------------------------- weights from a file


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_pretrained_weights_from_a_file(suffix, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = timm.create_model("resnet18", num_classes=5).eval()
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state, "epoch": 3}, path)  # a training checkpoint dict
    loaded = create_timm_model("resnet18", checkpoint=path, num_classes=5).eval()
    x = torch.randn(1, *CNN_INPUT)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=0)


def test_weights_of_another_architecture_are_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "resnet34.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=5).state_dict(), str(path))
    with pytest.raises(ArtifactError, match="does not fit ResNet: .*missing keys"):
        create_timm_model("resnet18", checkpoint=path, num_classes=5)
    path = tmp_path / "classes.safetensors"
    save_file(timm.create_model("resnet18", num_classes=7).state_dict(), str(path))
    with pytest.raises(ArtifactError, match=r"shape mismatches \(fc.weight: file \(7, 512\)"):
        create_timm_model("resnet18", checkpoint=path, num_classes=5)


class _Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_weights_files_never_run_code(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"fc.weight": _Payload()}, path)
    with pytest.raises(ArtifactError, match="weights_only=True"):
        create_timm_model("resnet18", checkpoint=path, num_classes=5)
    assert "code ran" not in capsys.readouterr().out
    with pytest.raises(ArtifactError, match="does not exist"):
        create_timm_model("resnet18", checkpoint=tmp_path / "nope.safetensors")
