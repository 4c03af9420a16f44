"""``trt-exit serve`` (Triton through PyTriton) and ``trt-exit triton-repo`` (a repository for a
stock tritonserver). See docs/serving.md."""

from __future__ import annotations

import argparse
import signal
import threading

from trt_exit.commands.options import COUNT, NON_NEGATIVE, PATH, TEXT, integer

PORT = integer(1, 65535)
from trt_exit.commands.pipelines import add_backend_options

POLICY_HELP = "thresholds (default: the tuned ones), thresholds:T0,T1,..., fixed:K, deadline:MS"


def _serve(args: argparse.Namespace) -> int:
    from trt_exit.serving.pytriton_server import ModelServer, ServeConfig

    config = ServeConfig(
        model_dir=args.dir, address=args.address, http_port=args.http_port,
        grpc_port=args.grpc_port, metrics_port=args.metrics_port, max_batch=args.max_batch,
        max_queue_delay_us=args.max_queue_delay_us, backend=args.backend,
        precision=args.precision, threads=args.threads, policy=args.policy,
        instances=args.instances, model_name=args.model_name,
        exit_timeout_s=args.exit_timeout_s, log_file=args.log_file)
    stop = threading.Event()
    handled = (signal.SIGINT, signal.SIGTERM)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {signum: signal.getsignal(signum) for signum in handled}
    if in_main_thread:
        for signum in handled:
            signal.signal(signum, lambda signum, frame: stop.set())
    try:
        with ModelServer(config) as server:
            urls = server.urls()
            print(f"serving {server.model_name} ({server.manifest.num_exits} exits, "
                  f"{config.backend} {config.precision}, max batch {server.max_batch}) on "
                  f"{urls['http']} and {urls['grpc']}; metrics {urls['metrics']}; "
                  f"Ctrl-C stops", flush=True)
            how = server.wait(stop)
            total = sum(server.exit_histogram)
            shares = ", ".join(f"exit {k}: {n}" for k, n in enumerate(server.exit_histogram))
            print(f"{'stopping' if how == 'stopped' else 'tritonserver exited'}: answered "
                  f"{total} samples ({shares})", flush=True)
    finally:
        if in_main_thread:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    return 0 if how == "stopped" else 2


def _triton_repo(args: argparse.Namespace) -> int:
    from trt_exit.serving.repository import RepositoryConfig, write_repository

    model = write_repository(RepositoryConfig(
        model_dir=args.dir, out=args.out, model_name=args.model_name, backend=args.backend,
        precision=args.precision, threads=args.threads, policy=args.policy,
        max_batch=args.max_batch, max_queue_delay_us=args.max_queue_delay_us,
        instance_kind=args.instance_kind, instances=args.instances, reference=args.reference,
        onnxruntime_model=args.onnxruntime_model))
    print(f"wrote {model.parent} (model {model.name}); start it with: tritonserver "
          f"--model-repository={model.parent.resolve()}  (or, with the tritonserver bundled in "
          f"nvidia-pytriton: trt-exit tritonserver --model-repository={model.parent}; see "
          f"{model.parent / 'README.md'})")
    return 0


def _tritonserver(args: argparse.Namespace) -> int:
    import os
    import shlex
    from pathlib import Path

    from trt_exit.errors import ConfigError
    from trt_exit.serving.environment import (
        bundled_tritonserver,
        bundled_tritonserver_dir,
        check_port_free,
        tritonserver_environment,
    )

    repository = Path(args.repository)
    if not repository.is_dir():
        raise ConfigError(f"model repository {repository} is not a directory; write one with "
                          f"trt-exit triton-repo DIR --out {repository}")
    for option, port in (("--http-port", args.http_port), ("--grpc-port", args.grpc_port),
                         ("--metrics-port", args.metrics_port)):
        check_port_free(args.address, port, option)
    binary, backends = bundled_tritonserver(bundled_tritonserver_dir())
    extra = args.tritonserver_options[1:] if args.tritonserver_options[:1] == ["--"] \
        else args.tritonserver_options
    command = [str(binary), f"--model-repository={repository.resolve()}",
               f"--backend-directory={backends}", f"--http-address={args.address}",
               f"--grpc-address={args.address}", f"--metrics-address={args.address}",
               f"--http-port={args.http_port}", f"--grpc-port={args.grpc_port}",
               f"--metrics-port={args.metrics_port}", *extra]
    print(f"running {shlex.join(command)}", flush=True)
    os.execve(binary, command, tritonserver_environment())  # tritonserver's signals and status


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", type=PATH, help="model directory with manifest.json")
    add_backend_options(p)
    group = p.add_argument_group("served model")
    group.add_argument("--policy", type=TEXT, help=POLICY_HELP)
    group.add_argument("--model-name", type=TEXT,
                       help="name clients use (default: the manifest's)")
    group = p.add_argument_group("batching")
    group.add_argument("--max-batch", type=COUNT,
                       help="largest batch the server forms (default: the engines' profile, "
                            "else 16)")
    group.add_argument("--max-queue-delay-us", type=NON_NEGATIVE, default=1000,
                       help="how long a request may wait for others to join its batch "
                            "(default 1000 us)")
    group.add_argument("--instances", type=COUNT, default=1,
                       help="model instances running batches in parallel (default 1)")


def register(subparsers) -> None:
    """Adds ``serve`` and ``triton-repo``."""
    p = subparsers.add_parser(
        "serve", help="serve a model through NVIDIA Triton (HTTP, gRPC, dynamic batching)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serves a model directory through Triton Inference Server (PyTriton, "
                    "pip install 'trt-exit[serve]'). Requests from many clients are batched; "
                    "each sample leaves at its own exit. Responses: output, exit_index, "
                    "confidence, prediction (and error, empty unless refused).",
        epilog="example: trt-exit serve runs/demo\n"
               "         trt-exit count synthetic://crowd jsonl://out.jsonl --audio "
               "synthetic://crowd --engines DIR --server grpc://127.0.0.1:8001\n"
               "Ctrl-C (or SIGTERM) stops cleanly. See docs/serving.md.")
    _add_model_options(p)
    group = p.add_argument_group("network")
    group.add_argument("--address", type=TEXT, default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1, this machine only; "
                            "0.0.0.0 for every interface)")
    group.add_argument("--http-port", type=PORT, default=8000, help="HTTP port (default 8000)")
    group.add_argument("--grpc-port", type=PORT, default=8001, help="gRPC port (default 8001)")
    group.add_argument("--metrics-port", type=PORT, default=8002,
                       help="Prometheus metrics port (default 8002)")
    group.add_argument("--exit-timeout-s", type=NON_NEGATIVE, default=5,
                       help="on stop, how long to wait for requests in flight (default 5)")
    group.add_argument("--log-file", type=PATH,
                       help="write tritonserver's log here instead of the console")
    p.set_defaults(func=_serve)

    p = subparsers.add_parser(
        "triton-repo", help="write a Triton model repository for a stock tritonserver",
        description="Writes a Triton model repository: a Python-backend model running the "
                    "early-exit chain with trt_exit's executor, its config.pbtxt, the model "
                    "files and a README saying how to start it.")
    _add_model_options(p)
    p.add_argument("--out", type=PATH, required=True, metavar="REPO",
                   help="repository directory to create")
    p.add_argument("--instance-kind", default="auto", choices=("auto", "cpu", "gpu"),
                   help="instance group kind (auto: gpu for torch/tensorrt, else cpu)")
    p.add_argument("--onnxruntime-model", action="store_true",
                   help="also write NAME_onnx: the single early-exit graph (--precision) for "
                        "Triton's onnxruntime backend, no Python in the request path")
    p.add_argument("--reference", action="store_true",
                   help="point at DIR by absolute path instead of copying the model files")
    p.set_defaults(func=_triton_repo)

    p = subparsers.add_parser(
        "tritonserver", help="run the tritonserver bundled with nvidia-pytriton on a repository",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Runs the tritonserver that ships inside nvidia-pytriton (pip install "
                    "'trt-exit[serve]'; it is not put on PATH) on a model repository written by "
                    "trt-exit triton-repo, with its Python backend set up for this interpreter.",
        epilog="example: trt-exit triton-repo runs/demo --out triton_repo\n"
               "         trt-exit tritonserver --model-repository=triton_repo -- --log-verbose=1\n"
               "Ctrl-C stops it. See docs/serving.md.")
    p.add_argument("--model-repository", type=PATH, required=True, metavar="REPO", dest="repository",
                   help="model repository (written by trt-exit triton-repo)")
    p.add_argument("--address", type=TEXT, default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--http-port", type=PORT, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--grpc-port", type=PORT, default=8001, help="gRPC port (default 8001)")
    p.add_argument("--metrics-port", type=PORT, default=8002,
                   help="Prometheus metrics port (default 8002)")
    p.add_argument("tritonserver_options", type=TEXT, nargs=argparse.REMAINDER, metavar="-- OPTIONS",
                   help="more tritonserver options, after --")
    p.set_defaults(func=_tritonserver)


__all__ = ["register"]
