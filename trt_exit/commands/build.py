"""Precision and TensorRT commands: calibrate, precision, build, doctor.

    trt-exit calibrate DIR [--split train] [--size 256] [--from FILE.npz]
    trt-exit precision DIR [--precision fp16 int8] [--calibration-method max]
    trt-exit build DIR [--precision fp16] [--min-batch 1 --opt-batch 1 --max-batch 8] ...
    trt-exit doctor [--require-tensorrt] [--skip-self-test]

``calibrate`` and ``precision`` run on any CPU (the FP16/INT8 graphs are measured with ONNX
Runtime: ``trt-exit tune/eval DIR --precision int8``); ``build`` runs on the device that will run
the engines (a Jetson), with TensorRT.
"""

from __future__ import annotations

import argparse
from pathlib import Path

PRECISIONS = ("fp32", "fp16", "int8")


def _writable(manifest, what: str):
    from trt_exit.fileio import check_output_dir

    check_output_dir(manifest.root, f"{what} (writes into the model directory)")
    return manifest


def _manifest(path: str):
    from trt_exit.manifest import Manifest

    return Manifest.load(path)


# --------------------------------------------------------------------------- calibrate


def _calibrate(args: argparse.Namespace) -> int:
    from trt_exit.export import calibration as calib

    manifest = _writable(_manifest(args.dir), "calibrate")
    if args.source and args.source.startswith("imagefolder://"):
        from trt_exit.training.image_folder import calibration_from_folder

        cset = calib.CalibrationSet(*calibration_from_folder(manifest, args.source, args.size,
                                                             args.seed))
    elif args.source:
        cset = calib.from_file(args.source)
    else:
        from trt_exit.workflow import dataset_of, load_splits

        info = dataset_of(manifest)
        splits = load_splits(info["name"], info["seed"], info.get("options"))
        split = splits[args.split]
        if hasattr(split, "materialize"):  # a streamed image folder: decode only the sample
            from trt_exit.training.image_folder import SAMPLE_RULE, sample_decodable

            sample = sample_decodable(split, args.size, args.seed)
            cset = calib.CalibrationSet(dict(sample.inputs), {
                "kind": "dataset", "split": split.name, "samples_in_split": len(split),
                "seed": args.seed, "selection": SAMPLE_RULE,
                "skipped_images": sample.info["skipped_images"],
                **{f"dataset_{k}": v for k, v in split.info.items()}})
        else:
            cset = calib.from_dataset(split, args.size, args.seed)
    manifest = calib.save(manifest, cset)
    record = manifest.calibration
    origin = record["origin"]
    where = origin.get("split") or origin.get("path")
    print(f"calibration set: {record['samples']} samples from {where} -> "
          f"{manifest.root / record['file']['path']}")
    return 0


# --------------------------------------------------------------------------- precision


def _precision(args: argparse.Namespace) -> int:
    from trt_exit.export.int8 import Int8Settings
    from trt_exit.export.precision import create_precision_graphs

    manifest = _writable(_manifest(args.dir), "precision")
    settings = Int8Settings(method=args.calibration_method, percentile=args.percentile,
                            activation_matmuls=not args.weights_only_matmuls)
    manifest = create_precision_graphs(manifest, args.precision, int8=settings)
    for precision in args.precision:
        agreement = manifest.parity[precision]["top1_agreement"]
        summary = ", ".join(f"{k.replace('_output', '')} {100 * v:.1f}%"
                            for k, v in agreement.items())
        print(f"{precision}: {len(manifest.stages) + 1} graphs in {manifest.root / 'onnx' / precision}"
              + (f"; top-1 agreement with fp32 on the check samples: {summary}" if summary else ""))
    print(f"measure them with: trt-exit tune {args.dir} --precision P && "
          f"trt-exit eval {args.dir} --precision P")
    return 0


# --------------------------------------------------------------------------- build


def _build(args: argparse.Namespace) -> int:
    from trt_exit.build.builder import build_engines, deploy_copy, require_tensorrt
    from trt_exit.build.config import BatchProfile, BuildConfig

    require_tensorrt("trt-exit build")  # before reading anything: the clearest first error
    manifest = _manifest(args.dir)
    if args.out:
        from trt_exit.fileio import check_folder_outside, check_output_dir

        check_folder_outside(args.out, manifest.root, "--out",
                             "copy the model outside it, or build in place (without --out)")
        check_output_dir(args.out, "--out", create=True)
        manifest = deploy_copy(manifest, args.out)
    _writable(manifest, "build")
    config = BuildConfig(
        precisions=tuple(args.precision),
        profile=BatchProfile(args.min_batch, args.opt_batch, args.max_batch),
        workspace_mib=args.workspace_mib,
        timing_cache=Path(args.timing_cache) if args.timing_cache else None,
        dla_core=args.dla_core, gpu_fallback=not args.no_gpu_fallback,
        version_compatible=args.version_compatible, optimization_level=args.optimization_level,
        rebuild=args.rebuild, device=args.device)
    summary = build_engines(manifest, config, progress=not args.no_progress)
    target = summary.target
    print(f"TensorRT {target.tensorrt} on {target.device_name} (sm {target.compute_capability}): "
          f"built {len(summary.built)}, reused {len(summary.cached)} cached engine(s) in "
          f"{summary.seconds:.1f} s; timing cache {summary.timing_cache}")
    print(f"run with: trt-exit eval {manifest.root} --backend tensorrt --precision "
          f"{args.precision[0]}")
    return 0


# --------------------------------------------------------------------------- doctor


def _doctor(args: argparse.Namespace) -> int:
    from trt_exit.build.doctor import format_checks, format_environment, run_doctor
    from trt_exit.fileio import atomic_write_json

    if args.json:
        from trt_exit.fileio import check_output_file

        check_output_file(args.json, "--json")
    report = run_doctor(self_test=not args.skip_self_test, precisions=tuple(args.precision))
    print(format_environment(report.environment))
    if report.checks:
        print()
        print(format_checks(report))
    if args.json:
        atomic_write_json(args.json, report.to_dict())
    if report.environment["tensorrt"] is None:
        print("\nTensorRT is not installed: engines cannot be built or run here. The ONNX Runtime "
              "path works without it (trt-exit eval/run --backend onnxruntime).")
        if args.require_tensorrt:
            print("trt-exit doctor: error: --require-tensorrt given and TensorRT is missing")
            return 1
    elif args.require_tensorrt and not report.environment.get("cuda", {}).get("available"):
        print("trt-exit doctor: error: --require-tensorrt given and TensorRT cannot run here "
              "(no usable GPU)")
        return 1
    if report.failed:
        print(f"\n{len(report.failed)} check(s) failed")
        return 1
    return 0


# --------------------------------------------------------------------------- registration


def register(subparsers) -> None:
    """Adds calibrate, precision, build and doctor."""
    from trt_exit.commands.options import (
        COUNT,
        NON_NEGATIVE,
        PATH,
        SEED,
        URI,
        integer,
        number,
    )
    from trt_exit.export.calibration import DEFAULT_SAMPLES
    from trt_exit.export.int8 import CALIBRATION_METHODS

    p = subparsers.add_parser(
        "calibrate", help="store an INT8 calibration set next to the manifest",
        description="Draws a calibration set from a split of the model's dataset (or reads one "
                    "from an .npz/.npy of preprocessed inputs) into DIR/calibration/ and "
                    "records its size and origin in the manifest.")
    p.add_argument("dir", type=PATH, help="directory with manifest.json")
    p.add_argument("--split", default="train", choices=("train", "val", "test"),
                   help="dataset split to draw from (default: train; val tunes thresholds and "
                        "test measures accuracy)")
    p.add_argument("--size", type=COUNT, default=DEFAULT_SAMPLES,
                   help=f"samples (default {DEFAULT_SAMPLES}; at least 32)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the draw")
    p.add_argument("--from", type=URI, dest="source", metavar="FILE",
                   help="use this .npz (arrays named like the model inputs) or .npy instead, or "
                        "imagefolder://DIR: a class-stratified sample of its images through the "
                        "model's own preprocessing")
    p.set_defaults(func=_calibrate)

    p = subparsers.add_parser(
        "precision", help="write FP16 and/or INT8 stage graphs (any CPU)",
        description="Writes onnx/fp16 (LayerNorm, softmax, reductions and confidences kept "
                    "FP32) and/or onnx/int8 (Q/DQ, TensorRT's explicit-quantization convention, "
                    "calibrated stage by stage on the calibration set) for every stage and the "
                    "baseline graph, and records them in the manifest.")
    p.add_argument("dir", type=PATH, help="directory with manifest.json")
    p.add_argument("--precision", nargs="+", default=["fp16", "int8"], choices=("fp16", "int8"),
                   help="graphs to write (default: fp16 int8)")
    p.add_argument("--calibration-method", default="max", choices=CALIBRATION_METHODS,
                   help="INT8 activation ranges (default: max)")
    p.add_argument("--percentile", type=number(0.0, 100.0, above=True), default=99.999,
                   help="with --calibration-method percentile (default 99.999)")
    p.add_argument("--weights-only-matmuls", action="store_true",
                   help="INT8: keep attention's activation x activation MatMuls in float")
    p.set_defaults(func=_precision)

    p = subparsers.add_parser(
        "build", help="build TensorRT engines on this device",
        description="Builds one strongly typed TensorRT engine per stage (and the baseline) "
                    "from the ONNX graphs of each precision, with a dynamic-batch profile. "
                    "Engines are cached by ONNX hash, TensorRT version, GPU, precision and "
                    "profile: an unchanged model is not rebuilt. Run it on the device that runs "
                    "the engines (they are not portable across GPUs or TensorRT versions).")
    p.add_argument("dir", type=PATH, help="directory with manifest.json")
    p.add_argument("--out", type=PATH,
                   help="build into a copy of DIR here (e.g. engines/<model>): manifest, ONNX "
                        "graphs, calibration set, checkpoint, engines")
    p.add_argument("--precision", nargs="+", default=["fp16"], choices=PRECISIONS,
                   help="engines to build (default: fp16); fp16/int8 need trt-exit precision")
    group = p.add_argument_group("batch profile")
    group.add_argument("--min-batch", type=COUNT, default=1)
    group.add_argument("--opt-batch", type=COUNT, default=1, help="batch the kernels are tuned for")
    group.add_argument("--max-batch", type=COUNT, default=8)
    p.add_argument("--workspace-mib", type=COUNT, default=1024, help="tactic workspace limit (MiB)")
    p.add_argument("--timing-cache", type=PATH,
                   help="timing cache file (default: DIR/engines/timing.<trt>-<gpu>.cache)")
    p.add_argument("--dla-core", type=NON_NEGATIVE,
                   help="build for this DLA core (Jetson AGX Orin/Orin NX)")
    p.add_argument("--no-gpu-fallback", action="store_true",
                   help="with --dla-core: fail instead of running unsupported layers on the GPU")
    p.add_argument("--version-compatible", action="store_true",
                   help="engines later TensorRT versions of the same major can load")
    p.add_argument("--optimization-level", type=integer(0, 5), metavar="0-5",
                   help="TensorRT builder optimization level (default: TensorRT's, 3)")
    p.add_argument("--rebuild", action="store_true", help="ignore cached engines")
    p.add_argument("--device", type=NON_NEGATIVE, default=0, help="CUDA device to build on")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_build)

    p = subparsers.add_parser(
        "doctor", help="report the environment and self-test TensorRT against ONNX Runtime",
        description="Prints TensorRT, CUDA, cuda-python, GPU, JetPack/L4T and OpenCV/GStreamer "
                    "versions; self-tests a tiny model on ONNX Runtime in every precision and, "
                    "where TensorRT can run, builds it and compares TensorRT's outputs with ONNX "
                    "Runtime's. Exits non-zero when a check fails.")
    p.add_argument("--require-tensorrt", action="store_true",
                   help="exit non-zero when TensorRT is missing or cannot run here")
    p.add_argument("--skip-self-test", action="store_true", help="only print the environment")
    p.add_argument("--precision", nargs="+", default=list(PRECISIONS), choices=PRECISIONS,
                   help="precisions to self-test (default: all)")
    p.add_argument("--json", type=PATH, help="also write the report as JSON here")
    p.set_defaults(func=_doctor)
