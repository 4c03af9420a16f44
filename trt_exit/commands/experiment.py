"""``trt-exit experiment``: the papers' comparisons, written to results.json and plots.

* ``--dataset digits`` (default): exit families x exit positions, CopycatSL-ViT against SL-ViT
  and SL-ViT on a CNN backbone (:mod:`trt_exit.experiments.exit_families`);
* ``--dataset synthetic_av_crowd``: audiovisual crowd counting
  (:mod:`trt_exit.experiments.av_crowd`).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from trt_exit.commands.options import SEED, THREADS
from trt_exit.errors import ConfigError

AV_CROWD = "synthetic_av_crowd"
AV_MODULE = "trt_exit.experiments.av_crowd"


def _command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run."""
    parts = ["trt-exit", "experiment", "--out", str(args.out), "--dataset", args.dataset,
             "--seed", str(args.seed)]
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


def _experiment(args: argparse.Namespace) -> int:
    if args.dataset == AV_CROWD:
        return _run_av(args)
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
                    f"{AV_CROWD}: the audiovisual crowd-counting experiment.")
    p.add_argument("--out", required=True, help="output directory (results.json, PNG plots)")
    p.add_argument("--dataset", default="digits",
                   help=f"digits (default) or {AV_CROWD}")
    p.add_argument("--seed", type=SEED, default=0,
                   help="seed of the split, the backbones and the grid's exit training")
    p.add_argument("--quick", action="store_true",
                   help="smoke-test size: tiny backbones, one or two epochs (numbers mean nothing)")
    p.add_argument("--families", help="comma-separated subset of the exit families to run")
    p.add_argument("--threads", type=THREADS, default=1,
                   help="torch threads (default 1: small models on shared cores)")
    p.add_argument("--progress", action="store_true", help="show training progress bars")
    p.set_defaults(func=_experiment)
