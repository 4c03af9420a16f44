"""Creation arguments read back from a model made by ``timm.create_model`` directly.

:func:`trt_exit.models.timm_adapter.create_timm_model` records every creation argument; a model
from ``timm.create_model(name, **kwargs)`` carries only its name (``pretrained_cfg``). Its
arguments are read back from its modules (:func:`derived_kwargs`): each reader below returns the
value of one argument as the modules show it, and an argument is recorded when the model's
value differs from that of ``timm.create_model(name)`` (built on the meta device, so reading
the defaults costs no memory); the class count is always recorded. The rebuild check of
:func:`~trt_exit.models.timm_adapter.attach_exits` still compares the rebuilt model's outputs
with the original's, so an argument no module shows (a LayerNorm epsilon, say) is refused,
never silently lost.

Readers exist for timm's VisionTransformer (ViT, DeiT, DeiT3, DeiT-distilled), Eva (EVA,
EVA02) and Beit models, the activation of the CNN families, and the input channels and pooling
of every family.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

#: What a reader returns when the modules do not show the argument (None is a value: e.g.
#: ``init_values=None``, no layer scale).
UNKNOWN = object()
#: A value recorded for ``init_values`` when the model has layer scale: any non-zero value
#: builds the same modules, and the weights loaded afterwards hold the scales.
LAYER_SCALE = 1e-5
#: Activation names timm's ``get_act_layer`` knows, tried when reading ``act_layer`` back.
ACTIVATIONS = ("gelu", "quick_gelu", "gelu_tanh", "silu", "swish", "relu", "relu6",
               "leaky_relu", "elu", "celu", "selu", "mish", "hard_swish", "hard_sigmoid", "tanh",
               "sigmoid", "hard_mish", "identity")


def _is_module(value: Any) -> bool:
    return isinstance(value, nn.Module) and not isinstance(value, nn.Identity)


def _activation_name(act: nn.Module) -> Any:
    from timm.layers import get_act_layer

    for name in ACTIVATIONS:
        try:
            if type(act) is get_act_layer(name):
                return name
        except (ValueError, KeyError, TypeError):  # a name this timm version lacks
            continue
    return UNKNOWN


#: Normalization layer names timm's ``get_norm_layer`` knows, tried for ``norm_layer``.
NORMS = ("layernorm", "rmsnorm", "simplenorm", "layernorm2d", "rmsnorm2d", "groupnorm",
         "batchnorm")


def _norm_name(norm: nn.Module) -> Any:
    from timm.layers import get_norm_layer

    for name in NORMS:
        try:
            if type(norm) is get_norm_layer(name):
                return name
        except (ValueError, KeyError, TypeError, AssertionError):
            continue
    return UNKNOWN


def _hidden(mlp: nn.Module) -> int | None:
    """Hidden width of a block's MLP (Mlp: fc1; SwiGLU: fc1_g)."""
    for name in ("fc1_g", "fc1"):
        layer = getattr(mlp, name, None)
        if isinstance(layer, nn.Linear):
            return int(layer.out_features) // (2 if type(mlp).__name__ == "GluMlp" else 1)
    return None


def _mlp_ratio(m: nn.Module) -> Any:
    hidden = _hidden(m.blocks[0].mlp)
    if hidden is None:
        return UNKNOWN
    ratio = hidden / m.embed_dim
    # int(embed_dim * ratio) must give the hidden width back (float rounding)
    return ratio if int(m.embed_dim * ratio) == hidden else (hidden + 0.5) / m.embed_dim


def _first_conv_channels(m: nn.Module) -> Any:
    first = (getattr(m, "pretrained_cfg", None) or {}).get("first_conv")
    if not isinstance(first, str):
        return UNKNOWN
    return int(m.get_submodule(first).in_channels)


def _global_pool(m: nn.Module) -> Any:
    pool = getattr(m, "global_pool", None)
    if isinstance(pool, nn.Module):  # CNNs: SelectAdaptivePool2d
        pool = getattr(pool, "pool_type", None)
    return pool if isinstance(pool, str) else UNKNOWN


Reader = Callable[[nn.Module], Any]

_TOKENS: dict[str, Reader] = {
    "img_size": lambda m: [int(v) for v in m.patch_embed.img_size]
    if m.patch_embed.img_size is not None else UNKNOWN,
    "patch_size": lambda m: [int(v) for v in m.patch_embed.patch_size],
    "embed_dim": lambda m: int(m.embed_dim),
    "depth": lambda m: len(m.blocks),
    "num_heads": lambda m: int(m.blocks[0].attn.num_heads),
    "mlp_ratio": _mlp_ratio,
    "class_token": lambda m: getattr(m, "cls_token", None) is not None,
    "no_embed_class": lambda m: bool(getattr(m, "no_embed_class", False)),
    "dynamic_img_size": lambda m: bool(getattr(m, "dynamic_img_size", False)),
}

READERS: dict[str, dict[str, Reader]] = {
    "VisionTransformer": {
        **_TOKENS,
        "reg_tokens": lambda m: int(m.num_reg_tokens),
        "qkv_bias": lambda m: m.blocks[0].attn.qkv.bias is not None,
        "qk_norm": lambda m: _is_module(getattr(m.blocks[0].attn, "q_norm", None)),
        "proj_bias": lambda m: m.blocks[0].attn.proj.bias is not None,
        "init_values": lambda m: LAYER_SCALE if _is_module(m.blocks[0].ls1) else None,
        "pos_embed": lambda m: "learn" if m.pos_embed is not None else "none",
        "pre_norm": lambda m: _is_module(m.norm_pre),
        "fc_norm": lambda m: _is_module(m.fc_norm),
        "act_layer": lambda m: _activation_name(m.blocks[0].mlp.act),
        "norm_layer": lambda m: _norm_name(m.blocks[0].norm1),
    },
    "Eva": {
        **_TOKENS,
        "num_reg_tokens": lambda m: int(getattr(m, "num_reg_tokens", 0)),
        "qkv_fused": lambda m: getattr(m.blocks[0].attn, "qkv", None) is not None,
        "qk_norm": lambda m: _is_module(getattr(m.blocks[0].attn, "q_norm", None)),
        "swiglu_mlp": lambda m: hasattr(m.blocks[0].mlp, "fc1_g")
        or type(m.blocks[0].mlp).__name__ in ("SwiGLU", "GluMlp"),
        "scale_mlp": lambda m: _is_module(getattr(m.blocks[0].mlp, "norm", None)),
        "init_values": lambda m: LAYER_SCALE if getattr(m.blocks[0], "gamma_1", None)
        is not None else None,
        "use_abs_pos_emb": lambda m: m.pos_embed is not None,
        "use_rot_pos_emb": lambda m: m.rope is not None,
        "use_post_norm": lambda m: type(m.blocks[0]).__name__ == "EvaBlockPostNorm",
        "use_fc_norm": lambda m: _is_module(m.fc_norm),
    },
    "Beit": {
        **{k: v for k, v in _TOKENS.items() if k not in ("class_token", "no_embed_class",
                                                         "dynamic_img_size")},
        "qkv_bias": lambda m: getattr(m.blocks[0].attn, "q_bias", None) is not None,
        "init_values": lambda m: LAYER_SCALE if getattr(m.blocks[0], "gamma_1", None)
        is not None else None,
        "use_abs_pos_emb": lambda m: m.pos_embed is not None,
        "use_rel_pos_bias": lambda m: getattr(m.blocks[0].attn, "relative_position_bias_table",
                                              None) is not None,
        "use_shared_rel_pos_bias": lambda m: m.rel_pos_bias is not None,
        "use_fc_norm": lambda m: _is_module(m.fc_norm),
    },
    "ResNet": {"act_layer": lambda m: _activation_name(m.act1)},
    "EfficientNet": {"act_layer": lambda m: _activation_name(m.bn1.act)},
    "MobileNetV3": {"act_layer": lambda m: _activation_name(m.bn1.act)},
    "ConvNeXt": {"act_layer": lambda m: _activation_name(m.stages[0].blocks[0].mlp.act)},
}
#: Every family: what the first convolution and the pooling show.
COMMON: dict[str, Reader] = {"in_chans": _first_conv_channels, "global_pool": _global_pool}


def _readers(model: nn.Module) -> dict[str, Reader]:
    names = [cls.__name__ for cls in type(model).__mro__]
    family = next((READERS[n] for n in names if n in READERS), {})
    return {**COMMON, **family}


def _read(model: nn.Module, readers: dict[str, Reader]) -> dict[str, Any]:
    values = {}
    for key, reader in readers.items():
        try:
            values[key] = reader(model)
        except (AttributeError, IndexError, TypeError):  # not this model's layout
            values[key] = UNKNOWN
    return values


def derived_kwargs(model: nn.Module, model_name: str) -> dict[str, Any]:
    """The creation arguments of ``model`` (made by ``timm.create_model(model_name, ...)``) as
    far as its modules show them: the class count, and every argument whose value differs from
    the model those arguments build (see the module docstring). Repeated until nothing differs,
    since one argument sets another's default (``global_pool="avg"`` turns ``fc_norm`` on)."""
    import timm

    readers = _readers(model)
    own = _read(model, readers)
    kwargs: dict[str, Any] = {"num_classes": int(model.num_classes)}
    for _ in range(len(readers)):
        try:
            with torch.device("meta"):
                base = _read(timm.create_model(model_name, pretrained=False, **kwargs), readers)
        except Exception:  # noqa: BLE001 - arguments timm refuses: the rebuild check says so
            break
        changed = {k: v for k, v in own.items() if v is not UNKNOWN and v != base[k]
                   and kwargs.get(k, UNKNOWN) != v}
        if not changed:
            break
        kwargs.update(changed)
    return kwargs
