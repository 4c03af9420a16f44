"""Exit families x exit positions: which early exit is worth its FLOPs where.

Protocol (efficient, and the same for every family):

1. Train each backbone once with its final head only (no early exits), from scratch, on the
   train split. The ViT is the digits demo backbone (width 64, 8 blocks); the CNN is the small
   residual CNN of :mod:`trt_exit.models.cnn` (width 32, 6 blocks).
2. For every family, attach one exit of that family after each studied block (ViT: blocks 1, 2,
   3, 5 and 7 of 8, dense where the families differ most; CNN: every block) of a copy of the
   trained backbone and train the exits classifier-wise: backbone and final head
   frozen, every exit trained on the labels for the same number of epochs. With the backbone
   frozen, the exits of one model do not influence each other (each has its own parameters, and
   AdamW's steps hardly depend on the 1/num_exits scale of each exit's loss), so this is one run
   per family instead of one per family and position. BoF is the exception, on purpose: its exits share a classifier
   and add their histograms, so its rows come from one hierarchical model, as in the paper.
3. CopycatSL-ViT (``copycat_slvit``): the same SL-ViT exits, trained half their epochs imitating
   the frozen final head's predictions and half on the labels (the same epoch budget as
   ``slvit``, which trains all its epochs on the labels).
4. Head to head at the first exit position: SL-ViT, MLP-EE, CNN-ignore-EE and CopycatSL-ViT,
   each as the model's only early exit, trained with several seeds (the exit's initialization
   and the data order change; backbone and split do not).
5. Every exit is evaluated on the test split; FLOPs (per sample, counted by PyTorch's
   ``FlopCounterMode``, see :mod:`trt_exit.models.flops`) and parameters are measured on the
   same models.

Everything is seeded; :func:`run_experiment` writes ``results.json`` and two plots.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from trt_exit.errors import ConfigError
from trt_exit.experiments import finish_results
from trt_exit.models.multi_exit import ExitSpec, MultiExitModel, build_model, model_config
from trt_exit.training.datasets import Dataset
from trt_exit.training.trainer import CLASSIFIER_WISE, END_TO_END, TrainConfig

POSITION_PLOT = "accuracy_vs_position.png"
FLOPS_PLOT = "accuracy_vs_flops.png"

#: Exit families of token backbones (Multi-Exit ViT's seven, SL-ViT, BoF).
TOKEN_FAMILIES = ("mlp", "cnn_ignore", "cnn_add", "cnn_project", "vitee", "mixer", "resmlp",
                  "slvit", "bof")
#: Exit families of CNN backbones (feature maps).
MAP_FAMILIES = ("slvit_cnn", "cnn_ignore", "bof")
#: SL-ViT exits trained CopycatSL-ViT style (not an exit type: a training recipe).
COPYCAT = "copycat_slvit"
#: The families compared with several seeds at the first exit position.
HEAD_TO_HEAD = ("slvit", "mlp", "cnn_ignore", COPYCAT)
#: The paper's stopping-rule parameter for the BoF exits, swept on the test split.
BOF_BETAS = (0.8, 1.0, 1.2, 1.4, 1.6, 2.0, 2.5)

#: How the backbones are trained: the demo's augmented recipe.
BACKBONE_TRAIN = TrainConfig(regime=END_TO_END, epochs=120, lr=3e-3, batch_size=64,
                             label_smoothing=0.1, augment_shift_px=1, augment_rotate_deg=12.0,
                             augment_scale=0.1, warmup_epochs=3)
#: How the exits are trained (backbone frozen).
EXIT_TRAIN = dataclasses.replace(BACKBONE_TRAIN, regime=CLASSIFIER_WISE, epochs=16,
                                 batch_size=128, warmup_epochs=2)


@dataclass
class BackbonePlan:
    """One backbone of the experiment and the exit families attached to it.

    Attributes:
        name: Short name used in results (``"vit"``, ``"cnn"``).
        model: Registered model config whose backbone and final head are used (its exits are
            not).
        families: Exit families attached at every position (``copycat_slvit`` included).
        train: Recipe of the backbone + final head.
        positions: Exit positions (blocks run before the exit); default every block but the
            last.
    """

    name: str
    model: str
    families: tuple[str, ...]
    train: TrainConfig = field(default_factory=lambda: dataclasses.replace(BACKBONE_TRAIN))
    positions: tuple[int, ...] | None = None


@dataclass
class ExperimentConfig:
    """What :func:`run_experiment` does.

    Attributes:
        dataset: Registered classification dataset whose images fit the backbones (digits).
        seed: Seed of the split, the backbones and the grid's exit training.
        backbones: The backbones and their families.
        exit_train: Recipe of every exit (classifier-wise; Copycat splits its epochs in two).
        head_to_head: Families compared at the first position of the first backbone.
        head_to_head_seeds: Seeds of that comparison.
        bof_betas: Values of the BoF stopping rule's beta to evaluate.
        max_train_samples: Use only the first N training samples (quick runs); None = all.
        num_threads: torch intra-op threads (1 suits small models on shared cores).
    """

    dataset: str = "digits"
    seed: int = 0
    backbones: list[BackbonePlan] = field(default_factory=lambda: [
        BackbonePlan("vit", "multi_exit_vit_digits", TOKEN_FAMILIES + (COPYCAT,),
                     positions=(1, 2, 3, 5, 7)),
        BackbonePlan("cnn", "multi_exit_cnn_digits", MAP_FAMILIES,
                     dataclasses.replace(BACKBONE_TRAIN, epochs=20)),
    ])
    exit_train: TrainConfig = field(default_factory=lambda: dataclasses.replace(EXIT_TRAIN))
    head_to_head: tuple[str, ...] = HEAD_TO_HEAD
    head_to_head_seeds: tuple[int, ...] = (0, 1, 2)
    bof_betas: tuple[float, ...] = BOF_BETAS
    max_train_samples: int | None = None
    num_threads: int | None = 1

    def validate(self) -> None:
        from trt_exit.models.exits import exit_types

        known = set(exit_types()) | {COPYCAT}
        for plan in self.backbones:
            unknown = [f for f in plan.families if f not in known]
            if unknown:
                raise ConfigError(f"unknown exit families {unknown} for backbone {plan.name!r}; "
                                  f"known: {sorted(known)}")
        if self.exit_train.regime != CLASSIFIER_WISE or self.exit_train.backbone_epochs:
            raise ConfigError("the exits are trained on a frozen backbone: exit_train must be "
                              "classifier_wise with backbone_epochs=0")
        if self.head_to_head and not self.backbones:
            raise ConfigError("the head-to-head comparison needs a backbone")


def quick_config(seed: int = 0) -> ExperimentConfig:
    """A smoke-test sized run (tiny backbones, one epoch each, 256 training samples)."""
    one = dataclasses.replace(BACKBONE_TRAIN, epochs=1, warmup_epochs=0, batch_size=128)
    return ExperimentConfig(
        seed=seed,
        backbones=[
            BackbonePlan("vit", "multi_exit_vit_tiny_test", TOKEN_FAMILIES + (COPYCAT,), one),
            BackbonePlan("cnn", "multi_exit_cnn_tiny_test", MAP_FAMILIES, one),
        ],
        exit_train=dataclasses.replace(one, regime=CLASSIFIER_WISE, epochs=2),
        head_to_head_seeds=(0, 1),
        max_train_samples=256,
    )


# --------------------------------------------------------------------------- building blocks


def exit_family_of(family: str) -> str:
    """The registered exit type behind an experiment family name."""
    return "slvit" if family == COPYCAT else family


def attach_family(base: MultiExitModel, family: str, positions: Sequence[int]) -> MultiExitModel:
    """A copy of ``base``'s backbone and final head with one ``family`` exit at each position.

    The copy's backbone and final head hold ``base``'s trained weights; the exits are new.
    """
    config = dataclasses.replace(
        base.config, name=f"{base.config.name}_{family}",
        exits=[ExitSpec(int(p), exit_family_of(family)) for p in positions])
    model = build_model(config)
    model.backbone.load_state_dict(base.backbone.state_dict())
    model.exits[-1].load_state_dict(base.exits[-1].state_dict())
    return model


def train_exits(model: MultiExitModel, family: str, train_set: Dataset, config: TrainConfig,
                progress: bool = False) -> dict[str, Any]:
    """Trains ``model``'s early exits (backbone and final head frozen) as ``family`` wants.

    BoF codebooks start from real features and the stopping rule's mean activations are
    measured on ``train_set`` afterwards; CopycatSL-ViT imitates for ``epochs // 2`` epochs and
    fine-tunes for the rest.

    Returns:
        What was done (recipe, seconds).
    """
    from trt_exit.models.exits.bof import (
        bof_exits,
        init_codebooks_from_data,
        measure_mean_activations,
    )
    from trt_exit.training.copycat import CopycatConfig, copycat_train
    from trt_exit.training.trainer import train

    began = time.perf_counter()
    record: dict[str, Any] = {"regime": "classifier_wise (backbone and final head frozen)"}
    has_bof = bool(bof_exits(model))
    if has_bof:
        sample = {k: v[:256] for k, v in train_set.inputs.items()}
        init_codebooks_from_data(model, sample, seed=config.seed)
    if family == COPYCAT:
        imitation = max(1, config.epochs // 2)
        copycat = CopycatConfig(
            imitation=dataclasses.replace(config, epochs=imitation),
            finetune=dataclasses.replace(config, epochs=config.epochs - imitation))
        copycat_train(model, train_set, copycat, progress=progress)
        record.update({"imitation_epochs": imitation,
                       "finetune_epochs": config.epochs - imitation,
                       "imitation_targets": "final head argmax (hard)"})
    else:
        train(model, train_set, config, progress=progress)
        record["epochs"] = config.epochs
    if has_bof:
        record["bof_mean_activation"] = {str(k): v for k, v in
                                         measure_mean_activations(model, train_set).items()}
    record["seconds"] = time.perf_counter() - began
    return record


def bof_stopping_curve(model: MultiExitModel, test_set: Dataset, costs: dict[str, Any],
                       betas: Sequence[float]) -> list[dict[str, Any]]:
    """The paper's stopping rule on ``test_set`` for each beta: accuracy, mean FLOPs per
    sample and where samples leave (the final head takes whoever no BoF exit let go).

    A sample leaving at BoF exit ``k`` pays the backbone up to ``k`` and the BoF exits up to
    ``k`` (their histograms feed exit ``k``); one reaching the final head pays everything.
    """
    from trt_exit.models.exits.bof import beta_threshold, bof_exits
    from trt_exit.training.trainer import predict_exits

    indices = bof_exits(model)
    outputs = predict_exits(model, test_set)
    with torch.no_grad():
        confidences = [model.exits[k].confidence(torch.from_numpy(outputs[k])).numpy()
                       for k in range(model.num_exits)]
    exits = costs["exits"]
    segment_cum = np.cumsum(costs["segment_flops"])
    head_cum = np.cumsum([e["flops"] if k in indices or k == model.num_exits - 1 else 0
                          for k, e in enumerate(exits)])
    cost_at = segment_cum + head_cum  # (E,) FLOPs of leaving at exit k
    final = model.num_exits - 1
    curve = []
    for beta in betas:
        threshold = beta_threshold(beta)
        taken = np.full(len(test_set), final)
        for k in reversed(indices):
            taken = np.where(confidences[k] >= threshold, k, taken)
        predictions = np.stack(outputs)[taken, np.arange(len(test_set))].argmax(axis=1)
        fractions = np.bincount(taken, minlength=model.num_exits) / len(test_set)
        curve.append({
            "beta": float(beta), "threshold": threshold,
            "accuracy": float(np.mean(predictions == test_set.targets)),
            "mean_flops": float(np.mean(cost_at[taken])),
            "full_flops": float(cost_at[final]),
            "exit_fractions": [float(f) for f in fractions],
        })
    return curve


def _rows_for(model: MultiExitModel, family: str, backbone: str, costs: dict[str, Any],
              test_metrics: list[float], val_metrics: list[float], seed: int,
              training: dict[str, Any]) -> list[dict[str, Any]]:
    """One result row per early exit of ``model``."""
    from trt_exit.models.exits.bof import bof_exits

    bof = set(bof_exits(model))
    block_flops = costs["block_flops"]
    rows = []
    earlier_bof = 0
    for k in range(model.num_exits - 1):
        exit_cost = costs["exits"][k]
        position = model.exit_blocks[k]
        backbone_flops = costs["embed_flops"] + sum(block_flops[:position])
        cumulative = backbone_flops + exit_cost["flops"] + (earlier_bof if k in bof else 0)
        if k in bof:
            earlier_bof += exit_cost["flops"]
        rows.append({
            "backbone": backbone, "family": family, "exit_type": exit_cost["type"],
            "position": position, "seed": seed, "metric": "accuracy",
            "value": test_metrics[k], "val_value": val_metrics[k],
            "exit_params": exit_cost["params"], "exit_flops": exit_cost["flops"],
            "block_flops": block_flops[0], "backbone_flops": backbone_flops,
            "cumulative_flops": cumulative, "training": training,
        })
    return rows


def _final_row(model: MultiExitModel, backbone: str, costs: dict[str, Any], test_metric: float,
               val_metric: float, seed: int, training: dict[str, Any]) -> dict[str, Any]:
    head = costs["exits"][-1]
    backbone_flops = costs["embed_flops"] + sum(costs["block_flops"])
    return {
        "backbone": backbone, "family": "final_head", "exit_type": head["type"],
        "position": model.exit_blocks[-1], "seed": seed, "metric": "accuracy",
        "value": test_metric, "val_value": val_metric, "exit_params": head["params"],
        "exit_flops": head["flops"], "block_flops": costs["block_flops"][0],
        "backbone_flops": backbone_flops, "cumulative_flops": backbone_flops + head["flops"],
        "training": training,
    }


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


# --------------------------------------------------------------------------- the experiment


def run_experiment(out_dir: str | Path, config: ExperimentConfig | None = None,
                   progress: bool = False, log: Callable[[str], None] | None = None,
                   command: str | None = None) -> dict[str, Any]:
    """Runs the exit-family experiment; writes ``results.json`` and the plots into ``out_dir``.

    Args:
        out_dir: Output directory (created).
        config: What to run (default: :class:`ExperimentConfig`, the committed digits run).
        progress: Show training progress bars.
        log: Called with one line per finished step (default: print, flushed).
        command: The command line that ran it, recorded in the results.

    Returns:
        The results (the content of ``results.json``).
    """
    from trt_exit.models.flops import model_costs
    from trt_exit.training.datasets import load_dataset
    from trt_exit.training.trainer import evaluate, seed_everything, train

    config = config or ExperimentConfig()
    config.validate()
    say = log or (lambda line: print(line, flush=True))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    began = time.perf_counter()
    splits = load_dataset(config.dataset, seed=config.seed)
    if splits["train"].task != "classification":
        raise ConfigError(f"the exit-family experiment is for classification; {config.dataset} "
                          f"is {splits['train'].task} (use --dataset synthetic_av_crowd for the "
                          f"crowd-counting experiment)")
    train_set, val_set, test_set = splits["train"], splits["val"], splits["test"]
    if config.max_train_samples:
        train_set = train_set.subset(np.arange(min(config.max_train_samples, len(train_set))))
    image_shape = next(iter(train_set.inputs.values())).shape[1:]
    num_classes = int(max(train_set.targets.max(), test_set.targets.max())) + 1

    rows: list[dict[str, Any]] = []
    backbones: dict[str, Any] = {}
    bof_curves: dict[str, Any] = {}
    bases: dict[str, MultiExitModel] = {}
    exit_config = dataclasses.replace(config.exit_train, seed=config.seed)
    for plan in config.backbones:
        base_config = model_config(plan.model, exits=[], num_outputs=num_classes)
        base_config.backbone_options = {**base_config.backbone_options,
                                        "img_size": tuple(image_shape[1:]),
                                        "in_chans": int(image_shape[0])}
        seed_everything(config.seed)
        base = build_model(base_config)
        backbone_train = dataclasses.replace(plan.train, regime=END_TO_END, seed=config.seed)
        history = train(base, train_set, backbone_train, progress=progress)
        costs = model_costs(base)
        depth = len(base.backbone.blocks)
        positions = tuple(plan.positions or range(1, depth))
        training = {"regime": "backbone + final head, from scratch", "epochs": backbone_train.epochs,
                    "seconds": history.seconds}
        test_final = evaluate(base, test_set)[-1]
        val_final = evaluate(base, val_set)[-1]
        rows.append(_final_row(base, plan.name, costs, test_final, val_final, config.seed,
                               training))
        backbones[plan.name] = {
            "model": plan.model, "type": base_config.backbone, "depth": depth,
            "options": base_config.backbone_options, "params": costs["backbone_params"],
            "embed_flops": costs["embed_flops"], "block_flops": costs["block_flops"][0],
            "final_head": {"type": base.exits[-1].type_name, "accuracy": test_final,
                           "val_accuracy": val_final},
            "positions": list(positions), "train": dataclasses.asdict(backbone_train),
            "seconds": history.seconds,
        }
        bases[plan.name] = base
        say(f"[{plan.name}] backbone + final head: test accuracy {test_final:.4f} "
            f"({history.seconds:.0f} s)")
        for family in plan.families:
            seed_everything(config.seed)
            model = attach_family(base, family, positions)
            record = train_exits(model, family, train_set, exit_config, progress)
            test_metrics = evaluate(model, test_set)
            val_metrics = evaluate(model, val_set)
            family_costs = model_costs(model)
            rows.extend(_rows_for(model, family, plan.name, family_costs, test_metrics,
                                  val_metrics, config.seed, record))
            if family == "bof":
                bof_curves[plan.name] = bof_stopping_curve(model, test_set, family_costs,
                                                           config.bof_betas)
            say(f"[{plan.name}] {family:<14} test accuracy by position "
                + " ".join(f"{p}:{m:.3f}" for p, m in zip(positions, test_metrics))
                + f" ({record['seconds']:.0f} s)")

    head_to_head = _head_to_head(config, bases, train_set, val_set, test_set, say)
    results = {
        "experiment": "exit_families",
        "command": command,
        "dataset": {"name": config.dataset, "seed": config.seed, **test_set.info,
                    "train_samples": len(train_set), "val_samples": len(val_set),
                    "test_samples": len(test_set)},
        "protocol": {
            "backbone": "each backbone trained once with its final head only (from scratch)",
            "exits": "classifier-wise: backbone and final head frozen; one model per family "
                     "with that family's exit after every block; BoF exits of one model share "
                     "their classifier and add their histograms (hierarchical, as in the paper)",
            "copycat_slvit": "SL-ViT exits, half the epochs imitating the frozen final head's "
                             "argmax, half on the labels (same epoch budget as slvit)",
            "head_to_head": "each family as the model's only early exit at the first position, "
                            "several seeds (exit init and data order)",
            "metric": "top-1 accuracy on the test split",
            "flops": "per sample, 2 x multiply-accumulates of matmuls and convolutions, counted "
                     "by torch.utils.flop_counter.FlopCounterMode (element-wise ops count 0)",
            "cumulative_flops": "backbone up to the exit + the exit (+ the earlier BoF exits "
                                "whose histograms a BoF exit needs)",
            "exit_params": "parameters of the exit head (a BoF exit's include the shared "
                           "classifier)",
        },
        "exit_train": dataclasses.asdict(exit_config),
        "backbones": backbones,
        "rows": rows,
        "head_to_head": head_to_head,
        "bof_stopping": bof_curves,
    }
    return finish_results(results, out_dir, began, write_plots, say)


def _head_to_head(config: ExperimentConfig, bases: dict[str, MultiExitModel],
                  train_set: Dataset, val_set: Dataset, test_set: Dataset,
                  say: Callable[[str], None]) -> dict[str, Any]:
    """The first-position comparison, several seeds per family."""
    from trt_exit.models.flops import model_costs
    from trt_exit.training.trainer import evaluate, seed_everything

    if not config.head_to_head or not config.head_to_head_seeds:
        return {}
    plan = config.backbones[0]
    base = bases[plan.name]
    position = (plan.positions or (1,))[0]
    families = []
    for family in config.head_to_head:
        accuracies, val_accuracies = [], []
        for seed in config.head_to_head_seeds:
            seed_everything(seed)
            model = attach_family(base, family, [position])
            exit_config = dataclasses.replace(config.exit_train, seed=seed)
            train_exits(model, family, train_set, exit_config)
            accuracies.append(evaluate(model, test_set)[0])
            val_accuracies.append(evaluate(model, val_set)[0])
        cost = model_costs(model)
        mean, std = _mean_std(accuracies)
        families.append({
            "family": family, "exit_type": exit_family_of(family), "accuracy": accuracies,
            "mean": mean, "std": std, "val_accuracy": val_accuracies,
            "exit_params": cost["exits"][0]["params"], "exit_flops": cost["exits"][0]["flops"],
            "cumulative_flops": cost["exits"][0]["cumulative_flops"],
        })
        say(f"[head to head @ {position}] {family:<14} test accuracy "
            + " ".join(f"{a:.4f}" for a in accuracies) + f" (mean {mean:.4f} +- {std:.4f})")
    return {"backbone": plan.name, "position": position,
            "seeds": list(config.head_to_head_seeds), "families": families,
            "note": "std is the sample standard deviation over seeds; one test sample is "
                    f"{100 / len(test_set):.2f} accuracy points"}


# --------------------------------------------------------------------------- reporting


def write_plots(results: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Accuracy vs exit position and accuracy vs cumulative FLOPs, one panel per backbone."""
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    names = list(results["backbones"])
    written = []
    for filename, x_key, x_label in ((POSITION_PLOT, "position", "exit position (blocks run)"),
                                     (FLOPS_PLOT, "cumulative_flops",
                                      "FLOPs per sample up to the exit (M)")):
        figure = Figure(figsize=(6.5 * len(names), 4.8), layout="constrained")
        axes = figure.subplots(1, len(names), squeeze=False)[0]
        for ax, name in zip(axes, names):
            mine = [r for r in results["rows"] if r["backbone"] == name]
            final = [r for r in mine if r["family"] == "final_head"]
            families = list(dict.fromkeys(r["family"] for r in mine if r["family"] != "final_head"))
            for family in families:
                points = sorted((r[x_key], r["value"]) for r in mine if r["family"] == family)
                xs = [p[0] / 1e6 if x_key != "position" else p[0] for p in points]
                ax.plot(xs, [100 * p[1] for p in points], marker="o", markersize=3.5,
                        linewidth=1.2, label=family)
            for r in final:
                x = r[x_key] / 1e6 if x_key != "position" else r[x_key]
                ax.plot([x], [100 * r["value"]], marker="*", markersize=12, color="black",
                        linestyle="none", label=f"final head ({r['exit_type']})")
            ax.set_title(f"{results['dataset']['name']}: {name} backbone "
                         f"({results['backbones'][name]['depth']} blocks)")
            ax.set_xlabel(x_label)
            ax.set_ylabel("test accuracy (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, ncol=2)
        path = out_dir / filename
        figure.savefig(path, dpi=110)
        written.append(path)
    return written


def results_markdown(results: dict[str, Any]) -> str:
    """The results as markdown tables: head to head, every family by position, BoF stopping."""
    lines = []
    h2h = results.get("head_to_head") or {}
    if h2h:
        seeds = ", ".join(map(str, h2h["seeds"]))
        lines += [f"### First exit position (after block {h2h['position']}, {h2h['backbone']} "
                  f"backbone), seeds {seeds}", "",
                  "| exit | test accuracy per seed (%) | mean ± std (%) | exit params | exit FLOPs |",
                  "|---|---|---|---:|---:|"]
        for f in h2h["families"]:
            per_seed = ", ".join(f"{100 * a:.2f}" for a in f["accuracy"])
            lines.append(f"| {f['family']} | {per_seed} | {100 * f['mean']:.2f} ± "
                         f"{100 * f['std']:.2f} | {f['exit_params']:,} | {f['exit_flops']:,} |")
        lines += ["", h2h["note"], ""]
    for name, info in results["backbones"].items():
        mine = [r for r in results["rows"] if r["backbone"] == name]
        positions = info["positions"]
        families = list(dict.fromkeys(r["family"] for r in mine if r["family"] != "final_head"))
        lines += [f"### {name} backbone: test accuracy (%) by exit position (seed "
                  f"{results['dataset']['seed']})", "",
                  f"One block: {info['block_flops']:,} FLOPs; final head "
                  f"({info['final_head']['type']}): {100 * info['final_head']['accuracy']:.2f}%.",
                  "",
                  "| family | " + " | ".join(str(p) for p in positions)
                  + " | exit params | exit FLOPs |",
                  "|---|" + "---:|" * (len(positions) + 2)]
        for family in families:
            by_position = {r["position"]: r for r in mine if r["family"] == family}
            first = by_position[positions[0]]
            cells = " | ".join(f"{100 * by_position[p]['value']:.2f}" for p in positions)
            lines.append(f"| {family} | {cells} | {first['exit_params']:,} | "
                         f"{first['exit_flops']:,} |")
        lines.append("")
    for name, curve in (results.get("bof_stopping") or {}).items():
        final = next(r for r in results["rows"]
                     if r["backbone"] == name and r["family"] == "final_head")
        lines += [f"### BoF stopping rule ({name} backbone, test split)", "",
                  f"Relative FLOPs are against the model without exits (backbone + final head: "
                  f"{final['cumulative_flops']:,} FLOPs, {100 * final['value']:.2f}%). Exits "
                  f"taken: % of samples per BoF exit, the final head last.", "",
                  "| beta | threshold | accuracy (%) | mean FLOPs | vs. no exits | exits taken (%) |",
                  "|---:|---:|---:|---:|---:|---|"]
        for point in curve:
            fractions = " ".join(f"{100 * f:.0f}" for f in point["exit_fractions"])
            lines.append(f"| {point['beta']:.2f} | {point['threshold']:.3f} | "
                         f"{100 * point['accuracy']:.2f} | {point['mean_flops']:,.0f} | "
                         f"{point['mean_flops'] / final['cumulative_flops']:.2f} | {fractions} |")
        lines.append("")
    return "\n".join(lines)
