"""Pretrained weights from a file whose architecture differs from timm's defaults for the name.

``timm.create_model("vit_tiny_patch16_224")`` has 1,000 classes, 224x224 inputs and 16x16
patches; a user's checkpoint of that model may have been trained with 10 classes, or at 32x32
with 4x4 patches. What the file fixes is read off it before the model is created
(:func:`infer_kwargs`), for the creation arguments the user did not give:

* ``num_classes``: the rows of the classifier named by the model's ``pretrained_cfg``
  (``head``, ``fc``, ``head.fc``, ``classifier``; 0 when the file has no classifier);
* ``in_chans``: the input channels of the first convolution (``pretrained_cfg["first_conv"]``);
* ``patch_size``: the kernel of the patch embedding;
* ``img_size``: the grid the position tables were made for (the absolute position embedding's
  token count, or BEiT's relative position bias tables) times the patch size.

When the user *does* give ``img_size`` and it differs from the file's grid, the position tables
are resampled as timm resamples them when it loads pretrained weights at another size
(:func:`resample_position_tables`: ``timm.layers.resample_abs_pos_embed``, bicubic with
antialiasing, prefix tokens kept; ``timm.layers.resize_rel_pos_bias_table`` for BEiT), and that
is recorded. Whatever still does not fit (another depth or width) is a one-line error naming
the creation arguments to add (:func:`architecture_hint`); the attention heads, which no weight
shows, are named as unknown.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Any

import torch
from torch import nn

#: timm's own settings for resampling position embeddings of pretrained weights
#: (``checkpoint_filter_fn`` of its ViT, EVA and BEiT models).
RESAMPLE_SETTINGS = {"interpolation": "bicubic", "antialias": True}
_PATCH_KEY = "patch_embed.proj.weight"
_REL_TABLE = "relative_position_bias_table"


def probe_model(timm, model_name: str, kwargs: dict[str, Any]) -> nn.Module:
    """The model ``timm.create_model`` makes, on the meta device (shapes only, no memory)."""
    with torch.device("meta"):
        return timm.create_model(model_name, pretrained=False, **kwargs)


def _pair_or_int(h: int, w: int) -> int | list[int]:
    return int(h) if h == w else [int(h), int(w)]


def _classifier_keys(model: nn.Module) -> list[str]:
    heads = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    return [f"{head}.weight" for head in heads]


def _prefix_tokens(model: nn.Module) -> int:
    """Tokens before the patch tokens in ``pos_embed`` (0 when the class token has none)."""
    if getattr(model, "no_embed_class", False):
        return 0
    return int(getattr(model, "num_prefix_tokens", 1))


def file_grid(model: nn.Module, state: dict[str, Any]) -> tuple[int, int] | None:
    """The (square) patch grid the file's position tables were made for, or None when the file
    has none (a CNN) or its table is not a square grid."""
    if "pos_embed" in state and getattr(model, "pos_embed", None) is not None:
        tokens = int(state["pos_embed"].shape[1]) - _prefix_tokens(model)
        side = math.isqrt(max(tokens, 0))
        return (side, side) if side > 0 and side * side == tokens else None
    table = next((v for k, v in state.items() if k.endswith(_REL_TABLE) and v.ndim == 2), None)
    if table is not None:  # BEiT: (2g - 1)^2 relative positions + 3 for the class token
        side = math.isqrt(max(int(table.shape[0]) - 3, 0))
        if side % 2 and side * side == int(table.shape[0]) - 3:
            return ((side + 1) // 2,) * 2
    return None


def infer_kwargs(model: nn.Module, state: dict[str, Any], given: dict[str, Any]
                 ) -> dict[str, Any]:
    """Creation arguments the weights ``state`` fix and ``model`` (created with ``given``) has
    otherwise; only arguments not in ``given`` (see the module docstring)."""
    own = model.state_dict()
    inferred: dict[str, Any] = {}
    heads = _classifier_keys(model)
    if "num_classes" not in given and heads:
        in_file = [k for k in heads if k in state and state[k].ndim >= 1]
        if in_file and int(state[in_file[0]].shape[0]) != int(model.num_classes):
            inferred["num_classes"] = int(state[in_file[0]].shape[0])
        elif not in_file and any(k in own for k in heads):
            stems = tuple(k[: -len("weight")] for k in heads)
            if not any(k.startswith(stems) for k in state):
                inferred["num_classes"] = 0  # a file without a classifier: a headless model
    first = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    conv = f"{first}.weight" if isinstance(first, str) else None
    if ("in_chans" not in given and conv in state and conv in own and state[conv].ndim == 4
            and own[conv].ndim == 4 and state[conv].shape[1] != own[conv].shape[1]):
        inferred["in_chans"] = int(state[conv].shape[1])
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is None or getattr(patch_embed, "patch_size", None) is None:
        return inferred
    patch = tuple(int(v) for v in patch_embed.patch_size)
    if "patch_size" not in given and _PATCH_KEY in state and state[_PATCH_KEY].ndim == 4:
        kernel = tuple(int(v) for v in state[_PATCH_KEY].shape[2:])
        if kernel != patch:
            inferred["patch_size"] = _pair_or_int(*kernel)
            patch = kernel
    grid = file_grid(model, state)
    if "img_size" not in given and grid is not None and patch_embed.img_size is not None:
        size = (grid[0] * patch[0], grid[1] * patch[1])
        if size != tuple(int(v) for v in patch_embed.img_size):
            inferred["img_size"] = _pair_or_int(*size)
    return inferred


def resample_position_tables(model: nn.Module, state: dict[str, Any]) -> list[dict[str, Any]]:
    """Resamples the position tables of ``state`` (in place) to ``model``'s grid with timm's
    functions; returns a record of each change (empty when the grids agree, or when the tables
    are not of this architecture: loading then says what differs)."""
    import timm

    records = []
    pos_embed = getattr(model, "pos_embed", None)
    if ("pos_embed" in state and pos_embed is not None
            and tuple(state["pos_embed"].shape) != tuple(pos_embed.shape)):
        old = file_grid(model, state)
        if old is None or state["pos_embed"].shape[-1] != pos_embed.shape[-1]:
            return records  # another architecture: the load names it (architecture_hint)
        new = [int(v) for v in model.patch_embed.grid_size]
        state["pos_embed"] = timm.layers.resample_abs_pos_embed(
            state["pos_embed"], new_size=new, old_size=list(old),
            num_prefix_tokens=_prefix_tokens(model), **RESAMPLE_SETTINGS)
        records.append({"tensor": "pos_embed", "from_grid": list(old), "to_grid": new,
                        "num_prefix_tokens": _prefix_tokens(model),
                        "function": "timm.layers.resample_abs_pos_embed", **RESAMPLE_SETTINGS})
    resized = []
    tables = {k: v for k, v in state.items() if k.endswith(_REL_TABLE)}
    old_window = file_grid(model, tables)
    for key in sorted(tables):
        owner = key[: -len(_REL_TABLE) - 1]
        try:
            module = model.get_submodule(owner)
        except AttributeError:
            continue  # an unexpected key: reported by the load
        table = getattr(module, _REL_TABLE, None)
        if table is None or tuple(state[key].shape) == tuple(table.shape):
            continue
        with warnings.catch_warnings():  # its interpolator's notes on torch's indexing API
            warnings.filterwarnings("ignore", category=UserWarning,
                                    module="timm.layers.interpolate")
            state[key] = timm.layers.resize_rel_pos_bias_table(
                state[key], new_window_size=tuple(module.window_size),
                new_bias_shape=tuple(table.shape))
        resized.append(key)
    if resized:
        records.append({"tensor": f"*.{_REL_TABLE}", "tables": len(resized),
                        "from_window": list(old_window) if old_window else None,
                        "to_window": [int(v) for v in model.patch_embed.grid_size],
                        "function": "timm.layers.resize_rel_pos_bias_table"})
    return records


def _depth(keys) -> int | None:
    indices = {int(m.group(1)) for k in keys if (m := re.match(r"blocks\.(\d+)\.", k))}
    return max(indices) + 1 if indices else None


def architecture_hint(model: nn.Module, state: dict[str, Any], given: dict[str, Any]) -> str:
    """The creation arguments that would make ``model`` fit ``state``, as far as the weights
    show them, as advice for the load error; "" when none can be named."""
    own = model.state_dict()
    advice: list[str] = []
    conflicts: list[str] = []
    heads = [k for k in _classifier_keys(model) if k in state and k in own]
    if heads and "num_classes" in given and state[heads[0]].shape[0] != own[heads[0]].shape[0]:
        conflicts.append(f"its classifier has {int(state[heads[0]].shape[0])} classes, not "
                         f"num_classes={given['num_classes']} (leave num_classes out: trt-exit "
                         f"train --timm replaces a head whose class count differs from your "
                         f"data's)")
    if _PATCH_KEY in state and _PATCH_KEY in own and state[_PATCH_KEY].ndim == 4:
        kernel = tuple(int(v) for v in state[_PATCH_KEY].shape[2:])
        if "patch_size" in given and kernel != tuple(own[_PATCH_KEY].shape[2:]):
            conflicts.append(f"its patches are {kernel[0]}x{kernel[1]}, not "
                             f"patch_size={given['patch_size']} (leave patch_size out)")
    depth, own_depth = _depth(state), _depth(own)
    if depth and own_depth and depth != own_depth:
        advice.append(f"depth={depth}")
    width = None
    if _PATCH_KEY in state and _PATCH_KEY in own and state[_PATCH_KEY].ndim >= 1:
        width = int(state[_PATCH_KEY].shape[0])
        if width != int(own[_PATCH_KEY].shape[0]):
            advice.append(f"embed_dim={width}")
            advice.append("num_heads=H")
    fc1 = "blocks.0.mlp.fc1.weight"
    if width and fc1 in state and fc1 in own:
        ratio = int(state[fc1].shape[0]) / width
        if ratio != int(own[fc1].shape[0]) / int(own[_PATCH_KEY].shape[0]):
            advice.append(f"mlp_ratio={ratio:g}")
    if "reg_token" in state and state["reg_token"].ndim == 3 and tuple(
            state["reg_token"].shape) != tuple(own.get("reg_token", torch.empty(0)).shape):
        advice.append(f"reg_tokens={int(state['reg_token'].shape[1])}")
    if ("pos_embed" in state and "pos_embed" in own and not advice
            and tuple(state["pos_embed"].shape) != tuple(own["pos_embed"].shape)
            and file_grid(model, state) is None):
        advice.append(f"img_size=[H,W] (the size it was trained at: its pos_embed has "
                      f"{int(state['pos_embed'].shape[1]) - _prefix_tokens(model)} patch tokens)")
    if ("cls_token" in state) != ("cls_token" in own):
        advice.append(f"class_token={'true' if 'cls_token' in state else 'false'}")
    parts = list(conflicts)
    if advice:
        text = (f"add the creation argument(s) {' '.join(advice)} (--timm-arg KEY=VALUE each)")
        if "num_heads=H" in advice:
            text += (", with H the attention heads it was trained with (the weights do not show "
                     "them)")
        parts.append(text)
    return "; ".join(parts)
