"""``trt-exit serve``: one model directory behind Triton Inference Server, through PyTriton.

PyTriton starts the ``tritonserver`` binary it ships (HTTP, gRPC, Prometheus metrics, dynamic
batching) and calls :func:`~trt_exit.serving.model_io.run_requests` in this process with each
batch the server formed; the executor (ONNX Runtime on a CPU, the CUDA executor on a GPU) runs
it with early exits. Usage::

    with ModelServer(ServeConfig("runs/demo")) as server:
        server.wait()            # until Ctrl-C / SIGTERM (or server.stop())
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trt_exit.errors import InputError
from trt_exit.manifest import Manifest
from trt_exit.serving.environment import (
    ServingError,
    check_port_free,
    pytriton_home,
    require_pytriton,
    stub_environment,
)
from trt_exit.serving.leftovers import TRITON_TMP, ServerRecord, clean_stale_servers
from trt_exit.serving.model_io import (
    ERROR,
    exit_counts,
    resolve_max_batch,
    run_requests,
    served_inputs,
    served_model_name,
    served_outputs,
)

log = logging.getLogger(__name__)

#: Triton endpoints PyTriton protects with a token by default. ``statistics`` (per-batch-size
#: counts, read-only) is left open so load tests and dashboards can read the batches formed.
PROTECTED_ENDPOINTS = ["shared-memory", "model-repository", "trace", "logging"]
#: How often a serving process records the shared memory its server uses (for the cleanup
#: after a crash, see leftovers.py).
REFRESH_S = 2.0


@dataclass
class ServeConfig:
    """How ``trt-exit serve`` runs.

    Attributes:
        model_dir: Model directory (``manifest.json`` and its graphs or engines).
        address: Address the HTTP, gRPC and metrics endpoints bind to (localhost by default;
            ``0.0.0.0`` serves every interface).
        http_port / grpc_port / metrics_port: Endpoint ports.
        max_batch: Largest batch the dynamic batcher forms (default: the engines' profile, or
            16 for ONNX Runtime).
        max_queue_delay_us: How long the batcher may hold a request to form a larger batch.
        backend / precision / threads: How the model runs (as in ``trt-exit run``).
        policy: Exit policy in ``trt-exit run --policy`` spelling (None: tuned thresholds).
        instances: Model instances (each with its own executor) that run batches in parallel.
        model_name: Name clients use (default: the manifest's model name).
        exit_timeout_s: How long stopping waits for in-flight requests.
        log_file: Write tritonserver's log here instead of the console.
    """

    model_dir: str | os.PathLike
    address: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch: int | None = None
    max_queue_delay_us: int = 1000
    backend: str = "onnxruntime"
    precision: str = "fp32"
    threads: int = 1
    policy: str | None = None
    instances: int = 1
    model_name: str | None = None
    exit_timeout_s: int = 5
    log_file: str | None = None


class ModelServer:
    """A running ``trt-exit serve``: Triton with the model bound, executors open.

    Entering starts the server and returns once the model is ready; leaving (or :meth:`stop`)
    stops Triton, removes what it leaves (processes, shared memory, temporary directories; see
    :mod:`~trt_exit.serving.leftovers`) and closes the executors. Starting first removes what
    servers that died without stopping left behind.

    Raises:
        ServingError: A port is in use, or the server did not start.
        ConfigError / ArtifactError: The model directory or an option is wrong.
    """

    def __init__(self, config: ServeConfig):
        self.config = config
        self.manifest = Manifest.load(config.model_dir)
        self.model_name = served_model_name(self.manifest, config.model_name)
        self.max_batch = resolve_max_batch(self.manifest, config.backend, config.precision,
                                           config.max_batch)
        self.exit_histogram = [0] * self.manifest.num_exits
        self.batch_sizes: dict[int, int] = {}  # samples per executor run -> runs
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._executors: list[Any] = []
        self._triton = None
        self._record: ServerRecord | None = None

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> "ModelServer":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> None:
        """Opens the executors, starts Triton and waits until the model is ready."""
        require_pytriton("trt-exit serve")
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

        from trt_exit.commands.pipelines import open_executor
        from trt_exit.commands.spine import parse_policy

        c = self.config
        if c.instances < 1:
            raise ServingError(f"--instances must be at least 1, got {c.instances}")
        # Before the port checks: a dead server's tritonserver may still hold the ports.
        home = pytriton_home()
        for cleaned in clean_stale_servers(home):
            log.warning("cleaned up after trt-exit serve (pid %s), which did not stop cleanly: "
                        "%s", cleaned.pid, cleaned.describe())
        for option, port in (("--http-port", c.http_port), ("--grpc-port", c.grpc_port),
                             ("--metrics-port", c.metrics_port)):
            check_port_free(c.address, port, option)
        policy = parse_policy(c.policy, self.manifest)
        for _ in range(c.instances):
            self._executors.append(open_executor(self.manifest, c.backend, c.precision, policy,
                                                 c.threads, max_batch=self.max_batch))
        # The Python-backend stub must load this interpreter's libpython (see environment.py);
        # PyTriton passes this process's environment to tritonserver.
        os.environ.update({key: value for key, value in stub_environment().items()
                           if key in ("LD_LIBRARY_PATH", "PATH")})
        triton_config = TritonConfig(
            http_address=c.address, grpc_address=c.address, metrics_address=c.address,
            http_port=c.http_port, grpc_port=c.grpc_port, metrics_port=c.metrics_port,
            exit_timeout_secs=c.exit_timeout_s, log_file=Path(c.log_file) if c.log_file else None,
        )
        self._record = ServerRecord.create(home)
        workspace = self._record.workspace if self._record is not None else None
        self._triton = Triton(config=triton_config, workspace=workspace,
                              security_config=TritonSecurityConfig(
                                  restricted_endpoints=list(PROTECTED_ENDPOINTS)))
        as_tensor = lambda io: Tensor(name=io.name, shape=io.dims,  # noqa: E731
                                      dtype=np.object_ if io.dtype == "object" else np.dtype(io.dtype))
        self._triton.bind(
            model_name=self.model_name,
            infer_func=[self._infer_function(executor) for executor in self._executors],
            inputs=[as_tensor(io) for io in served_inputs(self.manifest)],
            outputs=[as_tensor(io) for io in served_outputs(self.manifest, errors_in_band=True)],
            config=ModelConfig(max_batch_size=self.max_batch, batcher=DynamicBatcher(
                max_queue_delay_microseconds=c.max_queue_delay_us)),
            strict=True,
        )
        python_envs = set(TRITON_TMP.glob("python_env_*"))
        try:
            self._triton.run()
        except Exception as exc:  # PyTriton raises its own types (and TimeoutError)
            raise ServingError(f"tritonserver did not start ({type(exc).__name__}: {exc}); see "
                               f"its log above") from exc
        if self._record is not None:
            self._record.note_python_env(python_envs)
            self._record.refresh()

    def stop(self) -> None:
        """Stops Triton (waiting up to ``exit_timeout_s`` for in-flight requests), removes what
        it left and closes the executors. Safe to call more than once."""
        self._stopped.set()
        crashed = False
        if self._triton is not None:
            if self._record is not None:
                self._record.refresh()
            crashed = not self._triton.is_alive()
            self._triton.stop()
            self._triton = None
        if self._record is not None:
            cleaned, self._record = self._record.close(), None
            if cleaned.killed and crashed:
                log.warning("tritonserver exited unexpectedly; stopped what it left running "
                            "and removed its shared memory: %s", cleaned.describe())
            elif cleaned.killed:
                log.warning("tritonserver exited before its Python backend had unloaded the model "
                            "(it waits --exit-timeout-s %d s for requests in flight, then exits): "
                            "%s", self.config.exit_timeout_s, cleaned.describe())
        while self._executors:
            self._executors.pop().close()

    def wait(self, stop_event: threading.Event | None = None, poll_s: float = 0.5) -> str:
        """Serves until ``stop_event`` is set, :meth:`stop` is called or tritonserver exits.

        Returns:
            ``"stopped"`` or ``"server_exited"``.
        """
        refreshed = time.monotonic()
        while not self._stopped.is_set():
            if stop_event is not None and stop_event.wait(poll_s):
                return "stopped"
            if stop_event is None:
                self._stopped.wait(poll_s)
            if self._triton is not None and not self._triton.is_alive():
                return "server_exited"
            if self._record is not None and time.monotonic() - refreshed > REFRESH_S:
                self._record.refresh()
                refreshed = time.monotonic()
        return "stopped"

    # ------------------------------------------------------------------ serving

    def urls(self) -> dict[str, str]:
        host = f"[{self.config.address}]" if ":" in self.config.address else self.config.address
        return {"http": f"http://{host}:{self.config.http_port}",
                "grpc": f"grpc://{host}:{self.config.grpc_port}",
                "metrics": f"http://{host}:{self.config.metrics_port}/metrics"}

    def _infer_function(self, executor):
        """PyTriton's callable for one model instance: requests in, one response each."""

        def infer(requests):
            inputs = [{name: request[name] for name in request} for request in requests]
            answers = run_requests(executor, inputs)
            responses = []
            for inputs_i, answer in zip(inputs, answers):
                if isinstance(answer, InputError):
                    responses.append(self._refusal(inputs_i, str(answer)))
                else:
                    rows = len(answer["exit_index"])
                    responses.append({**answer, ERROR: np.full((rows, 1), b"", np.object_)})
            counts = exit_counts(answers, self.manifest.num_exits)
            with self._lock:
                for k, n in enumerate(counts):
                    self.exit_histogram[k] += n
                samples = sum(counts)
                if samples:
                    self.batch_sizes[samples] = self.batch_sizes.get(samples, 0) + 1
            return responses

        return infer

    def _refusal(self, inputs: dict[str, np.ndarray], reason: str) -> dict[str, np.ndarray]:
        """The in-band error response of a refused request (exit -1, NaN values)."""
        rows = len(next(iter(inputs.values())))
        out = {}
        for io in served_outputs(self.manifest, errors_in_band=True):
            if io.dtype == "object":
                out[io.name] = np.full((rows, *io.dims), reason.encode(), np.object_)
            elif io.dtype.startswith("float"):
                out[io.name] = np.full((rows, *io.dims), np.nan, io.dtype)
            else:
                out[io.name] = np.full((rows, *io.dims), -1, io.dtype)
        return out


