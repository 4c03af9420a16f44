"""Attach early exits to timm models: ViTs (ViT, DeiT, DeiT3, EVA, BEiT) and CNNs (ResNet,
ConvNeXt, EfficientNet, MobileNetV3).

:func:`attach_exits` wraps a timm model without copying or changing it. The model is cut the way
its own ``forward_intermediates`` walks it: an embedding (patch embedding and position
embedding, or the CNN stem), then *units* (the transformer blocks, or the CNN's residual /
inverted-residual blocks in stage order), then what ``forward_features`` does after the last
unit plus timm's own ``forward_head``, which together are the final exit ``timm_head``, so the
final exit reproduces ``timm_model(x)``. Early exits from the registry are attached after chosen
units; "after block b" means after the first b units.

What the exits read depends on the family: token maps (B, N, C) for the ViT family (exits such as
``slvit``, ``mlp``, ``vitee``, ``cnn_*``), feature maps (B, C, H, W) for CNNs (``slvit_cnn``,
``cnn_ignore``, ``bof``). CNN stages change width and resolution, so every exit position gets its
own :class:`~trt_exit.models.exits.ExitContext` (measured by one dry run at attach time).

Rebuilding: the checkpoint records the timm name and every creation argument as given to
:func:`create_timm_model` (with what it read off a weights file, :mod:`.timm_weights`). A model
created elsewhere (``timm.create_model`` directly) has its arguments read back from its modules
(:mod:`.timm_args`: sizes, norms, activation, pooling, tokens, layer scale of the ViT, EVA and
BEiT families, the CNNs' activation and pooling); either way :func:`attach_exits`
rebuilds the model from what it recorded, loads the weights and compares outputs with the
original on a fixed input, and refuses (ConfigError) when the rebuild differs, so a checkpoint
never silently rebuilds another model (e.g. ``act_layer='quick_gelu'`` coming back as GELU).

timm is an optional dependency: ``pip install 'trt-exit[timm]'``.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from trt_exit.errors import ConfigError, require
from trt_exit.models.exits import ExitContext, ExitHead, register_exit
from trt_exit.models.exits.layout import MAP, TOKENS
from trt_exit.models.multi_exit import (
    ExitSpec,
    ModelConfig,
    MultiExitModel,
    build_exits,
    register_backbone,
)

#: Attribute under which :func:`create_timm_model` records the creation arguments on the model.
CREATE_ARGS_ATTR = "trt_exit_create_args"
#: Creation arguments that would fetch or read weights behind the user's back.
_REFUSED_KWARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path",
                   "cache_dir")
#: The rebuilt model must reproduce the original within this, relative to max(1, |output|).
REBUILD_RTOL = 1e-5


def _timm():
    return require("timm", "timm", "Attaching exits to timm models")


# --------------------------------------------------------------------------- families
#
# A family knows how timm's forward_features of its model class walks the model: the embedding,
# the units exits can follow, and what comes after the last unit. Every cut is checked against
# the model's own forward on a random input when the backbone is built (TimmBackbone.verify).


class _RopeBlock(nn.Module):
    """An EVA block with its rotary position embedding (a constant of the grid) supplied."""

    def __init__(self, block: nn.Module, model: nn.Module, index: int):
        super().__init__()
        self.block = block
        self.index = index
        object.__setattr__(self, "_timm", model)  # not a submodule: the backbone owns it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model = self._timm
        rope = None
        if model.rope is not None:
            rope = (model.rope.get_embed() if hasattr(model.rope, "feat_shape")
                    else model.rope.get_embed(shape=model.patch_embed.grid_size))
            if getattr(model, "rope_mixed", False):
                rope = rope[self.index]
        return self.block(x, rope=rope)


class _RelPosBlock(nn.Module):
    """A BEiT block with the model's shared relative position bias supplied."""

    def __init__(self, block: nn.Module, model: nn.Module):
        super().__init__()
        self.block = block
        object.__setattr__(self, "_timm", model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias_module = self._timm.rel_pos_bias
        return self.block(x, shared_rel_pos_bias=bias_module() if bias_module is not None else None)


class _Family:
    """How one kind of timm model is cut (see the comment above)."""

    name = ""
    layout = TOKENS
    classes: tuple[str, ...] = ()

    def units(self, m: nn.Module) -> list[nn.Module]:
        raise NotImplementedError

    def embed(self, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def tail(self, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """What forward_features does after the last unit."""
        return m.norm(x)


class _ViT(_Family):
    name, classes = "vit", ("VisionTransformer",)

    def units(self, m):
        return list(m.blocks)

    def embed(self, m, x):
        x = m.patch_embed(x)
        x = m._pos_embed(x)
        x = m.patch_drop(x)
        return m.norm_pre(x)  # (B, N, C)


class _Eva(_Family):
    name, classes = "eva", ("Eva",)

    def units(self, m):
        return [_RopeBlock(block, m, i) for i, block in enumerate(m.blocks)]

    def embed(self, m, x):
        x, _ = m._pos_embed(m.patch_embed(x))
        return m.norm_pre(x)  # (B, N, C)


class _Beit(_Family):
    name, classes = "beit", ("Beit",)

    def units(self, m):
        return [_RelPosBlock(block, m) for block in m.blocks]

    def embed(self, m, x):
        x = m.patch_embed(x)
        x = torch.cat((m.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if m.pos_embed is not None:
            x = x + m.pos_embed
        return m.pos_drop(x)  # (B, N, C)


class _ResNet(_Family):
    name, layout, classes = "resnet", MAP, ("ResNet",)

    def units(self, m):
        return [block for layer in (m.layer1, m.layer2, m.layer3, m.layer4) for block in layer]

    def embed(self, m, x):
        return m.maxpool(m.act1(m.bn1(m.conv1(x))))  # (B, C, H, W)

    def tail(self, m, x):
        return x


class _ConvNeXt(_Family):
    name, layout, classes = "convnext", MAP, ("ConvNeXt",)

    def units(self, m):
        units = []
        for stage in m.stages:
            blocks = list(stage.blocks)
            # The stage's downsampling runs with its first block (one unit).
            units.append(nn.Sequential(stage.downsample, blocks[0]))
            units.extend(blocks[1:])
        return units

    def embed(self, m, x):
        return m.stem(x)

    def tail(self, m, x):
        return m.norm_pre(x)


class _EfficientNet(_Family):
    name, layout, classes = "efficientnet", MAP, ("EfficientNet",)

    def units(self, m):
        return [block for stage in m.blocks for block in stage]

    def embed(self, m, x):
        return m.bn1(m.conv_stem(x))

    def tail(self, m, x):
        return m.bn2(m.conv_head(x))


class _MobileNetV3(_EfficientNet):
    name, classes = "mobilenetv3", ("MobileNetV3",)

    def tail(self, m, x):
        return x


FAMILIES = (_ViT(), _Eva(), _Beit(), _ResNet(), _ConvNeXt(), _EfficientNet(), _MobileNetV3())
SUPPORTED = ("timm VisionTransformer (ViT, DeiT, DeiT3), Eva (EVA, EVA02), Beit, ResNet, "
             "ConvNeXt, EfficientNet and MobileNetV3 models")


def family_of(model: nn.Module) -> _Family:
    """The family that knows how to cut ``model``; ConfigError names the supported ones."""
    kind = type(model).__name__
    if not callable(getattr(model, "forward_intermediates", None)):
        raise ConfigError(f"{kind} does not implement timm's forward_intermediates, so exits "
                          f"cannot be attached to it; supported: {SUPPORTED}")
    names = {cls.__name__ for cls in type(model).__mro__}
    for family in FAMILIES:
        if names & set(family.classes):
            return family
    raise ConfigError(f"timm {kind} is not a family trt_exit knows how to cut into segments; "
                      f"supported: {SUPPORTED}")


def default_input_size(model: nn.Module) -> tuple[int, ...]:
    """(C, H, W) a timm model takes: its patch embedding's (ViTs, fixed by construction), else
    its ``pretrained_cfg["input_size"]`` (CNNs take any size; this is the pretrained one)."""
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None and getattr(patch_embed, "img_size", None) is not None:
        return (int(patch_embed.proj.in_channels), *(int(v) for v in patch_embed.img_size))
    return tuple(int(v) for v in (getattr(model, "pretrained_cfg", None) or {}).get(
        "input_size", ()))


def _heads_for(width: int) -> int:
    """Default attention heads of exits on a width-``width`` feature map."""
    return next(h for h in (8, 4, 2, 1) if width % h == 0)


class TimmBackbone(nn.Module):
    """A timm model seen through the backbone contract of :mod:`trt_exit.models.vit`
    (``embed``, ``blocks`` and the feature layout), with one geometry per exit position.

    Args:
        model: The timm model (its weights are used as they are).
        input_size: (C, H, W) of the input; default: the patch embedding's image size (ViTs)
            or the model's ``pretrained_cfg["input_size"]`` (CNNs).
    """

    def __init__(self, model: nn.Module, input_size: Sequence[int] | None = None):
        super().__init__()
        self.family = family_of(model)
        self.feature_layout = self.family.layout
        self.model = model
        # A plain list, not a ModuleList: the units' parameters belong to ``model`` and appear
        # once in the state dict (shared names would make checkpoints ambiguous).
        object.__setattr__(self, "blocks", self.family.units(model))
        self.input_size = self._input_size(model, input_size)
        self.in_chans = self.input_size[0]
        self.img_size = tuple(self.input_size[1:])
        self._geometry = self._measure()
        first = self._geometry[0]
        for key in ("embed_dim", "num_heads", "num_tokens", "num_prefix_tokens", "grid_size",
                    "has_class_token"):
            setattr(self, key, first[key])

    def _input_size(self, model: nn.Module, input_size) -> tuple[int, int, int]:
        size = tuple(int(v) for v in input_size) if input_size is not None else (
            default_input_size(model))
        if len(size) != 3 or min(size) < 1:
            raise ConfigError(f"give the input size of {type(model).__name__} as (C, H, W), "
                              f"got {input_size!r}")
        return size  # type: ignore[return-value]

    @torch.no_grad()
    def _measure(self) -> list[dict[str, Any]]:
        """Geometry of what exits read after 0, 1, ..., depth units (one dry run)."""
        training = self.model.training
        self.model.eval()
        try:
            x = self.embed(torch.zeros(1, *self.input_size, device=_device_of(self.model)))
            shapes = [tuple(x.shape[1:])]
            for unit in self.blocks:
                x = unit(x)
                shapes.append(tuple(x.shape[1:]))
        except (RuntimeError, AssertionError, ValueError) as exc:  # timm asserts input sizes
            raise ConfigError(f"{type(self.model).__name__} does not run on a "
                              f"{tuple(self.input_size)} input ({str(exc)[:200]}); give the size "
                              f"it was created for") from exc
        finally:
            self.model.train(training)
        if self.feature_layout == MAP:
            return [{"embed_dim": c, "num_heads": _heads_for(c), "num_tokens": h * w,
                     "num_prefix_tokens": 0, "grid_size": (h, w), "has_class_token": False}
                    for c, h, w in shapes]
        m = self.model
        prefix = int(m.num_prefix_tokens)
        grid = tuple(m.patch_embed.grid_size)
        has_cls = getattr(m, "cls_token", None) is not None
        heads = int(getattr(m.blocks[0].attn, "num_heads", 1))
        return [{"embed_dim": c, "num_heads": heads, "num_tokens": n,
                 "num_prefix_tokens": prefix, "grid_size": grid, "has_class_token": has_cls}
                for n, c in shapes]

    def exit_geometry(self, after_block: int) -> dict[str, Any]:
        """What an exit after ``after_block`` units reads (width, grid, prefix tokens)."""
        depth = len(self.blocks)
        if not 1 <= after_block <= depth:
            units = "blocks" if self.feature_layout == TOKENS else "units (blocks in stage order)"
            raise ConfigError(f"exit position {after_block} is outside 1..{depth - 1}: "
                              f"{type(self.model).__name__} has {depth} {units}")
        return dict(self._geometry[after_block])

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """forward_features up to the first unit: (B, N, C) tokens or (B, C, H, W) maps."""
        return self.family.embed(self.model, image)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """The rest of forward_features after the last unit, then timm's forward_head."""
        return self.model.forward_head(self.family.tail(self.model, x))  # (B, K)

    @torch.no_grad()
    def verify(self) -> float:
        """Checks the cut against the model's own forward on a random input; returns the
        max abs difference (ConfigError when it exceeds the tolerance)."""
        training = self.model.training
        self.model.eval()
        try:
            x = _fixed_input(self.input_size, batch=2).to(_device_of(self.model))
            reference = self.model(x)
            y = self.embed(x)
            for unit in self.blocks:
                y = unit(y)
            diff = float((self.finish(y) - reference).abs().max())
        finally:
            self.model.train(training)
        scale = max(1.0, float(reference.abs().max()))
        if not diff <= REBUILD_RTOL * scale * 10:
            raise ConfigError(f"cutting {type(self.model).__name__} into segments changes its "
                              f"output (max abs difference {diff:.3g}); this timm version's "
                              f"{self.family.name} models are not supported")
        return diff


def _device_of(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _fixed_input(input_size: Sequence[int], batch: int) -> torch.Tensor:
    """A deterministic input (numpy's PCG64: the same on every machine and version)."""
    data = np.random.default_rng(1234).standard_normal((batch, *input_size)).astype(np.float32)
    return torch.from_numpy(data)


@register_exit("timm_head")
class TimmHead(ExitHead):
    """The timm model's own end: the rest of ``forward_features`` (the final norm) and
    ``forward_head`` (pooling, fc_norm, classifier).

    It owns no parameters: they stay in the wrapped timm model (the backbone), so freezing the
    backbone freezes the pretrained head too, as classifier-wise training wants.
    """

    def __init__(self, context: ExitContext, confidence: str = "max_softmax"):
        super().__init__(context, confidence)
        if not isinstance(context.backbone, TimmBackbone):
            raise ConfigError("the timm_head exit only follows a timm backbone")
        object.__setattr__(self, "_backbone", context.backbone)  # not a submodule

    def forward(self, tokens, audio=None, state=None):
        return self._backbone.finish(tokens)  # (B, K)


# --------------------------------------------------------------------------- creation


def _check_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Creation arguments must be JSON values (they are stored in checkpoints) and must not
    fetch weights."""
    refused = sorted(set(kwargs) & set(_REFUSED_KWARGS))
    if refused:
        raise ConfigError(f"timm creation argument(s) {refused} are not accepted: weights come "
                          f"from a file (--checkpoint PATH), never from a hub")
    try:
        return json.loads(json.dumps(kwargs))
    except TypeError as exc:
        raise ConfigError(f"timm creation arguments must be JSON values (strings, numbers, "
                          f"lists) so a checkpoint can rebuild the model; give layers by timm's "
                          f"name, e.g. act_layer='gelu' ({exc})") from exc


def create_timm_model(model_name: str, checkpoint: str | os.PathLike | None = None,
                      **kwargs: Any) -> nn.Module:
    """``timm.create_model(model_name, pretrained=False, **kwargs)``, with the name and every
    argument recorded on the model so that a checkpoint rebuilds exactly this model.

    With ``checkpoint``, what the file fixes and ``kwargs`` leave open (class count, input
    channels, patch size, image size) is read off the file, and position tables made for another
    grid than a given ``img_size`` are resampled as timm does (see
    :mod:`trt_exit.models.timm_weights`); both are recorded with the creation arguments under
    ``"weights"``.

    Args:
        model_name: A timm model name (``timm.list_models()``).
        checkpoint: Pretrained weights to load: a ``.safetensors`` file or a PyTorch state dict
            (loaded with ``weights_only=True``), see
            :func:`trt_exit.models.checkpoint.load_weights_into`.
        **kwargs: timm creation arguments (JSON values: ``act_layer='quick_gelu'``, not a class).
    """
    from trt_exit.models import timm_weights

    timm = _timm()
    kwargs = _check_kwargs(kwargs)
    if not timm.is_model(model_name):
        close = timm.list_models(f"*{model_name.split('.')[0][:8]}*")[:5]
        raise ConfigError(f"{model_name!r} is not a timm model name"
                          + (f"; similar names: {', '.join(close)}" if close else
                             "; see timm.list_models()"))
    state, inferred = None, {}
    if checkpoint is not None:
        from trt_exit.models.checkpoint import read_state_dict

        state = read_state_dict(checkpoint)
        probe = _create(timm, model_name, kwargs, timm_weights.probe_model)
        inferred = timm_weights.infer_kwargs(probe, state, kwargs)
    model = _create(timm, model_name, {**kwargs, **inferred}, _create_on_cpu)
    record: dict[str, Any] = {"model_name": model_name, "kwargs": {**kwargs, **inferred}}
    if state is not None:
        from trt_exit.fileio import sha256_file
        from trt_exit.models.checkpoint import load_weights_into

        resampled = timm_weights.resample_position_tables(model, state)
        load_weights_into(model, checkpoint, state,
                          hint=timm_weights.architecture_hint(model, state, kwargs))
        record["weights"] = {"file": os.path.basename(checkpoint),
                             "sha256": sha256_file(checkpoint),
                             "inferred": inferred, "resampled": resampled}
    setattr(model, CREATE_ARGS_ATTR, record)
    return model


def _create_on_cpu(timm, model_name: str, kwargs: dict[str, Any]) -> nn.Module:
    return timm.create_model(model_name, pretrained=False, **kwargs)


def _create(timm, model_name: str, kwargs: dict[str, Any], create) -> nn.Module:
    """``create(timm, model_name, kwargs)``; timm's errors for bad arguments as ConfigError."""
    try:
        return create(timm, model_name, kwargs)
    except (TypeError, ValueError, KeyError, AssertionError, RuntimeError) as exc:
        raise ConfigError(f"timm could not create {model_name!r} with {kwargs}: "
                          f"{type(exc).__name__}: {' '.join(str(exc).split())}") from exc


def recorded_create_args(model: nn.Module) -> dict[str, Any]:
    """``{"model_name", "kwargs"}`` that rebuild ``model``'s architecture."""
    recorded = getattr(model, CREATE_ARGS_ATTR, None)
    if recorded is not None:
        return copy.deepcopy(recorded)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("architecture")
    if not name:
        raise ConfigError(f"{type(model).__name__} carries no timm architecture name; create it "
                          f"with trt_exit.models.timm_adapter.create_timm_model(name, **kwargs)")
    from trt_exit.models.timm_args import derived_kwargs

    return {"model_name": name, "kwargs": derived_kwargs(model, name)}


@torch.no_grad()
def check_rebuild(model: nn.Module, create_args: dict[str, Any],
                  input_size: Sequence[int]) -> float:
    """Rebuilds ``model`` from ``create_args``, loads its weights and compares outputs on a
    fixed input; returns the max abs difference. ConfigError when they differ."""
    timm = _timm()
    hint = ("create the model with trt_exit.models.timm_adapter.create_timm_model(name, **kwargs) "
            "(or trt-exit train --timm NAME --timm-arg KEY=VALUE) so every creation argument "
            "is recorded")
    from trt_exit.models.checkpoint import state_mismatches

    try:
        rebuilt = timm.create_model(create_args["model_name"], pretrained=False,
                                    **create_args["kwargs"])
    except Exception as exc:  # timm raises TypeError/ValueError/KeyError/... on bad arguments
        raise ConfigError(f"{create_args['model_name']} with {create_args['kwargs']} does not "
                          f"rebuild this model ({type(exc).__name__}: "
                          f"{' '.join(str(exc).split())}); {hint}") from exc
    state = model.state_dict()
    mismatches = state_mismatches(rebuilt.state_dict(), state)
    if mismatches:
        raise ConfigError(f"{create_args['model_name']} with {create_args['kwargs']} does not "
                          f"rebuild this model (its weights do not fit: {mismatches}); {hint}")
    rebuilt.load_state_dict(state, strict=True)
    rebuilt.to(_device_of(model))
    training = model.training
    model.eval()
    rebuilt.eval()
    try:
        x = _fixed_input(input_size, batch=2).to(_device_of(model))
        reference = model(x)
        again = rebuilt(x)
    finally:
        model.train(training)
    same_shape = reference.shape == again.shape
    diff = float((reference - again).abs().max()) if same_shape else float("inf")
    if not diff <= REBUILD_RTOL * max(1.0, float(reference.abs().max())):
        raise ConfigError(f"{create_args['model_name']} rebuilt with {create_args['kwargs']} "
                          f"computes something else than this model (max abs difference "
                          f"{diff:.3g} on a fixed input); {hint}")
    return diff


@register_backbone("timm")
def _timm_backbone(options: dict[str, Any]) -> nn.Module:
    model = create_timm_model(options["model_name"], **dict(options.get("kwargs", {})))
    return TimmBackbone(model, options.get("input_size"))


def attach_exits(
    model: nn.Module,
    exit_blocks: Sequence[int],
    exit_type: str | Sequence[str] = "mlp",
    exit_options: dict[str, Any] | Sequence[dict[str, Any]] | None = None,
    name: str | None = None,
    confidence: str = "max_softmax",
    input_size: Sequence[int] | None = None,
    task: str = "classification",
) -> MultiExitModel:
    """Wraps a timm model as a :class:`MultiExitModel` with exits after ``exit_blocks`` units.

    Args:
        model: A timm model of a supported family (any weights), ideally made by
            :func:`create_timm_model`.
        exit_blocks: Units (blocks, in stage order for CNNs) run before each early exit,
            increasing, each < the model's depth.
        exit_type: One registered exit family for all exits, or one per exit.
        exit_options: Options for the exit family, one dict for all or one per exit.
        name: Model name (default: the timm architecture name + ``_exits``).
        confidence: Confidence measure of every exit.
        input_size: (C, H, W) of the input (default: the model's own, see :class:`TimmBackbone`).
        task: ``"classification"`` or ``"regression"`` (then the timm head's outputs are values).

    Returns:
        The multi-exit model; its final exit is timm's head and reproduces ``model(x)``.

    Raises:
        ConfigError: Unsupported model, bad exit positions, or a model its recorded creation
            arguments do not rebuild.
    """
    backbone = TimmBackbone(model, input_size)
    backbone.verify()
    create_args = recorded_create_args(model)
    check_rebuild(model, create_args, backbone.input_size)
    types = [exit_type] * len(exit_blocks) if isinstance(exit_type, str) else list(exit_type)
    options = (exit_options if isinstance(exit_options, (list, tuple))
               else [exit_options or {}] * len(exit_blocks))
    if not len(types) == len(options) == len(exit_blocks):
        raise ConfigError("give one exit type and one options dict per exit (or one for all)")
    cfg = getattr(model, "pretrained_cfg", None) or {}
    architecture = create_args["model_name"]
    config = ModelConfig(
        name=name or f"{architecture.split('.')[0]}_exits",
        backbone="timm",
        backbone_options={**create_args, "input_size": list(backbone.input_size)},
        exits=[ExitSpec(int(b), t, dict(o)) for b, t, o in zip(exit_blocks, types, options)],
        head=ExitSpec(0, "timm_head"),
        task=task,
        num_outputs=int(model.num_classes),
        confidence=confidence,
        preprocessing=timm_preprocessing(model, backbone.input_size),
    )
    heads, blocks = build_exits(backbone, config)
    return MultiExitModel(backbone, heads, blocks, config)


def timm_preprocessing(model: nn.Module, input_size: Sequence[int]) -> dict[str, Any]:
    """The manifest's preprocessing record: timm's data config of ``model`` and the whole
    evaluation transform built from it (see
    :func:`trt_exit.training.image_folder.eval_transform_record`)."""
    from trt_exit.training.image_folder import data_config, eval_transform_record

    return eval_transform_record(data_config(model, input_size))
