"""``trt-exit experiment``: the papers' comparisons, written to results.json and plots.

* ``--dataset digits`` (default): exit families x exit positions, CopycatSL-ViT against SL-ViT
  and SL-ViT on a CNN backbone (:mod:`trt_exit.experiments.exit_families`);
* ``--dataset synthetic_av_crowd``: audiovisual crowd counting
  (:mod:`trt_exit.experiments.av_crowd`);
* ``--dataset digits_c``, ``mnist`` or ``mnist_c`` (or ``--experiment pareto --dataset
  digits,digits_c``): early exit against static models of the same latency and FLOPs, for one
  or several training recipes and seeds (:mod:`trt_exit.experiments.pareto`).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from trt_exit.commands.options import COUNT, PATH, SEED, TEXT, THREADS
from trt_exit.errors import ConfigError

AV_CROWD = "synthetic_av_crowd"
AV_MODULE = "trt_exit.experiments.av_crowd"
EXPERIMENTS = ("families", "av_crowd", "pareto")


def _experiment_of(args: argparse.Namespace) -> str:
    """The experiment to run: ``--experiment``, else the one the dataset implies."""
    if args.experiment:
        return args.experiment
    if args.dataset == AV_CROWD:
        return "av_crowd"
    pareto = {"digits_c", "mnist", "mnist_c"}
    return "pareto" if pareto & set(args.dataset.split(",")) else "families"


def _command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run."""
    parts = ["trt-exit", "experiment", "--out", str(args.out), "--dataset", args.dataset,
             "--seed", str(args.seed)]
    if args.experiment:
        parts += ["--experiment", args.experiment]
    if getattr(args, "epochs", None) is not None:
        parts += ["--epochs", str(args.epochs)]
    if getattr(args, "recipes", None):
        parts += ["--recipes", args.recipes]
    if getattr(args, "seeds", None):
        parts += ["--seeds", args.seeds]
    if args.quick:
        parts.append("--quick")
    if args.families:
        parts += ["--families", args.families]
    if args.threads != 1:
        parts += ["--threads", str(args.threads)]
    return " ".join(parts)


def _run_av(args: argparse.Namespace) -> int:
    import importlib

    try:
        module = importlib.import_module(AV_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name != AV_MODULE:
            raise
        raise ConfigError(
            f"the {AV_CROWD} experiment lives in {AV_MODULE}, which this installation does not "
            f"have; update trt-exit, or run the digits experiment (--dataset digits)"
        ) from None
    results = module.run_av_experiment(out_dir=Path(args.out), seed=args.seed, quick=args.quick)
    print(f"wrote the {AV_CROWD} experiment to {args.out}"
          + (f" ({len(results)} result fields)" if isinstance(results, dict) else ""))
    return 0


def _filter_families(config, families: str):
    """Keeps only the named families (in every backbone and in the head-to-head comparison)."""
    from trt_exit.experiments.exit_families import COPYCAT
    from trt_exit.models.exits import exit_types

    wanted = [f.strip() for f in families.split(",") if f.strip()]
    known = set(exit_types()) | {COPYCAT}
    unknown = [f for f in wanted if f not in known]
    if unknown:
        raise ConfigError(f"unknown exit families {unknown}; known: {', '.join(sorted(known))}")
    for plan in config.backbones:
        plan.families = tuple(f for f in plan.families if f in wanted)
    config.backbones = [plan for plan in config.backbones if plan.families]
    if not config.backbones:
        raise ConfigError(f"none of {wanted} attaches to the experiment's backbones")
    config.head_to_head = tuple(f for f in config.head_to_head
                                if f in config.backbones[0].families)
    return config


def _run_pareto(args: argparse.Namespace) -> int:
    from trt_exit.experiments.pareto import DEFAULT_MODELS, ParetoConfig, quick_config, run_pareto

    if args.families:
        raise ConfigError("--families belongs to the exit-family experiment, not to pareto")
    datasets = tuple(d.strip() for d in args.dataset.split(",") if d.strip())
    seeds = (args.seed,)
    if args.seeds:
        try:
            seeds = tuple(int(s) for s in args.seeds.split(","))
        except ValueError:
            raise ConfigError(f"bad --seeds {args.seeds!r}; use e.g. 0,1,2") from None
    config = quick_config(seeds[0]) if args.quick else ParetoConfig()
    models = dict(DEFAULT_MODELS)
    if args.quick:  # the tiny test model where it fits (8x8 inputs)
        models.update({d: config.models["digits_c"] for d in ("digits", "digits_c")})
    config = dataclasses.replace(config, datasets=datasets, num_threads=args.threads,
                                 seeds=seeds, epochs=args.epochs, models=models)
    if args.recipes:
        config.recipes = tuple(r.strip() for r in args.recipes.split(",") if r.strip())
    run_pareto(args.out, config, command=_command_line(args))
    print(f"wrote the comparison to {args.out} (results.json, RESULTS.md, plots)")
    return 0


def _experiment(args: argparse.Namespace) -> int:
    from trt_exit.fileio import check_output_dir

    experiment = _experiment_of(args)
    check_output_dir(args.out, "--out", create=True)  # before hours of training, not after
    if experiment == "av_crowd":
        return _run_av(args)
    if experiment == "pareto":
        return _run_pareto(args)
    if args.epochs is not None or args.recipes or args.seeds:
        raise ConfigError("--epochs, --recipes and --seeds apply to the pareto experiment only")
    from trt_exit.experiments.exit_families import (
        ExperimentConfig,
        quick_config,
        results_markdown,
        run_experiment,
    )

    config = quick_config(args.seed) if args.quick else ExperimentConfig(seed=args.seed)
    config = dataclasses.replace(config, dataset=args.dataset, num_threads=args.threads)
    if args.families:
        config = _filter_families(config, args.families)
    results = run_experiment(args.out, config, progress=args.progress,
                             command=_command_line(args))
    print()
    print(results_markdown(results))
    return 0


def register(subparsers) -> None:
    """Adds ``experiment``."""
    p = subparsers.add_parser(
        "experiment", help="compare exit families and positions; write results.json and plots",
        description="Trains one backbone per kind (ViT, CNN), attaches every exit family after "
                    "every block (backbone frozen), and reports test accuracy, parameters and "
                    "FLOPs per family and position, CopycatSL-ViT against SL-ViT, and a "
                    "several-seed comparison at the first exit. With --dataset "
                    f"{AV_CROWD}: the audiovisual crowd-counting experiment. With --dataset "
                    "digits_c (or --experiment pareto): the multi-exit model's operating points "
                    "against static models truncated to k blocks, accuracy vs latency and FLOPs.")
    p.add_argument("--out", type=PATH, required=True,
                   help="output directory (results.json, PNG plots)")
    p.add_argument("--dataset", type=TEXT, default="digits",
                   help=f"digits (default) or {AV_CROWD}; digits_c, mnist, mnist_c, or a "
                        "comma-separated list with --experiment pareto: early exit vs static "
                        "models")
    p.add_argument("--experiment", choices=EXPERIMENTS,
                   help="families (exit families x positions), av_crowd, or pareto (early exit "
                        "vs static models; default for digits_c); default: implied by --dataset")
    p.add_argument("--epochs", type=COUNT,
                   help="pareto: training epochs of every model (default: the demo recipe's)")
    p.add_argument("--seed", type=SEED, default=0,
                   help="seed of the split, the backbones and the grid's exit training")
    p.add_argument("--seeds", type=TEXT, metavar="S0,S1,...",
                   help="pareto: several seeds (numbers averaged over them; replaces --seed)")
    p.add_argument("--recipes", type=TEXT, metavar="R0,R1,...",
                   help="pareto: multi-exit training recipes to compare on one budget, the first "
                        "the headline (default end_to_end), e.g. "
                        "end_to_end,two_phase+ensemble+calibrate (trt_exit/training/recipes.py)")
    p.add_argument("--quick", action="store_true",
                   help="smoke-test size: tiny backbones, one or two epochs (numbers mean nothing)")
    p.add_argument("--families", type=TEXT,
                   help="comma-separated subset of the exit families to run")
    p.add_argument("--threads", type=THREADS, default=1,
                   help="torch threads (default 1: small models on shared cores)")
    p.add_argument("--progress", action="store_true", help="show training progress bars")
    p.set_defaults(func=_experiment)
