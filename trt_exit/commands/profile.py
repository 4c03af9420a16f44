"""``trt-exit profile`` (per-stage and end-to-end latency, plots) and ``trt-exit nsys``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from trt_exit.commands.options import COUNT, NON_NEGATIVE, PATH, POSITIVE, TEXT
from trt_exit.errors import ConfigError, InputError
from trt_exit.fileio import check_output_dir, check_output_file, load_arrays

log = logging.getLogger(__name__)

#: The most memory random profiling inputs may take (runs cycle through them).
RANDOM_INPUTS_BYTES = 2**30


def load_profile_inputs(manifest, source: str, samples: int, seed: int = 0):
    """Inputs to profile on: ``dataset`` (the test split the manifest's model was trained on;
    falls back to ``random`` when it cannot be loaded), ``random`` (standard normal, shaped
    like the inputs: timing only, the exit histogram then means little), or an ``.npz`` file
    with arrays named like the inputs.

    Returns:
        ``(inputs by name, description)``.
    """
    if source == "dataset":
        try:
            from trt_exit.workflow import dataset_of, load_splits

            info = dataset_of(manifest)
            splits = load_splits(info["name"], info.get("seed", 0), info.get("options"))
            test = splits["test"]
            inputs = {name: np.ascontiguousarray(v[:samples]) for name, v in test.inputs.items()}
            return inputs, f"{test.name} ({len(next(iter(inputs.values())))} samples)"
        except (ConfigError, KeyError) as exc:
            log.warning("cannot load the dataset of %s (%s); profiling on random inputs, so the "
                        "exit histogram does not reflect real data", manifest.path, exc)
            source = "random"
    if source == "random":
        per_sample = sum(4 * int(np.prod(spec.shape[1:])) for spec in manifest.inputs)
        if samples * per_sample > RANDOM_INPUTS_BYTES:
            raise ConfigError(f"--input-samples {samples} random inputs would take "
                              f"{samples * per_sample / 2**30:.1f} GiB; use at most "
                              f"{RANDOM_INPUTS_BYTES // per_sample} (runs cycle through them)")
        rng = np.random.default_rng(seed)
        inputs = {spec.name: rng.standard_normal((samples, *spec.shape[1:])).astype(np.float32)
                  for spec in manifest.inputs}
        return inputs, f"random normal inputs ({samples} samples)"
    path = Path(source)
    if not path.is_file():
        raise InputError(f"--inputs {source}: use dataset, random, or an .npz file")
    loaded = load_arrays(path, "--inputs file")
    if not isinstance(loaded, dict):
        if len(manifest.inputs) != 1:
            raise InputError(f"{path}: this model takes {[s.name for s in manifest.inputs]}; "
                             f"save them in one .npz by name")
        return {manifest.inputs[0].name: loaded[:samples]}, str(path)
    return {name: array[:samples] for name, array in loaded.items()}, str(path)


def _profile(args: argparse.Namespace) -> int:
    from trt_exit.commands.pipelines import deadline_policy, open_executor
    from trt_exit.commands.spine import parse_policy
    from trt_exit.fileio import atomic_write_json
    from trt_exit.manifest import Manifest
    from trt_exit.profiling.plots import save_profile_plots
    from trt_exit.profiling.report import ProfileConfig, format_profile, profile_executor

    manifest = Manifest.load(args.dir)
    out = Path(args.out) if args.out else manifest.root / "profile"
    source = [("--inputs", args.inputs)] if args.inputs not in ("dataset", "random") else []
    for name in ("profile.json", "profile.png"):
        check_output_file(out / name, "--out", models=[manifest], inputs=source,
                          create_folder=True)
    if args.save_latency:
        check_output_dir(manifest.root, "--save-latency (writes the manifest)")
    if args.budget_ms:
        policy = deadline_policy(manifest, args.budget_ms, args.backend)
    else:
        policy = parse_policy(args.policy, manifest)
    inputs, described = load_profile_inputs(manifest, args.inputs, args.input_samples)
    config = ProfileConfig(samples=args.samples, warmup=args.warmup,
                           stage_repeats=args.stage_repeats, batch=args.batch)
    with open_executor(manifest, args.backend, args.precision, policy, args.threads,
                       strategy=args.strategy) as executor:
        report = profile_executor(executor, inputs, args.backend, config, policy, described)
    report["command"] = _command_line(args)
    atomic_write_json(out / "profile.json", report)
    save_profile_plots(report, out / "profile.png")
    print(format_profile(report))
    print(f"\nwrote {out / 'profile.json'} and {out / 'profile.png'}")
    if args.save_latency:
        stages = {name: s.get("gpu", s["wall"])["median_ms"] for name, s in report["stages"].items()}
        from trt_exit.profiling.environment import machine_info

        manifest.latency_profile = {
            "backend": report["backend_info"] or {"backend": args.backend},
            "precision": args.precision, "batch": args.batch, "unit": "ms",
            "statistic": f"median of {args.stage_repeats}", "stages": stages,
            "machine": machine_info(), "source": "trt-exit profile"}
        manifest.save()
        print(f"stored the per-stage latency in {manifest.path} (deadline mode uses it)")
    return 0


def _command_line(args: argparse.Namespace) -> str:
    """The profile command with every option spelled out (what reproduces the report)."""
    import shlex

    parts = ["trt-exit", "profile", args.dir, "--backend", args.backend, "--precision",
             args.precision, "--inputs", args.inputs, "--input-samples", str(args.input_samples),
             "--samples", str(args.samples), "--warmup", str(args.warmup), "--stage-repeats",
             str(args.stage_repeats), "--batch", str(args.batch)]
    if args.backend == "onnxruntime":
        parts += ["--threads", str(args.threads), "--strategy", args.strategy]
    if args.policy:
        parts += ["--policy", args.policy]
    if args.budget_ms:
        parts += ["--budget-ms", str(args.budget_ms)]
    return shlex.join(parts)


def _nsys(args: argparse.Namespace) -> int:
    from trt_exit.profiling.nsys import run_nsys

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    return run_nsys(command, output=args.output, dry_run=args.dry_run)


def register(subparsers) -> None:
    """Adds ``profile`` and ``nsys``."""
    from trt_exit.commands.pipelines import add_backend_options, add_strategy_option

    p = subparsers.add_parser(
        "profile", help="per-stage and end-to-end latency, exit histogram, plots",
        description="Times every stage alone (wall time; GPU time with CUDA events on GPU "
                    "backends) and the whole model under its exit policy (p50/p90/p99 latency, "
                    "exit histogram, achieved rate); writes profile.json and profile.png. "
                    "On a Jetson it records the power mode and clocks.")
    p.add_argument("dir", type=PATH, help="model directory with manifest.json")
    add_backend_options(p)
    add_strategy_option(p)
    p.add_argument("--policy", type=TEXT,
                   help="thresholds (default), thresholds:T0,T1,..., fixed:K, all")
    p.add_argument("--budget-ms", type=POSITIVE, help="deadline policy with this budget")
    p.add_argument("--inputs", type=PATH, default="dataset",
                   help="dataset (the model's test split, default), random, or an .npz file")
    p.add_argument("--input-samples", type=COUNT, default=360,
                   help="distinct input samples (default 360)")
    p.add_argument("--samples", type=COUNT, default=1000, help="timed end-to-end runs")
    p.add_argument("--warmup", type=NON_NEGATIVE, default=20, help="untimed runs first")
    p.add_argument("--stage-repeats", type=COUNT, default=200, help="timed runs per stage")
    p.add_argument("--batch", type=COUNT, default=1, help="samples per run (default 1)")
    p.add_argument("--out", type=PATH,
                   help="output directory (default DIR/profile; created if missing)")
    p.add_argument("--save-latency", action="store_true",
                   help="store the per-stage medians as the manifest's latency profile")
    p.set_defaults(func=_profile)

    p = subparsers.add_parser(
        "nsys", help="run a command under Nsight Systems (or print the command)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Runs: nsys profile -t cuda,nvtx,osrt --capture-range=cudaProfilerApi "
                    "--capture-range-end=stop --cuda-graph-trace=node -o REPORT <command>\n"
                    "with TRT_EXIT_CUDA_PROFILER=1, so trt-exit opens the capture range around "
                    "its measured loop. Where nsys is not installed, prints the command.",
        epilog="example: trt-exit nsys -o av_fp16 -- trt-exit profile engines/av_crowd "
               "--backend tensorrt --precision fp16")
    p.add_argument("-o", "--output", type=PATH, default="report",
                   help="report name (default: report)")
    p.add_argument("--dry-run", action="store_true", help="only print the command")
    p.add_argument("command", type=TEXT, nargs=argparse.REMAINDER,
                   help="-- then the command to profile")
    p.set_defaults(func=_nsys)
