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
        instance_kind=args.instance_kind, instances=args.instances, reference=args.reference))
    print(f"wrote {model.parent} (model {model.name}); start it with: tritonserver "
          f"--model-repository={model.parent.resolve()}  (see {model.parent / 'README.md'})")
    return 0


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
    p.add_argument("--reference", action="store_true",
                   help="point at DIR by absolute path instead of copying the model files")
    p.set_defaults(func=_triton_repo)


__all__ = ["register"]
