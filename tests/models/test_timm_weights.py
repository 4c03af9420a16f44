"""Weights files whose architecture differs from timm's defaults for the name, position tables
resampled as timm does, and models from ``timm.create_model`` attached like the CLI's (issue 20,
items 12-14). Real timm models, tiny sizes, random weights saved as the user's checkpoint."""

from __future__ import annotations

import warnings

import pytest
import torch

from trt_exit.errors import ArtifactError, ConfigError

timm = pytest.importorskip("timm", reason="timm is in the [dev] extra")

from trt_exit.models.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from trt_exit.models.timm_adapter import (  # noqa: E402
    CREATE_ARGS_ATTR,
    attach_exits,
    create_timm_model,
)

#: What the user gives beside the name (the file decides the rest).
SMALL = dict(depth=2, embed_dim=32, num_heads=2)


def _weights(tmp_path, name, **kwargs):
    """The user's checkpoint: a timm model with random weights, saved as safetensors."""
    from safetensors.torch import save_file

    torch.manual_seed(3)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


# --------------------------------------------------------------------------- item 12


@pytest.mark.parametrize("name, trained, given", [
    # the examples: 10 classes; img_size 32 with 4x4 patches
    ("vit_tiny_patch16_224", dict(num_classes=10, img_size=32, patch_size=4), {}),
    ("deit3_small_patch16_224", dict(num_classes=7, img_size=24, patch_size=8), {}),
    ("deit_tiny_distilled_patch16_224", dict(num_classes=4, img_size=32, patch_size=8), {}),
    ("eva02_tiny_patch14_224", dict(num_classes=6, img_size=28), dict(depth=2)),
    ("beit_base_patch16_224", dict(num_classes=5, img_size=32, patch_size=8), {}),
    ("resnet18", dict(num_classes=10, in_chans=1), {}),
    ("convnext_atto", dict(num_classes=0), {}),  # a headless file: no classifier
])
def test_what_the_file_fixes_is_read_off_it(tmp_path, name, trained, given):
    """Item 12: the model was created with timm's defaults first and refused the weights."""
    tokens = name.split("_")[0] in ("vit", "deit3", "deit", "beit")
    extra = SMALL if tokens else {}
    source, path = _weights(tmp_path, name, **trained, **extra, **given)
    model = create_timm_model(name, checkpoint=path, **extra, **given)
    record = getattr(model, CREATE_ARGS_ATTR)
    inferred = {k: v for k, v in trained.items() if k not in given}
    assert record["weights"]["inferred"] == inferred
    assert record["kwargs"] == {**extra, **given, **inferred}
    assert record["weights"]["resampled"] == []
    size = (trained.get("in_chans", 3), trained.get("img_size", 32), trained.get("img_size", 32))
    x = torch.randn(2, *size)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), source(x), rtol=0, atol=0)


@pytest.mark.parametrize("given, message", [
    ({}, "add the creation argument(s) depth=2 embed_dim=32 num_heads=H (--timm-arg KEY=VALUE "
         "each), with H the attention heads it was trained with"),
    (dict(depth=2), "add the creation argument(s) embed_dim=32 num_heads=H"),
    (dict(embed_dim=32, num_heads=2), "add the creation argument(s) depth=2 ("),
    (dict(SMALL, num_classes=3), "its classifier has 10 classes, not num_classes=3 (leave "
                                 "num_classes out"),
    (dict(SMALL, patch_size=8), "its patches are 4x4, not patch_size=8 (leave patch_size out)"),
])
def test_what_the_file_cannot_fix_names_the_argument(tmp_path, given, message):
    _, path = _weights(tmp_path, "vit_tiny_patch16_224", num_classes=10, img_size=32,
                       patch_size=4, **SMALL)
    with pytest.raises(ArtifactError, match="does not fit VisionTransformer") as error:
        create_timm_model("vit_tiny_patch16_224", checkpoint=path, **given)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_cli_trains_on_a_checkpoint_of_another_size(tmp_path, images, capsys):
    """Item 12 through train --timm: only the width the weights cannot show is given."""
    from trt_exit.cli import main
    from trt_exit.models.checkpoint import read_metadata

    root = images.write_class_folders(tmp_path / "data", per_class=5)
    _, path = _weights(tmp_path, "vit_tiny_patch16_224", num_classes=10, img_size=32,
                       patch_size=4, **SMALL)
    args = ["train", "--timm", "vit_tiny_patch16_224", "--checkpoint", path,
            "--timm-arg", "depth=2", "--timm-arg", "embed_dim=32", "--timm-arg", "num_heads=2",
            "--data", f"imagefolder://{root}", "--exits", "1:slvit", "--epochs", 1,
            "--backbone-epochs", 1, "--batch-size", 8, "--workers", 0, "--no-progress",
            "--out", tmp_path / "run"]
    assert main([str(a) for a in args]) == 0
    out = capsys.readouterr().out
    assert f"read off {path.name}: num_classes=10, patch_size=4, img_size=32" in out
    config = read_metadata(tmp_path / "run" / "checkpoint.safetensors")["config"]
    assert config["backbone_options"]["kwargs"]["img_size"] == 32
    assert config["backbone_options"]["kwargs"]["num_classes"] == 3  # the data's classes
    assert config["backbone_options"]["weights"]["inferred"]["num_classes"] == 10


# --------------------------------------------------------------------------- item 13


@pytest.mark.parametrize("name, trained", [
    ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, **SMALL)),
    ("deit3_small_patch16_224", dict(img_size=32, patch_size=8, **SMALL)),  # no_embed_class
    ("deit_tiny_distilled_patch16_224", dict(img_size=32, patch_size=8, **SMALL)),
    ("eva02_tiny_patch14_224", dict(img_size=28, depth=2)),
])
def test_position_embeddings_are_resampled_as_timm_does(tmp_path, name, trained):
    """Item 13: img_size=2x beside a checkpoint failed on pos_embed. The result is what timm's
    own pretrained-weights filter makes of the file for a model of the new size."""
    from timm.models import eva, vision_transformer

    _, path = _weights(tmp_path, name, num_classes=5, **trained)
    size = trained["img_size"] * 2
    given = {k: v for k, v in trained.items() if k != "img_size"}
    model = create_timm_model(name, checkpoint=path, img_size=size, **given)
    resampled = getattr(model, CREATE_ARGS_ATTR)["weights"]["resampled"]
    grid = size // trained.get("patch_size", 14)
    assert resampled == [{
        "tensor": "pos_embed", "from_grid": [grid // 2] * 2, "to_grid": [grid] * 2,
        "num_prefix_tokens": {"deit3": 0, "deit": 2}.get(name.split("_")[0], 1),
        "function": "timm.layers.resample_abs_pos_embed", "interpolation": "bicubic",
        "antialias": True}]
    from safetensors.torch import load_file

    fresh = timm.create_model(name, pretrained=False, num_classes=5, img_size=size, **given)
    filter_fn = eva.checkpoint_filter_fn if name.startswith("eva") else (
        vision_transformer.checkpoint_filter_fn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = filter_fn(load_file(str(path)), fresh)["pos_embed"]
    torch.testing.assert_close(model.pos_embed.detach(), expected, rtol=0, atol=0)


def test_beit_relative_position_tables_are_resized_and_recorded(tmp_path):
    from safetensors.torch import load_file
    from timm.models import beit

    _, path = _weights(tmp_path, "beit_base_patch16_224", num_classes=5, img_size=32,
                       patch_size=8, **SMALL)
    model = create_timm_model("beit_base_patch16_224", checkpoint=path, img_size=64,
                              patch_size=8, **SMALL)
    assert getattr(model, CREATE_ARGS_ATTR)["weights"]["resampled"] == [{
        "tensor": "*.relative_position_bias_table", "tables": 2, "from_window": [4, 4],
        "to_window": [8, 8], "function": "timm.layers.resize_rel_pos_bias_table"}]
    fresh = timm.create_model("beit_base_patch16_224", pretrained=False, num_classes=5,
                              img_size=64, patch_size=8, **SMALL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = beit.checkpoint_filter_fn(load_file(str(path)), fresh)
    for k in (0, 1):
        key = f"blocks.{k}.attn.relative_position_bias_table"
        assert model.get_parameter(key).shape == (15 * 15 + 3, 2)
        torch.testing.assert_close(model.get_parameter(key).detach(), expected[key], rtol=0,
                                   atol=0)


def test_the_resampling_is_recorded_in_the_manifest(tmp_path):
    from trt_exit.export.onnx_export import export_model

    _, path = _weights(tmp_path, "vit_tiny_patch16_224", num_classes=5, img_size=16,
                       patch_size=8, **SMALL)
    vit = create_timm_model("vit_tiny_patch16_224", checkpoint=path, img_size=32, **SMALL)
    model = attach_exits(vit, [1], "slvit")
    again = load_checkpoint(save_checkpoint(model, tmp_path / "m.safetensors"))
    manifest = export_model(again, tmp_path / "export")
    weights = manifest.model["config"]["backbone_options"]["weights"]
    assert weights["file"] == path.name and len(weights["sha256"]) == 64
    assert weights["inferred"] == {"num_classes": 5, "patch_size": 8}
    assert weights["resampled"][0]["from_grid"] == [2, 2]
    assert weights["resampled"][0]["to_grid"] == [4, 4]


# --------------------------------------------------------------------------- item 14

TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=5)


@pytest.mark.parametrize("name, kwargs", [
    ("eva02_tiny_patch14_224", dict(img_size=28, depth=2, num_classes=5)),
    ("deit_tiny_distilled_patch16_224", TINY),
    ("vit_tiny_patch16_224", dict(TINY, fc_norm=True)),
    ("vit_tiny_patch16_224", dict(TINY, act_layer="quick_gelu")),
    ("vit_tiny_patch16_224", dict(TINY, qk_norm=True, init_values=1e-3, pre_norm=True)),
    ("vit_tiny_patch16_224", dict(TINY, global_pool="avg", fc_norm=False)),
    ("vit_tiny_patch16_224", dict(TINY, norm_layer="rmsnorm", mlp_ratio=3.0)),
    ("eva02_small_patch14_224", dict(img_size=28, depth=2, num_classes=5, embed_dim=64,
                                     num_heads=2, use_fc_norm=True)),
    ("beit_base_patch16_224", dict(TINY, use_abs_pos_emb=True)),
    ("deit3_small_patch16_224", dict(TINY, init_values=None)),
    ("test_resnet", dict(num_classes=5, act_layer="silu", global_pool="max")),
])
def test_models_from_timm_create_model_attach_like_the_clis(tmp_path, name, kwargs):
    """Item 14: only plain VisionTransformer arguments were read back."""
    torch.manual_seed(0)
    vit = timm.create_model(name, pretrained=False, **kwargs).eval()
    cnn = name.startswith("test_resnet")
    model = attach_exits(vit, [1], "cnn_ignore", input_size=(3, 32, 32) if cnn else None).eval()
    again = load_checkpoint(save_checkpoint(model, tmp_path / "m.safetensors"))
    x = torch.randn(2, *model.backbone.input_size)
    with torch.no_grad():
        torch.testing.assert_close(again(x)[-1], vit(x), rtol=0, atol=1e-5)
    recorded = model.config.backbone_options["kwargs"]
    for key in ("act_layer", "fc_norm", "qk_norm", "norm_layer", "global_pool"):
        if key in kwargs:
            assert recorded[key] == kwargs[key], recorded


def test_what_no_module_shows_is_refused_with_the_whole_reason():
    """The rebuild check still guards, and its message is no longer cut to its first line
    ('Error(s) in loading state_dict for VisionTransformer:')."""
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY)
    vit.norm.eps = 1e-2  # not a creation argument of this model
    with pytest.raises(ConfigError, match="computes something else.*create_timm_model"):
        attach_exits(vit, [1], "slvit")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY)
    vit.adapter = torch.nn.Linear(2, 2)  # weights no creation argument makes
    with pytest.raises(ConfigError, match="does not rebuild this model \\(its weights do not "
                                          "fit: 2 unexpected keys \\(adapter.bias, "
                                          "adapter.weight\\)\\)") as error:
        attach_exits(vit, [1], "slvit")
    assert "\n" not in str(error.value)
